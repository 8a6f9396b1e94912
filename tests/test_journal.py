"""The journal: framing, group commit, torn tails, retiring segments."""

from __future__ import annotations

import errno
import os
import queue
import threading
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.python.failure import Failure

from core_fakes import NowReactor
from relaygw import journal as journal_module
from relaygw.journal import (
    DONE,
    MAGIC,
    MESSAGE,
    Journal,
    frame,
    live_messages,
    message_payload,
    read_message,
    read_segment,
    segment_name,
    segment_numbers,
    write_done_segment,
)

IDS = [f"{n:019X}" for n in range(1, 40)]


class CountingOS:
    """``os``, counting syncs (an fdatasync, or a write to an ``O_DSYNC`` file) and
    failing writev or the sync on request."""

    def __init__(self) -> None:
        self.syncs = 0
        self.writevs = 0
        self.fail_writev_after: int | None = None  # bytes written before the failure
        self.fail_sync = False
        self.dsync_fds: set[int] = set()

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def open(self, path: Any, flags: int, mode: int = 0o777) -> int:
        fd = os.open(path, flags, mode)
        if flags & os.O_DSYNC:
            self.dsync_fds.add(fd)
        else:
            self.dsync_fds.discard(fd)
        return fd

    def writev(self, fd: int, buffers: list[Any]) -> int:
        self.writevs += 1
        if self.fail_writev_after is not None:
            data = b"".join(bytes(b) for b in buffers)[:self.fail_writev_after]
            os.write(fd, data)  # part of it reached the file: garbage to cut off
            raise OSError(errno.ENOSPC, "No space left on device")
        written = os.writev(fd, buffers)
        if fd in self.dsync_fds:
            self.syncs += 1
            if self.fail_sync:  # written, then not made durable: EIO, as Linux says
                raise OSError(errno.EIO, "Input/output error")
        return written

    def fdatasync(self, fd: int) -> None:
        self.syncs += 1
        if self.fail_sync:
            raise OSError(errno.EIO, "Input/output error")
        os.fdatasync(fd)


def opened(tmp_path: Path, fake: CountingOS | None = None, **kwargs: Any) -> Journal:
    journal = Journal(tmp_path / "journal", NowReactor(), fake or CountingOS(), **kwargs)
    journal.open()
    return journal


def entries(journal: Journal, *items: tuple[str, bytes, bytes]) -> list[Any]:
    """Queued appends as the writer thread takes them, with their Deferreds."""
    for queue_id, envelope, message in items:
        journal.append_message(queue_id, envelope, message)
    return [journal._queue.get_nowait() for _ in items]


def write(journal: Journal, batch: list[Any]) -> list[Any]:
    """One batch through write_batch and back: the appends' Deferreds."""
    journal._report(batch, journal.write_batch(batch))
    return [d for _, _, d in batch]


def run_writer_once(journal: Journal) -> None:
    """What the writer thread does with everything queued now."""
    batch = []
    while not journal._queue.empty():
        batch.append(journal._queue.get_nowait())
    journal.handle(batch)


def append(journal: Journal, queue_id: str, message: bytes = b"m") -> Any:
    """One message appended and made durable: its Location."""
    [d] = write(journal, entries(journal, (queue_id, b"{}", message)))
    return result(d)


def result(d: Any) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "not fired"
    return out[0]


def test_a_batch_is_one_sync_and_each_message_reads_back(tmp_path: Path) -> None:
    fake = CountingOS()
    journal = opened(tmp_path, fake)
    items = [(IDS[i], b'{"id": %d}' % i, b"message %d\r\n" % i * (i + 1)) for i in range(5)]
    done = write(journal, entries(journal, *items))
    assert fake.syncs == 1
    for d, (_, _, message) in zip(done, items, strict=True):
        location = result(d)
        assert read_message(journal.directory, location) == message
    live, problems = live_messages(journal.directory)
    assert problems == []
    assert {q: r.envelope for q, r in live.items()} == {q: e for q, e, _ in items}


def test_a_done_record_takes_the_message_out_of_the_live_set(tmp_path: Path) -> None:
    journal = opened(tmp_path)
    first, _ = (result(d) for d in write(
        journal, entries(journal, (IDS[0], b"{}", b"a"), (IDS[1], b"{}", b"b"))))
    journal.append_done(IDS[0], first)
    done_entry = journal._queue.get_nowait()
    assert done_entry[0] == DONE
    journal._report([done_entry], journal.write_batch([done_entry]))
    live, _ = live_messages(journal.directory)
    assert list(live) == [IDS[1]]


def test_a_failed_write_fails_its_batch_and_leaves_no_garbage(tmp_path: Path) -> None:
    fake = CountingOS()
    journal = opened(tmp_path, fake)
    write(journal, entries(journal, (IDS[0], b"{}", b"kept")))
    fake.fail_writev_after = 7  # part of a header reached the file
    failed = write(journal, entries(journal, (IDS[1], b"{}", b"lost"), (IDS[2], b"{}", b"x")))
    for d in failed:
        outcome = result(d)
        assert isinstance(outcome, Failure) and outcome.value.errno == errno.ENOSPC
    fake.fail_writev_after = None
    write(journal, entries(journal, (IDS[3], b"{}", b"after")))
    live, problems = live_messages(journal.directory)
    assert problems == []
    assert sorted(live) == [IDS[0], IDS[3]]  # nothing after garbage, nothing refused kept
    number = segment_numbers(journal.directory)[-1]
    _, good, problem, _ = read_segment(journal.directory / segment_name(number), number)
    assert problem is None and good == os.path.getsize(journal.directory / segment_name(number))


def test_segments_are_opened_o_dsync_and_a_batch_is_one_write(tmp_path: Path) -> None:
    """The write is the sync: one system call a batch, no fdatasync."""
    fake = CountingOS()
    journal = opened(tmp_path, fake)
    assert journal.synced_writes and journal._fd in fake.dsync_fds
    write(journal, entries(journal, *[(IDS[i], b"{}", b"m") for i in range(3)]))
    assert (fake.writevs, fake.syncs) == (1, 1)


def test_without_synced_writes_a_batch_is_written_then_fdatasynced(tmp_path: Path) -> None:
    fake = CountingOS()
    journal = opened(tmp_path, fake, synced_writes=False)
    assert journal._fd not in fake.dsync_fds
    [first, second] = write(journal, entries(journal, (IDS[0], b"{}", b"a"),
                                             (IDS[1], b"{}", b"b")))
    assert (fake.writevs, fake.syncs) == (1, 1)  # the one sync is the fdatasync
    assert read_message(journal.directory, result(first)) == b"a"
    assert read_message(journal.directory, result(second)) == b"b"
    fake.fail_sync = True
    [refused] = write(journal, entries(journal, (IDS[2], b"{}", b"c")))
    assert isinstance(result(refused), Failure)
    assert sorted(live_messages(journal.directory)[0]) == [IDS[0], IDS[1]]


def test_a_failed_sync_fails_its_batch(tmp_path: Path) -> None:
    fake = CountingOS()
    journal = opened(tmp_path, fake)
    fake.fail_sync = True
    [d] = write(journal, entries(journal, (IDS[0], b"{}", b"m")))
    assert isinstance(result(d), Failure)
    live, _ = live_messages(journal.directory)
    assert live == {}  # cut back: a message refused is not left to be delivered


def test_segments_rotate_and_a_restart_starts_a_new_one(tmp_path: Path) -> None:
    journal = opened(tmp_path, segment_bytes=200)
    for i in range(4):
        write(journal, entries(journal, (IDS[i], b"{}", b"x" * 100)))
    assert len(segment_numbers(journal.directory)) >= 3
    journal.stop()
    again = opened(tmp_path)
    assert again._number == segment_numbers(journal.directory)[-1]
    live, problems = live_messages(journal.directory)
    assert sorted(live) == IDS[:4] and problems == []


@settings(max_examples=60, deadline=None)
@given(cut=st.integers(min_value=1, max_value=400))
def test_a_torn_tail_loses_only_the_unacknowledged_end(tmp_path_factory: Any, cut: int) -> None:
    """A crash in mid-write leaves part of the last batch: everything before it
    reads back, and a torn newest segment is not reported as damage."""
    directory = tmp_path_factory.mktemp("torn")
    journal = opened(directory)
    write(journal, entries(journal, (IDS[0], b"{}", b"first")))
    number = journal._number
    path = journal.directory / segment_name(number)
    good = os.path.getsize(path)
    write(journal, entries(journal, (IDS[1], b"{}", b"second" * 40)))
    whole = os.path.getsize(path)
    os.truncate(path, max(good, whole - cut))
    live, problems = live_messages(journal.directory)
    assert problems == []
    assert IDS[0] in live
    assert (IDS[1] in live) is (whole - cut >= whole)


def test_damage_in_an_older_segment_is_reported(tmp_path: Path) -> None:
    journal = opened(tmp_path, segment_bytes=150)
    write(journal, entries(journal, (IDS[0], b"{}", b"x" * 100)))
    first = journal._number
    write(journal, entries(journal, (IDS[1], b"{}", b"y" * 100)))
    assert journal._number != first
    path = journal.directory / segment_name(first)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # a flipped byte in the message: the checksum catches it
    path.write_bytes(bytes(data))
    live, problems = live_messages(journal.directory)
    assert list(live) == [IDS[1]]
    assert len(problems) == 1 and problems[0][0] == first and "checksum" in problems[0][1]


@given(st.lists(st.tuples(st.sampled_from(IDS[:5]), st.binary(max_size=30),
                          st.binary(max_size=60), st.booleans()), max_size=12))
@settings(max_examples=40, deadline=None)
def test_what_is_written_is_what_reads_back(tmp_path_factory: Any,
                                           steps: list[tuple[str, bytes, bytes, bool]]) -> None:
    journal = opened(tmp_path_factory.mktemp("rt"))
    expected: dict[str, tuple[bytes, bytes]] = {}
    for queue_id, envelope, message, done in steps:
        [d] = write(journal, entries(journal, (queue_id, envelope, message)))
        location = result(d)
        assert read_message(journal.directory, location) == message
        expected[queue_id] = (envelope, message)
        if done:
            journal.append_done(queue_id, location)
            entry = journal._queue.get_nowait()
            journal._report([entry], journal.write_batch([entry]))
            expected.pop(queue_id)
    live, problems = live_messages(journal.directory)
    assert problems == []
    assert {q: (r.envelope, read_message(journal.directory, r.location))
            for q, r in live.items()} == expected


def test_the_writer_thread_batches_and_reports_through_the_reactor(tmp_path: Path) -> None:
    """The real thread: appends queued before it starts go out in one batch."""
    fake = CountingOS()
    journal = opened(tmp_path, fake)
    reported: list[Any] = []
    done = [journal.append_message(IDS[i], b"{}", b"m") for i in range(6)]
    for d in done:
        d.addCallback(reported.append)
    journal.start()
    journal.stop()  # writes what is queued, then ends
    assert fake.syncs == 1
    assert len(reported) == 6
    assert len({(loc.segment, loc.offset) for loc in reported}) == 6


def test_a_queue_id_that_is_not_one_is_refused(tmp_path: Path) -> None:
    journal = opened(tmp_path)
    with pytest.raises(ValueError):
        journal.append_message("short", b"{}", b"m")
    with pytest.raises(ValueError):
        journal.append_message("Ä" * 19, b"{}", b"m")
    assert journal._queue.empty()  # nothing half-queued


def test_a_segment_is_retired_once_its_messages_are_done_and_never_before_an_older_one(
        tmp_path: Path) -> None:
    """Done records in a newer segment may be what cancels an older segment's
    messages: retiring the newer one first would bring those back after a crash."""
    journal = opened(tmp_path, segment_bytes=150)
    locations = [append(journal, IDS[i], b"x" * 100) for i in range(3)]
    run_writer_once(journal)  # the rotations' news reaches the reactor side at once here
    assert [loc.segment for loc in locations] == [1, 2, 3]
    journal.append_done(IDS[1], locations[1])
    run_writer_once(journal)  # the done record does not fit: segment 4
    assert segment_numbers(journal.directory) == [1, 2, 3, 4]  # 2 waits for 1
    journal.append_done(IDS[0], locations[0])
    run_writer_once(journal)
    assert segment_numbers(journal.directory) == [3, 4]  # 3 holds a live message
    assert journal.segments_in_use() == [3, 4]
    live, problems = live_messages(journal.directory)
    assert list(live) == [IDS[2]] and problems == []


def test_the_writer_survives_a_batch_that_raises(tmp_path: Path) -> None:
    class Broken(CountingOS):
        def writev(self, fd: int, buffers: list[Any]) -> int:
            os.writev(fd, buffers)  # written, then the bug: the tail is cut back
            raise RuntimeError("a bug, not an I/O error")

    journal = opened(tmp_path, Broken())
    [d] = write(journal, entries(journal, (IDS[0], b"{}", b"m")))
    assert isinstance(result(d), Failure)
    journal.os = CountingOS()
    assert read_message(journal.directory, append(journal, IDS[1], b"later")) == b"later"
    assert list(live_messages(journal.directory)[0]) == [IDS[1]]


def test_a_batch_after_a_lost_segment_starts_a_new_one(tmp_path: Path) -> None:
    """When even cutting back fails, the segment is given up and the next batch
    opens a new one instead of writing after garbage."""
    class NoTruncate(CountingOS):
        def ftruncate(self, fd: int, length: int) -> None:
            raise OSError(errno.EIO, "Input/output error")

    fake = NoTruncate()
    journal = opened(tmp_path, fake)
    append(journal, IDS[0])
    first = journal._number
    fake.fail_writev_after = 5
    [refused] = write(journal, entries(journal, (IDS[1], b"{}", b"refused")))
    assert isinstance(result(refused), Failure)
    fake.fail_writev_after = None
    location = append(journal, IDS[2], b"kept")
    assert location.segment > first
    assert read_message(journal.directory, location) == b"kept"


def test_a_done_segment_written_offline_cancels_a_message(tmp_path: Path) -> None:
    journal = opened(tmp_path)
    append(journal, IDS[0])
    append(journal, IDS[1])
    journal.stop()
    write_done_segment(journal.directory, IDS[0])
    live, problems = live_messages(journal.directory)
    assert list(live) == [IDS[1]] and problems == []


def test_a_batch_bigger_than_iov_max_is_written_whole(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(journal_module, "IOV_MAX", 4)
    journal = opened(tmp_path)
    items = [(IDS[i], b"{}", b"m%d" % i) for i in range(11)]
    for d, (_, _, message) in zip(write(journal, entries(journal, *items)), items, strict=True):
        assert read_message(journal.directory, result(d)) == message
    assert len(live_messages(journal.directory)[0]) == 11


def test_done_records_of_a_failed_batch_go_out_with_the_next(tmp_path: Path) -> None:
    fake = CountingOS()
    journal = opened(tmp_path, fake)
    location = append(journal, IDS[0])
    fake.fail_sync = True
    journal.append_done(IDS[0], location)
    run_writer_once(journal)
    assert IDS[0] in live_messages(journal.directory)[0]  # cut back with its batch
    fake.fail_sync = False
    append(journal, IDS[1])
    run_writer_once(journal)
    assert list(live_messages(journal.directory)[0]) == [IDS[1]]


def test_a_segment_that_cannot_be_unlinked_holds_back_every_newer_one(tmp_path: Path) -> None:
    class StuckUnlink(CountingOS):
        stuck = True

        def unlink(self, path: Any) -> None:
            if self.stuck and str(path).endswith(segment_name(1)):
                raise OSError(errno.EIO, "Input/output error")
            os.unlink(path)

    fake = StuckUnlink()
    journal = opened(tmp_path, fake, segment_bytes=150)
    locations = [append(journal, IDS[i], b"x" * 100) for i in range(3)]
    run_writer_once(journal)
    journal.append_done(IDS[0], locations[0])
    journal.append_done(IDS[1], locations[1])
    run_writer_once(journal)
    assert segment_numbers(journal.directory)[:2] == [1, 2]  # 2 waits behind 1
    fake.stuck = False
    append(journal, IDS[3])
    run_writer_once(journal)
    assert segment_numbers(journal.directory)[0] == 3


def test_a_segment_whose_name_is_not_durable_is_never_written(tmp_path: Path) -> None:
    class FailingDirectorySync(CountingOS):
        fail = False

        def fsync(self, fd: int) -> None:
            if self.fail:
                raise OSError(errno.EIO, "Input/output error")
            os.fsync(fd)

    fake = FailingDirectorySync()
    journal = opened(tmp_path, fake, segment_bytes=150)
    append(journal, IDS[0], b"x" * 100)
    fake.fail = True
    [d] = write(journal, entries(journal, (IDS[1], b"{}", b"y" * 100)))  # needs a new segment
    assert isinstance(result(d), Failure)
    assert journal._fd is None and segment_numbers(journal.directory) == [1]
    fake.fail = False
    location = append(journal, IDS[2], b"z")
    assert location.segment == 3 and segment_numbers(journal.directory) == [1, 3]


def test_damage_in_the_newest_segment_is_told_from_a_torn_tail(tmp_path: Path) -> None:
    journal = opened(tmp_path)
    append(journal, IDS[0], b"first")
    append(journal, IDS[1], b"second")
    path = journal.directory / segment_name(journal._number)
    data = bytearray(path.read_bytes())
    data[20] ^= 0xFF  # inside the first record: a good one follows
    path.write_bytes(bytes(data))
    live, problems = live_messages(journal.directory)
    assert live == {}  # nothing after the damage is taken, even well formed
    assert [number for number, _ in problems] == [journal._number]


def test_a_message_body_holding_a_record_is_never_read_as_one(tmp_path: Path) -> None:
    """A client could send a well-formed record as its message: if the real
    record around it is torn, the one inside must not come to life."""
    journal = opened(tmp_path)
    forged = frame(MESSAGE, message_payload(IDS[9], b'{"forged": true}', b"spam"))
    append(journal, IDS[0], b"head " + forged + b" tail")
    path = journal.directory / segment_name(journal._number)
    os.truncate(path, os.path.getsize(path) - 3)  # torn
    live, problems = live_messages(journal.directory)
    assert live == {}
    assert problems == [(journal._number, problems[0][1])]  # a record follows: damage


def test_appends_after_stop_are_written_at_once(tmp_path: Path) -> None:
    journal = opened(tmp_path)
    journal.start()
    location = append_threaded(journal, IDS[0])
    journal.stop()
    journal.append_done(IDS[0], location)  # an attempt that ended after the stop
    later = journal.append_message(IDS[1], b"{}", b"late bounce")
    assert read_message(journal.directory, result(later)) == b"late bounce"
    assert list(live_messages(journal.directory)[0]) == [IDS[1]]


def append_threaded(journal: Journal, queue_id: str) -> Any:
    """An append through the real writer thread (NowReactor reports at once)."""
    done = threading.Event()
    out: list[Any] = []
    journal.append_message(queue_id, b"{}", b"m").addCallback(out.append).addBoth(
        lambda _: done.set())
    assert done.wait(10)
    return out[0]


def test_telling_damage_from_a_torn_tail_costs_a_bounded_number_of_bytes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A message body stuffed with record headers that each claim the rest of
    the segment: without a bound, every one of them would be checksummed."""
    fake_header = journal_module.HEADER.pack(MAGIC, MESSAGE, 0, 0)
    size = journal_module.HEADER.size
    count = 4000
    body = b"".join(fake_header[:5] + (size * (count - 1 - n)).to_bytes(4, "big")
                    + fake_header[9:] for n in range(count))  # each claims the rest
    data = b"garbage!" + body
    checked = [0]
    real_crc32 = journal_module.zlib.crc32

    class CountingZlib:
        @staticmethod
        def crc32(data: Any, value: int = 0) -> int:
            checked[0] += len(data)
            return real_crc32(data, value)

    monkeypatch.setattr(journal_module, "zlib", CountingZlib)
    records, good, problem, torn = journal_module._read_segment(data, 1)
    assert records == [] and good == 0 and problem is not None
    assert torn is False  # given up on: kept as damage, nothing lost
    assert checked[0] <= 2 * len(data) + size * count  # not ~size * count**2 / 2


# --- done records wait for a batch to go with ------------------------------------------


class CountingReactor(NowReactor):
    def __init__(self) -> None:
        self.calls = 0

    def callFromThread(self, fn: Any, *args: Any) -> None:
        self.calls += 1
        fn(*args)


class ScriptedQueue:
    """The writer's queue, played by the test: what is queued now, and what a
    ``get(timeout=t)`` then brings (an entry, or nothing: queue.Empty); every
    timeout asked for is recorded. Nothing ever blocks."""

    def __init__(self, queued: list[Any], later: list[Any]) -> None:
        self.queued = list(queued)
        self.later = list(later)
        self.timeouts: list[float | None] = []

    def get(self, timeout: float | None = None) -> Any:
        self.timeouts.append(timeout)
        if timeout is None:
            assert self.queued, "would block for ever"
            return self.queued.pop(0)
        assert 0 <= timeout < 3600
        if self.later:
            return self.later.pop(0)
        raise queue.Empty

    def get_nowait(self) -> Any:
        if not self.queued:
            raise queue.Empty
        return self.queued.pop(0)


DONE_ENTRY = (journal_module.DONE, IDS[0].encode("ascii"), None)
OTHER_DONE = (journal_module.DONE, IDS[1].encode("ascii"), None)
MESSAGE_ENTRY = (journal_module.MESSAGE, b"payload", None)


def scripted(tmp_path: Path, queued: list[Any], later: list[Any],
             times: list[float]) -> tuple[Journal, ScriptedQueue]:
    clock = iter(times)
    journal = opened(tmp_path, done_delay=0.05, clock=lambda: next(clock))
    journal._queue = ScriptedQueue(queued, later)  # type: ignore[assignment]
    return journal, journal._queue  # type: ignore[return-value]


def test_done_records_wait_what_is_left_of_the_delay_then_go_alone(tmp_path: Path) -> None:
    journal, q = scripted(tmp_path, [DONE_ENTRY], [], times=[100.0, 100.01])
    assert journal.next_batch() == [DONE_ENTRY]
    assert q.timeouts == [None, pytest.approx(0.04)]  # the first blocks; then 50 ms - 10


def test_a_message_ends_the_wait_of_done_records_and_goes_with_them(tmp_path: Path) -> None:
    journal, q = scripted(tmp_path, [DONE_ENTRY], [OTHER_DONE, MESSAGE_ENTRY],
                          times=[100.0, 100.01, 100.02])
    assert journal.next_batch() == [DONE_ENTRY, OTHER_DONE, MESSAGE_ENTRY]
    assert q.timeouts == [None, pytest.approx(0.04), pytest.approx(0.03)]


def test_the_stop_ends_the_wait_of_done_records(tmp_path: Path) -> None:
    journal, q = scripted(tmp_path, [DONE_ENTRY], [None], times=[100.0, 100.01])
    assert journal.next_batch() == [DONE_ENTRY, None]
    assert q.timeouts == [None, pytest.approx(0.04)]


def test_a_message_is_never_held_back_by_the_done_delay(tmp_path: Path) -> None:
    journal, q = scripted(tmp_path, [DONE_ENTRY, MESSAGE_ENTRY], [], times=[100.0])
    assert journal.next_batch() == [DONE_ENTRY, MESSAGE_ENTRY]
    assert q.timeouts == [None]  # no wait at all


def test_done_records_past_their_deadline_go_without_a_wait(tmp_path: Path) -> None:
    journal, q = scripted(tmp_path, [DONE_ENTRY, OTHER_DONE], [], times=[100.0, 100.2])
    assert journal.next_batch() == [DONE_ENTRY, OTHER_DONE]
    assert q.timeouts == [None]


def test_done_records_of_a_failed_batch_are_tried_again_while_idle(tmp_path: Path) -> None:
    """No new entry need come: done_delay after the failure, the writer tries again."""
    fake = CountingOS()
    journal = opened(tmp_path, fake, done_delay=0.05)
    location = append(journal, IDS[0])
    journal.append_done(IDS[0], location)
    fake.fail_sync = True
    run_writer_once(journal)  # the done record's batch fails
    assert journal._unwritten_done
    fake.fail_sync = False
    journal._queue = ScriptedQueue([], [])  # type: ignore[assignment]  # nothing comes
    batch = journal.next_batch()  # back after done_delay, empty, instead of blocking
    assert batch == [] and journal._queue.timeouts == [0.05]  # type: ignore[attr-defined]
    journal.handle(batch)
    assert not journal._unwritten_done
    assert live_messages(journal.directory)[0] == {}


@pytest.mark.parametrize("delay", [float("inf"), float("nan"), -1.0])
def test_a_done_delay_the_queue_cannot_wait_is_refused(tmp_path: Path, delay: float) -> None:
    with pytest.raises(ValueError, match="done_delay"):
        Journal(tmp_path / "journal", NowReactor(), done_delay=delay)


def test_with_the_writer_thread_a_done_record_is_written_by_the_stop(tmp_path: Path) -> None:
    fake = CountingOS()
    journal = opened(tmp_path, fake, done_delay=30.0)
    journal.start()
    try:
        location = append_threaded(journal, IDS[0])
        journal.append_done(IDS[0], location)
    finally:
        journal.stop()  # does not wait out the 30 s: the stop is written at once
    assert fake.syncs == 2
    assert live_messages(journal.directory)[0] == {}


def test_a_batch_of_done_records_only_does_not_call_the_reactor(tmp_path: Path) -> None:
    reactor = CountingReactor()
    journal = Journal(tmp_path / "journal", reactor, CountingOS())
    journal.open()
    location = append(journal, IDS[0])
    journal.append_done(IDS[0], location)
    run_writer_once(journal)
    assert reactor.calls == 0
    assert live_messages(journal.directory)[0] == {}
    journal.append_message(IDS[1], b"{}", b"m")
    run_writer_once(journal)
    assert reactor.calls == 1  # a message's Deferred is fired from the reactor thread
