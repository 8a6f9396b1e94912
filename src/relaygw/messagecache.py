"""The bodies of recently committed small messages, kept in memory for relaying.

A message under the spool's write buffer (64 KiB) is whole in memory when it
is committed. Keeping it until its first attempt spares the reactor thread a
stat, an open, a read and a close of the file it has just written. The cache
is bounded by bytes (oldest out first), and a message leaves it when it is
removed or deferred: a deferred message's next attempt is minutes away, and
the cache is for the common case, a message relayed at once.

The disk stays the truth: a message is only cached after its commit, and
what is cached is exactly the message part of its queue file, which is never
rewritten (envelope rewrites go to ``ID.env``).
"""

from __future__ import annotations

import io
from collections import OrderedDict

DEFAULT_LIMIT = 16 * 1024 * 1024  # bytes of message text held at most


class WireReady(io.BytesIO):
    """A cached message known to be CRLF-only with no line starting with a dot:
    the DATA reader accepted it and saw no leading dot (``DataReader.dotted``),
    and the ``Received:`` line put before it was checked for the same
    (``wire_clean``). It goes out as it is, without the
    dot-stuffing scan (``MessageProducer``)."""


def wire_clean(text: bytes) -> bool:
    """CRLF line ends only and no line starting with a dot: the promise of
    ``WireReady``, checked on text put before the DATA (which the reader checks)."""
    inside = b"".join(text.split(b"\r\n"))
    return (b"\r" not in inside and b"\n" not in inside
            and not text.startswith(b".") and b"\n." not in text)


class MessageCache:
    def __init__(self, limit: int = DEFAULT_LIMIT) -> None:
        self.limit = limit
        self.size = 0  # bytes held
        self._messages: OrderedDict[str, bytes] = OrderedDict()
        self._wire_ready: set[str] = set()

    def __len__(self) -> int:
        return len(self._messages)

    def put(self, queue_id: str, message: bytes, wire_ready: bool = False) -> None:
        """Keep ``message``, dropping the oldest entries to stay under the limit;
        ``wire_ready``: see ``WireReady`` (only the DATA reader can say so)."""
        self.discard(queue_id)  # first: a message put again never keeps an old word
        if len(message) > self.limit:
            return
        self._messages[queue_id] = message
        if wire_ready:
            self._wire_ready.add(queue_id)
        self.size += len(message)
        while self.size > self.limit:
            dropped_id, dropped = self._messages.popitem(last=False)
            self._wire_ready.discard(dropped_id)
            self.size -= len(dropped)

    def get(self, queue_id: str) -> bytes | None:
        return self._messages.get(queue_id)

    def open(self, queue_id: str) -> io.BytesIO | None:
        """The cached message as a file to read, or None when it is not cached."""
        message = self._messages.get(queue_id)
        if message is None:
            return None
        return WireReady(message) if queue_id in self._wire_ready else io.BytesIO(message)

    def discard(self, queue_id: str) -> None:
        message = self._messages.pop(queue_id, None)
        if message is not None:
            self.size -= len(message)
            self._wire_ready.discard(queue_id)
