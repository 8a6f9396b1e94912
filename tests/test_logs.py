"""The mail log: events built by hand are the events Logger.info would make."""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.logger import (
    ILogObserver,
    LogLevel,
    eventAsJSON,
    formatEvent,
    formatEventAsClassicLogText,
    formatTime,
)
from twisted.python import log as legacy_log
from twisted.python.failure import Failure
from twisted.scripts._twistd_unix import UnixAppLogger

from relaygw import logs
from relaygw.envelope import Envelope, Recipient
from relaygw.logs import (
    MailLog,
    TurnFlushedLog,
    _time_stamp,
    classic_text,
    jsonLogger,
    stdout_observer,
)
from relaygw.scheduler import Event
from support import log_events


def reference_maillog() -> MailLog:
    """A MailLog whose ``_emit`` is the straightforward form that MailLog._emit
    stands in for."""
    maillog = MailLog()

    def emit(text: str, **fields: Any) -> None:
        maillog.log.info("{text}", text=text, **fields)

    maillog._emit = emit  # type: ignore[method-assign]
    return maillog


def envelope() -> Envelope:
    return Envelope(id="660F86E8028A0000F3B", sender="s@src.test", received=0.0, size=4766,
                    recipients=[Recipient(address="a@dst.test", original="alias@dst.test",
                                          action="relay", remote="mx.dst.test[192.0.2.1]")])


CALLS: list[tuple[str, Callable[[MailLog], None]]] = [
    ("connect", lambda log: log.connect("192.0.2.1", "tcp:25")),
    ("reject", lambda log: log.reject("192.0.2.1", "RCPT", "554 5.7.1 Relay access denied",
                                      "relay_denied", sender="x@y.test",
                                      recipient="v@far.test")),
    ("reject with id", lambda log: log.reject("192.0.2.1", "DATA", "552 5.3.4 too big",
                                              "size", queue_id="Q1")),
    ("received", lambda log: log.received(envelope(), "192.0.2.1")),
    ("outcome", lambda log: log.outcome(Event("deferred", envelope(), envelope().recipients[0],
                                              "451 4.4.1 {braces} in a reply", 12.3456))),
    ("bounce", lambda log: log.bounce_queued(envelope(), "660F86E8028A0000F3C")),
]


@pytest.fixture
def events() -> Iterator[list[dict[str, Any]]]:
    with log_events() as seen:
        yield seen


@pytest.mark.parametrize("call", [c for _, c in CALLS], ids=[name for name, _ in CALLS])
def test_events_are_those_logger_info_makes(call: Callable[[MailLog], None],
                                            events: list[dict[str, Any]]) -> None:
    call(MailLog())
    call(reference_maillog())
    ours, reference = events
    assert list(ours) == list(reference)  # the same keys in the same order (JSON lines)
    for key in ours:
        if key not in ("log_time", "log_logger", "log_source"):
            assert ours[key] == reference[key], key
    assert ours["log_level"] is LogLevel.info
    assert ours["log_logger"].namespace == reference["log_logger"].namespace
    assert type(ours["log_source"]) is MailLog
    assert ours["log_logger"].source is ours["log_source"]
    assert abs(ours["log_time"] - reference["log_time"]) < 5
    ours["log_time"] = reference["log_time"]
    assert formatEvent(ours) == ours["text"]
    assert formatEventAsClassicLogText(ours) == formatEventAsClassicLogText(reference)
    mine, theirs = json.loads(eventAsJSON(ours)), json.loads(eventAsJSON(reference))
    assert mine == theirs


# --- classic_text: twistd's stdout line, byte for byte -----------------------------------


def mail_event(text: str = "Q1: received from=<a@b.test>", when: float | None = 1.7e9,
               **extra: Any) -> dict[str, Any]:
    """A mail-log event as MailLog._emit makes it (format ``{text}``), changed by ``extra``."""
    event: dict[str, Any] = {
        "text": text, "event": "received", "log_logger": MailLog.log,
        "log_level": LogLevel.info, "log_namespace": "relaygw.mail", "log_source": None,
        "log_format": "{text}", "log_time": when,
    }
    event.update(extra)
    return event


@pytest.fixture
def cold_stamp_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts with an empty time-stamp cache, whatever ran before it."""
    monkeypatch.setattr(logs, "_last_stamp", (None, ""))


@pytest.mark.parametrize("call", [c for _, c in CALLS], ids=[name for name, _ in CALLS])
def test_classic_text_is_twisteds_line_for_every_mail_event(
        call: Callable[[MailLog], None], events: list[dict[str, Any]],
        cold_stamp_cache: None) -> None:
    """The lines twistd prints for the mail log must not change with the fast path."""
    call(MailLog())
    [event] = events
    expected = formatEventAsClassicLogText(event)
    assert expected is not None and expected.endswith(f"] {event['text']}\n")
    assert classic_text(event) == expected
    assert classic_text(event) == expected  # again, with the time stamp from the cache


@pytest.mark.parametrize("text", [
    "line one\nline two", "trailing newline\n", "\n", "a\n\nb\n\n", "cr\r\nlf",
    "{not} a {format", "{{}}", "caf\u00e9 \u2603 \U0001f4e7", " ",
], ids=repr)
def test_classic_text_indents_continuation_lines_as_twisted_does(
        text: str, cold_stamp_cache: None) -> None:
    """Newlines become "\\n\\t" in the whole line, and the text is never re-formatted."""
    event = mail_event(text)
    assert classic_text(event) == formatEventAsClassicLogText(event)


def _failure() -> Failure:
    try:
        raise ValueError("boom")
    except ValueError:
        return Failure()


OTHER_EVENTS: list[tuple[str, dict[str, Any]]] = [
    ("failure", mail_event(log_failure=_failure())),
    ("failure, other format", mail_event(log_format="oops {event}", log_failure=_failure())),
    ("system", mail_event(log_system="relaygw.smtp,3,192.0.2.1")),
    ("system None", mail_event(log_system=None)),
    ("other format", mail_event(log_format="{event}: {text}")),
    ("format without text", mail_event(log_format="started on {port}", port=25)),
    ("bytes format", mail_event(log_format=b"{text}")),
    ("no log_time", mail_event(when=None)),
    ("log_time missing", {k: v for k, v in mail_event().items() if k != "log_time"}),
    ("no log_format", mail_event(log_format=None)),
    ("log_format missing", {k: v for k, v in mail_event().items() if k != "log_format"}),
    ("empty text", mail_event("")),
    ("text not a str", mail_event(42)),
    ("no text", {k: v for k, v in mail_event().items() if k != "text"}),
    ("no level", {k: v for k, v in mail_event().items() if k != "log_level"}),
    ("no namespace", {k: v for k, v in mail_event().items() if k != "log_namespace"}),
    ("other level and namespace", mail_event(log_level=LogLevel.critical,
                                             log_namespace="twisted.internet.tcp.Port")),
    ("unformattable", mail_event(log_format="{missing")),
    ("empty event", {}),
]


@pytest.mark.parametrize("event", [e for _, e in OTHER_EVENTS],
                         ids=[name for name, _ in OTHER_EVENTS])
def test_classic_text_is_twisteds_line_for_other_events(event: dict[str, Any],
                                                         cold_stamp_cache: None) -> None:
    """twistd logs everything through this observer: tracebacks, systems, other formats,
    events with parts missing must come out exactly as Twisted writes them."""
    assert classic_text(event) == formatEventAsClassicLogText(event)


def test_classic_text_keeps_a_failures_traceback(cold_stamp_cache: None) -> None:
    """A "{text}" event with a failure must not take the short path and lose the traceback."""
    line = classic_text(mail_event(log_failure=_failure()))
    assert line is not None and "\tbuiltins.ValueError: boom\n" in line


def test_classic_text_of_a_flattened_event(cold_stamp_cache: None) -> None:
    """eventAsJSON flattens events in place (log_flattened): the line is unchanged."""
    event = mail_event("flattened {x}\nsecond")
    eventAsJSON(event)
    assert "log_flattened" in event
    assert classic_text(event) == formatEventAsClassicLogText(event)


def test_classic_text_of_legacy_log_msg_events(events: list[dict[str, Any]],
                                               cold_stamp_cache: None) -> None:
    """Libraries still call twisted.python.log.msg: their events carry log_system."""
    legacy_log.msg("hello\nworld", system="legacy-system")
    legacy_log.msg(format="%(count)d {not new style}", count=3)
    legacy_log.msg("")
    legacy_log.msg("a", "b", "c")
    assert len(events) == 4
    for event in events:
        assert classic_text(event) == formatEventAsClassicLogText(event)
    assert classic_text(events[0]) == formatEventAsClassicLogText(events[0])
    assert (classic_text(events[0]) or "").endswith(" [legacy-system] hello\n\tworld\n")


LEVELS = list(LogLevel.iterconstants())


@settings(max_examples=300, deadline=None)
@given(text=st.text(), when=st.floats(0, 4e9), level=st.sampled_from(LEVELS),
       namespace=st.text(max_size=40), system=st.none() | st.text(max_size=20))
def test_classic_text_is_twisteds_line_for_any_text(text: str, when: float, level: LogLevel,
                                                    namespace: str, system: str | None) -> None:
    """Any text (newlines, braces, non-ASCII, empty), time, level and namespace."""
    logs._last_stamp = (None, "")  # the cache across examples is tested on its own, below
    extra: dict[str, Any] = {} if system is None else {"log_system": system}
    event = mail_event(text, when, log_level=level, log_namespace=namespace, **extra)
    expected = formatEventAsClassicLogText(event)
    assert classic_text(event) == expected
    assert classic_text(event) == expected  # the cached time stamp


TIMES = st.floats(0, 4e9) | st.integers(0, 4 * 10**15).map(lambda us: us / 1e6)


@settings(max_examples=300, deadline=None)
@given(whens=st.lists(TIMES | st.sampled_from([0.0, 0.999999, 0.9999996, 1.0, 59.999999,
                                               60.0, 3999999999.9999995]),
                      min_size=1, max_size=20))
def test_classic_text_sequence_of_times(whens: list[float]) -> None:
    """Lines logged one after another (the cache warm from the line before) keep
    Twisted's time stamp, even within a microsecond of the next second, which
    Twisted's rounding may already give."""
    logs._last_stamp = (None, "")
    for when in whens:
        event = mail_event("x", when)
        assert classic_text(event) == formatEventAsClassicLogText(event), when


# --- _time_stamp: formatted once a second -------------------------------------------------

T0 = 1_700_000_000.25  # some second, a quarter in


def test_time_stamp_is_format_time_across_second_boundaries(cold_stamp_cache: None) -> None:
    """The cache must never answer for a second it was not filled for, forwards or back."""
    for when in (T0, T0 + 0.5, T0 + 0.7, T0 + 0.75, T0 + 1.0, T0 + 1.5, T0 + 3600,
                 T0 - 5, T0 - 5.2, T0, T0 + 86400 * 180, T0):
        assert _time_stamp(when) == formatTime(when), when
    whole = float(int(T0))
    for when in (whole, whole + 0.999, whole + 1.0, whole + 0.5, whole - 0.001, whole):
        assert _time_stamp(when) == formatTime(when), when


def test_time_stamp_cache_is_one_per_second(cold_stamp_cache: None) -> None:
    """The point of the cache: within a second, formatTime is not called again."""
    first = _time_stamp(T0)
    assert logs._last_stamp == (int(T0), first)
    logs._last_stamp = (int(T0), "cached")
    assert _time_stamp(T0 + 0.5) == "cached"
    assert _time_stamp(T0 + 1) == formatTime(T0 + 1)


def test_time_stamp_before_1970(cold_stamp_cache: None) -> None:
    """Before 1970 the second is floored, not truncated towards zero."""
    for when in (0.5, -1.5, -0.5, -1.0, -2.0, 0.0, -0.25):
        assert _time_stamp(when) == formatTime(when), when


def test_time_stamp_of_the_last_second_of_1969_with_an_empty_cache(
        cold_stamp_cache: None) -> None:
    """The cache's 'empty' marker must not be a second someone can ask for."""
    assert _time_stamp(-0.5) == formatTime(-0.5)


def test_time_stamp_within_half_a_microsecond_of_the_next_second(
        cold_stamp_cache: None) -> None:
    """datetime rounds 1700000000.9999996 up to ...:21; the cache filled at ...:20.25 says :20."""
    late = 1_700_000_000.9999996
    assert formatTime(late) != formatTime(1_700_000_000.25)
    _time_stamp(1_700_000_000.25)
    assert _time_stamp(late) == formatTime(late)


# --- stdout_observer: only where twistd would log to stdout -------------------------------


@pytest.mark.parametrize("options", [
    {"nodaemon": True},
    {"nodaemon": True, "logfile": None},
    {"nodaemon": True, "logfile": ""},
    {"nodaemon": True, "logfile": "-"},
    {"nodaemon": True, "logfile": None, "logger": None, "syslog": False, "debug": False},
], ids=repr)
def test_stdout_observer_where_twistd_logs_to_stdout(options: dict[str, Any],
                                                     cold_stamp_cache: None) -> None:
    """twistd -n (no --logfile, or --logfile -) logs to stdout: ours writes the same lines."""
    out = io.StringIO()
    observer = stdout_observer(options, out)
    assert isinstance(observer, TurnFlushedLog)
    assert ILogObserver.providedBy(observer)
    event = mail_event("Q1: to=<a@b.test>\nsecond line")
    observer(event)
    other = mail_event(log_format="port {port}", port=25, log_system="tcp")
    observer(other)
    assert out.getvalue() == (formatEventAsClassicLogText(event) or "") + (
        formatEventAsClassicLogText(other) or "")


@pytest.mark.parametrize("options", [
    None,
    {},
    {"nodaemon": False},
    {"nodaemon": False, "logfile": "-"},
    {"nodaemon": True, "logger": lambda: None},
    {"nodaemon": True, "logger": jsonLogger},
    {"nodaemon": True, "syslog": True},
    {"nodaemon": True, "logfile": "x.log"},
    {"nodaemon": True, "logfile": "/dev/stdout"},
    {"nodaemon": True, "debug": True},
], ids=repr)
def test_stdout_observer_leaves_twistds_choice_elsewhere(options: dict[str, Any] | None) -> None:
    """--logger, --syslog, a --logfile (rotation, SIGUSR1), a daemon, --debug: twistd's own."""
    assert stdout_observer(options, io.StringIO()) is None


def test_stdout_observer_writes_to_sys_stdout_by_default(capsys: pytest.CaptureFixture[str],
                                                         cold_stamp_cache: None) -> None:
    """Without ``out`` it writes to sys.stdout as it is when made, as twistd's does."""
    observer = stdout_observer({"nodaemon": True, "logfile": None})
    assert observer is not None
    event = mail_event()
    observer(event)
    assert capsys.readouterr().out == formatEventAsClassicLogText(event)


@pytest.mark.parametrize("options", [
    {"nodaemon": True, "logfile": None, "syslog": False},
    {"nodaemon": True, "logfile": "", "syslog": False},
    {"nodaemon": True, "logfile": "-", "syslog": False},
], ids=repr)
def test_stdout_observer_writes_what_twistds_own_observer_writes(
        options: dict[str, Any], capsys: pytest.CaptureFixture[str],
        cold_stamp_cache: None) -> None:
    """Where ours is chosen, twistd's (UnixAppLogger's) would write the same bytes to stdout."""
    theirs = UnixAppLogger(options)._getLogObserver()
    ours = stdout_observer(options)
    assert ours is not None
    events = [mail_event("one\ntwo"), mail_event(log_system="sys"), mail_event(when=None),
              mail_event(log_failure=_failure())]
    for event in events:
        theirs(event)
    twisted_text = capsys.readouterr().out
    for event in events:
        ours(event)
    assert capsys.readouterr().out == twisted_text
    assert twisted_text.count("\n") > len(events)


# --- TurnFlushedLog: one flush per reactor turn --------------------------------------------


class CountingOut(io.StringIO):
    """stdout that counts its writes and flushes (each a write(2) on a real file
    when the stream writes through, as with PYTHONUNBUFFERED)."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0
        self.flushes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)

    def flush(self) -> None:
        self.flushes += 1
        super().flush()


class RunningClock(Clock):
    running = True

    def __init__(self) -> None:
        super().__init__()
        self.triggers: list[tuple[str, str, Callable[[], None]]] = []

    def addSystemEventTrigger(self, phase: str, event: str,
                              callable: Callable[[], None]) -> None:
        self.triggers.append((phase, event, callable))


def test_lines_of_one_reactor_turn_share_one_write(cold_stamp_cache: None) -> None:
    """In the reactor's thread, a turn's lines are held and written, joined, by one
    callLater(0), which runs before the reactor waits again: one write(2) a turn
    even where the stream writes through."""
    out = CountingOut()
    clock = RunningClock()
    observer = TurnFlushedLog(out, clock, in_io_thread=lambda: True)
    events = [mail_event(f"line {n}") for n in range(3)]
    for event in events:
        observer(event)
    assert out.getvalue() == "" and out.writes == 0 and out.flushes == 0
    [call] = clock.getDelayedCalls()
    assert call.getTime() == clock.seconds()  # a delay of 0: the reactor's next turn
    clock.advance(0)
    assert out.getvalue() == "".join(formatEventAsClassicLogText(e) or "" for e in events)
    assert (out.writes, out.flushes) == (1, 1)
    observer(mail_event("next turn"))
    assert len(clock.getDelayedCalls()) == 1  # a new turn, a new write
    clock.advance(0)
    assert (out.writes, out.flushes) == (2, 2)
    assert out.getvalue().endswith("next turn\n")


@pytest.mark.parametrize(("running", "in_io_thread"), [(False, True), (True, False)])
def test_away_from_a_running_reactors_thread_each_line_is_flushed(
        running: bool, in_io_thread: bool, cold_stamp_cache: None) -> None:
    """Start-up, shutdown and other threads: a write and a flush per line, as
    Twisted's observer, so no line waits for a turn that may never come."""
    out = CountingOut()
    clock = RunningClock()
    clock.running = running  # type: ignore[misc]
    observer = TurnFlushedLog(out, clock, in_io_thread=lambda: in_io_thread)
    observer(mail_event("one"))
    observer(mail_event("two"))
    assert (out.writes, out.flushes) == (2, 2)
    assert out.getvalue().index("one") < out.getvalue().index("two")
    assert out.getvalue().endswith("two\n")
    assert clock.getDelayedCalls() == []


def test_another_threads_line_does_not_take_the_reactor_threads_turn(
        cold_stamp_cache: None) -> None:
    """A line from another thread is written at once; the reactor thread's held
    lines stay its own (that thread alone touches them), written at its turn."""
    out = CountingOut()
    clock = RunningClock()
    in_io_thread = True
    observer = TurnFlushedLog(out, clock, in_io_thread=lambda: in_io_thread)
    observer(mail_event("reactor"))
    in_io_thread = False
    observer(mail_event("thread"))
    assert "thread" in out.getvalue() and "reactor" not in out.getvalue()
    clock.advance(0)
    assert out.getvalue().index("thread") < out.getvalue().index("reactor")


def test_the_last_turns_lines_are_written_at_shutdown(cold_stamp_cache: None) -> None:
    """Lines held when the reactor stops before their turn comes are written by an
    "after shutdown" trigger, hooked once."""
    out = CountingOut()
    clock = RunningClock()
    observer = TurnFlushedLog(out, clock, in_io_thread=lambda: True)
    observer(mail_event("first"))
    clock.advance(0)
    observer(mail_event("last turn"))
    [(phase, event, trigger)] = clock.triggers
    assert (phase, event) == ("after", "shutdown")
    clock.running = False  # type: ignore[misc]  # stopped: the callLater(0) never runs
    trigger()
    assert out.getvalue().endswith("last turn\n") and out.writes == 2


def test_a_line_logged_from_inside_the_observer_still_gets_its_turn(
        cold_stamp_cache: None) -> None:
    """A signal handler that logs runs between any two bytecodes of the reactor's
    thread: here, right after the observer took a line in. Both lines are
    written, by one turn's write (the old test of the list's length asked for
    none, and every later line was held until shutdown)."""
    out = CountingOut()
    clock = RunningClock()
    observer = TurnFlushedLog(out, clock, in_io_thread=lambda: True)

    class SignalAfterAppend(list[str]):
        fired = False

        def append(self, text: str) -> None:
            super().append(text)
            if not self.fired:
                self.fired = True
                observer(mail_event("from the handler"))

    observer._turn = SignalAfterAppend()
    observer(mail_event("interrupted"))
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(0)
    assert "interrupted" in out.getvalue() and "from the handler" in out.getvalue()
    assert out.writes == 1
    observer(mail_event("later"))
    clock.advance(0)
    assert out.getvalue().endswith("later\n")


def test_a_line_logged_while_the_turn_is_written_waits_for_the_next(
        cold_stamp_cache: None) -> None:
    out = CountingOut()
    clock = RunningClock()
    observer = TurnFlushedLog(out, clock, in_io_thread=lambda: True)
    real_write = out.write

    def write(text: str) -> int:
        if "first" in text:
            observer(mail_event("during the write"))
        return real_write(text)

    out.write = write  # type: ignore[method-assign]
    observer(mail_event("first"))
    clock.advance(0)  # a Clock also runs the turn's write asked for meanwhile
    assert out.getvalue().index("first") < out.getvalue().index("during the write")
    assert out.writes == 2 and clock.getDelayedCalls() == []


def test_a_log_that_cannot_be_written_does_not_fail_the_turn(cold_stamp_cache: None) -> None:
    """A full disk under the log: the turn's lines are dropped, nothing raises into
    the reactor (which would log the error, fail again, and so on each turn)."""

    class FullDisk(CountingOut):
        def write(self, text: str) -> int:
            raise OSError(28, "No space left on device")

    out = FullDisk()
    clock = RunningClock()
    observer = TurnFlushedLog(out, clock, in_io_thread=lambda: True)
    observer(mail_event("lost"))
    clock.advance(0)
    assert clock.getDelayedCalls() == []
    observer(mail_event("next"))  # the next turn tries again
    assert len(clock.getDelayedCalls()) == 1


def test_an_event_without_text_writes_and_schedules_nothing() -> None:
    """What Twisted's formatting drops (no format) costs no write and no flush."""
    out = CountingOut()
    clock = RunningClock()
    observer = TurnFlushedLog(out, clock, in_io_thread=lambda: True)
    observer({"log_time": 1.0})
    assert out.getvalue() == "" and out.flushes == 0 and clock.getDelayedCalls() == []


def test_a_line_after_the_reactor_stopped_writes_a_turn_that_never_came(
        cold_stamp_cache: None) -> None:
    """A line logged in the reactor's last turn waits for a write that will not run
    once the reactor has stopped: the next line (twistd's "Main loop terminated.")
    writes it before its own, in one write."""
    out = CountingOut()
    clock = RunningClock()
    observer = TurnFlushedLog(out, clock, in_io_thread=lambda: True)
    observer(mail_event("last turn"))
    assert out.writes == 0 and len(clock.getDelayedCalls()) == 1
    clock.running = False  # type: ignore[misc]  # stopped before the callLater(0) ran
    observer(mail_event("Main loop terminated."))
    assert (out.writes, out.flushes) == (1, 1)
    assert out.getvalue().index("last turn") < out.getvalue().index("Main loop terminated.")


def test_the_default_reactor_thread_check_agrees_with_twisteds() -> None:
    import threading

    from twisted.python import threadable

    from relaygw.logs import _in_io_thread

    saved = threadable.ioThread
    try:
        for io_thread in (threading.get_ident(), -1):
            threadable.ioThread = io_thread
            assert _in_io_thread() is threadable.isInIOThread()
        assert _in_io_thread() is False
    finally:
        threadable.ioThread = saved
