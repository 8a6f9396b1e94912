"""The queue manager on a fake clock: outcomes, retry timing, expiry, bounces, limits.

A real Spool in tmp_path with a synchronous runner, a FakeDeliverer per transport
and ``random=lambda: 0.5`` (no jitter), so every retry time is exact.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from core_fakes import (
    FakeBouncer,
    FakeDeliverer,
    InlineFakeDeliverer,
    queue_message,
    recipient,
    sync_run,
)
from relaygw.config import QueueConfig
from relaygw.envelope import Envelope, Recipient, RecipientState
from relaygw.interfaces import DeliveryResult
from relaygw.scheduler import Event, Scheduler
from relaygw.spool import Spool

SCHEDULE = (60.0, 300.0, 900.0)
DEFER = DeliveryResult.deferred("451 4.4.1 try again later", remote="mx.dst.test")
FAIL = DeliveryResult.failed("550 5.1.1 no such user", remote="mx.dst.test")


class Harness:
    def __init__(self, tmp_path: Path, *, hold: bool = False, inline: bool = False,
                 **queue: object) -> None:
        """``inline``: the relay transport is awaited as a coroutine (as the SMTP
        relay is: IInlineDeliverer), not called for a Deferred."""
        self.clock = Clock()
        self.directory = tmp_path / "spool"
        self.spool = Spool(self.directory, sync_run)
        self.spool.prepare()
        self.relay = (InlineFakeDeliverer if inline else FakeDeliverer)(self.clock, hold=hold)
        self.local = FakeDeliverer(self.clock, hold=hold, fixed_destination="local")
        self.bouncer = FakeBouncer()
        self.events: list[Event] = []
        settings: dict[str, object] = {"retry_schedule": SCHEDULE, "max_age": 100_000.0}
        settings.update(queue)
        self.config = QueueConfig(directory=self.directory, **settings)  # type: ignore[arg-type]
        self.scheduler = self.new_scheduler()

    def new_scheduler(self) -> Scheduler:
        return Scheduler(self.spool, {"relay": self.relay, "local": self.local}, self.clock,
                         self.config, bouncer=self.bouncer, random=lambda: 0.5,
                         on_event=self.events.append)

    def queue(self, *addresses: str | Recipient, enqueue: bool = True,
              **fields: object) -> Envelope:
        rcpts = [a if isinstance(a, Recipient) else recipient(a) for a in addresses]
        fields.setdefault("received", self.clock.seconds())
        envelope = queue_message(self.spool, rcpts, **fields)  # type: ignore[arg-type]
        if enqueue:
            self.scheduler.enqueue(envelope)
        return envelope

    def advance(self, seconds: float = 0.0) -> None:
        self.clock.advance(seconds)

    def advance_to(self, when: float) -> None:
        self.clock.advance(when - self.clock.seconds())

    def on_disk(self) -> list[str]:
        return sorted(p.name for p in self.directory.iterdir())

    def stored(self, envelope: Envelope) -> Envelope:
        return self.spool.load(envelope.id)


def slots_all_free(h: Harness) -> bool:
    scheduler = h.scheduler
    return (scheduler._global.tokens == scheduler._global.limit
            and not scheduler._global.waiting and scheduler._per_destination == {})


@pytest.fixture
def h(tmp_path: Path) -> Harness:
    harness = Harness(tmp_path)
    harness.scheduler.start()
    return harness


def test_delivered_message_leaves_the_spool(h: Harness) -> None:
    envelope = h.queue("a@dst.test", "b@dst.test")
    assert h.relay.calls == []  # the timer, not enqueue, starts the attempt
    h.advance()
    [call] = h.relay.calls
    assert call.queue_id == envelope.id
    assert call.addresses == ["a@dst.test", "b@dst.test"]
    assert call.message_path == h.spool.message_path(envelope.id)
    assert h.on_disk() == []
    assert h.scheduler.messages == {}
    assert [e.kind for e in h.events] == ["delivered", "delivered"]
    assert all(r.state is RecipientState.DELIVERED for r in envelope.recipients)
    assert h.clock.getDelayedCalls() == []  # an empty queue arms no timer


def test_messages_committed_in_one_turn_share_one_due_run(h: Harness) -> None:
    """The timer set for the first is kept for the next (not cancelled and set
    again per message); its one run starts both attempts."""
    first = h.queue("a@dst.test")
    [timer] = h.clock.getDelayedCalls()
    second = h.queue("b@dst.test")
    assert h.clock.getDelayedCalls() == [timer] and not timer.cancelled
    h.advance()
    assert [c.queue_id for c in h.relay.calls] == [first.id, second.id]
    assert h.clock.getDelayedCalls() == []


def test_a_sooner_due_time_replaces_the_timer(h: Harness) -> None:
    h.relay.script["a@dst.test"] = [DEFER]
    h.queue("a@dst.test")
    h.advance()
    [retry] = h.clock.getDelayedCalls()
    assert retry.getTime() == SCHEDULE[0]
    h.queue("b@dst.test")  # due now: the retry's timer is too late for it
    [now] = h.clock.getDelayedCalls()
    assert retry.cancelled and now.getTime() == h.clock.seconds()
    h.advance()
    assert [c.addresses for c in h.relay.calls] == [["a@dst.test"], ["b@dst.test"]]
    [again] = h.clock.getDelayedCalls()
    assert again.getTime() == SCHEDULE[0]


def test_transient_failure_retries_at_the_schedule_times(h: Harness) -> None:
    h.relay.script["a@dst.test"] = [DEFER]
    envelope = h.queue("a@dst.test")
    # failures at 0, 60, 360, 1260, then the last step (900) repeats
    expected = [0.0, 60.0, 360.0, 1260.0, 2160.0, 3060.0]
    h.advance()
    for when in expected[1:]:
        h.advance_to(when - 1)
        assert h.relay.times_for("a@dst.test")[-1] < when - 1, f"early retry before {when}"
        h.advance_to(when)
    assert h.relay.times_for("a@dst.test") == expected
    stored = h.stored(envelope).recipients[0]
    assert stored.state is RecipientState.DEFERRED
    assert stored.attempts == len(expected)
    assert stored.next_attempt == 3060.0 + 900.0
    assert stored.last_error == DEFER.reply
    assert stored.remote == "mx.dst.test"
    assert [e.kind for e in h.events] == ["deferred"] * len(expected)
    assert h.bouncer.bounces == []


def test_deferred_then_delivered(h: Harness) -> None:
    h.relay.script["a@dst.test"] = [DEFER, DEFER, DeliveryResult.delivered()]
    h.queue("a@dst.test")
    h.advance()
    h.advance_to(60)
    h.advance_to(360)
    assert h.relay.times_for("a@dst.test") == [0.0, 60.0, 360.0]
    assert h.on_disk() == []
    h.advance_to(10_000)
    assert len(h.relay.calls) == 3


def test_jitter_comes_from_the_injected_random(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.scheduler.random = lambda: 1.0  # +10 %
    h.scheduler.start()
    h.relay.script["a@dst.test"] = [DEFER]
    envelope = h.queue("a@dst.test")
    h.advance()
    assert envelope.recipients[0].next_attempt == pytest.approx(66.0)


def test_permanent_failure_bounces_once_and_others_continue(h: Harness) -> None:
    h.relay.script["bad@dst.test"] = [FAIL]
    h.relay.script["slow@other.test"] = [DEFER, DeliveryResult.delivered()]
    envelope = h.queue("bad@dst.test", "good@dst.test", "slow@other.test")
    h.advance()
    assert h.bouncer.bounces == [(envelope.id, ["bad@dst.test"], [FAIL.reply])]
    stored = {r.address: r for r in h.stored(envelope).recipients}
    assert stored["bad@dst.test"].state is RecipientState.FAILED
    assert stored["good@dst.test"].state is RecipientState.DELIVERED
    assert stored["slow@other.test"].state is RecipientState.DEFERRED
    h.advance_to(60)
    assert h.relay.calls[-1].addresses == ["slow@other.test"]  # only what is pending
    assert h.on_disk() == []
    assert len(h.bouncer.bounces) == 1
    assert [e.kind for e in h.events] == ["bounced", "delivered", "deferred", "delivered"]


def test_failures_of_one_attempt_share_one_bounce(h: Harness) -> None:
    h.relay.script["x@dst.test"] = [FAIL]
    h.relay.script["y@other.test"] = [FAIL]
    envelope = h.queue("x@dst.test", "y@other.test")
    h.advance()
    assert h.bouncer.bounces == [(envelope.id, ["x@dst.test", "y@other.test"],
                                  [FAIL.reply, FAIL.reply])]


def test_no_bounce_for_the_null_sender(h: Harness) -> None:
    h.relay.script["bad@dst.test"] = [FAIL]
    envelope = h.queue("bad@dst.test", sender="")
    h.advance()
    assert h.bouncer.bounces == []
    assert envelope.recipients[0].state is RecipientState.FAILED
    assert h.on_disk() == []
    assert [e.kind for e in h.events] == ["bounced"]


def test_a_failing_bouncer_does_not_stop_the_queue(h: Harness) -> None:
    calls: list[str] = []

    def broken(envelope: Envelope, failed: list[Recipient]) -> Deferred[object]:
        calls.append(envelope.id)
        d: Deferred[object] = Deferred()
        d.errback(OSError(28, "No space left on device"))
        return d

    h.scheduler.bouncer = broken
    h.relay.script["bad@dst.test"] = [FAIL]
    envelope = h.queue("bad@dst.test")
    h.advance()
    assert calls == [envelope.id]
    assert h.on_disk() == []
    h.queue("next@dst.test")
    h.advance()
    assert h.relay.calls[-1].addresses == ["next@dst.test"]


def test_expiry_past_max_age_fails_with_4_4_7_and_bounces(tmp_path: Path) -> None:
    h = Harness(tmp_path, max_age=500.0)
    h.scheduler.start()
    h.relay.script["a@dst.test"] = [DEFER]
    envelope = h.queue("a@dst.test")
    h.advance()
    h.advance_to(60)
    h.advance_to(360)
    # the next step (900) would pass max_age: the last attempt is at expiry itself
    assert envelope.recipients[0].next_attempt == 500.0
    h.advance_to(499)
    assert len(h.relay.calls) == 3
    h.advance_to(500)
    assert h.relay.times_for("a@dst.test") == [0.0, 60.0, 360.0, 500.0]
    rcpt = envelope.recipients[0]
    assert rcpt.state is RecipientState.FAILED
    assert rcpt.last_error is not None and rcpt.last_error.startswith("4.4.7")
    assert DEFER.reply in rcpt.last_error
    assert h.bouncer.bounces == [(envelope.id, ["a@dst.test"], [rcpt.last_error])]
    assert h.events[-1].kind == "expired"
    assert h.on_disk() == []
    h.advance_to(100_000)
    assert len(h.relay.calls) == 4


def test_a_message_recovered_past_max_age_is_tried_once_then_expires(tmp_path: Path) -> None:
    h = Harness(tmp_path, max_age=500.0)
    h.advance_to(10_000)
    h.relay.script["a@dst.test"] = [DEFER]
    envelope = h.queue("a@dst.test", received=0.0, enqueue=False)
    h.scheduler.start(h.spool.recover())
    h.advance()
    assert len(h.relay.calls) == 1
    assert h.scheduler.messages == {}
    assert h.bouncer.bounces[0][0] == envelope.id


def test_restart_waits_for_next_attempt(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    deferred = recipient("a@dst.test", state=RecipientState.DEFERRED, attempts=2,
                         next_attempt=1000.0, last_error=DEFER.reply)
    fresh = recipient("b@other.test")
    envelope = h.queue(deferred, fresh, enqueue=False)
    h.scheduler.start(h.spool.recover())
    h.advance()
    [first] = h.relay.calls
    assert first.addresses == ["b@other.test"]  # the queued one at once
    h.advance_to(999)
    assert len(h.relay.calls) == 1
    h.advance_to(1000)
    assert h.relay.calls[-1].addresses == ["a@dst.test"]
    assert h.relay.calls[-1].time == 1000.0
    assert h.on_disk() == []
    assert envelope.id not in h.scheduler.messages


def test_restart_after_an_attempt_recorded_on_disk(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.scheduler.start()
    h.relay.script["a@dst.test"] = [DEFER, DeliveryResult.delivered()]
    envelope = h.queue("a@dst.test")
    h.advance()
    h.scheduler.stop()
    # a new process: the same spool, a new scheduler, 30 s later
    h.advance_to(30)
    scheduler = h.new_scheduler()
    scheduler.start(Spool(h.directory, sync_run).recover())
    h.advance()
    assert len(h.relay.calls) == 1
    h.advance_to(60)
    assert h.relay.times_for("a@dst.test") == [0.0, 60.0]
    assert envelope.id not in scheduler.messages
    assert h.on_disk() == []


def test_recipients_grouped_by_destination(h: Harness) -> None:
    envelope = h.queue("a@x.test", "b@y.test", "c@x.test", "d@y.test", "e@z.test",
                       recipient("me@local.test", action="local", maildir="/m/me"),
                       recipient("you@local.test", action="local", maildir="/m/you"))
    h.advance()
    calls = sorted((c.destination, tuple(c.addresses)) for c in h.relay.calls)
    assert calls == [("x.test", ("a@x.test", "c@x.test")),
                     ("y.test", ("b@y.test", "d@y.test")),
                     ("z.test", ("e@z.test",))]
    [local] = h.local.calls
    assert local.addresses == ["me@local.test", "you@local.test"]
    assert all(c.queue_id == envelope.id for c in h.relay.calls + h.local.calls)
    assert h.on_disk() == []


def varying_random() -> Callable[[], float]:
    """A different jitter at each call: recipients stay together only if they share a draw."""
    return itertools.cycle([0.0, 1.0, 0.3, 0.7]).__next__


@pytest.mark.parametrize("deferred", [
    ["r1@y.test", "r2@y.test", "r3@y.test"],  # the whole transaction got 4xx
    ["r1@y.test", "r3@y.test"],               # 451 to some RCPTs, 250 to the other
], ids=["all", "some"])
def test_recipients_deferred_together_are_retried_in_one_transaction(
        tmp_path: Path, deferred: list[str]) -> None:
    h = Harness(tmp_path)
    h.scheduler.random = varying_random()
    h.scheduler.start()
    for address in deferred:
        h.relay.script[address] = [DEFER, DeliveryResult.delivered()]
    envelope = h.queue("r1@y.test", "r2@y.test", "r3@y.test")
    h.advance()
    times = {r.next_attempt for r in envelope.recipients if r.address in deferred}
    assert len(times) == 1, f"one jitter for the message, not one each: {sorted(times)}"
    [when] = times
    assert when == pytest.approx(54.0)
    h.advance_to(when)
    h.advance_to(1000)
    assert [(c.addresses, c.time) for c in h.relay.calls] == [
        (["r1@y.test", "r2@y.test", "r3@y.test"], 0.0), (deferred, when)]
    assert h.on_disk() == []


def test_recipients_tried_together_keep_one_retry_time_whatever_their_attempts(
        h: Harness) -> None:
    """The most tried recipient sets the step for all (else they would part for good)."""
    h.relay.script["a@x.test"] = [DEFER]
    h.relay.script["b@x.test"] = [DEFER]
    envelope = h.queue(recipient("a@x.test", state=RecipientState.DEFERRED, attempts=2,
                                 next_attempt=0.0, last_error=DEFER.reply), "b@x.test")
    h.advance()
    assert [(r.attempts, r.next_attempt) for r in envelope.recipients] == [(3, 900.0),
                                                                           (1, 900.0)]
    h.advance_to(900)
    assert [(c.addresses, c.time) for c in h.relay.calls] == [
        (["a@x.test", "b@x.test"], 0.0), (["a@x.test", "b@x.test"], 900.0)]


def test_a_deliverer_that_errbacks_defers_its_group(h: Harness) -> None:
    h.relay.errors["a@x.test"] = RuntimeError("transport bug")
    envelope = h.queue("a@x.test", "b@x.test", "c@y.test")
    h.advance()
    states = {r.address: r.state for r in envelope.recipients}
    assert states == {"a@x.test": RecipientState.DEFERRED, "b@x.test": RecipientState.DEFERRED,
                      "c@y.test": RecipientState.DELIVERED}
    assert envelope.recipients[0].last_error is not None
    assert envelope.recipients[0].last_error.startswith("451 4.3.0")
    assert envelope.recipients[0].next_attempt == 60.0


def test_flush_domain_makes_deferred_recipients_due_now(h: Harness) -> None:
    h.relay.script["a@x.test"] = [DEFER, DeliveryResult.delivered()]
    h.relay.script["b@y.test"] = [DEFER, DeliveryResult.delivered()]
    envelope = h.queue("a@x.test", "b@y.test")
    h.advance()
    h.advance_to(10)
    assert h.scheduler.flush("X.TEST") == 1
    h.advance()
    assert h.relay.calls[-1].addresses == ["a@x.test"]
    assert h.relay.calls[-1].time == 10.0
    assert envelope.recipients[1].state is RecipientState.DEFERRED
    assert h.scheduler.flush("nothing.test") == 0
    h.advance_to(59)
    assert len(h.relay.calls) == 3
    h.advance_to(60)
    assert h.relay.calls[-1].addresses == ["b@y.test"]
    assert h.on_disk() == []


def test_flush_everything(h: Harness) -> None:
    h.relay.script["a@x.test"] = [DEFER, DeliveryResult.delivered()]
    h.relay.script["b@y.test"] = [DEFER, DeliveryResult.delivered()]
    h.queue("a@x.test")
    h.queue("b@y.test")
    h.advance()
    h.advance_to(5)
    assert h.scheduler.flush() == 2
    h.advance()
    assert [c.time for c in h.relay.calls] == [0.0, 0.0, 5.0, 5.0]
    assert h.on_disk() == []


def test_flush_of_a_held_message_does_nothing(h: Harness) -> None:
    h.queue("a@x.test", held=True)
    h.advance(10)
    h.scheduler.flush()
    h.advance(10)
    assert h.relay.calls == []


def test_stop_waits_for_attempts_in_flight(tmp_path: Path) -> None:
    h = Harness(tmp_path, hold=True)
    h.scheduler.start()
    envelope = h.queue("a@x.test")
    h.advance()
    [call] = h.relay.in_flight
    stopped = h.scheduler.stop()
    fired: list[object] = []
    stopped.addBoth(fired.append)
    assert fired == []
    later = h.queue("later@x.test")  # after stop: kept on disk, not attempted
    call.finish()
    assert len(fired) == 1
    assert envelope.id not in h.scheduler.messages
    assert envelope.id + ".q" not in h.on_disk()
    h.advance(1000)
    assert len(h.relay.calls) == 1
    assert h.on_disk() == [f"{later.id}.q"]  # the later message stays queued for the next start


@pytest.mark.parametrize("inline", [False, True])
def test_stop_starts_no_delivery_still_waiting_for_a_slot(tmp_path: Path, inline: bool) -> None:
    h = Harness(tmp_path, hold=True, concurrency=1, inline=inline)
    h.scheduler.start()
    h.queue("a@x.test")
    waiting = h.queue("b@y.test")
    retried = h.queue(recipient("c@z.test", state=RecipientState.DEFERRED, attempts=2,
                                next_attempt=0.0, last_error=DEFER.reply))
    h.advance()
    [call] = h.relay.in_flight
    stopped = h.scheduler.stop()
    fired: list[object] = []
    stopped.addBoth(fired.append)
    call.finish()
    assert len(h.relay.calls) == 1  # the waiting ones were not started
    assert len(fired) == 1
    assert h.events[-1].kind == "delivered" and len(h.events) == 1
    # on disk as they were: no attempt counted, picked up again at the next start
    [b] = h.stored(waiting).recipients
    assert (b.state, b.attempts, b.last_error) == (RecipientState.QUEUED, 0, None)
    [c] = h.stored(retried).recipients
    assert (c.state, c.attempts, c.last_error) == (RecipientState.DEFERRED, 2, DEFER.reply)
    assert slots_all_free(h)  # the unstarted groups gave back what they held
    scheduler = h.new_scheduler()
    h.relay.hold = False
    scheduler.start(Spool(h.directory, sync_run).recover())
    h.advance()
    assert sorted(a for c in h.relay.calls[1:] for a in c.addresses) == ["b@y.test",
                                                                        "c@z.test"]
    assert h.on_disk() == []


def test_stop_with_nothing_in_flight_fires_at_once(h: Harness) -> None:
    h.relay.script["a@x.test"] = [DEFER]
    h.queue("a@x.test")
    h.advance()
    fired: list[object] = []
    h.scheduler.stop().addBoth(fired.append)
    assert len(fired) == 1
    assert h.clock.getDelayedCalls() == []


def test_concurrency_limit(tmp_path: Path) -> None:
    h = Harness(tmp_path, hold=True, concurrency=2, per_destination=10)
    h.scheduler.start()
    for i in range(5):
        h.queue(f"u@d{i}.test")
    h.advance()
    assert len(h.relay.in_flight) == 2
    h.relay.in_flight[0].finish()
    assert len(h.relay.in_flight) == 2
    assert len(h.relay.calls) == 3
    while h.relay.in_flight:
        assert len(h.relay.in_flight) <= 2
        h.relay.in_flight[0].finish()
    assert len(h.relay.calls) == 5
    assert h.on_disk() == []


def test_per_destination_limit(tmp_path: Path) -> None:
    h = Harness(tmp_path, hold=True, concurrency=10, per_destination=2)
    h.scheduler.start()
    for i in range(4):
        h.queue(f"u{i}@busy.test")
    h.queue("v@quiet.test")
    h.advance()
    destinations = sorted(c.destination for c in h.relay.in_flight)
    assert destinations == ["busy.test", "busy.test", "quiet.test"]  # quiet is not starved
    h.relay.in_flight[0].finish()
    assert sorted(c.destination for c in h.relay.in_flight) == destinations
    while h.relay.in_flight:
        assert sum(c.destination == "busy.test" for c in h.relay.in_flight) <= 2
        h.relay.in_flight[0].finish()
    assert len(h.relay.calls) == 5
    assert h.on_disk() == []


def test_limits_count_local_and_relay_together(tmp_path: Path) -> None:
    h = Harness(tmp_path, hold=True, concurrency=1)
    h.scheduler.start()
    h.queue(recipient("me@local.test", action="local", maildir="/m/me"))
    h.queue("u@x.test")
    h.advance()
    assert len(h.local.in_flight) + len(h.relay.in_flight) == 1
    (h.local.in_flight or h.relay.in_flight)[0].finish()
    assert len(h.local.in_flight) + len(h.relay.in_flight) == 1
    (h.local.in_flight or h.relay.in_flight)[0].finish()
    assert h.on_disk() == []


def test_message_made_due_while_in_flight_is_attempted_after(tmp_path: Path) -> None:
    h = Harness(tmp_path, hold=True)
    h.scheduler.start()
    later = recipient("b@y.test", state=RecipientState.DEFERRED, attempts=1,
                      next_attempt=50_000.0)
    envelope = h.queue("a@x.test", later)
    h.advance()
    [call] = h.relay.in_flight
    assert call.addresses == ["a@x.test"]
    h.scheduler.flush()  # b is due now, but the message has an attempt in flight
    h.advance()
    assert len(h.relay.calls) == 1  # never two attempts of one message at once
    call.finish()
    h.advance()
    assert [c.addresses for c in h.relay.calls] == [["a@x.test"], ["b@y.test"]]
    h.relay.in_flight[0].finish()
    assert h.on_disk() == []
    assert envelope.id not in h.scheduler.messages


def test_message_enqueued_again_while_in_flight_is_attempted_after(tmp_path: Path) -> None:
    h = Harness(tmp_path, hold=True)
    h.scheduler.start()
    h.relay.script["a@x.test"] = [DEFER, DeliveryResult.delivered()]
    envelope = h.queue("a@x.test")
    h.advance()
    [call] = h.relay.in_flight
    h.scheduler.enqueue(envelope)
    h.advance()
    assert len(h.relay.calls) == 1
    call.finish()  # deferred: next attempt per the schedule, not before
    h.advance()
    assert len(h.relay.calls) == 1
    h.advance_to(60)
    assert len(h.relay.calls) == 2
    h.relay.in_flight[0].finish()
    assert h.on_disk() == []


def test_recipients_in_flight_are_not_offered_twice(tmp_path: Path) -> None:
    h = Harness(tmp_path, hold=True)
    h.scheduler.start()
    envelope = h.queue("a@x.test", "b@y.test")
    h.advance()
    assert sorted(a for c in h.relay.in_flight for a in c.addresses) == ["a@x.test",
                                                                      "b@y.test"]
    assert all(r.state is RecipientState.DELIVERING for r in envelope.recipients)
    # the envelope on disk never says "delivering"
    assert {r.state for r in h.stored(envelope).recipients} == {RecipientState.QUEUED}
    h.relay.in_flight[0].finish()
    h.advance(1)
    assert len(h.relay.calls) == 2
    h.relay.in_flight[0].finish()
    assert h.on_disk() == []


def test_held_message_is_not_attempted(h: Harness) -> None:
    envelope = h.queue("a@x.test", held=True)
    h.advance(100_000)
    assert h.relay.calls == []
    assert h.on_disk() == [f"{envelope.id}.q"]


def test_events_carry_the_reply_and_delay(h: Harness) -> None:
    h.relay.script["a@x.test"] = [DEFER, DeliveryResult.delivered("250 2.0.0 Ok: 42")]
    envelope = h.queue("a@x.test")
    h.advance()
    h.advance_to(60)
    deferred, delivered = h.events
    assert (deferred.kind, deferred.reply, deferred.delay) == ("deferred", DEFER.reply, 0.0)
    assert (delivered.kind, delivered.reply, delivered.delay) == ("delivered",
                                                                  "250 2.0.0 Ok: 42", 60.0)
    assert delivered.envelope is envelope


def test_a_failed_save_keeps_the_outcome_in_memory(h: Harness) -> None:
    h.relay.script["a@x.test"] = [DEFER, DeliveryResult.delivered()]
    envelope = h.queue("a@x.test")
    real_save = h.spool.save

    def failing_save(env: Envelope) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        d.errback(OSError(28, "No space left on device"))
        return d

    h.spool.save = failing_save  # type: ignore[method-assign]
    h.advance()
    h.spool.save = real_save  # type: ignore[method-assign]
    assert envelope.recipients[0].state is RecipientState.DEFERRED
    h.advance_to(60)
    assert h.relay.times_for("a@x.test") == [0.0, 60.0]
    assert envelope.id not in h.scheduler.messages
    assert h.on_disk() == []


def test_flushes_leave_no_idle_attempts_behind(h: Harness) -> None:
    # Every flush (ETRN) re-queues the message; the entries it leaves behind
    # must not turn into attempts with nothing due (each would rewrite the
    # envelope with an fsync) nor pile up.
    saves: list[float] = []
    real_save = h.spool.save

    def counting_save(env: Envelope) -> Deferred[None]:
        saves.append(h.clock.seconds())
        return real_save(env)

    h.spool.save = counting_save  # type: ignore[method-assign]
    h.relay.script["a@x.test"] = [DEFER]
    h.queue("a@x.test")
    h.advance()
    for _ in range(5):
        h.advance(10)
        h.scheduler.flush()
        h.advance()
    for when in range(0, 20_000, 50):
        h.advance_to(when)
    attempts = h.relay.times_for("a@x.test")
    assert saves == attempts
    assert len(attempts) == len(set(attempts))
    assert len(h.clock.getDelayedCalls()) == 1


def test_the_cached_copy_lasts_until_the_first_attempt_ends(h: Harness) -> None:
    """Kept for the attempt made at once, dropped when the message is deferred (its
    next attempt is a while away) or removed once delivered."""
    h.relay.script["a@dst.test"] = [DEFER]
    deferred = h.queue("a@dst.test")
    delivered = h.queue("b@dst.test")
    assert h.spool.cache.get(deferred.id) is not None
    assert h.spool.cache.get(delivered.id) is not None
    h.advance()
    assert [e.kind for e in h.events] == ["deferred", "delivered"]
    assert h.spool.cache.get(deferred.id) is None
    assert h.spool.cache.get(delivered.id) is None
    assert h.spool.cache.size == 0
