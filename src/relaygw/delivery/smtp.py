"""Outbound relay: one SMTP transaction per next hop, every recipient in it.

``SMTPRelayDeliverer`` is the ``IDeliverer`` for ``action = "relay"``. One
attempt resolves the next hops (the route's ``via`` smarthost, else MX), and
tries them in turn until one takes the transaction. Anything that goes wrong
*before* MAIL FROM (no connection, a 4xx/5xx greeting, EHLO refused, TLS
missing or unverifiable, AUTH refused) moves on to the next hop; once MAIL is
sent, the replies decide each recipient: 2xx delivered, 5xx failed, 4xx or a
broken connection deferred. If every hop fails, all recipients are deferred
with the last hop's reason: a broken MX should cost a retry, not a bounce.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from twisted.internet import ssl
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.error import ConnectionLost
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
from relaygw.interfaces import DeliveryResult, IDeliverer
from relaygw.routing import Router

# What a broken session raises: each means "no reply", never "a reply that said no".
SESSION_ERRORS = (SMTPTimeout, SMTPProtocolError, ConnectionLost)

DEFAULT_TIMEOUTS = Timeouts()

Connector = Callable[[Hop], Deferred[SMTPClientProtocol]]


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


@implementer(IDeliverer)
class SMTPRelayDeliverer:
    """Relays to the next hop of each recipient domain over SMTP."""

    log = Logger(namespace="relaygw.delivery.smtp")

    def __init__(self, config: Config, reactor: Any, resolver: NextHopResolver,
                 hostname: str | None = None, *, timeouts: Timeouts = DEFAULT_TIMEOUTS,
                 connect: Connector | None = None) -> None:
        """``reactor`` provides IReactorTCP and IReactorTime (a MemoryReactorClock in tests).

        ``connect`` replaces the TCP connection to a hop (tests); by default a
        TCP4/TCP6 client endpoint on ``reactor``.
        """
        self.config = config
        self._reactor = reactor
        self._resolver = resolver
        self._hostname = hostname or config.hostname
        self._timeouts = timeouts
        self._connect = connect or self._connect_tcp
        self._router = Router(config)
        self._trust_roots: dict[Path | None, Any] = {}

    # --- IDeliverer ----------------------------------------------------------------

    def destination(self, recipient: Recipient) -> str:
        route = self._router.find_route(recipient.domain)
        if route is not None and route.via is not None:
            return format_hostport(*route.via)
        return recipient.domain

    def deliver(self, envelope: Envelope, message_path: Path,
                recipients: Sequence[Recipient]) -> Deferred[list[DeliveryResult]]:
        return Deferred.fromCoroutine(self._deliver_safely(envelope, message_path, recipients))

    async def _deliver_safely(self, envelope: Envelope, message_path: Path,
                              recipients: Sequence[Recipient]) -> list[DeliveryResult]:
        try:
            return await self._deliver(envelope, Path(message_path), recipients)
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
            size = os.stat(message_path).st_size
        except OSError as e:
            return _all(recipients, DeliveryResult.deferred(
                f"451 4.3.0 Cannot read the queued message: {e.strerror or e}"))
        try:
            if route is not None and route.via is not None:
                hops = await self._resolver.resolve_host(*route.via)
            else:
                hops = await self._resolver.resolve_domain(recipients[0].domain,
                                                           self.config.relay.mx_port)
        except DNSError as e:
            result = (DeliveryResult.failed(e.reply) if e.permanent
                      else DeliveryResult.deferred(e.reply))
            return _all(recipients, result)
        last = DeliveryResult.deferred("451 4.4.4 No next hop to try")
        for hop in hops:
            session = _Session(self, hop, route, policy, envelope, message_path, size,
                               recipients)
            try:
                return await session.run()
            except HopFailed as e:
                self.log.info("{queue_id}: {remote}: {reply}; trying the next hop if any",
                              queue_id=envelope.id, remote=hop.label, reply=e.reply)
                last = DeliveryResult.deferred(e.reply, hop.label)
        return _all(recipients, last)

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


def _all(recipients: Sequence[Recipient], result: DeliveryResult) -> list[DeliveryResult]:
    return [result for _ in recipients]


class _Session:
    """One connection to one hop: greeting, EHLO, STARTTLS, AUTH, then the transaction."""

    def __init__(self, deliverer: SMTPRelayDeliverer, hop: Hop, route: RouteConfig | None,
                 policy: TLSPolicy, envelope: Envelope, message_path: Path, size: int,
                 recipients: Sequence[Recipient]) -> None:
        self.deliverer = deliverer
        self.hop = hop
        self.route = route
        self.policy = policy
        self.envelope = envelope
        self.message_path = message_path
        self.size = size
        self.recipients = recipients
        self.t = deliverer._timeouts
        self.proto: SMTPClientProtocol
        self.in_data = False  # the server may read whatever we write as message text

    async def run(self) -> list[DeliveryResult]:
        try:
            self.proto = await self.deliverer._connect(self.hop)
        except Exception as e:  # any connection failure is this hop's
            raise HopFailed(f"451 4.4.1 Connection to {self.hop.label} failed: "
                            f"{_reason(e)}") from None
        try:
            extensions = await self._open()
        except HopFailed:
            self.proto.quit(self.t.quit)
            raise
        except SESSION_ERRORS as e:
            self.proto.abort()
            raise HopFailed(f"451 4.4.2 {self.hop.label}: {e}") from None
        try:
            results = await self._transaction(extensions)
        finally:
            if self.in_data:
                self.proto.abort()
            else:
                self.proto.quit(self.t.quit)
        return results

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
            return _all(self.recipients, DeliveryResult.failed(
                f"552 5.3.4 Message size {self.size} exceeds the limit of {int(limit)} "
                f"of {self.hop.hostname}", remote))
        mail = self._mail_command(extensions)
        rcpts = [b"RCPT TO:<" + r.address.encode("utf-8") + b">" for r in self.recipients]
        if "PIPELINING" in extensions:
            self.proto.send(mail, *rcpts, b"DATA")
            waits = ([self.proto.expect(self.t.mail, "MAIL")]
                     + [self.proto.expect(self.t.rcpt, "RCPT") for _ in rcpts]
                     + [self.proto.expect(self.t.data_init, "DATA")])
            outcomes = await DeferredList(waits, consumeErrors=True)
            replies = [value if ok else value.value for ok, value in outcomes]
        else:
            replies = await self._lockstep(mail, rcpts)
        return await self._settle(replies)

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
        outcome = self._outcome(final)
        return [outcome if r is None else r for r in results]

    async def _send_message(self) -> Reply | Exception:
        try:
            with open(self.message_path, "rb") as source:
                await self.proto.send_message(source, self.t.data_block)
            return await self.proto.expect(self.t.data_end, "the end of data")
        except (*SESSION_ERRORS, OSError) as e:
            self.proto.abort()
            return e

    def _outcome(self, reply: Reply | Exception) -> DeliveryResult:
        remote = self.hop.label
        if isinstance(reply, Reply):
            if reply.positive:
                return DeliveryResult.delivered(str(reply), remote)
            if reply.permanent:
                return DeliveryResult.failed(str(reply), remote)
            return DeliveryResult.deferred(str(reply), remote)
        return DeliveryResult.deferred(f"451 4.4.2 {remote}: {reply}", remote)


def _last_error(replies: list[Reply | Exception]) -> Exception:
    """Why a reply is missing: the session error that ended the list."""
    errors = [r for r in replies if isinstance(r, Exception)]
    return errors[-1] if errors else ConnectionLost("no reply")


def _reason(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.rstrip(".")
