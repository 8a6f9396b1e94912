"""The inbound SMTP server: protocol and factory, one factory per ``[[listener]]``.

Our own protocol on twisted.internet.protocol.Protocol rather than
twisted.mail.smtp.ESMTP, which advertises almost nothing, ignores SIZE,
accepts bare LF and would execute commands pipelined before STARTTLS.

Commands are read from a bounded buffer and end only at CRLF; a command that
must wait (the spool commit after DATA) pauses the reading of the commands
pipelined behind it, so replies keep their order (RFC 2920). Recipients are
routed at RCPT time (relaygw.routing); DATA is streamed to the spool through
relaygw.datareader and answered 250 only after the commit is durable.

STARTTLS (RFC 3207) throws away every byte that arrived before the TLS
handshake (the CVE-2011-0411 class of command injection) and the whole session
state with it. AUTH PLAIN and LOGIN (RFC 4954) check passwords in the thread
pool; the session waits for the answer as it waits for a spool commit, and
neither passwords nor the base64 that carries them are ever logged.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Protocol as TypingProtocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IHalfCloseableProtocol, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from relaygw import replies
from relaygw.addresses import AddressError, parse_params, parse_path
from relaygw.addresses import split_path_and_params as split_path
from relaygw.auth import Authenticator, decode_base64, parse_plain
from relaygw.config import Config
from relaygw.datareader import DataError, DataReader
from relaygw.envelope import Envelope, Recipient
from relaygw.fastwrite import lose_connection, tls_handshake_pending, write_now
from relaygw.logs import MailLog
from relaygw.messagecache import wire_clean
from relaygw.nodelay import NoDelaySessions
from relaygw.routing import Refusal, Router
from relaygw.spool import Incoming, Spool
from relaygw.tlsserver import ServerTLS

MAX_COMMAND_LINE = 1000      # octets before CRLF; RFC 5321 allows 512, extensions more
MAX_ERRORS = 20              # Postfix's smtpd_hard_error_limit
OVERSHOOT_LIMIT = 1000       # Postfix's smtpd_recipient_overshoot_limit
REFUSAL_HANDSHAKE_GRACE = 10.0  # seconds an implicit-TLS client has to hear its 421
PAUSE_BUFFER = 256 * 1024    # stop reading while a commit is pending and this much waits
IDLE_SLACK = 0.001           # seconds: an idle timer this close to its time has expired

_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun",
           "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def rfc5322_date(seconds: float) -> str:
    """``Mon, 23 Nov 2026 21:39:42 +0100``: the local time of ``seconds`` (RFC 5322
    section 3.3), as email.utils.format_datetime of the local datetime gives it, in
    a fraction of the time (this runs for every message)."""
    local = time.localtime(seconds)
    year, month, day, hour, minute, second, weekday = local[:7]
    offset = local.tm_gmtoff
    sign = "-" if offset < 0 else "+"
    offset_hours, offset_minutes = divmod(abs(offset) // 60, 60)
    return (f"{_DAYS[weekday]}, {day:02d} {_MONTHS[month - 1]} {year:04d}"
            f" {hour:02d}:{minute:02d}:{second:02d} {sign}{offset_hours:02d}{offset_minutes:02d}")


@functools.lru_cache(maxsize=64)
def _ehlo_reply(hostname: str, max_size: int, extensions: tuple[str, ...]) -> str:
    """The EHLO reply: the same few for every session, so made once each."""
    lines = [hostname, "PIPELINING", f"SIZE {max_size}", "ETRN", *extensions,
             "ENHANCEDSTATUSCODES", "8BITMIME"]
    return "\r\n".join(f"250-{x}" for x in lines[:-1]) + f"\r\n250 {lines[-1]}"


class Gateway(TypingProtocol):
    """What a session needs from the running gateway (service.py provides it)."""

    config: Config
    router: Router
    spool: Spool
    clock: IReactorTime
    maillog: MailLog
    connections: ConnectionLimiter
    server_tls: ServerTLS | None      # None: no [tls]
    authenticator: Authenticator | None  # None: no [auth]

    def accepted(self, envelope: Envelope) -> None: ...
    def etrn(self, domain: str) -> None: ...


@dataclass
class ConnectionLimiter:
    """Counts sessions in all and per client address, across every listener."""

    total: int = 0
    per_client: Counter[str] = field(default_factory=Counter)
    sessions: set[SMTPServerProtocol] = field(default_factory=set)

    def admit(self, client: str, max_total: int, max_per_client: int) -> bool:
        if self.total >= max_total or self.per_client[client] >= max_per_client:
            return False
        self.total += 1
        self.per_client[client] += 1
        return True

    def release(self, client: str) -> None:
        self.total -= 1
        self.per_client[client] -= 1
        if self.per_client[client] <= 0:
            del self.per_client[client]


@dataclass
class Transaction:
    sender: str
    recipients: list[Recipient] = field(default_factory=list)
    given: list[str] = field(default_factory=list)  # RCPT addresses as accepted
    declared_size: int | None = None
    body: str | None = None  # BODY=8BITMIME is passed on when relaying
    rcpt_attempts: int = 0  # RCPT commands that named a recipient, taken or not
    overshoot: int = 0  # RCPTs refused past max_recipients


@implementer(IHalfCloseableProtocol)
class SMTPServerProtocol(Protocol):
    log = Logger()

    def __init__(self, gateway: Gateway, kind: str, listener: str) -> None:
        self.gateway = gateway
        self.kind = kind
        self.listener = listener
        self.client_host = "unknown"
        self.admitted = False
        self.helo: str | None = None
        self.esmtp = False
        self.tls_active = kind == "submissions"
        self.authenticated_user: str | None = None
        self.auth_failures = 0
        self._sasl: _SASLExchange | None = None
        self.transaction: Transaction | None = None
        self.errors = 0
        self.closing = False
        self._buffer = bytearray()
        self._discarding_long_line = False
        self._busy = False
        self._paused = False
        self._processing = False
        self._outgoing: list[bytes] = []  # replies held for one write per batch
        self._reader: DataReader | None = None
        self._incoming: Incoming | None = None
        self._timer: IDelayedCall | None = None
        self._last_input = 0.0  # when the client last sent anything (the idle timer's base)
        self.draining = False
        self._input_ended = False  # the client half-closed: answer what it sent, then close

    # --- connection ------------------------------------------------------------

    @property
    def config(self) -> Config:
        return self.gateway.config

    def connectionMade(self) -> None:
        nodelay = getattr(getattr(self, "factory", None), "nodelay", None)
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None and (nodelay is None or nodelay.sessions_must_set_it):
            # Replies are small and awaited: no Nagle wait (relaygw.nodelay: most
            # listeners set it once for all their sessions).
            with contextlib.suppress(OSError):
                set_no_delay(True)
        peer = self.transport.getPeer()
        self.client_host = getattr(peer, "host", "unknown")
        limits = self.config.limits
        self.admitted = self.gateway.connections.admit(
            self.client_host, limits.max_connections, limits.max_connections_per_client)
        if not self.admitted:
            self.gateway.maillog.reject(self.client_host, "CONNECT",
                                        replies.too_many_connections(self.config.hostname),
                                        "too_many_connections")
            self._refuse_connection(replies.too_many_connections(self.config.hostname))
            return
        self.gateway.connections.sessions.add(self)
        self.gateway.maillog.connect(self.client_host, self.listener)
        self._start_idle_timer()
        self.reply(replies.banner(self.config.hostname))

    def connectionLost(self, reason: Failure | None = None) -> None:
        # Commands pipelined behind a pending commit are not run for nobody.
        self.closing = True
        self._buffer.clear()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._abort_data()
        if self.admitted:
            self.admitted = False
            self.gateway.connections.release(self.client_host)
            self.gateway.connections.sessions.discard(self)
            self.gateway.maillog.disconnect(self.client_host)

    def readConnectionLost(self) -> None:
        """The client has sent all it will (``shutdown(SHUT_WR)``, ``nc -N``) but
        still reads: what it sent is answered, as Postfix answers it (the 250
        of a message queued included: without it the client would send it
        again), and then the session closes. Data the end cut off is not
        queued. (Only on plain TCP: Twisted's TLS layer reports the end as a
        lost connection.)"""
        self._input_ended = True
        self._close_if_input_done()

    def writeConnectionLost(self) -> None:
        """Never asked for: relaygw does not half-close its side."""

    def _close_if_input_done(self) -> None:
        if (self._input_ended and not self.closing and not self._busy
                and not self._processing):
            self._abort_data()
            self._flush_replies()
            self.closing = True
            lose_connection(self.transport)

    def reply(self, text: str) -> None:
        data = text.encode("utf-8", "replace") + b"\r\n"
        if self._processing:
            # The replies to one batch of pipelined commands leave in one write
            # when the batch is done (_process): sent one by one, each after the
            # first would wait for the client's delayed ACK (Nagle, about 40 ms).
            self._outgoing.append(data)
        else:
            write_now(self.transport, data)

    def _flush_replies(self) -> None:
        if self._outgoing:
            data = b"".join(self._outgoing)
            self._outgoing.clear()
            write_now(self.transport, data)

    def drain(self) -> None:
        """Shutting down: close now if idle, else once the transaction in flight ends."""
        self.draining = True
        self._finish_draining()

    def _finish_draining(self) -> None:
        if (self.draining and not self.closing and self.transaction is None
                and self._reader is None and not self._busy):
            self._close_with(replies.shutting_down(self.config.hostname))

    def _close_with(self, text: str) -> None:
        self.reply(text)
        self._flush_replies()
        self.closing = True
        lose_connection(self.transport)

    def _refuse_connection(self, text: str) -> None:
        """The 421 of a connection over the limits. On an implicit-TLS listener it
        waits in TLS for the client's handshake (a real client makes it at once,
        and reads why it is refused); one that never does is cut off after
        REFUSAL_HANDSHAKE_GRACE (connectionLost cancels the timer)."""
        self.reply(text)
        self._flush_replies()
        self.closing = True
        if tls_handshake_pending(self.transport):
            lose_connection(self.transport, abort_unfinished_tls=False)
            self._timer = self.gateway.clock.callLater(REFUSAL_HANDSHAKE_GRACE,
                                                       self.transport.abortConnection)
        else:
            lose_connection(self.transport)

    def _start_idle_timer(self) -> None:
        """Time the session out ``command_timeout`` after the client last sent anything.

        Input only notes its time (``dataReceived``); the one timer, when it
        fires, sets itself again for what is left. Resetting a timer at every
        command cost a clock read and a timer move per line, six or more per
        message. The timeout in force when the timer fires counts (a SIGHUP
        that changes it applies to sessions already open from then on)."""
        clock = self.gateway.clock
        self._last_input = clock.seconds()
        self._timer = clock.callLater(self.config.limits.command_timeout, self._idle_check)

    def _idle_check(self) -> None:
        clock = self.gateway.clock
        left = self._last_input + self.config.limits.command_timeout - clock.seconds()
        if left > IDLE_SLACK:
            self._timer = clock.callLater(left, self._idle_check)
            return
        self._timer = None
        self.gateway.maillog.reject(self.client_host, "TIMEOUT",
                                    replies.timeout(self.config.hostname), "timeout")
        self._close_with(replies.timeout(self.config.hostname))

    @property
    def trusted(self) -> bool:
        return self.authenticated_user is not None or self.gateway.router.is_trusted(
            self.client_host)

    # --- input -------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self.closing:
            return
        self._last_input = self.gateway.clock.seconds()
        self._buffer += data
        self._process()

    def _process(self) -> None:
        if self._processing:
            return  # a wait that ended at once (a synchronous commit): the loop goes on
        self._processing = True
        try:
            self._process_buffer()
        finally:
            self._processing = False
            self._flush_replies()
        if self._input_ended:  # rare: no method call per read otherwise
            self._close_if_input_done()

    def _process_buffer(self) -> None:
        while not self._busy and not self.closing and self._buffer:
            if self._reader is not None:
                leftover = self._reader.feed(bytes(self._buffer))
                self._buffer.clear()
                if leftover is None:
                    return
                self._buffer += leftover
                self._end_of_data()
                continue
            line_end = self._buffer.find(b"\n")
            if line_end < 0:
                if len(self._buffer) > MAX_COMMAND_LINE + 2:
                    self._buffer.clear()
                    if not self._discarding_long_line:
                        self._discarding_long_line = True
                        self._error(replies.COMMAND_TOO_LONG)
                return
            line = bytes(self._buffer[:line_end])  # without its LF
            del self._buffer[: line_end + 1]
            if self._discarding_long_line:
                self._discarding_long_line = False
                continue
            if len(line) > MAX_COMMAND_LINE + 1:
                self._error(replies.COMMAND_TOO_LONG)
            elif not line or line.find(b"\r") != len(line) - 1:
                # not one CR, right before the LF: a bare LF, or a bare CR inside
                self._error(replies.BARE_NEWLINE_COMMAND)
            else:
                self._command(line[:-1])
        self._finish_draining()
        if self._busy and len(self._buffer) > PAUSE_BUFFER and not self._paused:
            self._paused = True
            self.transport.pauseProducing()

    def _wait_for(self, d: Deferred[object]) -> None:
        """Stop reading commands until ``d`` fires; then carry on with the buffer."""
        self._busy = True

        def done(result: object) -> None:
            if isinstance(result, Failure):
                self.log.failure("session {client}: internal error", result,
                                 client=self.client_host)
            self._busy = False
            if self._paused:
                self._paused = False
                self.transport.resumeProducing()
            if not self.closing and not self._processing:
                self._process()
                self._finish_draining()

        d.addBoth(done)

    def _error(self, text: str) -> None:
        self._sasl = None  # a line refused in mid-exchange ends the exchange
        self.errors += 1
        if self.errors >= MAX_ERRORS:
            self.reply(text)
            self._close_with(replies.too_many_errors(self.config.hostname))
        else:
            self.reply(text)

    # --- commands ----------------------------------------------------------------

    def _command(self, raw: bytes) -> None:
        if self._sasl is not None:
            self._sasl_response(raw)
            return
        try:
            line = raw.decode("ascii")
        except UnicodeDecodeError:
            # Only MAIL/RCPT could carry UTF-8 (SMTPUTF8, not offered).
            line = raw.decode("utf-8", "replace")
        verb, _, argument = line.partition(" ")
        # ASCII letters only: "QU\u0131T".upper() == "QUIT"
        handler = getattr(self, f"smtp_{verb.upper()}", None) \
            if verb.isascii() and verb.isalpha() else None
        if handler is None:
            self._error(replies.UNKNOWN_COMMAND)
            return
        handler(argument.strip(" "))

    def smtp_HELO(self, argument: str) -> None:
        self._greet(argument, esmtp=False)

    def smtp_EHLO(self, argument: str) -> None:
        self._greet(argument, esmtp=True)

    def _greet(self, argument: str, *, esmtp: bool) -> None:
        if not argument or " " in argument:
            self._error(replies.SYNTAX_HELO)
            return
        self.helo = argument[:255]
        self.esmtp = esmtp
        self.transaction = None
        hostname = self.config.hostname
        if not esmtp:
            self.reply(f"250 {hostname}")
            return
        self.reply(_ehlo_reply(hostname, self.config.limits.max_message_size,
                               tuple(self._extensions())))

    def _extensions(self) -> list[str]:
        """STARTTLS until TLS is on; AUTH only where a password may be sent."""
        extensions = []
        if self._tls_possible():
            extensions.append("STARTTLS")
        if self._auth_offered():
            extensions.append("AUTH PLAIN LOGIN")
        return extensions

    def _tls_possible(self) -> bool:
        server_tls = self.gateway.server_tls
        return (not self.tls_active and server_tls is not None
                and server_tls.options is not None
                and getattr(self.transport, "startTLS", None) is not None)

    def _auth_offered(self) -> bool:
        auth = self.config.auth
        return (self.gateway.authenticator is not None and auth is not None
                and (self.tls_active or not auth.require_tls))

    def smtp_MAIL(self, argument: str) -> None:
        # No HELO/EHLO first is accepted, as Postfix does by default
        # (smtpd_helo_required = no): clients such as smtplib's mail() skip it.
        if self.kind != "smtp" and self.authenticated_user is None:
            self._error(replies.AUTH_REQUIRED)
            return
        if self.transaction is not None:
            self._error(replies.NESTED_MAIL)
            return
        if argument[:5].upper() != "FROM:":
            self._error(replies.SYNTAX_MAIL)
            return
        try:
            path, param_text = split_path(argument[5:])
            sender = parse_path(path, allow_null=True)
            params = parse_params(param_text)
        except AddressError:
            self._error(replies.BAD_SENDER)
            return
        declared = None
        body = None
        for key, value in params.items():
            if key == "SIZE":
                if value is None or not value.isdigit():
                    self._error(replies.BAD_PARAMETER)
                    return
                declared = int(value)
            elif key == "BODY":
                if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                    self._error(replies.BAD_PARAMETER)
                    return
                body = value.upper()
            else:
                self._error(replies.UNKNOWN_PARAMETER)
                return
        if declared is not None and declared > self.config.limits.max_message_size:
            self._reject("MAIL", replies.SIZE_EXCEEDED, "size", sender=str(sender or ""))
            return
        self.transaction = Transaction(sender=str(sender) if sender else "",
                                       declared_size=declared, body=body)
        self.reply(replies.SENDER_OK)

    def smtp_RCPT(self, argument: str) -> None:
        transaction = self.transaction
        if transaction is None:
            self._error(replies.NEED_MAIL)
            return
        transaction.rcpt_attempts += 1
        if argument[:3].upper() != "TO:":
            self._error(replies.SYNTAX_RCPT)
            return
        try:
            path, param_text = split_path(argument[3:])
            # None: <Postmaster> with no domain (RFC 5321 4.5.1), routed apart below
            given = None if path[1:-1].lower() == "postmaster" else parse_path(
                path, allow_null=False)
            if parse_params(param_text):
                self._error(replies.UNKNOWN_PARAMETER.replace("MAIL", "RCPT"))
                return
        except AddressError:
            self._reject("RCPT", replies.BAD_RECIPIENT, "syntax", recipient=argument[3:])
            return
        if len(transaction.given) >= self.config.limits.max_recipients:
            # Not counted as an error up to OVERSHOOT_LIMIT (as Postfix's recipient
            # overshoot): a client sending many recipients at once keeps its
            # transaction; one that never stops is still cut off.
            transaction.overshoot += 1
            self._reject("RCPT", replies.TOO_MANY_RECIPIENTS, "too_many_recipients",
                         recipient=str(given or "postmaster"),
                         counted=transaction.overshoot > OVERSHOOT_LIMIT)
            return
        router = self.gateway.router
        outcome: Refusal | list[Recipient]
        if given is None:  # accepted from anyone, wherever one is configured
            mailbox, outcome = router.route_postmaster(self.config.hostname)
        else:
            mailbox, outcome = given, router.route_recipient(given, self.trusted)
        if isinstance(outcome, Refusal):
            self._reject("RCPT", outcome.reply, outcome.reason, recipient=str(mailbox))
            return
        transaction.given.append(str(mailbox))
        known = {r.address.lower() for r in transaction.recipients}
        for recipient in outcome:  # the same final address twice is delivered once
            if recipient.address.lower() not in known:
                known.add(recipient.address.lower())
                transaction.recipients.append(recipient)
        self.reply(replies.RECIPIENT_OK)

    def _reject(self, command: str, reply: str, reason: str, *, sender: str | None = None,
                recipient: str | None = None, counted: bool = True) -> None:
        """Log and metric the refusal; ``counted``: toward MAX_ERRORS as well."""
        sender = sender if sender is not None else (
            self.transaction.sender if self.transaction else None)
        self.gateway.maillog.reject(self.client_host, command, reply, reason, sender=sender,
                                    recipient=recipient)
        if counted:
            self._error(reply)
        else:
            self.reply(reply)

    def smtp_DATA(self, argument: str) -> None:
        if argument:
            self._error(replies.SYNTAX_NO_ARGS)
            return
        if self.transaction is None:
            self._error(replies.NEED_MAIL)
            return
        if not self.transaction.recipients:
            # RFC 5321 3.3 allows 503 or 554: 503 when no RCPT came (a sequence
            # error), 554 when every one was refused (as Postfix says then).
            self._error(replies.NO_VALID_RECIPIENTS if self.transaction.rcpt_attempts
                        else replies.NEED_RCPT)
            return
        try:
            self._incoming = self.gateway.spool.open_incoming()
            header = self._received_header(self._incoming.id)
            # What the WireReady promise needs of the lines put before the DATA,
            # checked, not assumed (a client name is the client's to choose).
            self._incoming.wire_ready = wire_clean(header)
            self._incoming.write(header)
        except OSError as e:
            self._abort_data()
            self._reject("DATA", self._storage_reply(e), "storage")
            self.transaction = None
            return
        self._reader = DataReader(self._incoming.write, self.config.limits.max_message_size)
        self.reply(replies.START_DATA)

    def _received_header(self, queue_id: str) -> bytes:
        protocol = "ESMTP" if self.esmtp else "SMTP"
        if self.esmtp and self.tls_active:
            protocol += "S"
        if self.esmtp and self.authenticated_user is not None:
            protocol += "A"
        assert self.transaction is not None
        given = self.transaction.given
        recipient = f"\r\n\tfor <{given[0]}>" if len(given) == 1 else ""
        date = rfc5322_date(self.gateway.clock.seconds())
        helo = self.helo or self.client_host
        return (f"Received: from {helo} ([{self.client_host}])\r\n"
                f"\tby {self.config.hostname} (relaygw) with {protocol} id {queue_id}"
                f"{recipient}; {date}\r\n").encode("utf-8", "replace")

    def _end_of_data(self) -> None:
        reader, incoming, transaction = self._reader, self._incoming, self.transaction
        assert reader is not None and incoming is not None and transaction is not None
        self._reader = None
        self._incoming = None
        self.transaction = None
        refusal = self._refusal(reader)
        if refusal is not None:
            self.gateway.spool.discard(incoming)
            self._reject("DATA", refusal[0], refusal[1], sender=transaction.sender,
                         recipient=",".join(transaction.given))
            return
        incoming.wire_ready = incoming.wire_ready and not reader.dotted
        envelope = Envelope(id=incoming.id, sender=transaction.sender,
                            recipients=transaction.recipients,
                            received=self.gateway.clock.seconds(),
                            client_address=self.client_host, helo=self.helo or "",
                            extra={"body": transaction.body} if transaction.body else {})
        d = self.gateway.spool.commit(incoming, envelope)

        def committed(_: object) -> None:
            self.gateway.maillog.received(envelope, self.client_host)
            self.gateway.accepted(envelope)
            if not self.closing:
                self.reply(replies.queued(envelope.id))

        def failed(failure: Failure) -> None:
            error = failure.value
            reply = self._storage_reply(error) if isinstance(error, OSError) else \
                replies.LOCAL_ERROR
            self.log.error("spool commit failed for {id}: {error}", id=incoming.id,
                           error=error)
            self._reject("DATA", reply, "storage", sender=transaction.sender)

        d.addCallbacks(committed, failed)
        self._wait_for(d)

    def _refusal(self, reader: DataReader) -> tuple[str, str] | None:
        if reader.error is DataError.BARE_NEWLINE:
            return replies.BARE_NEWLINE_DATA, "bare_newline"
        if reader.error is DataError.LINE_TOO_LONG:
            return replies.DATA_LINE_TOO_LONG, "line_too_long"
        if reader.error is DataError.TOO_BIG:
            return replies.SIZE_EXCEEDED, "size"
        if reader.error is DataError.WRITE_FAILED:
            assert reader.write_error is not None
            return self._storage_reply(reader.write_error), "storage"
        if reader.received_headers > self.config.limits.max_hops:
            return replies.TOO_MANY_HOPS, "hops"
        return None

    @staticmethod
    def _storage_reply(error: OSError) -> str:
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            return replies.NO_STORAGE
        return replies.LOCAL_ERROR

    def _abort_data(self) -> None:
        if self._incoming is not None:
            self.gateway.spool.discard(self._incoming)
            self._incoming = None
        self._reader = None

    def smtp_RSET(self, argument: str) -> None:
        if argument:  # RFC 5321 4.1.1.5: no parameters (Postfix: 501 5.5.4)
            self._error(replies.SYNTAX_NO_ARGS)
            return
        self.transaction = None
        self.reply(replies.OK)

    def smtp_NOOP(self, argument: str) -> None:
        self.reply(replies.OK)

    def smtp_QUIT(self, argument: str) -> None:
        self._close_with(replies.BYE)

    def smtp_HELP(self, argument: str) -> None:
        self.reply(replies.HELP)

    def smtp_VRFY(self, argument: str) -> None:
        if not argument:
            self._error("501 5.5.4 Syntax: VRFY address")
            return
        self.reply(replies.VRFY)

    def smtp_EXPN(self, argument: str) -> None:
        self._error(replies.NOT_IMPLEMENTED)

    def smtp_TURN(self, argument: str) -> None:
        self._error(replies.TURN_REFUSED)

    def smtp_ETRN(self, argument: str) -> None:
        """RFC 1985. No HELO needed first (as Postfix without smtpd_helo_required),
        but not inside a transaction."""
        if self.transaction is not None:
            self._error(replies.IN_TRANSACTION)
            return
        if not self.trusted:
            self._reject("ETRN", replies.ETRN_DENIED, "etrn_denied")
            return
        domain = argument.lstrip("@#").strip().lower()
        if not domain or " " in domain:
            self._error(replies.SYNTAX_ETRN)
            return
        self.gateway.etrn(domain)
        self.reply(replies.ETRN_STARTED)

    # --- STARTTLS ------------------------------------------------------------------

    def smtp_STARTTLS(self, argument: str) -> None:
        if argument:
            self._error(replies.SYNTAX_STARTTLS)
            return
        if self.tls_active:
            self._error(replies.TLS_ALREADY_ACTIVE)
            return
        server_tls = self.gateway.server_tls
        if server_tls is None:  # no [tls]: not offered, as Postfix without smtpd_use_tls
            self._error(replies.NOT_IMPLEMENTED)
            return
        if not self._tls_possible():  # a transport that cannot start TLS
            self._error(replies.TLS_UNAVAILABLE)
            return
        self.reply(replies.READY_FOR_TLS)
        self._flush_replies()  # in clear, before the handshake starts
        # Whatever the client sent after STARTTLS came in clear text, before the
        # handshake, possibly from a man in the middle: it is never executed.
        self._buffer.clear()
        self._discarding_long_line = False
        self._reset_session()
        self.tls_active = True
        self.transport.startTLS(server_tls)

    def _reset_session(self) -> None:
        """RFC 3207 4.2: forget everything learnt from the client before TLS."""
        self.helo = None
        self.esmtp = False
        self.transaction = None
        self.authenticated_user = None
        self._sasl = None

    # --- AUTH ----------------------------------------------------------------------

    def smtp_AUTH(self, argument: str) -> None:
        authenticator = self.gateway.authenticator
        if authenticator is None:
            self._error(replies.NOT_IMPLEMENTED)
            return
        if self.helo is None:
            self._error(replies.NEED_HELO)
            return
        if self.authenticated_user is not None:
            self._error(replies.AUTH_ALREADY)
            return
        if self.transaction is not None:
            self._error(replies.AUTH_IN_TRANSACTION)
            return
        if not self._auth_offered():
            self._error(replies.AUTH_NEEDS_TLS)
            return
        mechanism, _, initial = argument.partition(" ")
        mechanism, initial = mechanism.upper(), initial.strip(" ")
        if not mechanism or " " in initial:
            self._error(replies.AUTH_SYNTAX)
            return
        if mechanism not in ("PLAIN", "LOGIN"):
            self._error(replies.AUTH_UNKNOWN_MECHANISM)
            return
        self._sasl = _SASLExchange(mechanism)
        if initial:
            self._sasl_response(initial.encode("ascii", "replace"))
        elif mechanism == "PLAIN":
            self.reply(replies.AUTH_CHALLENGE)
        else:
            self.reply(replies.AUTH_USERNAME)

    def _sasl_response(self, raw: bytes) -> None:
        """One client line of the exchange: ``*`` cancels, else base64."""
        exchange = self._sasl
        assert exchange is not None
        line = raw.decode("ascii", "replace").strip(" ")
        if line == "*":
            self._error(replies.AUTH_CANCELLED)
            return
        try:
            decoded = decode_base64(line)
        except ValueError:
            self._error(replies.AUTH_BAD_BASE64)
            return
        if exchange.mechanism == "LOGIN" and exchange.user is None:
            try:
                exchange.user = decoded.decode("utf-8")
            except UnicodeDecodeError:
                exchange.user = ""
            self.reply(replies.AUTH_PASSWORD)
            return
        self._sasl = None
        if exchange.mechanism == "PLAIN":
            credentials = parse_plain(decoded)
        else:
            try:
                credentials = (exchange.user or "", decoded.decode("utf-8"))
            except UnicodeDecodeError:
                credentials = None
        if credentials is None or not credentials[0]:
            self._auth_failed()
            return
        user, password = credentials
        authenticator = self.gateway.authenticator
        assert authenticator is not None
        d = authenticator.check(user, password)

        def checked(ok: bool) -> None:
            if self.closing:
                return
            if ok:
                self.authenticated_user = user
                self.log.info("auth: {client} authenticated as {user} ({mechanism})",
                              client=self.client_host, user=user,
                              mechanism=exchange.mechanism)
                self.reply(replies.AUTH_OK)
            else:
                self._auth_failed()

        def broken(failure: Failure) -> None:
            # The exception only, never the traceback's arguments (the password).
            self.log.error("auth: password check failed for {client}: {error}",
                           client=self.client_host, error=failure.getErrorMessage())
            if not self.closing:
                self.reply(replies.AUTH_TEMPORARY)

        d.addCallbacks(checked, broken)
        self._wait_for(d)

    def _auth_failed(self) -> None:
        self.auth_failures += 1
        self._reject("AUTH", replies.AUTH_FAILED, "auth_failed", sender="")
        if self.auth_failures >= self.config.limits.max_auth_failures and not self.closing:
            self._close_with(replies.too_many_auth_failures(self.config.hostname))


@dataclass
class _SASLExchange:
    """An AUTH in progress: the mechanism, and for LOGIN the user once given."""

    mechanism: str
    user: str | None = None


class SMTPFactory(Factory):
    """One per listener; every session shares the gateway."""

    noisy = False

    def __init__(self, gateway: Gateway, kind: str, listener: str) -> None:
        self.gateway = gateway
        self.kind = kind
        self.listener = listener
        self.nodelay = NoDelaySessions()

    def buildProtocol(self, addr: object) -> SMTPServerProtocol:
        protocol = SMTPServerProtocol(self.gateway, self.kind, self.listener)
        protocol.factory = self
        return protocol
