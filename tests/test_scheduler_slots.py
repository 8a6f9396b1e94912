"""Concurrency slots, and a transport whose attempt is awaited as a coroutine.

``Slots.take`` hands a free slot over without a Deferred; an
``IInlineDeliverer`` (the SMTP relay) is awaited by the scheduler's own
coroutine. Both must keep the limits, the release of every slot on every
way out, and stop()'s "start nothing more" exactly as the Deferred path did
(tests/test_scheduler.py runs that path with a plain FakeDeliverer).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import CancelledError, Deferred
from zope.interface import implementer

from core_fakes import FakeDeliverer
from relaygw.envelope import Envelope, Recipient, RecipientState
from relaygw.interfaces import DeliveryResult, IInlineDeliverer
from relaygw.scheduler import Slots
from test_scheduler import Harness


@implementer(IInlineDeliverer)
class InlineFakeDeliverer(FakeDeliverer):
    """A FakeDeliverer reached only through ``deliver_inline``; ``crash`` makes the
    coroutine raise (a transport bug) instead of answering."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.crash: Exception | None = None

    def deliver(self, envelope: Envelope, message_path: Path,
                recipients: list[Recipient]) -> Deferred[list[DeliveryResult]]:
        raise AssertionError("an inline transport is awaited, not called for a Deferred")

    async def deliver_inline(self, envelope: Envelope, message_path: Path,
                             recipients: list[Recipient]) -> list[DeliveryResult]:
        d = super().deliver(envelope, message_path, recipients)
        if self.crash is not None:
            raise self.crash
        return await d


def inline_harness(tmp_path: Path, **queue: object) -> Harness:
    h = Harness(tmp_path, **queue)  # type: ignore[arg-type]
    h.relay = InlineFakeDeliverer(h.clock, hold=h.relay.hold)
    h.scheduler = h.new_scheduler()
    h.scheduler.start()
    return h


def slots_all_free(h: Harness) -> bool:
    scheduler = h.scheduler
    return (scheduler._global.tokens == scheduler._global.limit
            and not scheduler._global.waiting and scheduler._per_destination == {})


# --- Slots ----------------------------------------------------------------------


def test_a_free_slot_is_taken_without_a_deferred() -> None:
    slots = Slots(2)
    assert slots.take() is None
    assert slots.take() is None
    assert slots.tokens == 0


def test_a_full_slots_hands_the_next_release_to_the_first_waiter() -> None:
    slots = Slots(1)
    assert slots.take() is None
    first, second = slots.take(), slots.take()
    assert isinstance(first, Deferred) and isinstance(second, Deferred)
    got: list[str] = []
    first.addCallback(lambda _: got.append("first"))
    second.addCallback(lambda _: got.append("second"))
    slots.release()
    assert got == ["first"] and slots.tokens == 0
    slots.release()
    assert got == ["first", "second"]
    slots.release()
    assert slots.tokens == 1


def test_a_cancelled_wait_holds_no_slot() -> None:
    slots = Slots(1)
    assert slots.take() is None
    waiter = slots.take()
    assert waiter is not None
    waiter.addErrback(lambda f: f.trap(CancelledError))
    waiter.cancel()
    assert not slots.waiting
    slots.release()
    assert slots.tokens == 1
    assert slots.take() is None  # nobody queued ahead: taken at once


# --- the scheduler with an inline transport -------------------------------------


def test_an_inline_transport_is_awaited_and_every_slot_comes_back(tmp_path: Path) -> None:
    h = inline_harness(tmp_path)
    envelope = h.queue("a@dst.test", "b@dst.test")
    h.advance()
    [call] = h.relay.calls
    assert call.addresses == ["a@dst.test", "b@dst.test"]
    assert all(r.state is RecipientState.DELIVERED for r in envelope.recipients)
    assert h.on_disk() == []
    assert slots_all_free(h)


def test_an_inline_transport_that_raises_defers_its_group_and_frees_its_slots(
        tmp_path: Path) -> None:
    h = inline_harness(tmp_path)
    h.relay.crash = RuntimeError("transport bug")
    envelope = h.queue("a@dst.test")
    h.advance()
    [a] = envelope.recipients
    assert a.state is RecipientState.DEFERRED
    assert a.last_error is not None and a.last_error.startswith("451 4.3.0")
    assert slots_all_free(h)


@pytest.mark.parametrize(("limits", "queued", "first_wave"), [
    ({"concurrency": 2, "per_destination": 10}, [f"u@d{i}.test" for i in range(5)], 2),
    ({"concurrency": 10, "per_destination": 2}, [f"u{i}@busy.test" for i in range(4)], 2),
])
def test_inline_attempts_keep_the_limits(tmp_path: Path, limits: dict[str, int],
                                         queued: list[str], first_wave: int) -> None:
    h = inline_harness(tmp_path, hold=True, **limits)
    for address in queued:
        h.queue(address)
    h.advance()
    assert len(h.relay.in_flight) == first_wave
    while h.relay.in_flight:
        assert len(h.relay.in_flight) <= first_wave
        h.relay.in_flight[0].finish()
    assert len(h.relay.calls) == len(queued)
    assert h.on_disk() == []
    assert slots_all_free(h)


def test_stop_starts_no_inline_attempt_still_waiting_for_a_slot(tmp_path: Path) -> None:
    h = inline_harness(tmp_path, hold=True, concurrency=1)
    h.queue("a@x.test")
    waiting = h.queue("b@y.test")
    h.advance()
    [call] = h.relay.in_flight
    stopped = h.scheduler.stop()
    fired: list[object] = []
    stopped.addBoth(fired.append)
    call.finish()
    assert len(h.relay.calls) == 1
    assert len(fired) == 1
    [b] = h.stored(waiting).recipients
    assert (b.state, b.attempts) == (RecipientState.QUEUED, 0)
    assert slots_all_free(h)
