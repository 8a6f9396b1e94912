"""Outbound relay: one SMTP transaction per next hop, every recipient in it.

``SMTPRelayDeliverer`` is the ``IDeliverer`` for ``action = "relay"``. One
attempt resolves the next hops (the route's ``via`` smarthost, else MX), and
tries them in turn until one takes the transaction. Anything that goes wrong
*before* MAIL FROM (no connection, a 4xx/5xx greeting, EHLO refused, TLS
missing or unverifiable, AUTH refused) moves on to the next hop; once MAIL is
sent, the replies decide each recipient: 2xx delivered, 5xx failed, 4xx or a
broken connection deferred. If every hop fails, all recipients are deferred
with the last hop's reason: a broken MX should cost a retry, not a bounce.
Those results (and a transient DNS failure's) carry ``destination_failed``,
so the scheduler backs the whole destination off instead of every message
trying on its own.

Connection reuse: a session whose transaction ended cleanly (delivered, or
refused per recipient, the server ready for the next MAIL) may be parked in
a ``ConnectionCache`` keyed by hop address, port, name, TLS policy and
credentials, for ``idle_timeout`` seconds and at most ``max_idle_per_hop``
per key. The next delivery to that hop sends RSET on it and, if it answers
250, goes straight to MAIL (no greeting, EHLO, STARTTLS or AUTH again); a
cached session that is gone or fails its RSET is dropped and a fresh one
opened, at no cost to the attempt. Where the server offers PIPELINING, the
RSET goes in one write with MAIL, RCPT and DATA (as KumoMTA does), and a
refused RSET aborts the session before any of the message is sent.

With ``reuse="demand"`` (the default, Postfix's on-demand connection cache)
a session is parked only when the scheduler says more mail for its
destination is ready (``IBacklogAware``), or when the destination has steady
traffic: the delivery before this one started less than ``idle_timeout``
ago, so the next one is likely to come while the session waits (mail
arriving one message at a time from several clients never builds a backlog,
and would otherwise pay a connection, a greeting and EHLO per message). A
lone message still ends with QUIT at once; ``"always"`` parks every clean
session, ``"never"`` none. ``close()`` QUITs the idle ones at shutdown.
"""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from twisted.internet import ssl
from twisted.internet.defer import CancelledError, Deferred, DeferredList, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from relaygw.config import Config, RouteConfig, TLSPolicy
from relaygw.delivery.smtpclient import (
    Reply,
    SMTPClientFactory,
    SMTPClientProtocol,
    SMTPConnectionLost,
    SMTPProtocolError,
    SMTPTimeout,
    Timeouts,
)
from relaygw.dns import DNSError, Hop, NextHopResolver
from relaygw.envelope import Envelope, Recipient
from relaygw.interfaces import DeliveryResult, IBacklogAware, IInlineDeliverer
from relaygw.queuefile import MessageFile
from relaygw.routing import Router
from relaygw.spool import MessageSource, QueueFiles

# What a broken session raises: each means "no reply", never "a reply that said no".
SESSION_ERRORS = (SMTPTimeout, SMTPProtocolError, ConnectionLost)

DEFAULT_TIMEOUTS = Timeouts()

Connector = Callable[[Hop], Deferred[SMTPClientProtocol]]

IDLE_TIMEOUT = 2.0       # seconds a clean session waits for the next message to its hop
MAX_IDLE_PER_HOP = 10    # parked sessions per cache key (the default per_destination)
MAX_TRANSACTIONS = 100   # then QUIT: bounds what one long-lived session can go wrong with

Reuse = Literal["demand", "always", "never"]
# (address, port, hostname, TLS policy, CA file, username, password file): a session
# is only reused for a delivery that would have opened exactly the same one.
CacheKey = tuple[str, int, str, str, Path | None, str | None, Path | None]


class _StaleSession(Exception):
    """A parked session failed the RSET sent ahead of its transaction: dropped, and
    the delivery goes on as if there had been none (not the hop's fault)."""


class HopFailed(Exception):
    """This hop cannot take the transaction; the next one may."""

    def __init__(self, reply: str) -> None:
        super().__init__(reply)
        self.reply = reply


def parse_ehlo(reply: Reply) -> dict[str, str]:
    """EHLO keywords (upper case) to their parameters; the first line is the greeting."""
    extensions: dict[str, str] = {}
    for line in reply.lines[1:]:
        keyword, _, params = line.strip().partition(" ")
        if keyword.upper().startswith("AUTH="):  # the pre-RFC 4954 spelling
            keyword, params = "AUTH", keyword[5:] + " " + params
        extensions.setdefault(keyword.upper(), params.strip())
    return extensions


def load_trust_root(ca_file: Path | None) -> Any:
    """Every certificate in a PEM bundle, or the platform's store."""
    if ca_file is None:
        return ssl.platformTrust()
    pem = ca_file.read_bytes()
    marker = b"-----END CERTIFICATE-----"
    blocks = [block + marker for block in pem.split(marker) if b"-----BEGIN" in block]
    if not blocks:
        raise ValueError(f"{ca_file}: no PEM certificate found")
    return ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(b) for b in blocks])


def read_password(path: Path) -> str:
    lines = path.read_text(encoding="utf-8").splitlines()
    return lines[0].strip() if lines else ""


def format_hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(eq=False)
class IdleSession:
    """A session parked between transactions, ready for RSET then MAIL."""

    proto: SMTPClientProtocol
    extensions: dict[str, str]  # what its EHLO offered (after STARTTLS, if any)
    transactions: int           # done on it so far
    parked_at: float = 0.0      # when the cache took it


class ConnectionCache:
    """Idle outbound sessions per hop, QUIT after ``idle_timeout`` or at ``close()``.

    A session the server drops while idle leaves the cache by itself. One
    timer sweeps out the sessions idle too long, set for the oldest: under
    load a session is parked and taken again for every message, and a timer
    of its own cost a timed call and its cancel each time.
    """

    def __init__(self, clock: IReactorTime, idle_timeout: float = IDLE_TIMEOUT,
                 per_key: int = MAX_IDLE_PER_HOP, quit_timeout: float = 30.0) -> None:
        self.clock = clock
        self.idle_timeout = idle_timeout
        self.per_key = per_key
        self.quit_timeout = quit_timeout
        self.closed = False
        self._idle: dict[CacheKey, list[IdleSession]] = {}
        self._sweep: IDelayedCall | None = None

    def __len__(self) -> int:
        return sum(len(sessions) for sessions in self._idle.values())

    def has(self, key: CacheKey) -> bool:
        return bool(self._idle.get(key))

    def put(self, key: CacheKey, idle: IdleSession) -> bool:
        """Park ``idle``; False (the caller QUITs it) when closed or full."""
        sessions = self._idle.setdefault(key, [])
        if self.closed or self.idle_timeout <= 0 or len(sessions) >= self.per_key:
            if not sessions:
                del self._idle[key]
            return False
        idle.parked_at = self.clock.seconds()
        sessions.append(idle)
        if self._sweep is None:
            self._sweep = self.clock.callLater(self.idle_timeout, self._expire)
        idle.proto.closed.addCallback(self._lost, key, idle)
        return True

    def take(self, key: CacheKey) -> IdleSession | None:
        """The most recently parked session for ``key`` (the least likely to have timed out)."""
        sessions = self._idle.get(key)
        if not sessions:
            return None
        idle = sessions[-1]
        self._remove(key, idle)
        return idle

    def close(self) -> Deferred[None]:
        """QUIT every idle session and park no more; fires when they are closed."""
        self.closed = True
        if self._sweep is not None and self._sweep.active():
            self._sweep.cancel()
        self._sweep = None
        idle = [i for sessions in self._idle.values() for i in sessions]
        self._idle.clear()
        for i in idle:
            i.proto.quit(self.quit_timeout)
        if not idle:
            return succeed(None)
        return DeferredList([i.proto.closed for i in idle],
                            consumeErrors=True).addCallback(lambda _: None)

    def _lost(self, result: None, key: CacheKey, idle: IdleSession) -> None:
        """The server closed a parked session (its own idle timeout, a restart)."""
        self._remove(key, idle)
        return result

    def _expire(self) -> None:
        """QUIT the sessions idle for ``idle_timeout``; set the timer for the next."""
        self._sweep = None
        now = self.clock.seconds()
        oldest: float | None = None
        for key, sessions in list(self._idle.items()):
            for idle in list(sessions):
                if idle.parked_at + self.idle_timeout <= now + 0.001:  # a timer's rounding
                    self._remove(key, idle)
                    idle.proto.quit(self.quit_timeout)
                elif oldest is None or idle.parked_at < oldest:
                    oldest = idle.parked_at
        if oldest is not None:
            self._sweep = self.clock.callLater(oldest + self.idle_timeout - now, self._expire)

    def _remove(self, key: CacheKey, idle: IdleSession) -> bool:
        sessions = self._idle.get(key)
        if sessions is None or not self._remove_from(sessions, idle):
            return False
        if not sessions:
            del self._idle[key]
        return True

    @staticmethod
    def _remove_from(sessions: list[IdleSession], idle: IdleSession) -> bool:
        if idle not in sessions:
            return False
        sessions.remove(idle)
        return True


@implementer(IInlineDeliverer, IBacklogAware)
class SMTPRelayDeliverer:
    """Relays to the next hop of each recipient domain over SMTP."""

    log = Logger(namespace="relaygw.delivery.smtp")

    def __init__(self, config: Config, reactor: Any, resolver: NextHopResolver,
                 hostname: str | None = None, *, timeouts: Timeouts = DEFAULT_TIMEOUTS,
                 connect: Connector | None = None, reuse: Reuse = "demand",
                 idle_timeout: float = IDLE_TIMEOUT,
                 max_idle_per_hop: int = MAX_IDLE_PER_HOP,
                 source: MessageSource | None = None) -> None:
        """``reactor`` provides IReactorTCP and IReactorTime (a MemoryReactorClock in tests).

        ``connect`` replaces the TCP connection to a hop (tests); by default a
        TCP4/TCP6 client endpoint on ``reactor``. ``reuse`` says when a clean
        session is parked for the next message (see the module docstring).
        ``source`` is where messages are read from: the spool (which sends one
        from memory or its journal when it can); by default the queue file given.
        """
        self.config = config
        self.source: MessageSource = source if source is not None else QueueFiles()
        self._reactor = reactor
        self._resolver = resolver
        self._hostname = hostname or config.hostname
        self._timeouts = timeouts
        self._connect = connect or self._connect_tcp
        self._router = Router(config)
        self._smarthosts = _smarthost_keys(config)
        self._trust_roots: dict[Path | None, Any] = {}
        self.reuse = reuse
        self.cache = ConnectionCache(reactor, idle_timeout, max_idle_per_hop, timeouts.quit)
        self._backlog: Callable[[str], int] = lambda destination: 0
        # destination -> start times of its last two deliveries (steady traffic)
        self._starts: dict[str, tuple[float, float]] = {}
        self._starts_limit = 1000

    def reconfigure(self, config: Config, resolver: NextHopResolver | None = None) -> None:
        """A reloaded config (SIGHUP): routes and relay settings for the next delivery.

        Deliveries in flight finish with the route they started with; parked
        sessions stay keyed by their route settings, so a changed route opens a new
        one. ``resolver`` replaces the next-hop resolver when ``[dns]`` changed.
        """
        self.config = config
        self._router = Router(config)
        self._smarthosts = _smarthost_keys(config)
        if resolver is not None:
            self._resolver = resolver

    # --- IBacklogAware, shutdown ---------------------------------------------------

    def use_backlog(self, backlog: Callable[[str], int]) -> None:
        self._backlog = backlog

    def close(self) -> Deferred[None]:
        """At shutdown, once no delivery is in flight: QUIT the idle sessions.

        Fires when they are closed (each QUIT has the quit timeout, then the
        connection is dropped). Later deliveries still work, without reuse.
        """
        return self.cache.close()

    def keep_session(self, destination: str) -> bool:
        """Whether a clean session to ``destination`` is worth parking now."""
        if self.reuse == "always":
            return True
        if self.reuse != "demand":
            return False
        if self._backlog(destination) > 0:
            return True
        before, _ = self._starts.get(destination, (float("-inf"), 0.0))
        return self._reactor.seconds() - before < self.cache.idle_timeout

    def _started(self, destination: str) -> None:
        """Note a delivery's start, for the steady-traffic rule of ``keep_session``."""
        now = self._reactor.seconds()
        _, last = self._starts.pop(destination, (0.0, float("-inf")))
        if len(self._starts) >= self._starts_limit:  # forget the quiet ones, now and then
            horizon = now - self.cache.idle_timeout
            self._starts = {d: t for d, t in self._starts.items() if t[1] > horizon}
            self._starts_limit = max(1000, 2 * len(self._starts))  # amortised: O(1) a call
        self._starts[destination] = (last, now)

    # --- IDeliverer ----------------------------------------------------------------

    def destination(self, recipient: Recipient) -> str:
        """The scheduler's key for grouping and per-destination limits: the domain, or
        the smarthost and the settings its sessions are opened with (the Router
        remembers each domain's route; each smarthost's key is made once per
        config, by ``_smarthost_keys``)."""
        route = self._router.find_route(recipient.domain)
        if route is not None:
            key = self._smarthosts.get(id(route))
            if key is not None:
                return key
        return recipient.domain

    def deliver(self, envelope: Envelope, message_path: Path,
                recipients: Sequence[Recipient]) -> Deferred[list[DeliveryResult]]:
        return Deferred.fromCoroutine(self.deliver_inline(envelope, message_path, recipients))

    async def deliver_inline(self, envelope: Envelope, message_path: Path,
                             recipients: Sequence[Recipient]) -> list[DeliveryResult]:
        """``deliver`` as a coroutine (``IInlineDeliverer``): the scheduler's own
        coroutine awaits it, without a Deferred and a trampoline of its own."""
        if not isinstance(message_path, Path):
            message_path = Path(message_path)
        try:
            return await self._deliver(envelope, message_path, recipients)
        except Exception:
            self.log.failure("{queue_id}: relay attempt crashed", queue_id=envelope.id)
            return [DeliveryResult.deferred("451 4.3.0 Internal error during delivery")
                    for _ in recipients]

    async def _deliver(self, envelope: Envelope, message_path: Path,
                       recipients: Sequence[Recipient]) -> list[DeliveryResult]:
        if not recipients:
            return []
        route = self._router.find_route(recipients[0].domain)
        policy: TLSPolicy = (route.tls if route is not None and route.tls is not None
                             else self.config.relay.tls)
        try:
            if not self.source.has_message_without_file(envelope.id):
                os.stat(message_path)  # a queue file gone missing defers before any connection
        except OSError as e:
            return _all(recipients, DeliveryResult.deferred(
                f"451 4.3.0 Cannot read the queued message: {e.strerror or e}"))
        size = envelope.size
        try:
            if route is not None and route.via is not None:
                hops = await self._resolver.resolve_host(*route.via)
            else:
                hops = await self._resolver.resolve_domain(recipients[0].domain,
                                                           self.config.relay.mx_port)
        except DNSError as e:
            result = (DeliveryResult.failed(e.reply) if e.permanent
                      else DeliveryResult.deferred(e.reply, destination_failed=True))
            return _all(recipients, result)
        destination = self.destination(recipients[0])
        self._started(destination)
        keys = {hop: self.cache_key(hop, route, policy) for hop in hops}
        if len(hops) > 1:
            # A hop with a session waiting goes first (Postfix looks its cache up
            # by destination too); the order is otherwise the resolver's.
            hops = sorted(hops, key=lambda hop: not self.cache.has(keys[hop]))
        last = DeliveryResult.deferred("451 4.4.4 No next hop to try", destination_failed=True)
        for hop in hops:
            session = _Session(self, hop, route, policy, envelope, message_path, size,
                               recipients, destination, keys[hop])
            try:
                return await session.run()
            except HopFailed as e:
                self.log.info("{queue_id}: {remote}: {reply}; trying the next hop if any",
                              queue_id=envelope.id, remote=hop.label, reply=e.reply)
                last = DeliveryResult.deferred(e.reply, hop.label, destination_failed=True)
        return _all(recipients, last)

    def cache_key(self, hop: Hop, route: RouteConfig | None, policy: TLSPolicy) -> CacheKey:
        username = route.username if route is not None else None
        password_file = route.password_file if route is not None else None
        ca_file = route.ca_file if route is not None and policy == "verify" else None
        return (hop.address, hop.port, hop.hostname, policy, ca_file, username, password_file)

    # --- the parts a session needs ---------------------------------------------------

    def _connect_tcp(self, hop: Hop) -> Deferred[SMTPClientProtocol]:
        endpoint_type = TCP6ClientEndpoint if ":" in hop.address else TCP4ClientEndpoint
        endpoint = endpoint_type(self._reactor, hop.address, hop.port,
                                 timeout=int(self._timeouts.connect))
        return endpoint.connect(SMTPClientFactory(self._reactor))

    def tls_options(self, hop: Hop, route: RouteConfig | None, policy: TLSPolicy) -> Any:
        if policy != "verify":
            return ssl.CertificateOptions()  # encrypt, verify nothing: opportunistic
        ca_file = route.ca_file if route is not None else None
        if ca_file not in self._trust_roots:
            self._trust_roots[ca_file] = load_trust_root(ca_file)
        return ssl.optionsForClientTLS(hop.hostname, trustRoot=self._trust_roots[ca_file])


def _smarthost_keys(config: Config) -> dict[int, str]:
    """The destination of each route with a ``via``, by the route's id (the routes
    live as long as ``config``): the smarthost, and the settings its sessions are
    opened with. Routes sharing a smarthost may differ in TLS policy, CA or
    credentials; a session is set up from one route, so only recipients that
    agree share it (else a tls = "none" route's recipient would take a
    "required" one in clear)."""
    keys = {}
    for route in config.routes:
        if route.via is None:
            continue
        settings = [f"{name}={value}" for name, value in (
            ("tls", route.tls), ("ca_file", route.ca_file), ("username", route.username),
            ("password_file", route.password_file)) if value is not None]
        hostport = format_hostport(*route.via)
        keys[id(route)] = f"{hostport} ({', '.join(settings)})" if settings else hostport
    return keys


def _all(recipients: Sequence[Recipient], result: DeliveryResult) -> list[DeliveryResult]:
    return [result for _ in recipients]


class _Session:
    """One connection to one hop: greeting, EHLO, STARTTLS, AUTH, then the transaction."""

    def __init__(self, deliverer: SMTPRelayDeliverer, hop: Hop, route: RouteConfig | None,
                 policy: TLSPolicy, envelope: Envelope, message_path: Path, size: int,
                 recipients: Sequence[Recipient], destination: str, key: CacheKey) -> None:
        self.deliverer = deliverer
        self.hop = hop
        self.route = route
        self.policy = policy
        self.envelope = envelope
        self.message_path = message_path
        self.size = size
        self.recipients = recipients
        self.t = deliverer._timeouts
        self.destination = destination
        self.key = key
        self.proto: SMTPClientProtocol
        self.in_data = False  # the server may read whatever we write as message text
        self.clean = False    # the transaction ended with the server ready for the next
        self.transactions = 0
        self.rset_pending = False  # a reused session's RSET goes with the next MAIL

    async def run(self) -> list[DeliveryResult]:
        while True:
            extensions = await self._reuse()
            if extensions is None:
                extensions = await self._connect()
            self.transactions += 1
            try:
                results = await self._transaction(extensions)
            except _StaleSession:
                self.transactions = 0  # counted on the session that is gone
                continue  # aborted already; the next parked session, or a fresh one
            except BaseException:
                self._release(extensions)
                raise
            self._release(extensions)
            return results

    async def _reuse(self) -> dict[str, str] | None:
        """A parked session to this hop that answers RSET; None if there is none.

        One that is gone or fails its RSET is dropped: not the hop's fault, so
        not a HopFailed, and the caller opens a fresh one.

        With PIPELINING the RSET is not waited for here: it goes out in one write
        with MAIL, RCPT and DATA (``rset_pending``), which saves a round trip per
        message; if its reply is not 250 the session is aborted before any of the
        message is sent, and ``run`` starts over (``_StaleSession``).
        """
        while (idle := self.deliverer.cache.take(self.key)) is not None:
            proto = idle.proto
            if proto.lost or proto.pending_input:  # gone, or said something unasked (421)
                proto.quit(self.t.quit)
                continue
            if "PIPELINING" in idle.extensions:
                self.proto = proto
                self.transactions = idle.transactions
                self.rset_pending = True
                return idle.extensions
            try:
                reply = await proto.command(b"RSET", self.t.rset)
            except SESSION_ERRORS as e:
                proto.abort()
                self.deliverer.log.debug("{remote}: cached session failed RSET: {error}",
                                         remote=self.hop.label, error=e)
                continue
            if reply.code != 250:
                proto.quit(self.t.quit)
                continue
            self.proto = proto
            self.transactions = idle.transactions
            return idle.extensions
        return None

    async def _connect(self) -> dict[str, str]:
        try:
            self.proto = await self.deliverer._connect(self.hop)
        except Exception as e:  # any connection failure is this hop's
            raise HopFailed(f"451 4.4.1 Connection to {self.hop.label} failed: "
                            f"{_reason(e)}") from None
        try:
            return await self._open()
        except HopFailed:
            self.proto.quit(self.t.quit)
            raise
        except SESSION_ERRORS as e:
            self.proto.abort()
            raise HopFailed(f"451 4.4.2 {self.hop.label}: {e}") from None

    def _release(self, extensions: dict[str, str]) -> None:
        """After the transaction: abort mid-DATA, park a clean session if wanted, else QUIT."""
        proto = self.proto
        if self.in_data:
            proto.abort()
            return
        usable = (self.clean and not proto.lost
                  and not getattr(proto.transport, "disconnecting", False)
                  and self.transactions < MAX_TRANSACTIONS)
        if usable and self.deliverer.keep_session(self.destination):
            if self.deliverer.cache.put(self.key, IdleSession(proto, extensions,
                                                              self.transactions)):
                return
        proto.quit(self.t.quit)

    # --- before MAIL: failures here move on to the next hop -----------------------

    async def _open(self) -> dict[str, str]:
        greeting = await self.proto.expect(self.t.greeting, "the greeting")
        if greeting.code != 220:
            raise HopFailed(str(greeting))
        extensions = await self._hello()
        extensions = await self._starttls(extensions)
        await self._authenticate(extensions)
        return extensions

    async def _hello(self) -> dict[str, str]:
        name = self.deliverer._hostname.encode("idna")
        reply = await self.proto.command(b"EHLO " + name, self.t.command)
        if reply.code == 250:
            return parse_ehlo(reply)
        if reply.permanent:  # an RFC 821 server: no extensions
            reply = await self.proto.command(b"HELO " + name, self.t.command)
            if reply.code == 250:
                return {}
        raise HopFailed(str(reply))

    async def _starttls(self, extensions: dict[str, str]) -> dict[str, str]:
        if self.policy == "none":
            return extensions
        mandatory = self.policy in ("required", "verify")
        if "STARTTLS" not in extensions:
            if mandatory:
                raise HopFailed(f"451 4.7.4 TLS required but not offered by {self.hop.label}")
            return extensions
        reply = await self.proto.command(b"STARTTLS", self.t.command)
        if reply.code != 220:
            if mandatory:
                raise HopFailed(str(reply))
            return extensions
        if self.proto.pending_input:
            # Plain text after the 220 would be read as if it came inside TLS.
            self.proto.abort()
            raise HopFailed(f"451 4.7.0 {self.hop.label} sent data after its STARTTLS reply")
        try:
            options = self.deliverer.tls_options(self.hop, self.route, self.policy)
        except (OSError, ValueError) as e:
            raise HopFailed(f"451 4.7.5 Cannot load the CA file: {e}") from None
        self.proto.start_tls(options)
        try:
            return await self._hello()
        except SESSION_ERRORS as e:
            self.proto.abort()
            why = e.reason if isinstance(e, SMTPConnectionLost) else str(e)
            raise HopFailed(f"451 4.7.5 TLS negotiation with {self.hop.label} failed: "
                            f"{why}") from None

    async def _authenticate(self, extensions: dict[str, str]) -> None:
        route = self.route
        if route is None or route.username is None or route.password_file is None:
            return
        mechanisms = extensions.get("AUTH", "").upper().split()
        if not mechanisms:
            return  # the server does not ask for it; let it decide at RCPT
        if not self.proto.tls_started and self.policy != "none":
            raise HopFailed(f"451 4.7.0 Not sending credentials to {self.hop.label} "
                            "without TLS")
        try:
            password = read_password(route.password_file)
        except (OSError, UnicodeDecodeError) as e:
            raise HopFailed(f"451 4.3.5 Cannot read password_file: {e}") from None
        user = route.username.encode("utf-8")
        secret = password.encode("utf-8")
        if "PLAIN" in mechanisms:
            token = base64.b64encode(b"\0" + user + b"\0" + secret)
            reply = await self.proto.command(b"AUTH PLAIN " + token, self.t.command, "AUTH")
        elif "LOGIN" in mechanisms:
            reply = await self.proto.command(b"AUTH LOGIN", self.t.command, "AUTH")
            for value in (user, secret):
                if reply.code != 334:
                    break
                reply = await self.proto.command(base64.b64encode(value), self.t.command,
                                                 "AUTH")
        else:
            raise HopFailed(f"451 4.7.0 {self.hop.label} offers no AUTH mechanism we know "
                            f"({' '.join(mechanisms)})")
        if reply.code != 235:
            raise HopFailed(str(reply))

    # --- the transaction: replies now decide each recipient ---------------------

    async def _transaction(self, extensions: dict[str, str]) -> list[DeliveryResult]:
        remote = self.hop.label
        limit = extensions.get("SIZE", "")
        if limit.isdigit() and 0 < int(limit) < self.size:
            self.clean = True  # nothing was sent: the session is as it was
            return _all(self.recipients, DeliveryResult.failed(
                f"552 5.3.4 Message size {self.size} exceeds the limit of {int(limit)} "
                f"of {self.hop.hostname}", remote))
        self.clean = True  # until a reply says otherwise
        mail = self._mail_command(extensions)
        rcpts = [b"RCPT TO:<" + r.address.encode("utf-8") + b">" for r in self.recipients]
        if "PIPELINING" in extensions:
            rset = self.rset_pending
            self.rset_pending = False
            self.proto.send(*([b"RSET"] if rset else []), mail, *rcpts, b"DATA")
            waits = [(self.t.mail, "MAIL"), *[(self.t.rcpt, "RCPT")] * len(rcpts),
                     (self.t.data_init, "DATA")]
            if not rset:
                replies = await self.proto.expect_replies(waits)
            else:
                rset_reply, *replies = await self.proto.expect_replies(
                    [(self.t.rset, "RSET"), *waits], on_first=self._rset_answered)
                if not _rset_accepted(rset_reply):
                    replies = self._after_refused_rset(rset_reply, replies)
        else:
            replies = await self._lockstep(mail, rcpts)
        return await self._settle(replies)

    def _rset_answered(self, reply: Reply | Exception) -> None:
        """The RSET sent ahead of this transaction is answered (its reply comes
        first of the group's): unless 250, abort the session now, before any of
        the message is sent; whatever the server made of MAIL, RCPT or DATA ends
        with the connection, and ``_after_refused_rset`` has ``run`` take another."""
        if _rset_accepted(reply) or isinstance(reply, CancelledError):
            return
        self.clean = False
        self.proto.abort()

    def _after_refused_rset(self, reply: Reply | Exception,
                            replies: list[Reply | Exception]) -> list[Reply | Exception]:
        """Once the group is in, after a refused RSET (``_rset_answered`` has aborted
        the session): _StaleSession, so that ``run`` takes another session; or,
        if the group was cut at shutdown, CancelledError for every reply, for
        nothing the server said after the RSET counts (it may answer MAIL 503,
        never reset) and the recipients are deferred as cut short."""
        self.clean = False
        if any(isinstance(r, CancelledError) for r in replies):
            return [CancelledError() for _ in replies]
        self.deliverer.log.debug("{remote}: cached session failed RSET: {error}",
                                 remote=self.hop.label, error=reply)
        raise _StaleSession()

    def _mail_command(self, extensions: dict[str, str]) -> bytes:
        mail = b"MAIL FROM:<" + self.envelope.sender.encode("utf-8") + b">"
        if "SIZE" in extensions:
            mail += b" SIZE=%d" % self.size
        if "8BITMIME" in extensions and self.envelope.extra.get("body") == "8BITMIME":
            mail += b" BODY=8BITMIME"
        addresses = [self.envelope.sender, *(r.address for r in self.recipients)]
        if "SMTPUTF8" in extensions and not all(a.isascii() for a in addresses):
            mail += b" SMTPUTF8"
        return mail

    async def _lockstep(self, mail: bytes, rcpts: list[bytes]) -> list[Reply | Exception]:
        """MAIL, each RCPT, DATA one at a time; stops where a reply makes the rest moot."""
        replies: list[Reply | Exception] = []
        try:
            replies.append(await self.proto.command(mail, self.t.mail, "MAIL"))
            if not replies[0].positive:
                return replies
            for rcpt in rcpts:
                replies.append(await self.proto.command(rcpt, self.t.rcpt, "RCPT"))
            if any(r.positive for r in replies[1:] if isinstance(r, Reply)):
                replies.append(await self.proto.command(b"DATA", self.t.data_init, "DATA"))
        except SESSION_ERRORS as e:
            replies.append(e)
        return replies

    async def _settle(self, replies: list[Reply | Exception]) -> list[DeliveryResult]:
        """Per-recipient results from the MAIL/RCPT/DATA replies, sending the message if due."""
        self._check(*replies)
        count = len(self.recipients)
        mail = replies[0]
        rcpt_replies = replies[1:1 + count]
        data = replies[1 + count] if len(replies) > 1 + count else None
        if isinstance(data, Reply) and data.code == 354:
            self.in_data = True
        if not (isinstance(mail, Reply) and mail.positive):
            return _all(self.recipients, self._outcome(mail))
        results: list[DeliveryResult | None] = []
        for index in range(count):
            reply = rcpt_replies[index] if index < len(rcpt_replies) else None
            if isinstance(reply, Reply) and reply.positive:
                results.append(None)  # accepted: the DATA outcome decides
            else:
                results.append(self._outcome(reply if reply is not None
                                             else _last_error(replies)))
        if all(r is not None for r in results):
            return [r for r in results if r is not None]
        if not (isinstance(data, Reply) and data.code == 354):
            final: Reply | Exception = data if data is not None else _last_error(replies)
        else:
            final = await self._send_message()
            self.in_data = False
            self._check(final)
        outcome = self._outcome(final)
        return [outcome if r is None else r for r in results]

    async def _send_message(self) -> Reply | Exception:
        """The message and the reply to its dot; a CancelledError (shutdown's grace
        ended) is an outcome too: the recipients are deferred, as cut short."""
        try:
            with self._open_message() as source:
                await self.proto.send_message(source, self.t.data_block)
            return await self.proto.expect(self.t.data_end, "the end of data")
        except (*SESSION_ERRORS, OSError, CancelledError) as e:
            self.proto.abort()
            return e

    def _open_message(self) -> MessageFile | io.BytesIO:
        return self.deliverer.source.open_for_delivery(self.envelope, self.message_path)

    def _check(self, *replies: Reply | Exception) -> None:
        """A missing reply or a 421 (closing) leaves the session unfit for another MAIL."""
        if any(isinstance(r, Exception) or r.code == 421 for r in replies):
            self.clean = False

    def _outcome(self, reply: Reply | Exception) -> DeliveryResult:
        remote = self.hop.label
        if isinstance(reply, Reply):
            if reply.positive:
                return DeliveryResult.delivered(str(reply), remote)
            if reply.permanent:
                return DeliveryResult.failed(str(reply), remote)
            return DeliveryResult.deferred(str(reply), remote)
        if isinstance(reply, CancelledError):  # str() of it is empty
            return DeliveryResult.deferred(
                f"451 4.4.2 {remote}: attempt cut short at shutdown", remote)
        return DeliveryResult.deferred(f"451 4.4.2 {remote}: {reply}", remote)


def _rset_accepted(reply: Reply | Exception) -> bool:
    return isinstance(reply, Reply) and reply.code == 250


def _last_error(replies: list[Reply | Exception]) -> Exception:
    """Why a reply is missing: the session error that ended the list."""
    errors = [r for r in replies if isinstance(r, Exception)]
    return errors[-1] if errors else ConnectionLost("no reply")


def _reason(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.rstrip(".")
