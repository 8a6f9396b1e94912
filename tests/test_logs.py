"""The mail log: events built by hand are the events Logger.info would make."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from twisted.logger import (
    LogLevel,
    eventAsJSON,
    formatEvent,
    formatEventAsClassicLogText,
    globalLogPublisher,
)

from relaygw.envelope import Envelope, Recipient
from relaygw.logs import MailLog
from relaygw.scheduler import Event


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
    seen: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(seen.append)
    try:
        yield seen
    finally:
        globalLogPublisher.removeObserver(seen.append)


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
