"""The journal: framing, group commit, torn tails, retiring segments.

Syncs are done inline, or held for the test to answer (``HeldSyncer``): the
child process that does them in the daemon is test_syncer.py's."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

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
from relaygw.syncer import InlineSyncer
from support import logged_errors

IDS = [f"{n:019X}" for n in range(1, 40)]


class CountingOS:
    """``os``, counting writevs and syncs, and failing writev or the sync on request."""

    def __init__(self) -> None:
        self.syncs = 0
        self.writevs = 0
        self.fail_writev_after: int | None = None  # bytes written before the failure
        self.fail_sync = False

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def writev(self, fd: int, buffers: list[Any]) -> int:
        self.writevs += 1
        if self.fail_writev_after is not None:
            data = b"".join(bytes(b) for b in buffers)[:self.fail_writev_after]
            os.write(fd, data)  # part of it reached the file: garbage to cut off
            raise OSError(errno.ENOSPC, "No space left on device")
        return os.writev(fd, buffers)

    def fdatasync(self, fd: int) -> None:
        self.syncs += 1
        if self.fail_sync:  # EIO, as Linux says when write-back failed
            raise OSError(errno.EIO, "Input/output error")
        os.fdatasync(fd)


class HeldSyncer:
    """A syncer whose requests wait for the test: ``answer()`` does the oldest
    one (inline, through the journal's ``os``) and fires its Deferred, as a
    child's answer would; ``stop`` answers them all, as ProcessSyncer's does."""

    def __init__(self, directory: Path, os_module: Any) -> None:
        self.inline = InlineSyncer(directory, os_module)
        self.requests: list[tuple[str, Any, Deferred[None]]] = []  # (what, args, waiting)

    def sync(self, name: str, fd: int, directory: bool) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self.requests.append(("SD" if directory else "S", (name, fd, directory), d))
        return d

    def retire(self, name: str) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self.requests.append(("U", (name,), d))
        return d

    def start(self) -> None:
        pass

    def stop(self) -> None:
        while self.requests:
            self.answer()

    def asked(self) -> list[str]:
        return [what for what, _, _ in self.requests]

    def answer(self) -> None:
        what, args, d = self.requests.pop(0)
        done = self.inline.retire(*args) if what == "U" else self.inline.sync(*args)
        done.chainDeferred(d)


def opened(tmp_path: Path, fake: CountingOS | None = None, held: bool = False,
           **kwargs: Any) -> Journal:
    """A journal on a fake clock; ``held``: with a HeldSyncer (``journal.syncer``)."""
    fake = fake or CountingOS()
    directory = tmp_path / "journal"
    syncer = HeldSyncer(directory, fake) if held else None
    journal = Journal(directory, Clock(), fake, syncer=syncer, **kwargs)
    journal.open()
    return journal


def append(journal: Journal, queue_id: str, message: bytes = b"m") -> Any:
    """One message appended and made durable (inline syncer): its Location."""
    return result(journal.append_message(queue_id, b"{}", message))


def result(d: Any) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "not fired"
    return out[0]


def fired(d: Any) -> bool:
    out: list[Any] = []
    d.addBoth(lambda r: out.append(r) or r)
    return bool(out)


def test_appends_while_a_sync_is_out_share_the_next_and_each_reads_back(
        tmp_path: Path) -> None:
    """Group commit: the first append's sync goes out at once; the four written
    while it is out wait for one more sync, which answers them all."""
    fake = CountingOS()
    journal = opened(tmp_path, fake, held=True)
    syncer = journal.syncer
    items = [(IDS[i], b'{"id": %d}' % i, b"message %d\r\n" % i * (i + 1)) for i in range(5)]
    done = [journal.append_message(*item) for item in items]
    assert syncer.asked() == ["S"]  # open() made the first segment's name durable
    assert fake.writevs == 5  # written at once, each: only the sync waits
    assert not any(fired(d) for d in done)
    syncer.answer()
    assert fired(done[0]) and not any(fired(d) for d in done[1:])
    assert syncer.asked() == ["S"]  # one sync for the four
    syncer.answer()
    assert all(fired(d) for d in done) and syncer.asked() == []
    assert fake.syncs == 2
    for d, (_, _, message) in zip(done, items, strict=True):
        assert read_message(journal.directory, result(d)) == message
    live, problems = live_messages(journal.directory)
    assert problems == []
    assert {q: r.envelope for q, r in live.items()} == {q: e for q, e, _ in items}


def test_inline_an_append_is_one_write_and_one_sync(tmp_path: Path) -> None:
    fake = CountingOS()
    journal = opened(tmp_path, fake)
    location = append(journal, IDS[0], b"a")
    assert (fake.writevs, fake.syncs) == (1, 1)
    assert read_message(journal.directory, location) == b"a"


def test_a_done_record_takes_the_message_out_of_the_live_set(tmp_path: Path) -> None:
    journal = opened(tmp_path)
    first = append(journal, IDS[0], b"a")
    append(journal, IDS[1], b"b")
    journal.append_done(IDS[0], first)
    assert journal._queue == []  # inline: written at once
    live, _ = live_messages(journal.directory)
    assert list(live) == [IDS[1]]


def test_a_failed_write_fails_its_append_and_leaves_no_garbage(tmp_path: Path) -> None:
    fake = CountingOS()
    journal = opened(tmp_path, fake)
    append(journal, IDS[0], b"kept")
    fake.fail_writev_after = 7  # part of a header reached the file
    outcome = result(journal.append_message(IDS[1], b"{}", b"lost"))
    assert isinstance(outcome, Failure) and outcome.value.errno == errno.ENOSPC
    fake.fail_writev_after = None
    append(journal, IDS[3], b"after")
    live, problems = live_messages(journal.directory)
    assert problems == []
    assert sorted(live) == [IDS[0], IDS[3]]  # nothing after garbage, nothing refused kept
    number = segment_numbers(journal.directory)[-1]
    _, good, problem, _ = read_segment(journal.directory / segment_name(number), number)
    assert problem is None and good == os.path.getsize(journal.directory / segment_name(number))


def test_a_failed_sync_fails_everything_written_since_the_last_good_one(
        tmp_path: Path) -> None:
    """Pages a failed fdatasync may have dropped: the append it was for, and the
    one written while it was out, both fail and are cut from the segment."""
    fake = CountingOS()
    journal = opened(tmp_path, fake, held=True)
    syncer = journal.syncer
    kept = journal.append_message(IDS[0], b"{}", b"kept")
    syncer.answer()
    assert fired(kept)
    first = journal.append_message(IDS[1], b"{}", b"first")
    second = journal.append_message(IDS[2], b"{}", b"second")
    fake.fail_sync = True
    syncer.answer()
    assert isinstance(result(first), Failure) and isinstance(result(second), Failure)
    assert syncer.asked() == []  # nothing is left to sync: it was all cut back
    fake.fail_sync = False
    later = journal.append_message(IDS[3], b"{}", b"later")
    syncer.answer()
    assert read_message(journal.directory, result(later)) == b"later"
    live, problems = live_messages(journal.directory)
    assert sorted(live) == [IDS[0], IDS[3]] and problems == []


def test_a_failed_sync_inline_fails_its_append(tmp_path: Path) -> None:
    fake = CountingOS()
    journal = opened(tmp_path, fake)
    fake.fail_sync = True
    assert isinstance(result(journal.append_message(IDS[0], b"{}", b"m")), Failure)
    live, _ = live_messages(journal.directory)
    assert live == {}  # cut back: a message refused is not left to be delivered


def test_segments_rotate_and_a_restart_starts_a_new_one(tmp_path: Path) -> None:
    journal = opened(tmp_path, segment_bytes=200)
    for i in range(4):
        append(journal, IDS[i], b"x" * 100)
    assert len(segment_numbers(journal.directory)) >= 3
    journal.stop()
    again = opened(tmp_path)
    assert again._number == segment_numbers(journal.directory)[-1]
    live, problems = live_messages(journal.directory)
    assert sorted(live) == IDS[:4] and problems == []


def test_a_new_segment_is_started_only_once_the_old_one_is_durable(tmp_path: Path) -> None:
    """Only the newest segment may end torn: an append that needs a new segment
    waits, unwritten, for the sync out on the old one."""
    journal = opened(tmp_path, held=True, segment_bytes=200)
    syncer = journal.syncer
    first = journal.append_message(IDS[0], b"{}", b"x" * 100)
    second = journal.append_message(IDS[1], b"{}", b"y" * 100)  # does not fit
    assert segment_numbers(journal.directory) == [1] and journal._queue
    syncer.answer()
    assert result(first).segment == 1
    assert segment_numbers(journal.directory) == [1, 2] and journal._queue == []
    assert syncer.asked() == ["SD"]  # the new segment's name goes with its first sync
    syncer.answer()
    assert result(second).segment == 2


@settings(max_examples=60, deadline=None)
@given(cut=st.integers(min_value=1, max_value=400))
def test_a_torn_tail_loses_only_the_unacknowledged_end(tmp_path_factory: Any, cut: int) -> None:
    """A crash in mid-write leaves part of the last batch: everything before it
    reads back, and a torn newest segment is not reported as damage."""
    directory = tmp_path_factory.mktemp("torn")
    journal = opened(directory)
    append(journal, IDS[0], b"first")
    number = journal._number
    path = journal.directory / segment_name(number)
    good = os.path.getsize(path)
    append(journal, IDS[1], b"second" * 40)
    whole = os.path.getsize(path)
    os.truncate(path, max(good, whole - cut))
    live, problems = live_messages(journal.directory)
    assert problems == []
    assert IDS[0] in live
    assert (IDS[1] in live) is (whole - cut >= whole)


def test_damage_in_an_older_segment_is_reported(tmp_path: Path) -> None:
    journal = opened(tmp_path, segment_bytes=150)
    append(journal, IDS[0], b"x" * 100)
    first = journal._number
    append(journal, IDS[1], b"y" * 100)
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
        location = result(journal.append_message(queue_id, envelope, message))
        assert read_message(journal.directory, location) == message
        expected[queue_id] = (envelope, message)
        if done:
            journal.append_done(queue_id, location)
            expected.pop(queue_id)
    live, problems = live_messages(journal.directory)
    assert problems == []
    assert {q: (r.envelope, read_message(journal.directory, r.location))
            for q, r in live.items()} == expected


def test_a_queue_id_that_is_not_one_is_refused(tmp_path: Path) -> None:
    journal = opened(tmp_path)
    with pytest.raises(ValueError):
        journal.append_message("short", b"{}", b"m")
    with pytest.raises(ValueError):
        journal.append_message("Ä" * 19, b"{}", b"m")
    assert journal._queue == []  # nothing half-queued


def test_a_segment_is_retired_once_its_messages_are_done_and_never_before_an_older_one(
        tmp_path: Path) -> None:
    """Done records in a newer segment may be what cancels an older segment's
    messages: retiring the newer one first would bring those back after a crash."""
    journal = opened(tmp_path, segment_bytes=150)
    locations = [append(journal, IDS[i], b"x" * 100) for i in range(3)]
    assert [loc.segment for loc in locations] == [1, 2, 3]
    journal.append_done(IDS[1], locations[1])  # the done record does not fit: segment 4
    assert segment_numbers(journal.directory) == [1, 2, 3, 4]  # 2 waits for 1
    journal.append_done(IDS[0], locations[0])
    assert segment_numbers(journal.directory) == [3, 4]  # 3 holds a live message
    assert journal.segments_in_use() == [3, 4]
    live, problems = live_messages(journal.directory)
    assert list(live) == [IDS[2]] and problems == []


def test_segments_are_retired_one_request_at_a_time_oldest_first(tmp_path: Path) -> None:
    journal = opened(tmp_path, held=True, segment_bytes=150)
    syncer = journal.syncer
    locations = []
    for i in range(3):
        d = journal.append_message(IDS[i], b"{}", b"x" * 100)
        syncer.stop()  # answer what is asked (a sync, a new segment's)
        locations.append(result(d))
    for i in range(3):
        journal.append_done(IDS[i], locations[i])
    journal._write()  # the done records, without waiting out their delay
    assert syncer.asked()[0] == "U" and syncer.asked().count("U") == 1
    syncer.stop()
    assert segment_numbers(journal.directory) == [4]


def test_the_journal_survives_a_write_that_raises(tmp_path: Path) -> None:
    class Broken(CountingOS):
        def writev(self, fd: int, buffers: list[Any]) -> int:
            os.writev(fd, buffers)  # written, then the bug: the tail is cut back
            raise RuntimeError("a bug, not an I/O error")

    journal = opened(tmp_path, Broken())
    assert isinstance(result(journal.append_message(IDS[0], b"{}", b"m")), Failure)
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
    assert isinstance(result(journal.append_message(IDS[1], b"{}", b"refused")), Failure)
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
    """Done records waiting for their delay, then a message: one batch of twelve."""
    monkeypatch.setattr(journal_module, "IOV_MAX", 4)
    fake = CountingOS()
    journal = opened(tmp_path, fake, held=True)
    locations = []
    for i in range(11):
        d = journal.append_message(IDS[i], b"{}", b"m%d" % i)
        journal.syncer.stop()
        locations.append(result(d))
    fake.writevs = 0
    for i in range(11):
        journal.append_done(IDS[i], locations[i])
    last = journal.append_message(IDS[11], b"{}", b"last")
    assert fake.writevs == 3  # 4 + 4 + 4 frames
    journal.syncer.stop()
    assert read_message(journal.directory, result(last)) == b"last"
    assert list(live_messages(journal.directory)[0]) == [IDS[11]]


def test_done_records_of_a_failed_sync_go_out_with_the_next_write(tmp_path: Path) -> None:
    fake = CountingOS()
    journal = opened(tmp_path, fake)
    location = append(journal, IDS[0])
    fake.fail_sync = True
    journal.append_done(IDS[0], location)
    assert IDS[0] in live_messages(journal.directory)[0]  # cut back with its write
    assert journal._queue and journal._queue[0][0] == DONE
    fake.fail_sync = False
    append(journal, IDS[1])
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
    journal.append_done(IDS[0], locations[0])
    journal.append_done(IDS[1], locations[1])
    assert segment_numbers(journal.directory)[:2] == [1, 2]  # 2 waits behind 1
    fake.stuck = False
    append(journal, IDS[3])  # tried again after the next sync
    assert segment_numbers(journal.directory)[0] == 3


def test_a_new_segments_appends_wait_until_its_name_is_durable(tmp_path: Path) -> None:
    """The first sync of a new segment fsyncs the directory too; if that fails,
    its appends fail, and the next sync asks for the directory again."""
    class FailingDirectorySync(CountingOS):
        fail = False
        directory_syncs = 0

        def fsync(self, fd: int) -> None:
            self.directory_syncs += 1
            if self.fail:
                raise OSError(errno.EIO, "Input/output error")
            os.fsync(fd)

    fake = FailingDirectorySync()
    journal = opened(tmp_path, fake, segment_bytes=150)
    append(journal, IDS[0], b"x" * 100)
    fake.fail = True
    assert isinstance(result(journal.append_message(IDS[1], b"{}", b"y" * 100)), Failure)
    assert journal._number == 2 and not journal._name_durable
    fake.fail = False
    before = fake.directory_syncs
    location = append(journal, IDS[2], b"z")
    assert location.segment == 2 and fake.directory_syncs == before + 1
    append(journal, IDS[3], b"w")
    assert fake.directory_syncs == before + 1  # once durable, never again
    assert sorted(live_messages(journal.directory)[0]) == [IDS[0], IDS[2], IDS[3]]


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


def test_the_stop_makes_durable_what_waits_and_later_appends_go_inline(
        tmp_path: Path) -> None:
    fake = CountingOS()
    journal = opened(tmp_path, fake, held=True, done_delay=30.0)
    syncer = journal.syncer
    journal.start()
    first = journal.append_message(IDS[0], b"{}", b"m")
    syncer.answer()
    journal.append_done(IDS[0], result(first))  # waits up to 30 s for company
    out = journal.append_message(IDS[1], b"{}", b"out")  # its sync is asked for, unanswered
    journal.stop()  # does not wait out the 30 s, nor for an answer that will not come
    assert syncer.asked() == [] and fired(out)
    assert list(live_messages(journal.directory)[0]) == [IDS[1]]
    journal.append_done(IDS[1], result(out))  # an attempt that ended after the stop
    later = journal.append_message(IDS[2], b"{}", b"late bounce")
    assert read_message(journal.directory, result(later)) == b"late bounce"
    assert list(live_messages(journal.directory)[0]) == [IDS[2]]


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


def delivered_and_waiting(tmp_path: Path, fake: CountingOS | None = None
                          ) -> tuple[Journal, CountingOS, int]:
    """A held journal (done_delay 50 ms) whose one message is done, its done
    record waiting; and how many writes came before it."""
    fake = fake or CountingOS()
    journal = opened(tmp_path, fake, held=True, done_delay=0.05)
    d = journal.append_message(IDS[0], b"{}", b"m")
    journal.syncer.stop()
    writes = fake.writevs
    journal.append_done(IDS[0], result(d))
    return journal, fake, writes


def test_done_records_wait_the_delay_then_go_alone(tmp_path: Path) -> None:
    journal, fake, writes = delivered_and_waiting(tmp_path)
    journal.reactor.advance(0.049)
    assert fake.writevs == writes and journal._queue
    journal.reactor.advance(0.001)
    assert fake.writevs == writes + 1 and journal._queue == []
    assert journal.syncer.asked() == ["S"]  # synced too: the window stays the delay
    journal.syncer.stop()
    assert live_messages(journal.directory)[0] == {}


def test_a_message_ends_the_wait_of_done_records_and_goes_with_them(tmp_path: Path) -> None:
    journal, fake, writes = delivered_and_waiting(tmp_path)
    journal.append_message(IDS[1], b"{}", b"next")
    assert fake.writevs == writes + 1  # one write for both
    assert not journal.reactor.getDelayedCalls()  # the timer is gone with them
    journal.syncer.stop()
    assert list(live_messages(journal.directory)[0]) == [IDS[1]]


def test_done_records_of_a_failed_write_are_tried_again_while_idle(tmp_path: Path) -> None:
    """No new entry need come: done_delay after the failure, the journal tries again."""
    fake = CountingOS()
    journal = opened(tmp_path, fake, held=True, done_delay=0.05)
    d = journal.append_message(IDS[0], b"{}", b"m")
    journal.syncer.stop()
    journal.append_done(IDS[0], result(d))
    fake.fail_writev_after = 3
    journal.reactor.advance(0.05)
    assert journal._queue and journal._queue[0][0] == DONE
    fake.fail_writev_after = None
    journal.reactor.advance(0.05)
    assert journal._queue == []
    journal.syncer.stop()
    assert live_messages(journal.directory)[0] == {}


@pytest.mark.parametrize("delay", [float("inf"), float("nan"), -1.0])
def test_a_done_delay_that_cannot_be_waited_is_refused(tmp_path: Path, delay: float) -> None:
    with pytest.raises(ValueError, match="done_delay"):
        Journal(tmp_path / "journal", Clock(), done_delay=delay)


def test_a_segment_that_cannot_be_cut_back_is_left_only_once_its_syncs_are_answered(
        tmp_path: Path) -> None:
    """A failed write whose tail cannot be cut back while a sync is out: what was
    written before it is still synced in, and answered with, the old segment."""
    class NoTruncate(CountingOS):
        def ftruncate(self, fd: int, length: int) -> None:
            raise OSError(errno.EIO, "Input/output error")

    fake = NoTruncate()
    journal = opened(tmp_path, fake, held=True)
    first = journal.append_message(IDS[0], b"{}", b"first")
    second = journal.append_message(IDS[1], b"{}", b"second")  # waits for the next sync
    fake.fail_writev_after = 5
    assert isinstance(result(journal.append_message(IDS[2], b"{}", b"lost")), Failure)
    fake.fail_writev_after = None
    later = journal.append_message(IDS[3], b"{}", b"later")  # waits: no new segment yet
    assert segment_numbers(journal.directory) == [1]
    journal.syncer.stop()
    kept = result(second)
    assert result(first).segment == 1 and kept.segment == 1
    assert read_message(journal.directory, kept) == b"second"
    assert result(later).segment == 2


def test_the_stop_tries_done_records_of_a_failed_write_once_more(tmp_path: Path) -> None:
    """No timer runs once the reactor stops: the stop itself tries again, after
    the syncer's stop."""
    class FailsOnce(CountingOS):
        fail_at = -1

        def writev(self, fd: int, buffers: list[Any]) -> int:
            if self.writevs == self.fail_at:
                self.writevs += 1
                raise OSError(errno.EIO, "Input/output error")
            return super().writev(fd, buffers)

    fake = FailsOnce()
    journal, _, writes = delivered_and_waiting(tmp_path, fake)
    fake.fail_at = writes
    with logged_errors() as errors:
        journal.stop()
    assert journal._queue == [] and errors == []
    assert live_messages(journal.directory)[0] == {}


def test_done_records_the_stop_cannot_write_are_told_of(tmp_path: Path) -> None:
    fake = CountingOS()
    journal, _, _ = delivered_and_waiting(tmp_path, fake)
    fake.fail_writev_after = 0
    with logged_errors() as errors:
        journal.stop()
    assert [e.get("count") for e in errors] == [1]
    assert "delivered again at the next start" in errors[0]["log_format"]
    assert list(live_messages(journal.directory)[0]) == [IDS[0]]  # comes back: not lost
