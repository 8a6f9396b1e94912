"""Durability: kill -9 after (and during) acknowledgements, and restart with deferred mail."""

from __future__ import annotations

import collections
import smtplib
import threading
from pathlib import Path

import pytest

from .harness import (
    Daemon,
    DaemonFactory,
    barrier,
    base_config,
    make_message,
    make_message_id,
    message_ids,
    send_smtplib,
    wait_for,
)

pytestmark = pytest.mark.integration

RCPTS = ["alice@example.test", "bob@example.test", "carol@example.test"]
SENDERS = 4
REDELIVERY_TIMEOUT = 60.0


def _send_batch(daemon: Daemon, count: int, acked: list[str], stop: threading.Event,
                errors: list[BaseException]) -> None:
    """Send ``count`` messages on one connection; append each acknowledged Message-ID."""
    try:
        with daemon.smtp(timeout=30) as client:
            client.ehlo("crash.example.test")
            for i in range(count):
                if stop.is_set():
                    return
                mid = make_message_id()
                rcpt = RCPTS[i % len(RCPTS)]
                send_smtplib(client, "sender@remote.test", [rcpt],
                             make_message("sender@remote.test", [rcpt], message_id=mid))
                acked.append(mid)  # list.append is atomic
    except (OSError, smtplib.SMTPException, AssertionError) as e:
        if not stop.is_set():
            errors.append(e)


def _send_concurrently(daemon: Daemon, total: int, *, kill_after: int | None = None
                       ) -> list[str]:
    acked: list[str] = []
    errors: list[BaseException] = []
    stop = threading.Event()
    threads = [threading.Thread(target=_send_batch,
                                args=(daemon, total // SENDERS, acked, stop, errors))
               for _ in range(SENDERS)]
    for thread in threads:
        thread.start()
    try:
        if kill_after is not None:
            wait_for(lambda: len(acked) >= kill_after or errors, 60,
                     lambda: f"{kill_after} acknowledgements (have {len(acked)})")
            stop.set()
            daemon.kill9()
    finally:
        for thread in threads:
            thread.join(60)
    if kill_after is None:
        assert not errors, errors
    return list(acked)


def _delivered_counts(daemon: Daemon) -> collections.Counter[str]:
    return collections.Counter(message_ids(daemon.delivered()))


def _wait_all_delivered(daemon: Daemon, acked: list[str]) -> collections.Counter[str]:
    wanted = set(acked)

    def done() -> collections.Counter[str] | None:
        counts = _delivered_counts(daemon)
        return counts if wanted <= set(counts) else None

    return wait_for(done, REDELIVERY_TIMEOUT, lambda: (
        f"{len(wanted - set(_delivered_counts(daemon)))} of {len(wanted)} acknowledged "
        f"messages still undelivered\n{daemon.output()[-3000:]}"))


@pytest.fixture
def daemon(daemons: DaemonFactory) -> Daemon:
    return daemons.start(base_config(mailboxes=["alice", "bob", "carol"]))


def test_kill9_after_acknowledgements_loses_nothing(daemon: Daemon) -> None:
    acked = _send_concurrently(daemon, 200)
    assert len(acked) == 200
    daemon.kill9()  # deliveries may be in flight
    daemon.start()
    _wait_all_delivered(daemon, acked)
    barrier(daemon, "alice@example.test")  # let any duplicate in flight land too
    counts = _delivered_counts(daemon)
    duplicates = {mid: n for mid, n in counts.items() if n > 1 and mid in acked}
    assert not duplicates, f"delivered more than once: {duplicates}"
    assert set(counts) - set(acked) - _barrier_ids(daemon) == set()
    assert sum(counts[m] for m in acked) == 200


def test_kill9_while_receiving_loses_nothing_acknowledged(daemon: Daemon) -> None:
    acked: list[str] = []
    for kill_after in (100, 20, 5):  # three crashes, each in the middle of traffic
        round_acked = _send_concurrently(daemon, 400, kill_after=kill_after)
        assert len(round_acked) >= kill_after
        acked += round_acked
        daemon.start()
    _wait_all_delivered(daemon, acked)
    barrier(daemon, "alice@example.test")
    counts = _delivered_counts(daemon)
    duplicates = {mid: n for mid, n in counts.items() if n > 1}
    assert not duplicates, f"delivered more than once: {duplicates}"


def _barrier_ids(daemon: Daemon) -> set[str]:
    ids = set()
    for path in daemon.delivered():
        text = path.read_text(errors="replace")
        if "barrier@remote.test" in text:
            ids.update(message_ids([path]))
    return ids


# --- deferred mail survives a restart ---------------------------------------------------


def _broken_daemon(daemons: DaemonFactory) -> tuple[Daemon, Path]:
    """A daemon whose route broken.test cannot deliver: its Maildir parent is a regular file.

    (chmod does not stop root, so a file where a directory should be forces the failure.)
    """
    config = base_config(retry=["1s"])
    config["route"].insert(0, {"domains": ["broken.test"], "action": "local",
                               "maildir": "var/mail/{domain}/{local}"})
    daemon = daemons.prepare(config)
    blocker = daemon.run_dir / "var" / "mail" / "broken.test"
    blocker.parent.mkdir(parents=True)
    blocker.write_text("not a directory\n")
    return daemon.start(), blocker


def _send_to_broken(daemon: Daemon, count: int) -> dict[str, str]:
    """Message-ID -> queue id for ``count`` messages to broken.test, sender a local mailbox."""
    sent = {}
    with daemon.smtp() as client:
        client.ehlo("queue.example.test")
        for i in range(count):
            mid = make_message_id()
            rcpt = f"user{i}@broken.test"
            sent[mid] = send_smtplib(client, "owner@example.test", [rcpt],
                                     make_message("owner@example.test", [rcpt], message_id=mid))
    return sent


def _wait_deferred(daemon: Daemon, qids: list[str]) -> None:
    for qid in qids:
        daemon.wait_log(qid, "defer", timeout=20)


def _wait_broken_delivered(daemon: Daemon, sent: dict[str, str]) -> None:
    def delivered() -> bool:
        paths = sorted((daemon.run_dir / "var" / "mail" / "broken.test").glob("*/new/*"))
        return set(message_ids(paths)) == set(sent)

    wait_for(delivered, REDELIVERY_TIMEOUT,
             lambda: f"delivery to broken.test after the fix\n{daemon.output()[-3000:]}")


def _assert_no_bounce(daemon: Daemon) -> None:
    barrier(daemon)
    owner = daemon.maildir("example.test", "owner") / "new"
    assert not owner.exists() or not list(owner.iterdir()), "a deferral was bounced"


def test_deferred_mail_delivered_after_restart(daemons: DaemonFactory) -> None:
    daemon, blocker = _broken_daemon(daemons)
    sent = _send_to_broken(daemon, 3)
    _wait_deferred(daemon, list(sent.values()))
    assert daemon.stop() == 0
    blocker.unlink()
    daemon.start()
    _wait_broken_delivered(daemon, sent)
    _assert_no_bounce(daemon)


def test_deferred_mail_retried_without_restart(daemons: DaemonFactory) -> None:
    daemon, blocker = _broken_daemon(daemons)
    sent = _send_to_broken(daemon, 2)
    _wait_deferred(daemon, list(sent.values()))
    blocker.unlink()
    _wait_broken_delivered(daemon, sent)
    _assert_no_bounce(daemon)


def test_deferred_mail_survives_kill9(daemons: DaemonFactory) -> None:
    daemon, blocker = _broken_daemon(daemons)
    sent = _send_to_broken(daemon, 2)
    _wait_deferred(daemon, list(sent.values()))
    daemon.kill9()
    blocker.unlink()
    daemon.start()
    _wait_broken_delivered(daemon, sent)
