"""The mail log: one structured twisted.logger event per mail event.

Each event carries its fields (``queue_id``, ``sender``, ``recipient``,
``relay``, ``delay``, ``reply``, ``event``) as keys, so twistd's ``--logger``
choice can print them as text (the readable ``text`` field, close to
Postfix's maillog) or as JSON (``relaygw.logs.jsonLogger``). The text is
formatted here with an f-string and the event's format is just ``{text}``:
twisted.logger's own formatting of a many-field format costs twice as much,
and this runs several times per message. For the same reason the event is
built here, with exactly the keys ``Logger.info`` would give it, and handed
straight to the logger's observer (see ``MailLog._emit``).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Mapping
from threading import get_ident
from time import time
from typing import Any, TextIO

from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    Logger,
    LogLevel,
    eventAsJSON,
    formatEventAsClassicLogText,
    formatTime,
)
from twisted.python import threadable
from zope.interface import implementer

from relaygw.envelope import Envelope
from relaygw.scheduler import Event
from relaygw.soon import call_soon


class MailLog:
    log = Logger(namespace="relaygw.mail")
    metrics: Any = None  # a relaygw.metrics.GatewayMetrics, told every event, when set

    def __init__(self) -> None:
        # Logger is a descriptor that makes a new Logger (source: this MailLog) at
        # every ``self.log``: make it once.
        self._logger: Logger = self.log

    def _emit(self, text: str, **fields: Any) -> None:
        """``self.log.info("{text}", text=text, **fields)``, built by hand.

        Logger.emit first checks the level against ``LogLevel.iterconstants()``,
        which sorts the levels at every call; the event here has the same keys and
        values (tests/test_logs.py compares them) and goes to the same observer."""
        logger = self._logger
        logger.observer({
            "text": text, **fields,
            "log_logger": logger, "log_level": LogLevel.info,
            "log_namespace": logger.namespace, "log_source": logger.source,
            "log_format": "{text}", "log_time": time(),
        })

    def connect(self, client: str, listener: str) -> None:
        self._emit(f"connect from {client} on {listener}", event="connect", client=client,
                   listener=listener)

    def disconnect(self, client: str) -> None:
        """Not logged: twistd writes debug events too, and one line per session is
        enough (the connect); kept as the hook metrics will count."""

    def reject(self, client: str, command: str, reply: str, reason: str,
               sender: str | None = None, recipient: str | None = None,
               queue_id: str | None = None) -> None:
        if self.metrics is not None:
            self.metrics.reject(reason)
        prefix = f"{queue_id}: " if queue_id else ""
        self._emit(f"{prefix}reject: {command} from {client}: {reply}; from=<{sender or ''}>"
                   f" to=<{recipient or ''}>", event="reject", client=client, command=command,
                   reply=reply, reason=reason, sender=sender or "", recipient=recipient or "",
                   queue_id=queue_id)

    def received(self, envelope: Envelope, client: str) -> None:
        if self.metrics is not None:
            self.metrics.received(envelope, client)
        self._emit(f"{envelope.id}: received from=<{envelope.sender}>, size={envelope.size},"
                   f" nrcpt={len(envelope.recipients)}, client={client}", event="received",
                   queue_id=envelope.id, sender=envelope.sender, size=envelope.size,
                   nrcpt=len(envelope.recipients), client=client,
                   recipients=[r.address for r in envelope.recipients])

    def outcome(self, event: Event) -> None:
        if self.metrics is not None:
            self.metrics.outcome(event)
        recipient = event.recipient
        orig = (f", orig_to=<{recipient.original}>"
                if recipient.original != recipient.address else "")
        relay = recipient.remote or recipient.action
        self._emit(f"{event.envelope.id}: to=<{recipient.address}>{orig}, relay={relay},"
                   f" delay={event.delay:.2f}, status={event.kind} ({event.reply})",
                   event=event.kind, queue_id=event.envelope.id, sender=event.envelope.sender,
                   recipient=recipient.address, original=recipient.original, relay=relay,
                   delay=round(event.delay, 3), reply=event.reply, attempts=recipient.attempts)

    def bounce_queued(self, envelope: Envelope, bounce_id: str) -> None:
        self._emit(f"{envelope.id}: sender non-delivery notification: {bounce_id}",
                   event="bounce", queue_id=envelope.id, bounce_id=bounce_id)


_last_stamp: tuple[int | None, str] = (None, "")  # (whole second, its text)


def _time_stamp(when: float) -> str:
    """``formatTime(when)``: RFC 3339 to the second, so one per second is enough.

    formatTime rounds to the microsecond first: a time within a microsecond of
    the next second may be stamped with that one, so it is not cached."""
    global _last_stamp
    second = math.floor(when)
    if when - second >= 0.999999:
        return formatTime(when)
    if _last_stamp[0] != second:
        _last_stamp = (second, formatTime(when))
    return _last_stamp[1]


def classic_text(event: Mapping[str, Any]) -> str | None:
    """Exactly ``formatEventAsClassicLogText(event)``: the line twistd's default
    observer writes.

    The mail log's own events (format ``{text}``, no failure, no ``log_system``)
    take a short path: the text is ready, the system is ``namespace#level``, and
    the time stamp is formatted once a second. Twisted's own formatting (time
    zone, strftime, a format parser) cost about 20 us of reactor time per line:
    a fifth of the time to resume a 100,000-message queue whose next hop is
    down, where every message is logged as deferred. Any other event goes to
    Twisted's function."""
    text = event.get("text")
    when = event.get("log_time")
    level = event.get("log_level")
    namespace = event.get("log_namespace")
    if (event.get("log_format") == "{text}" and isinstance(text, str) and text
            and when is not None and level is not None and namespace is not None
            and "log_failure" not in event and "log_system" not in event):
        return f"{_time_stamp(when)} [{namespace}#{level.name}] {text}".replace("\n", "\n\t") + "\n"
    return formatEventAsClassicLogText(event)


def _in_io_thread() -> bool:
    """``threadable.isInIOThread()`` in one call instead of two (once per line)."""
    return threadable.ioThread == get_ident()


@implementer(ILogObserver)
class TurnFlushedLog:
    """``FileLogObserver(out, classic_text)``, with one write per reactor turn
    instead of one per line.

    A write is a write(2) on a file (``PYTHONUNBUFFERED``, usual under systemd
    and in containers, makes the stream write through, so buffering in the
    stream is not enough); a relayed message makes three lines or more, and
    their system calls were 8 % of the reactor thread end to end. Lines logged
    in a turn of the reactor are joined and written by a ``call_soon``,
    which runs before the reactor next waits for I/O: a line is out within
    microseconds, and a kill -9 can lose only the current turn's lines. Away
    from a running reactor's thread (start-up, shutdown, other threads) each
    line is written and flushed at once, as Twisted's observer does; in the
    reactor's thread, after what that thread still holds, so lines keep their
    order. Another thread's line (a disk thread's rare warning) may come out
    ahead of lines the reactor thread logged microseconds before it, in the
    same turn: those are its own, and only it writes them.

    Safe against re-entry from a signal handler that logs (Python runs those in
    the reactor's thread, between any two bytecodes): the turn's write is
    asked for by a flag, not by the list's length, and the lines are taken by
    swapping the list before they are joined."""

    def __init__(self, out: TextIO, reactor: Any,
                 in_io_thread: Callable[[], bool] | None = None) -> None:
        self._out = out
        self._reactor = reactor
        self._in_io_thread = in_io_thread if in_io_thread is not None else _in_io_thread
        self._turn: list[str] = []  # this turn's lines (the reactor thread's alone)
        self._write_asked = False  # a call_soon will write the turn
        self._shutdown_hooked = False

    def __call__(self, event: Mapping[str, Any]) -> None:
        text = classic_text(event)
        if not text:
            return
        in_io_thread = self._in_io_thread()
        if not (self._reactor.running and in_io_thread):
            if in_io_thread:
                # The reactor has stopped: a turn's write may never come now.
                self._turn.append(text)
                self.write_turn()
            else:
                self._out.write(text)
                self._out.flush()
            return
        self._turn.append(text)
        if not self._write_asked:
            self._write_asked = True
            call_soon(self._reactor, self.write_turn)
            if not self._shutdown_hooked:
                self._shutdown_hooked = True
                add_trigger = getattr(self._reactor, "addSystemEventTrigger", None)
                if add_trigger is not None:  # the last turn's lines, if stop came first
                    add_trigger("after", "shutdown", self.write_turn)

    def write_turn(self) -> None:
        """Write and flush the lines held (the reactor thread)."""
        self._write_asked = False
        turn, self._turn = self._turn, []
        if not turn:
            return
        try:
            self._out.write("".join(turn))
            self._out.flush()
        except (OSError, ValueError):
            # A log that cannot be written (a full disk, a closed stream) has nowhere
            # to say so: logging the error would only fail again at every turn.
            pass


def stdout_observer(twistd_options: Mapping[str, Any] | None, out: TextIO | None = None,
                    reactor: Any = None) -> ILogObserver | None:
    """The observer twistd would make to log to stdout, writing the same lines
    through ``classic_text`` (a ``TurnFlushedLog``); None wherever twistd's own
    choice must stand: ``--logger``, ``--syslog``, a ``--logfile`` (rotation,
    SIGUSR1), a daemon."""
    if twistd_options is None or twistd_options.get("logger") or twistd_options.get("syslog"):
        return None
    if not twistd_options.get("nodaemon") or twistd_options.get("debug"):
        return None
    if twistd_options.get("logfile") not in (None, "", "-"):
        return None
    if reactor is None:
        from twisted.internet import reactor
    return TurnFlushedLog(out if out is not None else sys.stdout, reactor)


def jsonLogger() -> ILogObserver:
    """``twistd --logger relaygw.logs.jsonLogger``: one JSON object per line on stdout."""
    return FileLogObserver(sys.stdout, lambda event: eventAsJSON(event) + "\n")
