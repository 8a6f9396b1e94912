"""SIGTERM lets a transaction in flight finish; a full spool disk answers 452 4.3.1."""

from __future__ import annotations

import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from .harness import (
    Daemon,
    DaemonFactory,
    base_config,
    expect,
    find_delivered,
    is_listening,
    make_message,
    make_message_id,
    queue_id,
    wait_for,
)

pytestmark = pytest.mark.integration


def test_sigterm_finishes_transaction_in_flight(daemons: DaemonFactory) -> None:
    daemon = daemons.start(base_config())
    token = make_message_id()
    message = make_message("s@remote.test", ["alice@example.test"], message_id=token,
                           body="part one\r\n" * 50 + "part two\r\n")
    head, tail = message[:200], message[200:]
    with daemon.raw() as raw:
        raw.banner()
        raw.start_mail("s@remote.test", ["alice@example.test"])
        raw.send(head)
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: not is_listening(daemon.host, daemon.port), 10,
                 "the listener closed after SIGTERM")
        raw.send(tail + b".\r\n")
        queue_id(raw.read_reply())
        # after the transaction the server may say goodbye itself (421) or answer QUIT
        assert raw.cmd("QUIT").code in (221, 421)
        raw.check_enhanced_codes()
    assert daemon.proc is not None
    assert daemon.proc.wait(15) == 0, daemon.output()[-3000:]
    daemon.stop()
    if not find_delivered(daemon, token):
        daemon.start()
    wait_for(lambda: find_delivered(daemon, token), 20,
             lambda: f"delivery after SIGTERM\n{daemon.output()[-3000:]}")


@pytest.fixture
def small_spool(tmp_path: Path) -> Iterator[Path]:
    """A 512 KiB tmpfs for the spool (skipped where mounting is not allowed)."""
    mount = tmp_path / "smallfs"
    mount.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount(8)")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k,mode=0755", "tmpfs",
                             str(mount)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {result.stderr.strip()}")
    try:
        yield mount
    finally:
        if subprocess.run(["umount", str(mount)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def test_disk_full_answers_452_and_leaves_nothing(daemons: DaemonFactory,
                                                  small_spool: Path) -> None:
    config = base_config()
    config["queue"]["directory"] = str(small_spool / "spool")
    config["limits"] = {"max_message_size": 10_000_000}
    daemon: Daemon = daemons.start(config)
    before = _files(small_spool)
    token = make_message_id()
    body = ("x" * 76 + "\r\n") * 13_000  # ~1 MB, twice the file system
    with daemon.raw() as raw:
        raw.banner()
        raw.start_mail("s@remote.test", ["alice@example.test"])
        raw.send(make_message("s@remote.test", ["alice@example.test"], message_id=token,
                              body=body) + b".\r\n")
        expect(raw.read_reply(timeout=30), 452, "4.3.1")
        leftovers = _files(small_spool) - before
        assert not leftovers, f"half-written files left: {sorted(leftovers)}"
        # the session and the spool still work for a message that fits
        small = make_message_id()
        raw.start_mail("s@remote.test", ["alice@example.test"])
        raw.send(make_message("s@remote.test", ["alice@example.test"], message_id=small)
                 + b".\r\n")
        queue_id(raw.read_reply())
        raw.check_enhanced_codes()
    wait_for(lambda: find_delivered(daemon, small), 20, "delivery of the small message")
    assert find_delivered(daemon, token) == []
