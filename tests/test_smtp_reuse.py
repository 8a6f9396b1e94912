"""Connection reuse in the relay transport, and what it tells the scheduler about hops.

The deliverer runs on a MemoryReactorClock with scripted servers behind its
real TCP endpoints (iosim); every pump is kept, so a parked session can be
driven again by the next delivery. ``World.run()`` moves bytes until nothing
moves; ``World.advance()`` moves the clock first.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.test.iosim import ConnectionCompleter, IOPump

from core_fakes import queue_message, recipient, sync_run
from relaygw.config import Config, QueueConfig, parse_config
from relaygw.delivery.smtp import IDLE_TIMEOUT, ConnectionCache, IdleSession, SMTPRelayDeliverer
from relaygw.delivery.smtpclient import Reply, SMTPClientProtocol, Timeouts
from relaygw.dns import Hop, NextHopResolver, NXDomain, lookup_failed
from relaygw.envelope import Envelope
from relaygw.interfaces import DeliveryResult, IBacklogAware, Status
from relaygw.scheduler import Scheduler
from relaygw.spool import Spool
from test_smtp_client import (
    MX1,
    MX2,
    MX_PORT,
    FakeLookup,
    FakeSMTPServer,
    Script,
    config,
    envelope,
    message,
    result_of,
    two_mx_resolver,
)

EHLO = "EHLO relay.example.test"
QUEUED = "250 2.0.0 Ok: queued as ABC"


@dataclass
class ReuseScript(Script):
    rset: str | None = "250 2.0.0 Ok"  # None: never answer RSET


class ReuseServer(FakeSMTPServer):
    """The test_smtp_client fake server, plus RSET."""

    script: ReuseScript

    def command(self, line: str) -> None:
        if line.upper() == "RSET" and self._auth_login is None:
            self.commands.append(line)
            if self.script.rset is not None:
                self.reply(self.script.rset)
            return
        super().command(line)


class ReuseFactory(Factory):
    """Each connection takes the next script; the last one repeats."""

    def __init__(self, *scripts: ReuseScript) -> None:
        self.scripts = list(scripts)
        self.servers: list[ReuseServer] = []

    def buildProtocol(self, addr: object) -> ReuseServer:
        script = self.scripts.pop(0) if len(self.scripts) > 1 else self.scripts[0]
        server = ReuseServer(script)
        self.servers.append(server)
        return server


class World:
    def __init__(self, *scripts: ReuseScript, cfg: Config | None = None,
                 resolver: NextHopResolver | None = None, **options: Any) -> None:
        self.reactor = MemoryReactorClock()
        self.factory = ReuseFactory(*(scripts or (ReuseScript(),)))
        self.reactor.listenTCP(MX_PORT, self.factory)
        self.completer = ConnectionCompleter(self.reactor)
        self.pumps: list[IOPump] = []
        options.setdefault("reuse", "always")
        self.deliverer = SMTPRelayDeliverer(cfg or config(), self.reactor,
                                            resolver or two_mx_resolver(), **options)
        self.refuse = 0  # how many connection attempts to refuse
        self.connections = 0

    def run(self) -> None:
        """Complete connections and move bytes (and callLater(0)s) until nothing moves."""
        while True:
            self.reactor.advance(0)
            moved = False
            while self.reactor.tcpClients:
                moved = True
                if self.refuse:
                    self.refuse -= 1
                    self.completer.failOnce()
                    continue
                pump = self.completer.succeedOnce()
                assert pump is not None
                self.connections += 1
                self.pumps.append(pump)
            for pump in self.pumps:
                moved = pump.flush() or moved
            if not moved:
                return

    def deliver(self, env: Envelope, path: Path) -> Deferred[list[DeliveryResult]]:
        d = self.deliverer.deliver(env, path, env.recipients)
        self.run()
        return d

    def delivered(self, env: Envelope, path: Path) -> list[DeliveryResult]:
        return result_of(self.deliver(env, path))  # type: ignore[no-any-return]

    def advance(self, seconds: float) -> None:
        self.reactor.advance(seconds)
        self.run()

    @property
    def servers(self) -> list[ReuseServer]:
        return self.factory.servers


def verbs(server: FakeSMTPServer) -> list[str]:
    return [c.split(" ", 1)[0].split(":", 1)[0] for c in server.commands]


# --- reuse ------------------------------------------------------------------------------


def test_two_deliveries_in_a_row_share_one_connection(tmp_path: Path) -> None:
    world = World()
    path = message(tmp_path)
    assert world.delivered(envelope("a@example.test"), path) == [
        DeliveryResult.delivered(QUEUED, MX1)]
    assert world.delivered(envelope("b@example.test", "c@example.test"), path) == [
        DeliveryResult.delivered(QUEUED, MX1)] * 2
    [server] = world.servers
    assert world.connections == 1
    assert server.commands == [
        EHLO, "MAIL FROM:<alice@origin.test> SIZE=23", "RCPT TO:<a@example.test>", "DATA",
        "RSET", "MAIL FROM:<alice@origin.test> SIZE=23", "RCPT TO:<b@example.test>",
        "RCPT TO:<c@example.test>", "DATA"]
    assert len(server.messages) == 2
    assert len(world.deliverer.cache) == 1


def test_an_idle_session_is_quit_after_the_idle_time(tmp_path: Path) -> None:
    world = World(idle_timeout=2.0)
    world.delivered(envelope("a@example.test"), message(tmp_path))
    [server] = world.servers
    world.advance(1.9)
    assert "QUIT" not in server.commands
    world.advance(0.1)
    assert server.commands[-1] == "QUIT"
    assert server.closed.called
    assert len(world.deliverer.cache) == 0
    assert world.reactor.getDelayedCalls() == []
    # the next one opens a fresh session
    world.delivered(envelope("b@example.test"), message(tmp_path))
    assert world.connections == 2
    assert verbs(world.servers[1])[:2] == ["EHLO", "MAIL"]


def test_reuse_restarts_the_idle_time(tmp_path: Path) -> None:
    world = World(idle_timeout=2.0)
    path = message(tmp_path)
    world.delivered(envelope("a@example.test"), path)
    world.advance(1.5)
    world.delivered(envelope("b@example.test"), path)
    world.advance(1.5)
    assert "QUIT" not in world.servers[0].commands
    world.advance(0.5)
    assert world.servers[0].commands[-1] == "QUIT"


def test_a_session_the_server_closed_while_idle_is_forgotten(tmp_path: Path) -> None:
    world = World()
    path = message(tmp_path)
    world.delivered(envelope("a@example.test"), path)
    world.servers[0].transport.loseConnection()
    world.run()
    assert len(world.deliverer.cache) == 0
    assert world.delivered(envelope("b@example.test"), path) == [
        DeliveryResult.delivered(QUEUED, MX1)]
    assert world.connections == 2
    assert "RSET" not in world.servers[0].commands


@pytest.mark.parametrize("rset", ["421 4.4.2 mx.example.test idle too long",
                                  "502 5.5.2 Error: command not recognized"])
def test_a_refused_rset_falls_back_to_a_new_connection_to_the_same_hop(
        tmp_path: Path, rset: str) -> None:
    world = World(ReuseScript(rset=rset), ReuseScript())
    path = message(tmp_path)
    world.delivered(envelope("a@example.test"), path)
    # not a hop failure: the same (first) MX, on a fresh connection
    assert world.delivered(envelope("b@example.test"), path) == [
        DeliveryResult.delivered(QUEUED, MX1)]
    first, second = world.servers
    # RSET went in one write with the transaction (PIPELINING); its refusal
    # aborted the session before any of the message was sent
    assert verbs(first)[-4:] == ["RSET", "MAIL", "RCPT", "DATA"]
    assert len(first.messages) == 1  # the first delivery's, nothing more
    assert first.closed.called
    assert verbs(second) == ["EHLO", "MAIL", "RCPT", "DATA"]
    assert len(second.messages) == 1


def test_a_refused_rset_ends_the_session_at_once_even_if_the_server_says_no_more(
        tmp_path: Path) -> None:
    """The RSET's reply is checked as soon as it is in, not once the whole group
    is: a server that refuses it and then answers nothing more does not hold the
    message until the MAIL timeout."""
    world = World(ReuseScript(rset="502 5.5.2 Error: command not recognized"), ReuseScript())
    path = message(tmp_path)
    world.delivered(envelope("a@example.test"), path)
    first = world.servers[0]
    real = first.command

    def silent_after_rset(line: str) -> None:
        if line.upper() == "RSET":
            real(line)
        else:
            first.commands.append(line)  # heard, never answered

    first.command = silent_after_rset  # type: ignore[method-assign]
    d = world.deliver(envelope("b@example.test"), path)  # no clock advance
    assert result_of(d) == [DeliveryResult.delivered(QUEUED, MX1)]
    assert first.closed.called
    assert len(first.messages) == 1
    assert world.connections == 2


def test_a_cut_after_a_refused_rset_defers_whatever_the_server_said_after_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On plain TCP an abort leaves the replies already read to be handed out: a
    server that refused the RSET (so never reset) may answer the MAIL 503. If
    shutdown cuts the group before the abort's connectionLost, the recipients
    are deferred as cut short, not failed on that 503."""
    world = World()
    path = message(tmp_path)
    world.delivered(envelope("a@example.test"), path)

    def group_as_read(proto: SMTPClientProtocol, waits: Any,
                      on_first: Any = None) -> Deferred[list[Any]]:
        outcomes = [Reply(502, ("5.5.2 Error: command not recognized",)),
                    Reply(503, ("5.5.1 Error: nested MAIL command",)),
                    CancelledError(), CancelledError()]
        assert len(waits) == len(outcomes)  # RSET, MAIL, RCPT, DATA
        if on_first is not None:
            on_first(outcomes[0])
        return succeed(outcomes)

    monkeypatch.setattr(SMTPClientProtocol, "expect_replies", group_as_read)
    [result] = result_of(world.deliver(envelope("b@example.test"), path))
    assert result.status is Status.DEFERRED
    assert result.reply == f"451 4.4.2 {MX1}: attempt cut short at shutdown"


def test_without_pipelining_rset_is_waited_for_before_mail(tmp_path: Path) -> None:
    world = World(ReuseScript(rset="421 4.4.2 mx.example.test idle too long",
                              extensions=["SIZE 1000000"]), ReuseScript())
    path = message(tmp_path)
    world.delivered(envelope("a@example.test"), path)
    assert world.delivered(envelope("b@example.test"), path) == [
        DeliveryResult.delivered(QUEUED, MX1)]
    first, second = world.servers
    assert first.commands[-2:] == ["RSET", "QUIT"]  # no MAIL after the refused RSET
    assert verbs(second) == ["EHLO", "MAIL", "RCPT", "DATA"]


def test_a_reused_session_sends_rset_with_the_transaction(tmp_path: Path) -> None:
    """One write, one round trip: RSET, MAIL, RCPT and DATA arrive together."""
    world = World()
    path = message(tmp_path)
    world.delivered(envelope("a@example.test"), path)
    server = world.servers[0]
    writes: list[bytes] = []
    real = server.dataReceived
    server.dataReceived = lambda data: (writes.append(data), real(data))  # type: ignore
    world.delivered(envelope("b@example.test"), path)
    assert writes[0] == (b"RSET\r\nMAIL FROM:<alice@origin.test> SIZE=23\r\n"
                         b"RCPT TO:<b@example.test>\r\nDATA\r\n")
    assert world.connections == 1


def test_an_unanswered_rset_times_out_and_falls_back(tmp_path: Path) -> None:
    world = World(ReuseScript(rset=None), ReuseScript(), timeouts=Timeouts(rset=20))
    path = message(tmp_path)
    world.delivered(envelope("a@example.test"), path)
    world.servers[0].reply = lambda *args: None  # type: ignore[method-assign] # hung: silent
    d = world.deliver(envelope("b@example.test"), path)
    world.advance(19)
    assert not d.called
    world.advance(1)
    assert result_of(d) == [DeliveryResult.delivered(QUEUED, MX1)]
    assert world.connections == 2
    assert world.servers[0].closed.called


def test_cancelling_with_an_rset_unanswered_defers_and_ends_the_session(
        tmp_path: Path) -> None:
    """Shutdown cuts an attempt on a reused session before any reply: the
    recipient is deferred with a reason that says so, the session is aborted
    (no reply could be matched to its command now), nothing is left waiting."""
    world = World(ReuseScript(rset=None), ReuseScript())
    path = message(tmp_path)
    world.delivered(envelope("a@example.test"), path)
    world.servers[0].reply = lambda *args: None  # type: ignore[method-assign] # silent
    d = world.deliver(envelope("b@example.test"), path)
    assert not d.called
    d.cancel()
    assert result_of(d) == [DeliveryResult.deferred(
        f"451 4.4.2 {MX1}: attempt cut short at shutdown", MX1)]
    world.run()
    assert world.servers[0].closed.called
    assert world.connections == 1  # no fresh session opened for a cut attempt
    assert len(world.servers[0].messages) == 1


def test_a_session_that_spoke_while_idle_is_not_reused(tmp_path: Path) -> None:
    world = World()
    path = message(tmp_path)
    world.delivered(envelope("a@example.test"), path)
    world.servers[0].reply("421 4.4.2 shutting down")  # ... but has not closed yet
    world.run()
    assert world.delivered(envelope("b@example.test"), path)[0].status is Status.DELIVERED
    assert "RSET" not in world.servers[0].commands
    assert world.servers[0].commands[-1] == "QUIT"
    assert world.connections == 2


def test_per_recipient_refusals_leave_the_session_reusable(tmp_path: Path) -> None:
    world = World(ReuseScript(rcpt={"x@example.test": "550 5.1.1 unknown"},
                              mail="250 2.1.0 Ok"))
    path = message(tmp_path)
    results = world.delivered(envelope("x@example.test", "a@example.test"), path)
    assert [r.status for r in results] == [Status.FAILED, Status.DELIVERED]
    assert len(world.deliverer.cache) == 1
    assert world.delivered(envelope("b@example.test"), path)[0].status is Status.DELIVERED
    assert world.connections == 1


def test_a_refused_mail_from_leaves_the_session_reusable(tmp_path: Path) -> None:
    # Without PIPELINING: only MAIL is sent (this fake would answer a pipelined DATA 354).
    world = World(ReuseScript(mail="553 5.7.1 Sender rejected", extensions=["SIZE 1000000"]))
    path = message(tmp_path)
    assert world.delivered(envelope("a@example.test"), path)[0].status is Status.FAILED
    assert len(world.deliverer.cache) == 1
    assert world.delivered(envelope("b@example.test"), path)[0].status is Status.FAILED
    assert world.connections == 1
    assert verbs(world.servers[0]).count("RSET") == 1


@pytest.mark.parametrize("script", [ReuseScript(final="421 4.3.0 closing"),
                                    ReuseScript(drop_after_dot=True)],
                         ids=["421-final", "dropped-after-dot"])
def test_a_broken_transaction_is_never_parked(tmp_path: Path, script: ReuseScript) -> None:
    world = World(script)
    assert world.delivered(envelope("a@example.test"),
                           message(tmp_path))[0].status is Status.DEFERRED
    assert len(world.deliverer.cache) == 0
    assert world.servers[0].closed.called


def test_at_most_max_idle_per_hop_are_kept(tmp_path: Path) -> None:
    world = World(max_idle_per_hop=1)
    path = message(tmp_path)
    first = world.deliverer.deliver(envelope("a@example.test"), path,
                                    envelope("a@example.test").recipients)
    second = world.deliverer.deliver(envelope("b@example.test"), path,
                                     envelope("b@example.test").recipients)
    world.run()
    assert result_of(first)[0].status is result_of(second)[0].status is Status.DELIVERED
    assert world.connections == 2
    assert len(world.deliverer.cache) == 1
    assert sum(s.commands[-1] == "QUIT" for s in world.servers) == 1


def test_a_hop_with_a_waiting_session_is_tried_first(tmp_path: Path) -> None:
    world = World()
    path = message(tmp_path)
    world.refuse = 1  # MX1 is refused: MX2 takes the first message
    assert world.delivered(envelope("a@example.test"), path)[0].remote == MX2
    assert world.delivered(envelope("b@example.test"), path)[0].remote == MX2
    assert world.connections == 1  # MX1 was not tried again: MX2's session was waiting


def test_sessions_are_keyed_by_hop_tls_and_credentials(tmp_path: Path) -> None:
    cfg = parse_config(f"""
[[listener]]
endpoint = "tcp:2525"
[[route]]
domains = ["auth.test"]
action = "relay"
via = "127.0.0.2:{MX_PORT}"
username = "relay"
password_file = "{tmp_path / 'secret'}"
[[route]]
domains = ["*"]
action = "relay"
""")
    deliverer = SMTPRelayDeliverer(cfg, MemoryReactorClock(), two_mx_resolver())
    hop = Hop("mx1.example.test", "127.0.0.2", MX_PORT)
    with_auth, plain = cfg.routes[0], cfg.routes[1]
    keys = {deliverer.cache_key(hop, with_auth, "none"),
            deliverer.cache_key(hop, plain, "none"),
            deliverer.cache_key(hop, plain, "opportunistic"),
            deliverer.cache_key(Hop("other.example.test", "127.0.0.2", MX_PORT), plain, "none"),
            deliverer.cache_key(Hop("mx1.example.test", "127.0.0.2", 25), plain, "none")}
    assert len(keys) == 5
    assert deliverer.cache_key(hop, plain, "none") == deliverer.cache_key(hop, None, "none")


def test_close_quits_idle_sessions_and_parks_no_more(tmp_path: Path) -> None:
    world = World()
    path = message(tmp_path)
    world.delivered(envelope("a@example.test"), path)
    closed = world.deliverer.close()
    world.run()
    assert world.servers[0].commands[-1] == "QUIT"
    assert result_of(closed) is None
    assert world.reactor.getDelayedCalls() == []
    world.delivered(envelope("b@example.test"), path)
    assert world.servers[1].commands[-1] == "QUIT"  # at once: no parking after close()
    assert len(world.deliverer.cache) == 0
    assert result_of(world.deliverer.close()) is None  # again, with nothing idle


def test_never_means_quit_at_once(tmp_path: Path) -> None:
    world = World(reuse="never")
    world.delivered(envelope("a@example.test"), message(tmp_path))
    assert world.servers[0].commands[-1] == "QUIT"


# --- on demand: park only when the scheduler has more for the destination -------------


def test_on_demand_a_lone_message_quits_at_once(tmp_path: Path) -> None:
    world = World(reuse="demand")
    asked: list[str] = []
    world.deliverer.use_backlog(lambda destination: asked.append(destination) or 0)
    world.delivered(envelope("a@example.test"), message(tmp_path))
    assert world.servers[0].commands[-1] == "QUIT"
    assert asked == ["example.test"]


def test_on_demand_a_backlog_keeps_the_session(tmp_path: Path) -> None:
    world = World(reuse="demand")
    world.deliverer.use_backlog(lambda destination: 1)
    world.delivered(envelope("a@example.test"), message(tmp_path))
    assert "QUIT" not in world.servers[0].commands
    assert len(world.deliverer.cache) == 1


def test_with_the_scheduler_messages_ready_together_share_a_connection(
        tmp_path: Path) -> None:
    world = World(reuse="demand")
    assert IBacklogAware.providedBy(world.deliverer)
    spool = Spool(tmp_path / "spool", sync_run)
    spool.prepare()
    queue = QueueConfig(directory=tmp_path / "spool", per_destination=1)
    scheduler = Scheduler(spool, {"relay": world.deliverer}, world.reactor, queue,
                          random=lambda: 0.5)
    scheduler.start()
    for i in range(3):
        scheduler.enqueue(queue_message(spool, [recipient(f"u{i}@example.test")]))
    world.run()
    assert scheduler.messages == {}
    [server] = world.servers
    assert verbs(server) == ["EHLO", "MAIL", "RCPT", "DATA", "RSET", "MAIL", "RCPT", "DATA",
                             "RSET", "MAIL", "RCPT", "DATA"]
    assert len(server.messages) == 3
    # nothing behind the last one, but steady traffic: parked for the idle time
    assert len(world.deliverer.cache) == 1
    world.advance(IDLE_TIMEOUT)
    assert verbs(server)[-1] == "QUIT"
    assert len(world.deliverer.cache) == 0


def test_on_demand_steady_traffic_keeps_the_session_a_pause_ends_it(tmp_path: Path) -> None:
    world = World(reuse="demand")
    world.deliverer.use_backlog(lambda destination: 0)  # never a backlog
    path = message(tmp_path)
    world.delivered(envelope("a@example.test"), path)
    assert world.servers[0].commands[-1] == "QUIT"  # a lone message
    world.advance(0.5)
    world.delivered(envelope("b@example.test"), path)  # the one before started 0.5 s ago
    assert len(world.servers) == 2 and "QUIT" not in world.servers[1].commands
    world.advance(0.5)
    world.delivered(envelope("c@example.test"), path)  # reuses it
    assert len(world.servers) == 2
    assert verbs(world.servers[1])[-4:] == ["RSET", "MAIL", "RCPT", "DATA"]
    world.advance(IDLE_TIMEOUT)  # quiet: the parked session is QUIT
    assert verbs(world.servers[1])[-1] == "QUIT"
    world.advance(10)
    world.delivered(envelope("d@example.test"), path)  # after a pause: a lone message again
    assert world.servers[2].commands[-1] == "QUIT"


# --- what the relay transport tells the scheduler ------------------------------------


def test_every_hop_failing_is_a_destination_failure(tmp_path: Path) -> None:
    world = World(ReuseScript(greeting="421 4.3.2 busy"), ReuseScript(greeting="554 5.7.1 No"))
    results = world.delivered(envelope("a@example.test", "b@example.test"), message(tmp_path))
    assert [(r.status, r.destination_failed) for r in results] == [(Status.DEFERRED, True)] * 2


def test_no_hop_connecting_is_a_destination_failure(tmp_path: Path) -> None:
    world = World()
    world.refuse = 2
    [result] = world.delivered(envelope("a@example.test"), message(tmp_path))
    assert result.destination_failed
    assert result.reply.startswith("451 4.4.1 Connection to mx2.example.test")


@pytest.mark.parametrize(("error", "status", "flag"), [
    (lookup_failed("timeout"), Status.DEFERRED, True),
    (NXDomain("example.test"), Status.FAILED, False),
])
def test_dns_failures(tmp_path: Path, error: Exception, status: Status, flag: bool) -> None:
    world = World(resolver=NextHopResolver(FakeLookup({("example.test", "MX"): error})))
    [result] = world.delivered(envelope("a@example.test"), message(tmp_path))
    assert (result.status, result.destination_failed) == (status, flag)


@pytest.mark.parametrize("script", [
    ReuseScript(rcpt={"a@example.test": "452 4.2.2 Mailbox full"}),
    ReuseScript(mail="451 4.3.0 try later"),
    ReuseScript(drop_after_dot=True),
], ids=["rcpt-4xx", "mail-4xx", "dropped-after-dot"])
def test_replies_after_mail_are_never_destination_failures(tmp_path: Path,
                                                          script: ReuseScript) -> None:
    world = World(script, reuse="never")
    [result] = world.delivered(envelope("a@example.test"), message(tmp_path))
    assert result.status is Status.DEFERRED
    assert not result.destination_failed


# --- the cache and the protocol on their own --------------------------------------------


def test_the_cache_hands_out_the_newest_session_and_drops_lost_ones() -> None:
    clock = MemoryReactorClock()
    cache = ConnectionCache(clock, idle_timeout=5, per_key=3)
    key = ("127.0.0.2", 25, "mx", "none", None, None, None)
    protos = []
    for _ in range(3):
        proto = SMTPClientProtocol(clock)
        proto.makeConnection(StringTransport())
        protos.append(proto)
        assert cache.put(key, IdleSession(proto, {}, 1))
    protos[2].connectionLost()
    assert len(cache) == 2
    taken = cache.take(key)
    assert taken is not None and taken.proto is protos[1]
    assert len(clock.getDelayedCalls()) == 1  # the one sweep
    clock.advance(5)
    assert protos[0].transport.value() == b"QUIT\r\n"
    assert cache.take(key) is None


def test_parking_and_taking_again_sets_no_timer_of_its_own() -> None:
    """One sweep timer for the cache, however often a session is parked and taken
    (once per message under load); it expires only what was idle long enough."""
    clock = MemoryReactorClock()
    cache = ConnectionCache(clock, idle_timeout=2, per_key=3)
    key = ("127.0.0.2", 25, "mx", "none", None, None, None)
    busy, quiet = SMTPClientProtocol(clock), SMTPClientProtocol(clock)
    busy.makeConnection(StringTransport())
    quiet.makeConnection(StringTransport())
    assert cache.put(key, IdleSession(quiet, {}, 1))
    [sweep] = clock.getDelayedCalls()
    for _ in range(3):
        clock.advance(0.5)
        assert cache.put(key, IdleSession(busy, {}, 1))
        taken = cache.take(key)
        assert taken is not None and taken.proto is busy
    assert cache.put(key, IdleSession(busy, {}, 1))  # parked at 1.5
    assert clock.getDelayedCalls() == [sweep] and sweep.getTime() == 2
    clock.advance(0.5)  # the sweep at 2.0: the quiet one goes, the busy one stays
    assert quiet.transport.value() == b"QUIT\r\n" and busy.transport.value() == b""
    again = [c for c in clock.getDelayedCalls() if c.func == cache._expire]
    assert [c.getTime() for c in again] == [3.5]
    clock.advance(1.5)
    assert busy.transport.value() == b"QUIT\r\n" and len(cache) == 0
    assert [c.func for c in clock.getDelayedCalls()] == [quiet._timed_out, busy._timed_out]


def test_closing_the_cache_quits_everyone_and_stops_the_sweep() -> None:
    clock = MemoryReactorClock()
    cache = ConnectionCache(clock, idle_timeout=2, per_key=3)
    key = ("127.0.0.2", 25, "mx", "none", None, None, None)
    proto = SMTPClientProtocol(clock)
    proto.makeConnection(StringTransport())
    assert cache.put(key, IdleSession(proto, {}, 1))
    cache.close()
    assert proto.transport.value() == b"QUIT\r\n" and len(cache) == 0
    assert [c.func for c in clock.getDelayedCalls()] == [proto._timed_out]  # QUIT's own


def test_tcp_nodelay_is_set_on_connect() -> None:
    class NoDelayTransport(StringTransport):
        no_delay: bool | None = None

        def setTcpNoDelay(self, enabled: bool) -> None:
            self.no_delay = enabled

    transport = NoDelayTransport()
    SMTPClientProtocol(MemoryReactorClock()).makeConnection(transport)
    assert transport.no_delay is True
