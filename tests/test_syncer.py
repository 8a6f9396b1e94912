"""The journal's syncer: the child program itself, and the daemon's end of it
driven by a fake process reactor (every answer, end and refusal chosen here)."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.logger import LogLevel, formatEvent
from twisted.python.failure import Failure

import relaygw
from relaygw import syncer as syncer_module
from relaygw.syncer import ProcessSyncer, journal_syncer
from support import log_events
from test_journal import fired, result
from test_spoolreader import ProcessReactor

NAME = "0000000000000001.log"


class CountingOS:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def fdatasync(self, fd: int) -> None:
        self.calls.append("fdatasync")
        os.fdatasync(fd)

    def fsync(self, fd: int) -> None:
        self.calls.append("fsync")
        os.fsync(fd)


@pytest.fixture
def segment(tmp_path: Path) -> tuple[Path, int]:
    path = tmp_path / NAME
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"record")
    yield tmp_path, fd
    os.close(fd)


def started(directory: Path) -> tuple[ProcessSyncer, ProcessReactor, CountingOS]:
    reactor = ProcessReactor()
    fake = CountingOS()
    syncer = ProcessSyncer(reactor, directory, fake)
    syncer.start()
    return syncer, reactor, fake


# --- the daemon's end ----------------------------------------------------------------


def test_the_child_is_this_python_on_this_package(segment: tuple[Path, int]) -> None:
    directory, _ = segment
    _, reactor, _ = started(directory)
    [child] = reactor.syncers
    assert child.executable == sys.executable
    assert child.args == [sys.executable, "-S", "-m", "relaygw.syncchild", str(directory)]
    package_root = str(Path(relaygw.__file__).resolve().parent.parent)
    assert child.env["PYTHONPATH"].split(os.pathsep)[0] == package_root


def test_requests_are_lines_and_answers_fire_them_in_order(segment: tuple[Path, int]) -> None:
    directory, fd = segment
    syncer, reactor, fake = started(directory)
    [child] = reactor.syncers
    first = syncer.sync(NAME, fd, False)
    second = syncer.sync(NAME, fd, True)
    gone = syncer.retire(NAME)
    assert bytes(child.transport.stdin) == (f"S {NAME}\nSD {NAME}\nU {NAME}\n").encode()
    child.send(b"K\nE ")
    assert result(first) is None and not fired(second)
    child.send(b"5\nK\n")
    failure = result(second)
    assert isinstance(failure, Failure) and failure.value.errno == errno.EIO
    assert result(gone) is None
    assert fake.calls == []  # all of it done by the child


def test_a_child_that_ends_is_replaced_and_asked_again(segment: tuple[Path, int]) -> None:
    directory, fd = segment
    syncer, reactor, _ = started(directory)
    d = syncer.sync(NAME, fd, False)
    with log_events() as events:
        reactor.syncers[0].end(ProcessTerminated(signal="KILL"), stderr=b"oops\n")
    [_, second] = reactor.syncers
    assert bytes(second.transport.stdin) == f"S {NAME}\n".encode()
    assert any("syncer" in formatEvent(e) and "oops" in formatEvent(e) for e in events
               if e.get("log_level") == LogLevel.error)
    second.send(b"K\n")
    assert result(d) is None


def test_a_child_that_ends_with_nothing_asked_is_replaced_when_next_needed(
        segment: tuple[Path, int]) -> None:
    directory, fd = segment
    syncer, reactor, _ = started(directory)
    with log_events():
        reactor.syncers[0].end(ProcessDone(0))
    assert len(reactor.syncers) == 1
    syncer.sync(NAME, fd, False)
    assert len(reactor.syncers) == 2


def test_too_many_ends_and_the_syncer_goes_on_inline(segment: tuple[Path, int]) -> None:
    directory, fd = segment
    syncer, reactor, fake = started(directory)
    d = syncer.sync(NAME, fd, True)
    with log_events() as events:
        for _ in range(syncer_module.RESTARTS + 1):
            reactor.syncers[-1].end(ProcessTerminated(exitCode=1))
    assert len(reactor.syncers) == syncer_module.RESTARTS + 1
    assert syncer.degraded and result(d) is None
    assert fake.calls == ["fdatasync", "fsync"]  # answered here, inline
    assert any("reactor thread" in formatEvent(e) for e in events)
    assert result(syncer.sync(NAME, fd, False)) is None
    assert len(reactor.syncers) == syncer_module.RESTARTS + 1  # no more children


def test_a_child_that_cannot_start_leaves_it_inline(segment: tuple[Path, int]) -> None:
    directory, fd = segment
    reactor = ProcessReactor()
    fake = CountingOS()
    syncer = ProcessSyncer(reactor, directory, fake)
    original = reactor.spawnProcess

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.EAGAIN, "Resource temporarily unavailable")

    reactor.spawnProcess = refuse  # type: ignore[method-assign]
    with log_events() as events:
        assert result(syncer.sync(NAME, fd, False)) is None
    reactor.spawnProcess = original  # type: ignore[method-assign]
    assert syncer.degraded and fake.calls == ["fdatasync"]
    assert any("cannot start" in formatEvent(e) for e in events)


def test_an_answer_that_is_none_kills_the_child(segment: tuple[Path, int]) -> None:
    directory, fd = segment
    syncer, reactor, _ = started(directory)
    d = syncer.sync(NAME, fd, False)
    [child] = reactor.syncers
    child.send(b"E 99999999999\n")  # no errno: as garbled as any
    assert child.transport.signals == ["KILL"] and not fired(d)
    with log_events():
        child.end(ProcessTerminated(signal="KILL"))
    reactor.syncers[1].send(b"K\n")
    assert result(d) is None


def test_the_stop_answers_what_is_pending_inline_and_closes_the_child(
        segment: tuple[Path, int]) -> None:
    directory, fd = segment
    syncer, reactor, fake = started(directory)
    d = syncer.sync(NAME, fd, False)
    [child] = reactor.syncers
    syncer.stop()
    assert child.transport.stdin_closed and result(d) is None
    assert fake.calls == ["fdatasync"]
    child.send(b"K\n")  # a late answer: no news, no error
    child.end(ProcessDone(0))
    assert result(syncer.sync(NAME, fd, False)) is None and len(reactor.syncers) == 1


def test_a_reactor_that_cannot_spawn_gets_no_process_syncer(tmp_path: Path) -> None:
    from twisted.internet.testing import MemoryReactorClock
    assert journal_syncer(MemoryReactorClock(), tmp_path) is None
    assert isinstance(journal_syncer(ProcessReactor(), tmp_path), ProcessSyncer)


# --- the child itself ----------------------------------------------------------------


def run_child(directory: Path, requests: bytes, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-S", "-m", "relaygw.syncchild", str(directory)],
                          input=requests, capture_output=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(
                              Path(relaygw.__file__).resolve().parent.parent)})


def test_the_child_syncs_retires_and_reports_errors(segment: tuple[Path, int]) -> None:
    directory, _ = segment
    missing = "00000000000000FF.log"
    done = run_child(directory, f"S {NAME}\nSD {NAME}\nS {missing}\nU {NAME}\nU {NAME}\n"
                     .encode())
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"K\nK\nE %d\nK\nK\n" % errno.ENOENT
    assert not (directory / NAME).exists()


@pytest.mark.parametrize("request_line", [b"S ../../etc/passwd\n", b"X " + NAME.encode() + b"\n",
                                          b"S 000000000000000g.log\n"])
def test_the_child_refuses_what_is_no_request(tmp_path: Path, request_line: bytes) -> None:
    done = run_child(tmp_path, request_line)
    assert done.returncode != 0 and done.stdout == b""
    assert b"not a request" in done.stderr


def test_the_child_ignores_the_groups_signals_and_ends_with_its_input(
        segment: tuple[Path, int]) -> None:
    directory, _ = segment
    child = subprocess.Popen([sys.executable, "-S", "-m", "relaygw.syncchild", str(directory)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             env={**os.environ, "PYTHONPATH": str(
                                 Path(relaygw.__file__).resolve().parent.parent)})
    try:
        assert child.stdin is not None and child.stdout is not None
        child.stdin.write(f"S {NAME}\n".encode())
        child.stdin.flush()
        assert child.stdout.readline() == b"K\n"  # running, signals ignored from here
        child.send_signal(signal.SIGTERM)
        child.send_signal(signal.SIGINT)
        child.stdin.write(f"S {NAME}\n".encode())
        child.stdin.flush()
        assert child.stdout.readline() == b"K\n"
        child.stdin.close()
        assert child.wait(30) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_the_child_without_its_directory_says_how_to_run_it(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "relaygw.syncchild"], capture_output=True,
                          timeout=30, cwd=Path(relaygw.__file__).resolve().parent.parent)
    assert done.returncode == 2 and b"usage" in done.stderr
