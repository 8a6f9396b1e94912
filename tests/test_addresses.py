"""RFC 5321 address syntax: paths, mailboxes, ESMTP parameters, and the relay probes."""

from __future__ import annotations

import pytest

from relaygw.addresses import (
    AddressError,
    Mailbox,
    parse_mailbox,
    parse_params,
    parse_path,
    split_path_and_params,
)

LOCAL_64 = "a" * 64
LOCAL_65 = "a" * 65


@pytest.mark.parametrize(("text", "local", "domain"), [
    ("user@example.test", "user", "example.test"),
    ("User.Name+tag@Example.TEST", "User.Name+tag", "example.test"),  # domain lowercased
    ("user@example.test.", "user", "example.test"),                    # root dot dropped
    ("user%other@example.test", "user%other", "example.test"),         # % is atext
    ("!#$&'*+-/=?^_`{|}~@example.test", "!#$&'*+-/=?^_`{|}~", "example.test"),
    ('"quoted local"@example.test', '"quoted local"', "example.test"),
    ('"user@other"@example.test', '"user@other"', "example.test"),
    ('"a\\"b"@example.test', '"a\\"b"', "example.test"),
    ('""@example.test', '""', "example.test"),
    ("user@[192.0.2.1]", "user", "[192.0.2.1]"),
    ("user@[IPv6:2001:db8::1]", "user", "[ipv6:2001:db8::1]"),
    ("user@[IPv6:::ffff:192.0.2.1]", "user", "[ipv6:::ffff:192.0.2.1]"),
    (f"{LOCAL_64}@example.test", LOCAL_64, "example.test"),
    ("u@localhost", "u", "localhost"),
    ("u@a-b.c-d.test", "u", "a-b.c-d.test"),
], ids=lambda v: v if isinstance(v, str) and len(v) < 40 else None)
def test_parse_mailbox_accepts(text: str, local: str, domain: str) -> None:
    assert parse_mailbox(text) == Mailbox(local, domain)


@pytest.mark.parametrize("text", [
    "",
    "user",
    "user@",
    "@example.test",
    "user@other@example.test",   # the relay probe: never user@other via us
    "user@@example.test",
    ".user@example.test",
    "user.@example.test",
    "us..er@example.test",
    "us er@example.test",
    '"unterminated@example.test',
    '"a"b@example.test',
    "user@-example.test",
    "user@example-.test",
    "user@exa_mple.test",
    "user@example..test",
    "user@[192.0.2]",
    "user@[IPv6:nothex]",
    "user@[192.0.2.1",
    f"{LOCAL_65}@example.test",
    "üser@example.test",
    "user@exämple.test",
    "user@example.test trailing",
    "user@example.test>",
    "user@" + "a" * 64 + ".test",  # a label over 63 octets
    "user@" + ".".join(["a" * 63] * 4) + ".test",  # a domain over 255 octets
], ids=lambda v: repr(v)[:40])
def test_parse_mailbox_refuses(text: str) -> None:
    with pytest.raises(AddressError):
        parse_mailbox(text)


def test_non_ascii_is_named_in_the_error() -> None:
    with pytest.raises(AddressError, match="non-ASCII"):
        parse_mailbox("jörg@example.test")


@pytest.mark.parametrize(("path", "expected"), [
    ("<user@example.test>", Mailbox("user", "example.test")),
    ("<@relay.test:user@example.test>", Mailbox("user", "example.test")),
    ("<@a.test,@b.test:user@example.test>", Mailbox("user", "example.test")),
    ("<@local.test:user@other.test>", Mailbox("user", "other.test")),
    ('<"user@other"@local.test>', Mailbox('"user@other"', "local.test")),
    ("<user%other@local.test>", Mailbox("user%other", "local.test")),
], ids=repr)
def test_parse_path(path: str, expected: Mailbox) -> None:
    assert parse_path(path, allow_null=False) == expected


def test_null_path() -> None:
    assert parse_path("<>", allow_null=True) is None
    with pytest.raises(AddressError, match="null"):
        parse_path("<>", allow_null=False)


@pytest.mark.parametrize("path", [
    "<user@other@local.test>",
    "<@local.test user@other.test>",
    "<@:user@example.test>",
    "<@local.test:>",
    "<" + "a" * 60 + "@" + ".".join(["b" * 60] * 4) + ".test>",  # path over 256 octets
    "<postmaster>",
], ids=lambda v: repr(v)[:40])
def test_parse_path_refuses(path: str) -> None:
    with pytest.raises(AddressError):
        parse_path(path, allow_null=False)


@pytest.mark.parametrize(("argument", "path", "params"), [
    ("<a@b.test>", "<a@b.test>", ""),
    ("<a@b.test> SIZE=100", "<a@b.test>", "SIZE=100"),
    (" <a@b.test>", "<a@b.test>", ""),                      # MAIL FROM: <a@b>
    ("<a@b.test>  SIZE=1 BODY=8BITMIME ", "<a@b.test>", "SIZE=1 BODY=8BITMIME"),
    ("<>", "<>", ""),
    ("<> SIZE=5", "<>", "SIZE=5"),
    ('<"a>b"@c.test> X=1', '<"a>b"@c.test>', "X=1"),           # '>' inside quotes
    ('<"a\\">"@c.test>', '<"a\\">"@c.test>', ""),               # an escaped quote
    ("<a@b.test> X=>", "<a@b.test>", "X=>"),                  # the first '>' closes
], ids=repr)
def test_split_path_and_params(argument: str, path: str, params: str) -> None:
    assert split_path_and_params(argument) == (path, params)


@pytest.mark.parametrize("argument", [
    "a@b.test",
    "<a@b.test",
    "<a@b.test>junk",
    "<a@b.test>SIZE=1",
    '<"a>b@c.test',
    "<a@b.test>>",
    "",
], ids=repr)
def test_split_path_and_params_refuses(argument: str) -> None:
    with pytest.raises(AddressError):
        split_path_and_params(argument)


@pytest.mark.parametrize(("text", "expected"), [
    ("", {}),
    ("SIZE=1000", {"SIZE": "1000"}),
    ("size=1000 body=8BITMIME", {"SIZE": "1000", "BODY": "8BITMIME"}),
    ("SMTPUTF8", {"SMTPUTF8": None}),
    ("  RET=HDRS   ENVID=abc+2Bdef ", {"RET": "HDRS", "ENVID": "abc+2Bdef"}),
    ("X-EXT-1=v", {"X-EXT-1": "v"}),
], ids=repr)
def test_parse_params(text: str, expected: dict[str, str | None]) -> None:
    assert parse_params(text) == expected


@pytest.mark.parametrize("text", ["=1", "SIZE=", "SIZE=a=b", "-X=1", "SIZE=é", "A=\x01"],
                         ids=repr)
def test_parse_params_refuses(text: str) -> None:
    with pytest.raises(AddressError):
        parse_params(text)


@pytest.mark.parametrize(("local", "unquoted"), [
    ("plain", "plain"),
    ('"quoted local"', "quoted local"),
    ('"a\\"b"', 'a"b'),
    ('"a\\\\b"', "a\\b"),
    ('"../x"', "../x"),
])
def test_unquoted_local(local: str, unquoted: str) -> None:
    assert Mailbox(local, "example.test").unquoted_local == unquoted


def test_mailbox_str() -> None:
    assert str(parse_mailbox('"a b"@Example.Test')) == '"a b"@example.test'
