"""Concurrency slots, and a transport whose attempt is awaited as a coroutine.

``Slots.take`` hands a free slot over without a Deferred; an
``IInlineDeliverer`` (the SMTP relay) is awaited by the scheduler's own
coroutine. Both must keep the limits, the release of every slot on every
way out, exactly as the Deferred path did (tests/test_scheduler.py runs
that path with a plain FakeDeliverer, and stop() with both kinds).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet.defer import CancelledError, Deferred

from relaygw.envelope import RecipientState
from relaygw.interfaces import DeliveryResult
from relaygw.scheduler import Slots, _Destination
from test_scheduler import Harness, slots_all_free


def inline_harness(tmp_path: Path, **queue: object) -> Harness:
    h = Harness(tmp_path, inline=True, **queue)  # type: ignore[arg-type]
    h.scheduler.start()
    return h


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



def test_a_slot_holder_closed_unfinished_gives_its_slots_back_next_turn(
        tmp_path: Path) -> None:
    """At exit, attempts still in flight or waiting for a slot are garbage; the
    collector closes their coroutines in no set order. One that held slots must
    not hand them on from inside the collector (the waiter it would wake may be
    a closed coroutine, which then crashes), nor lose them (a transport that
    dropped a Deferred would block its destination for good): they come back
    on the reactor's next turn."""
    h = inline_harness(tmp_path, per_destination=1)
    scheduler = h.scheduler
    started: list[str] = []

    async def held_forever() -> list[DeliveryResult]:
        started.append("first")
        return await Deferred()

    async def second() -> list[DeliveryResult]:
        started.append("second")
        return []

    holder = scheduler._in_slots("x.test", held_forever)
    Deferred.fromCoroutine(holder)
    Deferred.fromCoroutine(scheduler._in_slots("x.test", second))
    assert started == ["first"]
    holder.close()  # what the collector does to an unfinished coroutine
    assert started == ["first"]  # the waiter was not woken from inside it
    assert len(scheduler._per_destination["x.test"].waiting) == 1
    h.advance()  # the next turn (at exit it never comes)
    assert started == ["first", "second"]  # the slots were given back, not lost
    assert slots_all_free(h)


def test_a_probe_closed_unfinished_gives_its_verdict_next_turn(tmp_path: Path) -> None:
    """The same for a group probing a destination that was dead: the groups
    waiting for its verdict hear it on the next turn, not from inside the
    collector, and the destination is not left probing for good."""
    h = inline_harness(tmp_path, hold=True)
    scheduler = h.scheduler
    probed = _Destination(failures=1, dead_until=-1.0, last_error="451 4.4.1 down")
    scheduler._destinations["x.test"] = probed  # its dead time is over: the next group probes
    envelope = h.queue("u@x.test", enqueue=False)
    group = scheduler._group(envelope, "relay", "x.test", envelope.recipients)
    Deferred.fromCoroutine(group)
    assert probed.probing and len(h.relay.in_flight) == 1
    heard: list[object] = []
    probed.verdict().addCallback(heard.append)
    group.close()  # what the collector does to an unfinished coroutine
    assert heard == []
    h.advance()
    assert heard == [None]
    assert not probed.probing
