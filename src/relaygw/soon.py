"""``call_soon(reactor, f, *args)``: run ``f`` on the reactor's next turn.

``relaygw.reactor.RelayReactor.call_soon`` keeps such calls in a list instead
of the timer heap; any other reactor (a test's ``Clock``, one chosen with
``twistd -r``, one where there is no epoll) gets ``callLater(0)``. Kept apart
from ``relaygw.reactor``, which needs epoll to import: the mail log and the
SMTP code that call this must import everywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def call_soon(reactor: Any, f: Callable[..., object], *args: Any) -> None:
    """``reactor.call_soon(f, *args)`` on a RelayReactor, else ``callLater(0, ...)``."""
    soon = getattr(reactor, "call_soon", None)
    if soon is not None:
        soon(f, *args)
    else:
        reactor.callLater(0, f, *args)
