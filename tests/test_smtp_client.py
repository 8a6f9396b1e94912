"""The outbound SMTP client and relay deliverer: replies, dot-stuffing, pipelining,
per-recipient results, next-hop fallback, timeouts.

Three levels: the protocol alone on a StringTransport; the deliverer against
a scripted dialog on a StringTransport (to see exactly what was written, and
when); the deliverer against a scripted server in memory (iosim) through the
real TCP endpoints of a MemoryReactorClock.
"""

from __future__ import annotations

import base64
import io
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.error import ConnectionLost, ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.test.iosim import ConnectionCompleter

from core_fakes import journaled_spool, queue_message, sync_run
from relaygw.config import Config, parse_config
from relaygw.delivery import smtpclient
from relaygw.delivery.smtp import SMTPRelayDeliverer, parse_ehlo
from relaygw.delivery.smtpclient import (
    CHUNK_SIZE,
    DotStuffer,
    MessageProducer,
    Reply,
    SMTPClientProtocol,
    SMTPConnectionLost,
    SMTPProtocolError,
    SMTPTimeout,
    Timeouts,
)
from relaygw.dns import Answer, Hop, NextHopResolver, NXDomain, lookup_failed
from relaygw.envelope import Envelope, Recipient
from relaygw.interfaces import DeliveryResult, IDeliverer, Status
from relaygw.messagecache import WireReady
from relaygw.spool import Spool
from support import logged_errors

MX_PORT = 2525
DEFAULT_TIMEOUTS = Timeouts()


def config(extra: str = "", relay_tls: str = "none") -> Config:
    return parse_config(f"""
[server]
hostname = "relay.example.test"
[[listener]]
endpoint = "tcp:2525"
[relay]
mx_port = {MX_PORT}
tls = "{relay_tls}"
{extra}
[[route]]
domains = ["*"]
action = "relay"
""", "test.toml")


DEFAULT_CONTENT = b"Subject: hi\r\n\r\nHello.\r\n"


def envelope(*addresses: str, sender: str = "alice@origin.test",
             size: int = len(DEFAULT_CONTENT)) -> Envelope:
    return Envelope(id="Q1", sender=sender, received=0.0, size=size,
                    recipients=[Recipient(address=a, original=a, action="relay")
                                for a in addresses])


def message(tmp_path: Path, content: bytes = DEFAULT_CONTENT) -> Path:
    """A queue file: ``content`` then bytes a delivery must never send (the trailer)."""
    path = tmp_path / "message"
    path.write_bytes(content + b"\n{not part of the message}\n")
    return path


class FakeLookup:
    def __init__(self, table: dict[tuple[str, str], Answer | Exception]) -> None:
        self.table = table

    def lookup(self, name: str, rdtype: str) -> Deferred[Answer]:
        result = self.table.get((name, rdtype), Answer((), 60))
        if isinstance(result, Exception):
            return Deferred.fromCoroutine(_raise(result))
        return succeed(result)


async def _raise(error: Exception) -> Answer:
    raise error


def two_mx_resolver() -> NextHopResolver:
    return NextHopResolver(FakeLookup({
        ("example.test", "MX"): Answer(((10, "mx1.example.test"), (20, "mx2.example.test")), 60),
        ("mx1.example.test", "A"): Answer(("127.0.0.2",), 60),
        ("mx2.example.test", "A"): Answer(("127.0.0.3",), 60),
    }))


def result_of(d: Deferred[Any]) -> Any:
    results: list[object] = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    assert not isinstance(results[0], Failure), results[0]
    return results[0]


def failure_of(d: Deferred[Any]) -> Failure:
    """The Failure a fired Deferred failed with (consumed)."""
    results: list[object] = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    assert isinstance(results[0], Failure), results[0]
    return results[0]


def assert_times_out(clock: Clock, d: Deferred[Any], seconds: float, what: str) -> None:
    """``d`` still waits ``seconds`` - 1 from now, and fails at ``seconds`` with an
    SMTPTimeout that names ``what``."""
    clock.advance(seconds - 1)
    assert not d.called
    clock.advance(1)
    failure = failure_of(d)
    assert failure.check(SMTPTimeout) and what in failure.getErrorMessage()


MX1 = "mx1.example.test[127.0.0.2]:2525"
MX2 = "mx2.example.test[127.0.0.3]:2525"


# --- a scripted SMTP server ------------------------------------------------------------


@dataclass
class Script:
    """How one fake server connection answers; replies may be multi-line ("\\r\\n")."""

    greeting: str = "220 mx.example.test ESMTP fake"
    extensions: list[str] | None = field(
        default_factory=lambda: ["PIPELINING", "SIZE 10240000", "8BITMIME"])
    mail: str = "250 2.1.0 Ok"
    rcpt: dict[str, str] = field(default_factory=dict)
    data: str = "354 End data with <CR><LF>.<CR><LF>"
    final: str = "250 2.0.0 Ok: queued as ABC"
    drop_after_dot: bool = False
    tls_options: Any = None          # offer STARTTLS with these server options
    users: dict[str, str] | None = None  # offer AUTH with these mechanisms
    mechanisms: str = "PLAIN LOGIN"


class FakeSMTPServer(Protocol):
    """Answers per a Script and records the commands and the raw DATA it got."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.commands: list[str] = []
        self.messages: list[bytes] = []
        self.tls = False
        self.authenticated: str | None = None
        self.closed: Deferred[None] = Deferred()
        self._buffer = b""
        self._in_data = False
        self._auth_login: list[bytes] | None = None

    def connectionMade(self) -> None:
        self.reply(self.script.greeting)

    def connectionLost(self, reason: object = None) -> None:
        self.closed.callback(None)

    def reply(self, text: str) -> None:
        self.transport.write(text.encode() + b"\r\n")

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        while True:
            if self._in_data:
                end = (b"\r\n" + self._buffer).find(b"\r\n.\r\n")
                if end < 0:
                    return
                self.messages.append(self._buffer[:end + 3])
                self._buffer = self._buffer[end + 3:]
                self._in_data = False
                if self.script.drop_after_dot:
                    self.transport.loseConnection()
                    return
                self.reply(self.script.final)
                continue
            line, sep, rest = self._buffer.partition(b"\r\n")
            if not sep:
                return
            self._buffer = rest
            self.command(line.decode())

    def command(self, line: str) -> None:
        if self._auth_login is not None:
            self._auth_login.append(base64.b64decode(line))
            if len(self._auth_login) == 1:
                self.reply("334 UGFzc3dvcmQ6")
            else:
                user, password = (v.decode() for v in self._auth_login)
                self._auth_login = None
                self.check_login(user, password)
            return
        self.commands.append(line)
        verb = line.split(" ", 1)[0].upper()
        if verb == "EHLO":
            if self.script.extensions is None:
                self.reply("502 5.5.2 Error: command not recognized")
                return
            extensions = list(self.script.extensions)
            if self.script.tls_options is not None and not self.tls:
                extensions.append("STARTTLS")
            if self.script.users is not None:
                extensions.append(f"AUTH {self.script.mechanisms}")
            lines = ["mx.example.test", *extensions]
            self.reply("\r\n".join(f"250{'-' if i < len(lines) - 1 else ' '}{text}"
                                   for i, text in enumerate(lines)))
        elif verb == "HELO":
            self.reply("250 mx.example.test")
        elif verb == "STARTTLS":
            self.reply("220 2.0.0 Ready to start TLS")
            self.transport.startTLS(self.script.tls_options)
            self.tls = True
        elif verb == "AUTH":
            parts = line.split(" ")
            mechanism, token = parts[1], (parts[2] if len(parts) > 2 else "")
            if mechanism.upper() == "PLAIN":
                _, user, password = base64.b64decode(token).decode().split("\0")
                self.check_login(user, password)
            else:
                self._auth_login = []
                self.reply("334 VXNlcm5hbWU6")
        elif verb == "MAIL":
            self.reply(self.script.mail)
        elif verb == "RCPT":
            address = line.partition("<")[2].rstrip(">")
            self.reply(self.script.rcpt.get(address, "250 2.1.5 Ok"))
        elif verb == "DATA":
            self.reply(self.script.data)
            self._in_data = self.script.data.startswith("354")
        elif verb == "QUIT":
            self.reply("221 2.0.0 Bye")
            self.transport.loseConnection()
        else:
            self.reply("502 5.5.2 Error: command not recognized")

    def check_login(self, user: str, password: str) -> None:
        if self.script.users is not None and self.script.users.get(user) == password:
            self.authenticated = user
            self.reply("235 2.7.0 Authentication successful")
        else:
            self.reply("535 5.7.8 Error: authentication failed")


class FakeSMTPFactory(Factory):
    """Each connection takes the next script; the last one repeats."""

    def __init__(self, *scripts: Script) -> None:
        self.scripts = list(scripts)
        self.servers: list[FakeSMTPServer] = []

    def buildProtocol(self, addr: object) -> FakeSMTPServer:
        script = self.scripts.pop(0) if len(self.scripts) > 1 else self.scripts[0]
        server = FakeSMTPServer(script)
        self.servers.append(server)
        return server


class InMemory:
    """The deliverer on a MemoryReactorClock, with fake servers behind its real endpoints."""

    def __init__(self, *scripts: Script, cfg: Config | None = None,
                 resolver: NextHopResolver | None = None) -> None:
        self.reactor = MemoryReactorClock()
        self.factory = FakeSMTPFactory(*(scripts or (Script(),)))
        self.reactor.listenTCP(MX_PORT, self.factory)
        self.completer = ConnectionCompleter(self.reactor)
        self.deliverer = SMTPRelayDeliverer(cfg or config(), self.reactor,
                                            resolver or two_mx_resolver())
        self.refuse = 0  # how many connections to refuse before completing the rest

    def deliver(self, env: Envelope, path: Path) -> list[DeliveryResult]:
        d = self.deliverer.deliver(env, path, env.recipients)
        while self.reactor.tcpClients:
            if self.refuse:
                self.refuse -= 1
                self.completer.failOnce(Failure(ConnectionRefusedError()))
                continue
            pump = self.completer.succeedOnce()
            assert pump is not None
            pump.flush()
        return result_of(d)  # type: ignore[no-any-return]

    @property
    def server(self) -> FakeSMTPServer:
        return self.factory.servers[-1]


# --- the protocol on its own -----------------------------------------------------------


def connected(clock: Clock | None = None) -> tuple[SMTPClientProtocol, StringTransport]:
    proto = SMTPClientProtocol(clock or Clock())
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, transport


def test_multi_line_replies_are_assembled_and_printed_as_sent() -> None:
    proto, _ = connected()
    d = proto.expect(10)
    proto.dataReceived(b"250-mx.example.test\r\n250-PIPELINING\r\n250 SIZE 100\r\n")
    reply = result_of(d)
    assert reply == Reply(250, ("mx.example.test", "PIPELINING", "SIZE 100"))
    assert str(reply) == "250-mx.example.test 250-PIPELINING 250 SIZE 100"
    assert parse_ehlo(reply) == {"PIPELINING": "", "SIZE": "100"}


def test_replies_arriving_early_wait_in_order_and_bare_lf_is_accepted() -> None:
    proto, _ = connected()
    proto.dataReceived(b"220 hello\n250 2.1.0 Ok\r\n550 5.1.1 <x@y>: user unknown\r\n")
    assert [str(result_of(proto.expect(1))) for _ in range(3)] == [
        "220 hello", "250 2.1.0 Ok", "550 5.1.1 <x@y>: user unknown"]


def test_a_malformed_reply_is_a_protocol_error_and_drops_the_connection() -> None:
    proto, transport = connected()
    d = proto.expect(10)
    proto.dataReceived(b"hello there\r\n")
    failure = failure_of(d)
    assert failure.check(SMTPProtocolError)
    assert transport.disconnecting


def test_no_reply_in_time_is_a_timeout_and_aborts() -> None:
    clock = Clock()
    proto, transport = connected(clock)
    d = proto.command(b"MAIL FROM:<>", 300)
    assert_times_out(clock, d, 300, "MAIL")
    assert transport.disconnecting


def test_each_pipelined_waiter_keeps_its_own_deadline_under_the_one_timer() -> None:
    """DATA's 120 s run out while RCPT's 300 s still wait: DATA fails, not later."""
    clock = Clock()
    proto, transport = connected(clock)
    rcpt = proto.expect(300, "RCPT")
    data = proto.expect(120, "DATA")
    assert len(clock.getDelayedCalls()) == 1
    assert_times_out(clock, data, 120, "120s waiting for the reply to DATA")
    assert not rcpt.called  # its deadline is not past: the abort's connectionLost ends it
    assert transport.disconnecting


def test_a_reply_moves_the_timer_on_to_the_next_waiters_deadline() -> None:
    clock = Clock()
    proto, transport = connected(clock)
    rset = proto.expect(20, "RSET")
    mail = proto.expect(300, "MAIL")
    proto.dataReceived(b"250 2.0.0 Ok\r\n")
    assert result_of(rset).code == 250
    clock.advance(100)  # past RSET's deadline: nothing of MAIL's has run out
    assert not mail.called and not transport.disconnecting
    assert_times_out(clock, mail, 200, "MAIL")


def test_the_timer_outlives_the_replies_and_then_fires_harmlessly() -> None:
    """Once every reply is in, the timer is left to fire (not cancelled and set again
    each transaction): it fails nothing, aborts nothing, and is not set again."""
    clock = Clock()
    proto, transport = connected(clock)
    waiters = [proto.expect(300, "MAIL"), proto.expect(300, "RCPT"), proto.expect(120, "DATA")]
    proto.dataReceived(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 go ahead\r\n")
    assert [result_of(d).code for d in waiters] == [250, 250, 354]
    [timer] = clock.getDelayedCalls()
    assert timer.getTime() == 120
    clock.advance(120)
    assert clock.getDelayedCalls() == [] and not transport.disconnecting


def test_a_later_transaction_uses_the_timer_already_set() -> None:
    """A deadline after the timer's needs no new timer: when the old one fires early
    it is set again for the earliest deadline still waited for."""
    clock = Clock()
    proto, transport = connected(clock)
    proto.expect(20, "RSET")
    proto.dataReceived(b"250 Ok\r\n")
    [first] = clock.getDelayedCalls()
    clock.advance(5)
    mail = proto.expect(300, "MAIL")
    assert clock.getDelayedCalls() == [first]
    clock.advance(15)  # the old timer fires: MAIL's deadline is 285 s away
    assert not mail.called and not transport.disconnecting
    [again] = clock.getDelayedCalls()
    assert again.getTime() == 305
    assert_times_out(clock, mail, 285, "MAIL")


def test_a_sooner_deadline_replaces_the_timer() -> None:
    clock = Clock()
    proto, _ = connected(clock)
    proto.expect(600, "the end of data")
    data = proto.expect(120, "DATA")
    [timer] = clock.getDelayedCalls()
    assert timer.getTime() == 120
    assert_times_out(clock, data, 120, "DATA")


def test_replies_to_a_pipelined_group_come_in_one_list() -> None:
    """One wake-up for the group: the list fires when the last reply is in."""
    proto, _ = connected()
    d = proto.expect_replies([(300, "MAIL"), (300, "RCPT"), (120, "DATA")])
    proto.dataReceived(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n")
    assert not d.called
    proto.dataReceived(b"354 go ahead\r\n")
    assert [r.code for r in result_of(d)] == [250, 250, 354]


def test_a_group_takes_replies_already_in_and_waits_for_the_rest() -> None:
    proto, _ = connected()
    proto.dataReceived(b"250 2.1.0 Ok\r\n")
    d = proto.expect_replies([(300, "MAIL"), (300, "RCPT")])
    assert not d.called
    proto.dataReceived(b"550 5.1.1 no\r\n")
    assert [r.code for r in result_of(d)] == [250, 550]
    proto.dataReceived(b"250 Ok\r\n")
    assert result_of(proto.expect_replies([(300, "MAIL")]))[0].code == 250


def test_a_group_keeps_each_deadline_and_its_place() -> None:
    """DATA's 120 s run out before MAIL's and RCPT's 300 s: DATA's slot holds the
    timeout, the abort's connectionLost fills the others, each in its place."""
    clock = Clock()
    proto, transport = connected(clock)
    d = proto.expect_replies([(300, "MAIL"), (300, "RCPT"), (120, "DATA")])
    clock.advance(120)
    assert transport.disconnecting and not d.called
    proto.connectionLost(Failure(ConnectionLost("aborted")))
    mail, rcpt, data = result_of(d)
    assert isinstance(mail, SMTPConnectionLost) and "MAIL" in str(mail)
    assert isinstance(rcpt, SMTPConnectionLost) and "RCPT" in str(rcpt)
    assert isinstance(data, SMTPTimeout) and "120s waiting for the reply to DATA" in str(data)


def test_a_group_after_the_connection_is_gone_fires_at_once() -> None:
    proto, _ = connected()
    proto.connectionLost(Failure(ConnectionLost("gone")))
    [outcome] = result_of(proto.expect_replies([(300, "MAIL")]))
    assert isinstance(outcome, SMTPConnectionLost)


def test_a_malformed_reply_in_a_group_is_a_protocol_error_in_its_slot() -> None:
    proto, transport = connected()
    d = proto.expect_replies([(300, "MAIL"), (300, "RCPT")])
    proto.dataReceived(b"250 Ok\r\nwhat?\r\n")
    assert transport.disconnecting
    proto.connectionLost(Failure(ConnectionLost("aborted")))
    mail, rcpt = result_of(d)
    assert mail == Reply(250, ("Ok",)) and isinstance(rcpt, SMTPProtocolError)


def test_cancelling_a_group_fires_it_with_cancelled_slots_and_ends_the_session() -> None:
    """As cancelling a DeferredList of the replies would: those already in stay,
    the rest are CancelledError; the session is aborted (later replies could not
    be matched), and another waiter hears of the loss, not of the cut group."""
    clock = Clock()
    proto, transport = connected(clock)
    d = proto.expect_replies([(300, "MAIL"), (300, "RCPT")])
    quit_wait = proto.expect(30, "QUIT")
    proto.dataReceived(b"250 Ok\r\n")
    d.cancel()
    mail, rcpt = result_of(d)
    assert mail.code == 250 and isinstance(rcpt, CancelledError)
    assert transport.disconnecting
    assert [w.what for w in proto._waiters] == ["QUIT"]
    proto.connectionLost(Failure(ConnectionLost("aborted")))
    assert failure_of(quit_wait).check(SMTPConnectionLost)
    assert clock.getDelayedCalls() == []


def test_connection_lost_fails_every_waiter() -> None:
    proto, _ = connected()
    waiters = [proto.expect(10, "RCPT"), proto.expect(10, "DATA")]
    proto.connectionLost(Failure(ConnectionLost("gone")))
    for d in waiters:
        failure = failure_of(d)
        assert failure.check(ConnectionLost)
    later: list[Failure] = []
    proto.expect(10).addErrback(later.append)
    assert later[0].check(ConnectionLost)


# --- dot-stuffing ------------------------------------------------------------------------


def stuffed(content: bytes, chunk: int = 1 << 20) -> bytes:
    stuffer = DotStuffer()
    out = b"".join(stuffer.encode(content[i:i + chunk]) for i in range(0, len(content), chunk))
    return out + stuffer.finish()


@pytest.mark.parametrize(("content", "wire"), [
    (b"a\r\n.b\r\n", b"a\r\n..b\r\n.\r\n"),
    (b".first\r\n..\r\n.\r\n", b"..first\r\n...\r\n..\r\n.\r\n"),
    (b"no final newline", b"no final newline\r\n.\r\n"),
    (b"", b".\r\n"),
    (b"bare\nlf\rcr\r\n", b"bare\r\nlf\r\ncr\r\n.\r\n"),
    (b"smuggle\n.\nQUIT\r\n", b"smuggle\r\n..\r\nQUIT\r\n.\r\n"),
    (b"ends with cr\r", b"ends with cr\r\n.\r\n"),
], ids=["leading-dot", "dots-only", "no-final-crlf", "empty", "bare-eols", "smuggling",
        "trailing-cr"])
def test_dot_stuffing(content: bytes, wire: bytes) -> None:
    assert stuffed(content) == wire
    assert stuffed(content, chunk=1) == wire


@given(st.lists(st.sampled_from([b"a", b".", b"\r", b"\n", b"\r\n", b"x."]), max_size=40),
       st.integers(min_value=1, max_value=7))
def test_dot_stuffing_ignores_chunk_boundaries_and_round_trips(parts: list[bytes],
                                                               chunk: int) -> None:
    content = b"".join(parts)
    wire = stuffed(content, chunk)
    assert wire == stuffed(content)
    assert wire.endswith(b".\r\n")
    body = wire[:-3]
    assert b"\r\n.\r\n" not in b"\r\n" + body  # no early end of data
    assert body.replace(b"\r\n", b"").count(b"\r") == 0
    assert body.replace(b"\r\n", b"").count(b"\n") == 0
    # Undo the stuffing: every line that starts with a dot lost one, and line ends are CRLF.
    lines = body.split(b"\r\n")[:-1] if body else []
    unstuffed = b"".join((line[1:] if line.startswith(b".") else line) + b"\r\n"
                         for line in lines)
    normalized = content.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    if normalized and not normalized.endswith(b"\r\n"):
        normalized += b"\r\n"
    assert unstuffed == normalized


# --- the deliverer, in memory -----------------------------------------------------------


def test_it_is_an_ideliverer_with_destinations_per_next_hop() -> None:
    cfg = parse_config("""
[[listener]]
endpoint = "tcp:2525"
[[route]]
domains = ["branch.example.test"]
action = "relay"
via = "10.1.0.25:587"
[[route]]
domains = ["v6.example.test"]
action = "relay"
via = "[2001:db8::25]"
[[route]]
domains = ["*"]
action = "relay"
""")
    deliverer = SMTPRelayDeliverer(cfg, MemoryReactorClock(), two_mx_resolver())
    assert IDeliverer.providedBy(deliverer)
    rcpt = envelope("a@branch.example.test", "b@Example.TEST", "c@v6.example.test").recipients
    assert [deliverer.destination(r) for r in rcpt] == [
        "10.1.0.25:587", "example.test", "[2001:db8::25]:25"]


def test_a_reload_changes_a_remembered_destination() -> None:
    def via(hostport: str) -> Config:
        return parse_config(f"""
[[listener]]
endpoint = "tcp:2525"
[[route]]
domains = ["branch.example.test"]
action = "relay"
via = "{hostport}"
""")
    deliverer = SMTPRelayDeliverer(via("10.1.0.25:587"), MemoryReactorClock(), two_mx_resolver())
    rcpt = envelope("a@branch.example.test").recipients[0]
    assert deliverer.destination(rcpt) == "10.1.0.25:587"
    deliverer.reconfigure(via("10.1.0.26:25"))
    assert deliverer.destination(rcpt) == "10.1.0.26:25"


def test_delivers_all_recipients_in_one_transaction(tmp_path: Path) -> None:
    world = InMemory()
    env = envelope("bob@example.test", "carol@example.test")
    results = world.deliver(env, message(tmp_path))
    assert results == [DeliveryResult.delivered("250 2.0.0 Ok: queued as ABC", MX1)] * 2
    assert len(world.factory.servers) == 1
    assert world.server.commands == [
        "EHLO relay.example.test", "MAIL FROM:<alice@origin.test> SIZE=23",
        "RCPT TO:<bob@example.test>", "RCPT TO:<carol@example.test>", "DATA", "QUIT"]
    assert world.server.messages == [b"Subject: hi\r\n\r\nHello.\r\n.\r\n"]


def test_a_cached_message_is_sent_from_memory(tmp_path: Path) -> None:
    """The spool's copy of a message just committed stands in for its queue file:
    here there is no file at all, so only the cache can have given the text."""
    world = InMemory()
    spool = Spool(tmp_path / "spool", sync_run)
    world.deliverer.source = spool
    content = b"Subject: from memory\r\n\r\n.dot\r\n"
    env = envelope("bob@example.test", size=len(content))
    spool.cache.put(env.id, content)
    results = world.deliver(env, tmp_path / "no-such-queue-file")
    assert results == [DeliveryResult.delivered("250 2.0.0 Ok: queued as ABC", MX1)]
    assert world.server.messages == [b"Subject: from memory\r\n\r\n..dot\r\n.\r\n"]


def test_a_journaled_message_out_of_the_cache_is_read_from_the_journal(
        tmp_path: Path) -> None:
    world = InMemory()
    spool = journaled_spool(tmp_path / "spool")
    world.deliverer.source = spool
    content = b"Subject: journaled\r\n\r\nbody\r\n"
    env = queue_message(spool, [Recipient("bob@example.test", "bob@example.test", "relay")],
                        data=content)
    spool.cache.discard(env.id)
    assert not spool.message_path(env.id).exists()
    results = world.deliver(env, spool.message_path(env.id))
    assert results[0].status is Status.DELIVERED
    assert world.server.messages == [content + b".\r\n"]


def test_without_a_cached_copy_a_missing_queue_file_defers(tmp_path: Path) -> None:
    world = InMemory()
    world.deliverer.source = Spool(tmp_path / "spool", sync_run)  # nothing cached or journaled
    [result] = world.deliver(envelope("bob@example.test"), tmp_path / "no-such-queue-file")
    assert result.status is Status.DEFERRED
    assert result.reply.startswith("451 4.3.0 Cannot read the queued message")
    assert world.factory.servers == []  # found out before any connection


def test_dots_and_line_ends_reach_the_server_exactly(tmp_path: Path) -> None:
    world = InMemory()
    content = b"Subject: dots\r\n\r\n.leading\r\n..two\r\n.\r\nlast line"
    env = envelope("bob@example.test", sender="", size=len(content))
    results = world.deliver(env, message(tmp_path, content))
    assert results[0].status is Status.DELIVERED
    assert world.server.commands[1] == f"MAIL FROM:<> SIZE={len(content)}"
    assert world.server.messages == [
        b"Subject: dots\r\n\r\n..leading\r\n...two\r\n..\r\nlast line\r\n.\r\n"]


def test_a_big_message_with_a_dot_on_every_line_arrives_intact(tmp_path: Path) -> None:
    world = InMemory()
    line = b"." + b"x" * 77 + b"\r\n"
    content = line * 20000  # 1.6 MB, every line needing a dot
    results = world.deliver(envelope("bob@example.test", size=len(content)),
                            message(tmp_path, content))
    assert results[0].status is Status.DELIVERED
    assert world.server.messages == [(b"." + line) * 20000 + b".\r\n"]


def test_per_recipient_results(tmp_path: Path) -> None:
    script = Script(rcpt={"gone@example.test": "550 5.1.1 <gone@example.test>: user unknown",
                          "full@example.test": "452 4.2.2 Mailbox full"})
    world = InMemory(script)
    env = envelope("gone@example.test", "ok@example.test", "full@example.test")
    assert world.deliver(env, message(tmp_path)) == [
        DeliveryResult.failed("550 5.1.1 <gone@example.test>: user unknown", MX1),
        DeliveryResult.delivered("250 2.0.0 Ok: queued as ABC", MX1),
        DeliveryResult.deferred("452 4.2.2 Mailbox full", MX1),
    ]


def test_all_recipients_refused_means_no_message_is_sent(tmp_path: Path) -> None:
    world = InMemory(Script(rcpt={"a@example.test": "550 5.1.1 no", "b@example.test":
                                  "450 4.1.1 later"}, data="554 5.5.1 No valid recipients"))
    results = world.deliver(envelope("a@example.test", "b@example.test"), message(tmp_path))
    assert [r.status for r in results] == [Status.FAILED, Status.DEFERRED]
    assert world.server.messages == []


@pytest.mark.parametrize(("final", "status"), [
    ("554 5.6.0 Message rejected: spam", Status.FAILED),
    ("451 4.3.0 Try again later", Status.DEFERRED),
])
def test_the_reply_to_the_dot_decides_every_accepted_recipient(
        tmp_path: Path, final: str, status: Status) -> None:
    world = InMemory(Script(final=final, rcpt={"x@example.test": "550 5.1.1 unknown"}))
    results = world.deliver(envelope("a@example.test", "x@example.test", "b@example.test"),
                            message(tmp_path))
    assert results == [DeliveryResult(status, final, MX1),
                       DeliveryResult.failed("550 5.1.1 unknown", MX1),
                       DeliveryResult(status, final, MX1)]


def test_a_refused_mail_from_decides_everyone(tmp_path: Path) -> None:
    world = InMemory(Script(mail="553 5.7.1 Sender rejected"))
    results = world.deliver(envelope("a@example.test", "b@example.test"), message(tmp_path))
    assert results == [DeliveryResult.failed("553 5.7.1 Sender rejected", MX1)] * 2


def test_connection_lost_before_the_final_reply_defers(tmp_path: Path) -> None:
    world = InMemory(Script(drop_after_dot=True))
    results = world.deliver(envelope("a@example.test"), message(tmp_path))
    assert results[0].status is Status.DEFERRED
    assert results[0].remote == MX1
    assert results[0].reply.startswith("451 4.4.2 ")
    assert world.server.messages  # the data did arrive: a duplicate is possible (RFC 1047)


def test_a_4xx_greeting_moves_on_to_the_next_mx(tmp_path: Path) -> None:
    world = InMemory(Script(greeting="421 4.3.2 Service not available"), Script())
    results = world.deliver(envelope("a@example.test"), message(tmp_path))
    assert results == [DeliveryResult.delivered("250 2.0.0 Ok: queued as ABC", MX2)]
    assert world.factory.servers[0].commands == ["QUIT"]


def test_a_5xx_greeting_also_moves_on(tmp_path: Path) -> None:
    world = InMemory(Script(greeting="554 5.7.1 Go away"), Script())
    assert world.deliver(envelope("a@example.test"), message(tmp_path))[0].remote == MX2


def test_a_refused_connection_moves_on_to_the_next_mx(tmp_path: Path) -> None:
    world = InMemory()
    world.refuse = 1
    results = world.deliver(envelope("a@example.test"), message(tmp_path))
    assert results == [DeliveryResult.delivered("250 2.0.0 Ok: queued as ABC", MX2)]


def test_when_every_hop_fails_the_recipients_are_deferred_with_the_last_reason(
        tmp_path: Path) -> None:
    world = InMemory(Script(greeting="421 4.3.2 busy"), Script(greeting="554 5.7.1 No"))
    results = world.deliver(envelope("a@example.test", "b@example.test"), message(tmp_path))
    assert results == [DeliveryResult.deferred("554 5.7.1 No", MX2)] * 2


def test_helo_when_ehlo_is_refused_and_no_pipelining(tmp_path: Path) -> None:
    world = InMemory(Script(extensions=None))
    results = world.deliver(envelope("a@example.test"), message(tmp_path))
    assert results[0].status is Status.DELIVERED
    assert world.server.commands[:3] == ["EHLO relay.example.test", "HELO relay.example.test",
                                         "MAIL FROM:<alice@origin.test>"]


def test_a_message_bigger_than_the_servers_size_fails_before_mail(tmp_path: Path) -> None:
    world = InMemory(Script(extensions=["PIPELINING", "SIZE 10"]))
    results = world.deliver(envelope("a@example.test"), message(tmp_path))
    assert results[0].status is Status.FAILED
    assert results[0].reply.startswith("552 5.3.4 ")
    assert world.server.commands == ["EHLO relay.example.test", "QUIT"]


def test_tls_required_but_not_offered_defers_without_sending(tmp_path: Path) -> None:
    world = InMemory(cfg=config(relay_tls="required"))
    results = world.deliver(envelope("a@example.test"), message(tmp_path))
    assert results[0].status is Status.DEFERRED
    assert "4.7.4 TLS required but not offered" in results[0].reply
    assert all(not s.messages for s in world.factory.servers)
    assert len(world.factory.servers) == 2  # both MX hosts were tried


@pytest.mark.parametrize(("error", "status", "reply"), [
    (NXDomain("example.test"), Status.FAILED, "550 5.1.2 "),
    (lookup_failed("timeout"), Status.DEFERRED, "451 4.4.3 "),
])
def test_dns_outcomes(tmp_path: Path, error: Exception, status: Status, reply: str) -> None:
    resolver = NextHopResolver(FakeLookup({("example.test", "MX"): error}))
    world = InMemory(resolver=resolver)
    results = world.deliver(envelope("a@example.test"), message(tmp_path))
    assert results[0].status is status
    assert results[0].reply.startswith(reply)
    assert world.factory.servers == []


def test_a_missing_message_file_defers(tmp_path: Path) -> None:
    world = InMemory()
    results = world.deliver(envelope("a@example.test"), tmp_path / "nope")
    assert results[0].status is Status.DEFERRED
    assert results[0].reply.startswith("451 4.3.0 ")


def smarthost_config(tmp_path: Path, tls: str) -> Config:
    secret = tmp_path / "secret"
    secret.write_text("s3cret  \nignored\n")
    return parse_config(f"""
[server]
hostname = "relay.example.test"
[[listener]]
endpoint = "tcp:2525"
[[route]]
domains = ["*"]
action = "relay"
via = "127.0.0.9:{MX_PORT}"
tls = "{tls}"
username = "relay"
password_file = "{secret}"
""")


def test_a_smarthost_gets_auth_plain_with_tls_none(tmp_path: Path) -> None:
    world = InMemory(Script(users={"relay": "s3cret"}), cfg=smarthost_config(tmp_path, "none"))
    results = world.deliver(envelope("a@example.test"), message(tmp_path))
    assert results == [DeliveryResult.delivered("250 2.0.0 Ok: queued as ABC",
                                                 f"127.0.0.9[127.0.0.9]:{MX_PORT}")]
    assert world.server.authenticated == "relay"
    assert world.server.commands[1] == "AUTH PLAIN " + base64.b64encode(
        b"\0relay\0s3cret").decode()


def test_auth_login_when_only_login_is_offered(tmp_path: Path) -> None:
    world = InMemory(Script(users={"relay": "s3cret"}, mechanisms="LOGIN"),
                     cfg=smarthost_config(tmp_path, "none"))
    results = world.deliver(envelope("a@example.test"), message(tmp_path))
    assert results[0].status is Status.DELIVERED
    assert world.server.authenticated == "relay"
    assert world.server.commands[1] == "AUTH LOGIN"


def test_bad_credentials_defer(tmp_path: Path) -> None:
    world = InMemory(Script(users={"relay": "other"}), cfg=smarthost_config(tmp_path, "none"))
    results = world.deliver(envelope("a@example.test"), message(tmp_path))
    assert results[0].status is Status.DEFERRED
    assert results[0].reply == "535 5.7.8 Error: authentication failed"
    assert world.server.messages == []


def test_credentials_are_not_sent_in_clear_unless_tls_is_none(tmp_path: Path) -> None:
    world = InMemory(Script(users={"relay": "s3cret"}),
                     cfg=smarthost_config(tmp_path, "opportunistic"))
    results = world.deliver(envelope("a@example.test"), message(tmp_path))
    assert results[0].status is Status.DEFERRED
    assert "without TLS" in results[0].reply
    assert not any(c.startswith("AUTH") for c in world.server.commands)


# --- the deliverer, against a scripted dialog on a StringTransport -------------------


class RecordingTransport(StringTransport):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        super().write(data)


class Dialog:
    """One hop's connection on a StringTransport: the test plays the server."""

    def __init__(self, tmp_path: Path, *addresses: str, timeouts: Timeouts = DEFAULT_TIMEOUTS,
                 content: bytes = b"Subject: x\r\n\r\nbody\r\n") -> None:
        self.clock = MemoryReactorClock()
        self.transport = RecordingTransport()
        self.proto = SMTPClientProtocol(self.clock)

        def connect(hop: Hop) -> Deferred[SMTPClientProtocol]:
            self.proto.makeConnection(self.transport)
            return succeed(self.proto)

        resolver = NextHopResolver(FakeLookup({
            ("example.test", "MX"): Answer(((10, "mx1.example.test"),), 60),
            ("mx1.example.test", "A"): Answer(("127.0.0.2",), 60)}))
        deliverer = SMTPRelayDeliverer(config(), self.clock, resolver, timeouts=timeouts,
                                       connect=connect)
        env = envelope(*addresses, size=len(content))
        self.result = deliverer.deliver(env, message(tmp_path, content), env.recipients)

    def server(self, *lines: str) -> bytes:
        """Send reply lines; return what the client wrote in response."""
        self.transport.clear()
        self.transport.writes.clear()
        self.proto.dataReceived(b"".join(line.encode() + b"\r\n" for line in lines))
        return self.transport.value()

    def stream(self) -> bytes:
        """Let the message producer run to the end, as a draining socket would."""
        self.transport.clear()
        while self.transport.producer is not None:
            self.transport.producer.resumeProducing()
        return self.transport.value()


def test_pipelining_sends_mail_rcpts_and_data_in_one_write(tmp_path: Path) -> None:
    dialog = Dialog(tmp_path, "a@example.test", "b@example.test")
    assert dialog.server("220 mx ESMTP") == b"EHLO relay.example.test\r\n"
    sent = dialog.server("250-mx", "250-PIPELINING", "250 8BITMIME")
    assert dialog.transport.writes == [sent]
    assert sent == (b"MAIL FROM:<alice@origin.test>\r\nRCPT TO:<a@example.test>\r\n"
                    b"RCPT TO:<b@example.test>\r\nDATA\r\n")
    assert dialog.server("250 2.1.0 Ok", "250 2.1.5 Ok", "550 5.1.1 no such user") == b""
    assert dialog.server("354 go ahead") == b""
    assert dialog.stream() == b"Subject: x\r\n\r\nbody\r\n.\r\n"
    assert not dialog.result.called
    assert dialog.server("250 2.0.0 Ok: queued") == b"QUIT\r\n"
    assert result_of(dialog.result) == [
        DeliveryResult.delivered("250 2.0.0 Ok: queued", MX1),
        DeliveryResult.failed("550 5.1.1 no such user", MX1)]


def test_cancelling_a_pipelined_delivery_ends_it_at_once(tmp_path: Path) -> None:
    """Shutdown cuts an attempt short by cancelling it: every pipelined reply still
    awaited gives up with it (not only the one the coroutine waits on), the
    session is aborted, and the recipients are deferred, nothing left pending."""
    dialog = Dialog(tmp_path, "a@example.test", "b@example.test")
    dialog.server("220 mx ESMTP")
    dialog.server("250-mx", "250 PIPELINING")
    assert not dialog.result.called
    dialog.result.cancel()
    results = result_of(dialog.result)
    assert [r.status for r in results] == [Status.DEFERRED, Status.DEFERRED]
    assert dialog.transport.disconnecting  # aborted: no reply can be taken for another's
    assert [w.what for w in dialog.proto._waiters] in ([], ["QUIT"])  # none of the cut ones
    dialog.proto.connectionLost(Failure(ConnectionLost("aborted")))  # as TCP then says
    assert dialog.clock.getDelayedCalls() == []


def test_cancelling_while_the_end_of_data_is_awaited_defers_without_a_crash(
        tmp_path: Path) -> None:
    """Shutdown's grace ending while the next hop holds its reply to the dot: the
    recipients are deferred as cut short at shutdown, naming the hop, and no
    crash is logged."""
    dialog = Dialog(tmp_path, "a@example.test")
    dialog.server("220 mx ESMTP")
    dialog.server("250-mx", "250 PIPELINING")
    dialog.server("250 2.1.0 Ok", "250 2.1.5 Ok", "354 go ahead")
    dialog.stream()
    with logged_errors() as errors:
        dialog.result.cancel()
        [result] = result_of(dialog.result)
    assert errors == []
    assert result.status is Status.DEFERRED
    assert "cut short at shutdown" in result.reply and result.remote == MX1
    assert dialog.transport.disconnecting


def test_without_pipelining_each_command_waits_for_its_reply(tmp_path: Path) -> None:
    dialog = Dialog(tmp_path, "a@example.test", "b@example.test")
    dialog.server("220 mx ESMTP")
    assert dialog.server("250 mx") == b"MAIL FROM:<alice@origin.test>\r\n"
    assert dialog.server("250 Ok") == b"RCPT TO:<a@example.test>\r\n"
    assert dialog.server("450 4.2.0 greylisted") == b"RCPT TO:<b@example.test>\r\n"
    assert dialog.server("250 Ok") == b"DATA\r\n"
    assert dialog.server("354 go") == b""
    dialog.stream()
    dialog.server("250 2.0.0 Ok")
    assert [r.status for r in result_of(dialog.result)] == [Status.DEFERRED, Status.DELIVERED]


@pytest.mark.parametrize(("step", "limit"), [
    ("greeting", 300), ("mail", 300), ("rcpt", 300), ("data_init", 120), ("data_end", 600)])
def test_rfc_5321_timeouts(tmp_path: Path, step: str, limit: float) -> None:
    dialog = Dialog(tmp_path, "a@example.test")
    script = [("greeting", "220 mx"), ("ehlo", "250 mx"), ("mail", "250 Ok"),
              ("rcpt", "250 Ok"), ("data_init", "354 go")]
    for name, reply in script:
        if name == step:
            break
        dialog.server(reply)
        if name == "data_init":
            dialog.stream()
    dialog.clock.advance(limit - 1)
    assert not dialog.result.called
    dialog.clock.advance(1)
    result = result_of(dialog.result)[0]
    assert result.status is Status.DEFERRED
    assert "timeout" in result.reply
    assert dialog.transport.disconnecting


def test_a_message_of_a_chunk_or_more_is_streamed_by_the_producer(tmp_path: Path) -> None:
    """From CHUNK_SIZE bytes on, the message goes through the pull producer, chunk by
    chunk as the socket drains, the first chunk the one read to decide, and the dot last."""
    content = b"".join(b"%05d" % n + b"x" * 73 + b"\r\n" for n in range(1700))  # 136,000
    dialog = Dialog(tmp_path, "a@example.test", content=content)
    for reply in ("220 mx", "250-mx\r\n250 PIPELINING", "250 Ok\r\n250 Ok"):
        dialog.proto.dataReceived(reply.encode() + b"\r\n")
    assert dialog.server("354 go") == b""  # registered; the transport pulls when it drains
    assert dialog.transport.producer is not None
    producer = dialog.transport.producer
    producer.resumeProducing()
    assert dialog.transport.value() == content[:CHUNK_SIZE]  # the chunk read to decide
    assert content[:CHUNK_SIZE] + dialog.stream() == content + b".\r\n"
    assert dialog.transport.producer is None
    dialog.server("250 2.0.0 Ok")
    assert result_of(dialog.result)[0].status is Status.DELIVERED


def test_a_stalled_data_transfer_times_out(tmp_path: Path) -> None:
    dialog = Dialog(tmp_path, "a@example.test", content=b"x" * 200_000 + b"\r\n")
    for reply in ("220 mx", "250-mx\r\n250 PIPELINING", "250 Ok\r\n250 Ok\r\n354 go"):
        dialog.proto.dataReceived(reply.encode() + b"\r\n")
    dialog.transport.producer.resumeProducing()  # one chunk leaves; then the peer stalls
    dialog.clock.advance(179)
    assert not dialog.result.called
    dialog.clock.advance(1)
    result = result_of(dialog.result)[0]
    assert result.status is Status.DEFERRED
    assert "sending the message" in result.reply


def test_smaller_timeouts_are_configurable(tmp_path: Path) -> None:
    dialog = Dialog(tmp_path, "a@example.test", timeouts=Timeouts(greeting=5))
    dialog.clock.advance(5)
    assert result_of(dialog.result)[0].status is Status.DEFERRED


def test_data_sent_after_the_starttls_reply_is_refused(tmp_path: Path) -> None:
    cfg = config(relay_tls="opportunistic")
    clock = MemoryReactorClock()
    transport = StringTransport()
    proto = SMTPClientProtocol(clock)

    def connect(hop: Hop) -> Deferred[SMTPClientProtocol]:
        proto.makeConnection(transport)
        return succeed(proto)

    deliverer = SMTPRelayDeliverer(cfg, clock, NextHopResolver(FakeLookup({})),
                                   connect=connect)
    env = envelope("a@[127.0.0.2]")
    d = deliverer.deliver(env, message(tmp_path), env.recipients)
    proto.dataReceived(b"220 mx\r\n250-mx\r\n250 STARTTLS\r\n")
    proto.dataReceived(b"220 go ahead\r\n250 injected\r\n")
    result = result_of(d)[0]
    assert result.status is Status.DEFERRED
    assert "after its STARTTLS reply" in result.reply
    assert b"MAIL" not in transport.value()


def reference_wire(content: bytes) -> bytes:
    """DATA the slow and obvious way: every CR, LF or CRLF a CRLF, then line by
    line, a leading dot doubled, then the final dot."""
    lines = re.sub(rb"\r\n|\r|\n", b"\r\n", content).split(b"\r\n")
    if lines[-1] == b"":
        lines.pop()
    return b"".join(b"." * line.startswith(b".") + line + b"\r\n" for line in lines) + b".\r\n"


@settings(max_examples=300)
@given(st.lists(st.sampled_from([b"a", b"xyz", b".", b"..", b"\r", b"\n", b"\r\n", b"\r\n.",
                                 b"x."]), max_size=40),
       st.integers(min_value=1, max_value=9))
def test_dot_stuffing_agrees_with_a_line_by_line_encoding(parts: list[bytes],
                                                          chunk: int) -> None:
    """Chunked bulk encoding gives exactly what the line-by-line one gives."""
    content = b"".join(parts)
    assert stuffed(content, chunk) == reference_wire(content)
    assert stuffed(content) == reference_wire(content)


# --- the one-write path of a short message ----------------------------------------------


class Source(io.BytesIO):
    """A message source whose reads may come back short before the end (a network
    file system), and that may fail."""

    def __init__(self, data: bytes, most: int | None = None, error: OSError | None = None):
        super().__init__(data)
        self.most = most
        self.error = error

    def read(self, n: int | None = -1) -> bytes:
        if self.error is not None:
            raise self.error
        if self.most is not None and (n is None or n < 0 or n > self.most):
            n = self.most
        return super().read(n)


def producer_on(transport: StringTransport, source: io.BytesIO,
                monkeypatch: pytest.MonkeyPatch, takes: int | None) -> MessageProducer:
    """A producer whose direct send() takes ``takes`` bytes (None: all of them)."""
    monkeypatch.setattr(smtpclient, "send_directly",
                        lambda t, data: len(data) if takes is None else min(takes, len(data)))
    return MessageProducer(source, transport)


def test_a_short_message_taken_whole_by_send_is_done_at_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    transport = StringTransport()
    producer = producer_on(transport, io.BytesIO(b"a\r\n.b\r\n"), monkeypatch, None)
    producer.start()
    assert producer.done.called and transport.producer is None
    assert transport.value() == b""  # all of it went by send(), none buffered


@pytest.mark.parametrize(("message", "wire"), [
    (b"Subject: hi\r\n\r\nbody\r\n", b"Subject: hi\r\n\r\nbody\r\n.\r\n"),
    (b"", b".\r\n"),
    (b"no final line end", b"no final line end\r\n.\r\n"),
])
@pytest.mark.parametrize("takes", [None, 3], ids=["all-at-once", "partly"])
def test_a_wire_ready_message_goes_out_as_it_is(
        monkeypatch: pytest.MonkeyPatch, message: bytes, wire: bytes, takes: int | None) -> None:
    """A cached message the DATA reader found CRLF-only with no leading dot
    (WireReady) skips the dot-stuffing scan and ends the DATA as stuffing would."""
    sent: list[bytes] = []

    def send(transport: object, data: bytes) -> int:
        taken = len(data) if takes is None else min(takes, len(data))
        sent.append(data[:taken])
        return taken

    monkeypatch.setattr(smtpclient, "send_directly", send)
    monkeypatch.setattr(smtpclient.DotStuffer, "encode",
                        lambda self, chunk: pytest.fail("a wire-ready message was scanned"))
    transport = StringTransport()
    producer = MessageProducer(WireReady(message), transport)
    producer.start()
    while transport.producer is not None:
        transport.producer.resumeProducing()
    assert producer.done.called
    assert b"".join(sent) + transport.value() == wire


def test_what_send_did_not_take_is_written_and_done_waits_for_the_drain(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The data-block timeout must keep watching until the transport has drained the
    rest: done fires on the producer's next turn, not when the rest is buffered."""
    transport = StringTransport()
    producer = producer_on(transport, io.BytesIO(b"a\r\n.b\r\n"), monkeypatch, 3)
    producer.start()
    assert not producer.done.called and transport.producer is producer
    producer.resumeProducing()  # on registration: the rest goes to the buffer
    assert transport.value() == b"..b\r\n.\r\n"  # send() took "a\r\n"
    assert not producer.done.called
    producer.resumeProducing()  # the buffer drained
    assert producer.done.called and transport.producer is None


@pytest.mark.parametrize("takes", [None, 3], ids=["all-at-once", "partly"])
def test_the_data_block_timer_runs_only_while_a_message_is_still_going_out(
        monkeypatch: pytest.MonkeyPatch, takes: int | None) -> None:
    """A message send() took whole needs no data-block timer (none is armed); one it
    took in part is watched by it until the rest has drained."""
    clock = Clock()
    proto, transport = connected(clock)
    monkeypatch.setattr(smtpclient, "send_directly",
                        lambda t, data: len(data) if takes is None else min(takes, len(data)))
    armed: list[float] = []
    real_call_later = clock.callLater
    monkeypatch.setattr(clock, "callLater",
                        lambda delay, *a, **kw: armed.append(delay) or real_call_later(
                            delay, *a, **kw))
    done = proto.send_message(io.BytesIO(b"a\r\n.b\r\n"), 180)
    if takes is None:
        assert done.called and armed == [] and clock.getDelayedCalls() == []
        return
    assert not done.called and armed and armed[-1] == 180
    while transport.producer is not None:
        transport.producer.resumeProducing()
    assert done.called and clock.getDelayedCalls() == []


def test_a_short_read_before_the_end_is_not_taken_for_the_end(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A read shorter than asked is no proof of the end on every file system: the whole
    message goes out, then the dot."""
    content = b"".join(b"line %04d\r\n" % n for n in range(300))
    transport = StringTransport()
    producer = producer_on(transport, Source(content, most=1000), monkeypatch, 0)
    producer.start()
    while transport.producer is not None:
        transport.producer.resumeProducing()
    assert transport.value() == content + b".\r\n"
    assert producer.done.called


def test_a_read_error_at_the_start_fails_the_delivery_instead_of_raising(
        tmp_path: Path) -> None:
    """EIO from the spool when the message is first read: send_message's Deferred
    fails with it (the caller hears it); nothing raises out of it."""
    proto = SMTPClientProtocol(Clock())
    proto.makeConnection(StringTransport())
    d = proto.send_message(Source(b"", error=OSError(5, "Input/output error")), 180)
    failure = failure_of(d)
    assert failure.check(OSError)
    assert proto._producer is None


def test_connection_lost_says_what_was_lost() -> None:
    assert str(SMTPConnectionLost("connection lost while sending the message")) == \
        "connection lost while sending the message"
