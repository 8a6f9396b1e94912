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

``relaygw.tap.makeService`` calls ``install_if_none`` when twistd runs it, and
it installs nothing if a reactor is installed already (``twistd -r poll``),
so an operator's choice of reactor stands.
"""

from __future__ import annotations

import errno
import sys
from typing import Any

from twisted.internet.epollreactor import EPollReactor
from twisted.python import log


class RelayReactor(EPollReactor):
    """``EPollReactor`` dispatching I/O events without the legacy log context."""

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
        for fd, event in ready:
            selectable = selectables.get(fd)
            if selectable is None:
                continue  # removed by an earlier event of this batch
            try:
                dispatch(selectable, fd, event)
            except KeyboardInterrupt:
                raise
            except BaseException:
                log.err(None, f"Unhandled error dispatching an event for {selectable!r}")

    doIteration = doPoll


def install_if_none() -> bool:
    """Install a RelayReactor as the global reactor unless one is already installed;
    True if it was."""
    if "twisted.internet.reactor" in sys.modules:
        return False
    reactor: Any = RelayReactor()
    from twisted.internet.main import installReactor

    installReactor(reactor)
    return True
