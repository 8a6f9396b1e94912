"""write_now on a real loopback TCP connection: sent at once, in order, and a plain
write() wherever the shortcut does not apply."""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.error import ConnectionAborted, ConnectionDone
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from relaygw.fastwrite import lose_connection, write_now


class Collect(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.arrived: Deferred[None] = Deferred()
        self.expect = 0

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if len(self.data) >= self.expect and not self.arrived.called:
            self.arrived.callback(None)


async def loopback_pair(test: TestCase, server: Collect,
                        client_protocol: type[Protocol]) -> Protocol:
    """A real TCP connection on 127.0.0.1 from a ``client_protocol`` to ``server``;
    the listener is closed and the connection aborted when the test ends."""
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        Factory.forProtocol(lambda: server))
    test.addCleanup(port.stopListening)
    client = await TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port).connect(
        Factory.forProtocol(client_protocol))
    test.addCleanup(client.transport.abortConnection)
    return client


class WriteNowTests(TestCase):
    async def connected_pair(self) -> tuple[Protocol, Collect]:
        server = Collect()
        return await loopback_pair(self, server, Protocol), server

    async def test_a_small_write_leaves_nothing_buffered(self) -> None:
        client, server = await self.connected_pair()
        server.expect = len(b"250 ok\r\n")
        write_now(client.transport, b"250 ok\r\n")
        # sent by send(): nothing waits in Twisted's buffers, no writability watch
        self.assertEqual(client.transport.dataBuffer, b"")
        self.assertEqual(client.transport._tempDataBuffer, [])
        self.assertNotIn(client.transport, reactor.getWriters())
        await server.arrived
        self.assertEqual(server.data, b"250 ok\r\n")

    async def test_order_is_kept_behind_buffered_data(self) -> None:
        client, server = await self.connected_pair()
        big = b"x" * (8 * 1024 * 1024)  # more than the socket takes at once
        server.expect = len(big) + len(b"after\r\n")
        client.transport.write(big)
        write_now(client.transport, b"after\r\n")  # queued behind, not sent ahead
        self.assertIn(client.transport, reactor.getWriters())
        await server.arrived
        self.assertEqual(len(server.data), len(big) + 7)
        self.assertTrue(server.data.endswith(b"x" * 100 + b"after\r\n"))

    async def test_nothing_goes_out_after_an_abort(self) -> None:
        client, server = await self.connected_pair()
        lost: Deferred[None] = Deferred()
        server.connectionLost = lambda reason: lost.callback(None)  # type: ignore[method-assign]
        client.transport.abortConnection()
        write_now(client.transport, b"250 2.0.0 Ok: queued\r\n")  # as Twisted: dropped
        await lost
        self.assertEqual(server.data, b"")

    def test_other_transports_get_a_plain_write(self) -> None:
        transport = StringTransport()
        write_now(transport, b"220 hello\r\n")
        self.assertEqual(transport.value(), b"220 hello\r\n")


class Closing(Protocol):
    """The sending side: records when and why its connection was lost."""

    def __init__(self) -> None:
        self.lost: Deferred[tuple[Failure, bool]] = Deferred()
        self.inside_call = False

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost.callback((reason, self.inside_call))


class CountingSocket:
    """A socket that records its shutdown() and close() calls."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.calls: list[str] = []

    def shutdown(self, how: int) -> None:
        self.calls.append("shutdown")
        self._sock.shutdown(how)

    def close(self) -> None:
        self.calls.append("close")
        self._sock.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class LoseConnectionTests(TestCase):
    async def connected_pair(self) -> tuple[Closing, Collect]:
        server = Collect()
        server_lost: Deferred[tuple[Failure]] = Deferred()
        server.connectionLost = (  # type: ignore[method-assign]
            lambda reason: server_lost.callback((reason,)))
        server.lost = server_lost  # type: ignore[attr-defined]
        client = await loopback_pair(self, server, Closing)
        return client, server  # type: ignore[return-value]

    async def test_closes_on_the_next_turn_without_watching_for_writability(self) -> None:
        client, server = await self.connected_pair()
        counting = client.transport.socket = CountingSocket(client.transport.socket)
        client.inside_call = True
        write_now(client.transport, b"221 2.0.0 Bye\r\n")
        lose_connection(client.transport)
        self.assertNotIn(client.transport, reactor.getWriters())
        self.assertNotIn(client.transport, reactor.getReaders())
        self.assertFalse(client.lost.called)  # not inside the protocol's own call
        client.inside_call = False
        reason, inside = await client.lost
        self.assertFalse(inside)
        self.assertTrue(reason.check(ConnectionDone))
        [peer_reason] = await server.lost  # type: ignore[attr-defined]
        self.assertTrue(peer_reason.check(ConnectionDone))  # a FIN, not a reset
        self.assertEqual(server.data, b"221 2.0.0 Bye\r\n")
        self.assertEqual(counting.calls, ["close"])  # no shutdown() first

    async def test_buffered_data_goes_out_before_the_close(self) -> None:
        client, server = await self.connected_pair()
        big = b"x" * (8 * 1024 * 1024)  # more than the socket takes at once
        client.transport.write(big)
        lose_connection(client.transport)  # Twisted's own way: flush, then close
        [peer_reason] = await server.lost  # type: ignore[attr-defined]
        self.assertTrue(peer_reason.check(ConnectionDone))
        self.assertEqual(len(server.data), len(big))

    async def test_a_write_after_it_still_arrives_before_the_close(self) -> None:
        client, server = await self.connected_pair()
        write_now(client.transport, b"221 first\r\n")
        lose_connection(client.transport)
        client.transport.write(b"late\r\n")  # before the next turn: buffered by Twisted
        [peer_reason] = await server.lost  # type: ignore[attr-defined]
        self.assertTrue(peer_reason.check(ConnectionDone))
        self.assertEqual(server.data, b"221 first\r\nlate\r\n")

    async def test_an_abort_before_the_close_is_reported_as_an_abort(self) -> None:
        client, _ = await self.connected_pair()
        lose_connection(client.transport)
        client.transport.abortConnection()  # before the next turn's close
        reason, _ = await client.lost
        self.assertTrue(reason.check(ConnectionAborted))

    def test_other_transports_get_a_plain_lose_connection(self) -> None:
        transport = StringTransport()
        lose_connection(transport)
        self.assertTrue(transport.disconnecting)


class _StartedTLS:
    """What Twisted's TCP transport looks like after ``startTLS``: its protocol is
    the TLS layer, ``TLS`` is set."""

    TLS = True

    def __init__(self, layer: Any) -> None:
        self.protocol = layer
        self.aborted = False
        self.lost = False

    def abortConnection(self) -> None:
        self.aborted = True

    def loseConnection(self) -> None:
        self.lost = True


def test_a_starttls_session_before_its_handshake_is_aborted() -> None:
    from twisted.protocols.tls import TLSMemoryBIOProtocol

    layer = TLSMemoryBIOProtocol.__new__(TLSMemoryBIOProtocol)  # no handshake yet
    transport = _StartedTLS(layer)
    lose_connection(transport)
    assert transport.aborted and not transport.lost
    layer._handshakeDone = True  # once it is done, TLS's orderly close
    again = _StartedTLS(layer)
    lose_connection(again)
    assert again.lost and not again.aborted
