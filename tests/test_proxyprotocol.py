"""The haproxy: listener starts the session only after the PROXY header."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from relaygw.proxyprotocol import HEADER_TIMEOUT, HeaderFirstWrappingFactory

HEADER = b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 25\r\n"


class Recorder(Protocol):
    def __init__(self) -> None:
        self.peer_at_start: Any = None
        self.received = b""

    def connectionMade(self) -> None:
        self.peer_at_start = self.transport.getPeer()

    def dataReceived(self, data: bytes) -> None:
        self.received += data


def connect() -> tuple[Any, Recorder, StringTransport, Clock]:
    recorder = Recorder()
    clock = Clock()
    factory = HeaderFirstWrappingFactory(Factory.forProtocol(lambda: recorder), clock)
    wrapper = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5555))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 5555))
    wrapper.makeConnection(transport)
    return wrapper, recorder, transport, clock


@pytest.mark.parametrize("pieces", [
    [HEADER + b"EHLO x\r\n"],
    [HEADER, b"EHLO x\r\n"],
    [HEADER[:3], HEADER[3:10], HEADER[10:] + b"EHLO x\r\n"],
    [bytes([b]) for b in HEADER] + [b"EHLO x\r\n"],
], ids=["one-write", "header-then-data", "split", "byte-by-byte"])
def test_session_starts_with_the_real_client(pieces: list[bytes]) -> None:
    wrapper, recorder, transport, _ = connect()
    assert recorder.peer_at_start is None  # nothing started before the header
    for piece in pieces:
        wrapper.dataReceived(piece)
    assert recorder.peer_at_start.host == "192.0.2.7"
    assert recorder.received == b"EHLO x\r\n"
    assert not transport.disconnecting


def test_no_header_in_time_is_dropped() -> None:
    _wrapper, recorder, transport, clock = connect()
    clock.advance(HEADER_TIMEOUT)
    assert transport.disconnected or transport.disconnecting
    assert recorder.peer_at_start is None


def test_smtp_instead_of_a_header_is_dropped() -> None:
    wrapper, recorder, transport, _clock = connect()
    wrapper.dataReceived(b"EHLO attacker.example\r\n")
    assert transport.disconnected or transport.disconnecting
    assert recorder.peer_at_start is None


def test_header_cancels_the_timer() -> None:
    wrapper, _recorder, _transport, clock = connect()
    wrapper.dataReceived(HEADER)
    assert [c for c in clock.getDelayedCalls() if c.active()] == []


@pytest.mark.parametrize("header", [
    b"PROXY TCP4 192.0.2.7\n.\nX 127.0.0.1 40000 25\r\n",  # v1 splits at spaces only
    b"PROXY TCP4 mail.example 127.0.0.1 40000 25\r\n",
    b"PROXY TCP4 192.0.2.7 127.0.0.1\r\nX 40000 25\r\n",
], ids=["bare LF and a dot line", "a name", "CRLF inside"])
def test_a_header_whose_address_is_not_an_ip_is_dropped(header: bytes) -> None:
    """Its host would go into the Received: line and the mail log as it is."""
    wrapper, recorder, transport, _ = connect()
    wrapper.dataReceived(header + b"EHLO x\r\n")
    assert transport.disconnected or transport.disconnecting
    assert recorder.peer_at_start is None


def test_an_ipv6_header_with_a_scope_is_taken() -> None:
    wrapper, recorder, transport, _ = connect()
    wrapper.dataReceived(b"PROXY TCP6 fe80::1%eth0 ::1 40000 25\r\nEHLO x\r\n")
    assert recorder.peer_at_start is not None and recorder.peer_at_start.host == "fe80::1%eth0"
    assert not transport.disconnecting


@implementer(IHalfCloseableProtocol)
class HalfCloseable(Recorder):
    def __init__(self) -> None:
        super().__init__()
        self.read_ended = False

    def readConnectionLost(self) -> None:
        self.read_ended = True

    def writeConnectionLost(self) -> None:
        pass


def test_a_half_close_reaches_the_session_behind_the_header() -> None:
    """The SMTP session answers what a half-closed client sent (its 250 too)."""
    session = HalfCloseable()
    factory = HeaderFirstWrappingFactory(Factory.forProtocol(lambda: session), Clock())
    wrapper = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5555))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 5555))
    wrapper.makeConnection(transport)
    assert IHalfCloseableProtocol.providedBy(wrapper)  # asked by Twisted's TCP transport
    wrapper.dataReceived(HEADER + b"QUIT\r\n")
    wrapper.readConnectionLost()
    assert session.read_ended and not transport.disconnecting


def test_a_half_close_before_the_header_closes() -> None:
    wrapper, recorder, transport, _clock = connect()
    wrapper.readConnectionLost()
    assert transport.disconnecting and recorder.peer_at_start is None
