"""TCP_NODELAY set on the listening socket, inherited by accepted ones (Linux),
and set by a session itself wherever its listener did not."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP4ServerEndpoint,
    UNIXServerEndpoint,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import TestCase

from relaygw.nodelay import NoDelayListening, NoDelaySessions, is_adopted
from relaygw.smtpserver import SMTPFactory
from support import make_gateway


class Accepted(Protocol):
    """Records the accepted socket's TCP_NODELAY as it comes in."""

    def connectionMade(self) -> None:
        sock = self.transport.getHandle()  # type: ignore[attr-defined]
        self.factory.seen.callback(  # type: ignore[attr-defined]
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))


class ListenerTests(TestCase):
    async def test_the_listener_gets_it_and_accepted_sockets_inherit_it(self) -> None:
        sessions = NoDelaySessions()
        factory = Factory.forProtocol(Accepted)
        factory.seen = Deferred()  # type: ignore[attr-defined]
        endpoint = NoDelayListening(TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"),
                                    sessions)
        port = await endpoint.listen(factory)
        self.addCleanup(port.stopListening)
        listening = port.socket  # type: ignore[attr-defined]
        self.assertNotEqual(listening.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), 0)
        self.assertTrue(sessions.listener_set_it)
        client = await TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port).connect(
            Factory.forProtocol(Protocol))
        self.addCleanup(client.transport.abortConnection)
        accepted = await factory.seen  # type: ignore[attr-defined]
        if sys.platform.startswith("linux"):
            self.assertNotEqual(accepted, 0)  # nobody set it on this socket: inherited
            self.assertFalse(sessions.sessions_must_set_it)
        else:
            self.assertTrue(sessions.sessions_must_set_it)

    async def test_an_adopted_listener_gets_it_but_its_sessions_still_set_it(self) -> None:
        """A socket systemd passed on may hold connections made before the option."""
        sessions = NoDelaySessions()
        endpoint = NoDelayListening(TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"),
                                    sessions, adopted=True)
        port = await endpoint.listen(Factory.forProtocol(Protocol))
        self.addCleanup(port.stopListening)
        listening = port.socket  # type: ignore[attr-defined]
        self.assertNotEqual(listening.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), 0)
        self.assertFalse(sessions.listener_set_it)
        self.assertTrue(sessions.sessions_must_set_it)

    async def test_a_unix_listener_leaves_it_to_the_sessions(self) -> None:
        sessions = NoDelaySessions()
        path = self.mktemp()
        endpoint = NoDelayListening(UNIXServerEndpoint(reactor, path), sessions)
        port = await endpoint.listen(Factory.forProtocol(Protocol))
        self.addCleanup(port.stopListening)
        self.assertFalse(sessions.listener_set_it)
        self.assertTrue(sessions.sessions_must_set_it)


class NoDelayTransport(StringTransport):
    no_delay: bool | None = None

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.no_delay = enabled


@pytest.mark.parametrize(("listener_set_it", "expected"), [
    (False, True),
    (True, None if sys.platform.startswith("linux") else True),
])
def test_a_session_sets_it_only_where_its_listener_did_not(
        tmp_path: Path, listener_set_it: bool, expected: bool | None) -> None:
    factory = SMTPFactory(make_gateway(tmp_path), "smtp", "test")
    factory.nodelay.listener_set_it = listener_set_it
    protocol = factory.buildProtocol(None)
    transport = NoDelayTransport()
    protocol.makeConnection(transport)
    assert transport.no_delay is expected
    assert transport.value().startswith(b"220 ")


@pytest.mark.parametrize(("description", "adopted"), [
    ("tcp:25:interface=127.0.0.1", False),
    ("haproxy:tcp:2525", False),
    ("systemd:domain=INET:index=0", True),
    ("haproxy:systemd:domain=INET6:index=1", True),
])
def test_systemd_sockets_are_adopted(description: str, adopted: bool) -> None:
    assert is_adopted(description) is adopted
