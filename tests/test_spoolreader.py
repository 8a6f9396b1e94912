"""Reading the queue back at start-up in a child process (relaygw.spoolreader).

Three levels: the wire format (entries in, frames out), the child's work on a
real spool (``read_all``, and the real ``python -m relaygw.spoolreader``), and
the daemon's end (``ChildReader``, then ``Gateway`` start-up) driven by a fake
process reactor, so every exit and every byte boundary is chosen by the test.
"""

from __future__ import annotations

import errno
import io
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.interfaces import IReactorProcess
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, formatEvent
from twisted.python.failure import Failure
from zope.interface import implementer

import relaygw
from core_fakes import queue_message, recipient, sync_run
from relaygw import service, spoolreader
from relaygw.envelope import Envelope
from relaygw.queuefile import parse_envelope, trailer_footer
from relaygw.service import Gateway
from relaygw.spool import Spool
from relaygw.spoolreader import (
    FRAME_HEADER,
    Batch,
    ChildReader,
    Entry,
    Frame,
    ReaderFailed,
    decode_entries,
    encode_entries,
    encode_frame,
    read_all,
    take_frames,
)
from support import log_events
from test_service import ManualRunner, config_for, held_in_spool

T = TypeVar("T")


# --- helpers -------------------------------------------------------------------------


def result_of(d: Deferred[T]) -> T:
    """What a Deferred that has already fired gave (its exception raised)."""
    outcome: list[Any] = []
    d.addBoth(outcome.append)
    assert outcome, "the Deferred has not fired"
    if isinstance(outcome[0], Failure):
        outcome[0].raiseException()
    return outcome[0]  # type: ignore[no-any-return]


def has_fired(d: Deferred[Any]) -> bool:
    """Whether ``d`` has its result (``called`` is also true while it waits on another)."""
    seen: list[bool] = []

    def note(result: object) -> object:
        seen.append(True)
        return result

    d.addBoth(note)
    return bool(seen)


def make_spool(tmp_path: Path) -> Spool:
    spool = Spool(tmp_path / "spool", sync_run)
    spool.prepare()
    return spool


def queued(spool: Spool, count: int) -> list[Envelope]:
    return [queue_message(spool, [recipient(f"r{i}@far.test")], held=True)
            for i in range(count)]


def damage_trailer(spool: Spool, queue_id: str) -> None:
    """Cut the queue file's footer short, as a torn write on a bad disk would."""
    path = spool.message_path(queue_id)
    path.write_bytes(path.read_bytes()[:-5])


def bad_json_entry(spool: Spool, queue_id: str) -> None:
    """A queue file with a well-formed trailer around JSON that is no envelope."""
    envelope = b"{not json"
    spool.message_path(queue_id).write_bytes(b"Subject: x\r\n\r\nbody\r\n" + envelope
                                             + trailer_footer(len(envelope)))


def child_output(spool: Spool, entries: list[Entry]) -> bytes:
    """What the real child writes for ``entries`` (read_all on the same spool)."""
    out = io.BytesIO()
    read_all(spool, entries, out)
    return out.getvalue()


def frames_of(data: bytes) -> list[Frame]:
    buffer = bytearray(data)
    frames = take_frames(buffer)
    assert buffer == b"", "trailing bytes that are no whole frame"
    return frames


@pytest.fixture
def logged() -> Iterator[list[dict[str, Any]]]:
    with log_events() as events:
        yield events


def lines(events: list[dict[str, Any]], level: LogLevel) -> list[str]:
    return [formatEvent(e) for e in events if e.get("log_level") == level]


# --- a fake process reactor ----------------------------------------------------------


class FakeProcessTransport:
    """The child's end as the daemon sees it: stdin bytes, stdin closed, signals."""

    def __init__(self) -> None:
        self.stdin = bytearray()
        self.stdin_closed = False
        self.signals: list[str] = []  # every attempt, refused or not
        self.exited = False  # reaped: signals are refused as the real transport does

    def write(self, data: bytes) -> None:
        assert not self.stdin_closed, "written after closeStdin"
        self.stdin += data

    def closeStdin(self) -> None:
        self.stdin_closed = True

    def signalProcess(self, signal: str) -> None:
        self.signals.append(signal)
        if self.exited:
            raise ProcessExitedAlready()


@dataclass
class Child:
    """One spawnProcess call; the test plays the child through it."""

    protocol: ProcessProtocol
    executable: str
    args: list[str]
    env: dict[str, str]
    transport: FakeProcessTransport = field(default_factory=FakeProcessTransport)

    def entries(self) -> list[Entry]:
        assert self.transport.stdin_closed, "the child would still wait for entries"
        return decode_entries(bytes(self.transport.stdin))

    def send(self, data: bytes) -> None:
        self.protocol.outReceived(data)

    def answer(self, spool: Spool) -> None:
        """Write what the real child would for the entries it was given."""
        self.send(child_output(spool, self.entries()))

    def end(self, reason: Exception | None = None, stderr: bytes = b"") -> None:
        if stderr:
            self.protocol.errReceived(stderr)
        self.transport.exited = True
        self.protocol.processEnded(Failure(reason if reason is not None else ProcessDone(0)))


@implementer(IReactorProcess)
class ProcessReactor(MemoryReactorClock):
    """A memory reactor that can "spawn" processes: each spawn is recorded as a Child."""

    def __init__(self) -> None:
        super().__init__()
        self.children: list[Child] = []
        self.syncers: list[Child] = []
        self.refuse: OSError | None = None
        self.spawns = 0

    def spawnProcess(self, processProtocol: ProcessProtocol, executable: str,
                     args: list[str], env: dict[str, str] | None = None,
                     path: str | None = None, uid: int | None = None, gid: int | None = None,
                     usePTY: bool = False, childFDs: dict[int, Any] | None = None
                     ) -> FakeProcessTransport:
        if "relaygw.syncchild" in args:  # the journal's syncer: not what these tests play
            syncer = Child(processProtocol, executable, list(args), dict(env or {}))
            self.syncers.append(syncer)
            processProtocol.makeConnection(syncer.transport)
            return syncer.transport
        self.spawns += 1
        assert self.spawns <= 10, "spawned again and again"  # ends a retry loop gone wild
        if self.refuse is not None:
            raise self.refuse
        child = Child(processProtocol, executable, list(args), dict(env or {}))
        self.children.append(child)
        processProtocol.makeConnection(child.transport)
        return child.transport


# --- the wire format -----------------------------------------------------------------

queue_ids = st.text(alphabet="0123456789ABCDEF", min_size=19, max_size=19)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(queue_ids, st.booleans())))
def test_entries_survive_encoding_with_their_rewritten_flag(entries: list[Entry]) -> None:
    """The child must read ID.env exactly for the entries scan saw one for."""
    assert decode_entries(encode_entries(entries)) == entries


def test_encoded_entries_are_one_id_and_flag_line_each() -> None:
    """The format the module documents (and a human can read in strace)."""
    assert encode_entries([("A", False), ("B", True)]) == b"A 0\nB 1\n"
    assert decode_entries(b"") == []


records = st.lists(st.tuples(st.text(max_size=20), st.one_of(st.none(), st.binary(max_size=300)),
                             st.one_of(st.none(), st.text(max_size=40))), max_size=5)
frame_lists = st.lists(st.tuples(st.integers(0, 2**31), records,
                                 st.one_of(st.none(), st.tuples(st.integers(0, 200),
                                                                st.text(max_size=40)))),
                       max_size=6)


@settings(max_examples=300, deadline=None)
@given(frame_lists, st.lists(st.integers(0, 10_000), max_size=12))
def test_frames_split_anywhere_come_out_whole_and_in_order(frames: list[Frame],
                                                           cuts: list[int]) -> None:
    """A pipe delivers the child's output in chunks of any size: no frame may be
    taken before it is whole, lost, or reordered."""
    encoded = [encode_frame(frame) for frame in frames]
    stream = b"".join(encoded)
    points = sorted({min(cut, len(stream)) for cut in cuts} | {len(stream)})
    buffer = bytearray()
    taken: list[Frame] = []
    fed = 0
    for point in points:
        buffer += stream[fed:point]
        fed = point
        taken += take_frames(buffer)
        consumed = sum(len(e) for e in encoded[:len(taken)])
        # what is left is exactly the unfinished frame, kept for the next chunk
        assert bytes(buffer) == stream[consumed:fed]
        assert len(buffer) < (len(encoded[len(taken)]) if len(taken) < len(encoded) else 1)
    assert taken == frames


def test_a_frame_is_a_length_header_then_the_marshalled_tuple() -> None:
    """The header counts only the payload: the daemon waits for exactly that much."""
    data = encode_frame((1, [("ID", b"{}", None)], None, []))
    (length,) = FRAME_HEADER.unpack_from(data)
    assert FRAME_HEADER.size == 4 and length == len(data) - 4
    assert take_frames(bytearray(data[:-1])) == []


# --- the child's work: read_all on a real spool ----------------------------------------


def test_read_all_gives_raw_envelopes_problems_and_skips_removed_entries(
        tmp_path: Path) -> None:
    """Good entries come back as their stored JSON; a damaged trailer as a problem
    (for the daemon to quarantine); an entry gone meanwhile not at all."""
    spool = make_spool(tmp_path)
    good, damaged, gone = queued(spool, 3)
    entries = spool.scan()
    damage_trailer(spool, damaged.id)
    spool.message_path(gone.id).unlink()  # removed between listing and reading
    out = io.BytesIO()
    assert read_all(spool, entries, out) == 0
    [(count, records, error, unreadable)] = frames_of(out.getvalue())
    assert (count, error, unreadable) == (3, None, [])  # the gone entry is counted as read
    [(good_id, raw, problem), (damaged_id, none, trouble)] = records
    assert (good_id, problem) == (good.id, None)
    assert raw is not None and parse_envelope(raw) == good
    assert (damaged_id, none) == (damaged.id, None)
    assert trouble == "no envelope trailer at the end of the queue file"
    assert spool.message_path(damaged.id).exists()  # the child only reads


def test_read_all_gives_the_rewritten_envelope_when_flagged(tmp_path: Path) -> None:
    """ID.env supersedes the trailer: a delivery attempt's outcome must not be lost."""
    spool = make_spool(tmp_path)
    [envelope] = queued(spool, 1)
    envelope.recipients[0].attempts = 3
    envelope.recipients[0].last_error = "451 try later"
    result_of(spool.save(envelope))
    [entry] = spool.scan()
    assert entry == (envelope.id, True)
    [(_, [(_, raw, _)], _, _)] = frames_of(child_output(spool, [entry]))
    assert raw == spool.envelope_path(envelope.id).read_bytes()
    assert parse_envelope(raw).recipients[0].attempts == 3
    [(_, [(_, trailer, _)], _, _)] = frames_of(child_output(spool, [(envelope.id, False)]))
    assert parse_envelope(trailer).recipients[0].attempts == 0  # the flag decides


def test_read_all_sends_one_frame_per_batch(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon parses batch by batch while the child reads on: one frame each."""
    monkeypatch.setattr(spoolreader, "RECOVERY_BATCH", 2)
    spool = make_spool(tmp_path)
    envelopes = queued(spool, 5)
    frames = frames_of(child_output(spool, spool.scan()))
    assert [(count, len(records), error, unreadable)
            for count, records, error, unreadable in frames] == [
        (2, 2, None, []), (2, 2, None, []), (1, 1, None, [])]
    assert [r[0] for _, records, _, _ in frames for r in records] == sorted(
        e.id for e in envelopes)


def test_read_all_ends_with_an_error_frame_on_an_os_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """EMFILE says nothing about the entry: the batch is not half sent (count 0, so
    the daemon starts again at it) and the child stops with status 1."""
    monkeypatch.setattr(spoolreader, "RECOVERY_BATCH", 2)
    spool = make_spool(tmp_path)
    envelopes = queued(spool, 4)
    failing = envelopes[3].id
    real = spool.read_raw_envelope

    def read_raw_envelope(queue_id: str, rewritten: bool) -> bytes:
        if queue_id == failing:
            raise OSError(errno.EMFILE, "Too many open files", f"{queue_id}.q")
        return real(queue_id, rewritten)

    monkeypatch.setattr(spool, "read_raw_envelope", read_raw_envelope)
    out = io.BytesIO()
    assert read_all(spool, spool.scan(), out) == 1
    first, last = frames_of(out.getvalue())
    assert first[0] == 2 and first[2] is None
    assert last == (0, [], (errno.EMFILE, f"Too many open files: {failing}.q"), [])


# --- the real child process ------------------------------------------------------------


def test_the_child_process_reads_what_read_entries_reads(tmp_path: Path) -> None:
    """``python -m relaygw.spoolreader`` agrees with the thread path, entry for entry."""
    spool = make_spool(tmp_path)
    envelopes = queued(spool, 4)
    envelopes[1].held = False
    result_of(spool.save(envelopes[1]))  # rewritten: ID.env in force
    damage_trailer(spool, envelopes[2].id)
    entries = spool.scan()
    assert (envelopes[1].id, True) in entries
    done = subprocess.run([sys.executable, "-m", "relaygw.spoolreader", str(spool.directory)],
                          input=encode_entries(entries), capture_output=True, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stderr
    records = [r for _, batch, _, _ in frames_of(done.stdout) for r in batch]
    from_child = [parse_envelope(raw) for _, raw, _ in records if raw is not None]
    problems = [(queue_id, problem) for queue_id, raw, problem in records if raw is None]
    assert spool.read_entries(entries) == (from_child, problems)
    assert [e.id for e in from_child] == [envelopes[i].id for i in (0, 1, 3)]
    assert not from_child[1].held


def test_the_child_process_without_a_directory_is_a_usage_error() -> None:
    """Status 2, as for any command-line misuse; nothing on stdout to mistake for a frame."""
    done = subprocess.run([sys.executable, "-m", "relaygw.spoolreader"], input=b"",
                          capture_output=True, timeout=60, check=False)
    assert done.returncode == 2
    assert b"usage" in done.stderr and done.stdout == b""


# --- the daemon's end: ChildReader -----------------------------------------------------


def start_child(tmp_path: Path, count: int, run_blocking: Any = sync_run
                ) -> tuple[Spool, list[Envelope], ChildReader, Child]:
    spool = make_spool(tmp_path)
    envelopes = queued(spool, count)
    reactor = ProcessReactor()
    reader = ChildReader(reactor, spool, run_blocking, spool.scan())
    [child] = reactor.children
    return spool, envelopes, reader, child


def test_child_reader_spawns_this_python_on_this_package(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The child must run the daemon's own relaygw, whatever its sys.path, and be
    handed every entry before it starts reading (stdin closed)."""
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    spool, envelopes, _, child = start_child(tmp_path, 2)
    assert child.executable == sys.executable
    assert child.args == [sys.executable, "-m", "relaygw.spoolreader", str(spool.directory)]
    root, *rest = child.env["PYTHONPATH"].split(os.pathsep)
    assert Path(root) == Path(relaygw.__file__).resolve().parent.parent
    assert (Path(root) / "relaygw" / "spoolreader.py").is_file()
    assert rest == ["/elsewhere"]
    assert child.entries() == [(e.id, False) for e in envelopes]


def test_child_reader_gives_parsed_batches_then_none(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Frames come back as parsed envelopes however the pipe cuts them; the end is
    known from the counts, not from the child's exit."""
    monkeypatch.setattr(spoolreader, "RECOVERY_BATCH", 2)
    spool, envelopes, reader, child = start_child(tmp_path, 3)
    first = reader.next()
    assert not has_fired(first)  # nothing from the child yet
    output = child_output(spool, child.entries())
    for i in range(len(output)):  # one byte at a time: the worst a pipe can do
        child.send(output[i:i + 1])
    assert result_of(first) == Batch(2, envelopes[:2], [])
    assert result_of(reader.next()) == Batch(1, envelopes[2:], [])
    assert result_of(reader.next()) is None  # without waiting for the exit
    child.end()
    assert result_of(reader.next()) is None


def test_child_reader_quarantines_what_does_not_parse_through_run_blocking(
        tmp_path: Path) -> None:
    """A damaged trailer (reported by the child) and JSON that is no envelope (found
    by the daemon) are both set aside in corrupt/, off the reactor, before the batch
    is handed on; the good entry is untouched."""
    runner = ManualRunner()
    spool = make_spool(tmp_path)
    good, torn, garbled = queued(spool, 3)
    damage_trailer(spool, torn.id)
    bad_json_entry(spool, garbled.id)
    reactor = ProcessReactor()
    reader = ChildReader(reactor, spool, runner, spool.scan())
    [child] = reactor.children
    child.answer(spool)
    d = reader.next()
    assert not has_fired(d)  # the quarantine runs first
    [(_, fn, _)] = runner.waiting
    assert fn == spool.quarantine
    runner.run_next()
    batch = result_of(d)
    assert batch.count == 3 and batch.envelopes == [good]
    assert [queue_id for queue_id, _ in batch.quarantined] == [torn.id, garbled.id]
    assert "no envelope trailer" in batch.quarantined[0][1]
    assert batch.quarantined[1][1]  # the JSON error, for the log
    assert sorted(p.name for p in (spool.directory / "corrupt").iterdir()) == sorted(
        [f"{torn.id}.q", f"{garbled.id}.q"])
    assert spool.queue_ids() == [good.id]


def test_child_reader_raises_the_os_error_of_an_error_frame(tmp_path: Path) -> None:
    """The errno survives the pipe: the gateway pauses for EMFILE, not quarantines."""
    _, _, reader, child = start_child(tmp_path, 2)
    child.send(encode_frame((0, [], (errno.EMFILE, "Too many open files: X.q"), [])))
    with pytest.raises(OSError) as caught:
        result_of(reader.next())
    assert caught.value.errno == errno.EMFILE
    assert "Too many open files" in str(caught.value)


def test_child_reader_kills_a_child_whose_output_is_not_a_frame(tmp_path: Path) -> None:
    """Garbage on stdout means the child is not ours to trust: kill it, ignore what
    else it says, and fail with the reason once it has exited."""
    spool, _, reader, child = start_child(tmp_path, 2)
    d = reader.next()
    junk = b"\xff\xfe\xfd\xfc"
    child.send(FRAME_HEADER.pack(len(junk)) + junk)
    assert child.transport.signals == ["KILL"]
    child.answer(spool)  # a good frame after the garbage is not believed
    assert not has_fired(d)
    child.end(ProcessTerminated(signal=9))
    with pytest.raises(ReaderFailed, match="unreadable output") as caught:
        result_of(d)
    assert "2 entries unread" in str(caught.value)
    assert child.transport.signals == ["KILL"]


@pytest.mark.parametrize("frame", [42, (1, 2), (1, [], None), (1, [("id", 3, None)], None, []),
                                   (1, [], ("EMFILE", "x"), []), ("1", [], None, []),
                                   (1, [], None, [("id", 5)])],
                         ids=["int", "pair", "three", "bad-record", "bad-error", "bad-count",
                              "bad-unreadable"])
def test_child_reader_kills_a_child_whose_frame_has_the_wrong_shape(
        tmp_path: Path, frame: object) -> None:
    """A frame that decodes but is not (count, records, error, unreadable) is unreadable output
    too: a ReaderFailed (the rest is read in threads), never an exception that would
    abandon the read-back."""
    _, _, reader, child = start_child(tmp_path, 2)
    d = reader.next()
    child.send(encode_frame(frame))  # type: ignore[arg-type]
    assert child.transport.signals == ["KILL"]
    child.end(ProcessTerminated(signal=9))
    with pytest.raises(ReaderFailed, match="sent unreadable output"):
        result_of(d)


def test_a_child_killed_by_a_signal_says_so(tmp_path: Path) -> None:
    """The reason reads as one sentence: killed by which signal, or exited with which status."""
    _, _, reader, child = start_child(tmp_path, 2)
    d = reader.next()
    child.end(ProcessTerminated(signal=9))
    with pytest.raises(ReaderFailed, match=r"^the spool reader process was killed by signal 9"
                                           r" with 2 entries unread$"):
        result_of(d)


def test_child_reader_fails_when_the_child_ends_early_with_its_last_words(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A child that dies mid-way is a ReaderFailed (read the rest in threads), and
    the log gets the last stderr line, where Python puts the exception."""
    monkeypatch.setattr(spoolreader, "RECOVERY_BATCH", 1)
    spool, envelopes, reader, child = start_child(tmp_path, 3)
    first_frame = frames_of(child_output(spool, child.entries()))[0]
    child.send(encode_frame(first_frame))
    child.end(ProcessTerminated(exitCode=1),
              stderr=b"Traceback (most recent call last):\n  ...\nMemoryError: out\n")
    assert result_of(reader.next()).envelopes == envelopes[:1]
    with pytest.raises(ReaderFailed) as caught:
        result_of(reader.next())
    message = str(caught.value)
    assert "2 entries unread" in message and message.endswith(": MemoryError: out")


def test_child_reader_fails_when_the_child_exits_0_too_soon(tmp_path: Path) -> None:
    """Even a clean exit before every entry was answered is a failure, not the end."""
    _, _, reader, child = start_child(tmp_path, 2)
    child.end()
    with pytest.raises(ReaderFailed, match=r"exited 0 with 2 entries unread$"):
        result_of(reader.next())


def test_child_reader_that_cannot_spawn_is_a_reader_failed(tmp_path: Path) -> None:
    """So that start-up falls back to threads instead of failing."""
    spool = make_spool(tmp_path)
    reactor = ProcessReactor()
    reactor.refuse = OSError(errno.EAGAIN, "Resource temporarily unavailable")
    with pytest.raises(ReaderFailed, match="cannot start"):
        ChildReader(reactor, spool, sync_run, [("X", False)])


def test_child_reader_without_a_python_executable_is_a_reader_failed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An embedded interpreter may not know its executable: spawning "" would fail
    in the child, later and less clearly; threads read the spool instead."""
    monkeypatch.setattr(sys, "executable", "")
    spool = make_spool(tmp_path)
    reactor = ProcessReactor()
    with pytest.raises(ReaderFailed, match="no Python executable"):
        ChildReader(reactor, spool, sync_run, [("X", False)])
    assert reactor.spawns == 0


def test_stop_kills_only_a_child_still_running(tmp_path: Path) -> None:
    """A KILL after the exit could reach another process that got the pid since."""
    _, _, reader, child = start_child(tmp_path, 1)
    reader.stop()
    assert child.transport.signals == ["KILL"]
    child.end(ProcessTerminated(signal=9))
    reader.stop()
    assert child.transport.signals == ["KILL"]  # not even tried once it has ended


def test_stop_tolerates_a_child_reaped_before_its_end_was_reported(tmp_path: Path) -> None:
    """Twisted reaps the process before it calls processEnded: between the two,
    signalProcess raises ProcessExitedAlready, which stop() must absorb."""
    _, _, reader, child = start_child(tmp_path, 1)
    child.transport.exited = True
    reader.stop()  # raises if ProcessExitedAlready is let through
    assert child.transport.signals == ["KILL"]


# --- Gateway start-up through the child ------------------------------------------------


def start_gateway(tmp_path: Path, runner: Any, monkeypatch: pytest.MonkeyPatch,
                  child_min: int = 3) -> tuple[Gateway, ProcessReactor]:
    monkeypatch.setattr(service, "CHILD_READER_MIN", child_min)
    reactor = ProcessReactor()
    gateway = Gateway(config_for(tmp_path), reactor, runner, deliverers={})
    gateway.startService()
    return gateway, reactor


@pytest.mark.parametrize(("count", "spawned"), [(3, 1), (2, 0)], ids=["at-min", "below-min"])
def test_start_up_reads_in_a_child_from_child_reader_min_entries(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, count: int, spawned: int) -> None:
    """A small spool is not worth a process: the disk threads read it."""
    monkeypatch.setattr(spoolreader, "RECOVERY_BATCH", 2)
    held_in_spool(tmp_path, count)
    runner = ManualRunner()
    gateway, reactor = start_gateway(tmp_path, runner, monkeypatch)
    try:
        assert len(reactor.children) == spawned
        assert len(runner.waiting) == 1 - spawned  # the thread reader's first batch
    finally:
        gateway.stopService()


def test_start_up_loads_the_queue_from_the_child_frames(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Batch by batch, as the frames arrive; resumed fires after the last one."""
    monkeypatch.setattr(spoolreader, "RECOVERY_BATCH", 2)
    queued_envelopes = held_in_spool(tmp_path, 5)
    runner = ManualRunner()
    gateway, reactor = start_gateway(tmp_path, runner, monkeypatch)
    try:
        [child] = reactor.children
        assert child.entries() == sorted((e.id, False) for e in queued_envelopes)
        assert gateway.scheduler.messages == {} and not gateway.resumed.called
        frames = child_output(gateway.spool, child.entries())
        first = len(encode_frame(frames_of(frames)[0]))
        child.send(frames[:first])
        assert sorted(gateway.scheduler.messages) == sorted(e.id for e in queued_envelopes)[:2]
        assert not gateway.resumed.called
        child.send(frames[first:])
        assert sorted(gateway.scheduler.messages) == sorted(e.id for e in queued_envelopes)
        assert gateway.resumed.called and gateway.scheduler.loading == set()
        assert runner.waiting == []  # no thread did any reading
        assert child.transport.signals == ["KILL"]  # done with it, not waiting for its exit
    finally:
        gateway.stopService()


def test_start_up_in_a_child_quarantines_a_damaged_entry_and_logs_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        logged: list[dict[str, Any]]) -> None:
    envelopes = held_in_spool(tmp_path, 3)
    spool = Spool(tmp_path / "spool", sync_run)
    damage_trailer(spool, envelopes[1].id)
    gateway, reactor = start_gateway(tmp_path, sync_run, monkeypatch)
    try:
        [child] = reactor.children
        child.answer(gateway.spool)
        assert gateway.resumed.called
        assert sorted(gateway.scheduler.messages) == sorted(e.id for i, e in
                                                            enumerate(envelopes) if i != 1)
        assert (tmp_path / "spool" / "corrupt" / f"{envelopes[1].id}.q").exists()
        assert any(envelopes[1].id in line and "corrupt/" in line
                   for line in lines(logged, LogLevel.error))
    finally:
        gateway.stopService()


def test_a_child_that_dies_early_leaves_the_rest_to_threads(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        logged: list[dict[str, Any]]) -> None:
    """Every message loaded exactly once, none quarantined: the threads start where
    the child stopped, neither re-reading its batch nor skipping the next."""
    monkeypatch.setattr(spoolreader, "RECOVERY_BATCH", 2)
    queued_envelopes = held_in_spool(tmp_path, 5)
    ids = sorted(e.id for e in queued_envelopes)
    runner = ManualRunner()
    gateway, reactor = start_gateway(tmp_path, runner, monkeypatch)
    resumed: list[str] = []
    real_resume = gateway.scheduler.resume

    def resume(envelopes: list[Envelope]) -> None:
        resumed.extend(e.id for e in envelopes)
        real_resume(envelopes)

    monkeypatch.setattr(gateway.scheduler, "resume", resume)
    try:
        [child] = reactor.children
        child.send(encode_frame(frames_of(child_output(gateway.spool, child.entries()))[0]))
        child.end(ProcessTerminated(exitCode=1), stderr=b"MemoryError\n")
        assert any("MemoryError" in line and "reading the rest in threads" in line
                   for line in lines(logged, LogLevel.warn))
        [(_, fn, args)] = runner.waiting
        assert fn == gateway.spool.read_entries and args == ([(ids[2], False),
                                                              (ids[3], False)],)
        while runner.waiting:
            runner.run_next()
        assert resumed == ids
        assert gateway.resumed.called and sorted(gateway.scheduler.messages) == ids
        assert len(reactor.children) == 1  # no second child after a failure
        assert not (tmp_path / "spool" / "corrupt").exists()
        assert any("5 queued messages resumed" in line for line in lines(logged, LogLevel.info))
    finally:
        gateway.stopService()


def test_a_child_that_cannot_start_leaves_everything_to_threads(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A spawn refused (EAGAIN: too many processes) must not leave the queue unread."""
    queued_envelopes = held_in_spool(tmp_path, 3)
    monkeypatch.setattr(service, "CHILD_READER_MIN", 3)
    reactor = ProcessReactor()
    reactor.refuse = OSError(errno.EAGAIN, "Resource temporarily unavailable")
    gateway = Gateway(config_for(tmp_path), reactor, sync_run, deliverers={})
    gateway.startService()
    try:
        assert reactor.spawns == 1  # tried once, then threads
        assert gateway.resumed.called
        assert sorted(gateway.scheduler.messages) == sorted(e.id for e in queued_envelopes)
    finally:
        gateway.stopService()


def test_an_error_frame_pauses_then_a_new_child_starts_at_the_same_batch(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """EMFILE is the machine's problem: wait, then try the same entries in a child
    again (not in threads, not quarantined)."""
    monkeypatch.setattr(spoolreader, "RECOVERY_BATCH", 2)
    queued_envelopes = held_in_spool(tmp_path, 5)
    ids = sorted(e.id for e in queued_envelopes)
    runner = ManualRunner()
    gateway, reactor = start_gateway(tmp_path, runner, monkeypatch)
    try:
        [first] = reactor.children
        first.send(encode_frame(frames_of(child_output(gateway.spool, first.entries()))[0]))
        first.send(encode_frame((0, [], (errno.EMFILE, "Too many open files"), [])))
        assert len(reactor.children) == 1  # a pause first
        reactor.advance(0.5)
        first.end(ProcessTerminated(exitCode=1))  # the child stops after an error frame
        assert len(reactor.children) == 1
        reactor.advance(0.5)
        assert first.transport.signals == []  # it had ended: nothing to kill
        [_, second] = reactor.children
        assert second.entries() == [(queue_id, False) for queue_id in ids[2:]]
        second.answer(gateway.spool)
        assert gateway.resumed.called and sorted(gateway.scheduler.messages) == ids
        assert runner.waiting == []
        assert not (tmp_path / "spool" / "corrupt").exists()
    finally:
        gateway.stopService()


def test_stopping_the_gateway_kills_the_child_reader(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        logged: list[dict[str, Any]]) -> None:
    """SIGTERM during a long read-back must not leave a child behind, nor start
    reading in threads once the child is gone."""
    held_in_spool(tmp_path, 3)
    runner = ManualRunner()
    gateway, reactor = start_gateway(tmp_path, runner, monkeypatch)
    [child] = reactor.children
    gateway.stopService()
    assert child.transport.signals == ["KILL"]
    child.end(ProcessTerminated(signal=9))
    assert child.transport.signals == ["KILL"]
    assert runner.waiting == [] and gateway.scheduler.messages == {}
    assert gateway.resumed.called and gateway.scheduler.loading == set()
    assert not any("reading the rest in threads" in line
                   for line in lines(logged, LogLevel.warn))  # it is not: we are stopping


# --- found in review -----------------------------------------------------------------


def test_garbage_after_the_child_was_reaped_raises_nothing_out_of_the_reactor(
        tmp_path: Path) -> None:
    """Twisted may reap the child before its pipe is drained: the KILL is then refused
    (ProcessExitedAlready), which must not escape outReceived into the reactor."""
    _, _, reader, child = start_child(tmp_path, 2)
    d = reader.next()
    child.transport.exited = True  # reaped; processEnded not reported yet
    junk = b"\xff\xfe\xfd\xfc"
    child.send(FRAME_HEADER.pack(len(junk)) + junk)  # must not raise
    assert child.transport.signals == ["KILL"]
    child.end(ProcessTerminated(exitCode=0))
    with pytest.raises(ReaderFailed, match="sent unreadable output"):
        result_of(d)


def test_entries_that_cannot_be_encoded_make_a_reader_failure_not_a_wait(
        tmp_path: Path) -> None:
    """Should an entry name ever be unencodable, the child is not left waiting for
    its stdin (it would wait forever, and so would start-up): stdin is closed, the
    child killed, and the reader fails over to threads."""
    spool = make_spool(tmp_path)
    reactor = ProcessReactor()
    reader = ChildReader(reactor, spool, sync_run, [("caf\u00e9", False)])
    [child] = reactor.children
    assert child.transport.stdin_closed and child.transport.signals == ["KILL"]
    assert bytes(child.transport.stdin) == b""
    d = reader.next()
    child.end(ProcessTerminated(signal=9))
    with pytest.raises(ReaderFailed, match="not ASCII"):
        result_of(d)


@pytest.mark.parametrize("name", ["caf\u00e9", "two words", "a.b", ""])
def test_scan_leaves_alone_what_is_not_a_queue_file_name(
        tmp_path: Path, name: str, logged: list[dict[str, Any]]) -> None:
    """A file relaygw did not write (a name with a space, a dot, a non-ASCII letter)
    is neither read as mail nor handed to the start-up reader; it is logged and kept."""
    spool = make_spool(tmp_path)
    [envelope] = queued(spool, 1)
    stray = spool.directory / f"{name}.q"
    stray.write_bytes(spool.message_path(envelope.id).read_bytes())
    assert spool.scan() == [(envelope.id, False)]
    assert stray.exists()
    assert any("not a queue file name" in line for line in lines(logged, LogLevel.warn))


def test_every_entry_set_aside_is_logged_even_when_the_next_move_fails(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        logged: list[dict[str, Any]]) -> None:
    """Entries are logged one by one as they are moved to corrupt/: an I/O error on
    the second cannot leave the first moved without a word (the retry would then
    find it gone and skip it silently)."""
    spool = make_spool(tmp_path)
    first, second = queued(spool, 2)
    damage_trailer(spool, first.id)
    damage_trailer(spool, second.id)
    real_replace = os.replace

    def replace(source: Any, target: Any) -> None:
        if str(source).endswith(f"{second.id}.q"):
            raise OSError(errno.EIO, "Input/output error")
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError):
        spool.read_entries([(first.id, False), (second.id, False)])
    assert (spool.directory / "corrupt" / f"{first.id}.q").exists()
    errors = lines(logged, LogLevel.error)
    assert len(errors) == 1 and first.id in errors[0] and "corrupt/" in errors[0]


# --- an entry that cannot be read for a reason of its own ---------------------------


def directory_entry(spool: Spool) -> str:
    """A directory where a queue file should be: reading it fails with EISDIR."""
    queue_id = "0000000000000000D1R"
    (spool.directory / f"{queue_id}.q").mkdir()
    return queue_id


def test_an_unreadable_entry_is_logged_and_left_and_the_rest_is_read(
        tmp_path: Path, logged: list[dict[str, Any]]) -> None:
    """EISDIR, EACCES... are about one file: retrying the batch would keep the whole
    queue behind it forever. It is left where it is, logged, and not queued."""
    spool = make_spool(tmp_path)
    envelopes = queued(spool, 2)
    odd = directory_entry(spool)
    entries = spool.scan()
    assert (odd, False) in entries
    found, quarantined = spool.read_entries(entries)
    assert sorted(e.id for e in found) == sorted(e.id for e in envelopes)
    assert quarantined == []
    assert (spool.directory / f"{odd}.q").is_dir()  # left in place, not in corrupt/
    [error] = lines(logged, LogLevel.error)
    assert odd in error and "Is a directory" in error and "left in place" in error


def test_a_permission_problem_is_an_entry_problem_not_a_machine_problem(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        logged: list[dict[str, Any]]) -> None:
    """EACCES (a file left owned by another user) is skipped like EISDIR; EMFILE is
    still raised for the whole batch to be tried again."""
    spool = make_spool(tmp_path)
    first, second = queued(spool, 2)
    real = spool.read_raw_envelope

    def read_raw_envelope(queue_id: str, rewritten: bool) -> bytes:
        if queue_id == first.id:
            raise OSError(errno.EACCES, "Permission denied")
        return real(queue_id, rewritten)

    monkeypatch.setattr(spool, "read_raw_envelope", read_raw_envelope)
    entries = spool.scan()
    assert spool.read_entries(entries) == ([second], [])
    assert any(first.id in line for line in lines(logged, LogLevel.error))

    def machine_trouble(queue_id: str, rewritten: bool) -> bytes:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(spool, "read_raw_envelope", machine_trouble)
    with pytest.raises(OSError):
        spool.read_entries(entries)


def test_the_child_reports_an_unreadable_entry_and_the_daemon_logs_it(
        tmp_path: Path, logged: list[dict[str, Any]]) -> None:
    """In the child the same entry goes into the frame's unreadable list (still
    counted as read); the daemon logs it and loads the rest."""
    spool = make_spool(tmp_path)
    envelopes = queued(spool, 2)
    odd = directory_entry(spool)
    entries = spool.scan()
    [(count, records, error, unreadable)] = frames_of(child_output(spool, entries))
    assert (count, error) == (3, None) and len(records) == 2
    assert unreadable == [(odd, "Is a directory")]
    reactor = ProcessReactor()
    reader = ChildReader(reactor, spool, sync_run, entries)
    [child] = reactor.children
    child.answer(spool)
    batch = result_of(reader.next())
    assert sorted(e.id for e in batch.envelopes) == sorted(e.id for e in envelopes)
    assert batch.quarantined == []
    [error_line] = lines(logged, LogLevel.error)
    assert odd in error_line and "left in place" in error_line
    assert (spool.directory / f"{odd}.q").is_dir()
