"""The spool with its journal: small messages journaled, moved to queue files
when they stay queued, converted at start-up, seen by relaygwctl offline."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from core_fakes import journaled_spool, queue_message, recipient, sync_run
from relaygw import journalconvert
from relaygw import spool as spool_module
from relaygw.envelope import Envelope, RecipientState
from relaygw.journal import Journal, live_messages, segment_name, segment_numbers
from relaygw.messagecache import WireReady
from relaygw.spool import BUFFER_LIMIT, Spool
from support import ManualRunner

MESSAGE = b"Received: from x\r\nSubject: hello\r\n\r\nbody line\r\n"


class CountingOS:
    """``os``, counting the calls that cost the disk, failing writev on request."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self.fail_writev = False

    def __getattr__(self, name: str) -> Any:
        if name in ("fsync", "fdatasync", "link", "rename", "open"):
            self.calls[name] = self.calls.get(name, 0) + 1
        return getattr(os, name)

    def writev(self, fd: int, buffers: list[Any]) -> int:
        self.calls["writev"] = self.calls.get("writev", 0) + 1
        if self.fail_writev:
            raise OSError(errno.ENOSPC, "No space left on device")
        return os.writev(fd, buffers)


def entries_on_disk(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.is_file())


def restart(directory: Path) -> Spool:
    """What start-up does with a spool a crash left: a fresh spool, prepared."""
    spool = Spool(directory, sync_run)
    spool.prepare()
    return spool


def test_a_small_message_is_one_journal_append_and_no_queue_file(tmp_path: Path) -> None:
    fake = CountingOS()
    spool = journaled_spool(tmp_path / "spool", fake)
    fake.calls.clear()
    envelope = queue_message(spool, [recipient("a@far.test")], data=MESSAGE)
    assert fake.calls == {"writev": 1, "fdatasync": 1}  # one write, one sync
    assert entries_on_disk(spool.directory) == []
    assert spool.journaled.keys() == {envelope.id}
    assert spool.read_message(envelope.id) == MESSAGE
    assert spool.load(envelope.id).recipients[0].address == "a@far.test"
    assert spool.queue_ids() == [envelope.id]
    spool.cache.discard(envelope.id)
    with spool.open_message(envelope) as message:
        assert message.read() == MESSAGE  # from the journal itself


def test_a_message_bigger_than_the_buffer_gets_its_queue_file(tmp_path: Path) -> None:
    spool = journaled_spool(tmp_path / "spool")
    big = b"x" * (BUFFER_LIMIT + 10) + b"\r\n"
    envelope = queue_message(spool, [recipient("a@far.test")], data=big)
    assert spool.journaled == {}
    assert entries_on_disk(spool.directory) == [f"{envelope.id}.q"]
    assert spool.read_message(envelope.id) == big


def test_a_failed_append_fails_the_commit_and_queues_nothing(tmp_path: Path) -> None:
    fake = CountingOS()
    spool = journaled_spool(tmp_path / "spool", fake)
    fake.fail_writev = True
    incoming = spool.open_incoming()
    incoming.write(MESSAGE)
    outcome: list[Any] = []
    spool.commit(incoming, Envelope(id=incoming.id, sender="s@src.test",
                                    recipients=[recipient("a@far.test")],
                                    received=0.0)).addBoth(outcome.append)
    [failure] = outcome
    assert isinstance(failure, Failure) and failure.value.errno == errno.ENOSPC
    assert spool.journaled == {} and spool.cache.get(incoming.id) is None
    assert live_messages(spool.journal_directory)[0] == {}
    assert restart(spool.directory).queue_ids() == []


def test_a_message_that_stays_queued_moves_to_a_queue_file_with_its_new_envelope(
        tmp_path: Path) -> None:
    spool = journaled_spool(tmp_path / "spool")
    envelope = queue_message(spool, [recipient("a@far.test")], data=MESSAGE)
    envelope.recipients[0].state = RecipientState.DEFERRED
    envelope.recipients[0].attempts = 1
    spool.cache.discard(envelope.id)  # read back from the journal for the move
    spool.save(envelope)
    assert spool.journaled == {}
    assert entries_on_disk(spool.directory) == [f"{envelope.id}.q"]  # no ID.env needed
    assert live_messages(spool.journal_directory)[0] == {}  # its done record is written
    later = restart(spool.directory)
    assert later.read_message(envelope.id) == MESSAGE
    assert later.load(envelope.id).recipients[0].attempts == 1
    # once in its file, the next save is the usual ID.env
    envelope.recipients[0].attempts = 2
    spool.save(envelope)
    assert Spool(spool.directory, sync_run).load(envelope.id).recipients[0].attempts == 2


def test_a_delivered_message_leaves_only_a_done_record(tmp_path: Path) -> None:
    spool = journaled_spool(tmp_path / "spool")
    envelope = queue_message(spool, [recipient("a@far.test")], data=MESSAGE)
    done: list[object] = []
    spool.remove(envelope.id).addCallback(done.append)
    assert done == [None]
    assert spool.journaled == {} and spool.cache.get(envelope.id) is None
    assert live_messages(spool.journal_directory)[0] == {}
    assert restart(spool.directory).queue_ids() == []  # a crash now brings nothing back


def test_start_up_gives_every_journaled_message_a_queue_file(tmp_path: Path) -> None:
    spool = journaled_spool(tmp_path / "spool")
    kept = [queue_message(spool, [recipient(f"{n}@far.test")], data=MESSAGE + b"%d\r\n" % n)
            for n in range(3)]
    delivered = queue_message(spool, [recipient("gone@far.test")], data=MESSAGE)
    spool.remove(delivered.id)
    # kill -9: nothing stopped, nothing flushed beyond what was acknowledged
    later = restart(spool.directory)
    assert sorted(later.queue_ids()) == sorted(e.id for e in kept)
    assert segment_numbers(later.journal_directory) == []  # all retired
    recovered = {e.id: e for e in later.recover()}
    for n, envelope in enumerate(kept):
        assert later.read_message(envelope.id) == MESSAGE + b"%d\r\n" % n
        assert recovered[envelope.id].recipients[0].address == f"{n}@far.test"
    assert restart(spool.directory).queue_ids() == sorted(e.id for e in kept)  # idempotent


def test_a_message_already_in_its_queue_file_is_not_written_again(tmp_path: Path) -> None:
    """Moved to its file, then a crash before its done record was written: the
    file (perhaps with an ID.env) is the truth."""
    spool = journaled_spool(tmp_path / "spool")
    envelope = queue_message(spool, [recipient("a@far.test")], data=MESSAGE)
    location = spool.journaled[envelope.id]
    spool._materialize(envelope.id, envelope.to_bytes(), MESSAGE, location)  # no done record
    envelope.recipients[0].attempts = 3
    spool._save(envelope.id, envelope.to_bytes())
    before = spool.message_path(envelope.id).read_bytes()
    later = restart(spool.directory)
    assert spool.message_path(envelope.id).read_bytes() == before
    assert later.load(envelope.id).recipients[0].attempts == 3


def test_a_damaged_segment_is_kept_in_corrupt_after_what_it_held_before(
        tmp_path: Path) -> None:
    spool = journaled_spool(tmp_path / "spool")
    first = queue_message(spool, [recipient("a@far.test")], data=MESSAGE)
    lost = queue_message(spool, [recipient("b@far.test")], data=MESSAGE)
    number = spool.journaled[lost.id].segment
    spool.journal._rotate()  # a newer segment: the damage is not a torn tail
    third = queue_message(spool, [recipient("c@far.test")], data=MESSAGE)
    path = spool.journal_directory / segment_name(number)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # inside the second message
    path.write_bytes(bytes(data))
    later = restart(spool.directory)
    assert later.queue_ids() == sorted([first.id, third.id])
    [kept] = (spool.directory / "corrupt").iterdir()
    assert kept.name.startswith("journal-") and kept.name.endswith(path.name)
    assert kept.read_bytes() == bytes(data)


def test_relaygwctl_sees_and_changes_journaled_messages_while_relaygw_is_stopped(
        tmp_path: Path) -> None:
    spool = journaled_spool(tmp_path / "spool")
    held = queue_message(spool, [recipient("a@far.test")], data=MESSAGE)
    deleted = queue_message(spool, [recipient("b@far.test")], data=MESSAGE)
    offline = Spool(spool.directory, sync_run)  # what relaygwctl opens
    assert offline.queue_ids() == sorted([held.id, deleted.id])
    envelope = offline.load(held.id)
    with offline.open_message(envelope) as message:
        assert message.read() == MESSAGE
    envelope.held = True
    offline.save(envelope)
    offline.remove(deleted.id)
    later = restart(spool.directory)
    assert later.queue_ids() == [held.id]
    assert later.load(held.id).held is True
    assert later.read_message(held.id) == MESSAGE


def test_without_a_journal_every_message_gets_its_queue_file(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", sync_run)
    spool.prepare()
    envelope = queue_message(spool, [recipient("a@far.test")], data=MESSAGE)
    assert entries_on_disk(spool.directory) == [f"{envelope.id}.q"]
    assert not spool.journal_directory.exists()


def small_segments(directory: Path, monkeypatch: pytest.MonkeyPatch,
                   run_blocking: Any = sync_run, per_segment: int = 1) -> Spool:
    """A journaled spool whose segments hold ``per_segment`` messages, and that
    moves what lingers as soon as two segments are in use."""
    monkeypatch.setattr(spool_module, "KEEP_SEGMENTS", 1)
    journal = Journal(directory / "journal", None, segment_bytes=420 * per_segment)
    spool = Spool(directory, run_blocking, journal=journal)
    spool.prepare()
    return spool


def test_a_message_that_lingers_in_the_journal_moves_to_a_queue_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Parked behind a dead next hop, it would keep its segment and every later
    one on disk; moved, it frees them."""
    spool = small_segments(tmp_path / "spool", monkeypatch)
    parked = queue_message(spool, [recipient("a@dead.test")], data=MESSAGE)
    for n in range(4):  # relayed at once
        envelope = queue_message(spool, [recipient(f"{n}@far.test")], data=MESSAGE)
        spool.remove(envelope.id)
    assert spool.journaled == {}
    assert entries_on_disk(spool.directory) == [f"{parked.id}.q"]
    assert len(segment_numbers(spool.journal_directory)) <= 2  # retired behind it
    later = restart(spool.directory)
    assert later.queue_ids() == [parked.id]
    assert later.load(parked.id).recipients[0].address == "a@dead.test"
    assert later.read_message(parked.id) == MESSAGE


def test_a_save_or_removal_during_a_move_waits_for_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runner = ManualRunner()
    spool = small_segments(tmp_path / "spool", monkeypatch, runner, per_segment=2)
    saved = queue_message(spool, [recipient("a@dead.test")], data=MESSAGE)
    removed = queue_message(spool, [recipient("b@dead.test")], data=MESSAGE)
    queue_message(spool, [recipient("c@far.test")], data=MESSAGE)
    assert len(runner.pending) == 2  # both moves asked for, neither run
    saved.recipients[0].attempts = 1
    outcomes: list[object] = []
    spool.save(saved).addBoth(outcomes.append)
    spool.remove(removed.id).addBoth(outcomes.append)
    assert outcomes == []
    runner.run_all()
    assert outcomes == [None, None]
    assert entries_on_disk(spool.directory) == sorted(
        [f"{saved.id}.q", f"{saved.id}.env"])
    later = restart(spool.directory)
    assert removed.id not in later.queue_ids()
    assert later.load(saved.id).recipients[0].attempts == 1


def test_no_move_starts_beside_a_save_that_is_moving_the_message(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The scheduler's save and the journal's growth both want the message in a
    queue file: one writes it, the other waits, and the saved envelope stands."""
    runner = ManualRunner()
    spool = small_segments(tmp_path / "spool", monkeypatch, runner, per_segment=2)
    envelope = queue_message(spool, [recipient("a@dead.test")], data=MESSAGE)
    envelope.recipients[0].attempts = 1
    saved: list[object] = []
    spool.save(envelope).addBoth(saved.append)
    queue_message(spool, [recipient("b@far.test")], data=MESSAGE)
    queue_message(spool, [recipient("c@far.test")], data=MESSAGE)  # a new segment
    assert len(runner.pending) == 2  # the save, and the move of b only
    runner.run_all()
    assert saved == [None]
    later = restart(spool.directory)
    assert later.load(envelope.id).recipients[0].attempts == 1


@pytest.mark.parametrize(("system", "release", "trusted"), [
    ("Linux", "5.7.19", False), ("Linux", "5.8.0-63-generic", True),
    ("Linux", "6.18.44-fc-v782", True), ("Linux", "4.18.0-553.el8", False),
    ("Linux", "weird", False), ("FreeBSD", "14.0-RELEASE", False)])
def test_syncfs_is_trusted_only_where_it_reports_write_back_errors(
        system: str, release: str, trusted: bool) -> None:
    assert journalconvert._reports_writeback_errors(system, release) is trusted


def test_a_save_cut_short_by_its_caller_still_finishes_its_move(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Shutdown cancels attempts: the save's write goes on in its thread, and the
    message must not be left both journaled and in a queue file."""
    runner = ManualRunner()
    spool = small_segments(tmp_path / "spool", monkeypatch, runner, per_segment=4)
    envelope = queue_message(spool, [recipient("a@dead.test")], data=MESSAGE)
    saved = spool.save(envelope)
    saved.cancel()
    assert envelope.id in spool._moving  # still registered: the write has not run
    runner.run_all()
    assert spool._moving == {} and spool.journaled == {}
    assert live_messages(spool.journal_directory)[0] == {}  # its done record
    spool.remove(envelope.id)
    runner.run_all()
    assert restart(spool.directory).queue_ids() == []


def test_a_move_whose_bookkeeping_raises_still_lets_the_message_go(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spool = small_segments(tmp_path / "spool", monkeypatch)
    parked = queue_message(spool, [recipient("a@dead.test")], data=MESSAGE)

    def broken(*args: Any) -> None:
        raise RuntimeError("a bug in the bookkeeping")

    monkeypatch.setattr(spool, "_materialized", broken)
    logged: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(logged.append)
    try:
        queue_message(spool, [recipient("b@far.test")], data=MESSAGE)  # a new segment
    finally:
        globalLogPublisher.removeObserver(logged.append)
    assert [e["log_failure"].value.args for e in logged if "log_failure" in e] == [
        ("a bug in the bookkeeping",)]
    assert spool._moving == {}  # later saves and removals of it do not hang
    removed: list[object] = []
    spool.remove(parked.id).addBoth(removed.append)
    assert removed == [None]


def test_conversion_makes_the_spool_directory_durable_before_retiring_segments(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A queue file named just before a crash may lack its directory fsync; the
    segment that still holds the message must outlive it until then."""
    spool = journaled_spool(tmp_path / "spool")
    envelope = queue_message(spool, [recipient("a@far.test")], data=MESSAGE)
    spool._materialize(envelope.id, envelope.to_bytes(), MESSAGE,
                       spool.journaled[envelope.id])  # named; its done record never written
    events: list[str] = []
    real_unlink = os.unlink

    class Recording(CountingOS):
        def fsync(self, fd: int) -> None:
            if os.path.samestat(os.fstat(fd), os.stat(spool.directory)):
                events.append("fsync spool")
            os.fsync(fd)

    def unlink(path: Any, *args: Any, **kwargs: Any) -> None:
        if str(path).endswith(".log"):
            events.append("unlink segment")
        real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", unlink)
    later = Spool(spool.directory, sync_run, Recording())
    later.prepare()
    assert "unlink segment" in events
    assert "fsync spool" in events[:events.index("unlink segment")]
    assert later.queue_ids() == [envelope.id]


def test_conversion_without_a_journal_opens_nothing(tmp_path: Path) -> None:
    """No journal directory: nothing to convert, and the spool directory (not even
    made yet) is not opened for it."""
    spool = Spool(tmp_path / "not-yet", sync_run)
    assert spool.convert_journal() == 0
    assert spool._directory_fd is None


@pytest.mark.parametrize("wire_ready", [True, False])
def test_a_journaled_commit_caches_what_the_data_reader_vouched_for(
        tmp_path: Path, wire_ready: bool) -> None:
    spool = journaled_spool(tmp_path / "spool")
    incoming = spool.open_incoming()
    incoming.write(b"Subject: hi\r\n\r\nbody\r\n")
    incoming.wire_ready = wire_ready
    envelope = Envelope(id=incoming.id, sender="s@src.test",
                        recipients=[recipient("a@dst.test")], received=0.0)
    spool.commit(incoming, envelope)
    assert incoming.id in spool.journaled
    assert isinstance(spool.cache.open(incoming.id), WireReady) is wire_ready
