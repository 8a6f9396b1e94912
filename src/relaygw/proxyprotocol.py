"""The ``haproxy:`` listener: PROXY protocol (v1/v2) with the session started late.

Twisted's own wrapper (twisted.protocols.haproxy) starts the wrapped protocol
as soon as TCP connects, before the PROXY header has arrived, so a protocol
that reads ``getPeer()`` in ``connectionMade`` (ours does: the connection
limits, the banner, the trusted-network decision) sees the load balancer's
address. Behind HAProxy on 127.0.0.1 that made every client "trusted": an
open relay. Here the SMTP session starts only once the header has named the
real client; a connection that sends no valid header within
HEADER_TIMEOUT seconds, or sends anything else first, is dropped.

It builds on Twisted's header parsers and wrapper (private modules of
twisted.protocols.haproxy, pinned by tests/test_proxyprotocol.py).
"""

from __future__ import annotations

import ipaddress
from typing import Any

from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import (
    IDelayedCall,
    IHalfCloseableProtocol,
    IReactorTime,
    IStreamServerEndpoint,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.haproxy._exceptions import InvalidProxyHeader
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser
from twisted.protocols.haproxy._wrapper import HAProxyProtocolWrapper, HAProxyWrappingFactory
from twisted.python.failure import Failure
from zope.interface import directlyProvides, implementer, providedBy

HEADER_TIMEOUT = 30.0
PREFIX = "haproxy:"


@implementer(IHalfCloseableProtocol)
class HeaderFirstWrapper(HAProxyProtocolWrapper):
    """Reads the PROXY header, then starts the wrapped protocol with the client's address."""

    factory: HeaderFirstWrappingFactory
    _started = False
    _timer: IDelayedCall | None = None
    _pending = b""

    def makeConnection(self, transport: Any) -> None:
        # policies.ProtocolWrapper.makeConnection, less the wrapped protocol's start
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)
        self._timer = self.factory.clock.callLater(HEADER_TIMEOUT, self._no_header)

    def _no_header(self) -> None:
        self._timer = None
        self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        if self._started:
            self.wrappedProtocol.dataReceived(data)
            return
        if self._parser is None:
            data = self._pending + data
            self._pending = b""
            if len(data) >= 16 and data[:12] == V2Parser.PREFIX and data[12] & 0xF0 == 0x20:
                self._parser = V2Parser()
            elif len(data) >= 8 and data[:5] == V1Parser.PROXYSTR:
                self._parser = V1Parser()
            elif len(data) < 16 and (V2Parser.PREFIX.startswith(data[:12])
                                     or V1Parser.PROXYSTR.startswith(data[:5])):
                self._pending = data  # too short to tell yet
                return
            else:
                self.transport.abortConnection()
                return
        try:
            self._proxyInfo, remaining = self._parser.feed(data)
        except InvalidProxyHeader:
            self.transport.abortConnection()
            return
        if self._proxyInfo is None:
            return
        if not (_plain_address(self._proxyInfo.source)
                and _plain_address(self._proxyInfo.destination)):
            self.transport.abortConnection()
            return
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._started = True
        self.wrappedProtocol.makeConnection(self)
        if remaining:
            self.wrappedProtocol.dataReceived(remaining)

    def readConnectionLost(self) -> None:
        """The client half-closed: passed on to a session that answers what it
        was sent (relaygw's SMTP session does); else closed, as Twisted would."""
        half = IHalfCloseableProtocol(self.wrappedProtocol, None) if self._started else None
        if half is not None:
            half.readConnectionLost()
        else:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        half = IHalfCloseableProtocol(self.wrappedProtocol, None) if self._started else None
        if half is not None:
            half.writeConnectionLost()

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._started:
            super().connectionLost(reason)
        else:
            self.factory.unregisterProtocol(self)


def _plain_address(address: Any) -> bool:
    """Whether a header's address is an IP address (or absent: UNKNOWN, LOCAL).

    Twisted's v1 parser splits the header at spaces only: ``PROXY TCP4 1.2.3.4\n.\nX
    ...`` gives the host ``"1.2.3.4\n.\nX"``, which would go into the
    ``Received:`` line and the mail log as it is."""
    host = getattr(address, "host", None)
    if host is None:
        return True
    try:
        ipaddress.ip_address(host.split("%", 1)[0])  # an IPv6 address may carry a scope
    except ValueError:
        return False
    return True


class HeaderFirstWrappingFactory(HAProxyWrappingFactory):
    protocol = HeaderFirstWrapper

    def __init__(self, wrapped: Factory, clock: IReactorTime) -> None:
        super().__init__(wrapped)
        self.clock = clock


@implementer(IStreamServerEndpoint)
class HeaderFirstEndpoint:
    def __init__(self, inner: IStreamServerEndpoint, clock: IReactorTime) -> None:
        self.inner = inner
        self.clock = clock

    def listen(self, factory: Factory) -> Any:
        return self.inner.listen(HeaderFirstWrappingFactory(factory, self.clock))


def listener_endpoint(reactor: Any, description: str) -> IStreamServerEndpoint:
    """serverFromString, except that ``haproxy:`` starts sessions after the header."""
    if description.startswith(PREFIX):
        return HeaderFirstEndpoint(serverFromString(reactor, description[len(PREFIX):]),
                                   reactor)
    return serverFromString(reactor, description)
