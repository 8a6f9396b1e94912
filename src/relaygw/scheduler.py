"""The queue manager: takes due recipients to their transports and records outcomes.

One timer (``callLater``) is armed for the earliest due entry of a heap, so an
idle queue costs nothing. A message's due recipients are grouped by
transport and destination; each group is one transport call, bounded by a
global and a per-destination DeferredSemaphore. Outcomes are written to the
spool before anything else happens: delivered recipients are done, transient
failures wait per ``retry_schedule`` (jittered), permanent failures and
expiry past ``max_age`` are handed to the bouncer. A message leaves the spool
when no recipient is pending.
"""

from __future__ import annotations

import heapq
import itertools
import random as random_module
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from twisted.internet.defer import Deferred, DeferredList, DeferredSemaphore
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from relaygw import retry
from relaygw.config import QueueConfig
from relaygw.envelope import Envelope, Recipient, RecipientState
from relaygw.interfaces import DeliveryResult, IDeliverer, Status
from relaygw.spool import Spool

Bouncer = Callable[[Envelope, list[Recipient]], Deferred[object]]


@dataclass(slots=True)
class Event:
    """A delivery outcome for the mail log and the metrics."""

    kind: str  # delivered | deferred | bounced | expired
    envelope: Envelope
    recipient: Recipient
    reply: str
    delay: float


class _NotStarted(Exception):
    """A group still waiting for a concurrency slot when the scheduler stopped."""


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
        self._global = DeferredSemaphore(config.concurrency)
        self._per_destination: dict[str, DeferredSemaphore] = {}
        self.running = False

    # --- feeding the queue -------------------------------------------------------

    def start(self, recovered: Iterable[Envelope] = ()) -> None:
        self.running = True
        for envelope in recovered:
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
        """Make deferred recipients due now (ETRN, ``relaygwctl queue flush``)."""
        count = 0
        for envelope in list(self.messages.values()):
            if queue_id is not None and envelope.id != queue_id:
                continue
            touched = False
            for recipient in envelope.pending:
                if domain is None or recipient.domain == domain.lower():
                    recipient.next_attempt = None
                    touched = True
            if touched:
                count += 1
                self._push(envelope)
        self._arm()
        return count

    def stop(self) -> Deferred[object]:
        """Stop starting attempts; fires when the ones in flight are recorded."""
        self.running = False
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        return DeferredList(list(self._active.values()), consumeErrors=True)

    # --- the timer ---------------------------------------------------------------

    def _arm(self) -> None:
        if not self.running:
            return
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._heap:
            delay = max(0.0, self._heap[0][0] - self.clock.seconds())
            self._timer = self.clock.callLater(delay, self._run_due)

    def _run_due(self) -> None:
        self._timer = None
        now = self.clock.seconds()
        while self._heap and self._heap[0][0] <= now:
            _, _, queue_id = heapq.heappop(self._heap)
            envelope = self.messages.get(queue_id)
            if envelope is None or envelope.held:
                continue
            if queue_id in self._active:
                self._again.add(queue_id)  # look again when the attempt in flight ends
                continue
            if not any(r.next_attempt is None or r.next_attempt <= now
                       for r in envelope.pending):
                continue  # a stale entry (left by flush): the entry for the real time is queued
            self._start_attempt(envelope)
        self._arm()

    def _start_attempt(self, envelope: Envelope) -> None:
        d = Deferred.fromCoroutine(self._attempt(envelope))
        self._active[envelope.id] = d

        def finished(result: object) -> None:
            del self._active[envelope.id]
            if envelope.id in self._again:
                self._again.discard(envelope.id)
                if envelope.id in self.messages:
                    self._push(envelope)
                    self._arm()

        d.addErrback(lambda f: self.log.failure("delivery attempt for {id} crashed", f,
                                                id=envelope.id))
        d.addBoth(finished)

    # --- one attempt ---------------------------------------------------------------

    async def _attempt(self, envelope: Envelope) -> None:
        now = self.clock.seconds()
        due = [r for r in envelope.pending
               if r.state is not RecipientState.DELIVERING
               and (r.next_attempt is None or r.next_attempt <= now)]
        groups: dict[tuple[str, str], list[Recipient]] = {}
        for recipient in due:
            deliverer = self.deliverers[recipient.action]
            key = (recipient.action, deliverer.destination(recipient))
            groups.setdefault(key, []).append(recipient)
            recipient.state = RecipientState.DELIVERING
        attempts = [self._deliver_group(envelope, action, destination, recipients)
                    for (action, destination), recipients in groups.items()]
        outcomes = await DeferredList(attempts, consumeErrors=True)
        failed: list[Recipient] = []
        for (ok, results), recipients in zip(outcomes, groups.values(), strict=True):
            if not ok and results.check(_NotStarted):
                for recipient in recipients:  # never tried: as it was, no attempt counted
                    recipient.state = (RecipientState.DEFERRED if recipient.attempts
                                       else RecipientState.QUEUED)
                continue
            if not ok:
                results = [DeliveryResult.deferred(f"451 4.3.0 internal error: "
                                                   f"{results.getErrorMessage()}")] * len(
                    recipients)
            for recipient, result in zip(recipients, results, strict=True):
                if self._record(envelope, recipient, result):
                    failed.append(recipient)
        if failed and envelope.sender and self.bouncer is not None:
            # Before the original leaves the spool: the bounce quotes its headers.
            try:
                await self.bouncer(envelope, failed)
            except Exception:
                self.log.failure("cannot queue the bounce for {id}", id=envelope.id)
        try:
            if envelope.pending:
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
            self._push(envelope)
            self._arm()

    def _deliver_group(self, envelope: Envelope, action: str, destination: str,
                       recipients: list[Recipient]) -> Deferred[list[DeliveryResult]]:
        deliverer = self.deliverers[action]
        per_destination = self._per_destination.get(destination)
        if per_destination is None:
            per_destination = DeferredSemaphore(self.config.per_destination)
            self._per_destination[destination] = per_destination
        message_path = self.spool.message_path(envelope.id)

        def start() -> Deferred[list[DeliveryResult]]:
            if not self.running:  # stop() lets attempts in flight finish, starts no more
                raise _NotStarted()
            return deliverer.deliver(envelope, message_path, recipients)

        def call() -> Deferred[list[DeliveryResult]]:
            return self._global.run(start)

        d = per_destination.run(call)

        def release(result: object) -> object:
            if not per_destination.waiting and per_destination.tokens == per_destination.limit:
                self._per_destination.pop(destination, None)
            return result

        return d.addBoth(release)

    def _record(self, envelope: Envelope, recipient: Recipient, result: DeliveryResult) -> bool:
        """Apply one outcome; True when the recipient has now failed for good."""
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
        if retry.expired(now, envelope.received, self.config.max_age):
            recipient.state = RecipientState.FAILED
            recipient.next_attempt = None
            recipient.last_error = (f"4.4.7 message expired after {int(delay)}s in the queue;"
                                    f" last error: {result.reply}")
            self.on_event(Event("expired", envelope, recipient, recipient.last_error, delay))
            return True
        wait = retry.retry_delay(self.config.retry_schedule, recipient.attempts, self.random)
        recipient.state = RecipientState.DEFERRED
        recipient.next_attempt = retry.next_attempt_time(now, envelope.received,
                                                         self.config.max_age, wait)
        self.on_event(Event("deferred", envelope, recipient, result.reply, delay))
        return False
