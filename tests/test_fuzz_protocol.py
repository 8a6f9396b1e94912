"""Property tests of the inbound protocol and the DATA scanner (hypothesis).

(a) any bytes, cut anywhere, from any client: nothing raises or is logged as a
    failure, every reply is well formed, the buffers stay bounded, and a message
    is queued only after a 354 and a correct end, holding exactly the text a
    reference reading of the stream gives;
(b) a valid session cut at random points gives the same replies and the same
    spooled messages as the session sent whole;
(c) DataReader against a plain reference model, on adversarial input: same end,
    same leftover, same verdict, same stored bytes, and a buffer no longer than
    a line.
"""

from __future__ import annotations

import itertools
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from relaygw import replies
from relaygw.datareader import DataReader
from relaygw.smtpserver import MAX_COMMAND_LINE
from support import (
    HOSTNAME,
    QUEUED,
    TRUSTED_PEER,
    UNTRUSTED_PEER,
    FakeGateway,
    NoSyncOS,
    Session,
    logged_errors,
    make_gateway,
    malformed_replies,
)

FUZZ = settings(max_examples=200, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
MAX_SIZE = 5000
_RECEIVED = re.compile(rb"(?i)^received[ \t]*:")


@contextmanager
def fresh_gateway(**limits: int | str) -> Iterator[FakeGateway]:
    with tempfile.TemporaryDirectory() as directory:
        yield make_gateway(Path(directory), os_module=NoSyncOS(), **limits)


def cut(data: bytes, points: list[int]) -> list[bytes]:
    bounds = sorted({0, len(data), *(p % (len(data) + 1) for p in points)})
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


# --- a reference reading of DATA: slow, plain, obviously right ------------------------


def reference_data(stream: bytes, max_size: int, max_line: int = 1000
                   ) -> tuple[bytes, bool, bytes, int] | None:
    """For the bytes after a 354: (leftover, clean?, stored, Received: in headers),
    or None when the data never ends."""
    text = b"\r\n" + stream
    end = text.find(b"\r\n.\r\n")
    if end < 0:
        return None
    content = text[2:end + 2]
    leftover = text[end + 5:]
    lines = content.split(b"\r\n")[:-1] if content else []
    bare = any(b"\r" in line or b"\n" in line for line in lines)
    unstuffed = [line[1:] if line.startswith(b".") else line for line in lines]
    too_long = any(len(line) > max_line for line in unstuffed)
    stored = b"".join(line + b"\r\n" for line in unstuffed)
    clean = not bare and not too_long and len(stored) <= max_size
    received = 0
    for line in unstuffed:
        if line == b"":
            break
        received += bool(_RECEIVED.match(line))
    return leftover, clean, stored, received


def body_of(gateway: FakeGateway, queue_id: str) -> bytes:
    return gateway.body(queue_id)


# --- valid sessions ----------------------------------------------------------------------

body_lines = st.lists(st.one_of(
    st.sampled_from([b"", b".", b"..", b".x", b"Received: from a", b"Subject: s",
                     b"x" * 1000, b"\x00\xff", b" ", b"\t."]),
    st.binary(max_size=30).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))),
    max_size=12)
recipients = st.lists(st.sampled_from(["alice@example.test", "bob@example.test",
                                       "sales@example.test", "x@elsewhere.test",
                                       "x@reject.test", "bad"]), min_size=1, max_size=4)
transactions = st.tuples(body_lines, recipients, st.sampled_from([b"", b"RSET\r\n",
                                                                  b"NOOP\r\n"]))


def stuffed(lines: list[bytes]) -> bytes:
    return b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n"
                    for line in lines)


def accepted(rcpts: list[str]) -> bool:
    """Whether one of these recipients is accepted (from a trusted client)."""
    return any(r != "bad" and not r.endswith("reject.test") for r in rcpts)


def transaction_bytes(step: tuple[list[bytes], list[str], bytes]) -> bytes:
    """MAIL, the RCPTs, then DATA and the text if a recipient was accepted, else RSET."""
    lines, rcpts, extra = step
    out = [b"MAIL FROM:<s@client.test>\r\n"]
    out += [f"RCPT TO:<{rcpt}>\r\n".encode() for rcpt in rcpts]
    out.append(b"DATA\r\n" + stuffed(lines) + b".\r\n" if accepted(rcpts) else b"RSET\r\n")
    out.append(extra)
    return b"".join(out)


def session_bytes(steps: list[tuple[list[bytes], list[str], bytes]]) -> bytes:
    return (b"EHLO client.test\r\n" + b"".join(transaction_bytes(s) for s in steps)
            + b"QUIT\r\n")



# --- (a) anything at all ----------------------------------------------------------------

TOKENS = [
    b"EHLO c.test\r\n", b"HELO c.test\r\n", b"MAIL FROM:<s@c.test>\r\n", b"MAIL FROM:<>\r\n",
    b"MAIL FROM:<s@c.test> SIZE=99999999\r\n", b"RCPT TO:<alice@example.test>\r\n",
    b"RCPT TO:<x@elsewhere.test>\r\n", b"RCPT TO:<x@reject.test>\r\n",
    b"RCPT TO:<sales@example.test>\r\n", b"RCPT TO:<a@b@c>\r\n", b"DATA\r\n", b"data\r\n",
    b"RSET\r\n", b"NOOP\r\n", b"QUIT\r\n", b"ETRN example.test\r\n", b"TURN\r\n",
    b"VRFY x\r\n", b"HELP\r\n", b"STARTTLS\r\n", b"AUTH PLAIN\r\n",
    b"\r\n.\r\n", b".\r\n", b"..", b".", b"\r", b"\n", b"\r\n", b"\n.\n", b"\r.\r",
    b"x", b"Subject: s\r\n", b"Received: x\r\n", b"x" * 999, b"y" * 1001, b"\x00", b"\xff",
]
BARE = [b"\n.\n", b"\r\n.\n", b"\n.\r\n", b"\r.\r\n", b"\r\n.\r", b"\r.\r", b"a\nb",
        b"a\rb", b"\n\r\n.\r\n"]
OPEN = b"MAIL FROM:<s@c.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n"
streams = st.tuples(
    st.sampled_from([b"", b"EHLO c.test\r\n"]),
    st.lists(st.one_of(st.sampled_from(TOKENS), st.just(OPEN), st.just(b"text\r\n"),
                       st.binary(max_size=12), transactions.map(transaction_bytes),
                       st.sampled_from(BARE), st.just(b"\r\n.\r\n")),
             max_size=40),
).map(lambda parts: parts[0] + b"".join(parts[1]))


DATA_REFUSALS = (replies.BARE_NEWLINE_DATA, replies.DATA_LINE_TOO_LONG, replies.SIZE_EXCEEDED)


def reply_units(lines: list[str]) -> list[list[str]]:
    """Reply lines grouped into replies (a multi-line reply is one)."""
    units: list[list[str]] = []
    current: list[str] = []
    for line in lines:
        current.append(line)
        if line[3:4] != "-":
            units.append(current)
            current = []
    assert current == [], "an unfinished multi-line reply"
    return units


def check_framing(stream: bytes, lines: list[str], gateway: FakeGateway) -> list[str]:
    """Walk the stream the plain way and the replies along with it.

    A command is the bytes up to LF and gets exactly one reply; after a 354 the
    data runs to the first CRLF . CRLF (the reference reading) and gets one reply:
    250 with the reference's bytes stored when they are clean, else a refusal.
    221, or the 421 of too many errors, ends it all. Returns the queue ids met.
    """
    units = reply_units(lines)
    assert units[0] == [replies.banner(HOSTNAME)]
    remaining = units[1:]
    closed = [replies.too_many_errors(HOSTNAME)]
    queued: list[str] = []
    position = 0

    def pop() -> list[str]:
        assert remaining, f"no reply for the input at {position}"
        return remaining.pop(0)

    while remaining:
        line_end = stream.find(b"\n", position)
        if line_end < 0:  # an unfinished command: refused only once over-long
            if len(stream) - position > MAX_COMMAND_LINE + 2:
                assert pop() == [replies.COMMAND_TOO_LONG]
                if remaining and remaining[0] == closed:
                    pop()
            break
        position = line_end + 1
        unit = pop()
        if unit == [replies.START_DATA]:
            reference = reference_data(stream[position:], MAX_SIZE)
            if reference is None:
                break  # the data never ended
            leftover, clean, stored, received = reference
            position = len(stream) - len(leftover)
            unit = pop()
            if clean and received <= 50:
                match = QUEUED.match(unit[0])
                assert match and len(unit) == 1, unit
                queued.append(match.group(1))
                assert gateway.body(match.group(1)) == stored
            elif clean:
                assert unit == [replies.TOO_MANY_HOPS]
            else:
                assert len(unit) == 1 and unit[0] in DATA_REFUSALS, unit
        if unit == [replies.BYE]:
            break
        if remaining and remaining[0] == closed:
            pop()
            break
    assert remaining == [], "replies for input that was not there"
    return queued


@FUZZ
@given(stream=streams, points=st.lists(st.integers(min_value=0), max_size=12),
       trusted=st.booleans())
def test_any_input(stream: bytes, points: list[int], trusted: bool) -> None:
    with fresh_gateway(max_message_size=MAX_SIZE) as gateway, logged_errors() as errors:
        session = Session(gateway, TRUSTED_PEER if trusted else UNTRUSTED_PEER)
        for piece in cut(stream, points):
            session.protocol.dataReceived(piece)  # nothing may raise
            # (a closing session just stops reading: it keeps what it had)
            assert session.protocol.closing or \
                len(session.protocol._buffer) <= MAX_COMMAND_LINE + 2
            reader = session.protocol._reader
            assert reader is None or len(reader._buffer) <= 1003
        lines = session.all_lines()
        queued_ids = sorted(gateway.queued_ids())
        session.lose()
        assert [e for e in errors if "log_failure" in e] == []

        assert malformed_replies(lines) == []
        queued = check_framing(stream, lines, gateway)
        event(f"{min(len(queued), 2)} queued")
        assert sorted(queued) == queued_ids
        assert [e.id for e in gateway.accepted_envelopes] == queued
        assert all(gateway.envelope(queue_id).recipients for queue_id in queued)
        assert not [name for name in gateway.files() if name.startswith("tmp-")]


# --- (b) a valid session, cut anywhere -------------------------------------------------

def play(pieces: list[bytes]) -> tuple[list[str], list[bytes]]:
    with fresh_gateway(max_message_size=100_000) as gateway, logged_errors() as errors:
        session = Session(gateway)
        session.send_pieces(pieces)
        assert session.closed
        assert [e for e in errors if "log_failure" in e] == []
        lines = [QUEUED.sub("250 2.0.0 Ok: queued as ID", line)
                 for line in session.all_lines()]
        bodies = [body_of(gateway, e.id) for e in gateway.accepted_envelopes]
        return lines, bodies


@FUZZ
@given(steps=st.lists(transactions, min_size=1, max_size=4),
       points=st.lists(st.integers(min_value=0), min_size=1, max_size=20))
def test_valid_session_cut_anywhere(steps: list[tuple[list[bytes], list[str], bytes]],
                                    points: list[int]) -> None:
    data = session_bytes(steps)
    whole = play([data])
    split = play(cut(data, points))
    assert split == whole
    lines, bodies = whole
    assert lines[-1] == replies.BYE
    assert malformed_replies(lines) == []
    sent = [b"".join(line + b"\r\n" for line in body) for body, rcpts, _ in steps
            if accepted(rcpts)]
    assert bodies == sent


@settings(FUZZ, max_examples=50)  # one dataReceived per byte: fewer, smaller sessions
@given(steps=st.lists(transactions, min_size=1, max_size=2))
def test_valid_session_byte_by_byte(steps: list[tuple[list[bytes], list[str], bytes]]) -> None:
    data = session_bytes(steps)
    assert play([data[i:i + 1] for i in range(len(data))]) == play([data])


# --- (c) DataReader against the reference -------------------------------------------------

chunks = st.tuples(st.lists(st.one_of(
    st.sampled_from([b"\r", b"\n", b".", b"\r\n", b"\r\n.", b".\r\n", b"\r\n.\r\n", b"..",
                     b"x" * 7, b"x" * 20, b"x" * 999, b"y" * 1001, b"Received: a\r\n"]),
    st.sampled_from([b"line\r\n", b"..x\r\n", b"\r\n", b"Received: b\r\n", b"x"]),
    st.sampled_from(BARE), st.binary(max_size=40)), max_size=50),
    st.sampled_from([[], [b"\r\n.\r\n"], [b".\r\n"], [b"\r\n.\r\nMAIL\r\n"]]),
).map(lambda parts: parts[0] + parts[1])


@FUZZ
@given(tokens=chunks, points=st.none() | st.lists(st.integers(min_value=0), max_size=10),
       max_line=st.sampled_from([5, 20, 1000]), max_size=st.sampled_from([10, 100, 100_000]))
def test_datareader_matches_the_reference(tokens: list[bytes], points: list[int] | None,
                                          max_line: int, max_size: int) -> None:
    """Fed token by token, or the same bytes cut elsewhere."""
    pieces = tokens if points is None else cut(b"".join(tokens), points)
    stored: list[bytes] = []
    reader = DataReader(stored.append, max_size, max_line)
    leftover = None
    for index, piece in enumerate(pieces):
        leftover = reader.feed(piece)
        assert len(reader._buffer) <= max_line + 3
        if leftover is not None:
            leftover += b"".join(pieces[index + 1:])
            break
    reference = reference_data(b"".join(pieces), max_size, max_line)
    event("unfinished" if reference is None else
          f"finished, {'clean' if reference[1] else 'refused'}")
    if reference is None:
        assert leftover is None and not reader.finished
        return
    expected_leftover, clean, expected, received = reference
    assert leftover == expected_leftover
    assert (reader.error is None) == clean, reader.error
    if clean:
        assert b"".join(stored) == expected
        assert reader.size == len(expected)
        assert reader.received_headers == received


@FUZZ
@given(pieces=st.lists(st.sampled_from([b"\r", b"\n", b".", b"x", b"x" * 333, b"\r\n",
                                        b"\n\r", b"x" * 1200]), max_size=200))
def test_datareader_buffer_stays_bounded(pieces: list[bytes]) -> None:
    reader = DataReader(lambda block: None, 10_000_000)
    for piece in pieces:
        if reader.feed(piece) is not None:
            break
        assert len(reader._buffer) <= 1003
