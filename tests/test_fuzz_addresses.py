"""Hypothesis over the address and parameter parsers: only AddressError escapes,
and what is accepted is well formed."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from relaygw.addresses import (
    AddressError,
    parse_mailbox,
    parse_params,
    parse_path,
    split_path_and_params,
)

ADDRESS_ALPHABET = st.sampled_from(list('abcXYZ019.-_+%!"\\@<>[]:, =\t\x00\x7f\u00e9'))


@settings(max_examples=400, deadline=None)
@given(st.text(ADDRESS_ALPHABET, max_size=80))
def test_rcpt_argument_parses_or_says_why(argument: str) -> None:
    try:
        path, params = split_path_and_params(argument)
        mailbox = parse_path(path, allow_null=True)
        parse_params(params)
    except AddressError:
        return
    if mailbox is None:
        assert path == "<>"
        return
    text = str(mailbox)
    assert text.isascii()
    assert "\x00" not in text and "\t" not in text
    assert mailbox.domain == mailbox.domain.lower()
    # the domain part of an accepted address never hides a second '@'
    assert "@" not in mailbox.domain
    assert parse_mailbox(text) == mailbox  # a round trip through text is stable


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120))
def test_arbitrary_bytes_never_crash(raw: bytes) -> None:
    argument = raw.decode("utf-8", "replace")
    try:
        path, params = split_path_and_params(argument)
        parse_path(path, allow_null=False)
        parse_params(params)
    except AddressError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_oversize_and_odd_mailboxes(text: str) -> None:
    try:
        mailbox = parse_mailbox(text)
    except AddressError:
        return
    assert len(mailbox.local) <= 64
    assert len(mailbox.domain) <= 255
