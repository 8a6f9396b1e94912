"""Start-up on a spool big enough to be read back by the child reader process:
every message delivered, exactly once, and nothing read twice or skipped."""

from __future__ import annotations

import email
import os
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import maybeDeferred

from core_fakes import queue_message
from relaygw.envelope import Recipient
from relaygw.service import CHILD_READER_MIN
from relaygw.spool import Spool

from .harness import DaemonFactory, base_config, wait_for

pytestmark = pytest.mark.integration

MESSAGES = CHILD_READER_MIN + 500


class NoFsync:
    """``os`` with fsync a no-op: the test writes its spool fast, the daemon reads it."""

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    @staticmethod
    def fsync(fd: int) -> None:
        pass


def test_a_big_spool_is_read_back_by_a_child_and_delivered_once(
        daemons: DaemonFactory) -> None:
    daemon = daemons.prepare(base_config())
    spool = Spool(daemon.run_dir / "var" / "spool", maybeDeferred, NoFsync())
    spool.prepare()
    maildir = "var/mail/example.test/alice"
    sent = set()
    for n in range(MESSAGES):
        message_id = f"<big-{n}@remote.test>"
        queue_message(spool, [Recipient("alice@example.test", "alice@example.test", "local",
                                        maildir=maildir)],
                      sender="sender@remote.test",
                      data=f"Message-ID: {message_id}\r\nSubject: {n}\r\n\r\nbody\r\n".encode())
        sent.add(message_id)
    os.sync()
    daemon.start()
    new = daemon.maildir("example.test", "alice") / "new"

    def all_delivered() -> bool:
        return new.is_dir() and len(os.listdir(new)) >= MESSAGES

    wait_for(all_delivered, 180, lambda: f"{len(os.listdir(new)) if new.is_dir() else 0}"
             f" of {MESSAGES} delivered\n{daemon.output()[-3000:]}")
    delivered = [email.message_from_bytes(path.read_bytes())["Message-ID"]
                 for path in sorted(Path(new).iterdir())]
    assert sorted(delivered) == sorted(sent)  # each once: none lost, none twice
    output = daemon.output()
    assert f"spool: resuming {MESSAGES} queued messages (read by a child process)" in output
    assert f"spool: {MESSAGES} queued messages resumed" in output
    assert "reading the rest in threads" not in output
    assert "corrupt/" not in output
