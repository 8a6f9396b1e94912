"""Raw SMTP dialogs from an untrusted address (127.0.0.5) against the real daemon.

The config trusts only 127.0.0.1/32, so 127.0.0.5 is "anyone" and 127.0.0.1 is trusted.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from .harness import (
    Daemon,
    DaemonFactory,
    RawSMTP,
    Reply,
    barrier,
    base_config,
    expect,
    find_delivered,
    make_message,
    make_message_id,
    queue_id,
    wait_for,
)

pytestmark = pytest.mark.integration

UNTRUSTED = "127.0.0.5"
TRUSTED = "127.0.0.1"
MAX_SIZE = 10_000
MAX_RCPTS = 3
MAX_HOPS = 5
MAILBOXES = ["alice", "bob", "carol", "dave", "erin", "barrier"]

# Named replies: (code, enhanced status code)
OK = (250, None)
QUEUED = (250, "2.0.0")
RELAY_DENIED = (554, "5.7.1")
UNKNOWN_MAILBOX = (550, "5.1.1")
ROUTE_REJECTED = (550, "5.7.1")
BAD_ADDRESS = (501, "5.1.3")
TOO_MANY_RCPTS = (452, "4.5.3")
TOO_BIG = (552, "5.3.4")
TOO_MANY_HOPS = (554, "5.4.6")
TURN_REFUSED = (502, "5.5.1")
ETRN_OK = (250, "2.0.0")
ETRN_DENIED = (459, "4.7.1")
UNKNOWN_COMMAND = (500, "5.5.2")
BAD_SEQUENCE = (503, "5.5.1")
TOO_MANY_CONNECTIONS = (421, "4.7.0")
IDLE_TIMEOUT = (421, "4.4.2")


def check(reply: Reply, named: tuple[int, str | None]) -> Reply:
    return expect(reply, named[0], named[1])


@pytest.fixture(scope="module")
def daemon(module_daemons: DaemonFactory) -> Daemon:
    config = base_config(trusted=[f"{TRUSTED}/32"], mailboxes=MAILBOXES)
    config["limits"] = {"max_message_size": MAX_SIZE, "max_recipients": MAX_RCPTS,
                        "max_hops": MAX_HOPS}
    return module_daemons.start(config)


@pytest.fixture
def smtp(daemon: Daemon) -> Iterator[RawSMTP]:
    """A connection from the untrusted address, banner read and EHLO done."""
    with daemon.raw(source=UNTRUSTED) as raw:
        banner = raw.banner()
        assert banner.code == 220, banner
        raw.ehlo("untrusted.example.test")
        yield raw
        raw.check_enhanced_codes()


def _end_of_session(raw: RawSMTP) -> list[Reply]:
    """Send HELP; return the replies up to and including its 214 (or up to EOF).

    214 answers nothing else, so every reply before it answers something sent earlier.
    """
    start = len(raw.replies)
    try:
        raw.send(b"HELP\r\n")
        while True:
            reply = raw.read_reply()
            if reply.code == 214:
                break
    except (AssertionError, OSError):
        pass  # closed by the server: acceptable after a 5xx
    return raw.replies[start:]


# --- recipients ----------------------------------------------------------------------------


def test_relay_to_catch_all_refused_for_untrusted(smtp: RawSMTP) -> None:
    check(smtp.cmd("MAIL FROM:<sender@remote.test>"), OK)
    check(smtp.cmd("RCPT TO:<someone@elsewhere.test>"), RELAY_DENIED)
    check(smtp.cmd("RCPT TO:<alice@example.test>"), OK)  # the transaction goes on


def test_relay_allowed_for_trusted(daemon: Daemon) -> None:
    with daemon.raw(source=TRUSTED) as raw:
        raw.banner()
        raw.ehlo("trusted.example.test")
        check(raw.cmd("MAIL FROM:<sender@remote.test>"), OK)
        check(raw.cmd("RCPT TO:<someone@elsewhere.test>"), OK)
        check(raw.cmd("RSET"), (250, "2.0.0"))
        raw.check_enhanced_codes()


def test_unknown_mailbox(smtp: RawSMTP) -> None:
    check(smtp.cmd("MAIL FROM:<sender@remote.test>"), OK)
    check(smtp.cmd("RCPT TO:<nobody@example.test>"), UNKNOWN_MAILBOX)


def test_reject_route(smtp: RawSMTP) -> None:
    check(smtp.cmd("MAIL FROM:<sender@remote.test>"), OK)
    check(smtp.cmd("RCPT TO:<anyone@rejected.test>"), ROUTE_REJECTED)


@pytest.mark.parametrize("address", [
    "<alice@@example.test>",
    "<alice@>",
    "<alice@exa mple.test>",
    "<alice@example..test>",
    "<al ice@example.test>",
], ids=["double-at", "no-domain", "space-in-domain", "empty-label", "space-in-local"])
def test_bad_recipient_syntax(smtp: RawSMTP, address: str) -> None:
    check(smtp.cmd("MAIL FROM:<sender@remote.test>"), OK)
    check(smtp.cmd(f"RCPT TO:{address}"), BAD_ADDRESS)


def test_too_many_recipients(daemon: Daemon, smtp: RawSMTP) -> None:
    token = make_message_id()
    check(smtp.cmd("MAIL FROM:<sender@remote.test>"), OK)
    rcpts = ["alice@example.test", "bob@example.test", "carol@example.test"]
    for rcpt in rcpts:
        check(smtp.cmd(f"RCPT TO:<{rcpt}>"), OK)
    check(smtp.cmd("RCPT TO:<dave@example.test>"), TOO_MANY_RCPTS)
    assert smtp.cmd("DATA").code == 354
    smtp.send(make_message("sender@remote.test", rcpts, message_id=token) + b".\r\n")
    queue_id(smtp.read_reply())
    delivered = wait_for(lambda: (lambda f: f if len(f) >= 3 else None)(
        find_delivered(daemon, token)), 20, "three deliveries")
    assert sorted(p.parent.parent.name for p in delivered) == ["alice", "bob", "carol"]


# --- size ----------------------------------------------------------------------------------


def test_size_parameter_over_limit(smtp: RawSMTP) -> None:
    check(smtp.cmd(f"MAIL FROM:<sender@remote.test> SIZE={MAX_SIZE + 1}"), TOO_BIG)
    check(smtp.cmd(f"MAIL FROM:<sender@remote.test> SIZE={MAX_SIZE}"), OK)


def test_data_over_limit_refused_after_dot(daemon: Daemon, smtp: RawSMTP) -> None:
    token = make_message_id()
    smtp.start_mail("sender@remote.test", ["alice@example.test"])
    body = ("x" * 70 + "\r\n") * (MAX_SIZE // 72 + 20)
    smtp.send(make_message("sender@remote.test", ["alice@example.test"], body=body,
                           message_id=token) + b".\r\n")
    check(smtp.read_reply(), TOO_BIG)
    # the session goes on: a small message is accepted
    smtp.start_mail("sender@remote.test", ["bob@example.test"])
    smtp.send(make_message("sender@remote.test", ["bob@example.test"]) + b".\r\n")
    queue_id(smtp.read_reply())
    barrier(daemon)
    assert find_delivered(daemon, token) == []


# --- end-of-data smuggling, bare CR/LF, long lines -----------------------------------------

SMUGGLE_ENDINGS = {
    "lf-dot-lf": b"\n.\n",
    "lf-dot-crlf": b"\n.\r\n",
    "crlf-dot-lf": b"\r\n.\n",
    "cr-dot-crlf": b"\r.\r\n",
    "crlf-dot-cr": b"\r\n.\r",
    "cr-dot-cr": b"\r.\r",
    "cr-dot-lf": b"\r.\n",
    "lf-dot-cr": b"\n.\r",
}


@pytest.mark.parametrize("ending", SMUGGLE_ENDINGS.values(), ids=SMUGGLE_ENDINGS.keys())
def test_smuggled_end_of_data_never_ends_data(
    daemon: Daemon, smtp: RawSMTP, ending: bytes
) -> None:
    token, smuggled = make_message_id(), make_message_id()
    smtp.start_mail("sender@remote.test", ["alice@example.test"])
    first = make_message("sender@remote.test", ["alice@example.test"], message_id=token,
                         body="innocent body")
    second = make_message("evil@remote.test", ["bob@example.test"], message_id=smuggled,
                          body="smuggled body\r\n")
    smtp.send(first + ending + b"MAIL FROM:<evil@remote.test>\r\n"
              b"RCPT TO:<bob@example.test>\r\nDATA\r\n" + second + b".\r\n")
    replies = [smtp.read_reply(), *_end_of_session(smtp)]
    first_reply = replies[0]
    assert first_reply.code // 100 == 5 and first_reply.enhanced == "5.5.2", \
        f"expected 5xx 5.5.2 after the real end of data, got {first_reply}; all: {replies}"
    assert all(r.code != 354 for r in replies), f"a smuggled DATA was accepted: {replies}"
    assert len(replies) <= 2, f"smuggled commands were answered: {[str(r) for r in replies]}"
    barrier(daemon)
    assert find_delivered(daemon, token) == []
    assert find_delivered(daemon, smuggled) == []


@pytest.mark.parametrize("bare", [b"\n", b"\r"], ids=["bare-lf", "bare-cr"])
def test_bare_line_ending_in_data_refused(daemon: Daemon, smtp: RawSMTP, bare: bytes) -> None:
    token = make_message_id()
    smtp.start_mail("sender@remote.test", ["alice@example.test"])
    message = make_message("sender@remote.test", ["alice@example.test"], message_id=token,
                           body="one" + bare.decode() + "two\r\n")
    smtp.send(message + b".\r\n")
    reply = smtp.read_reply()
    assert reply.code // 100 == 5 and reply.enhanced == "5.5.2", reply
    barrier(daemon)
    assert find_delivered(daemon, token) == []


def test_data_line_of_1000_octets_accepted(daemon: Daemon, smtp: RawSMTP) -> None:
    token = make_message_id()
    smtp.start_mail("sender@remote.test", ["carol@example.test"])
    line = "y" * 998  # + CRLF = 1000 octets, the RFC 5321 limit
    smtp.send(make_message("sender@remote.test", ["carol@example.test"], message_id=token,
                           body=line + "\r\n") + b".\r\n")
    queue_id(smtp.read_reply())
    (path,) = wait_for(lambda: find_delivered(daemon, token), 20, "delivery")
    assert line.encode() in path.read_bytes()


def test_data_line_over_1000_octets_refused(daemon: Daemon, smtp: RawSMTP) -> None:
    token = make_message_id()
    smtp.start_mail("sender@remote.test", ["alice@example.test"])
    smtp.send(make_message("sender@remote.test", ["alice@example.test"], message_id=token,
                           body="z" * 1200 + "\r\n") + b".\r\n")
    replies = [smtp.read_reply(), *_end_of_session(smtp)]
    assert replies[0].code // 100 == 5 and replies[0].enhanced == "5.5.2", replies
    assert len(replies) <= 2, [str(r) for r in replies]
    barrier(daemon)
    assert find_delivered(daemon, token) == []


def test_command_line_over_1000_octets_refused(smtp: RawSMTP) -> None:
    reply = smtp.cmd("MAIL FROM:<" + "a" * 1100 + "@remote.test>")
    assert reply.code // 100 == 5 and reply.enhanced == "5.5.2", reply
    replies = _end_of_session(smtp)
    assert len(replies) <= 1, f"the long line was answered more than once: {replies}"


def test_too_many_received_headers(daemon: Daemon, smtp: RawSMTP) -> None:
    token = make_message_id()
    hops = [f"Received: from hop{i}.test by hop{i + 1}.test; Mon, 23 Nov 2026 12:00:0{i} +0000"
            for i in range(MAX_HOPS + 1)]
    smtp.start_mail("sender@remote.test", ["alice@example.test"])
    smtp.send(make_message("sender@remote.test", ["alice@example.test"], message_id=token,
                           extra_headers=hops) + b".\r\n")
    check(smtp.read_reply(), TOO_MANY_HOPS)
    barrier(daemon)
    assert find_delivered(daemon, token) == []


def test_max_hops_received_headers_accepted(daemon: Daemon, smtp: RawSMTP) -> None:
    token = make_message_id()
    hops = [f"Received: from hop{i}.test by hop{i + 1}.test; Mon, 23 Nov 2026 12:00:0{i} +0000"
            for i in range(MAX_HOPS)]
    smtp.start_mail("sender@remote.test", ["erin@example.test"])
    smtp.send(make_message("sender@remote.test", ["erin@example.test"], message_id=token,
                           extra_headers=hops) + b".\r\n")
    queue_id(smtp.read_reply())
    wait_for(lambda: find_delivered(daemon, token), 20, "delivery")


# --- commands ------------------------------------------------------------------------------


def test_turn_refused(smtp: RawSMTP) -> None:
    check(smtp.cmd("TURN"), TURN_REFUSED)


def test_etrn_untrusted_refused(smtp: RawSMTP) -> None:
    check(smtp.cmd("ETRN example.test"), ETRN_DENIED)


def test_etrn_trusted_accepted(daemon: Daemon) -> None:
    with daemon.raw(source=TRUSTED) as raw:
        raw.banner()
        raw.ehlo("trusted.example.test")
        check(raw.cmd("ETRN elsewhere.test"), ETRN_OK)
        raw.check_enhanced_codes()


@pytest.mark.parametrize("command", ["FOOBAR", "XYZZY arg", "MAILFROM:<a@b.test>"])
def test_unknown_command(smtp: RawSMTP, command: str) -> None:
    check(smtp.cmd(command), UNKNOWN_COMMAND)


@pytest.mark.parametrize("dialog", [
    ["RCPT TO:<alice@example.test>"],
    ["DATA"],
    ["MAIL FROM:<a@remote.test>", "DATA"],
    ["MAIL FROM:<a@remote.test>", "MAIL FROM:<b@remote.test>"],
], ids=["rcpt-before-mail", "data-before-mail", "data-before-rcpt", "nested-mail"])
def test_sequence_errors(smtp: RawSMTP, dialog: list[str]) -> None:
    *setup, last = dialog
    for line in setup:
        check(smtp.cmd(line), OK)
    check(smtp.cmd(last), BAD_SEQUENCE)


@pytest.mark.parametrize("command", ["MAIL FROM:", "MAIL TO:<a@remote.test>", "RCPT",
                                     "EHLO", "HELO"])
def test_syntax_errors(smtp: RawSMTP, command: str) -> None:
    if command.startswith("RCPT"):
        check(smtp.cmd("MAIL FROM:<a@remote.test>"), OK)
    reply = smtp.cmd(command)
    assert reply.code == 501, reply
    assert reply.has_enhanced_codes(), reply


def test_rset_noop_help_vrfy_quit(smtp: RawSMTP) -> None:
    check(smtp.cmd("MAIL FROM:<a@remote.test>"), OK)
    check(smtp.cmd("RSET"), (250, "2.0.0"))
    check(smtp.cmd("RCPT TO:<alice@example.test>"), BAD_SEQUENCE)  # RSET ended it
    check(smtp.cmd("NOOP"), (250, "2.0.0"))
    expect(smtp.cmd("HELP"), 214)
    reply = expect(smtp.cmd("VRFY alice"), 252)
    assert reply.enhanced and reply.enhanced.startswith("2."), reply
    check(smtp.cmd("QUIT"), (221, "2.0.0"))
    assert smtp.wait_closed(), "QUIT did not close the connection"


def test_helo_then_mail_works(daemon: Daemon) -> None:
    with daemon.raw(source=UNTRUSTED) as raw:
        raw.banner()
        assert raw.cmd("HELO plain.example.test").code == 250
        check(raw.cmd("MAIL FROM:<a@remote.test>"), OK)
        check(raw.cmd("RCPT TO:<dave@example.test>"), OK)
        raw.check_enhanced_codes()


def test_pipelined_transaction(daemon: Daemon) -> None:
    token = make_message_id()
    with daemon.raw(source=UNTRUSTED) as raw:
        raw.banner()
        raw.ehlo("pipe.example.test")
        raw.send(b"MAIL FROM:<p@remote.test>\r\nRCPT TO:<dave@example.test>\r\n"
                 b"RCPT TO:<nobody@example.test>\r\nRCPT TO:<erin@example.test>\r\nDATA\r\n")
        replies = [raw.read_reply() for _ in range(5)]
        assert [r.code for r in replies] == [250, 250, 550, 250, 354], replies
        raw.send(make_message("p@remote.test", ["dave@example.test"], message_id=token)
                 + b".\r\nQUIT\r\n")
        queue_id(raw.read_reply())
        check(raw.read_reply(), (221, "2.0.0"))
        raw.check_enhanced_codes()
    delivered = wait_for(lambda: (lambda f: f if len(f) >= 2 else None)(
        find_delivered(daemon, token)), 20, "two deliveries")
    assert sorted(p.parent.parent.name for p in delivered) == ["dave", "erin"]


def test_local_delivery_from_untrusted(daemon: Daemon, smtp: RawSMTP) -> None:
    smtp.start_mail("sender@remote.test", ["bob@example.test"])
    token = make_message_id()
    smtp.send(make_message("sender@remote.test", ["bob@example.test"], message_id=token)
              + b".\r\n")
    qid = queue_id(smtp.read_reply())
    (path,) = wait_for(lambda: find_delivered(daemon, token), 20, "delivery")
    assert path.parent.parent == daemon.maildir("example.test", "bob")
    assert qid in path.read_text()


def test_a_half_closed_client_hears_its_250(daemon: Daemon) -> None:
    """The whole session pipelined, then shutdown(SHUT_WR): every reply comes back,
    the 250 of the queued message included, then the server closes (as Postfix)."""
    with socket.create_connection((daemon.host, daemon.port), timeout=10) as client:
        client.sendall(b"EHLO half.example.test\r\nMAIL FROM:<a@remote.test>\r\n"
                       b"RCPT TO:<alice@example.test>\r\nDATA\r\nSubject: half\r\n\r\n"
                       b"hi\r\n.\r\nQUIT\r\n")
        client.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := client.recv(4096):
            received += chunk
    lines = received.decode().splitlines()
    assert lines[-2].startswith("250 2.0.0 Ok: queued as "), lines
    assert lines[-1].startswith("221 "), lines
