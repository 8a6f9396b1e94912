"""Reading the queue back at start-up, in batches, in a thread or in a child process.

Why a child process for a big spool: reading and parsing 100,000 envelopes is
seconds of CPU (system calls and JSON). In a thread of the daemon that work
holds the GIL against the reactor thread, which at the same time schedules,
parks and logs what was read; the two then take turns instead of running on
two cores. A child (``python -m relaygw.spoolreader DIRECTORY``) does the
reading, the system calls, on the other core; the daemon parses the JSON.

The exchange, over the child's stdin and stdout:

- the daemon writes the entries ``Spool.scan`` listed, one ``ID FLAG`` line
  each (FLAG ``1`` when an ``ID.env`` supersedes the trailer), and closes stdin;
- the child answers one frame per batch of ``RECOVERY_BATCH`` entries: a
  4-byte big-endian length, then, marshalled, ``(count, records, error,
  unreadable)``: ``count`` entries were read, ``records`` holds ``(id, raw
  envelope, None)`` for each entry still there, or ``(id, None, problem)`` for
  a damaged trailer; ``unreadable`` holds ``(id, problem)`` for an entry that
  cannot be read for a reason of its own (``spool.ENTRY_ERRORS``), which the
  daemon logs and leaves in place. Any other OSError (EMFILE, EIO...) is sent
  as ``error``, ``(errno, text)``, and ends the child: the daemon pauses and
  starts a reader again at that batch.

Plain bytes and marshal, not pickled envelopes: unpickling 100,000 envelopes
costs the reactor about as much as parsing their JSON, and the child then has
nothing to agree on with the daemon but this frame. An entry whose envelope
does not parse is set aside in ``corrupt/`` by the disk thread pool. A child
that cannot start or dies before it is done makes the daemon read the rest
in threads.
"""

from __future__ import annotations

import errno
import marshal
import os
import struct
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple, Protocol

from twisted.internet.defer import Deferred, DeferredQueue, succeed
from twisted.internet.error import ProcessDone, ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

import relaygw
from relaygw.envelope import Envelope
from relaygw.queuefile import RawRecord, parse_records
from relaygw.spool import RECOVERY_BATCH, Spool

Entry = tuple[str, bool]
# (count, records, error, unreadable)
Frame = tuple[int, list[RawRecord], tuple[int, str] | None, list[tuple[str, str]]]
FRAME_HEADER = struct.Struct("!I")
STDERR_KEPT = 2000  # bytes of the child's stderr kept for the log


class Batch(NamedTuple):
    """What reading ``count`` consecutive entries gave."""

    count: int
    envelopes: list[Envelope]
    quarantined: list[tuple[str, str]]  # (queue id, problem), already set aside


class ReaderFailed(Exception):
    """The child reader died or could not start (not an I/O error of the spool)."""


class SpoolReader(Protocol):
    def next(self) -> Deferred[Batch | None]:
        """The next batch; None when every entry has been read. Errback OSError
        (try again later) or ReaderFailed (read the rest another way)."""

    def stop(self) -> None: ...


class ThreadReader:
    """Batches read through the spool's blocking runner (the disk thread pool)."""

    def __init__(self, spool: Spool, run_blocking: Callable[..., Deferred[Any]],
                 entries: list[Entry]) -> None:
        self._spool = spool
        self._run_blocking = run_blocking
        self._entries = entries
        self._position = 0

    def next(self) -> Deferred[Batch | None]:
        if self._position >= len(self._entries):
            return succeed(None)
        batch = self._entries[self._position:self._position + RECOVERY_BATCH]
        d = self._run_blocking(self._spool.read_entries, batch)

        def read(result: tuple[list[Envelope], list[tuple[str, str]]]) -> Batch:
            self._position += len(batch)
            return Batch(len(batch), *result)
        return d.addCallback(read)

    def stop(self) -> None:
        """Nothing runs between calls."""


class _Ended(NamedTuple):
    """The child has exited (the last item of its queue)."""

    reason: Failure
    stderr: bytes


class ChildReaderProtocol(ProcessProtocol):
    """The daemon's end of the child: entries in, frames out, into a queue."""

    def __init__(self, entries: list[Entry]) -> None:
        self.entries = entries
        self.items: DeferredQueue[Frame | _Ended] = DeferredQueue()
        self.ended = False
        self.garbled: str | None = None  # what was wrong with the child's output
        self._buffer = bytearray()
        self._stderr = b""

    def connectionMade(self) -> None:
        try:
            entries = encode_entries(self.entries)
        except UnicodeEncodeError:  # scan() keeps such names out; never wait on a child
            self.garbled = "could not be given the entries (a name that is not ASCII)"
            self.transport.closeStdin()
            self.transport.signalProcess("KILL")
            return
        self.transport.write(entries)
        self.transport.closeStdin()

    def outReceived(self, data: bytes) -> None:
        if self.garbled is not None:
            return
        self._buffer += data
        try:
            frames = take_frames(self._buffer)
        except (ValueError, EOFError, TypeError) as e:  # what marshal.loads raises
            frames = [e]
        for frame in frames:
            if not well_formed(frame):
                self.garbled = f"sent unreadable output ({frame!r:.200})"
                try:
                    self.transport.signalProcess("KILL")
                except ProcessExitedAlready:
                    pass  # reaped before its output was all read: processEnded follows
                return
            self.items.put(frame)

    def errReceived(self, data: bytes) -> None:
        self._stderr = (self._stderr + data)[-STDERR_KEPT:]

    def processEnded(self, reason: Failure) -> None:
        self.ended = True
        self.items.put(_Ended(reason, self._stderr))


class ChildReader:
    """Batches read by ``python -m relaygw.spoolreader`` on another core."""

    def __init__(self, reactor: Any, spool: Spool, run_blocking: Callable[..., Deferred[Any]],
                 entries: list[Entry]) -> None:
        self._spool = spool
        self._run_blocking = run_blocking
        self._protocol = ChildReaderProtocol(entries)
        self._left = len(entries)
        env = dict(os.environ)
        # The package this daemon runs, whatever sys.path the child would get.
        package_root = str(Path(relaygw.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH"))
                                            if p)
        if not sys.executable:
            raise ReaderFailed("no Python executable to run the spool reader with")
        try:
            self._process = reactor.spawnProcess(
                self._protocol, sys.executable,
                [sys.executable, "-m", "relaygw.spoolreader", str(spool.directory)], env=env)
        except OSError as e:
            raise ReaderFailed(f"cannot start {sys.executable}: {e}") from e

    def next(self) -> Deferred[Batch | None]:
        if self._left == 0:
            return succeed(None)
        return self._protocol.items.get().addCallback(self._parsed)

    def _parsed(self, item: Frame | _Ended) -> Batch | Deferred[Batch]:
        if isinstance(item, _Ended):
            stderr = item.stderr.decode("utf-8", "replace").strip().splitlines()
            raise ReaderFailed(f"the spool reader process {self._how_it_ended(item.reason)}"
                               f" with {self._left} entries unread"
                               f"{': ' + stderr[-1] if stderr else ''}")
        count, records, error, unreadable = item
        if error is not None:
            raise OSError(*error)
        for queue_id, problem in unreadable:
            self._spool.log_unreadable(queue_id, problem)
        envelopes, damaged = parse_records(records)
        self._left -= count
        batch = Batch(count, envelopes, damaged)
        if not damaged:
            return batch
        set_aside = self._run_blocking(self._spool.quarantine, damaged)
        return set_aside.addCallback(lambda _: batch)

    def _how_it_ended(self, reason: Failure) -> str:
        if self._protocol.garbled is not None:
            return self._protocol.garbled
        if reason.check(ProcessDone):
            return "exited 0"
        code = getattr(reason.value, "exitCode", None)
        signal = getattr(reason.value, "signal", None)
        if signal is not None:
            return f"was killed by signal {signal}"
        return f"exited with status {code}"

    def stop(self) -> None:
        if not self._protocol.ended:
            try:
                self._process.signalProcess("KILL")
            except ProcessExitedAlready:
                pass


def encode_entries(entries: list[Entry]) -> bytes:
    return "".join(f"{queue_id} {int(rewritten)}\n" for queue_id, rewritten in entries
                   ).encode("ascii")


def decode_entries(text: bytes) -> list[Entry]:
    entries = []
    for line in text.decode("ascii").splitlines():
        queue_id, _, flag = line.partition(" ")
        entries.append((queue_id, flag == "1"))
    return entries


def encode_frame(frame: Frame) -> bytes:
    payload = marshal.dumps(frame)
    return FRAME_HEADER.pack(len(payload)) + payload


def well_formed(frame: object) -> bool:
    """Whether a decoded frame has the shape ``(count, records, error, unreadable)``."""
    if not (isinstance(frame, tuple) and len(frame) == 4):
        return False
    count, records, error, unreadable = frame
    return (isinstance(count, int) and isinstance(records, list)
            and isinstance(unreadable, list)
            and all(isinstance(u, tuple) and len(u) == 2 and isinstance(u[0], str)
                    and isinstance(u[1], str) for u in unreadable)
            and all(isinstance(r, tuple) and len(r) == 3 and isinstance(r[0], str)
                    and isinstance(r[1], bytes | None) and isinstance(r[2], str | None)
                    for r in records)
            and (error is None or (isinstance(error, tuple) and len(error) == 2
                                   and isinstance(error[0], int) and isinstance(error[1], str))))


def take_frames(buffer: bytearray) -> list[Frame]:
    """The whole frames at the head of ``buffer``, removed from it."""
    frames = []
    start = 0
    while len(buffer) - start >= FRAME_HEADER.size:
        (length,) = FRAME_HEADER.unpack_from(buffer, start)
        end = start + FRAME_HEADER.size + length
        if len(buffer) < end:
            break
        frames.append(marshal.loads(buffer[start + FRAME_HEADER.size:end]))
        start = end
    del buffer[:start]
    return frames


def read_all(spool: Spool, entries: list[Entry], out: BinaryIO) -> int:
    """The child's work: every batch out as a frame; the exit status."""
    for start in range(0, len(entries), RECOVERY_BATCH):
        batch = entries[start:start + RECOVERY_BATCH]
        try:
            records, unreadable = spool.read_raw_entries(batch)
        except OSError as e:
            text = f"{e.strerror or e}: {e.filename}" if e.filename else str(e)
            out.write(encode_frame((0, [], (e.errno or errno.EIO, text), [])))
            out.flush()
            return 1
        out.write(encode_frame((len(batch), records, None, unreadable)))
    out.flush()
    return 0


def _not_here(fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
    raise AssertionError("the spool reader only reads")


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m relaygw.spoolreader DIRECTORY < entries", file=sys.stderr)
        return 2
    spool = Spool(Path(argv[1]), _not_here)
    return read_all(spool, decode_entries(sys.stdin.buffer.read()), sys.stdout.buffer)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
