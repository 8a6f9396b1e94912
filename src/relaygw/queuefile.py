"""One queue file, ``ID.q``, as it is on disk; and the queue ids that name them.

A queue file is the message as received (CRLF, not dot-stuffed, Received:
first), then the envelope as committed (JSON, relaygw.envelope), then a
fixed-size footer giving the JSON's length: ``tail -c 4096 ID.q`` shows the
envelope, and the message is the first ``size`` bytes (the envelope's
``size``). Why the envelope rides in the message file, and how the spool
commits, reads and removes these files: relaygw.spool. This module is the
format alone: writing the footer, reading the trailer back, reading the
message part, parsing the envelope.
"""

from __future__ import annotations

import itertools
import os
import random
import time
from pathlib import Path

from relaygw.envelope import Envelope

TRAILER_READ = 4096  # bytes read from a queue file's end: most envelopes fit
RawRecord = tuple[str, bytes | None, str | None]  # (queue id, raw envelope, problem)
_ids = itertools.count()
_random = random.Random()  # uniqueness, not secrecy: no syscall per id


def new_queue_id() -> str:
    """Unique, sortable by arrival, safe as a file name: 13 hex digits of
    microseconds, then a counter and randomness against collisions across
    restarts and instances sharing nothing."""
    micros = time.time_ns() // 1000
    return f"{micros:013X}{next(_ids) % 4096:03X}{_random.getrandbits(12):03X}"


def is_queue_id(text: str) -> bool:
    """Whether ``text`` is an id ``new_queue_id`` makes (what relaygwctl accepts)."""
    return len(text) == 19 and all(c in "0123456789ABCDEF" for c in text)


def parse_records(records: list[RawRecord]) -> tuple[list[Envelope], list[tuple[str, str]]]:
    """The envelopes of ``read_raw_entries`` records, and the damaged ones as
    (id, problem): a trailer that was not there, or JSON that is no envelope."""
    envelopes = []
    damaged = []
    for queue_id, raw, problem in records:
        if raw is not None:
            try:
                envelopes.append(parse_envelope(raw))
                continue
            except ValueError as e:
                problem = str(e)
        damaged.append((queue_id, problem or "unreadable"))
    return envelopes, damaged


def parse_envelope(raw: bytes) -> Envelope:
    """An envelope from its JSON; ValueError for anything that is not a valid one."""
    try:
        return Envelope.from_bytes(raw)
    except (TypeError, KeyError, AttributeError) as e:
        raise ValueError(f"malformed envelope: {type(e).__name__}: {e}") from None


FOOTER_PREFIX = b"\nrelaygw-envelope "
FOOTER_FORMAT = "\nrelaygw-envelope {:010d}\n"
FOOTER_SIZE = len(FOOTER_FORMAT.format(0))


def trailer_footer(envelope_length: int) -> bytes:
    """The fixed-size last line of a queue file: how long the envelope before it is."""
    return FOOTER_FORMAT.format(envelope_length).encode("ascii")


def read_trailer(fd: int) -> bytes:
    """The committed envelope's JSON from the end of an open queue file.

    One fstat, then one pread of the file's last ``TRAILER_READ`` bytes, which
    holds most envelopes whole (start-up reads every entry). ValueError if
    the file does not end in a well-formed trailer (damage, or a bare
    message): the caller quarantines it."""
    end = os.fstat(fd).st_size
    tail = os.pread(fd, min(end, TRAILER_READ), end - min(end, TRAILER_READ))
    if end < FOOTER_SIZE:
        raise ValueError("queue file too short for an envelope trailer")
    footer = tail[-FOOTER_SIZE:]
    digits = footer[len(FOOTER_PREFIX):-1]  # ten of them when the footer is well formed
    if not (footer.startswith(FOOTER_PREFIX) and footer.endswith(b"\n")
            and digits.isdigit()):
        raise ValueError("no envelope trailer at the end of the queue file")
    length = int(digits)
    if length > end - FOOTER_SIZE:
        raise ValueError("envelope trailer longer than the queue file")
    if length + FOOTER_SIZE <= len(tail):
        return tail[len(tail) - FOOTER_SIZE - length:len(tail) - FOOTER_SIZE]
    return os.pread(fd, length, end - FOOTER_SIZE - length)


class MessageFile:
    """A queue file opened for its message only: reads stop at ``size`` bytes,
    where the envelope trailer begins. A context manager, like a file."""

    def __init__(self, path: Path, size: int) -> None:
        # Unbuffered: reads are already big, and a buffered open costs an isatty
        # ioctl and an lseek per message.
        self._file = open(path, "rb", buffering=0)  # closed by close() or __exit__
        self._left = size

    def read(self, n: int = -1) -> bytes:
        if n < 0 or n > self._left:
            n = self._left
        if n == 0:
            return b""
        data = self._file.read(n)
        self._left -= len(data)
        return data

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> MessageFile:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
