"""Send small writes at once instead of on the reactor's next turn.

Twisted's TCP transport only buffers in ``write()``: it registers the socket
for writability (an ``epoll_ctl``), sends on the next turn of the reactor, and
unregisters (another ``epoll_ctl``). For an SMTP reply or command, which fits
the socket buffer, that is two system calls and a loop turn of latency per
line, on every line of every session. ``write_now`` tries ``send()`` first
when nothing is queued ahead of the data and hands Twisted only what did not
go, so ordering and flow control stay Twisted's.

``lose_connection`` does the same for the close after a final reply: with
nothing left in Twisted's buffer, it closes on the next turn instead of
registering for writability to find the buffer empty.

Only a plain TCP connection (``twisted.internet.tcp.Connection``, TLS not
started, not closing or aborted) takes the shortcut; anything else (TLS, a
wrapper, a test transport, a connection on its way out) gets a plain
``write()``, which keeps Twisted's rules (nothing goes out after an abort).
"""

from __future__ import annotations

from typing import Any

from twisted.internet import main, tcp
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure

from relaygw.soon import call_soon

# One Failure for every session closed here, as Twisted's own
# ``protocol.connectionDone``: building one per session (and working out its
# class names again for each ``check``) was a measurable share of a close.
_CLOSED = Failure(main.CONNECTION_DONE)
_CLOSED.cleanFailure()


def _shortcut_allowed(transport: Any) -> bool:
    """A plain TCP connection, open, with nothing queued in Twisted's buffer."""
    return not ((type(transport) is not tcp.Server and type(transport) is not tcp.Client) or (
        transport.TLS or not transport.connected or transport._writeDisconnected
        or transport.disconnecting or getattr(transport, "_aborting", False)
        or transport.dataBuffer or transport._tempDataBuffer))


def send_directly(transport: Any, data: bytes) -> int:
    """How much of ``data`` ``send()`` took at once: 0 where the transport does not
    allow the shortcut (see above) or the socket would block or failed (Twisted's
    own write path then reports the error, in order). Nothing is buffered here."""
    if not _shortcut_allowed(transport):
        return 0
    try:
        return int(transport.socket.send(data))
    except OSError:  # BlockingIOError included
        return 0


def write_now(transport: Any, data: bytes) -> None:
    """``transport.write(data)``, sending at once when the transport allows it."""
    sent = send_directly(transport, data)
    if sent < len(data):
        transport.write(data[sent:])


def lose_connection(transport: Any, abort_unfinished_tls: bool = True) -> None:
    """``transport.loseConnection()``, without its trip through writability when
    nothing is buffered: reading stops now, and the socket is closed (orderly, a
    FIN after what was sent) on the reactor's next turn, outside the protocol's
    own call. Saves two ``epoll_ctl``, a ``shutdown`` and a loop turn per closed
    session.

    A TLS session whose handshake never finished is aborted instead (unless
    ``abort_unfinished_tls`` is False): nothing written can reach its client,
    and TLS's orderly close would wait for the handshake forever (Twisted
    aborts only when nothing was written), holding the session's connection
    slot."""
    if abort_unfinished_tls and tls_handshake_pending(transport):
        transport.abortConnection()
        return
    if not _shortcut_allowed(transport) or transport.producer is not None:
        transport.loseConnection()
        return
    transport.stopReading()
    transport.disconnecting = True  # what loseConnection marks: no shortcut writes now
    call_soon(transport.reactor, _close_if_flushed, transport)


def tls_handshake_pending(transport: Any) -> bool:
    """TLS on ``transport`` (implicit: the transport is the TLS layer; STARTTLS:
    the TCP transport's protocol is) and its handshake not yet done."""
    layer = transport if isinstance(transport, TLSMemoryBIOProtocol) else (
        getattr(transport, "protocol", None) if getattr(transport, "TLS", False) else None)
    return isinstance(layer, TLSMemoryBIOProtocol) and not layer._handshakeDone


def _close_if_flushed(transport: Any) -> None:
    if not transport.connected or getattr(transport, "_aborting", False):
        return  # lost or aborted meanwhile: Twisted has said so, or will (aborted)
    if transport.dataBuffer or transport._tempDataBuffer:
        transport.startWriting()  # written meanwhile: Twisted's way, close once flushed
        return
    # close() alone sends the FIN (the descriptor is ours alone, close-on-exec), as
    # Twisted's own comment on its shutdown() before close() says; that shutdown
    # is a system call more, and an OSError raised and caught when the client
    # has hung up first (each session of a load generator that closes at once).
    transport._shouldShutdown = False
    transport.connectionLost(_CLOSED)
