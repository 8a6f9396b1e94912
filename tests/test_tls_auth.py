"""Inbound STARTTLS, implicit TLS and AUTH PLAIN/LOGIN over a real TLS handshake in memory.

The server is our SMTPServerProtocol; the client is the standard library's
ssl.SSLObject over memory BIOs (tests/tlssession.py), checking the server's
certificate against a throwaway CA. Password checks go through the gateway's
blocking runner (here a direct call, or a ManualRunner to show the session waits).
"""

from __future__ import annotations

import base64
import ssl
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.testing import StringTransport
from twisted.logger import formatEvent

from integration.tlsutil import IssuedCert, TestCA
from relaygw import auth, replies
from relaygw.auth import Authenticator, hash_password
from relaygw.config import AuthConfig, TLSConfig
from relaygw.smtpserver import REFUSAL_HANDSHAKE_GRACE, SMTPFactory
from relaygw.tlsserver import ServerTLS, TLSLoadError, implicit_tls_factory
from support import (
    HOSTNAME,
    RECEIVED_HEADER,
    UNTRUSTED_PEER,
    FakeGateway,
    ManualRunner,
    Session,
    direct_runner,
    log_events,
    make_gateway,
    malformed_replies,
    split_replies,
)
from tlssession import TLSSession

PASSWORD = "correct horse battery staple"
CHEAP = {"n": 2 ** 10}  # a self-describing hash may be cheap: tests need not wait for scrypt


def b64(text: str | bytes) -> str:
    data = text.encode() if isinstance(text, str) else text
    return base64.b64encode(data).decode()


PLAIN_OK = b64(f"\0alice\0{PASSWORD}")
PLAIN_BAD = b64("\0alice\0wrong password")

# named replies
READY = [replies.READY_FOR_TLS]
AUTH_OK = [replies.AUTH_OK]
AUTH_FAILED = [replies.AUTH_FAILED]


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="module")
def issued(ca: TestCA) -> IssuedCert:
    return ca.issue([HOSTNAME], stem="relay")


def secure_gateway(tmp_path: Path, issued: IssuedCert | None, *, auth_on: bool = True,
                   require_tls: bool = True, runner: Any = direct_runner,
                   **limits: int | str) -> FakeGateway:
    """A FakeGateway with [tls] (when ``issued``) and [auth] with the user alice."""
    gateway = make_gateway(tmp_path, **limits)
    config = gateway.config
    if issued is not None:
        tls = TLSConfig(certificate=issued.chain, private_key=issued.private_key)
        config = replace(config, tls=tls)
        gateway.server_tls = ServerTLS(tls)
        gateway.server_tls.load()
    if auth_on:
        users = tmp_path / "users"
        users.write_text(f"alice:{hash_password(PASSWORD, **CHEAP)}\n"
                         f"bob:{hash_password('bob password', **CHEAP)}\n")
        config = replace(config, auth=AuthConfig(users_file=users, require_tls=require_tls))
        gateway.authenticator = Authenticator(users, runner)
        gateway.authenticator.load()
    gateway.config = config
    return gateway


def ehlo_keywords(lines: list[str]) -> list[str]:
    assert lines[0] == f"250-{HOSTNAME}", lines
    return [line[4:] for line in lines[1:]]


def tls_session(gateway: FakeGateway, ca: TestCA, **kwargs: Any) -> TLSSession:
    session = TLSSession(gateway, ca.ca_pem, **kwargs)
    assert session.banner() == [replies.banner(HOSTNAME)]
    return session


def in_tls(gateway: FakeGateway, ca: TestCA, **kwargs: Any) -> TLSSession:
    """EHLO, STARTTLS, handshake, EHLO again."""
    session = tls_session(gateway, ca, **kwargs)
    session.send("EHLO client.test\r\n")
    session.starttls()
    session.send("EHLO client.test\r\n")
    return session


# --- STARTTLS ------------------------------------------------------------------------------


def test_starttls_offered_then_gone_and_auth_appears(tmp_path: Path, ca: TestCA,
                                                     issued: IssuedCert) -> None:
    gateway = secure_gateway(tmp_path, issued)
    session = tls_session(gateway, ca)
    before = ehlo_keywords(session.send("EHLO client.test\r\n"))
    assert "STARTTLS" in before
    assert not any(k.startswith("AUTH") for k in before)  # require_tls
    session.starttls()
    assert session.tls is not None and session.tls.version() in ("TLSv1.2", "TLSv1.3")
    assert session.protocol.tls_active
    after = ehlo_keywords(session.send("EHLO client.test\r\n"))
    assert "STARTTLS" not in after
    assert "AUTH PLAIN LOGIN" in after


def test_mail_inside_tls_is_received_with_esmtps(tmp_path: Path, ca: TestCA,
                                                 issued: IssuedCert) -> None:
    gateway = secure_gateway(tmp_path, issued)
    session = in_tls(gateway, ca)
    assert session.send("MAIL FROM:<a@client.test>\r\n") == [replies.SENDER_OK]
    assert session.send("RCPT TO:<alice@example.test>\r\n") == [replies.RECIPIENT_OK]
    assert session.send("DATA\r\n") == [replies.START_DATA]
    [reply] = session.send("Subject: x\r\n\r\nhi\r\n.\r\n")
    assert reply.startswith("250 2.0.0 Ok: queued as ")
    [queue_id] = gateway.queued_ids()
    message = gateway.message(queue_id)
    assert RECEIVED_HEADER.match(message)
    assert b" with ESMTPS id " in message


def test_commands_pipelined_behind_starttls_are_never_executed(
        tmp_path: Path, ca: TestCA, issued: IssuedCert) -> None:
    """CVE-2011-0411 / CVE-2024-34083: clear-text commands in the same packet as
    STARTTLS (a man in the middle's injection) are dropped, not run inside TLS."""
    gateway = secure_gateway(tmp_path, issued)
    session = tls_session(gateway, ca)
    session.send("EHLO client.test\r\n")
    lines = session.send("STARTTLS\r\nMAIL FROM:<evil@attacker.test>\r\n"
                         "RCPT TO:<alice@example.test>\r\n")
    assert lines == READY  # answered STARTTLS, nothing else
    assert session.protocol.transaction is None
    session.handshake()
    assert session.protocol.transaction is None
    # the injected MAIL did not open a transaction, and EHLO is needed again
    assert session.send("RCPT TO:<alice@example.test>\r\n") == [replies.NEED_MAIL]
    assert session.protocol.helo is None  # what EHLO said before TLS is forgotten
    session.send("EHLO client.test\r\n")
    assert session.send("MAIL FROM:<a@client.test>\r\n") == [replies.SENDER_OK]
    assert gateway.queued_ids() == []


def test_clear_text_after_ready_breaks_the_handshake(tmp_path: Path, ca: TestCA,
                                                     issued: IssuedCert) -> None:
    """Clear text sent after the 220, before any handshake, is fed to TLS: it fails
    and the connection closes; the command is never run."""
    gateway = secure_gateway(tmp_path, issued)
    session = tls_session(gateway, ca)
    session.send("EHLO client.test\r\n")
    assert session.send("STARTTLS\r\n") == READY
    session.send_raw(b"MAIL FROM:<evil@attacker.test>\r\n")
    assert session.transport.closed
    assert session.protocol.transaction is None


def test_starttls_resets_authentication(tmp_path: Path, ca: TestCA,
                                        issued: IssuedCert) -> None:
    gateway = secure_gateway(tmp_path, issued, require_tls=False)
    session = tls_session(gateway, ca)
    assert "AUTH PLAIN LOGIN" in ehlo_keywords(session.send("EHLO client.test\r\n"))
    assert session.send(f"AUTH PLAIN {PLAIN_OK}\r\n") == AUTH_OK
    session.starttls()
    assert session.protocol.authenticated_user is None
    assert session.protocol.helo is None


@pytest.mark.parametrize(("setup", "command", "expected"), [
    ("plain", "STARTTLS now", replies.SYNTAX_STARTTLS),
    ("tls", "STARTTLS", replies.TLS_ALREADY_ACTIVE),
    ("no-tls", "STARTTLS", replies.NOT_IMPLEMENTED),  # as Postfix without TLS
], ids=["argument", "already-in-tls", "no-tls-section"])
def test_starttls_refusals(tmp_path: Path, ca: TestCA, issued: IssuedCert, setup: str,
                           command: str, expected: str) -> None:
    gateway = secure_gateway(tmp_path, None if setup == "no-tls" else issued)
    session = in_tls(gateway, ca) if setup == "tls" else tls_session(gateway, ca)
    if setup != "tls":
        session.send("EHLO client.test\r\n")
    assert session.send(f"{command}\r\n") == [expected]
    assert malformed_replies([expected]) == []


def test_starttls_not_offered_on_implicit_tls(tmp_path: Path, issued: IssuedCert) -> None:
    gateway = secure_gateway(tmp_path, issued)
    session = Session(gateway, kind="submissions")
    session.new_lines()
    keywords = ehlo_keywords(session.send("EHLO client.test\r\n"))
    assert "STARTTLS" not in keywords
    assert "AUTH PLAIN LOGIN" in keywords
    assert session.send("STARTTLS\r\n") == [replies.TLS_ALREADY_ACTIVE]


def test_reload_gives_new_sessions_the_new_certificate(tmp_path: Path, ca: TestCA) -> None:
    first = ca.issue([HOSTNAME], stem="reload")
    gateway = secure_gateway(tmp_path, first)
    old = in_tls(gateway, ca)
    assert old.tls is not None
    old_serial = old.tls.getpeercert()["serialNumber"]  # type: ignore[index]
    ca.issue([HOSTNAME], stem="reload")  # renewed in place: same file names
    assert gateway.server_tls is not None
    gateway.server_tls.load()
    new = in_tls(gateway, ca)
    assert new.tls is not None
    assert new.tls.getpeercert()["serialNumber"] != old_serial  # type: ignore[index]
    # the session in flight goes on with its own connection
    assert old.send("NOOP\r\n") == [replies.OK]


def test_reload_of_a_broken_certificate_keeps_the_old_one(tmp_path: Path, ca: TestCA) -> None:
    issued = ca.issue([HOSTNAME], stem="broken")
    gateway = secure_gateway(tmp_path, issued)
    assert gateway.server_tls is not None
    before = gateway.server_tls.options
    issued.chain.write_text("not a certificate\n")
    with pytest.raises(TLSLoadError, match="certificate"):
        gateway.server_tls.load()
    assert gateway.server_tls.options is before
    in_tls(gateway, ca)  # still serves TLS


def test_key_that_does_not_match_the_certificate(tmp_path: Path, ca: TestCA) -> None:
    one, other = ca.issue([HOSTNAME], stem="one"), ca.issue([HOSTNAME], stem="other")
    tls = ServerTLS(TLSConfig(certificate=one.certificate, private_key=other.private_key))
    with pytest.raises(TLSLoadError, match="does not match"):
        tls.load()


def test_only_tls_1_2_and_later_with_forward_secrecy(tmp_path: Path, ca: TestCA,
                                                     issued: IssuedCert) -> None:
    from OpenSSL import SSL

    gateway = secure_gateway(tmp_path, issued)
    assert gateway.server_tls is not None and gateway.server_tls.options is not None
    refused = SSL.OP_NO_SSLv2 | SSL.OP_NO_SSLv3 | SSL.OP_NO_TLSv1 | SSL.OP_NO_TLSv1_1
    assert gateway.server_tls.options._options & refused == refused
    session = tls_session(gateway, ca)
    session.context.maximum_version = ssl.TLSVersion.TLSv1_2
    session.send("EHLO client.test\r\n")
    session.starttls()
    assert session.tls is not None and session.tls.version() == "TLSv1.2"
    cipher = session.tls.cipher()
    assert cipher is not None and cipher[0].startswith("ECDHE-")
    assert "GCM" in cipher[0] or "CHACHA20" in cipher[0]


def implicit_tls_client(gateway: FakeGateway, ca: TestCA) -> tuple[TLSSession, StringTransport]:
    """A ``submissions`` connection and its client half, before the handshake."""
    assert gateway.server_tls is not None
    factory = implicit_tls_factory(gateway.server_tls,
                                   SMTPFactory(gateway, "submissions", "test"), gateway.clock)
    wire = StringTransport(peerAddress=UNTRUSTED_PEER)
    protocol = factory.buildProtocol(UNTRUSTED_PEER)
    protocol.makeConnection(wire)
    client = TLSSession.__new__(TLSSession)  # the client half only, over this wire
    client.transport = _Wire(wire, protocol, gateway.clock)  # type: ignore[assignment]
    client.context = ssl.create_default_context(cafile=str(ca.ca_pem))
    client.server_name = HOSTNAME
    client.incoming, client.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client._seen, client._plain = 0, b""
    return client, wire


def test_implicit_tls_listener(tmp_path: Path, ca: TestCA, issued: IssuedCert) -> None:
    """``submissions``: TLS from the first byte; the banner comes after the handshake."""
    gateway = secure_gateway(tmp_path, issued)
    client, wire = implicit_tls_client(gateway, ca)
    assert wire.value() == b""  # nothing in clear text
    client.handshake()
    assert split_replies(client._read_tls()) == [replies.banner(HOSTNAME)]
    keywords = ehlo_keywords(client.send("EHLO client.test\r\n"))
    assert "AUTH PLAIN LOGIN" in keywords and "STARTTLS" not in keywords
    assert client.send("MAIL FROM:<a@client.test>\r\n") == [replies.AUTH_REQUIRED]
    assert client.send(f"AUTH PLAIN {PLAIN_OK}\r\n") == AUTH_OK
    assert client.send("MAIL FROM:<a@client.test>\r\n") == [replies.SENDER_OK]
    assert client.send("RCPT TO:<someone@elsewhere.test>\r\n") == [replies.RECIPIENT_OK]
    client.send("DATA\r\n")
    client.send("Subject: x\r\n\r\nhi\r\n.\r\n")
    [queue_id] = gateway.queued_ids()
    assert b" with ESMTPSA id " in gateway.message(queue_id)


class _Wire:
    """The client's view of an implicit-TLS connection: bytes to the TLS protocol."""

    def __init__(self, wire: StringTransport, protocol: Any, clock: Any) -> None:
        self.clock = clock
        self.wire = wire
        self.protocol = protocol

    def value(self) -> bytes:
        self.clock.advance(0)  # the TLS layer flushes aggregated writes on the next turn
        return self.wire.value()

    def receive(self, data: bytes) -> None:
        self.protocol.dataReceived(data)


# --- AUTH ----------------------------------------------------------------------------------


@pytest.fixture
def secure(tmp_path: Path, issued: IssuedCert) -> FakeGateway:
    return secure_gateway(tmp_path, issued)


def test_auth_plain_initial_response(secure: FakeGateway, ca: TestCA) -> None:
    session = in_tls(secure, ca)
    assert session.send(f"AUTH PLAIN {PLAIN_OK}\r\n") == AUTH_OK
    assert session.protocol.authenticated_user == "alice"
    assert session.protocol.trusted


def test_auth_plain_challenge(secure: FakeGateway, ca: TestCA) -> None:
    session = in_tls(secure, ca)
    assert session.send("AUTH PLAIN\r\n") == ["334 "]
    assert session.send(f"{PLAIN_OK}\r\n") == AUTH_OK


def test_auth_login(secure: FakeGateway, ca: TestCA) -> None:
    session = in_tls(secure, ca)
    assert session.send("AUTH LOGIN\r\n") == [replies.AUTH_USERNAME]
    assert session.send(f"{b64('alice')}\r\n") == [replies.AUTH_PASSWORD]
    assert session.send(f"{b64(PASSWORD)}\r\n") == AUTH_OK
    assert session.protocol.authenticated_user == "alice"


def test_auth_login_with_initial_user(secure: FakeGateway, ca: TestCA) -> None:
    session = in_tls(secure, ca)
    assert session.send(f"auth login {b64('bob')}\r\n") == [replies.AUTH_PASSWORD]
    assert session.send(f"{b64('bob password')}\r\n") == AUTH_OK
    assert session.protocol.authenticated_user == "bob"


@pytest.mark.parametrize("response", [
    PLAIN_BAD,
    b64(f"\0nobody\0{PASSWORD}"),
    b64(f"bob\0alice\0{PASSWORD}"),      # acting as another user: refused
    b64(f"alice\0{PASSWORD}"),           # not three fields
    b64(b"\0alice\0\xff\xfe"),           # not UTF-8
    "=",                                 # empty
], ids=["wrong-password", "unknown-user", "other-authzid", "two-fields", "not-utf8", "empty"])
def test_auth_plain_refused(secure: FakeGateway, ca: TestCA, response: str) -> None:
    session = in_tls(secure, ca)
    assert session.send(f"AUTH PLAIN {response}\r\n") == AUTH_FAILED
    assert session.protocol.authenticated_user is None
    assert not session.transport.closed


def test_auth_login_wrong_password(secure: FakeGateway, ca: TestCA) -> None:
    session = in_tls(secure, ca)
    session.send("AUTH LOGIN\r\n")
    session.send(f"{b64('alice')}\r\n")
    assert session.send(f"{b64('nope')}\r\n") == AUTH_FAILED


@pytest.mark.parametrize(("dialog", "expected"), [
    (["AUTH PLAIN !!notbase64"], replies.AUTH_BAD_BASE64),
    (["AUTH PLAIN", "!!notbase64"], replies.AUTH_BAD_BASE64),
    (["AUTH LOGIN", "*"], replies.AUTH_CANCELLED),
    (["AUTH PLAIN", "*"], replies.AUTH_CANCELLED),
    (["AUTH LOGIN", b64("alice"), "*"], replies.AUTH_CANCELLED),
    (["AUTH CRAM-MD5"], replies.AUTH_UNKNOWN_MECHANISM),
    (["AUTH"], replies.AUTH_SYNTAX),
    ([f"AUTH PLAIN {PLAIN_OK}", f"AUTH PLAIN {PLAIN_OK}"], replies.AUTH_ALREADY),
    (["MAIL FROM:<a@client.test>", f"AUTH PLAIN {PLAIN_OK}"], replies.AUTH_IN_TRANSACTION),
], ids=["bad-base64-initial", "bad-base64-response", "cancel-login", "cancel-plain",
        "cancel-password", "unknown-mechanism", "no-mechanism", "twice", "in-transaction"])
def test_auth_dialog_errors(tmp_path: Path, ca: TestCA, issued: IssuedCert,
                            dialog: list[str], expected: str) -> None:
    # a trusted smtp session, so that MAIL is allowed before AUTH
    gateway = secure_gateway(tmp_path, issued)
    session = in_tls(gateway, ca)
    for line in dialog[:-1]:
        session.send(f"{line}\r\n")
    assert session.send(f"{dialog[-1]}\r\n") == [expected]
    assert malformed_replies([expected]) == []
    # the exchange is over: the next line is a command again
    assert session.send("NOOP\r\n") == [replies.OK]


def test_auth_outside_tls_when_tls_required(secure: FakeGateway, ca: TestCA) -> None:
    session = tls_session(secure, ca)
    session.send("EHLO client.test\r\n")
    assert session.send(f"AUTH PLAIN {PLAIN_OK}\r\n") == [replies.AUTH_NEEDS_TLS]
    assert session.protocol.authenticated_user is None
    assert replies.AUTH_NEEDS_TLS.startswith("538 5.7.11 ")


def test_auth_in_clear_text_when_allowed(tmp_path: Path) -> None:
    gateway = secure_gateway(tmp_path, None, require_tls=False)
    session = Session(gateway)
    session.new_lines()
    keywords = ehlo_keywords(session.send("EHLO client.test\r\n"))
    assert "AUTH PLAIN LOGIN" in keywords and "STARTTLS" not in keywords
    assert session.send(f"AUTH PLAIN {PLAIN_OK}\r\n") == AUTH_OK


def test_no_auth_section(tmp_path: Path, ca: TestCA, issued: IssuedCert) -> None:
    gateway = secure_gateway(tmp_path, issued, auth_on=False)
    session = in_tls(gateway, ca)
    assert session.send(f"AUTH PLAIN {PLAIN_OK}\r\n") == [replies.NOT_IMPLEMENTED]


def test_auth_before_ehlo(secure: FakeGateway) -> None:
    session = Session(secure, kind="submissions")
    session.new_lines()
    assert session.send(f"AUTH PLAIN {PLAIN_OK}\r\n") == [replies.NEED_HELO]


def test_too_many_failures_close_the_connection(tmp_path: Path, ca: TestCA,
                                                issued: IssuedCert) -> None:
    gateway = secure_gateway(tmp_path, issued, max_auth_failures=2)
    session = in_tls(gateway, ca)
    assert session.send(f"AUTH PLAIN {PLAIN_BAD}\r\n") == AUTH_FAILED
    assert not session.transport.closed
    lines = session.send(f"AUTH PLAIN {PLAIN_BAD}\r\n")
    assert lines == [replies.AUTH_FAILED,
                     f"421 4.7.0 {HOSTNAME} Error: too many authentication failures"]
    assert session.transport.closed
    assert session.send(f"AUTH PLAIN {PLAIN_OK}\r\n") == []


def test_submission_needs_auth_before_mail(secure: FakeGateway, ca: TestCA) -> None:
    session = in_tls(secure, ca, kind="submission", peer=UNTRUSTED_PEER)
    assert session.send("MAIL FROM:<a@client.test>\r\n") == [replies.AUTH_REQUIRED]
    assert replies.AUTH_REQUIRED.startswith("530 5.7.0 ")
    assert session.send(f"AUTH PLAIN {PLAIN_OK}\r\n") == AUTH_OK
    assert session.send("MAIL FROM:<a@client.test>\r\n") == [replies.SENDER_OK]
    # authenticated: trusted for relaying, from an untrusted address
    assert session.send("RCPT TO:<someone@elsewhere.test>\r\n") == [replies.RECIPIENT_OK]
    assert session.send("DATA\r\n") == [replies.START_DATA]
    [reply] = session.send("Subject: x\r\n\r\nhi\r\n.\r\n")
    assert reply.startswith("250 2.0.0 Ok: queued as ")
    [queue_id] = secure.queued_ids()
    assert b" with ESMTPSA id " in secure.message(queue_id)


def test_untrusted_smtp_client_may_not_relay_without_auth(secure: FakeGateway,
                                                          ca: TestCA) -> None:
    session = in_tls(secure, ca, peer=UNTRUSTED_PEER)
    session.send("MAIL FROM:<a@client.test>\r\n")
    assert session.send("RCPT TO:<someone@elsewhere.test>\r\n")[0].startswith("554 5.7.1")


def test_password_check_runs_in_the_pool_and_the_session_waits(
        tmp_path: Path, ca: TestCA, issued: IssuedCert) -> None:
    runner = ManualRunner()
    gateway = secure_gateway(tmp_path, issued, runner=runner)
    session = in_tls(gateway, ca, kind="submission")
    # MAIL pipelined behind AUTH must wait for the verdict, not get 530
    lines = session.send(f"AUTH PLAIN {PLAIN_OK}\r\nMAIL FROM:<a@client.test>\r\n")
    assert lines == []
    [(fn, _args, _)] = runner.pending
    assert fn is auth.verify_password  # scrypt is not run on the reactor thread
    runner.run_all()
    assert session._read_tls() == (f"{replies.AUTH_OK}\r\n{replies.SENDER_OK}\r\n").encode()


def test_unknown_user_costs_a_hash_too(tmp_path: Path) -> None:
    runner = ManualRunner()
    users = tmp_path / "users"
    users.write_text(f"alice:{hash_password(PASSWORD, **CHEAP)}\n")
    authenticator = Authenticator(users, runner)
    authenticator.load()
    d = authenticator.check("nobody", PASSWORD)
    assert len(runner.pending) == 1  # the same scrypt work as for a real user
    runner.run_all()
    assert d.result is False  # type: ignore[attr-defined]


@pytest.fixture
def all_log_events() -> Iterator[list[dict[str, Any]]]:
    with log_events() as events:
        yield events


def test_passwords_and_their_base64_are_never_logged(
        tmp_path: Path, ca: TestCA, issued: IssuedCert,
        all_log_events: list[dict[str, Any]]) -> None:
    gateway = secure_gateway(tmp_path, issued, max_auth_failures=3)
    session = in_tls(gateway, ca, kind="submission")
    secrets = [PASSWORD, "wrong password", PLAIN_OK, PLAIN_BAD, b64(PASSWORD),
               b64("wrong password")]
    session.send(f"AUTH PLAIN {PLAIN_BAD}\r\n")
    session.send("AUTH LOGIN\r\n")
    session.send(f"{b64('alice')}\r\n")
    session.send(f"{b64('wrong password')}\r\n")
    session.send("AUTH PLAIN\r\n")
    assert session.send(f"{PLAIN_OK}\r\n") == AUTH_OK
    assert any("auth_failed" in repr(e) for e in all_log_events)  # failures are logged...
    for event in all_log_events:
        text = formatEvent(event) + repr(event)
        for secret in secrets:
            assert secret not in text, (secret, text)  # ...but never what was typed


# --- auth.py -------------------------------------------------------------------------------


def test_hash_round_trip_and_form() -> None:
    stored = hash_password("s3cret", **CHEAP)
    scheme, n, r, p, salt, digest = stored.split("$")
    assert (scheme, n, r, p) == ("scrypt", "1024", "8", "1")
    assert len(base64.b64decode(salt)) == 16 and len(base64.b64decode(digest)) == 32
    assert auth.verify_password("s3cret", stored)
    assert not auth.verify_password("s3cret ", stored)
    assert not auth.verify_password("", stored)


def test_default_cost_and_random_salt() -> None:
    one, two = hash_password("same"), hash_password("same")
    assert one != two  # per-user random salt
    assert one.startswith(f"scrypt${auth.SCRYPT_N}$8$1$")
    assert auth.verify_password("same", one) and auth.verify_password("same", two)


def test_verify_compares_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = auth.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    stored = hash_password("x", **CHEAP)
    assert auth.verify_password("x", stored)
    assert not auth.verify_password("y", stored)
    assert len(calls) == 2


@pytest.mark.parametrize("stored", [
    "", "plain", "scrypt$1024$8$1$c2FsdA==", "md5$1$2$3$c2FsdA==$aGFzaA==",
    "scrypt$1000$8$1$c2FsdGZvcnRlc3RzMTIzNA==$" + b64(b"x" * 32),     # N not a power of 2
    f"scrypt${2 ** 30}$8$1$c2FsdGZvcnRlc3RzMTIzNA==$" + b64(b"x" * 32),  # too costly
    "scrypt$1024$8$1$!!!$" + b64(b"x" * 32),
], ids=["empty", "plain", "five-fields", "other-scheme", "bad-n", "huge-n", "bad-salt"])
def test_malformed_hashes_never_verify(stored: str) -> None:
    assert not auth.verify_password("anything", stored)
    with pytest.raises(ValueError):
        auth.parse_hash(stored)


def test_users_file_parsing() -> None:
    stored = hash_password("x", **CHEAP)
    users = auth.parse_users(f"# comment\n\nalice:{stored}\n  bob:{stored}  \n")
    assert users == {"alice": stored, "bob": stored}
    with pytest.raises(auth.UsersFileError, match="line 2"):
        auth.parse_users(f"alice:{stored}\nbob\n", "users")
    with pytest.raises(auth.UsersFileError, match="line 1: user alice"):
        auth.parse_users("alice:plaintext\n", "users")


def test_set_password_is_atomic_keeps_others_and_is_private(tmp_path: Path) -> None:
    path = tmp_path / "users"
    auth.set_password(path, "alice", hash_password("a1", **CHEAP))
    assert path.stat().st_mode & 0o777 == 0o600
    path.write_text("# our users\n" + path.read_text())
    auth.set_password(path, "bob", hash_password("b1", **CHEAP))
    auth.set_password(path, "alice", hash_password("a2", **CHEAP))
    text = path.read_text()
    assert text.startswith("# our users\nalice:")
    users = auth.load_users(path)
    assert set(users) == {"alice", "bob"}
    assert auth.verify_password("a2", users["alice"])
    assert auth.verify_password("b1", users["bob"])
    assert path.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["users"]  # no temp file left


@pytest.mark.parametrize("user", ["", "a:b", "a b", "tab\there", "x" * 256])
def test_bad_user_names(tmp_path: Path, user: str) -> None:
    with pytest.raises(auth.UsersFileError):
        auth.set_password(tmp_path / "users", user, hash_password("x", **CHEAP))


def test_missing_users_file_is_no_users(tmp_path: Path) -> None:
    assert auth.load_users(tmp_path / "absent") == {}


# --- wiring: build_service, start-up and reload --------------------------------------------

SECURE_CONFIG = """
[server]
hostname = "relay.example.test"
[[listener]]
endpoint = "tcp:2587:interface=127.0.0.1"
kind = "submission"
[[listener]]
endpoint = "tcp:2465:interface=127.0.0.1"
kind = "submissions"
[tls]
certificate = "{certificate}"
private_key = "{key}"
[auth]
users_file = "{users}"
[queue]
directory = "{spool}"
[[route]]
domains = ["*"]
action = "relay"
"""


def secure_service(tmp_path: Path, issued: IssuedCert) -> tuple[Any, Any, Any]:
    from twisted.internet.defer import maybeDeferred
    from twisted.internet.testing import MemoryReactorClock

    from relaygw.config import parse_config
    from relaygw.service import build_service

    users = tmp_path / "users"
    users.write_text(f"alice:{hash_password(PASSWORD, **CHEAP)}\n")
    config = parse_config(SECURE_CONFIG.format(
        certificate=issued.chain, key=issued.private_key, users=users, spool=tmp_path / "spool"))
    reactor = MemoryReactorClock()
    top = build_service(config, reactor, run_blocking=lambda fn, *a: maybeDeferred(fn, *a))
    return top, top.getServiceNamed("gateway"), reactor


def test_build_service_wraps_submissions_in_tls(tmp_path: Path, issued: IssuedCert) -> None:
    from twisted.protocols.tls import TLSMemoryBIOFactory

    top, gateway, reactor = secure_service(tmp_path, issued)
    top.startService()
    try:
        factories = {port: factory for port, factory, _, _ in reactor.tcpServers}
        assert isinstance(factories[2465], TLSMemoryBIOFactory)
        assert isinstance(factories[2587], SMTPFactory)
        assert gateway.server_tls.options is not None
        assert set(gateway.authenticator.users) == {"alice"}
    finally:
        top.stopService()


def test_unusable_certificate_stops_start_up(tmp_path: Path, ca: TestCA) -> None:
    issued = ca.issue([HOSTNAME], stem="startup")
    issued.private_key.write_text("garbage\n")
    top, _, reactor = secure_service(tmp_path, issued)
    with pytest.raises(SystemExit, match=r"configuration error: .*\[tls\] private_key"):
        top.startService()
    assert reactor.tcpServers == []  # nothing listens


def test_gateway_reload_tls_keeps_the_old_on_error(tmp_path: Path, ca: TestCA,
                                                   all_log_events: list[dict[str, Any]]) -> None:
    issued = ca.issue([HOSTNAME], stem="gw-reload")
    top, gateway, _ = secure_service(tmp_path, issued)
    top.startService()
    try:
        before = gateway.server_tls.options
        issued.chain.write_text("garbage\n")
        (tmp_path / "users").write_text(
            f"alice:{hash_password(PASSWORD, **CHEAP)}\ncarol:{hash_password('c', **CHEAP)}\n")
        gateway.reload_tls()
        assert gateway.server_tls.options is before
        assert set(gateway.authenticator.users) == {"alice", "carol"}  # users reloaded too
        assert any("keeping the previous certificate" in formatEvent(e)
                   for e in all_log_events)
        ca.issue([HOSTNAME], stem="gw-reload")
        gateway.reload_tls()
        assert gateway.server_tls.options is not before
    finally:
        top.stopService()


def test_a_broken_password_check_answers_454(tmp_path: Path, ca: TestCA, issued: IssuedCert,
                                             all_log_events: list[dict[str, Any]]) -> None:
    from twisted.internet.defer import fail

    def broken_runner(fn: Any, *args: Any) -> Any:
        return fail(MemoryError("scrypt: out of memory"))

    gateway = secure_gateway(tmp_path, issued, runner=broken_runner)
    session = in_tls(gateway, ca)
    assert session.send(f"AUTH PLAIN {PLAIN_OK}\r\n") == [replies.AUTH_TEMPORARY]
    assert session.protocol.authenticated_user is None
    assert session.send("NOOP\r\n") == [replies.OK]
    for event in all_log_events:
        assert PASSWORD not in formatEvent(event) + repr(event)


def test_starttls_on_a_transport_without_tls(tmp_path: Path, issued: IssuedCert) -> None:
    gateway = secure_gateway(tmp_path, issued)
    session = Session(gateway)  # a plain StringTransport: no startTLS
    session.new_lines()
    assert "STARTTLS" not in ehlo_keywords(session.send("EHLO client.test\r\n"))
    assert session.send("STARTTLS\r\n") == [replies.TLS_UNAVAILABLE]


def test_a_session_that_never_starts_its_handshake_is_aborted_at_the_timeout(
        tmp_path: Path, ca: TestCA, issued: IssuedCert) -> None:
    """``submissions`` with no ClientHello ever: the 421 cannot reach the client,
    and TLS's orderly close would wait for the handshake forever, holding the
    client's connection slot."""
    gateway = secure_gateway(tmp_path, issued)
    _, wire = implicit_tls_client(gateway, ca)
    gateway.clock.advance(30)  # command_timeout
    assert wire.disconnected  # aborted (StringTransport's mark), not waiting
    assert wire.value() == b""  # nothing in clear text, ever


def test_an_implicit_tls_client_over_the_limit_hears_its_421(
        tmp_path: Path, ca: TestCA, issued: IssuedCert) -> None:
    gateway = secure_gateway(tmp_path, issued, max_connections=1)
    implicit_tls_client(gateway, ca)  # holds the one slot
    refused, wire = implicit_tls_client(gateway, ca)
    refused.handshake()
    assert split_replies(refused._read_tls()) == [
        replies.too_many_connections(HOSTNAME)]
    assert not wire.disconnected  # not aborted: TLS closes in order
    _, silent_wire = implicit_tls_client(gateway, ca)  # never handshakes
    gateway.clock.advance(REFUSAL_HANDSHAKE_GRACE - 0.1)
    assert not silent_wire.disconnected
    gateway.clock.advance(0.1)
    assert silent_wire.disconnected  # aborted (StringTransport's mark)
