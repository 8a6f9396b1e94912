"""The DATA phase as a pure, bulk byte scanner (no I/O, no reactor).

Input arrives in arbitrary pieces. Complete lines are processed a block at a
time with bytes methods that run in C (find, count, replace), never one
Python call per line:

- the data ends only at ``CRLF . CRLF`` (or ``. CRLF`` as the very first
  line). Every smuggling variant (``LF . LF``, ``CR LF . LF``, ``LF . CR LF``,
  ``CR . CR LF``...) is just data; and any bare CR or LF taints the message,
  which is refused after the real end (RFC 5321 section 2.3.8, the 2023 SMTP
  smuggling attacks);
- dot-stuffing is undone (RFC 5321 section 4.5.2);
- a line over ``max_line`` octets (not counting CRLF and a stuffing dot) or a
  total over ``max_size`` taints the message; from then on bytes are only
  scanned for the end, not kept;
- ``Received:`` headers are counted for the hop limit;
- a client that never sends a line end cannot grow the buffer past one line.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from enum import Enum

# A Received: header at the start of a block, then after a line end. Not one
# "(?im)^received" search: a pattern that starts with a literal LF is searched
# for with memchr, many times faster than trying "^" at every byte.
_RECEIVED_FIRST = re.compile(rb"(?i)received[ \t]*:")
_RECEIVED_NEXT = re.compile(rb"(?i)\nreceived[ \t]*:")
# Literal searches as regexes: re finds a literal by its first byte (memchr) and
# checks the rest, which beats ``bytes.find`` for these short patterns in text
# with a line end every few dozen bytes (measured on 4 KiB: 1.7 against 2.4 us
# for the end, 2.2 against 4.3 us for a line-leading dot).
_END = re.compile(rb"\r\n\.\r\n")
_LINE_DOT = re.compile(rb"\n\.")


class DataError(Enum):
    BARE_NEWLINE = "bare CR or LF"
    LINE_TOO_LONG = "line too long"
    TOO_BIG = "message too big"
    WRITE_FAILED = "write failed"


class DataReader:
    def __init__(self, sink: Callable[[bytes], None], max_size: int, max_line: int = 1000) -> None:
        self.sink = sink
        self.max_size = max_size
        self.max_line = max_line
        self.size = 0
        self.received_headers = 0
        self.error: DataError | None = None
        self.write_error: OSError | None = None
        self.finished = False
        # Whether any line of the DATA started with a dot. When none did (and the
        # DATA was accepted: CRLF only), the message needs no dot-stuffing to be
        # relayed (``relaygw.messagecache.WireReady``).
        self.dotted = False
        self._buffer = bytearray()
        self._line_start_after_crlf = True  # the first line follows the 354's CRLF
        self._midline = False  # the buffer's head is the rest of an over-long line
        self._in_headers = True

    def taint(self, error: DataError) -> None:
        if self.error is None:
            self.error = error

    def feed(self, data: bytes) -> bytes | None:
        """Take more bytes; once the end is seen, return what followed it (else None)."""
        self._buffer += data
        last_lf = self._buffer.rfind(b"\n")
        if last_lf < 0:
            if len(self._buffer) > self.max_line + 3:
                self.taint(DataError.LINE_TOO_LONG)
                del self._buffer[:-1]  # keep a trailing CR: it may pair with the next LF
                self._midline = True
            return None
        block = bytes(self._buffer[: last_lf + 1])
        rest = bytes(self._buffer[last_lf + 1:])
        end = self._find_end(block)
        if end is None:
            self._buffer = bytearray(rest)
            self._consume(block)
            if len(self._buffer) > self.max_line + 3:
                return self.feed(b"")
            return None
        self._consume(block[:end])
        self.finished = True
        self._buffer = bytearray()
        return block[end + 3:] + rest

    def _find_end(self, block: bytes) -> int | None:
        """Index of the terminating ``.CRLF`` line in ``block``, which starts a line."""
        if b"." not in block:  # one memchr pass rules out most blocks of a big message
            return None
        if not self._midline and self._line_start_after_crlf and block.startswith(b".\r\n"):
            return 0
        found = _END.search(block)
        return None if found is None else found.start() + 2

    def _consume(self, block: bytes) -> None:
        """Check and pass on whole lines; ``block`` ends with LF (or is empty).

        About 4 passes over the bytes, each in C: the split at CRLF, the join of
        its pieces (a copy), and memchr scans; the costlier searches (``\n.``,
        an exact line length) only where a dot, or a long line, shows they are
        needed. Counting CR, LF and CRLF instead cost twice as much."""
        if not block:
            return
        first_is_line_start = not self._midline
        self._midline = False
        self._line_start_after_crlf = block.endswith(b"\r\n")
        if self.error is not None:
            return
        lines = block.split(b"\r\n")  # the last piece is empty: the block ends with LF
        inside = b"".join(lines)
        if b"\n" in inside or b"\r" in inside:  # a CR or LF that is not half of a CRLF
            self.taint(DataError.BARE_NEWLINE)
            return
        if b"." in block:
            if _LINE_DOT.search(block) is not None:
                self.dotted = True
                block = block.replace(b"\n.", b"\n")
            if first_is_line_start and block.startswith(b"."):
                self.dotted = True
                block = block[1:]
        # Raw lengths first; a stuffing dot may make a line one longer than it is,
        # so over the limit, measure unstuffed: each piece is a line's text and its CR.
        if max(map(len, lines)) > self.max_line and \
                max(map(len, block.split(b"\n"))) > self.max_line + 1:
            self.taint(DataError.LINE_TOO_LONG)
            return
        if self._in_headers:
            self._count_headers(block)
        self.size += len(block)
        if self.size > self.max_size:
            self.taint(DataError.TOO_BIG)
            return
        try:
            self.sink(block)
        except OSError as e:
            self.write_error = e
            self.taint(DataError.WRITE_FAILED)

    def _count_headers(self, block: bytes) -> None:
        if block.startswith(b"\r\n"):
            self._in_headers = False
            return
        end = block.find(b"\n\r\n")
        headers = block if end < 0 else block[: end + 1]
        if end >= 0:
            self._in_headers = False
        self.received_headers += len(_RECEIVED_NEXT.findall(headers))
        if _RECEIVED_FIRST.match(headers):
            self.received_headers += 1
