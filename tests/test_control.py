"""The control channel: relaygwctl's AMP commands against the real Scheduler.

AMP client and server connected in memory (``iosim``), the Scheduler on a
``task.Clock`` with a real Spool in tmp_path and a FakeDeliverer; plus the real
listener's endpoint, as twistd starts it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.protocols import amp
from twisted.test.iosim import IOPump, connectedServerAndClient

from core_fakes import FakeDeliverer, queue_message, recipient, sync_run
from relaygw.config import QueueConfig
from relaygw.control import (
    BadQueueId,
    ControlProtocol,
    Delete,
    Flush,
    Hold,
    ListQueue,
    Release,
    ShowMessage,
    control_service,
)
from relaygw.envelope import Envelope
from relaygw.interfaces import DeliveryResult
from relaygw.scheduler import Event, MessageHeld, Scheduler, UnknownMessage
from relaygw.spool import Spool

DEFER = DeliveryResult.deferred("451 4.4.1 try again later", remote="mx.dst.test")
HOUR = 3600.0


class Control:
    def __init__(self, tmp_path: Path, *, hold: bool = False, concurrency: int = 100) -> None:
        self.clock = Clock()
        self.directory = tmp_path / "spool"
        self.spool = Spool(self.directory, sync_run)
        self.spool.prepare()
        self.relay = FakeDeliverer(self.clock, hold=hold)
        self.events: list[Event] = []
        config = QueueConfig(directory=self.directory, retry_schedule=(HOUR,),
                             max_age=100 * HOUR, concurrency=concurrency)
        self.scheduler = Scheduler(self.spool, {"relay": self.relay}, self.clock, config,
                                   random=lambda: 0.5, on_event=self.events.append)
        self.scheduler.start()
        self.client: amp.AMP
        self.pump: IOPump
        self.client, _, self.pump = connectedServerAndClient(
            lambda: ControlProtocol(self.scheduler), amp.AMP)

    def queue(self, *addresses: str) -> Envelope:
        envelope = queue_message(self.spool, [recipient(a) for a in addresses],
                                 received=self.clock.seconds())
        self.scheduler.enqueue(envelope)
        return envelope

    def call(self, command: type[amp.Command], **arguments: Any) -> Any:
        results: list[Any] = []
        self.client.callRemote(command, **arguments).addBoth(results.append)
        self.pump.flush()
        assert results, "no answer"
        return results[0]

    def on_disk(self) -> list[str]:
        return sorted(p.name for p in self.directory.iterdir())


@pytest.fixture
def c(tmp_path: Path) -> Control:
    return Control(tmp_path)


def deferred(c: Control) -> Envelope:
    c.relay.script["a@dst.test"] = [DEFER]
    envelope = c.queue("a@dst.test")
    c.clock.advance(0)
    assert len(c.relay.calls) == 1
    return envelope


def test_hold_stops_attempts_and_release_resumes_them_at_once(c: Control) -> None:
    envelope = deferred(c)
    assert c.call(Hold, queue_id=envelope.id) == {}
    assert c.spool.load(envelope.id).held is True
    assert c.call(Flush) == {"count": 0}  # a held message is not flushed
    c.clock.advance(10 * HOUR)
    assert len(c.relay.calls) == 1

    assert c.call(Release, queue_id=envelope.id) == {}
    assert c.spool.load(envelope.id).held is False
    c.clock.advance(0)
    assert [call.time for call in c.relay.calls] == [0.0, 10 * HOUR]


def test_flush_makes_a_deferred_recipient_due_now(c: Control) -> None:
    envelope = deferred(c)
    c.clock.advance(60)
    assert c.call(Flush, queue_id=envelope.id) == {"count": 1}
    c.clock.advance(0)
    assert [call.time for call in c.relay.calls] == [0.0, 60.0]
    assert c.call(Flush) == {"count": 1}
    c.clock.advance(0)
    assert len(c.relay.calls) == 3


def test_delete_removes_the_message_and_its_files(c: Control) -> None:
    envelope = deferred(c)
    assert c.call(Delete, queue_id=envelope.id) == {"in_flight": False}
    assert c.on_disk() == []
    assert c.scheduler.messages == {}
    c.clock.advance(10 * HOUR)
    assert len(c.relay.calls) == 1


def test_delete_during_an_attempt_waits_for_it_and_ignores_its_outcome(tmp_path: Path) -> None:
    c = Control(tmp_path, hold=True)
    envelope = c.queue("a@dst.test")
    c.clock.advance(0)
    [call] = c.relay.in_flight
    assert c.call(Delete, queue_id=envelope.id) == {"in_flight": True}
    assert c.on_disk() == [f"{envelope.id}.q"]  # never under a delivery
    call.finish()
    assert c.on_disk() == []
    assert c.events == []  # the outcome is not recorded
    assert c.scheduler.messages == {}


def test_hold_during_an_attempt_lets_it_finish_then_starts_no_more(tmp_path: Path) -> None:
    c = Control(tmp_path, hold=True)
    c.relay.script["a@dst.test"] = [DEFER]
    envelope = c.queue("a@dst.test")
    c.clock.advance(0)
    [call] = c.relay.in_flight
    assert c.call(Hold, queue_id=envelope.id) == {}
    call.finish()
    assert [e.kind for e in c.events] == ["deferred"]
    stored = c.spool.load(envelope.id)
    assert stored.held is True
    assert stored.recipients[0].attempts == 1
    c.clock.advance(10 * HOUR)
    assert len(c.relay.calls) == 1
    assert c.call(Release, queue_id=envelope.id) == {}
    c.clock.advance(0)
    assert len(c.relay.calls) == 2


def test_release_during_an_attempt_waits_for_it(tmp_path: Path) -> None:
    c = Control(tmp_path, hold=True)
    c.relay.script["a@dst.test"] = [DEFER]
    envelope = c.queue("a@dst.test")
    c.clock.advance(0)
    [call] = c.relay.in_flight
    c.call(Hold, queue_id=envelope.id)
    c.call(Release, queue_id=envelope.id)
    c.clock.advance(0)
    assert len(c.relay.calls) == 1  # not twice at once
    call.finish()
    assert c.spool.load(envelope.id).held is False
    c.clock.advance(HOUR)
    assert len(c.relay.calls) == 2


@pytest.mark.parametrize("command", [Hold, Release, Delete, Flush])
def test_errors_are_one_line(c: Control, command: type[amp.Command]) -> None:
    unknown = "0" * 19
    failure = c.call(command, queue_id=unknown)
    assert failure.check(UnknownMessage)
    assert str(failure.value) == f"no such message in the queue: {unknown}"
    failure = c.call(command, queue_id="../../etc/passwd")
    assert failure.check(BadQueueId)
    assert str(failure.value) == "not a queue id: ../../etc/passwd"


def test_flush_of_a_held_message_is_refused(c: Control) -> None:
    envelope = deferred(c)
    c.call(Hold, queue_id=envelope.id)
    failure = c.call(Flush, queue_id=envelope.id)
    assert failure.check(MessageHeld)
    assert str(failure.value).startswith(f"message is held: {envelope.id}")


def test_the_listener_starts_with_the_gateway_not_before(tmp_path: Path) -> None:
    """twistd runs every privilegedStartService first: the spool does not exist yet."""
    c = Control(tmp_path)
    reactor = MemoryReactorClock()
    service = control_service(c.scheduler, Path("var/spool"), reactor)
    service.privilegedStartService()
    assert reactor.unixServers == []
    service.startService()
    [(address, factory, _, mode, lockfile)] = reactor.unixServers
    assert (address, mode, lockfile) == ("var/spool/control.sock", 0o600, True)
    assert isinstance(factory.buildProtocol(None), ControlProtocol)
    service.stopService()


def test_hold_keeps_a_group_waiting_for_slots_from_starting(tmp_path: Path) -> None:
    c = Control(tmp_path, hold=True, concurrency=1)  # one delivery at a time
    first = c.queue("a@one.test")
    second = c.queue("b@two.test")
    c.clock.advance(0)
    [call] = c.relay.in_flight
    assert call.queue_id == first.id  # the second waits for the slot
    assert c.call(Hold, queue_id=second.id) == {}
    call.finish()
    assert len(c.relay.calls) == 1  # the waiting group was not started
    stored = c.spool.load(second.id)
    assert (stored.held, stored.recipients[0].attempts) == (True, 0)
    assert c.call(Release, queue_id=second.id) == {}
    c.clock.advance(0)
    assert [call.queue_id for call in c.relay.calls] == [first.id, second.id]


def test_list_queue_is_the_scheduler_in_memory_with_deliveries_in_flight(tmp_path: Path
                                                                         ) -> None:
    c = Control(tmp_path, hold=True)
    c.relay.script["b@dst.test"] = [DEFER]
    envelope = c.queue("a@dst.test")
    c.clock.advance(0)
    [call] = c.relay.in_flight
    [entry] = json.loads(c.call(ListQueue)["json"])
    assert entry == {
        "id": envelope.id, "sender": envelope.sender, "received": "1970-01-01T00:00:00Z",
        "size": envelope.size, "held": False,
        "recipients": [{"address": "a@dst.test", "state": "delivering", "attempts": 0,
                        "next_attempt": None, "last_error": None}],
    }
    assert c.spool.load(envelope.id).recipients[0].state == "queued"  # never on disk
    shown = json.loads(c.call(ShowMessage, queue_id=envelope.id)["json"])
    assert shown["recipients"][0]["state"] == "delivering"
    assert shown["id"] == envelope.id
    call.finish()
    assert json.loads(c.call(ListQueue)["json"]) == []
    failure = c.call(ShowMessage, queue_id=envelope.id)
    assert failure.check(UnknownMessage)
    assert c.call(ShowMessage, queue_id="nope").check(BadQueueId)


def test_list_queue_answers_beyond_one_amp_value(c: Control) -> None:
    """AMP caps a value at 64 KiB: the listing of a big queue is split over keys."""
    for i in range(40):
        c.queue(*(f"u{i}-{j}@dst.test" for j in range(20)))
    entries = json.loads(c.call(ListQueue)["json"])
    assert len(entries) == 40
    assert sum(len(e["recipients"]) for e in entries) == 800
    assert len(json.dumps(entries)) > 65535
