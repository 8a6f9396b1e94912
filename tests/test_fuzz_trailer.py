"""Fuzzing the queue file's trailer parser: whatever a damaged or foreign file ends
with, start-up gets the committed envelope back or a ValueError (quarantine),
never another exception and never a wrong envelope."""

from __future__ import annotations

import tempfile

from hypothesis import given, settings
from hypothesis import strategies as st

from relaygw.queuefile import FOOTER_SIZE, read_trailer, trailer_footer


def parse(content: bytes) -> bytes:
    with tempfile.TemporaryFile() as f:
        f.write(content)
        f.flush()
        return read_trailer(f.fileno())


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=6000), st.binary(max_size=6000))
def test_a_well_formed_trailer_gives_back_exactly_its_envelope(message: bytes,
                                                               envelope: bytes) -> None:
    assert parse(message + envelope + trailer_footer(len(envelope))) == envelope


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200), st.binary(min_size=1, max_size=FOOTER_SIZE))
def test_any_other_ending_is_refused_with_a_value_error(head: bytes, tail: bytes) -> None:
    content = head + tail
    try:
        envelope = parse(content)
    except ValueError:
        return
    # accepted only if the file really ends in a footer that covers what precedes it
    length = len(envelope)
    assert content.endswith(trailer_footer(length))
    assert content[len(content) - FOOTER_SIZE - length:len(content) - FOOTER_SIZE] == envelope


def test_a_truncated_file_is_refused() -> None:
    envelope = b'{"id": "x"}'
    whole = b"message\r\n" + envelope + trailer_footer(len(envelope))
    for cut in range(1, len(whole)):
        try:
            got = parse(whole[:-cut])
        except ValueError:
            continue
        raise AssertionError(f"cut {cut} bytes and still parsed {got!r}")
