"""Who makes the journal's writes durable: the calling thread, or a child process.

``Journal`` writes its records itself and asks a syncer for the rest:
``sync`` (fdatasync a segment, and fsync the directory for a new one) and
``retire`` (unlink a segment, durably). Both answer with a Deferred, in the
order asked.

- ``InlineSyncer`` does the calls at once, in the caller's thread: for tests
  (a fake ``os`` chooses every failure), reactors that cannot spawn, and
  what is left at shutdown.
- ``ProcessSyncer`` hands them to ``python -m relaygw.syncchild`` (why a
  process and not a thread: that module's docstring). If the child ends
  unexpectedly, what it was asked and had not answered is asked again of a
  new one (every request can be repeated safely); after ``RESTARTS`` ends
  within ``RESTART_WINDOW`` seconds, or when no child can be started, the
  syncer goes on inline, blocking but never wrong, and says so in the log.
"""

from __future__ import annotations

import errno
import os
import sys
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorProcess
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

import relaygw

RESTARTS = 3
RESTART_WINDOW = 60.0
STDERR_KEPT = 2000


class Syncer(Protocol):
    def sync(self, name: str, fd: int, directory: bool) -> Deferred[None]:
        """Segment ``name`` (open as ``fd``) durable, and its directory entry too
        when ``directory``."""

    def retire(self, name: str) -> Deferred[None]:
        """Segment ``name`` unlinked, and the unlink durable."""

    def start(self) -> None:
        """Ready to be asked (a child is started)."""

    def stop(self) -> None:
        """Answer what is pending (blocking), then end: later requests are done inline."""


class InlineSyncer:
    """The calls at once, in this thread: results are Deferreds already fired."""

    def __init__(self, directory: Path, os_module: Any = os) -> None:
        self.directory = directory
        self.os = os_module

    def sync(self, name: str, fd: int, directory: bool) -> Deferred[None]:
        try:
            self.os.fdatasync(fd)
            if directory:
                self._fsync_directory()
        except Exception:
            return fail()
        return succeed(None)

    def retire(self, name: str) -> Deferred[None]:
        try:
            try:
                self.os.unlink(self.directory / name)
            except FileNotFoundError:
                pass
            self._fsync_directory()
        except Exception:
            return fail()
        return succeed(None)

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def _fsync_directory(self) -> None:
        fsync_directory(self.directory, self.os)


def fsync_directory(directory: Path, os_module: Any = os) -> None:
    fd = os_module.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os_module.fsync(fd)
    finally:
        os_module.close(fd)


def journal_syncer(reactor: Any, directory: Path) -> ProcessSyncer | None:
    """A child process where the reactor can spawn one; else None (inline)."""
    return ProcessSyncer(reactor, directory) if IReactorProcess.providedBy(reactor) else None


class _Request:
    """One request line, what answers it inline, and who waits for the answer."""

    __slots__ = ("deferred", "inline", "line")

    def __init__(self, line: bytes, inline: Callable[[], Deferred[None]]) -> None:
        self.line = line
        self.inline = inline
        self.deferred: Deferred[None] = Deferred()


class ProcessSyncer:
    """The requests go to a child; its answers fire their Deferreds in order."""

    log = Logger()

    def __init__(self, reactor: Any, directory: Path, os_module: Any = os,
                 clock: Callable[[], float] | None = None) -> None:
        self.reactor = reactor
        self.directory = Path(directory)
        self.inline = InlineSyncer(self.directory, os_module)
        self._clock = clock if clock is not None else reactor.seconds
        self._pending: deque[_Request] = deque()
        self._child: _ChildProtocol | None = None
        self._ends: list[float] = []  # when children ended unexpectedly, lately
        self._stopped = False
        self.degraded = False  # no child any more: everything inline

    def sync(self, name: str, fd: int, directory: bool) -> Deferred[None]:
        line = f"{'SD' if directory else 'S'} {name}\n".encode("ascii")
        return self._ask(_Request(line, lambda: self.inline.sync(name, fd, directory)))

    def retire(self, name: str) -> Deferred[None]:
        line = f"U {name}\n".encode("ascii")
        return self._ask(_Request(line, lambda: self.inline.retire(name)))

    def start(self) -> None:
        if self._child is None and not self.degraded and not self._stopped:
            self._spawn()

    def stop(self) -> None:
        """What the child has not answered is done again here, and answered; the
        child then sees its stdin close and ends."""
        self._stopped = True
        child, self._child = self._child, None
        if child is not None:
            child.syncer = None  # a late answer or end is no news any more
            child.transport.closeStdin()
        self._answer_inline()

    def _ask(self, request: _Request) -> Deferred[None]:
        if self._child is None:
            if self._stopped or self.degraded:
                return request.inline()
            self._spawn()
        self._pending.append(request)
        if self._child is not None:
            self._child.transport.write(request.line)
        else:  # could not start one: degraded, and this request with the rest
            self._answer_inline()
        return request.deferred

    def _spawn(self) -> None:
        env = dict(os.environ)
        # The package this daemon runs, whatever sys.path the child would get.
        package_root = str(Path(relaygw.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH"))
                                            if p)
        child = _ChildProtocol(self)
        try:
            if not sys.executable:
                raise OSError(errno.ENOENT, "no Python executable")
            self.reactor.spawnProcess(
                child, sys.executable,
                [sys.executable, "-S", "-m", "relaygw.syncchild", str(self.directory)], env=env)
        except OSError as e:
            self._degrade(f"cannot start the journal's syncer ({e})")
            return
        self._child = child
        for request in self._pending:  # asked of a child that ended: ask again
            child.transport.write(request.line)

    def _answered(self, line: bytes) -> None:
        if not self._pending:
            self._lost(f"the journal's syncer answered what it was not asked: {line!r:.100}")
            return
        code, _, number = line.partition(b" ")
        if line != b"K" and not (code == b"E" and number.isdigit() and len(number) <= 5):
            self._lost(f"the journal's syncer sent an answer that is none: {line!r:.100}")
            return
        request = self._pending.popleft()
        if line == b"K":
            request.deferred.callback(None)
        else:
            error = int(number)
            request.deferred.errback(OSError(error, os.strerror(error)))

    def _lost(self, why: str) -> None:
        """The child cannot be trusted any more: it is ended, and replaced."""
        child = self._child
        if child is not None:
            child.garbled = why
            try:
                child.transport.signalProcess("KILL")
            except Exception:  # exited already: its end is on the way
                pass

    def _ended(self, child: _ChildProtocol, reason: Failure, stderr: bytes) -> None:
        if child is not self._child:
            return
        self._child = None
        why = child.garbled or f"ended ({reason.getErrorMessage()})"
        last = stderr.decode("utf-8", "replace").strip().splitlines()
        if last:
            why += f": {last[-1]}"
        now = self._clock()
        self._ends = [t for t in self._ends if now - t < RESTART_WINDOW] + [now]
        if len(self._ends) > RESTARTS:
            self._degrade(f"the journal's syncer {why}, {len(self._ends)} times in"
                          f" {RESTART_WINDOW:.0f} s")
            return
        self.log.error("spool: the journal's syncer {why}; starting another", why=why)
        if self._pending:
            self._spawn()

    def _degrade(self, why: str) -> None:
        self.log.error("spool: {why}; journal writes are made durable in the reactor"
                       " thread from now on (slower, as safe)", why=why)
        self.degraded = True
        self._answer_inline()

    def _answer_inline(self) -> None:
        while self._pending:
            request = self._pending.popleft()
            request.inline().chainDeferred(request.deferred)


class _ChildProtocol(ProcessProtocol):
    """The daemon's end of one child: answer lines in, its end reported once."""

    def __init__(self, syncer: ProcessSyncer) -> None:
        self.syncer: ProcessSyncer | None = syncer
        self.garbled: str | None = None
        self._buffer = b""
        self._stderr = b""

    def outReceived(self, data: bytes) -> None:
        self._buffer += data
        while self.syncer is not None and self.garbled is None:
            line, newline, rest = self._buffer.partition(b"\n")
            if not newline:
                return
            self._buffer = rest
            self.syncer._answered(line)

    def errReceived(self, data: bytes) -> None:
        self._stderr = (self._stderr + data)[-STDERR_KEPT:]

    def processEnded(self, reason: Failure) -> None:
        if self.syncer is not None:
            self.syncer._ended(self, reason, self._stderr)
