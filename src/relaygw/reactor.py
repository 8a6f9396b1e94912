"""The epoll reactor, with one layer less per I/O event.

Twisted's ``EPollReactor.doPoll`` hands every ready descriptor to
``log.callWithLogger``, which asks the selectable for its ``logPrefix()``,
copies the legacy logging context into a new dict, stacks it, runs the
handler inside ``callWithContext`` and unstacks it. All that is for the
``system`` field of *legacy* ``twisted.python.log`` messages emitted while
the handler runs; ``twisted.logger`` events (all of relaygw's, and Twisted's
own these days) never read it. It cost 6 % of the reactor thread per relayed
message end to end (nine events a message), measured with py-spy and by CPU
time per message.

``RelayReactor.doPoll`` calls ``_doReadOrWrite`` directly, which is what
``callWithLogger`` wraps: it already catches anything ``doRead``/``doWrite``
raise, logs it with ``log.err`` and disconnects the selectable. What escapes
it (only ``_disconnectSelectable``'s own failures) is logged here, as
``callWithLogger`` would. The one difference: a legacy log message from inside
a handler reads ``[-]`` where it read ``[SMTPServerProtocol,12,127.0.0.1]``;
that includes the traceback Twisted logs for an exception a protocol raised
(a bug: relaygw's protocols log their own errors through ``twisted.logger``).
It relies on ``EPollReactor``'s ``_poller``, ``_selectables`` and
``_doReadOrWrite``, as Twisted 26.10 has them; ``tests/test_reactor.py``
fails if they change.

A plain read event on a TCP connection (``EPOLLIN`` alone, on a
``tcp.Server`` or ``tcp.Client``, TLS or not) takes one step further:
``_read_tcp`` does what ``_doReadOrWrite``, ``Connection.doRead`` and
``Connection._dataReceived`` do for it, in one frame instead of four (and
without the ``fileno()`` check: a closed socket's ``recv`` fails and the
connection is lost, as the check would have it). Six or more such events a
relayed message; anything else (a hang-up, a write, a listening port, a
transport whose ``doRead`` was replaced on the instance, as an abort and
a connecting client do) goes Twisted's way.

``RelayReactor.call_soon(f, *args)`` is ``callLater(0, f, *args)`` for what
must run after the current handler, before the reactor waits again (a turn's
log lines, a session's close): a list, not a DelayedCall in the timer heap.
A DelayedCall costs its object, a heap push and pop compared by a Python
``__lt__``, and a logging context around the call: about 20 Python calls each,
twice per relayed message. ``relaygw.soon.call_soon(reactor, f, *args)`` (a
module of its own, which imports without epoll) picks it where the reactor
has it and ``callLater(0)`` elsewhere (tests' ``Clock``, a reactor chosen
with ``twistd -r``).

``relaygw.tap.makeService`` calls ``install_if_none`` when twistd runs it, and
it installs nothing if a reactor is installed already (``twistd -r poll``),
so an operator's choice of reactor stands.
"""

from __future__ import annotations

import errno
import sys
from collections.abc import Callable
from select import EPOLLIN
from typing import Any

from twisted.internet import main, tcp
from twisted.internet.epollreactor import EPollReactor
from twisted.logger import Logger
from twisted.python import log


class RelayReactor(EPollReactor):
    """``EPollReactor`` dispatching I/O events without the legacy log context,
    with a list of calls for the next turn (``call_soon``)."""

    _log = Logger()

    def __init__(self) -> None:
        self._soon: list[tuple[Callable[..., object], tuple[Any, ...]]] = []
        super().__init__()

    def call_soon(self, f: Callable[..., object], *args: Any) -> None:
        """``f(*args)`` when the reactor next runs its timed calls (first among
        them), before it waits for I/O again; an exception is logged, as a
        timed call's is. Not cancellable: its callers check on their own."""
        self._soon.append((f, args))

    def runUntilCurrent(self) -> None:
        if self._soon:
            # Swapped first: a call that asks for another gets the turn after.
            soon, self._soon = self._soon, []
            for f, args in soon:
                try:
                    f(*args)
                except BaseException:  # as a timed call's: logged, and the rest still run
                    self._log.failure("while handling a call_soon call to {f!r}", f=f)
        super().runUntilCurrent()

    def timeout(self) -> float | None:
        if self._soon:
            return 0.0
        return super().timeout()

    def doPoll(self, timeout: float | None) -> None:
        if timeout is None:
            timeout = -1  # wait indefinitely
        try:
            ready = self._poller.poll(timeout, len(self._selectables))
        except OSError as err:
            if err.errno == errno.EINTR:
                return
            raise
        selectables = self._selectables
        dispatch = self._doReadOrWrite
        read_tcp = self._read_tcp
        for fd, event in ready:
            selectable = selectables.get(fd)
            if selectable is None:
                continue  # removed by an earlier event of this batch
            try:
                if (event == EPOLLIN and type(selectable) in _TCP_CONNECTIONS
                        and "doRead" not in selectable.__dict__):
                    read_tcp(selectable)
                else:
                    dispatch(selectable, fd, event)
            except KeyboardInterrupt:
                raise
            except BaseException:
                log.err(None, f"Unhandled error dispatching an event for {selectable!r}")

    doIteration = doPoll

    def _read_tcp(self, connection: Any) -> None:
        """``_doReadOrWrite(connection, fd, EPOLLIN)`` for a TCP connection, with its
        ``doRead`` and ``_dataReceived`` (Twisted 26.10's) folded in: read, hand
        the bytes to the protocol, disconnect on end of file, a failed ``recv`` or
        an exception from the protocol (logged, as Twisted logs it)."""
        why = None
        try:
            try:
                data = connection.socket.recv(connection.bufferSize)
            except OSError as e:
                if e.args[0] != errno.EWOULDBLOCK:
                    why = main.CONNECTION_LOST
            else:
                if data:
                    connection.protocol.dataReceived(data)
                else:
                    why = main.CONNECTION_DONE
        except BaseException:
            why = sys.exc_info()[1]
            log.err()
        if why:
            self._disconnectSelectable(connection, why, True)


_TCP_CONNECTIONS = (tcp.Server, tcp.Client)


def install_if_none() -> bool:
    """Install a RelayReactor as the global reactor unless one is already installed;
    True if it was."""
    if "twisted.internet.reactor" in sys.modules:
        return False
    reactor: Any = RelayReactor()
    from twisted.internet.main import installReactor

    installReactor(reactor)
    return True
