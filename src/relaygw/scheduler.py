"""The queue manager: takes due recipients to their transports and records outcomes.

One timer (``callLater``) is armed for the earliest due entry of a heap, so an
idle queue costs nothing. A message's due recipients are grouped by
transport and destination; each group is one transport call, bounded by a
global and a per-destination semaphore (``Slots``). Outcomes are written to the
spool before anything else happens: delivered recipients are done, transient
failures wait per ``retry_schedule`` (jittered once per attempt, so a message's
deferred recipients come back together, one transaction per next hop),
permanent failures and expiry past ``max_age`` are handed to the bouncer. A
message leaves the spool when no recipient is pending.

Dead destinations (Postfix's "delivery temporarily suspended"): when a
group's attempt fails as a whole (every result DEFERRED with
``destination_failed``: no next hop took the session, or DNS failed
transiently), the destination is marked dead for ``retry.destination_backoff``
(the first retry step, doubling per consecutive failure up to the last step).
While it is dead, groups for it never reach the transport nor take a
concurrency slot: their recipients are parked until the dead time ends, with
the destination's last error, and *no attempt is counted* (``attempts``
counts real tries; the back-off that grows is the destination's own). When
the dead time ends the parked recipients come back together; the first group
to go is the probe and the others wait for its verdict, so a destination that
is still down costs one transport call per back-off step, not one per
message. Any outcome that is not a whole-destination failure (a delivery, a
reply about a recipient) clears the mark; so do ``flush`` (ETRN) and ``release``.

Bounded work for a big queue (100,000 messages after a restart, say): an
attempt in flight costs a coroutine and its Deferreds (kilobytes), a queued
message only its envelope. So the due run never starts more than
``ATTEMPT_WINDOW`` attempts at once, nor more than ``BACKLOG_PER_SLOT`` groups
per slot of one destination: the rest wait as bare ids in a first-come line
per destination (``_blocked``). Each due run first takes from those lines as
far as their destinations have room, and a newcomer for a destination with a
line joins its back, so the oldest mail goes first. A message whose every due
destination is dead is parked on the spot, without an attempt, and a message
for a destination being probed waits as an id for the verdict. One due run
handles at most ``DUE_BATCH`` messages, then lets the reactor serve the
network before it goes on.
"""

from __future__ import annotations

import heapq
import itertools
import random as random_module
from collections import deque
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field, replace

from twisted.internet.defer import Deferred, DeferredList, DeferredLock, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from relaygw import retry
from relaygw.config import QueueConfig
from relaygw.envelope import Envelope, Recipient, RecipientState
from relaygw.interfaces import (
    DeliveryResult,
    IBacklogAware,
    IDeliverer,
    IInlineDeliverer,
    Status,
)
from relaygw.soon import call_soon
from relaygw.spool import Spool

Bouncer = Callable[[Envelope, list[Recipient]], Deferred[object]]

ATTEMPT_WINDOW = 1000  # attempts in flight at most (each holds a coroutine)
BACKLOG_PER_SLOT = 4   # groups started per per-destination slot before ids wait aside
DUE_BATCH = 500        # messages looked at per due run before the reactor gets a turn


@dataclass(slots=True)
class Event:
    """A delivery outcome for the mail log and the metrics."""

    kind: str  # delivered | deferred | bounced | expired
    envelope: Envelope
    recipient: Recipient
    reply: str
    delay: float


class Slots:
    """A DeferredSemaphore whose releases never nest.

    A holder that gives its slot back at once (a group whose destination is
    dead, or any group after stop()) would, with DeferredSemaphore, wake the
    next waiter from inside its own release, and that one the next: hundreds
    of queued groups overflow the stack. Here the outermost release hands
    slots out in a loop. Waiters are served in order; a newcomer does not
    overtake them.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.tokens = limit
        self.waiting: deque[Deferred[None]] = deque()
        self._releasing = False

    def acquire(self) -> Deferred[None]:
        if self.tokens > 0 and not self.waiting:
            self.tokens -= 1
            return succeed(None)
        d: Deferred[None] = Deferred(canceller=self._cancel)
        self.waiting.append(d)
        return d

    def release(self) -> None:
        self.tokens += 1
        self._hand_out()

    def resize(self, limit: int) -> None:
        """A new limit (SIGHUP): more slots are handed out at once; with fewer, the
        holders over the limit finish and their slots are not given out again."""
        self.tokens += limit - self.limit
        self.limit = limit
        self._hand_out()

    def _hand_out(self) -> None:
        if self._releasing:
            return  # the loop below, further up the stack, hands it out
        self._releasing = True
        try:
            while self.waiting and self.tokens > 0:
                self.tokens -= 1
                self.waiting.popleft().callback(None)
        finally:
            self._releasing = False

    def take(self) -> Deferred[None] | None:
        """A slot: None when one was free and is now held (the usual case, with
        no Deferred to make or wait on), else ``acquire()``'s Deferred. The
        caller releases it."""
        if self.tokens > 0 and not self.waiting:
            self.tokens -= 1
            return None
        return self.acquire()

    def release_later(self, clock: IReactorTime) -> None:
        """Give a slot back, its waiters served on the reactor's next turn: for a
        holder closed unfinished by the garbage collector, which must not resume
        other coroutines from inside the collector (at exit the turn never comes)."""
        self.tokens += 1
        call_soon(clock, self._hand_out)

    def _cancel(self, d: Deferred[None]) -> None:
        self.waiting.remove(d)


class UnknownMessage(Exception):
    """An operator command named a queue id the scheduler does not have.

    The argument is the whole one-line message (it crosses the control socket
    as the AMP error's description and is rebuilt from it)."""

    @classmethod
    def about(cls, queue_id: str) -> UnknownMessage:
        return cls(f"no such message in the queue: {queue_id}")


class MessageHeld(Exception):
    """``flush`` of a held message: release it first."""

    @classmethod
    def about(cls, queue_id: str) -> MessageHeld:
        return cls(f"message is held: {queue_id} (release it first)")


class _NotStarted(Exception):
    """A group still waiting for a concurrency slot when the scheduler stopped."""


class _Suspended(Exception):
    """A group not sent to the transport: its destination is dead until ``until``."""

    def __init__(self, until: float, reply: str) -> None:
        super().__init__(reply)
        self.until = until
        self.reply = reply


class _AwaitProbe(Exception):
    """Another group is probing this destination: wait for ``verdict``, then look again."""

    def __init__(self, verdict: Deferred[None]) -> None:
        super().__init__()
        self.verdict = verdict


@dataclass(slots=True)
class _Destination:
    """A destination that failed as a whole: how often in a row, until when it is dead."""

    failures: int = 0
    dead_until: float = 0.0
    last_error: str = ""
    probing: bool = False
    waiters: list[Deferred[None]] = field(default_factory=list)

    def verdict(self) -> Deferred[None]:
        """Fires when the probe in flight has an outcome (whatever it is)."""
        d: Deferred[None] = Deferred()
        self.waiters.append(d)
        return d

    def probe_done(self) -> None:
        self.probing = False
        waiters, self.waiters = self.waiters, []
        for waiter in waiters:
            waiter.callback(None)


def destination_failed(results: list[DeliveryResult]) -> bool:
    """Whether an attempt failed for its whole destination, not for its recipients."""
    return bool(results) and all(r.status is Status.DEFERRED and r.destination_failed
                                 for r in results)


class Scheduler:
    log = Logger()

    def __init__(self, spool: Spool, deliverers: Mapping[str, IDeliverer], clock: IReactorTime,
                 config: QueueConfig, *, bouncer: Bouncer | None = None,
                 random: Callable[[], float] = random_module.random,
                 on_event: Callable[[Event], None] | None = None) -> None:
        self.spool = spool
        self.deliverers = deliverers
        self.clock = clock
        self.config = config
        self.bouncer = bouncer
        self.random = random
        self.on_event = on_event or (lambda event: None)
        self.messages: dict[str, Envelope] = {}
        self._heap: list[tuple[float, int, str]] = []
        self._sequence = itertools.count()
        self._timer: IDelayedCall | None = None
        self._active: dict[str, Deferred[None]] = {}
        self._again: set[str] = set()
        # Operator commands (hold/release/delete): their spool writes go one at a
        # time; an id being written starts no attempt, and one in flight has its
        # write (or removal) done when the attempt ends.
        self._operator_lock = DeferredLock()
        self._writing: dict[str, int] = {}
        self._dirty: set[str] = set()     # to be saved when the attempt in flight ends
        self._deleted: set[str] = set()   # deleted in flight: outcome ignored, files removed
        self._global = Slots(config.concurrency)
        self._per_destination: dict[str, Slots] = {}
        self._destinations: dict[str, _Destination] = {}  # only those that failed as a whole
        self._ready: dict[str, int] = {}  # groups ready for a destination, not yet handed over
        self._blocked: dict[str, deque[str]] = {}  # ids waiting aside per destination, FIFO
        self._aside: set[str] = set()  # every id in _blocked
        self.loading: set[str] = set()  # ids on disk not read back yet (start-up)
        self.running = False
        for deliverer in deliverers.values():
            if IBacklogAware.providedBy(deliverer):
                deliverer.use_backlog(self.backlog)

    def reconfigure(self, config: QueueConfig) -> None:
        """Limits changed by a reload (SIGHUP), in force from now on.

        ``retry_schedule`` and ``max_age`` apply from the next attempt a recipient
        is scheduled for (waits already computed are kept); ``concurrency`` and
        ``per_destination`` resize the slots at once (deliveries in flight over a
        lowered limit finish). ``directory`` is not changed here: it needs a restart.
        """
        self.config = replace(config, directory=self.config.directory)
        self._global.resize(config.concurrency)
        for slots in self._per_destination.values():
            slots.resize(config.per_destination)

    # --- feeding the queue -------------------------------------------------------

    def start(self, recovered: Iterable[Envelope] = ()) -> None:
        self.running = True
        for envelope in recovered:
            self._add(envelope)
        self._arm()

    def resume(self, envelopes: Iterable[Envelope]) -> None:
        """Entries read back from the spool after start (in batches): due as they say."""
        for envelope in envelopes:
            self.loading.discard(envelope.id)
            if envelope.id not in self.messages:
                self._add(envelope)
        self._arm()

    def enqueue(self, envelope: Envelope) -> None:
        """A freshly committed message: due now."""
        self._add(envelope)
        self._arm()

    def _add(self, envelope: Envelope) -> None:
        self.messages[envelope.id] = envelope
        self._push(envelope)

    def _push(self, envelope: Envelope) -> None:
        pending = envelope.pending
        if not pending or envelope.held:
            return
        due = min(r.next_attempt or 0.0 for r in pending)
        heapq.heappush(self._heap, (due, next(self._sequence), envelope.id))

    def flush(self, domain: str | None = None, queue_id: str | None = None) -> int:
        """Make deferred recipients due now (ETRN, ``relaygwctl queue flush``).

        The destinations of the recipients made due lose their dead mark: an
        operator (or the peer, by ETRN) saying "try now" is news that it may be up.
        """
        count = 0
        if domain is not None:
            self._destinations.pop(domain.lower(), None)
        elif queue_id is None:
            self._destinations.clear()
        for envelope in list(self.messages.values()):
            if (queue_id is not None and envelope.id != queue_id) or envelope.held:
                continue
            touched = False
            for recipient in envelope.pending:
                if domain is None or recipient.domain == domain.lower():
                    recipient.next_attempt = None
                    touched = True
                    self._revive(recipient)
            if touched:
                count += 1
                self._push(envelope)
        self._arm()
        return count

    def _revive(self, recipient: Recipient) -> None:
        """Drop the dead mark of the recipient's destination: made due by hand, it is tried."""
        deliverer = self.deliverers.get(recipient.action)
        if deliverer is not None:
            self._destinations.pop(deliverer.destination(recipient), None)

    # --- operator commands (relaygwctl queue ..., through the control socket) --------

    def envelope_of(self, queue_id: str) -> Envelope:
        """The queued message ``queue_id``; UnknownMessage if there is none (yet)."""
        envelope = self.messages.get(queue_id)
        if envelope is None:
            if queue_id in self.loading:
                raise UnknownMessage(f"{queue_id} is still being read back from the spool"
                                     " after the start; try again in a moment")
            raise UnknownMessage.about(queue_id)
        return envelope

    def hold(self, queue_id: str) -> Deferred[None]:
        """Start no more attempts for the message (one in flight finishes); saved."""
        envelope = self.envelope_of(queue_id)
        if envelope.held:
            return succeed(None)
        envelope.held = True
        self.log.info("{id}: held by the operator", id=queue_id)
        return self._write(envelope)

    def release(self, queue_id: str) -> Deferred[None]:
        """Undo ``hold``: saved, and every pending recipient due now (its destination's
        dead mark dropped, as by ``flush``: else it would stay parked behind it)."""
        envelope = self.envelope_of(queue_id)
        if not envelope.held:
            return succeed(None)
        envelope.held = False
        for recipient in envelope.pending:
            if recipient.state is not RecipientState.DELIVERING:
                recipient.next_attempt = None
                self._revive(recipient)
        self.log.info("{id}: released by the operator", id=queue_id)
        self._again.add(queue_id)  # pushed once written (or once the attempt in flight ends)
        d = self._write(envelope)
        self._settle(queue_id)
        return d

    def delete(self, queue_id: str) -> Deferred[bool]:
        """Remove the message from the queue and the spool, without a bounce.

        Never under a delivery: with an attempt in flight, its outcome is ignored and
        the files go when it ends. Fires True in that case, False when removed now.
        """
        self.envelope_of(queue_id)
        del self.messages[queue_id]
        self._again.discard(queue_id)
        self._dirty.discard(queue_id)
        self.log.info("{id}: deleted by the operator", id=queue_id)
        if queue_id in self._active:
            self._deleted.add(queue_id)
            return succeed(True)
        return self._spool_op(queue_id, lambda: self.spool.remove(queue_id)).addCallback(
            lambda _: False)

    def _write(self, envelope: Envelope) -> Deferred[None]:
        if envelope.id in self._active:
            self._dirty.add(envelope.id)  # the attempt's end writes it
            return succeed(None)
        return self._spool_op(envelope.id, lambda: self.spool.save(envelope))

    def _spool_op(self, queue_id: str, op: Callable[[], Deferred[None]]) -> Deferred[None]:
        self._writing[queue_id] = self._writing.get(queue_id, 0) + 1

        def done(result: object) -> object:
            left = self._writing[queue_id] - 1
            if left:
                self._writing[queue_id] = left
            else:
                del self._writing[queue_id]
            self._settle(queue_id)
            return result

        def failed(failure: object) -> object:
            self.log.error("spool: operator command on {id}: {error}", id=queue_id,
                           error=getattr(failure, "value", failure))
            return failure

        return self._operator_lock.run(op).addErrback(failed).addBoth(done)

    def _settle(self, queue_id: str) -> None:
        """Look again at a message an attempt or a spool write kept from the heap."""
        if (queue_id not in self._again or queue_id in self._active
                or queue_id in self._writing):
            return
        self._again.discard(queue_id)
        envelope = self.messages.get(queue_id)
        if envelope is not None:
            self._push(envelope)
            self._arm()

    def stop(self) -> Deferred[object]:
        """Stop starting attempts; fires when the ones in flight are recorded."""
        self.running = False
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        return DeferredList(list(self._active.values()), consumeErrors=True)

    @property
    def attempts_in_flight(self) -> int:
        """Attempts started and not yet recorded (bounded by ``ATTEMPT_WINDOW``)."""
        return len(self._active)

    def backlog(self, destination: str) -> int:
        """Mail for ``destination`` due but not yet handed to the transport: groups
        waiting for slots, and ids waiting aside (backlog or probe).

        Transports use it to keep a connection open only when the next message
        for it is already waiting (see ``IBacklogAware``).
        """
        return self._ready.get(destination, 0) + len(self._blocked.get(destination, ()))

    def dead_until(self, destination: str) -> float | None:
        """When a dead destination may be tried again; None if it is not dead now."""
        state = self._destinations.get(destination)
        if state is None or state.dead_until <= self.clock.seconds():
            return None
        return state.dead_until

    # --- the timer ---------------------------------------------------------------

    def _arm(self) -> None:
        """Set the timer for the next due run; one already set no later is kept
        (its run arms again): messages committed in one turn share one run
        instead of a cancel and a new timed call each."""
        if not self.running:
            return
        when: float | None = None
        now = 0.0
        if len(self._active) < ATTEMPT_WINDOW:  # else the end of an attempt arms again
            now = self.clock.seconds()
            if self._drainable():
                when = now
            elif self._heap:
                when = max(now, self._heap[0][0])
        timer = self._timer
        if timer is not None and timer.active():
            if when is not None and timer.getTime() <= when:
                return
            timer.cancel()
        self._timer = None
        if when is not None:
            self._timer = self.clock.callLater(when - now, self._run_due)

    def _run_due(self) -> None:
        self._timer = None
        now = self.clock.seconds()
        budget = DUE_BATCH
        try:
            # Mail waiting aside goes first, oldest first, where its destination has room.
            for destination in list(self._blocked):
                budget = self._drain(destination, now, budget)
            while (self._heap and self._heap[0][0] <= now and budget > 0
                   and len(self._active) < ATTEMPT_WINDOW):
                _, _, queue_id = heapq.heappop(self._heap)
                if queue_id in self._aside:
                    continue  # already waiting aside (flush, release): it goes from there
                envelope, due = self._due_now(queue_id, now)
                if envelope is None:
                    continue
                budget -= 1
                self._consider(envelope, due, now)
        finally:
            self._arm()

    def _due_now(self, queue_id: str, now: float) -> tuple[Envelope | None, list[Recipient]]:
        """The message and its recipients due now; (None, []) if nothing is to be done."""
        envelope = self.messages.get(queue_id)
        if envelope is None or envelope.held:
            return None, []
        if queue_id in self._active or queue_id in self._writing:
            self._again.add(queue_id)  # look again when the attempt (or write) ends
            return None, []
        due = [r for r in envelope.pending
               if r.state is not RecipientState.DELIVERING
               and (r.next_attempt is None or r.next_attempt <= now)]
        if not due:
            return None, []  # a stale entry (left by flush): the one for the real time waits
        return envelope, due

    def _consider(self, envelope: Envelope, due: list[Recipient], now: float,
                  draining: str | None = None) -> None:
        """Park, set aside or start an attempt for a message with ``due`` recipients.

        A destination with mail waiting aside takes newcomers at the back of its
        line (first come, first served); ``draining`` is the one whose line this
        message just left."""
        try:
            routed = self._routed(due)
        except KeyError:  # an unknown transport: the attempt logs it and leaves it queued
            self._start_attempt(envelope)
            return
        destinations = {destination for _, destination in routed}
        # (no destination is dead, or being probed, at all: the usual case)
        if self._destinations and self._park_if_all_dead(envelope, routed, destinations, now):
            return
        crowded = next((d for d in sorted(destinations)
                        if self._crowded(d) or (d in self._blocked and d != draining)), None)
        if crowded is not None:
            self._blocked.setdefault(crowded, deque()).append(envelope.id)
            self._aside.add(envelope.id)
            return
        self._start_attempt(envelope, routed)

    def _routed(self, recipients: list[Recipient]) -> list[tuple[Recipient, str]]:
        """Each recipient with its destination (the key of slots and back-off), worked
        out once per attempt; KeyError for an unknown transport."""
        return [(r, self._destination_of(r)) for r in recipients]

    def _drain(self, destination: str, now: float, budget: int) -> int:
        """Take ids waiting aside for ``destination`` while it has room; the budget left."""
        line = self._blocked[destination]
        while (line and budget > 0 and len(self._active) < ATTEMPT_WINDOW
               and not self._crowded(destination)):
            queue_id = line.popleft()
            self._aside.discard(queue_id)
            envelope, due = self._due_now(queue_id, now)
            if envelope is None:
                continue  # deleted, held or in flight meanwhile: its own path brings it back
            budget -= 1
            self._consider(envelope, due, now, draining=destination)
        if not line:
            del self._blocked[destination]
        return budget

    def _drainable(self) -> bool:
        """Whether some destination with mail waiting aside has room for it now."""
        return any(not self._crowded(d) for d in self._blocked)

    def _crowded(self, destination: str) -> bool:
        """Whether a destination has enough groups started (or a probe to wait for)
        that another message for it should wait aside as an id."""
        state = self._destinations.get(destination)
        if state is not None and state.probing:
            return True
        return self._ready.get(destination, 0) >= self._backlog_limit()

    def _backlog_limit(self) -> int:
        return BACKLOG_PER_SLOT * self.config.per_destination

    def _park_if_all_dead(self, envelope: Envelope, routed: list[tuple[Recipient, str]],
                          destinations: set[str], now: float) -> bool:
        """Park a message whose every due destination is dead, without an attempt
        (no coroutine, no disk write); True when it did."""
        states = [self._destinations.get(d) for d in destinations]
        if not all(state is not None and state.dead_until > now for state in states):
            return False
        if retry.expired(now, envelope.received, self.config.max_age):
            return False  # expiry bounces and writes: the attempt's path does that
        for recipient, destination in routed:
            state = self._destinations[destination]
            self._park(envelope, recipient, _Suspended(state.dead_until, state.last_error))
        self.spool.cache.discard(envelope.id)  # its next attempt is a while away
        self._push(envelope)
        return True

    def _start_attempt(self, envelope: Envelope,
                       routed: list[tuple[Recipient, str]] | None = None) -> None:
        d = Deferred.fromCoroutine(self._attempt(envelope, routed))
        self._active[envelope.id] = d

        def finished(result: object) -> None:
            queue_id = envelope.id
            del self._active[queue_id]
            if len(self._active) == ATTEMPT_WINDOW - 1 and self._timer is None:
                self._arm()  # the window was full: the due run goes on
            if queue_id in self._deleted:  # by the operator, while the attempt ran
                self._deleted.discard(queue_id)
                self._spool_op(queue_id, lambda: self.spool.remove(queue_id)).addErrback(
                    lambda f: None)
                return
            if queue_id in self._dirty:
                self._dirty.discard(queue_id)
                if queue_id in self.messages:
                    self._spool_op(queue_id, lambda: self.spool.save(envelope)).addErrback(
                        lambda f: None)
            self._settle(queue_id)

        d.addErrback(lambda f: self.log.failure("delivery attempt for {id} crashed", f,
                                                id=envelope.id))
        d.addBoth(finished)

    # --- one attempt ---------------------------------------------------------------

    async def _attempt(self, envelope: Envelope,
                       routed: list[tuple[Recipient, str]] | None) -> None:
        """One attempt for the recipients due now: ``routed``, as the due run found
        them (None: work them out here)."""
        if routed is None:
            now = self.clock.seconds()
            routed = self._routed([r for r in envelope.pending
                                   if r.state is not RecipientState.DELIVERING
                                   and (r.next_attempt is None or r.next_attempt <= now)])
        groups: dict[tuple[str, str], list[Recipient]] = {}
        for recipient, destination in routed:
            groups.setdefault((recipient.action, destination), []).append(recipient)
            recipient.state = RecipientState.DELIVERING
        outcomes = await self._deliver_groups(envelope, groups)
        if envelope.id in self._deleted:
            return  # deleted by the operator meanwhile: nothing to record
        failed: list[Recipient] = []
        # Whether anything worth a disk write happened: a recipient parked behind
        # a dead destination, or never started, changed nothing that a restart
        # would need (it would just be tried at once), so it costs no fsync.
        attempted = False
        tried: list[tuple[Recipient, DeliveryResult]] = []
        for (ok, results), recipients in zip(outcomes, groups.values(), strict=True):
            if not ok and results.check(_NotStarted):
                for recipient in recipients:  # never tried: as it was, no attempt counted
                    recipient.state = (RecipientState.DEFERRED if recipient.attempts
                                       else RecipientState.QUEUED)
                continue
            if not ok and results.check(_Suspended):
                for recipient in recipients:
                    if self._park(envelope, recipient, results.value):
                        failed.append(recipient)
                        attempted = True
                continue
            attempted = True
            if not ok:
                results = [DeliveryResult.deferred(f"451 4.3.0 internal error: "
                                                   f"{results.getErrorMessage()}")] * len(
                    recipients)
            tried.extend(zip(recipients, results, strict=True))
        wait = self._retry_wait(tried)
        for recipient, result in tried:
            if self._record(envelope, recipient, result, wait):
                failed.append(recipient)
        if failed and envelope.sender and self.bouncer is not None:
            # Before the original leaves the spool: the bounce quotes its headers.
            try:
                await self.bouncer(envelope, failed)
            except Exception:
                self.log.failure("cannot queue the bounce for {id}", id=envelope.id)
        try:
            if envelope.pending:
                if attempted:
                    await self.spool.save(envelope)
            else:
                await self.spool.remove(envelope.id)
                self.messages.pop(envelope.id, None)
        except OSError as e:
            # The outcome stays in memory and is retried; a restart may repeat
            # an attempt (at least once, never lost).
            self.log.error("spool: cannot record the attempt for {id}: {error}",
                           id=envelope.id, error=e)
        if envelope.pending:
            self.spool.cache.discard(envelope.id)  # its next attempt is a while away
            self._push(envelope)
            self._arm()

    async def _deliver_groups(self, envelope: Envelope,
                              groups: dict[tuple[str, str], list[Recipient]]
                              ) -> list[tuple[bool, list[DeliveryResult] | Failure]]:
        """Every group at once; ``DeferredList(..., consumeErrors=True)``'s result.

        A lone group (a message for one destination: nearly all mail) is awaited
        as it is, without a Deferred of its own and a DeferredList around it."""
        if len(groups) == 1:
            [((action, destination), recipients)] = groups.items()
            try:
                return [(True, await self._group(envelope, action, destination, recipients))]
            except Exception:
                return [(False, Failure())]
        attempts = [Deferred.fromCoroutine(self._group(envelope, action, destination, recipients))
                    for (action, destination), recipients in groups.items()]
        return await DeferredList(attempts, consumeErrors=True)

    async def _group(self, envelope: Envelope, action: str, destination: str,
                     recipients: list[Recipient]) -> list[DeliveryResult]:
        """One group through the dead-destination gate and the concurrency slots.

        The gate is passed twice: before queueing for slots (a dead destination
        takes none) and again once they are held (the destination may have been
        marked dead by an attempt that ended while this group waited).
        Raises _Suspended, or _NotStarted after stop().
        """
        deliverer = self.deliverers[action]
        message_path = self.spool.message_path(envelope.id)
        probe: _Destination | None = None
        waiting = True
        self._ready[destination] = self._ready.get(destination, 0) + 1

        def handed_over() -> None:
            nonlocal waiting
            if waiting:
                waiting = False
                left = self._ready.get(destination, 1) - 1
                if left > 0:
                    self._ready[destination] = left
                else:
                    self._ready.pop(destination, None)
                if destination in self._blocked:
                    self._arm()  # room for mail waiting aside

        async def start() -> list[DeliveryResult]:
            nonlocal probe
            # stop() lets attempts in flight finish and starts no more; nor do hold
            # and delete for a group still waiting for its slots.
            if not self.running or envelope.held or envelope.id in self._deleted:
                raise _NotStarted()
            if probe is None:
                probe = self._admit(destination)
            handed_over()
            if IInlineDeliverer.providedBy(deliverer):
                results = await deliverer.deliver_inline(envelope, message_path, recipients)
            else:
                results = await deliverer.deliver(envelope, message_path, recipients)
            # Before the slots are released: the groups queued behind see the verdict.
            return self._note(results, destination)

        try:
            while True:
                try:
                    probe = self._admit(destination)
                    return await self._in_slots(destination, start)
                except _AwaitProbe as e:
                    await e.verdict
        except GeneratorExit:
            # Closed unfinished by the collector (see _in_slots): the groups
            # waiting for this probe's verdict hear it on the next turn.
            if probe is not None:
                call_soon(self.clock, probe.probe_done)
                probe = None
            raise
        finally:
            handed_over()
            if probe is not None:
                probe.probe_done()
                if destination in self._blocked:
                    self._arm()  # those that waited aside for the verdict

    async def _in_slots(self, destination: str,
                        start: Callable[[], Coroutine[object, object, list[DeliveryResult]]]
                        ) -> list[DeliveryResult]:
        """``start()`` holding a per-destination slot, then a global one.

        A coroutine awaited by the attempt's own: with slots free (the usual
        case) nothing here makes or waits on a Deferred."""
        per_destination = self._per_destination.get(destination)
        if per_destination is None:
            per_destination = Slots(self.config.per_destination)
            self._per_destination[destination] = per_destination
        # Each slot is released once held (a wait cancelled holds none: acquire's
        # canceller dropped it). A coroutine closed unfinished (GeneratorExit:
        # garbage collected, at exit with attempts still in flight, or after a
        # transport dropped a Deferred) gives its slots back for the next turn:
        # waking a waiter from inside the collector would resume a coroutine
        # that may be garbage too, and have it crash.
        held_local = held_global = False
        try:
            wait = per_destination.take()
            if wait is not None:
                await wait
            held_local = True
            wait = self._global.take()
            if wait is not None:
                await wait
            held_global = True
            return await start()
        except GeneratorExit:
            if held_global:
                self._global.release_later(self.clock)
            if held_local:
                per_destination.release_later(self.clock)
            held_local = held_global = False
            raise
        finally:
            if held_global:
                self._global.release()
            if held_local:
                per_destination.release()
                if (not per_destination.waiting
                        and per_destination.tokens == per_destination.limit):
                    self._per_destination.pop(destination, None)

    # --- dead destinations ---------------------------------------------------------

    def _admit(self, destination: str) -> _Destination | None:
        """Whether a group may go to the transport now; the state it probes, if it probes.

        Raises _Suspended while the destination is dead, _AwaitProbe while
        another group's probe of it is in flight.
        """
        state = self._destinations.get(destination)
        if state is None:
            return None
        if state.dead_until > self.clock.seconds():
            raise _Suspended(state.dead_until, state.last_error)
        if state.probing:
            raise _AwaitProbe(state.verdict())
        state.probing = True
        return state

    def _note(self, results: list[DeliveryResult], destination: str) -> list[DeliveryResult]:
        """Mark the destination dead after a whole-destination failure; clear it otherwise."""
        now = self.clock.seconds()
        state = self._destinations.get(destination)
        if not destination_failed(results):
            if state is not None:
                del self._destinations[destination]
                self.log.info("destination {destination} answers again", destination=destination)
            return results
        if state is None:
            self._forget_stale(now)
            state = self._destinations[destination] = _Destination()
        if state.dead_until > now:
            return results  # an attempt that ran alongside the one that marked it
        state.failures += 1
        backoff = retry.destination_backoff(self.config.retry_schedule, state.failures,
                                            self.random)
        state.dead_until = now + backoff
        state.last_error = results[-1].reply
        self.log.warn("destination {destination} unreachable ({failures} in a row): delivery"
                      " suspended for {backoff:.0f}s: {reply}", destination=destination,
                      failures=state.failures, backoff=backoff, reply=state.last_error)
        return results

    def _forget_stale(self, now: float) -> None:
        """Drop marks long expired with nothing probing them (no mail came back for them)."""
        horizon = max(self.config.retry_schedule)
        for destination, state in list(self._destinations.items()):
            if not state.probing and state.dead_until + horizon < now:
                del self._destinations[destination]

    def _park(self, envelope: Envelope, recipient: Recipient, suspended: _Suspended) -> bool:
        """Defer without an attempt until its destination's dead time ends (not counted
        as an attempt); True when the message has expired meanwhile."""
        now = self.clock.seconds()
        delay = now - envelope.received
        recipient.last_error = suspended.reply
        if self._expire(envelope, recipient, suspended.reply, now):
            return True
        recipient.state = RecipientState.DEFERRED
        recipient.next_attempt = retry.next_attempt_time(now, envelope.received,
                                                         self.config.max_age,
                                                         suspended.until - now)
        self.on_event(Event("deferred", envelope, recipient,
                            f"delivery temporarily suspended: {suspended.reply}", delay))
        return False

    def _expire(self, envelope: Envelope, recipient: Recipient, reply: str, now: float) -> bool:
        """Fail a recipient still deferred past max_age (4.4.7); True when it did."""
        if not retry.expired(now, envelope.received, self.config.max_age):
            return False
        delay = now - envelope.received
        recipient.state = RecipientState.FAILED
        recipient.next_attempt = None
        recipient.last_error = (f"4.4.7 message expired after {int(delay)}s in the queue;"
                                f" last error: {reply}")
        self.on_event(Event("expired", envelope, recipient, recipient.last_error, delay))
        return True

    def _retry_wait(self, tried: list[tuple[Recipient, DeliveryResult]]) -> float:
        """One retry delay for every recipient an attempt defers (0 if none is).

        One jitter, and the step of the most tried of them: the message's deferred
        recipients come back together, one transaction per next hop (as Postfix
        retries a message), not one each at scattered times.
        """
        attempts = [r.attempts + 1 for r, result in tried if result.status is Status.DEFERRED]
        if not attempts:
            return 0.0
        return retry.retry_delay(self.config.retry_schedule, max(attempts), self.random)

    def _record(self, envelope: Envelope, recipient: Recipient, result: DeliveryResult,
                wait: float) -> bool:
        """Apply one outcome (``wait``: the attempt's retry delay, if deferred); True
        when the recipient has now failed for good."""
        now = self.clock.seconds()
        recipient.attempts += 1
        recipient.remote = result.remote
        delay = now - envelope.received
        if result.status is Status.DELIVERED:
            recipient.state = RecipientState.DELIVERED
            recipient.next_attempt = None
            recipient.last_error = None
            self.on_event(Event("delivered", envelope, recipient, result.reply, delay))
            return False
        recipient.last_error = result.reply
        if result.status is Status.FAILED:
            recipient.state = RecipientState.FAILED
            recipient.next_attempt = None
            self.on_event(Event("bounced", envelope, recipient, result.reply, delay))
            return True
        if self._expire(envelope, recipient, result.reply, now):
            return True
        if result.destination_failed:
            # Not before the destination's dead time ends: it comes back with the rest
            # (one time for all of the destination's recipients, as ``wait`` is one).
            wait = max(wait, (self.dead_until(self._destination_of(recipient)) or now) - now)
        recipient.state = RecipientState.DEFERRED
        recipient.next_attempt = retry.next_attempt_time(now, envelope.received,
                                                         self.config.max_age, wait)
        self.on_event(Event("deferred", envelope, recipient, result.reply, delay))
        return False

    def _destination_of(self, recipient: Recipient) -> str:
        return self.deliverers[recipient.action].destination(recipient)
