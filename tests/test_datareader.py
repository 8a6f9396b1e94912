"""DataReader, the DATA phase scanner: end detection wherever the input is cut,
unstuffing, the Received: count, the size and line limits, bare CR and LF."""

from __future__ import annotations

import itertools
import random
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relaygw.datareader import DataError, DataReader
from relaygw.delivery.smtpclient import DotStuffer

MAX_LINE = 1000


class Sink:
    def __init__(self, fail_after: int | None = None) -> None:
        self.blocks: list[bytes] = []
        self.fail_after = fail_after

    def __call__(self, block: bytes) -> None:
        if self.fail_after is not None and len(self.blocks) >= self.fail_after:
            raise OSError(28, "No space left on device")
        self.blocks.append(block)

    @property
    def data(self) -> bytes:
        return b"".join(self.blocks)


def run(pieces: list[bytes], max_size: int = 1_000_000,
        max_line: int = MAX_LINE) -> tuple[DataReader, bytes, bytes | None]:
    """Feed pieces until the end; return the reader, what it stored, and the leftover
    (what followed the end, joined with the pieces not fed), or None if unfinished."""
    sink = Sink()
    reader = DataReader(sink, max_size, max_line)
    for index, piece in enumerate(pieces):
        leftover = reader.feed(piece)
        if leftover is not None:
            assert reader.finished
            return reader, sink.data, leftover + b"".join(pieces[index + 1:])
        assert not reader.finished
    return reader, sink.data, None


def splits(data: bytes, rng: random.Random, count: int) -> list[list[bytes]]:
    result = []
    for _ in range(count):
        cuts = sorted(rng.sample(range(1, len(data)), rng.randint(1, min(8, len(data) - 1))))
        bounds = [0, *cuts, len(data)]
        result.append([data[a:b] for a, b in itertools.pairwise(bounds)])
    return result


MESSAGE = (b"Received: from a.test by b.test; date\r\n"
           b"Subject: end detection\r\n"
           b"\r\n"
           b"line\r\n"
           b"..stuffed\r\n"
           b"\r\n"
           b".\x00not the end\r\n"
           b"last\r\n")
STORED = (b"Received: from a.test by b.test; date\r\n"
          b"Subject: end detection\r\n"
          b"\r\n"
          b"line\r\n"
          b".stuffed\r\n"
          b"\r\n"
          b"\x00not the end\r\n"
          b"last\r\n")
AFTER = b"MAIL FROM:<next@client.test>\r\nRCPT TO:<x@y.test>\r\n"
STREAM = MESSAGE + b".\r\n" + AFTER


def test_whole() -> None:
    reader, stored, leftover = run([STREAM])
    assert (stored, leftover, reader.error) == (STORED, AFTER, None)
    assert reader.size == len(STORED)
    assert reader.received_headers == 1


@pytest.mark.parametrize("cut", range(1, len(STREAM)))
def test_every_split_point(cut: int) -> None:
    reader, stored, leftover = run([STREAM[:cut], STREAM[cut:]])
    assert (stored, leftover, reader.error) == (STORED, AFTER, None)
    assert reader.received_headers == 1


def test_one_byte_at_a_time() -> None:
    reader, stored, leftover = run([STREAM[i:i + 1] for i in range(len(STREAM))])
    assert (stored, leftover, reader.error) == (STORED, AFTER, None)
    assert reader.received_headers == 1


def test_random_splits() -> None:
    rng = random.Random(2525)
    for pieces in splits(STREAM, rng, 500):
        reader, stored, leftover = run(pieces)
        assert (stored, leftover, reader.error) == (STORED, AFTER, None), pieces


def test_nothing_after_the_end() -> None:
    _, stored, leftover = run([MESSAGE + b".\r\n"])
    assert (stored, leftover) == (STORED, b"")


def test_unfinished() -> None:
    reader, stored, leftover = run([MESSAGE + b".\r"])
    assert leftover is None
    assert not reader.finished
    assert stored == STORED
    assert reader.feed(b"\n") == b""
    assert reader.finished


@pytest.mark.parametrize("pieces", [[b".\r\n"], [b".", b"\r", b"\n"], [b".\r", b"\n"]],
                         ids=["whole", "bytewise", "CR then LF"])
def test_empty_message(pieces: list[bytes]) -> None:
    reader, stored, leftover = run([*pieces, b"QUIT\r\n"])
    assert (stored, leftover, reader.error, reader.size) == (b"", b"QUIT\r\n", None, 0)


def test_empty_line_only() -> None:
    reader, stored, leftover = run([b"\r\n.\r\n"])
    assert (stored, leftover, reader.error) == (b"\r\n", b"", None)


def test_leftover_may_be_a_whole_pipelined_session() -> None:
    after = b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\nx\r\n.\r\nQUIT\r\n"
    _, stored, leftover = run([b"first\r\n.\r\n" + after])
    assert (stored, leftover) == (b"first\r\n", after)


@pytest.mark.parametrize(("sent", "stored"), [
    (b"..\r\n", b".\r\n"),
    (b"...\r\n", b"..\r\n"),
    (b"..x\r\n", b".x\r\n"),
    (b".x\r\n", b"x\r\n"),  # a dot that was not doubled: taken as stuffing all the same
    (b"x.\r\nx..\r\n", b"x.\r\nx..\r\n"),
    (b"a\r\n..\r\nb\r\n", b"a\r\n.\r\nb\r\n"),
    (b". .\r\n", b" .\r\n"),
], ids=["dot", "two dots", "dot x", "single dot x", "dots at line end", "middle", "space"])
def test_unstuffing(sent: bytes, stored: bytes) -> None:
    for pieces in ([sent + b".\r\n"], [bytes([b]) for b in sent + b".\r\n"]):
        reader, got, leftover = run(pieces)
        assert (got, leftover, reader.error) == (stored, b"", None)


@pytest.mark.parametrize(("message", "count"), [
    (b"Received: a\r\nReceived: b\r\nSubject: x\r\n\r\nbody\r\n", 2),
    (b"received: a\r\nRECEIVED : b\r\nReceived:\tc\r\n\r\n", 3),
    (b"Subject: x\r\n\r\nReceived: in the body\r\nReceived: again\r\n", 0),
    (b"\r\nReceived: no headers at all\r\n", 0),
    (b"X-Received: a\r\nDKIM-Received: b\r\nReceived-SPF: pass\r\n\r\n", 0),
    (b"Subject: Received: not at the start\r\n\r\n", 0),
    (b"Received: a\r\n  Received: folded, not a header\r\n\r\n", 1),
    (b"Received: only headers, no body\r\n", 1),
    (b"Subject: x\r\nreceived: a\r\nX-Received: b\r\nReceived:c\r\n\r\n", 2),
], ids=["two", "any case", "body", "no headers", "other names", "inside a value",
        "continuation", "no blank line", "not first"])
def test_received_headers_are_counted_in_the_header_section_only(message: bytes,
                                                                count: int) -> None:
    data = message + b".\r\n"
    first_line = data.index(b"\n") + 1  # the next block starts with a header
    for pieces in ([data], [bytes([b]) for b in data], [data[:7], data[7:]],
                   [data[:first_line], data[first_line:]]):
        reader, stored, _ = run(pieces)
        assert reader.received_headers == count
        assert stored == message


def test_received_count_across_many_blocks() -> None:
    sink = Sink()
    reader = DataReader(sink, 10_000_000)
    for index in range(60):
        reader.feed(b"Received: from hop%d\r\n" % index)
    reader.feed(b"\r\n")
    for _ in range(10):
        reader.feed(b"Received: body\r\n")
    assert reader.feed(b".\r\n") == b""
    assert reader.received_headers == 60


@pytest.mark.parametrize(("size", "error"), [(99, None), (100, None), (101, DataError.TOO_BIG)])
def test_size_limit(size: int, error: DataError | None) -> None:
    message = b"x" * (size - 2) + b"\r\n"
    reader, stored, leftover = run([message + b".\r\nNEXT\r\n"], max_size=100)
    assert reader.error is error
    assert leftover == b"NEXT\r\n"
    assert stored == (message if error is None else b"")


def test_size_counts_unstuffed_octets() -> None:
    message = b"." * 101 + b"\r\n"  # 103 octets sent, 102 stored
    reader, stored, _ = run([message + b".\r\n"], max_size=102)
    assert (reader.error, stored) == (None, message[1:])


def test_too_big_stops_storing_and_still_finds_the_end() -> None:
    sink = Sink()
    reader = DataReader(sink, 1000)
    for _ in range(100):
        assert reader.feed(b"x" * 98 + b"\r\n") is None
    assert reader.error is DataError.TOO_BIG
    assert len(sink.data) <= 1000
    assert reader.feed(b".\r\nQUIT\r\n") == b"QUIT\r\n"


@pytest.mark.parametrize(("line", "error"), [
    (b"x" * 999, None),
    (b"x" * 1000, None),
    (b"." + b"x" * 1000, None),
    (b"x" * 1001, DataError.LINE_TOO_LONG),
    (b".." + b"x" * 1000, DataError.LINE_TOO_LONG),
    (b"x" * 1002, DataError.LINE_TOO_LONG),
    (b"x" * 100_000, DataError.LINE_TOO_LONG),
], ids=["999", "1000", "1000 stuffed", "1001", "1001 stuffed", "1002", "100000"])
def test_line_limit(line: bytes, error: DataError | None) -> None:
    data = b"a\r\n" + line + b"\r\nb\r\n.\r\nNEXT\r\n"
    for pieces in ([data], [data[i:i + 7] for i in range(0, len(data), 7)],
                   [data[:500], data[500:]]):
        reader, stored, leftover = run(pieces)
        assert reader.error is error
        assert leftover == b"NEXT\r\n"
        if error is None:
            assert stored == b"a\r\n" + line.removeprefix(b".") + b"\r\nb\r\n"


def test_line_limit_is_a_parameter() -> None:
    reader, _, _ = run([b"x" * 11 + b"\r\n.\r\n"], max_line=10)
    assert reader.error is DataError.LINE_TOO_LONG
    reader, stored, _ = run([b"x" * 10 + b"\r\n.\r\n"], max_line=10)
    assert (reader.error, stored) == (None, b"x" * 10 + b"\r\n")


@pytest.mark.parametrize("piece", [1, 3, 500, 1003, 1004, 4096, 65536])
def test_no_line_end_keeps_the_buffer_bounded(piece: int) -> None:
    sink = Sink()
    reader = DataReader(sink, 10_000_000)
    total = 300_000 if piece >= 500 else 20_000
    for _ in range(max(1, total // piece)):
        assert reader.feed(b"y" * piece) is None
        assert len(reader._buffer) <= MAX_LINE + 3
    assert reader.error is DataError.LINE_TOO_LONG
    assert sink.data == b""
    assert reader.feed(b"\r\n.\r\nNEXT") == b"NEXT"


def test_bounded_buffer_keeps_a_trailing_cr() -> None:
    """A CR at the cut can still pair with the LF that comes next: the end is found."""
    sink = Sink()
    reader = DataReader(sink, 10_000_000)
    assert reader.feed(b"z" * 5000 + b"\r") is None
    assert len(reader._buffer) <= MAX_LINE + 3
    assert reader.feed(b"\n.\r\nNEXT") == b"NEXT"
    assert reader.error is DataError.LINE_TOO_LONG


def test_long_tail_after_complete_lines_is_bounded() -> None:
    sink = Sink()
    reader = DataReader(sink, 10_000_000)
    assert reader.feed(b"ok\r\n" + b"w" * 50_000) is None
    assert len(reader._buffer) <= MAX_LINE + 3
    assert sink.data == b"ok\r\n"
    assert reader.error is DataError.LINE_TOO_LONG


# The fake end, and whether a CRLF . CRLF follows to really end the data.
BARE: dict[str, bytes] = {
    "LF . LF": b"a\n.\nb",
    "CRLF . LF": b"a\r\n.\nb",
    "LF . CRLF": b"a\n.\r\nb",
    "CR . CRLF": b"a\r.\r\nb",
    "CRLF . CR": b"a\r\n.\rb",
    "CR . CR": b"a\r.\rb",
    "CR . LF": b"a\r.\nb",
    "LF . CR": b"a\n.\rb",
    "CR LF CR": b"a\r\n\rb",
    "bare LF": b"a\nb",
    "bare CR": b"a\rb",
    "CR CR LF": b"a\r\r\nb",
    "LF at start": b"\n.\r\nb",
    "CR at start": b"\r.\r\nb",
    ". LF at start": b".\nb",
    ". CR at start": b".\rb",
    ". CR CR LF at start": b".\r\r\nb",
    "LF LF": b"a\n\nb",
}


@pytest.mark.parametrize("data", list(BARE.values()), ids=list(BARE))
def test_bare_cr_or_lf_never_ends_the_data_and_taints_it(data: bytes) -> None:
    stream = data + b"\r\n.\r\nNEXT\r\n"
    for pieces in ([stream], [bytes([b]) for b in stream],
                   *splits(stream, random.Random(len(data)), 20)):
        reader, _, leftover = run(pieces)
        assert leftover == b"NEXT\r\n", pieces
        assert reader.error is DataError.BARE_NEWLINE, pieces


@pytest.mark.parametrize("data", list(BARE.values()), ids=list(BARE))
def test_bare_cr_or_lf_alone_never_ends_the_data(data: bytes) -> None:
    reader, _, leftover = run([data + b"\r\n"])
    assert leftover is None
    assert not reader.finished


def test_the_real_end_right_after_a_bare_lf_still_ends() -> None:
    reader, _, leftover = run([b"a\n\r\n.\r\nNEXT"])
    assert (leftover, reader.error) == (b"NEXT", DataError.BARE_NEWLINE)


def test_nothing_is_stored_after_a_taint() -> None:
    sink = Sink()
    reader = DataReader(sink, 1_000_000)
    reader.feed(b"good\r\n")
    reader.feed(b"bad\n")
    reader.feed(b"good again\r\n")
    assert reader.feed(b".\r\n") == b""
    assert sink.data == b"good\r\n"
    assert reader.error is DataError.BARE_NEWLINE


def test_first_error_wins() -> None:
    reader, _, _ = run([b"a\nb\r\n", b"x" * 2000 + b"\r\n.\r\n"])
    assert reader.error is DataError.BARE_NEWLINE
    reader, _, _ = run([b"x" * 2000 + b"\r\n", b"a\nb\r\n.\r\n"])
    assert reader.error is DataError.LINE_TOO_LONG


def test_write_failure_is_kept_and_scanning_goes_on() -> None:
    sink = Sink(fail_after=1)
    reader = DataReader(sink, 1_000_000)
    reader.feed(b"one\r\n")
    reader.feed(b"two\r\n")
    reader.feed(b"three\r\n")
    assert reader.feed(b".\r\nNEXT") == b"NEXT"
    assert reader.error is DataError.WRITE_FAILED
    assert isinstance(reader.write_error, OSError)
    assert reader.write_error.errno == 28
    assert sink.data == b"one\r\n"


# --- against a line-by-line reference ------------------------------------------------

REFERENCE_RECEIVED = re.compile(rb"(?i)received[ \t]*:")


def reference(stream: bytes, max_line: int) -> tuple[bool, bytes | None, bool, bytes, int]:
    """What DATA means, line by line, the slow and obvious way: (finished, what
    followed the end, any error, the message unstuffed, its Received: headers)."""
    end = (b"\r\n" + stream).find(b"\r\n.\r\n")
    data = stream if end < 0 else stream[:end]
    error = False
    lines = data.split(b"\r\n")
    if lines and lines[-1] == b"":
        lines.pop()
    elif lines:
        error = True  # unfinished: the last line has no CRLF yet (bare or cut)
    unstuffed = []
    for line in lines:
        if b"\r" in line or b"\n" in line:
            error = True
        if line.startswith(b"."):
            line = line[1:]
        if len(line) > max_line:
            error = True
        unstuffed.append(line)
    received = 0
    for line in unstuffed:
        if line == b"":
            break
        received += bool(REFERENCE_RECEIVED.match(line))
    stored = b"".join(line + b"\r\n" for line in unstuffed)
    return end >= 0, None if end < 0 else stream[end + 3:], error, stored, received


PARTS = [b"a", b"Received: x", b"b" * 13, b".", b"..", b"\r", b"\n", b"\r\n", b"\r\n.",
         b"\r\n.\r\n", b"\r\n\r\n", b"\x00"]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(PARTS), max_size=40), st.data())
def test_block_scanning_agrees_with_a_line_by_line_reading(parts: list[bytes],
                                                           data: st.DataObject) -> None:
    """Whatever the bytes and wherever the network cuts them, the bulk scanner ends
    where the line-by-line reading ends, flags an error exactly when some line is
    bare or too long, and stores the same unstuffed message with the same count.
    (Which error comes first may depend on the cuts: only its presence is compared.)"""
    stream = b"".join(parts) + b"\r\n.\r\nQUIT\r\n"
    cuts = sorted(data.draw(st.sets(st.integers(1, len(stream) - 1), max_size=6)))
    pieces = [stream[a:b] for a, b in itertools.pairwise([0, *cuts, len(stream)])]
    max_line = 12
    reader, stored, leftover = run(pieces, max_line=max_line)
    finished, after, error, expected, received = reference(stream, max_line)
    assert (reader.finished, leftover) == (finished, after)
    assert (reader.error is not None) == error
    if not error:
        assert stored == expected
        assert reader.received_headers == received


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(PARTS), max_size=40), st.data())
def test_dotted_says_whether_the_message_needs_stuffing_to_be_relayed(
        parts: list[bytes], data: st.DataObject) -> None:
    """For accepted DATA, ``dotted`` is True exactly when some line started with a
    dot; when it is False the stored message, sent as it is, is exactly what
    dot-stuffing would send (what lets a cached message skip it: WireReady)."""
    stream = b"".join(parts) + b"\r\n.\r\nQUIT\r\n"
    cuts = sorted(data.draw(st.sets(st.integers(1, len(stream) - 1), max_size=6)))
    pieces = [stream[a:b] for a, b in itertools.pairwise([0, *cuts, len(stream)])]
    reader, stored, _ = run(pieces, max_line=12)
    finished, _, error, _, _ = reference(stream, 12)
    if not finished or error:
        return  # refused: never queued, never relayed
    end = (b"\r\n" + stream).find(b"\r\n.\r\n")
    raw_lines = stream[:end].split(b"\r\n")[:-1]
    assert reader.dotted == any(line.startswith(b".") for line in raw_lines)
    if not reader.dotted:
        stuffer = DotStuffer()
        assert stuffer.encode(stored) + stuffer.finish() == stored + b".\r\n"
