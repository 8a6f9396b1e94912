"""RelayReactor: epoll events reach their selectables as in Twisted's EPollReactor,
errors included; and twistd relaygw installs it only when no reactor is installed."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from twisted.internet.abstract import FileDescriptor
from twisted.internet.error import ConnectionAborted, ConnectionDone
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure

from relaygw.reactor import RelayReactor
from relaygw.soon import call_soon


class Reader(FileDescriptor):
    """Reads one socket of a pair; ``fail`` makes doRead raise (a protocol's bug)."""

    def __init__(self, reactor: RelayReactor, sock: socket.socket, fail: bool = False) -> None:
        super().__init__(reactor)
        self.sock = sock
        self.fail = fail
        self.read: list[bytes] = []
        self.lost: list[Failure] = []

    def fileno(self) -> int:
        return self.sock.fileno()

    def doRead(self) -> None:
        if self.fail:
            raise RuntimeError("a bug in a handler")
        self.read.append(self.sock.recv(100))

    def connectionLost(self, reason: Failure) -> None:
        self.lost.append(reason)
        super().connectionLost(reason)


@pytest.fixture
def reactor() -> Iterator[RelayReactor]:
    r = RelayReactor()
    yield r
    r._poller.close()  # the tests' sockets may be closed by now: no removeAll
    r.waker.connectionLost(None)


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def test_a_ready_descriptor_is_read(reactor: RelayReactor,
                                    pair: tuple[socket.socket, socket.socket]) -> None:
    reader = Reader(reactor, pair[0])
    reactor.addReader(reader)
    reactor.doIteration(0)
    assert reader.read == []  # nothing sent yet
    pair[1].send(b"EHLO x\r\n")
    reactor.doIteration(0)
    assert reader.read == [b"EHLO x\r\n"]
    assert reader.lost == []


def test_events_skip_the_legacy_log_context(reactor: RelayReactor,
                                           pair: tuple[socket.socket, socket.socket],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The point of RelayReactor: no log.callWithLogger per event (EPollReactor's
    doPoll would call it here)."""
    from twisted.python import log

    wrapped: list[object] = []
    monkeypatch.setattr(log, "callWithLogger",
                        lambda logger, f, *a, **kw: wrapped.append(logger) or f(*a, **kw))
    reader = Reader(reactor, pair[0])
    reactor.addReader(reader)
    pair[1].send(b"x")
    reactor.doIteration(0)
    assert reader.read == [b"x"]
    assert wrapped == []


def test_a_handler_that_raises_is_logged_and_disconnected(
        reactor: RelayReactor, pair: tuple[socket.socket, socket.socket]) -> None:
    reader = Reader(reactor, pair[0], fail=True)
    reactor.addReader(reader)
    pair[1].send(b"x")
    reactor.doIteration(0)
    assert len(reader.lost) == 1 and reader.lost[0].check(RuntimeError)
    assert reader not in reactor.getReaders()
    errors = [e for e in flush_logged_errors() if e.check(RuntimeError)]
    assert errors, "the error is logged, as Twisted's reactor logs it"


def test_a_descriptor_removed_by_an_earlier_event_of_the_batch_is_skipped(
        reactor: RelayReactor) -> None:
    first, first_peer = socket.socketpair()
    second, second_peer = socket.socketpair()
    try:
        victim = Reader(reactor, second)

        class Remover(Reader):
            def doRead(self) -> None:
                super().doRead()
                reactor.removeReader(victim)

        remover = Remover(reactor, first)
        reactor.addReader(remover)
        reactor.addReader(victim)
        first_peer.send(b"a")
        second_peer.send(b"b")
        reactor.doIteration(0)
        # In whichever order epoll reported them: the victim was read at most before
        # its removal, never after, and nothing failed.
        assert remover.read == [b"a"]
        assert victim.read in ([], [b"b"]) and victim.lost == []
    finally:
        for s in (first, first_peer, second, second_peer):
            s.close()


class Recorder(Protocol):
    """A server protocol noting what reaches it; ``fail`` makes dataReceived raise."""

    instances: list[Recorder] = []

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.data: list[bytes] = []
        self.lost: list[Failure] = []
        Recorder.instances.append(self)

    def dataReceived(self, data: bytes) -> None:
        if self.fail:
            raise RuntimeError("a bug in a protocol")
        self.data.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost.append(reason)


@pytest.fixture
def accepted(reactor: RelayReactor, request: pytest.FixtureRequest
             ) -> Iterator[tuple[Recorder, socket.socket]]:
    """A real loopback TCP session: its server protocol on ``reactor``, its client
    socket. The parameter, if any, is the protocol's ``fail``."""
    fail = getattr(request, "param", False)
    Recorder.instances.clear()
    port = reactor.listenTCP(0, Factory.forProtocol(lambda: Recorder(fail)),
                             interface="127.0.0.1")
    client = socket.create_connection(("127.0.0.1", port.getHost().port))
    try:
        for _ in range(100):
            if Recorder.instances:
                break
            reactor.doIteration(0.01)
        [protocol] = Recorder.instances
        yield protocol, client
    finally:
        client.close()
        port.stopListening()
        for transport in reactor.getReaders():
            if hasattr(transport, "abortConnection"):
                transport.abortConnection()
        reactor.runUntilCurrent()


def iterate_until(reactor: RelayReactor, done: Callable[[], bool]) -> None:
    for _ in range(100):
        if done():
            return
        reactor.doIteration(0.01)
        reactor.runUntilCurrent()
    raise AssertionError("the reactor never got there")


def test_a_tcp_read_reaches_the_protocol_without_twisteds_dispatch(
        reactor: RelayReactor, accepted: tuple[Recorder, socket.socket],
        monkeypatch: pytest.MonkeyPatch) -> None:
    protocol, client = accepted
    dispatched: list[int] = []
    real = reactor._doReadOrWrite
    monkeypatch.setattr(reactor, "_doReadOrWrite",
                        lambda s, fd, event: dispatched.append(event) or real(s, fd, event))
    client.sendall(b"EHLO x\r\n")
    iterate_until(reactor, lambda: protocol.data != [])
    assert protocol.data == [b"EHLO x\r\n"]
    assert dispatched == []  # folded into _read_tcp
    assert protocol.lost == []


def test_end_of_file_on_a_tcp_read_is_a_clean_close(
        reactor: RelayReactor, accepted: tuple[Recorder, socket.socket]) -> None:
    protocol, client = accepted
    client.sendall(b"QUIT\r\n")
    client.shutdown(socket.SHUT_WR)
    iterate_until(reactor, lambda: protocol.lost != [])
    assert protocol.data == [b"QUIT\r\n"]
    [reason] = protocol.lost
    assert reason.check(ConnectionDone)


@pytest.mark.parametrize("accepted", [True], indirect=True)
def test_a_protocol_that_raises_on_a_tcp_read_is_logged_and_disconnected(
        reactor: RelayReactor, accepted: tuple[Recorder, socket.socket]) -> None:
    protocol, client = accepted
    client.sendall(b"x")
    iterate_until(reactor, lambda: protocol.lost != [])
    [reason] = protocol.lost
    assert reason.check(RuntimeError)
    assert [e for e in flush_logged_errors() if e.check(RuntimeError)]


def test_a_transport_whose_read_was_replaced_goes_twisteds_way(
        reactor: RelayReactor, accepted: tuple[Recorder, socket.socket]) -> None:
    """An abort replaces doRead on the instance with a no-op: data that comes
    before its connectionLost must not reach the protocol."""
    protocol, client = accepted
    [transport] = [r for r in reactor.getReaders() if getattr(r, "protocol", None) is protocol]
    transport.abortConnection()
    transport.startReading()  # registered again before the abort's connectionLost
    client.sendall(b"too late\r\n")
    reactor.doIteration(0.5)
    assert protocol.data == []
    reactor.runUntilCurrent()
    [reason] = protocol.lost
    assert reason.check(ConnectionAborted)


def test_call_soon_runs_in_order_before_the_next_wait(reactor: RelayReactor) -> None:
    ran: list[str] = []
    reactor.call_soon(ran.append, "first")
    reactor.call_soon(ran.append, "second")
    assert ran == []
    assert reactor.timeout() == 0.0  # the poll must not block while calls wait
    assert reactor.getDelayedCalls() == []  # not in the timer heap
    reactor.runUntilCurrent()
    assert ran == ["first", "second"]
    assert reactor.timeout() is None  # nothing left: the reactor may sleep


def test_a_call_soon_asked_for_by_one_runs_the_turn_after(reactor: RelayReactor) -> None:
    ran: list[str] = []

    def first() -> None:
        ran.append("first")
        reactor.call_soon(ran.append, "asked by first")

    reactor.call_soon(first)
    reactor.runUntilCurrent()
    assert ran == ["first"]
    assert reactor.timeout() == 0.0
    reactor.runUntilCurrent()
    assert ran == ["first", "asked by first"]


@pytest.mark.parametrize("error", [RuntimeError, SystemExit, KeyboardInterrupt])
def test_a_call_soon_that_raises_is_logged_and_the_others_still_run(
        reactor: RelayReactor, error: type[BaseException]) -> None:
    """As a timed call's error: logged, and not the end of the turn's other calls
    (the log's write, a session's close), even for SystemExit or KeyboardInterrupt."""
    from twisted.logger import globalLogPublisher

    failures: list[Failure] = []

    def observer(event: dict[str, object]) -> None:
        failure = event.get("log_failure")
        if isinstance(failure, Failure):
            failures.append(failure)

    def broken() -> None:
        raise error()

    ran: list[str] = []
    globalLogPublisher.addObserver(observer)
    try:
        reactor.call_soon(broken)
        reactor.call_soon(ran.append, "after")
        reactor.runUntilCurrent()
    finally:
        globalLogPublisher.removeObserver(observer)
    assert ran == ["after"]
    assert [f.check(error) for f in failures] == [error]


NO_EPOLL = """
import select
for name in [n for n in dir(select) if n.startswith("EPOLL") or n == "epoll"]:
    delattr(select, name)
import relaygw.tap, relaygw.logs, relaygw.fastwrite, relaygw.smtpserver
import relaygw.delivery.smtp, relaygw.service
try:
    import relaygw.reactor
except ImportError:
    print("imports without epoll; relaygw.reactor alone needs it")
"""


def test_everything_but_the_reactor_imports_without_epoll() -> None:
    out = subprocess.run([sys.executable, "-c", NO_EPOLL], capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.strip() == "imports without epoll; relaygw.reactor alone needs it"


def test_call_soon_falls_back_to_call_later_zero() -> None:
    """A reactor without it (a test's Clock, ``twistd -r poll``) gets callLater(0)."""
    from twisted.internet.task import Clock

    clock = Clock()
    ran: list[str] = []
    call_soon(clock, ran.append, "x")
    [call] = clock.getDelayedCalls()
    assert call.getTime() == clock.seconds()
    clock.advance(0)
    assert ran == ["x"]


def flush_logged_errors() -> list[Failure]:
    """The failures log.err reported since the last call (pytest has no trial flush)."""
    return list(_LOGGED)


_LOGGED: list[Failure] = []


@pytest.fixture(autouse=True)
def _collect_logged_errors() -> Iterator[None]:
    from twisted.python import log

    def observer(event: dict[str, object]) -> None:
        failure = event.get("failure") or event.get("log_failure")
        if isinstance(failure, Failure):
            _LOGGED.append(failure)

    _LOGGED.clear()
    log.addObserver(observer)
    yield
    log.removeObserver(observer)


INSTALLED = """
import sys
from twisted.internet import {first}
from relaygw.tap import _install_reactor
_install_reactor()
from twisted.internet import reactor
print(type(reactor).__module__ + "." + type(reactor).__name__)
"""


@pytest.mark.parametrize(("first", "expected"), [
    ("defer", "relaygw.reactor.RelayReactor"),  # nothing installed yet: ours
    ("reactor", "twisted.internet.epollreactor.EPollReactor"),  # one is: it stays
])
def test_twistd_relaygw_installs_it_only_where_no_reactor_is(first: str, expected: str) -> None:
    out = subprocess.run([sys.executable, "-c", INSTALLED.format(first=first)],
                         capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == expected


MAKE_SERVICE = """
from twisted.application.app import ServerOptions
from relaygw import tap
options = tap.Options()
options.parseOptions([])
options.parent = {parent}
tap.makeService(options)
from twisted.internet import reactor
print(type(reactor).__name__)
"""


@pytest.mark.parametrize(("parent", "expected"), [
    ("ServerOptions()", "RelayReactor"),  # parsed by twistd
    ('{"nodaemon": True}', "EPollReactor"),  # a test or an embedding program: left alone
])
def test_make_service_installs_it_only_for_twistd(tmp_path: Path, parent: str,
                                                  expected: str) -> None:
    out = subprocess.run([sys.executable, "-c", MAKE_SERVICE.format(parent=parent)],
                         capture_output=True, text=True, timeout=60, check=True, cwd=tmp_path)
    assert out.stdout.strip().splitlines()[-1] == expected
