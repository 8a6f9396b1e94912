"""A big queue costs bounded work: attempts in flight, groups per destination and
messages per due run are capped; mail behind a dead destination is parked
without an attempt. Fake clock, the harness of test_scheduler."""

from __future__ import annotations

from pathlib import Path

import pytest

from relaygw import scheduler as scheduler_module
from relaygw.envelope import Recipient, RecipientState
from relaygw.interfaces import DeliveryResult
from relaygw.scheduler import BACKLOG_PER_SLOT, DUE_BATCH
from test_scheduler import Harness
from test_scheduler_backoff import DOWN, SUSPENDED


def states(h: Harness) -> list[RecipientState]:
    return [r.state for e in h.scheduler.messages.values() for r in e.recipients]


def one_reactor_turn(h: Harness) -> None:
    """Run only the calls due now that exist already (Clock.advance would also run
    the ones they schedule for now)."""
    due = [call for call in h.clock.getDelayedCalls() if call.getTime() <= h.clock.seconds()]
    for call in due:
        h.clock.calls.remove(call)
        call.func(*call.args, **call.kw)


def test_attempts_in_flight_never_exceed_the_window(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scheduler_module, "ATTEMPT_WINDOW", 5)
    h = Harness(tmp_path, hold=True)
    h.scheduler.start()
    for i in range(12):  # twelve destinations: no per-destination limit applies
        h.queue(f"a@d{i}.test")
    h.advance()
    assert h.scheduler.attempts_in_flight == 5
    assert len(h.relay.in_flight) == 5
    h.relay.in_flight[0].finish()
    h.advance()
    assert h.scheduler.attempts_in_flight == 5  # the end of one lets the next go
    while h.relay.in_flight:
        h.relay.in_flight[0].finish()
        h.advance()
    assert len(h.relay.calls) == 12
    assert h.on_disk() == []


def test_one_destinations_backlog_waits_aside_as_ids(tmp_path: Path) -> None:
    h = Harness(tmp_path, hold=True, per_destination=2)
    h.scheduler.start()
    for i in range(100):
        h.queue(f"u{i}@busy.test")
    other = h.queue("a@quiet.test")
    h.advance()
    limit = 2 + BACKLOG_PER_SLOT * 2  # two in the slots, eight waiting for them
    assert h.scheduler.attempts_in_flight == limit + 1  # not 101: the rest are ids
    assert h.scheduler.backlog("busy.test") == 100 - 2  # two handed to the transport
    assert [c.queue_id for c in h.relay.in_flight].count(other.id) == 1  # not stuck behind
    while h.relay.in_flight:
        h.relay.in_flight[0].finish()
        h.advance()
        assert h.scheduler.attempts_in_flight <= limit + 1
    assert len(h.relay.calls) == 101
    assert h.on_disk() == []


def test_mail_for_a_dead_destination_is_parked_without_an_attempt(tmp_path: Path) -> None:
    h = Harness(tmp_path, hold=True)
    h.scheduler.start()
    h.relay.script["first@down.test"] = [DOWN]
    h.queue("first@down.test")
    h.advance()
    h.relay.in_flight[0].finish()
    assert h.scheduler.dead_until("down.test") == 60.0
    count = DUE_BATCH + 100
    for i in range(count):
        h.queue(f"u{i}@down.test")
    one_reactor_turn(h)
    assert h.scheduler.attempts_in_flight == 0  # parked on the spot: no coroutine
    parked = states(h).count(RecipientState.DEFERRED)
    assert parked == 1 + DUE_BATCH  # one due run looks at DUE_BATCH, then yields
    h.advance()
    assert states(h).count(RecipientState.DEFERRED) == 1 + count
    assert len(h.relay.calls) == 1
    assert {r.next_attempt for e in h.scheduler.messages.values()
            for r in e.recipients} == {60.0}
    assert [e.reply for e in h.events].count(SUSPENDED) == count
    # parked, not attempted: no attempt counted and nothing written
    assert all(r.attempts == 0 for e in h.scheduler.messages.values() for r in e.recipients
               if e.recipients[0].address != "first@down.test")
    assert len([n for n in h.on_disk() if n.endswith(".env")]) == 1


def test_mail_waiting_for_a_probe_goes_with_its_verdict(tmp_path: Path) -> None:
    h = Harness(tmp_path, hold=True)
    h.scheduler.start()
    h.relay.script["first@back.test"] = [DOWN, DeliveryResult.delivered(remote="mx")]
    h.queue("first@back.test")
    h.advance()
    h.relay.in_flight[0].finish()
    h.advance_to(60)  # the dead time is over: the first message probes
    [probe] = h.relay.in_flight
    for i in range(30):
        h.queue(f"u{i}@back.test")
    h.advance()
    assert h.scheduler.attempts_in_flight == 1  # the others wait as ids
    assert h.scheduler.backlog("back.test") == 30
    probe.finish()  # delivered: the destination is back
    h.advance()
    assert h.scheduler.backlog("back.test") == 30 - len(h.relay.in_flight)
    while h.relay.in_flight:
        h.relay.in_flight[0].finish()
        h.advance()
    assert len(h.relay.calls) == 32
    assert h.on_disk() == []


def backlog_of_twenty(tmp_path: Path) -> tuple[Harness, list[str]]:
    """Twenty messages for one destination with one slot: most wait aside, in order."""
    h = Harness(tmp_path, hold=True, per_destination=1, max_age=3600.0)
    h.scheduler.start()
    ids = [h.queue(f"u{i}@busy.test").id for i in range(20)]
    h.advance()
    return h, ids


def finish_all(h: Harness) -> None:
    while h.relay.in_flight:
        h.relay.in_flight[0].finish()
        h.advance()


@pytest.mark.parametrize("operator", ["hold", "delete"])
def test_mail_held_or_deleted_while_waiting_aside_strands_nothing(
        tmp_path: Path, operator: str) -> None:
    h, ids = backlog_of_twenty(tmp_path)
    waiting = [i for i in ids if i not in {c.queue_id for c in h.relay.calls}]
    assert h.scheduler.backlog("busy.test") == 19
    for queue_id in waiting[:-1]:  # all but the last one that waits aside
        getattr(h.scheduler, operator)(queue_id)
    h.advance()
    finish_all(h)
    attempted = [c.queue_id for c in h.relay.calls]
    assert waiting[-1] in attempted
    assert not set(waiting[:-1]) & set(attempted)


def test_etrn_while_mail_waits_aside_neither_duplicates_nor_strands(tmp_path: Path) -> None:
    h, ids = backlog_of_twenty(tmp_path)
    for _ in range(3):  # a branch link's ETRN, repeated while the backlog lasts
        h.scheduler.flush(domain="busy.test")
        h.advance()
    assert h.scheduler.backlog("busy.test") == 19  # not 19 + 3 x 19
    late = h.queue("late@busy.test")
    h.advance()
    finish_all(h)
    attempted = [c.queue_id for c in h.relay.calls]
    assert sorted(attempted) == sorted([*ids, late.id])  # each once
    assert h.on_disk() == []


def test_mail_waiting_aside_goes_before_newcomers(tmp_path: Path) -> None:
    h, ids = backlog_of_twenty(tmp_path)
    newcomers = []
    for step in range(40):  # steady inflow: one in, one out
        h.relay.in_flight[0].finish()
        newcomers.append(h.queue(f"new{step}@busy.test").id)
        h.advance(1.0)
    order = [c.queue_id for c in h.relay.calls]
    assert order[:20] == ids  # first come, first served
    assert order[20:] == newcomers[:len(order) - 20]


def test_an_unknown_transport_does_not_stop_the_due_run(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.scheduler.start()
    bad = h.queue(Recipient("x@y.test", "x@y.test", "bogus"), enqueue=False)
    good = h.queue("a@dst.test", enqueue=False)
    h.scheduler.resume([bad, good])  # as start-up does with what it read back
    h.advance()
    assert [c.queue_id for c in h.relay.calls] == [good.id]
    assert bad.id in h.scheduler.messages  # kept for the operator, never lost
