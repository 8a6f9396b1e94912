"""Dead destinations on a fake clock: one transport call per back-off step, not per message.

The harness of test_scheduler (a real Spool, FakeDeliverers, ``random=0.5`` so
no jitter): SCHEDULE is (60, 300, 900), so a dead destination's back-off goes
60, 120, 240, 480, 900, 900...
"""

from __future__ import annotations

from pathlib import Path

import pytest

from core_fakes import FakeDeliverer
from relaygw.envelope import RecipientState
from relaygw.interfaces import DeliveryResult
from relaygw.retry import JITTER, destination_backoff
from relaygw.scheduler import destination_failed
from test_scheduler import SCHEDULE, Harness, varying_random

DOWN = DeliveryResult.deferred("451 4.4.1 Connection to mx.down.test[192.0.2.9]:25 failed:"
                               " Connection refused", "mx.down.test[192.0.2.9]",
                               destination_failed=True)
RCPT_LATER = DeliveryResult.deferred("452 4.2.2 Mailbox full", "mx.down.test[192.0.2.9]")
OK = DeliveryResult.delivered("250 2.0.0 Ok", "mx.down.test[192.0.2.9]")
SUSPENDED = f"delivery temporarily suspended: {DOWN.reply}"


@pytest.fixture
def h(tmp_path: Path) -> Harness:
    harness = Harness(tmp_path)
    harness.scheduler.start()
    return harness


def down(h: Harness, *addresses: str, then: DeliveryResult | None = None) -> None:
    """Script each address to fail for its whole destination (then ``then``, if given)."""
    for address in addresses:
        h.relay.script[address] = [DOWN] if then is None else [DOWN, then]


def twenty(h: Harness, domain: str = "down.test") -> list[str]:
    addresses = [f"u{i}@{domain}" for i in range(20)]
    for address in addresses:
        h.queue(address)
    return addresses


def calls_to(relay: FakeDeliverer, destination: str) -> list[float]:
    return [c.time for c in relay.calls if c.destination == destination]


# --- the pure part ------------------------------------------------------------------


@pytest.mark.parametrize(("failures", "seconds"), [
    (0, 60.0), (1, 60.0), (2, 120.0), (3, 240.0), (4, 480.0), (5, 900.0), (50, 900.0),
    (10_000, 900.0)])
def test_backoff_starts_at_the_first_step_and_doubles_up_to_the_last(
        failures: int, seconds: float) -> None:
    assert destination_backoff(SCHEDULE, failures, lambda: 0.5) == seconds


def test_backoff_is_jittered_by_the_injected_random() -> None:
    assert destination_backoff(SCHEDULE, 2, lambda: 0.0) == pytest.approx(120 * (1 - JITTER))
    assert destination_backoff(SCHEDULE, 2, lambda: 1.0) == pytest.approx(120 * (1 + JITTER))


def test_only_an_all_deferred_all_flagged_group_is_a_destination_failure() -> None:
    assert destination_failed([DOWN, DOWN])
    assert not destination_failed([DOWN, RCPT_LATER])
    assert not destination_failed([DOWN, OK])
    assert not destination_failed([])
    assert DOWN == DeliveryResult.deferred(DOWN.reply, DOWN.remote)  # the flag is not in ==


# --- the scheduler ------------------------------------------------------------------


def test_twenty_messages_for_a_dead_destination_make_one_transport_call(h: Harness) -> None:
    addresses = twenty(h)
    down(h, *addresses)
    h.advance()
    assert len(h.relay.calls) == 1
    assert h.scheduler.dead_until("down.test") == 60.0
    recipients = [r for e in h.scheduler.messages.values() for r in e.recipients]
    assert len(recipients) == 20
    assert all(r.state is RecipientState.DEFERRED for r in recipients)
    assert all(r.next_attempt == 60.0 for r in recipients)  # they come back together
    assert all(r.last_error == DOWN.reply for r in recipients)
    # the parked ones were never tried: no attempt counted
    assert sorted(r.attempts for r in recipients) == [0] * 19 + [1]
    assert [e.kind for e in h.events] == ["deferred"] * 20
    assert [e.reply for e in h.events[1:]] == [SUSPENDED] * 19
    stored = [h.stored(e).recipients[0] for e in h.scheduler.messages.values()]
    # Only the message really tried is rewritten on disk; the 19 parked behind the
    # dead destination cost no fsync (after a restart they would just be tried).
    assert sorted((r.state, r.attempts) for r in stored) == (
        [(RecipientState.DEFERRED, 1)] + [(RecipientState.QUEUED, 0)] * 19)


def test_at_the_dead_time_one_probe_and_the_rest_follow_its_verdict(h: Harness) -> None:
    addresses = twenty(h)
    down(h, addresses[0], then=OK)  # the only one tried at 0; then the destination is back
    h.advance()
    h.advance_to(59)
    assert len(h.relay.calls) == 1
    h.advance_to(60)
    assert calls_to(h.relay, "down.test") == [0.0] + [60.0] * 20
    assert h.scheduler.messages == {}
    assert h.on_disk() == []
    assert h.scheduler.dead_until("down.test") is None


def test_a_destination_still_down_costs_one_call_per_growing_backoff(h: Harness) -> None:
    addresses = twenty(h)
    down(h, *addresses)
    h.advance()
    probes = [0.0]
    marks = [60.0]
    for backoff in (120.0, 240.0, 480.0, 900.0, 900.0):
        h.advance_to(marks[-1])
        probes.append(marks[-1])
        marks.append(marks[-1] + backoff)
        assert calls_to(h.relay, "down.test") == probes
        assert h.scheduler.dead_until("down.test") == marks[-1]
    parked = [r for e in h.scheduler.messages.values() for r in e.recipients
              if r.next_attempt == marks[-1]]
    assert len(parked) >= 19  # everyone but the probes, whose own schedule may be later
    # a probe's own retry schedule still applies when it is later than the dead time
    assert all(r.next_attempt is not None and r.next_attempt >= marks[-1]
               for e in h.scheduler.messages.values() for r in e.recipients)


def test_a_success_clears_the_mark_and_new_mail_goes_at_once(h: Harness) -> None:
    h.relay.script["a@down.test"] = [DOWN, OK]
    h.queue("a@down.test")
    h.advance()
    assert h.scheduler.dead_until("down.test") == 60.0
    h.advance_to(60)
    assert h.scheduler.dead_until("down.test") is None
    h.advance_to(61)
    h.queue("b@down.test")
    h.advance()
    assert calls_to(h.relay, "down.test") == [0.0, 60.0, 61.0]


def test_a_reply_about_a_recipient_also_clears_the_mark(h: Harness) -> None:
    h.relay.script["a@down.test"] = [DOWN, RCPT_LATER]
    h.queue("a@down.test")
    h.advance()
    h.advance_to(30)
    h.queue("b@down.test")
    h.advance()
    assert calls_to(h.relay, "down.test") == [0.0]  # b parked until 60
    h.advance_to(60)
    # the probe (a) got a per-recipient 4xx: the destination answers, so b goes too
    assert calls_to(h.relay, "down.test") == [0.0, 60.0, 60.0]
    assert h.scheduler.dead_until("down.test") is None


def test_other_destinations_are_unaffected(h: Harness) -> None:
    down(h, "a@down.test", "b@down.test")
    envelope = h.queue("a@down.test", "x@up.test")
    h.advance()
    h.advance_to(5)
    h.queue("b@down.test")
    h.queue("y@up.test")
    h.advance()
    assert calls_to(h.relay, "down.test") == [0.0]
    assert calls_to(h.relay, "up.test") == [0.0, 5.0]
    assert {r.address: r.state for r in envelope.recipients} == {
        "a@down.test": RecipientState.DEFERRED, "x@up.test": RecipientState.DELIVERED}
    assert h.scheduler.dead_until("up.test") is None


def test_recipients_of_a_dead_destination_are_retried_in_one_transaction(
        tmp_path: Path) -> None:
    """The smarthost down, then up: one call with every RCPT, not one per recipient."""
    h = Harness(tmp_path)
    h.scheduler.random = varying_random()
    h.scheduler.start()
    addresses = ["r1@down.test", "r2@down.test", "r3@down.test"]
    down(h, *addresses, then=OK)
    envelope = h.queue(*addresses)
    h.advance()
    assert h.scheduler.dead_until("down.test") == pytest.approx(54.0)
    times = {r.next_attempt for r in envelope.recipients}
    assert len(times) == 1, f"one retry time for the message, not one each: {sorted(times)}"
    [when] = times  # the retry step's, later than the dead time here
    assert when == pytest.approx(66.0)
    h.advance_to(when)
    h.advance_to(1000)
    assert [(c.addresses, c.time) for c in h.relay.calls] == [(addresses, 0.0),
                                                              (addresses, when)]
    assert h.on_disk() == []


def test_recipients_parked_behind_a_dead_destination_come_back_in_one_transaction(
        tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.scheduler.random = varying_random()
    h.scheduler.start()
    down(h, "probe@down.test", then=OK)
    h.queue("probe@down.test")
    h.advance()
    h.advance_to(5)
    addresses = ["r1@down.test", "r2@down.test", "r3@down.test"]
    envelope = h.queue(*addresses)
    h.advance()
    dead_until = h.scheduler.dead_until("down.test")
    assert dead_until is not None
    assert {r.next_attempt for r in envelope.recipients} == {dead_until}
    h.advance_to(dead_until)
    h.advance_to(1000)
    assert [c.addresses for c in h.relay.calls if c.queue_id == envelope.id] == [addresses]
    assert h.on_disk() == []


def test_a_dead_destination_takes_no_concurrency_slot(tmp_path: Path) -> None:
    h = Harness(tmp_path, hold=True, concurrency=1)
    h.scheduler.start()
    h.relay.script["a@down.test"] = [DOWN]
    h.queue("a@down.test")
    h.advance()
    h.relay.in_flight[0].finish()
    h.queue("x@up.test")
    h.queue("b@down.test")
    h.advance()
    [call] = h.relay.in_flight
    assert call.destination == "up.test"
    # b was parked at once, not queued behind the one slot
    b = [e for e in h.scheduler.messages.values() if e.recipients[0].address == "b@down.test"]
    assert b[0].recipients[0].state is RecipientState.DEFERRED
    assert b[0].recipients[0].next_attempt == 60.0


def test_flush_of_the_domain_clears_the_mark(h: Harness) -> None:
    addresses = twenty(h)
    down(h, addresses[0], then=OK)
    h.advance()
    h.advance_to(10)
    assert h.scheduler.flush("DOWN.test") == 20
    assert h.scheduler.dead_until("down.test") is None
    h.advance()
    assert calls_to(h.relay, "down.test") == [0.0] + [10.0] * 20
    assert h.on_disk() == []


def test_release_clears_the_mark_of_the_message_destinations(h: Harness) -> None:
    """Like flush: the operator saying "due now" is news that the destination may be up."""
    down(h, "a@down.test", then=OK)
    envelope = h.queue("a@down.test")
    h.advance()
    assert h.scheduler.dead_until("down.test") == 60.0
    h.scheduler.hold(envelope.id)
    h.advance_to(10)
    h.scheduler.release(envelope.id)
    assert h.scheduler.dead_until("down.test") is None
    h.advance()
    assert calls_to(h.relay, "down.test") == [0.0, 10.0]
    assert h.on_disk() == []


def test_flush_everything_clears_every_mark(h: Harness) -> None:
    down(h, "a@down.test", "b@other.test")
    h.queue("a@down.test")
    h.queue("b@other.test")
    h.advance()
    assert h.scheduler.dead_until("down.test") == h.scheduler.dead_until("other.test") == 60.0
    h.advance_to(5)
    h.scheduler.flush()
    assert h.scheduler.dead_until("down.test") is None
    assert h.scheduler.dead_until("other.test") is None


def test_concurrent_first_attempts_mark_once_and_the_queued_ones_never_go(
        tmp_path: Path) -> None:
    h = Harness(tmp_path, hold=True, per_destination=10)
    h.scheduler.start()
    addresses = twenty(h)
    down(h, *addresses[:10], then=OK)  # the first ten are tried at once; then it is back
    h.advance()
    # First contact: nothing is known yet, so the per-destination limit bounds it.
    assert len(h.relay.in_flight) == 10
    h.relay.in_flight[0].finish()
    assert h.scheduler.dead_until("down.test") == 60.0
    while h.relay.in_flight:
        h.relay.in_flight[0].finish()
    assert len(h.relay.calls) == 10  # the 10 queued behind the limit never reached it
    assert h.scheduler.dead_until("down.test") == 60.0  # not pushed back by the others
    h.advance_to(60)
    [probe] = h.relay.in_flight  # one probe; the other 19 wait for its verdict
    assert len(h.relay.calls) == 11
    assert h.scheduler.backlog("down.test") == 19  # as ids, not attempts
    probe.finish()  # delivered: the destination is back
    assert h.scheduler.dead_until("down.test") is None
    h.advance()  # the ids let go are due at once: the next due run takes them
    assert len(h.relay.in_flight) == 10
    while h.relay.in_flight:
        h.relay.in_flight[0].finish()
    assert len(h.relay.calls) == 30
    assert h.on_disk() == []


def test_a_probe_that_fails_again_parks_the_ones_waiting_for_it(tmp_path: Path) -> None:
    h = Harness(tmp_path, hold=True)
    h.scheduler.start()
    addresses = twenty(h)
    down(h, *addresses)
    h.advance()
    h.relay.in_flight[0].finish()
    while h.relay.in_flight:
        h.relay.in_flight[0].finish()
    calls = len(h.relay.calls)
    h.advance_to(60)
    [probe] = h.relay.in_flight
    probe.finish()
    h.advance()
    assert len(h.relay.calls) == calls + 1
    assert h.scheduler.dead_until("down.test") == 180.0
    assert h.scheduler.backlog("down.test") == 0
    waiting = [r for e in h.scheduler.messages.values() for r in e.recipients
               if r.state is RecipientState.DEFERRED and r.next_attempt == 180.0]
    assert len(waiting) >= 19


def test_parked_mail_still_expires_on_time(tmp_path: Path) -> None:
    h = Harness(tmp_path, max_age=100.0)
    h.scheduler.start()
    down(h, "a@down.test")
    h.queue("a@down.test")
    h.advance()
    h.advance_to(50)
    late = h.queue("b@down.test", received=-60.0)  # expires at 40: already past
    h.advance()
    assert calls_to(h.relay, "down.test") == [0.0]
    [b] = late.recipients
    assert b.state is RecipientState.FAILED
    assert b.last_error is not None and b.last_error.startswith("4.4.7")
    assert DOWN.reply in b.last_error
    assert h.bouncer.bounces[-1][:2] == (late.id, ["b@down.test"])


def test_backlog_counts_groups_ready_but_not_handed_over(tmp_path: Path) -> None:
    h = Harness(tmp_path, hold=True, per_destination=1)
    h.scheduler.start()
    for i in range(3):
        h.queue(f"u{i}@x.test")
    h.advance()
    assert len(h.relay.in_flight) == 1
    assert h.scheduler.backlog("x.test") == 2
    h.relay.in_flight[0].finish()
    assert h.scheduler.backlog("x.test") == 1
    while h.relay.in_flight:
        h.relay.in_flight[0].finish()
    assert h.scheduler.backlog("x.test") == 0


def test_a_plain_4xx_without_the_flag_never_marks(h: Harness) -> None:
    h.relay.script["a@x.test"] = [DeliveryResult.deferred("451 4.4.1 later")]
    h.queue("a@x.test")
    h.queue("b@x.test")
    h.advance()
    assert h.scheduler.dead_until("x.test") is None
    assert [(c.addresses, c.time) for c in h.relay.calls] == [(["a@x.test"], 0.0),
                                                              (["b@x.test"], 0.0)]
    assert [e.kind for e in h.events] == ["deferred", "delivered"]


def test_a_crashing_transport_neither_marks_nor_clears(h: Harness) -> None:
    h.relay.script["a@down.test"] = [DOWN]
    h.queue("a@down.test")
    h.advance()
    h.relay.errors["a@down.test"] = RuntimeError("transport bug")
    h.advance_to(60)  # a is the probe, and the transport crashes: no verdict
    assert calls_to(h.relay, "down.test") == [0.0, 60.0]
    assert h.scheduler.dead_until("down.test") is None
    h.advance_to(61)
    h.relay.script["b@down.test"] = [DOWN]
    h.queue("b@down.test")
    h.advance()
    # still the second failure in a row: the back-off doubled
    assert calls_to(h.relay, "down.test") == [0.0, 60.0, 61.0]
    assert h.scheduler.dead_until("down.test") == 61.0 + 120.0


@pytest.mark.parametrize("how", ["dead", "stopped"])
def test_hundreds_of_queued_groups_given_up_at_once_do_not_overflow_the_stack(
        tmp_path: Path, how: str) -> None:
    # Each group that gives its slot straight back wakes the next one: with
    # DeferredSemaphore that nests a few frames per group, and 300 is past
    # Python's recursion limit.
    h = Harness(tmp_path, hold=True, per_destination=1)
    h.scheduler.start()
    addresses = [f"u{i}@down.test" for i in range(300)]
    for address in addresses:
        h.queue(address)
    h.relay.script[addresses[0]] = [DOWN]
    h.advance()
    [call] = h.relay.in_flight
    stopped = h.scheduler.stop() if how == "stopped" else None
    call.finish()
    h.advance()
    assert len(h.relay.calls) == 1
    states = [e.recipients[0].state for e in h.scheduler.messages.values()]
    assert len(states) == 300
    if stopped is None:
        assert states.count(RecipientState.DEFERRED) == 300
        assert h.scheduler.backlog("down.test") == 0
    else:
        assert states.count(RecipientState.QUEUED) == 299
        assert stopped.called
