"""Send small writes at once instead of on the reactor's next turn.

Twisted's TCP transport only buffers in ``write()``: it registers the socket
for writability (an ``epoll_ctl``), sends on the next turn of the reactor, and
unregisters (another ``epoll_ctl``). For an SMTP reply or command, which fits
the socket buffer, that is two system calls and a loop turn of latency per
line, on every line of every session. ``write_now`` tries ``send()`` first
when nothing is queued ahead of the data and hands Twisted only what did not
go, so ordering and flow control stay Twisted's.

Only a plain TCP connection (``twisted.internet.tcp.Connection``, TLS not
started, not closing or aborted) takes the shortcut; anything else (TLS, a
wrapper, a test transport, a connection on its way out) gets a plain
``write()``, which keeps Twisted's rules (nothing goes out after an abort).
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp


def send_directly(transport: Any, data: bytes) -> int:
    """How much of ``data`` ``send()`` took at once: 0 where the transport does not
    allow the shortcut (see above) or the socket would block or failed (Twisted's
    own write path then reports the error, in order). Nothing is buffered here."""
    if (type(transport) is not tcp.Server and type(transport) is not tcp.Client) or (
            transport.TLS or not transport.connected or transport._writeDisconnected
            or transport.disconnecting or getattr(transport, "_aborting", False)
            or transport.dataBuffer or transport._tempDataBuffer):
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
