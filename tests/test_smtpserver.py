"""The inbound SMTP protocol, byte for byte, over a StringTransport (CONTRACT.md section 3).

Dialogs are tables of (what the client sends, the exact replies expected),
written with the named replies of relaygw.replies and relaygw.routing. The
gateway behind the protocol is made of real parts (tests/support.py): a
Router over a parsed config and a Spool in tmp_path, so "queued" means files
on disk. Every session a test opens is checked afterwards for well-formed
replies carrying an RFC 3463 code.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from email.utils import format_datetime
from pathlib import Path

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from core_fakes import open_fds
from relaygw import replies
from relaygw.messagecache import WireReady
from relaygw.routing import NO_ROUTE, REJECTED, RELAY_DENIED, UNKNOWN_MAILBOX, Router
from relaygw.smtpserver import MAX_ERRORS, OVERSHOOT_LIMIT, SMTPServerProtocol, rfc5322_date
from support import (
    HOSTNAME,
    QUEUED,
    TRUSTED_PEER,
    UNTRUSTED_PEER,
    FailingOS,
    FakeGateway,
    ManualRunner,
    Session,
    greet,
    logged_errors,
    make_gateway,
    malformed_replies,
    transaction,
)

EHLO = "EHLO client.test"
MAIL = "MAIL FROM:<sender@client.test>"
RCPT = "RCPT TO:<alice@example.test>"
EHLO_REPLY = [f"250-{HOSTNAME}", "250-PIPELINING", "250-SIZE 200000", "250-ETRN",
              "250-ENHANCEDSTATUSCODES", "250 8BITMIME"]
VRFY_SYNTAX = "501 5.5.4 Syntax: VRFY address"
RCPT_PARAMETER = "555 5.5.4 Unsupported RCPT parameter"


@pytest.fixture(autouse=True)
def every_reply_well_formed() -> Iterator[list[Session]]:
    """After each test: every line of every session is a reply with an enhanced code
    (except the banner, the HELO/EHLO answer and 354), and nothing was logged as an error."""
    sessions: list[Session] = []
    Session.registry = sessions
    try:
        with logged_errors() as errors:
            yield sessions
    finally:
        Session.registry = None
    for session in sessions:
        assert malformed_replies(session.all_lines()) == []
    assert [e.get("log_format") for e in errors if "log_failure" in e] == []


@pytest.fixture
def gateway(tmp_path: Path) -> FakeGateway:
    return make_gateway(tmp_path)


def queued_id(line: str) -> str:
    match = QUEUED.match(line)
    assert match, line
    return match.group(1)


def body_of(gateway: FakeGateway, queue_id: str) -> bytes:
    return gateway.body(queue_id)


def assert_nothing_queued(gateway: FakeGateway) -> None:
    assert gateway.files() == []
    assert gateway.accepted_envelopes == []


# --- the banner and the greeting ---------------------------------------------------


def test_banner(gateway: FakeGateway) -> None:
    session = Session(gateway)
    assert session.new_lines() == [f"220 {HOSTNAME} ESMTP relaygw"]
    assert replies.banner(HOSTNAME) == f"220 {HOSTNAME} ESMTP relaygw"
    assert not session.closed


def test_ehlo_lists_the_extensions(gateway: FakeGateway) -> None:
    session = Session(gateway)
    session.new_lines()
    lines = session.send("EHLO client.test\r\n")
    assert lines[0] == f"250-{HOSTNAME}"
    assert all(line.startswith("250-") for line in lines[:-1])
    assert lines[-1].startswith("250 ")
    keywords = [line[4:] for line in lines[1:]]
    assert {"PIPELINING", "SIZE 200000", "8BITMIME", "ENHANCEDSTATUSCODES",
            "ETRN"} <= set(keywords)
    # no [tls] and no [auth] in this configuration: neither is offered
    assert not any(k.startswith(("STARTTLS", "AUTH")) for k in keywords)


def test_size_keyword_follows_the_configuration(tmp_path: Path) -> None:
    session = Session(make_gateway(tmp_path, max_message_size=12345))
    session.new_lines()
    assert "250-SIZE 12345" in session.send("EHLO client.test\r\n")


# --- table-driven dialogs -------------------------------------------------------

Step = tuple[str | bytes, list[str]]

DIALOGS: dict[str, list[Step]] = {
    "helo": [("HELO client.test", [f"250 {HOSTNAME}"])],
    "ehlo": [(EHLO, EHLO_REPLY)],
    "helo twice": [("HELO a.test", [f"250 {HOSTNAME}"]), ("EHLO b.test", EHLO_REPLY)],
    "helo without a name": [("HELO", [replies.SYNTAX_HELO])],
    "ehlo without a name": [("EHLO", [replies.SYNTAX_HELO])],
    "ehlo with two names": [("EHLO a.test b.test", [replies.SYNTAX_HELO])],
    # 503: sequence
    "mail before helo": [(MAIL, [replies.SENDER_OK])],  # as Postfix (helo not required)
    "rcpt before helo": [(RCPT, [replies.NEED_MAIL])],
    "rcpt before mail": [(EHLO, EHLO_REPLY), (RCPT, [replies.NEED_MAIL])],
    "data before mail": [(EHLO, EHLO_REPLY), ("DATA", [replies.NEED_MAIL])],
    "data before rcpt": [(EHLO, EHLO_REPLY), (MAIL, [replies.SENDER_OK]),
                         ("DATA", [replies.NEED_RCPT])],
    "data after refused rcpt": [(EHLO, EHLO_REPLY), (MAIL, [replies.SENDER_OK]),
                                ("RCPT TO:<x@reject.test>", [REJECTED.reply]),
                                ("DATA", [replies.NO_VALID_RECIPIENTS])],
    "data after a malformed rcpt": [(EHLO, EHLO_REPLY), (MAIL, [replies.SENDER_OK]),
                                    ("RCPT TO:<>", [replies.BAD_RECIPIENT]),
                                    ("DATA", [replies.NO_VALID_RECIPIENTS])],
    "data after rset and mail": [(EHLO, EHLO_REPLY), (MAIL, [replies.SENDER_OK]),
                                 ("RCPT TO:<x@reject.test>", [REJECTED.reply]),
                                 ("RSET", [replies.OK]), (MAIL, [replies.SENDER_OK]),
                                 ("DATA", [replies.NEED_RCPT])],
    "nested mail": [(EHLO, EHLO_REPLY), (MAIL, [replies.SENDER_OK]),
                    (MAIL, [replies.NESTED_MAIL])],
    "rset ends the transaction": [(EHLO, EHLO_REPLY), (MAIL, [replies.SENDER_OK]),
                                  ("RSET", [replies.OK]), (RCPT, [replies.NEED_MAIL]),
                                  (MAIL, [replies.SENDER_OK])],
    "ehlo ends the transaction": [(EHLO, EHLO_REPLY), (MAIL, [replies.SENDER_OK]),
                                  (EHLO, EHLO_REPLY), (RCPT, [replies.NEED_MAIL])],
    # 500: unknown commands
    "unknown command": [("FOO", [replies.UNKNOWN_COMMAND])],
    "empty line": [("", [replies.UNKNOWN_COMMAND])],
    "leading space": [(" NOOP", [replies.UNKNOWN_COMMAND])],
    "digits in the verb": [("MAIL2 FROM:<a@b.test>", [replies.UNKNOWN_COMMAND])],
    "punctuation in the verb": [("NO-OP", [replies.UNKNOWN_COMMAND])],
    "non-ascii verb": [("NOOP\u00e9".encode() + b"\r\n", [replies.UNKNOWN_COMMAND])],
    "dotless i upper-cases to QUIT": [("QU\u0131T".encode() + b"\r\n",
                                       [replies.UNKNOWN_COMMAND])],
    "latin-1 byte": [(b"NOOP\xff\r\n", [replies.UNKNOWN_COMMAND])],
    "bare LF ends no command": [(b"NOOP\n", [replies.BARE_NEWLINE_COMMAND])],
    "bare CR in a command": [(b"NO\rOP\r\n", [replies.BARE_NEWLINE_COMMAND])],
    "CR CR LF": [(b"NOOP\r\r\n", [replies.BARE_NEWLINE_COMMAND])],
    "a lone LF": [(b"\n", [replies.BARE_NEWLINE_COMMAND])],
    "an empty command": [(b"\r\n", [replies.UNKNOWN_COMMAND])],
    # 501 / 555: syntax
    "mail without from": [(EHLO, EHLO_REPLY), ("MAIL TO:<a@b.test>", [replies.SYNTAX_MAIL])],
    "mail without brackets": [(EHLO, EHLO_REPLY),
                              ("MAIL FROM:a@b.test", [replies.BAD_SENDER])],
    "mail with a bad address": [(EHLO, EHLO_REPLY),
                                ("MAIL FROM:<a@b@c.test>", [replies.BAD_SENDER])],
    "mail with junk after": [(EHLO, EHLO_REPLY),
                             ("MAIL FROM:<a@b.test>junk", [replies.BAD_SENDER])],
    "mail SIZE not a number": [(EHLO, EHLO_REPLY),
                               ("MAIL FROM:<a@b.test> SIZE=ten", [replies.BAD_PARAMETER])],
    "mail SIZE without value": [(EHLO, EHLO_REPLY),
                                ("MAIL FROM:<a@b.test> SIZE", [replies.BAD_PARAMETER])],
    "mail BODY unknown": [(EHLO, EHLO_REPLY),
                          ("MAIL FROM:<a@b.test> BODY=9BIT", [replies.BAD_PARAMETER])],
    "mail unknown parameter": [(EHLO, EHLO_REPLY), ("MAIL FROM:<a@b.test> SMTPUTF8",
                                                    [replies.UNKNOWN_PARAMETER])],
    "rcpt without to": [(EHLO, EHLO_REPLY), (MAIL, [replies.SENDER_OK]),
                        ("RCPT FROM:<alice@example.test>", [replies.SYNTAX_RCPT])],
    "rcpt unknown parameter": [(EHLO, EHLO_REPLY), (MAIL, [replies.SENDER_OK]),
                               ("RCPT TO:<alice@example.test> NOTIFY=NEVER",
                                [RCPT_PARAMETER])],
    "data with an argument": [(EHLO, EHLO_REPLY), (MAIL, [replies.SENDER_OK]),
                              (RCPT, [replies.RECIPIENT_OK]),
                              ("DATA now", [replies.SYNTAX_NO_ARGS])],
    "vrfy without argument": [("VRFY", [VRFY_SYNTAX])],
    "etrn without domain": [(EHLO, EHLO_REPLY), ("ETRN", [replies.SYNTAX_ETRN])],
    # accepted forms of MAIL
    "null sender": [(EHLO, EHLO_REPLY), ("MAIL FROM:<>", [replies.SENDER_OK])],
    "space after colon": [(EHLO, EHLO_REPLY),
                          ("MAIL FROM: <a@b.test>", [replies.SENDER_OK])],
    "lower case": [("ehlo client.test", EHLO_REPLY),
                   ("mail from:<a@b.test> size=10 body=8bitmime", [replies.SENDER_OK]),
                   ("rcpt to:<alice@example.test>", [replies.RECIPIENT_OK])],
    "size at the limit": [(EHLO, EHLO_REPLY),
                          ("MAIL FROM:<a@b.test> SIZE=200000", [replies.SENDER_OK])],
    "size over the limit": [(EHLO, EHLO_REPLY),
                            ("MAIL FROM:<a@b.test> SIZE=200001", [replies.SIZE_EXCEEDED]),
                            (RCPT, [replies.NEED_MAIL])],
    # the simple commands
    "rset": [("RSET", [replies.OK])],
    "noop": [("NOOP", [replies.OK]), ("NOOP anything", [replies.OK])],
    "help": [("HELP", [replies.HELP]), ("HELP MAIL", [replies.HELP])],
    "vrfy": [("VRFY alice", [replies.VRFY])],
    "expn": [("EXPN staff", [replies.NOT_IMPLEMENTED])],
    "turn": [("TURN", [replies.TURN_REFUSED])],
    "turn after ehlo": [(EHLO, EHLO_REPLY), ("TURN", [replies.TURN_REFUSED])],
    "starttls without tls": [(EHLO, EHLO_REPLY), ("STARTTLS", [replies.NOT_IMPLEMENTED])],
    "rset with an argument": [(EHLO, EHLO_REPLY), (MAIL, [replies.SENDER_OK]),
                              ("RSET now", [replies.SYNTAX_NO_ARGS]),
                              (MAIL, [replies.NESTED_MAIL])],
    "quit with an argument": [("QUIT now", [replies.BYE])],  # as Postfix: not checked
    "etrn before helo": [("ETRN example.test", [replies.ETRN_STARTED])],  # as Postfix
    "etrn in a transaction": [(EHLO, EHLO_REPLY), (MAIL, [replies.SENDER_OK]),
                              ("ETRN example.test", [replies.IN_TRANSACTION])],
    "quit": [("QUIT", [replies.BYE])],
}


@pytest.mark.parametrize("steps", list(DIALOGS.values()), ids=list(DIALOGS))
def test_dialog(gateway: FakeGateway, steps: list[Step]) -> None:
    session = Session(gateway)
    assert session.new_lines() == [replies.banner(HOSTNAME)]
    for command, expected in steps:
        raw = command if isinstance(command, bytes) else command.encode() + b"\r\n"
        assert session.send(raw) == expected, command
    assert_nothing_queued(gateway)


def test_reply_constants_are_what_the_contract_names() -> None:
    assert replies.NEED_HELO.startswith("503 5.5.1 ")
    assert replies.NEED_MAIL.startswith("503 5.5.1 ")
    assert replies.NEED_RCPT.startswith("503 5.5.1 ")
    assert replies.NO_VALID_RECIPIENTS.startswith("554 5.5.1 ")
    assert replies.IN_TRANSACTION.startswith("503 5.5.1 ")
    assert replies.NESTED_MAIL.startswith("503 5.5.1 ")
    assert replies.UNKNOWN_COMMAND.startswith("500 5.5.2 ")
    assert replies.COMMAND_TOO_LONG.startswith("500 5.5.2 ")
    assert replies.BARE_NEWLINE_DATA.startswith("550 5.5.2 ")
    assert replies.DATA_LINE_TOO_LONG.startswith("550 5.5.2 ")
    assert replies.BAD_RECIPIENT.startswith("501 5.1.3 ")
    assert replies.TOO_MANY_RECIPIENTS.startswith("452 4.5.3 ")
    assert replies.SIZE_EXCEEDED.startswith("552 5.3.4 ")
    assert replies.TOO_MANY_HOPS.startswith("554 5.4.6 ")
    assert replies.NO_STORAGE.startswith("452 4.3.1 ")
    assert replies.TURN_REFUSED.startswith("502 5.5.1 ")
    assert replies.ETRN_STARTED.startswith("250 2.0.0")
    assert replies.ETRN_DENIED.startswith("459 4.7.1 ")
    assert replies.HELP.startswith("214 ")
    assert replies.VRFY.startswith("252 ")
    assert replies.BYE.startswith("221 ")
    assert replies.too_many_connections(HOSTNAME).startswith("421 4.7.0 ")
    assert replies.timeout(HOSTNAME).startswith("421 4.4.2 ")
    assert RELAY_DENIED.reply.startswith("554 5.7.1 ")
    assert REJECTED.reply.startswith("550 5.7.1 ")
    assert UNKNOWN_MAILBOX.reply.startswith("550 5.1.1 ")


def test_quit_closes_and_ignores_what_follows(gateway: FakeGateway) -> None:
    session = greet(gateway)
    assert session.send("QUIT\r\nNOOP\r\nMAIL FROM:<a@b.test>\r\n") == [replies.BYE]
    assert session.closed
    assert session.send("NOOP\r\n") == []


# --- recipients: routing at RCPT ---------------------------------------------------

RECIPIENTS: dict[str, tuple[IPv4Address, str, str]] = {
    "local mailbox": (TRUSTED_PEER, "<alice@example.test>", replies.RECIPIENT_OK),
    "local mailbox, other case": (UNTRUSTED_PEER, "<Alice@EXAMPLE.test>",
                                  replies.RECIPIENT_OK),
    "local mailbox from outside": (UNTRUSTED_PEER, "<bob@example.test>",
                                   replies.RECIPIENT_OK),
    "unknown mailbox": (TRUSTED_PEER, "<carol@example.test>", UNKNOWN_MAILBOX.reply),
    "quoted local part is not relayed": (TRUSTED_PEER, '<"carol@elsewhere.test"@example.test>',
                                         UNKNOWN_MAILBOX.reply),
    "reject route": (TRUSTED_PEER, "<x@reject.test>", REJECTED.reply),
    "reject route from outside": (UNTRUSTED_PEER, "<x@reject.test>", REJECTED.reply),
    "relay for a trusted client": (TRUSTED_PEER, "<x@elsewhere.test>", replies.RECIPIENT_OK),
    "relay denied": (UNTRUSTED_PEER, "<x@elsewhere.test>", RELAY_DENIED.reply),
    "relay denied, address literal": (UNTRUSTED_PEER, "<x@[192.0.2.1]>", RELAY_DENIED.reply),
    "named relay route is open": (UNTRUSTED_PEER, "<x@branch.example.test>",
                                  replies.RECIPIENT_OK),
    "source route ignored": (TRUSTED_PEER, "<@hop.test:alice@example.test>",
                             replies.RECIPIENT_OK),
    "source route cannot open a relay": (UNTRUSTED_PEER, "<@example.test:x@elsewhere.test>",
                                         RELAY_DENIED.reply),
    "alias to outside, from outside": (UNTRUSTED_PEER, "<sales@example.test>",
                                       replies.RECIPIENT_OK),
    "domain alias": (UNTRUSTED_PEER, "<bob@old.example.test>", replies.RECIPIENT_OK),
    "domain alias to an unknown mailbox": (TRUSTED_PEER, "<zed@old.example.test>",
                                           UNKNOWN_MAILBOX.reply),
    "alias to an unknown mailbox": (TRUSTED_PEER, "<ghost@example.test>",
                                    UNKNOWN_MAILBOX.reply),
    # 501 5.1.3
    "no brackets": (TRUSTED_PEER, "alice@example.test", replies.BAD_RECIPIENT),
    "user@other@local": (TRUSTED_PEER, "<user@elsewhere.test@example.test>",
                         replies.BAD_RECIPIENT),
    "empty": (TRUSTED_PEER, "", replies.BAD_RECIPIENT),
    "null path": (TRUSTED_PEER, "<>", replies.BAD_RECIPIENT),
    "no domain": (TRUSTED_PEER, "<alice>", replies.BAD_RECIPIENT),
    "bad domain": (TRUSTED_PEER, "<alice@-example-.test>", replies.BAD_RECIPIENT),
    "empty label": (TRUSTED_PEER, "<alice@example..test>", replies.BAD_RECIPIENT),
    "space in domain": (TRUSTED_PEER, "<alice@exam ple.test>", replies.BAD_RECIPIENT),
    "unclosed bracket": (TRUSTED_PEER, "<alice@example.test", replies.BAD_RECIPIENT),
    "junk after the path": (TRUSTED_PEER, "<alice@example.test>x", replies.BAD_RECIPIENT),
    "percent hack": (TRUSTED_PEER, "<x%elsewhere.test@example.test>", UNKNOWN_MAILBOX.reply),
    "bang path": (TRUSTED_PEER, "<elsewhere.test!x>", replies.BAD_RECIPIENT),
    "local part over 64": (TRUSTED_PEER, f"<{'a' * 65}@example.test>", replies.BAD_RECIPIENT),
    "non-ascii": (TRUSTED_PEER, "<\u00e5lice@example.test>", replies.BAD_RECIPIENT),
}


@pytest.mark.parametrize(("peer", "path", "expected"), list(RECIPIENTS.values()),
                         ids=list(RECIPIENTS))
def test_recipient(gateway: FakeGateway, peer: IPv4Address, path: str, expected: str) -> None:
    session = greet(gateway, peer)
    assert session.send(f"{MAIL}\r\n") == [replies.SENDER_OK]
    assert session.send(f"RCPT TO:{path}\r\n".encode()) == [expected]
    # a refusal leaves the transaction open for the other recipients
    assert session.send(f"{RCPT}\r\n") == [replies.RECIPIENT_OK]


def test_no_route_at_all(tmp_path: Path) -> None:
    gateway = make_gateway(tmp_path)
    gateway.router = Router(replace(gateway.config, routes=gateway.config.routes[:1]))
    session = greet(gateway)
    session.send(f"{MAIL}\r\n")
    assert session.send("RCPT TO:<x@elsewhere.test>\r\n") == [NO_ROUTE.reply]


def test_too_many_recipients(gateway: FakeGateway) -> None:
    session = greet(gateway)
    session.send(f"{MAIL}\r\n")
    for index in range(5):  # max_recipients = 5
        assert session.send(f"RCPT TO:<x{index}@elsewhere.test>\r\n") == [
            replies.RECIPIENT_OK]
    assert session.send("RCPT TO:<x5@elsewhere.test>\r\n") == [replies.TOO_MANY_RECIPIENTS]
    assert session.send(f"{RCPT}\r\n") == [replies.TOO_MANY_RECIPIENTS]
    lines = session.send(b"DATA\r\nhi\r\n.\r\n")
    assert lines[0] == replies.START_DATA
    envelope = gateway.envelope(queued_id(lines[1]))
    assert [r.address for r in envelope.recipients] == [
        f"x{i}@elsewhere.test" for i in range(5)]


def test_refused_recipients_do_not_count_toward_the_limit(gateway: FakeGateway) -> None:
    session = greet(gateway)
    session.send(f"{MAIL}\r\n")
    for _ in range(4):
        assert session.send("RCPT TO:<x@reject.test>\r\n") == [REJECTED.reply]
    for index in range(5):
        assert session.send(f"RCPT TO:<x{index}@elsewhere.test>\r\n") == [
            replies.RECIPIENT_OK]


def test_aliases_expand_at_rcpt(gateway: FakeGateway) -> None:
    session = greet(gateway, UNTRUSTED_PEER)
    lines = session.send(transaction(b"Subject: a\r\n\r\nhi\r\n", recipients=(
        "sales@example.test", "bob@old.example.test", "postmaster@example.test")))
    assert lines[:4] == [replies.SENDER_OK] + [replies.RECIPIENT_OK] * 3
    assert lines[4] == replies.START_DATA
    envelope = gateway.envelope(queued_id(lines[5]))
    got = [(r.address, r.original, r.action) for r in envelope.recipients]
    assert got == [
        ("bob@example.test", "sales@example.test", "local"),
        ("carol@partner.test", "sales@example.test", "relay"),
        # bob@old.example.test is bob@example.test again: delivered once
        ("alice@example.test", "postmaster@example.test", "local"),
    ]
    assert envelope.recipients[0].maildir == "var/mail/example.test/bob"
    assert gateway.accepted_envelopes == [envelope]


def test_same_recipient_twice_is_one_delivery(gateway: FakeGateway) -> None:
    session = greet(gateway)
    lines = session.send(transaction(b"hi\r\n", recipients=(
        "alice@example.test", "ALICE@example.test")))
    envelope = gateway.envelope(queued_id(lines[-1]))
    assert [r.address for r in envelope.recipients] == ["alice@example.test"]


# --- a whole transaction --------------------------------------------------------------


def test_message_is_queued_with_received_header_first(gateway: FakeGateway) -> None:
    session = greet(gateway, helo="mx.client.test")
    lines = session.send(transaction(b"Subject: hello\r\n\r\nbody\r\n"))
    assert lines[:3] == [replies.SENDER_OK, replies.RECIPIENT_OK, replies.START_DATA]
    queue_id = queued_id(lines[3])
    assert lines[3] == replies.queued(queue_id)
    assert gateway.queued_ids() == [queue_id]
    message = gateway.message(queue_id)
    first, second, third = message.split(b"\r\n")[:3]
    assert first == b"Received: from mx.client.test ([127.0.0.5])"
    assert second == f"\tby {HOSTNAME} (relaygw) with ESMTP id {queue_id}".encode()
    assert third.startswith(b"\tfor <alice@example.test>; ")
    assert body_of(gateway, queue_id) == b"Subject: hello\r\n\r\nbody\r\n"
    envelope = gateway.envelope(queue_id)
    assert envelope.sender == "sender@client.test"
    assert envelope.client_address == "127.0.0.5"
    assert envelope.helo == "mx.client.test"
    assert envelope.size == len(message)
    assert gateway.accepted_envelopes == [envelope]


def test_received_header_after_helo_and_several_recipients(gateway: FakeGateway) -> None:
    session = Session(gateway, UNTRUSTED_PEER)
    session.send("HELO old.client.test\r\n")
    lines = session.send(transaction(b"x\r\n", recipients=("alice@example.test",
                                                           "bob@example.test")))
    queue_id = queued_id(lines[-1])
    header = gateway.message(queue_id).split(b";")[0]
    assert header == (b"Received: from old.client.test ([192.0.2.7])\r\n"
                      + f"\tby {HOSTNAME} (relaygw) with SMTP id {queue_id}".encode())


@pytest.fixture
def local_zone(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Lets a test set TZ; the process's own zone comes back afterwards."""
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.parametrize("zone", [
    "UTC", "Europe/Amsterdam", "America/St_Johns", "Asia/Kolkata", "Pacific/Chatham",
    "America/Los_Angeles", "Australia/Lord_Howe",
])
def test_received_date_is_what_format_datetime_gives(
        zone: str, local_zone: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", zone)
    time.tzset()
    # Both sides of the DST changes of 2026 in each zone, and years far apart.
    moments = [0, 951_782_400, 1_700_000_000.25, 4_102_444_799]
    moments += [1_767_225_600 + hour * 3600 + 1799.5 for hour in range(0, 365 * 24, 7)]
    for seconds in moments:
        expected = format_datetime(datetime.fromtimestamp(seconds, UTC).astimezone())
        assert rfc5322_date(seconds) == expected, seconds


def test_received_header_date_is_the_clock_time(gateway: FakeGateway) -> None:
    gateway.clock.advance(1_700_000_000)
    lines = greet(gateway).send(transaction(b"x\r\n"))
    third_line = gateway.message(queued_id(lines[-1])).split(b"\r\n")[2]
    assert third_line == f"\tfor <alice@example.test>; {rfc5322_date(1_700_000_000)}".encode()


def test_null_sender(gateway: FakeGateway) -> None:
    session = greet(gateway)
    lines = session.send(transaction(b"bounce\r\n", sender=""))
    assert gateway.envelope(queued_id(lines[-1])).sender == ""


def test_empty_message(gateway: FakeGateway) -> None:
    session = greet(gateway)
    lines = session.send(transaction(b""))
    assert body_of(gateway, queued_id(lines[-1])) == b""


def test_dot_unstuffing(gateway: FakeGateway) -> None:
    session = greet(gateway)
    body = b"..x\r\n...\r\n..\r\nx.\r\n. .\r\nend\r\n"
    lines = session.send(transaction(body))
    assert body_of(gateway, queued_id(lines[-1])) == b".x\r\n..\r\n.\r\nx.\r\n .\r\nend\r\n"


@pytest.mark.parametrize(("body", "wire_ready"), [
    (b"Subject: x\r\n\r\nno line starts with a dot.\r\n", True),
    (b"Subject: x\r\n\r\n..a stuffed dot\r\n", False),
    (b".unstuffed, as some clients send it\r\n", False),
])
def test_data_without_a_leading_dot_is_cached_wire_ready(
        gateway: FakeGateway, body: bytes, wire_ready: bool) -> None:
    """Relayed from the cache, a message with no line starting with a dot skips the
    dot-stuffing scan (WireReady); any leading dot, stuffed or not, keeps it. (The
    journal's commit passes the word on too: tests/test_spool_journal.py.)"""
    session = greet(gateway)
    queue_id = queued_id(session.send(transaction(body))[-1])
    cached = gateway.spool.cache.open(queue_id)
    assert cached is not None
    assert isinstance(cached, WireReady) is wire_ready


def test_a_received_line_that_is_not_wire_clean_keeps_the_message_stuffed(
        gateway: FakeGateway) -> None:
    """The Received: line is checked, not assumed: a client address with a bare
    LF and a dot line (as a PROXY v1 header could once bring) must not let the
    message out unstuffed."""
    peer = IPv4Address("TCP", "127.0.0.5\n.\nX", 1234)
    session = greet(gateway, peer)
    queue_id = queued_id(session.send(transaction(b"Subject: x\r\n\r\nplain\r\n"))[-1])
    cached = gateway.spool.cache.open(queue_id)
    assert cached is not None and not isinstance(cached, WireReady)


def test_8bit_data_is_kept(gateway: FakeGateway) -> None:
    session = greet(gateway)
    body = "Subject: caf\u00e9\r\n\r\n\u00e9t\u00e9 \x00\xff\r\n".encode("latin-1")
    lines = session.send(transaction(body))
    assert body_of(gateway, queued_id(lines[-1])) == body


def test_pipelined_transactions_in_one_write(gateway: FakeGateway) -> None:
    session = Session(gateway)
    stream = (b"EHLO client.test\r\n"
              + transaction(b"first\r\n")
              + b"RSET\r\nNOOP\r\n"
              + transaction(b"second\r\n", recipients=("bob@example.test", "x@reject.test"))
              + b"QUIT\r\n")
    lines = session.send(stream)
    assert lines[0] == replies.banner(HOSTNAME)
    assert lines[1:7] == EHLO_REPLY
    rest = lines[7:]
    assert rest[:3] == [replies.SENDER_OK, replies.RECIPIENT_OK, replies.START_DATA]
    first = queued_id(rest[3])
    assert rest[4:10] == [replies.OK, replies.OK, replies.SENDER_OK, replies.RECIPIENT_OK,
                          REJECTED.reply, replies.START_DATA]
    second = queued_id(rest[10])
    assert rest[11:] == [replies.BYE]
    assert session.closed
    assert first != second
    assert gateway.queued_ids() == sorted([first, second])
    assert body_of(gateway, first) == b"first\r\n"
    assert body_of(gateway, second) == b"second\r\n"
    assert [e.id for e in gateway.accepted_envelopes] == [first, second]


def test_pipelined_byte_by_byte_gives_the_same_replies(tmp_path: Path) -> None:
    stream = (b"EHLO client.test\r\n" + transaction(b"a\r\n..b\r\n") + b"NOOP\r\n"
              + transaction(b"c\r\n") + b"QUIT\r\n")
    whole = Session(make_gateway(tmp_path / "whole")).send(stream)
    bytewise_gateway = make_gateway(tmp_path / "bytewise")
    bytewise = Session(bytewise_gateway).send_pieces(
        [stream[i:i + 1] for i in range(len(stream))])

    def normal(lines: list[str]) -> list[str]:
        return [QUEUED.sub("250 queued", line) for line in lines]

    assert normal(bytewise) == normal(whole)
    assert [body_of(bytewise_gateway, i) for i in bytewise_gateway.queued_ids()] in (
        [b"a\r\n.b\r\n", b"c\r\n"], [b"c\r\n", b"a\r\n.b\r\n"])


def test_no_250_before_the_commit_is_durable(tmp_path: Path) -> None:
    runner = ManualRunner()
    gateway = make_gateway(tmp_path, run_blocking=runner)
    session = greet(gateway)
    lines = session.send(transaction(b"hello\r\n") + b"NOOP\r\nRSET\r\n")
    # the commit waits: no 250, and the commands pipelined behind it wait too
    assert lines == [replies.SENDER_OK, replies.RECIPIENT_OK, replies.START_DATA]
    assert len(runner.pending) == 1
    assert gateway.queued_ids() == []
    assert gateway.accepted_envelopes == []
    assert session.send("NOOP\r\n") == []
    runner.run_all()
    lines = session.new_lines()
    queue_id = queued_id(lines[0])
    assert lines == [replies.queued(queue_id), replies.OK, replies.OK, replies.OK]
    assert gateway.queued_ids() == [queue_id]
    assert [e.id for e in gateway.accepted_envelopes] == [queue_id]


def test_client_gone_during_commit(tmp_path: Path) -> None:
    """The message was complete: it is queued, though nobody hears the 250."""
    runner = ManualRunner()
    gateway = make_gateway(tmp_path, run_blocking=runner)
    fds = open_fds(gateway.directory)
    session = greet(gateway)
    # the client pipelined a second transaction behind the first, then left
    session.send(transaction(b"hello\r\n") + f"{MAIL}\r\n{RCPT}\r\nDATA\r\nhalf".encode())
    session.lose()
    assert gateway.connections.total == 0
    runner.run_all()
    assert session.new_lines() == []
    assert len(gateway.queued_ids()) == 1
    assert len(gateway.accepted_envelopes) == 1
    # what was pipelined behind is not run for nobody: no file is left open
    assert not [n for n in gateway.files() if n.startswith("tmp-")]
    assert open_fds(gateway.directory) == fds
    assert gateway.clock.getDelayedCalls() == []


@pytest.mark.parametrize("size", [10, 100_000], ids=["small", "over the write buffer"])
def test_client_gone_during_data(gateway: FakeGateway, size: int) -> None:
    fds = open_fds(gateway.directory)
    session = greet(gateway)
    assert session.send(f"{MAIL}\r\n{RCPT}\r\nDATA\r\n".encode())[-1] == replies.START_DATA
    session.send(b"Subject: x\r\n\r\n" + (b"x" * 98 + b"\r\n") * (size // 100) + b"half")
    # what the spool has written so far is on disk, in a file still unnamed
    assert open_fds(gateway.directory) == fds + (size > 65536)
    session.lose()
    assert_nothing_queued(gateway)
    assert open_fds(gateway.directory) == fds


# --- size --------------------------------------------------------------------------


def body_of_size(size: int) -> bytes:
    """Lines of at most 100 octets (CRLF included) making ``size`` octets in all."""
    lines = []
    while size >= 102:
        lines.append(b"x" * 98 + b"\r\n")
        size -= 100
    return b"".join(lines) + b"y" * (size - 2) + b"\r\n"


@pytest.mark.parametrize(("size", "queued"), [(999, True), (1000, True), (1001, False),
                                               (50_000, False)],
                         ids=["under", "at the limit", "one over", "far over"])
def test_data_size_limit(tmp_path: Path, size: int, queued: bool) -> None:
    gateway = make_gateway(tmp_path, max_message_size=1000)
    session = greet(gateway)
    body = body_of_size(size)
    assert len(body) == size
    result = session.send(transaction(body) + b"NOOP\r\n")
    assert result[:3] == [replies.SENDER_OK, replies.RECIPIENT_OK, replies.START_DATA]
    if queued:
        assert body_of(gateway, queued_id(result[3])) == body
    else:
        assert result[3] == replies.SIZE_EXCEEDED
        assert_nothing_queued(gateway)
    assert result[4:] == [replies.OK]


def test_data_size_counts_unstuffed_octets(tmp_path: Path) -> None:
    gateway = make_gateway(tmp_path, max_message_size=1000)
    body = b"." + b"x" * 997 + b"\r\n"  # 1000 octets stored, 1001 sent
    lines = greet(gateway).send(transaction(b"." + body))
    assert body_of(gateway, queued_id(lines[-1])) == body


def test_size_declared_at_mail(gateway: FakeGateway) -> None:
    session = greet(gateway)
    assert session.send("MAIL FROM:<a@b.test> SIZE=200001\r\n") == [replies.SIZE_EXCEEDED]
    assert session.send("MAIL FROM:<a@b.test> SIZE=200000\r\n") == [replies.SENDER_OK]


# --- smuggling ----------------------------------------------------------------------

INJECTED = (b"MAIL FROM:<evil@attacker.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n"
            b"Subject: smuggled\r\n\r\nsmuggled\r\n")
END = b"\r\n.\r\n"
REAL_END = b".\r\n"  # INJECTED ends with CRLF: this completes a CRLF . CRLF

# (text before the fake end, the fake end, messages queued)
SMUGGLING: dict[str, tuple[bytes, bytes, int]] = {
    "LF . LF": (b"Subject: s\r\n\r\nhello", b"\n.\n", 0),
    "CRLF . LF": (b"Subject: s\r\n\r\nhello", b"\r\n.\n", 0),
    "LF . CRLF": (b"Subject: s\r\n\r\nhello", b"\n.\r\n", 0),
    "CR . CRLF": (b"Subject: s\r\n\r\nhello", b"\r.\r\n", 0),
    "CRLF . CR": (b"Subject: s\r\n\r\nhello", b"\r\n.\r", 0),
    "CR . CR": (b"Subject: s\r\n\r\nhello", b"\r.\r", 0),
    "LF . CR": (b"Subject: s\r\n\r\nhello", b"\n.\r", 0),
    "CR . LF": (b"Subject: s\r\n\r\nhello", b"\r.\n", 0),
    "CRLF . CR CRLF": (b"Subject: s\r\n\r\nhello", b"\r\n.\r\r\n", 0),
    "CRLF . NUL CRLF": (b"Subject: s\r\n\r\nhello", b"\r\n.\x00\r\n", 1),
    "LF . LF at start": (b"", b"\n.\n", 0),
    "LF . CRLF at start": (b"", b"\n.\r\n", 0),
    ". LF at start": (b"", b".\n", 0),
    ". CR at start": (b"", b".\r", 0),
    ". CR CRLF at start": (b"", b".\r\r\n", 0),
    # a real end after a bare LF: the tainted first message is refused, and what
    # follows is a new transaction of the same client (no one else sees it differently)
    "LF CRLF . CRLF": (b"Subject: s\r\n\r\nhello", b"\n\r\n.\r\n", 1),
}


@pytest.mark.parametrize("split", ["whole", "bytewise"])
@pytest.mark.parametrize(("before", "fake_end", "expected"), list(SMUGGLING.values()),
                         ids=list(SMUGGLING))
def test_smuggling(gateway: FakeGateway, before: bytes, fake_end: bytes, expected: int,
                   split: str) -> None:
    session = greet(gateway)
    assert session.send(f"{MAIL}\r\n{RCPT}\r\nDATA\r\n") == [
        replies.SENDER_OK, replies.RECIPIENT_OK, replies.START_DATA]
    stream = before + fake_end + INJECTED + REAL_END + b"QUIT\r\n"
    pieces = [stream] if split == "whole" else [stream[i:i + 1] for i in range(len(stream))]
    lines = session.send_pieces(pieces)
    queued = gateway.queued_ids()
    assert len(queued) == expected
    assert len(gateway.accepted_envelopes) == expected
    if fake_end == b"\r\n.\x00\r\n":
        # not an end at all, and no bare CR or LF: one message, the injection its text
        assert lines == [replies.queued(queued[0]), replies.BYE]
        assert body_of(gateway, queued[0]) == before + b"\r\n\x00\r\n" + INJECTED
    elif expected == 0:
        assert lines == [replies.BARE_NEWLINE_DATA, replies.BYE]
    else:
        assert lines == [replies.BARE_NEWLINE_DATA, replies.SENDER_OK, replies.RECIPIENT_OK,
                         replies.START_DATA, replies.queued(queued[0]), replies.BYE]
        envelope = gateway.envelope(queued[0])
        assert envelope.sender == "evil@attacker.test"
        assert body_of(gateway, queued[0]) == b"Subject: smuggled\r\n\r\nsmuggled\r\n"
    assert not [n for n in gateway.files() if n.startswith("tmp-")]


def test_legit_pipelining_after_a_real_end_queues_both(gateway: FakeGateway) -> None:
    """The control case of the table above: nothing bare, two messages."""
    session = greet(gateway)
    session.send(f"{MAIL}\r\n{RCPT}\r\nDATA\r\n")
    lines = session.send(b"hello" + END + INJECTED + END)
    assert [QUEUED.match(line) is not None for line in lines] == [
        True, False, False, False, True]
    assert len(gateway.queued_ids()) == 2


# --- long lines ----------------------------------------------------------------------


@pytest.mark.parametrize(("line", "queued"), [
    (b"x" * 998, True),
    (b"x" * 1000, True),
    (b"." + b"x" * 1000, True),   # the stuffing dot does not count
    (b"x" * 1001, False),
    (b".." + b"x" * 1000, False),
    (b"x" * 5000, False),
    (b"x" * 300_000, False),
], ids=["998", "1000", "1000 stuffed", "1001", "1001 stuffed", "5000", "300000"])
def test_data_line_length(tmp_path: Path, line: bytes, queued: bool) -> None:
    gateway = make_gateway(tmp_path, max_message_size=1_000_000)
    session = greet(gateway)
    lines = session.send(transaction(b"Subject: x\r\n\r\n" + line + b"\r\nafter\r\n")
                         + b"NOOP\r\n")
    assert lines[:3] == [replies.SENDER_OK, replies.RECIPIENT_OK, replies.START_DATA]
    if queued:
        assert body_of(gateway, queued_id(lines[3])) == (
            b"Subject: x\r\n\r\n" + line.removeprefix(b".") + b"\r\nafter\r\n")
    else:
        assert lines[3] == replies.DATA_LINE_TOO_LONG
        assert_nothing_queued(gateway)
    assert lines[4:] == [replies.OK]


@pytest.mark.parametrize(("command", "expected"), [
    ("NOOP " + "x" * 995, [replies.OK]),               # 1000 octets before CRLF
    ("NOOP " + "x" * 996, [replies.COMMAND_TOO_LONG]),
    ("RCPT TO:<" + "x" * 5000 + "@example.test>", [replies.COMMAND_TOO_LONG]),
], ids=["1000", "1001", "5000"])
def test_command_line_length(gateway: FakeGateway, command: str, expected: list[str]) -> None:
    session = greet(gateway)
    assert session.send(command.encode() + b"\r\nNOOP\r\n") == [*expected, replies.OK]


@pytest.mark.parametrize("piece", [1, 7, 1000, 4096])
def test_endless_command_line_is_refused_once(gateway: FakeGateway, piece: int) -> None:
    session = greet(gateway)
    junk = b"x" * 20_000
    lines = session.send_pieces([junk[i:i + piece] for i in range(0, len(junk), piece)])
    assert lines == [replies.COMMAND_TOO_LONG]
    assert len(session.protocol._buffer) <= 1002
    assert session.send("\r\nNOOP\r\n") == [replies.OK]


# --- hops -----------------------------------------------------------------------------


@pytest.mark.parametrize(("headers", "body_lines", "queued"), [
    (50, 0, True), (51, 0, False), (50, 20, True), (0, 100, True)],
    ids=["50", "51", "50 and more in the body", "only in the body"])
def test_max_hops(gateway: FakeGateway, headers: int, body_lines: int, queued: bool) -> None:
    session = greet(gateway)
    received = b"".join(b"Received: from hop%d.test by hop%d.test; date\r\n" % (i, i + 1)
                        for i in range(headers))
    body = received + b"Subject: loop\r\n\r\n" + b"Received: in the body\r\n" * body_lines
    lines = session.send(transaction(body))
    if queued:
        assert body_of(gateway, queued_id(lines[3])) == body
    else:
        assert lines[3] == replies.TOO_MANY_HOPS
        assert_nothing_queued(gateway)


# --- disk full ------------------------------------------------------------------------


BIG = (b"x" * 998 + b"\r\n") * 70  # over the spool's 64 KiB write buffer


@pytest.mark.parametrize(("failure", "body", "expected"), [
    ({"fsync": True}, b"small\r\n", replies.NO_STORAGE),
    ({"write": True}, b"small\r\n", replies.NO_STORAGE),
    ({"write": True}, BIG, replies.NO_STORAGE),
    ({"fsync": True}, BIG, replies.NO_STORAGE),
    ({"fsync": True, "error": errno.EDQUOT}, b"small\r\n", replies.NO_STORAGE),
    ({"fsync": True, "error": errno.EIO}, b"small\r\n", replies.LOCAL_ERROR),
    ({"write": True, "error": errno.EIO}, BIG, replies.LOCAL_ERROR),
], ids=["fsync at commit", "write at commit", "write during DATA", "fsync, big message",
        "quota", "EIO at commit", "EIO during DATA"])
@pytest.mark.parametrize("journal", [False, True], ids=["queue files", "journal"])
def test_storage_failure(tmp_path: Path, failure: dict[str, int], body: bytes,
                         expected: str, journal: bool) -> None:
    failing = FailingOS(**failure)
    armed = failing.fail_write, failing.fail_fsync
    failing.fail_write = failing.fail_fsync = False  # the spool starts up on a good disk
    gateway = make_gateway(tmp_path, os_module=failing, journal=journal)
    failing.fail_write, failing.fail_fsync = armed
    failing.calls.clear()
    session = greet(gateway)
    lines = session.send(transaction(body) + b"NOOP\r\n")
    assert lines == [replies.SENDER_OK, replies.RECIPIENT_OK, replies.START_DATA, expected,
                     replies.OK]
    assert failing.calls  # the failure was really met
    assert_nothing_queued(gateway)


def test_storage_failure_during_data_is_met_before_the_dot(tmp_path: Path) -> None:
    failing = FailingOS(write=True)
    gateway = make_gateway(tmp_path, os_module=failing)
    session = greet(gateway)
    session.send(f"{MAIL}\r\n{RCPT}\r\nDATA\r\n")
    session.send((b"x" * 998 + b"\r\n") * 70)
    assert failing.calls == ["write"]
    assert session.send(b".\r\n") == [replies.NO_STORAGE]
    assert failing.calls == ["write"]  # nothing more was written, and no commit tried
    assert_nothing_queued(gateway)


def test_disk_full_then_space_again(tmp_path: Path) -> None:
    failing = FailingOS(fsync=True)
    gateway = make_gateway(tmp_path, os_module=failing)
    session = greet(gateway)
    assert session.send(transaction(b"one\r\n"))[-1] == replies.NO_STORAGE
    failing.fail_fsync = False
    lines = session.send(transaction(b"two\r\n"))
    assert body_of(gateway, queued_id(lines[-1])) == b"two\r\n"


# --- ETRN -----------------------------------------------------------------------------


@pytest.mark.parametrize(("peer", "argument", "expected", "flushed"), [
    (TRUSTED_PEER, "branch.example.test", replies.ETRN_STARTED, ["branch.example.test"]),
    (TRUSTED_PEER, "@Branch.Example.test", replies.ETRN_STARTED, ["branch.example.test"]),
    (TRUSTED_PEER, "#queue", replies.ETRN_STARTED, ["queue"]),
    (TRUSTED_PEER, "a b", replies.SYNTAX_ETRN, []),
    (UNTRUSTED_PEER, "branch.example.test", replies.ETRN_DENIED, []),
], ids=["trusted", "@domain", "#queue", "two words", "untrusted"])
def test_etrn(gateway: FakeGateway, peer: IPv4Address, argument: str, expected: str,
              flushed: list[str]) -> None:
    session = greet(gateway, peer)
    assert session.send(f"ETRN {argument}\r\n") == [expected]
    assert gateway.etrn_domains == flushed


# --- connections, time-outs, errors ---------------------------------------------------------


def test_too_many_connections_in_all(tmp_path: Path) -> None:
    gateway = make_gateway(tmp_path, max_connections=2)
    first, second = Session(gateway), Session(gateway, UNTRUSTED_PEER)
    assert first.new_lines() == second.new_lines() == [replies.banner(HOSTNAME)]
    third = Session(gateway, IPv4Address("TCP", "198.51.100.1", 5))
    assert third.new_lines() == [replies.too_many_connections(HOSTNAME)]
    assert third.closed
    assert third.send("EHLO x.test\r\n") == []
    third.lose()
    assert gateway.connections.total == 2
    first.lose()
    assert gateway.connections.total == 1
    fourth = Session(gateway, IPv4Address("TCP", "198.51.100.1", 6))
    assert fourth.new_lines() == [replies.banner(HOSTNAME)]


def test_too_many_connections_per_client(tmp_path: Path) -> None:
    gateway = make_gateway(tmp_path, max_connections_per_client=2)
    sessions = [Session(gateway) for _ in range(2)]
    refused = Session(gateway)
    assert refused.new_lines() == [replies.too_many_connections(HOSTNAME)]
    assert refused.closed
    other = Session(gateway, UNTRUSTED_PEER)
    assert other.new_lines() == [replies.banner(HOSTNAME)]
    refused.lose()
    assert gateway.connections.per_client["127.0.0.5"] == 2
    for session in sessions:
        session.lose()
    assert "127.0.0.5" not in gateway.connections.per_client
    assert Session(gateway).new_lines() == [replies.banner(HOSTNAME)]


def test_idle_timeout(gateway: FakeGateway) -> None:
    session = greet(gateway)
    gateway.clock.advance(29.9)  # command_timeout = 30s
    assert session.send("NOOP\r\n") == [replies.OK]
    gateway.clock.advance(29.9)
    assert session.new_lines() == []
    assert not session.closed
    gateway.clock.advance(0.2)
    assert session.new_lines() == [replies.timeout(HOSTNAME)]
    assert session.closed
    assert session.send("NOOP\r\n") == []
    session.lose()
    assert gateway.clock.getDelayedCalls() == []
    assert gateway.connections.total == 0


def test_timeout_in_the_middle_of_data(gateway: FakeGateway) -> None:
    session = greet(gateway)
    session.send(f"{MAIL}\r\n{RCPT}\r\nDATA\r\nSubject: slow\r\n".encode())
    gateway.clock.advance(20)
    session.send(b"still coming\r\n")  # any bytes count as activity
    gateway.clock.advance(20)
    assert session.new_lines() == []
    gateway.clock.advance(10)
    assert session.new_lines() == [replies.timeout(HOSTNAME)]
    assert session.closed
    session.lose()
    assert_nothing_queued(gateway)


def test_timeout_before_any_command(gateway: FakeGateway) -> None:
    session = Session(gateway)
    gateway.clock.advance(30)
    assert session.all_lines() == [replies.banner(HOSTNAME), replies.timeout(HOSTNAME)]


def test_lost_connection_cancels_the_timer(gateway: FakeGateway) -> None:
    session = greet(gateway)
    session.lose()
    assert gateway.clock.getDelayedCalls() == []
    assert gateway.connections.total == 0


def test_input_notes_its_time_and_moves_no_timer(gateway: FakeGateway) -> None:
    """A command costs no timer reset: the one timer, when it fires, is set again
    for what is left since the last input."""
    session = greet(gateway)
    [timer] = gateway.clock.getDelayedCalls()
    deadline = timer.getTime()
    gateway.clock.advance(10)
    assert session.send("NOOP\r\n") == [replies.OK]
    assert gateway.clock.getDelayedCalls() == [timer] and timer.getTime() == deadline
    gateway.clock.advance(deadline - gateway.clock.seconds())
    [again] = gateway.clock.getDelayedCalls()
    assert again.getTime() == pytest.approx(10 + 30)
    assert not session.closed
    gateway.clock.advance(10)
    assert session.new_lines() == [replies.timeout(HOSTNAME)]
    assert session.closed


@pytest.mark.parametrize(("new_timeout", "closed_at_first_check"), [(10.0, True), (60.0, False)])
def test_the_timeout_in_force_when_the_timer_fires_counts(
        gateway: FakeGateway, new_timeout: float, closed_at_first_check: bool) -> None:
    """A reload that changes command_timeout applies to open sessions from then on."""
    session = greet(gateway)
    gateway.clock.advance(5)
    session.send("NOOP\r\n")
    gateway.config = replace(gateway.config,
                             limits=replace(gateway.config.limits, command_timeout=new_timeout))
    gateway.clock.advance(25)  # the timer set at the greeting (30 s) fires
    assert session.closed is closed_at_first_check
    if not closed_at_first_check:
        [again] = gateway.clock.getDelayedCalls()
        assert again.getTime() == pytest.approx(5 + new_timeout)


def test_too_many_errors(gateway: FakeGateway) -> None:
    session = greet(gateway)
    for _ in range(MAX_ERRORS - 1):
        assert session.send("FOO\r\n") == [replies.UNKNOWN_COMMAND]
    assert not session.closed
    assert session.send("FOO\r\n") == [replies.UNKNOWN_COMMAND,
                                       replies.too_many_errors(HOSTNAME)]
    assert session.closed
    assert session.send("NOOP\r\n") == []


def test_too_many_errors_in_one_write(gateway: FakeGateway) -> None:
    session = greet(gateway)
    lines = session.send(b"FOO\r\n" * 30 + b"NOOP\r\n")
    assert lines == [replies.UNKNOWN_COMMAND] * MAX_ERRORS + [replies.too_many_errors(HOSTNAME)]
    assert replies.too_many_errors(HOSTNAME).startswith("421 ")


def test_refusals_count_as_errors(gateway: FakeGateway) -> None:
    session = greet(gateway, UNTRUSTED_PEER)
    session.send(f"{MAIL}\r\n")
    lines = session.send(b"RCPT TO:<x@elsewhere.test>\r\n" * MAX_ERRORS)
    assert lines == [RELAY_DENIED.reply] * MAX_ERRORS + [replies.too_many_errors(HOSTNAME)]
    assert session.closed


# --- submission listener (AUTH itself is tested with the security layer) --------------


def test_submission_needs_auth_before_mail(gateway: FakeGateway) -> None:
    session = Session(gateway, kind="submission")
    session.send(f"{EHLO}\r\n")
    assert session.send(f"{MAIL}\r\n") == [replies.AUTH_REQUIRED]
    assert replies.AUTH_REQUIRED.startswith("530 5.7.0 ")


# --- every reply -------------------------------------------------------------------------


def test_every_reply_carries_an_enhanced_code(tmp_path: Path) -> None:
    """One long session through most replies, checked line by line (the autouse
    fixture checks every other test's sessions the same way)."""
    gateway = make_gateway(tmp_path, max_message_size=2000)
    session = Session(gateway, UNTRUSTED_PEER)
    for steps in DIALOGS.values():
        for command, _ in steps:
            if not str(command).startswith("QUIT"):
                session.send(command if isinstance(command, bytes) else
                             command.encode() + b"\r\n")
            session.protocol.errors = 0  # stay under the error limit
    session.send(b"EHLO client.test\r\nRSET\r\n"
                 + transaction(b"x" * 3000 + b"\r\n")
                 + transaction((b"x" * 900 + b"\r\n") * 3)
                 + transaction(b"a\n.\nb\r\n") + transaction(b"ok\r\n")
                 + b"MAIL FROM:<a@b.test>\r\nRCPT TO:<x@elsewhere.test>\r\n"
                 + b"RCPT TO:<carol@example.test>\r\nRCPT TO:<x@reject.test>\r\nRCPT TO:x\r\n"
                 + b"ETRN example.test\r\nTURN\r\nHELP\r\nVRFY x\r\nQUIT\r\n")
    lines = session.all_lines()
    codes = {line[:3] for line in lines}
    assert {"220", "250", "354", "500", "501", "502", "503", "550", "552", "554", "555",
            "214", "252", "221", "459"} <= codes
    assert malformed_replies(lines) == []
    exempt = [line for line in lines if not line[4:5].isdigit()]
    assert {line[:3] for line in exempt} == {"220", "250", "354"}


def test_many_pipelined_transactions_with_an_immediate_commit(gateway: FakeGateway) -> None:
    """A commit that completes at once (a synchronous spool) does not recurse per message."""
    session = greet(gateway)
    lines = session.send(transaction(b"hi\r\n") * 300 + b"QUIT\r\n")
    assert len(lines) == 4 * 300 + 1
    assert sum(QUEUED.match(line) is not None for line in lines) == 300
    assert len(gateway.queued_ids()) == 300
    assert lines[-1] == replies.BYE


# --- shutting down ------------------------------------------------------------------------


def test_drain_closes_an_idle_session(gateway: FakeGateway) -> None:
    session = greet(gateway)
    session.protocol.drain()
    assert session.new_lines() == [replies.shutting_down(HOSTNAME)]
    assert replies.shutting_down(HOSTNAME).startswith("421 4.3.2 ")
    assert session.closed


def test_drain_lets_the_transaction_in_flight_finish(tmp_path: Path) -> None:
    runner = ManualRunner()
    gateway = make_gateway(tmp_path, run_blocking=runner)
    session = greet(gateway)
    session.send(f"{MAIL}\r\n")
    session.protocol.drain()
    assert session.send(f"{RCPT}\r\nDATA\r\nhello\r\n.\r\n") == [
        replies.RECIPIENT_OK, replies.START_DATA]
    assert not session.closed
    runner.run_all()
    lines = session.new_lines()
    assert lines == [replies.queued(queued_id(lines[0])), replies.shutting_down(HOSTNAME)]
    assert session.closed


class CountingTransport(StringTransport):
    """A StringTransport that remembers each write."""

    def __init__(self) -> None:
        super().__init__(peerAddress=TRUSTED_PEER)
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        super().write(data)


def test_replies_to_a_pipelined_batch_leave_in_one_write(gateway: FakeGateway) -> None:
    # One write per reply would leave all but the first waiting for the client's
    # delayed ACK (Nagle): about 40 ms per batch on a real socket.
    transport = CountingTransport()
    protocol = SMTPServerProtocol(gateway, "smtp", "test")
    protocol.makeConnection(transport)
    assert len(transport.writes) == 1  # the banner
    protocol.dataReceived(b"EHLO client.test\r\nMAIL FROM:<a@example.test>\r\n"
                          b"RCPT TO:<bob@example.test>\r\nRSET\r\nNOOP\r\n")
    assert len(transport.writes) == 2
    batch = transport.writes[1].decode().split("\r\n")
    assert batch[-5:] == [replies.SENDER_OK, replies.RECIPIENT_OK, replies.OK, replies.OK, ""]
    protocol.dataReceived(b"QUIT\r\n")  # a reply to a lone command goes at once too
    assert len(transport.writes) == 3 and transport.disconnecting


# --- RFC 5321 4.5.1: <Postmaster> ------------------------------------------------------


def test_postmaster_without_a_domain_is_accepted_from_anyone(gateway: FakeGateway) -> None:
    """Taken as postmaster@example.test here (the hostname's parent domain), whose
    alias names alice: a relay denial for the untrusted client does not apply."""
    session = greet(gateway, UNTRUSTED_PEER)
    session.send(f"{MAIL}\r\n")
    assert session.send("RCPT TO:<Postmaster>\r\n") == [replies.RECIPIENT_OK]
    lines = session.send(b"DATA\r\nhi\r\n.\r\n")
    envelope = gateway.envelope(queued_id(lines[1]))
    assert [(r.address, r.original, r.action) for r in envelope.recipients] == [
        ("alice@example.test", "postmaster@example.test", "local")]


# --- recipients over max_recipients -----------------------------------------------------


def test_recipients_over_the_limit_do_not_end_the_session(gateway: FakeGateway) -> None:
    """A client that sends its whole recipient list at once keeps its transaction
    (as Postfix's smtpd_recipient_overshoot_limit): the refusals past
    max_recipients are not errors toward the MAX_ERRORS close."""
    session = greet(gateway)
    rcpts = b"".join(f"RCPT TO:<x{n}@elsewhere.test>\r\n".encode()
                     for n in range(5 + MAX_ERRORS + 5))
    lines = session.send(f"{MAIL}\r\n".encode() + rcpts + b"DATA\r\nhi\r\n.\r\n")
    assert lines[:-2] == [replies.SENDER_OK] + [replies.RECIPIENT_OK] * 5 + [
        replies.TOO_MANY_RECIPIENTS] * (MAX_ERRORS + 5)
    assert lines[-2] == replies.START_DATA
    assert len(gateway.envelope(queued_id(lines[-1])).recipients) == 5
    assert not session.closed


def test_a_recipient_overshoot_without_end_is_cut_off(gateway: FakeGateway) -> None:
    """Past OVERSHOOT_LIMIT refusals they count again: a flood of RCPTs (a log
    line each) ends at MAX_ERRORS more."""
    session = greet(gateway)
    count = 5 + OVERSHOOT_LIMIT + MAX_ERRORS
    lines = session.send(f"{MAIL}\r\n".encode()
                         + b"RCPT TO:<x@elsewhere.test>\r\n" * (count + 10))
    assert lines[-1] == replies.too_many_errors(HOSTNAME)
    assert lines.count(replies.TOO_MANY_RECIPIENTS) == OVERSHOOT_LIMIT + MAX_ERRORS
    assert session.closed


# --- the client half-closes: what it sent is answered ------------------------------------


def test_a_half_closed_client_hears_its_250_and_the_session_closes(tmp_path: Path) -> None:
    runner = ManualRunner()
    gateway = make_gateway(tmp_path, run_blocking=runner)
    session = greet(gateway)
    session.send(transaction(b"hello\r\n") + b"QUIT\r\n")
    session.protocol.readConnectionLost()  # shutdown(SHUT_WR): all it will send
    assert not session.closed  # the commit is out: its 250 is still to come
    runner.run_all()
    lines = session.new_lines()
    assert lines == [replies.queued(queued_id(lines[0])), replies.BYE]
    assert session.closed and gateway.queued_ids() == [queued_id(lines[0])]


def test_a_half_close_without_quit_answers_then_closes(gateway: FakeGateway) -> None:
    session = greet(gateway)
    session.send(transaction(b"hello\r\n") + b"NOOP\r\nNOO")  # a command cut short
    session.protocol.readConnectionLost()
    assert session.closed
    assert session.new_lines() == []  # everything complete was answered already
    assert len(gateway.queued_ids()) == 1


def test_a_half_close_inside_data_queues_nothing(gateway: FakeGateway) -> None:
    session = greet(gateway)
    session.send(f"{MAIL}\r\n{RCPT}\r\nDATA\r\nSubject: cut\r\n".encode())
    session.protocol.readConnectionLost()
    assert session.closed
    session.lose()
    assert_nothing_queued(gateway)
    assert not [n for n in gateway.files() if n.startswith("tmp-")]
