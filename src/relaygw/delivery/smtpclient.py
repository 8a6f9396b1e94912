"""The wire side of the outbound SMTP client: replies, timeouts, dot-stuffed streaming.

This module knows SMTP syntax, not policy: ``SMTPClientProtocol`` sends
command lines and hands back each ``Reply`` in order through a Deferred that
carries its own RFC 5321 section 4.5.3.2 timeout; the dialogue (EHLO, STARTTLS,
pipelining, what a reply means for a recipient) lives in ``delivery.smtp``.
Waiting for the next reply is all the sequential code needs, so it can be an
``async def`` instead of a state machine.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import BinaryIO

from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IDelayedCall, IPullProducer, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from relaygw.fastwrite import send_directly, write_now
from relaygw.messagecache import WireReady

CHUNK_SIZE = 64 * 1024


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds to wait; defaults are RFC 5321 section 4.5.3.2's minimums."""

    connect: float = 30.0
    greeting: float = 300.0
    command: float = 300.0      # EHLO, HELO, STARTTLS, AUTH
    rset: float = 20.0          # probing a cached idle session (Postfix's smtp_rset_timeout)
    mail: float = 300.0
    rcpt: float = 300.0
    data_init: float = 120.0
    data_block: float = 180.0   # each chunk of the message must leave within this
    data_end: float = 600.0     # the reply to the final dot
    quit: float = 30.0


class SMTPTimeout(Exception):
    """No reply (or no progress sending data) within the allowed time."""


class SMTPConnectionLost(ConnectionLost):
    """The connection went away while we waited; ``reason`` is why, as the transport said."""

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(None, message)
        self.message = message
        self.reason = reason or message

    def __str__(self) -> str:
        return self.message or "connection lost"


class SMTPProtocolError(Exception):
    """The server said something that is not an SMTP reply."""


@dataclass(frozen=True, slots=True)
class Reply:
    code: int
    lines: tuple[str, ...]

    @property
    def positive(self) -> bool:
        """2xx: done. (354 is checked for by name where it is expected.)"""
        return 200 <= self.code < 300

    @property
    def transient(self) -> bool:
        return 400 <= self.code < 500

    @property
    def permanent(self) -> bool:
        return self.code >= 500

    def __str__(self) -> str:
        """The reply as the server sent it, lines joined by spaces (as Postfix logs it)."""
        last = len(self.lines) - 1
        return " ".join(f"{self.code}{' ' if i == last else '-'}{line}".rstrip()
                        for i, line in enumerate(self.lines))


class DotStuffer:
    """Turns message bytes into DATA bytes: CRLF line ends, leading dots doubled.

    Bare CR or LF become CRLF, so nothing we send can be read as an early
    ``<LF>.<LF>`` end of data by a lenient server (SMTP smuggling). Works on
    chunks of any size: a CR at the end of one chunk waits for the next.
    """

    _LINE_END = re.compile(rb"\r\n|\r|\n")
    _LINE_DOT = re.compile(rb"\r\n\.")  # a regex finds it faster (relaygw.datareader)

    def __init__(self) -> None:
        self._at_line_start = True
        self._held_cr = False
        self._empty = True

    def encode(self, chunk: bytes) -> bytes:
        if self._held_cr:
            chunk = b"\r" + chunk
            self._held_cr = False
        if chunk.endswith(b"\r"):
            chunk = chunk[:-1]
            self._held_cr = True
        if not chunk:
            return b""
        self._empty = False
        # The spool holds CRLF-only messages: a CR or LF left once the CRLFs are cut
        # out (memchr, in C) is what calls for the regex; and only a chunk with a
        # dot in it can need stuffing. Cheaper than counting CR, LF and CRLF.
        inside = b"".join(chunk.split(b"\r\n"))
        if b"\r" in inside or b"\n" in inside:  # not CRLF-clean
            chunk = self._LINE_END.sub(b"\r\n", chunk)
        out = chunk
        if b"." in chunk:
            if self._LINE_DOT.search(chunk) is not None:
                out = chunk.replace(b"\r\n.", b"\r\n..")
            if self._at_line_start and out.startswith(b"."):
                out = b"." + out
        self._at_line_start = out.endswith(b"\r\n")
        return out

    def finish(self) -> bytes:
        """What ends the DATA: a CRLF if the message lacked a final one, then ``.CRLF``."""
        tail = b""
        if self._held_cr:
            self._held_cr = False
            tail = b"\r\n"
        elif not self._at_line_start and not self._empty:
            tail = b"\r\n"
        return tail + b".\r\n"


class AsItIs:
    """DotStuffer's interface for a message known CRLF-only with no line
    starting with a dot (``relaygw.messagecache.WireReady``): the bytes go out
    as they are, and ``finish`` adds what ends the DATA."""

    def __init__(self) -> None:
        self._tail = b""  # the last two bytes sent

    def encode(self, chunk: bytes) -> bytes:
        if chunk:
            self._tail = (self._tail + chunk[-2:])[-2:]
        return chunk

    def finish(self) -> bytes:
        if self._tail and self._tail != b"\r\n":
            return b"\r\n.\r\n"
        return b".\r\n"


@implementer(IPullProducer)
class MessageProducer:
    """Streams a message file, dot-stuffed, with backpressure from the transport.

    ``done`` fires once the final ``.CRLF`` is written. ``on_progress`` is
    called each time a chunk goes out, so the caller can restart its
    data-block timer.
    """

    def __init__(self, source: BinaryIO, transport: object,
                 on_progress: Callable[[], None] | None = None,
                 chunk_size: int = CHUNK_SIZE) -> None:
        self._source = source
        self._transport = transport
        self._on_progress = on_progress
        self._chunk_size = chunk_size
        self._stuffer: DotStuffer | AsItIs = (
            AsItIs() if isinstance(source, WireReady) else DotStuffer())
        self.done: Deferred[None] = Deferred()
        self._finished = False
        self._read_ahead: deque[bytes] = deque()  # chunks start() read, not yet encoded
        self._unsent = b""  # the one write's part that send() did not take
        self._dot_queued = False  # the final dot is written (or in _unsent)

    def start(self) -> None:
        """A message shorter than a chunk (most mail) is sent with its final dot by
        one ``send()`` when the socket takes it all: no producer, no two turns of
        the reactor and two ``epoll_ctl`` calls. Otherwise the producer writes the
        rest, and ``done`` fires only once the transport has drained it, as for a
        long message, so the data-block timeout still watches a stalled peer."""
        first = self._source.read(self._chunk_size)
        if len(first) < self._chunk_size:
            more = self._source.read(self._chunk_size)  # b"" at the end: a short read is
            if not more:                                # no proof of it on every file system
                data = self._stuffer.encode(first) + self._stuffer.finish()
                sent = send_directly(self._transport, data)
                if sent == len(data):
                    self._finished = True
                    self.done.callback(None)
                    return
                self._progressed()
                self._unsent = data[sent:]
                self._dot_queued = True
            else:
                self._read_ahead.extend((first, more))
        else:
            self._read_ahead.append(first)
        self._transport.registerProducer(self, False)  # type: ignore[attr-defined]

    def resumeProducing(self) -> None:
        if self._finished:
            return
        if self._unsent:
            data, self._unsent = self._unsent, b""
            self._transport.write(data)  # type: ignore[attr-defined]
            self._progressed()
            return
        if self._dot_queued:  # and drained: Twisted asks for more only then
            self._finished = True
            self._transport.unregisterProducer()  # type: ignore[attr-defined]
            self.done.callback(None)
            return
        if self._read_ahead:
            chunk = self._read_ahead.popleft()
        else:
            chunk = self._source.read(self._chunk_size)
        if chunk:
            data = self._stuffer.encode(chunk)
        else:
            data = self._stuffer.finish()
            self._finished = True
        if data:
            self._transport.write(data)  # type: ignore[attr-defined]
        self._progressed()
        if self._finished:
            self._transport.unregisterProducer()  # type: ignore[attr-defined]
            self.done.callback(None)

    def _progressed(self) -> None:
        if self._on_progress is not None:
            self._on_progress()

    def stopProducing(self) -> None:
        self.fail(SMTPConnectionLost("connection lost while sending the message"))

    def fail(self, reason: Exception) -> None:
        if not self._finished:
            self._finished = True
            self.done.errback(reason)


Outcome = Reply | Exception  # a reply, or what stood in for it (a timeout, a lost connection)


class _Batch:
    """The replies to a group of pipelined commands, handed back in one list."""

    __slots__ = ("deferred", "left", "on_first", "outcomes")

    def __init__(self, deferred: Deferred[list[Outcome]], count: int,
                 on_first: Callable[[Outcome], None] | None = None) -> None:
        self.deferred = deferred
        self.outcomes: list[Outcome | None] = [None] * count
        self.left = count
        self.on_first = on_first  # told the first outcome as soon as it is in

    def fill(self, index: int, outcome: Outcome) -> None:
        if index == 0 and self.on_first is not None:
            self.on_first(outcome)
        self.outcomes[index] = outcome
        self.left -= 1


@dataclass(slots=True)
class _Waiter:
    """A caller waiting for the next reply, until ``deadline`` (``timeout`` after asking):
    through ``deferred`` (``expect``), or as slot ``index`` of ``batch``
    (``expect_replies``)."""

    deferred: Deferred[Reply] | None
    deadline: float
    timeout: float
    what: str
    batch: _Batch | None = None
    index: int = 0


class SMTPClientProtocol(Protocol):
    """Sends commands and returns the server's replies in order, each with a timeout.

    Lines are taken off the buffer one at a time, so when a reply wakes its
    caller, whatever the server sent after it is still visible
    (``pending_input``): plain text after a STARTTLS 220 is an injection attempt.

    Each waiter has its own deadline, but one timer serves them all: it is set
    when a waiter is added with a deadline before the timer's (or there is no
    timer), and when it fires it fails whichever waiters are past theirs, and
    is set again for the earliest left, if any. It is not cancelled when the
    last reply comes: the next transaction's deadlines are later, so it serves
    them too, and firing early costs one check. A pipelined transaction waits
    for four replies or more; a timer for each, or one set and cancelled per
    reply, cost more than the rest of the waiting. The timer goes with the
    connection.
    """

    MAX_LENGTH = 8192

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._buffer = b""
        self._partial: list[str] = []
        self._partial_code = 0
        self._replies: deque[Reply] = deque()
        self._waiters: deque[_Waiter] = deque()
        self._reply_timer: IDelayedCall | None = None
        self._lost: Failure | None = None
        self._producer: MessageProducer | None = None
        self._block_timer: IDelayedCall | None = None
        self._block_timeout = Timeouts.data_block
        self.tls_started = False
        self.closed: Deferred[None] = Deferred()  # fires when the connection is gone

    # --- connection -------------------------------------------------------------------

    def connectionMade(self) -> None:
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            set_no_delay(True)

    def connectionLost(self, reason: Failure | None = None) -> None:
        reason = reason or Failure(ConnectionDone())
        self._lost = reason
        self._cancel_block_timer()
        self._cancel_reply_timer()
        waiters, self._waiters = self._waiters, deque()
        why = reason.getErrorMessage()
        for waiter in waiters:
            self._settle(waiter, SMTPConnectionLost(
                f"connection lost waiting for the reply to {waiter.what}: {why}", why))
        if self._producer is not None:
            self._producer.stopProducing()
            self._producer = None
        self.closed.callback(None)

    @property
    def lost(self) -> bool:
        return self._lost is not None

    @property
    def pending_input(self) -> bool:
        """Whether the server sent anything not yet asked for (a reply or part of one)."""
        return bool(self._replies or self._partial or self._buffer)

    def abort(self) -> None:
        if self.transport is not None and self._lost is None:
            self.transport.abortConnection()

    # --- commands and replies ------------------------------------------------------

    def send(self, *lines: bytes) -> None:
        """Write command lines in one write (several at once is RFC 2920 pipelining)."""
        write_now(self.transport, b"".join(line + b"\r\n" for line in lines))

    def expect(self, timeout: float, what: str = "command") -> Deferred[Reply]:
        """The next reply not yet handed out; times out (and aborts) after ``timeout``."""
        if self._replies:
            return succeed(self._replies.popleft())
        if self._lost is not None:
            return fail(SMTPConnectionLost(f"connection lost before the reply to {what}"))
        waiter: Deferred[Reply] = Deferred(canceller=self._waiter_cancelled)
        now = self._clock.seconds()
        self._waiters.append(_Waiter(waiter, now + timeout, timeout, what))
        self._watch(now, now + timeout)
        return waiter

    def expect_replies(self, waits: Sequence[tuple[float, str]],
                       on_first: Callable[[Outcome], None] | None = None
                       ) -> Deferred[list[Outcome]]:
        """The next ``len(waits)`` replies, each with its (timeout, what), in one list
        once all are in: a reply, or the error that stood in for it (a timeout, a
        lost connection). One wake-up for a pipelined group instead of one per
        reply. ``on_first`` is told the first outcome as soon as it is in (a
        pipelined RSET's check, which may abort the session at once). Cancelled,
        it fires with CancelledError for those still awaited, and the session
        ends (as for ``expect``)."""
        d: Deferred[list[Outcome]] = Deferred(canceller=self._batch_cancelled)
        batch = _Batch(d, len(waits), on_first)
        now = self._clock.seconds()
        earliest: float | None = None
        for index, (timeout, what) in enumerate(waits):
            if self._replies:
                batch.fill(index, self._replies.popleft())
            elif self._lost is not None:
                batch.fill(index, SMTPConnectionLost(
                    f"connection lost before the reply to {what}"))
            else:
                deadline = now + timeout
                self._waiters.append(_Waiter(None, deadline, timeout, what, batch, index))
                earliest = deadline if earliest is None else min(earliest, deadline)
        if earliest is not None:
            self._watch(now, earliest)
        if not batch.left:
            d.callback(batch.outcomes)  # type: ignore[arg-type]  # every slot is filled
        return d

    def _watch(self, now: float, deadline: float) -> None:
        """See that the reply timer fires by ``deadline``."""
        timer = self._reply_timer
        if timer is None or deadline < timer.getTime():
            # Not timer.reset(): moving a timed call sooner scans the reactor's heap.
            self._cancel_reply_timer()
            self._reply_timer = self._clock.callLater(deadline - now, self._timed_out)

    @staticmethod
    def _settle(waiter: _Waiter, outcome: Outcome) -> None:
        """Hand a waiter its reply, or the error that stands in for it."""
        batch = waiter.batch
        if batch is None:
            assert waiter.deferred is not None
            if isinstance(outcome, Reply):
                waiter.deferred.callback(outcome)
            else:
                waiter.deferred.errback(Failure(outcome))
            return
        batch.fill(waiter.index, outcome)
        if not batch.left and not batch.deferred.called:
            batch.deferred.callback(batch.outcomes)  # type: ignore[arg-type]

    def _waiter_cancelled(self, waiter: Deferred[Reply]) -> None:
        """A caller gave up on its reply (shutdown cutting an attempt short): the
        replies still to come could no longer be matched to their waiters, so the
        session ends; the others hear that the connection was lost."""
        self._waiters = deque(w for w in self._waiters if w.deferred is not waiter)
        self.abort()

    def _batch_cancelled(self, d: Deferred[list[Outcome]]) -> None:
        """``_waiter_cancelled`` for a group: its replies still awaited become
        CancelledError, and the list fires (what cancelling a DeferredList of
        them gives), so the caller goes on to settle its recipients."""
        cut = [w for w in self._waiters if w.batch is not None and w.batch.deferred is d]
        self._waiters = deque(w for w in self._waiters
                              if w.batch is None or w.batch.deferred is not d)
        for waiter in cut:
            self._settle(waiter, CancelledError())
        self.abort()

    def command(self, line: bytes, timeout: float, what: str | None = None) -> Deferred[Reply]:
        self.send(line)
        return self.expect(timeout, what or line.split(b" ", 1)[0].decode("ascii", "replace"))

    def _timed_out(self) -> None:
        """Fail the waiters past their deadline and abort; else wait for the earliest."""
        self._reply_timer = None
        now = self._clock.seconds()
        expired = [w for w in self._waiters if w.deadline <= now]
        self._waiters = deque(w for w in self._waiters if w.deadline > now)
        if self._waiters:  # (after an abort, until its connectionLost ends them)
            earliest = min(w.deadline for w in self._waiters)
            self._reply_timer = self._clock.callLater(earliest - now, self._timed_out)
        if not expired:
            return
        for waiter in expired:
            self._settle(waiter, SMTPTimeout(
                f"timeout after {waiter.timeout:g}s waiting for the reply to {waiter.what}"))
        self.abort()

    def _cancel_reply_timer(self) -> None:
        timer, self._reply_timer = self._reply_timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        while self._lost is None and not getattr(self.transport, "disconnecting", False):
            line, newline, rest = self._buffer.partition(b"\n")
            if not newline:
                if len(self._buffer) > self.MAX_LENGTH:
                    self._protocol_error("reply line too long")
                return
            self._buffer = rest
            self.lineReceived(line)

    def lineReceived(self, line: bytes) -> None:
        text = line.rstrip(b"\r").decode("utf-8", "replace")
        code_text, separator, rest = text[:3], text[3:4], text[4:]
        if not (code_text.isdigit() and separator in ("", " ", "-")):
            self._protocol_error(f"malformed reply line {text[:100]!r}")
            return
        code = int(code_text)
        if self._partial and code != self._partial_code:
            self._protocol_error(f"reply code changed within a reply: {text[:100]!r}")
            return
        self._partial_code = code
        self._partial.append(rest)
        if separator != "-":
            reply = Reply(code, tuple(self._partial))
            self._partial = []
            self._deliver(reply)

    def _deliver(self, reply: Reply) -> None:
        if self._waiters:
            self._settle(self._waiters.popleft(), reply)
        else:
            self._replies.append(reply)

    def _protocol_error(self, problem: str) -> None:
        if self._waiters:
            self._settle(self._waiters.popleft(), SMTPProtocolError(problem))
        self.abort()

    # --- TLS and DATA --------------------------------------------------------------------

    def start_tls(self, options: object) -> None:
        self.tls_started = True
        self.transport.startTLS(options)

    def send_message(self, source: BinaryIO, block_timeout: float) -> Deferred[None]:
        """Stream ``source`` as DATA content and the final dot; the message must progress."""
        if self._lost is not None:
            return fail(SMTPConnectionLost("connection lost before the message was sent"))
        producer = MessageProducer(source, self.transport, self._progress_made)
        self._producer = producer
        self._block_timeout = block_timeout

        def finished(result: object) -> object:
            self._cancel_block_timer()
            self._producer = None
            return result

        producer.done.addBoth(finished)
        try:
            producer.start()
        except Exception as e:  # the spool read failed (EIO...): the caller hears it
            producer.fail(e)
        if self._producer is producer and self._block_timer is None:
            # Still sending (most mail is gone in one send() by now, and needs no
            # timer): the data-block timeout watches from here.
            self._progress_made()
        return producer.done

    def _progress_made(self) -> None:
        self._cancel_block_timer()
        self._block_timer = self._clock.callLater(self._block_timeout, self._block_timed_out)

    def _block_timed_out(self) -> None:
        self._block_timer = None
        producer, self._producer = self._producer, None
        if producer is not None:
            producer.fail(SMTPTimeout(
                f"timeout after {self._block_timeout:g}s sending the message"))
        self.abort()

    def _cancel_block_timer(self) -> None:
        if self._block_timer is not None and self._block_timer.active():
            self._block_timer.cancel()
        self._block_timer = None

    def quit(self, timeout: float) -> None:
        """Say goodbye and close, without anyone waiting for it."""
        if self._lost is not None:
            return
        self.command(b"QUIT", timeout).addBoth(self._close)

    def _close(self, _result: object) -> None:
        if self._lost is None and self.transport is not None:
            self.transport.loseConnection()


class SMTPClientFactory(Factory):
    """Builds one SMTPClientProtocol per connection, with the injected clock."""

    noisy = False  # no "Starting factory" log line per outbound connection

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock

    def buildProtocol(self, addr: object) -> SMTPClientProtocol:
        proto = SMTPClientProtocol(self.clock)
        proto.factory = self
        return proto
