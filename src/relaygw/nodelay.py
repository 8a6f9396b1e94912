"""TCP_NODELAY set once on a listening socket instead of on every accepted one.

SMTP replies are small and awaited, so each session turns Nagle's algorithm
off. On Linux an accepted socket inherits TCP_NODELAY from its listener, so
setting it there spares every session a ``setsockopt`` (a system call per
connection; with one connection per message, a system call per message). On
other systems, or where the listener is not a TCP socket (a UNIX socket) or
refuses the option, sessions set it themselves, as before.

A connection's socket is copied from the listener when its handshake
completes, not when it is accepted: a listening socket handed over by
systemd may already hold connections made before the option was set, so
there sessions keep setting it themselves (``NoDelay=yes`` in the socket
unit sets it before any). A port of our own is set within microseconds of
its ``listen()``, at start-up, before the reactor runs.
"""

from __future__ import annotations

import socket
import sys
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.internet.protocol import Factory
from zope.interface import implementer

INHERITED_BY_ACCEPTED_SOCKETS = sys.platform.startswith("linux")


class NoDelaySessions:
    """Whether sessions of a listener need to set TCP_NODELAY themselves."""

    listener_set_it = False

    @property
    def sessions_must_set_it(self) -> bool:
        return not (self.listener_set_it and INHERITED_BY_ACCEPTED_SOCKETS)


@implementer(IStreamServerEndpoint)
class NoDelayListening:
    """An endpoint whose listening socket gets TCP_NODELAY once it listens;
    ``adopted``: a socket listening already (systemd's), whose sessions still
    set it themselves."""

    def __init__(self, endpoint: IStreamServerEndpoint, sessions: NoDelaySessions,
                 adopted: bool = False) -> None:
        self._endpoint = endpoint
        self._sessions = sessions
        self._adopted = adopted

    def listen(self, factory: Factory) -> Deferred[IListeningPort]:
        return self._endpoint.listen(factory).addCallback(self._listening)

    def _listening(self, port: Any) -> Any:
        sock = getattr(port, "socket", None)
        if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                return port
            # Adopted: connections made before now did not inherit it.
            self._sessions.listener_set_it = not self._adopted
        return port


def is_adopted(description: str) -> bool:
    """Whether a listener's endpoint takes over a socket already listening."""
    return description.startswith(("systemd:", "haproxy:systemd:"))
