"""Fakes shared by the unit tests of the queue side: spool, scheduler, Maildir.

Fakes over mocks: each one is a small, real implementation of a seam that
records what happened, so tests assert on outcomes rather than on calls.
"""

from __future__ import annotations

import errno
import gc
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from relaygw.envelope import Envelope, Recipient
from relaygw.interfaces import DeliveryResult, IDeliverer, IInlineDeliverer
from relaygw.journal import Journal
from relaygw.spool import Spool


def sync_run(fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
    """A BlockingRunner that runs the work at once, in the caller's thread."""
    return maybeDeferred(fn, *args)


class NowReactor:
    """callFromThread, run at once (in the journal's writer thread, for tests
    that drive or wait for it themselves)."""

    def callFromThread(self, fn: Callable[..., Any], *args: Any) -> None:
        fn(*args)


def journaled_spool(directory: Path, os_module: Any = os) -> Spool:
    """A prepared spool with a journal written at once, in the caller's thread
    (no writer thread, no reactor): every step of a test is done when it returns."""
    journal = Journal(Path(directory) / "journal", None, os_module)
    spool = Spool(directory, sync_run, journal=journal)
    spool.prepare()
    return spool


def open_fds(under: Path) -> int:
    """How many file descriptors this process has open (Linux) on a file or
    directory under ``under``, once garbage (spools of earlier tests, closing
    their directory) has been collected. Only those: a descriptor some earlier
    test left for the collector, closed mid-test, must not move the count."""
    gc.collect()
    prefix = str(under)
    count = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:  # the listing's own descriptor, gone by now
            continue
        count += target == prefix or target.startswith(prefix + "/")
    return count


class FailingOS:
    """Stands in for ``os`` in a Spool: ``open``/``write``/``fsync``/``rename``/``link`` raise
    ``OSError(ENOSPC)`` on the ``fail_at``-th counted call (counting only once armed)."""

    COUNTED = ("open", "write", "fsync", "rename", "link")

    def __init__(self, fail_at: int | None = None, error: int = errno.ENOSPC) -> None:
        self.fail_at = fail_at
        self.error = error
        self.armed = False
        self.calls: list[str] = []

    def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        if self.armed:
            self.calls.append(name)
            if len(self.calls) == self.fail_at:
                raise OSError(self.error, os.strerror(self.error))
        return getattr(os, name)(*args, **kwargs)

    def open(self, *args: Any, **kwargs: Any) -> int:
        return self._call("open", *args, **kwargs)

    def write(self, *args: Any) -> int:
        return self._call("write", *args)

    def fsync(self, *args: Any) -> None:
        return self._call("fsync", *args)

    def rename(self, *args: Any) -> None:
        return self._call("rename", *args)

    def link(self, *args: Any, **kwargs: Any) -> None:
        return self._call("link", *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)


def recipient(address: str, action: str = "relay", **fields: Any) -> Recipient:
    return Recipient(address=address, original=fields.pop("original", address), action=action,
                     **fields)


def queue_message(spool: Spool, recipients: Iterable[Recipient], *, sender: str = "s@src.test",
                  received: float = 0.0, data: bytes = b"Subject: hi\r\n\r\nbody\r\n",
                  **fields: Any) -> Envelope:
    """Commit a message to ``spool`` (which must use a synchronous runner)."""
    incoming = spool.open_incoming()
    incoming.write(data)
    envelope = Envelope(id=incoming.id, sender=sender, recipients=list(recipients),
                        received=received, **fields)
    failures: list[Any] = []
    spool.commit(incoming, envelope).addErrback(failures.append)
    if failures:
        failures[0].raiseException()
    return envelope


@dataclass
class Call:
    """One ``deliver`` call seen by a FakeDeliverer."""

    queue_id: str
    destination: str
    addresses: list[str]
    time: float
    message_path: Path
    deferred: Deferred[list[DeliveryResult]] | None = None
    results: list[DeliveryResult] = field(default_factory=list)

    @property
    def pending(self) -> bool:
        return self.deferred is not None and not self.deferred.called

    def finish(self) -> None:
        """Fire a held call with its scripted results."""
        assert self.deferred is not None and not self.deferred.called
        self.deferred.callback(self.results)


@implementer(IDeliverer)
class FakeDeliverer:
    """Records calls; answers each recipient from a per-address script (a list of
    results used in order, the last one repeating; DELIVERED when unscripted).

    With ``hold=True`` every call returns an unfired Deferred; ``Call.finish()``
    fires it. ``destination`` is the recipient's domain unless ``fixed_destination``.
    """

    def __init__(self, clock: IReactorTime, *, hold: bool = False,
                 fixed_destination: str | None = None) -> None:
        self.clock = clock
        self.hold = hold
        self.fixed_destination = fixed_destination
        self.script: dict[str, list[DeliveryResult]] = {}
        self.calls: list[Call] = []
        self.errors: dict[str, Exception] = {}

    def destination(self, recipient: Recipient) -> str:
        return self.fixed_destination or recipient.domain

    def deliver(self, envelope: Envelope, message_path: Path,
                recipients: list[Recipient]) -> Deferred[list[DeliveryResult]]:
        assert recipients, "the scheduler asked for an empty delivery"
        destinations = {self.destination(r) for r in recipients}
        assert len(destinations) == 1, f"one call, several destinations: {destinations}"
        call = Call(envelope.id, destinations.pop(), [r.address for r in recipients],
                    self.clock.seconds(), message_path)
        call.results = [self._next(r.address) for r in recipients]
        self.calls.append(call)
        error = next((self.errors[r.address] for r in recipients if r.address in self.errors),
                     None)
        if error is not None:
            d: Deferred[list[DeliveryResult]] = Deferred()
            d.errback(error)
            return d
        if not self.hold:
            return succeed(call.results)
        call.deferred = Deferred()
        return call.deferred

    def _next(self, address: str) -> DeliveryResult:
        script = self.script.get(address)
        if not script:
            return DeliveryResult.delivered(remote="fake")
        return script.pop(0) if len(script) > 1 else script[0]

    # --- what tests look at ------------------------------------------------------

    @property
    def in_flight(self) -> list[Call]:
        return [call for call in self.calls if call.pending]

    def times_for(self, address: str) -> list[float]:
        return [call.time for call in self.calls if address in call.addresses]


class FakeBouncer:
    """The scheduler's bouncer: records (queue id, failed addresses, their errors)."""

    def __init__(self) -> None:
        self.bounces: list[tuple[str, list[str], list[str | None]]] = []

    def __call__(self, envelope: Envelope, failed: list[Recipient]) -> Deferred[object]:
        self.bounces.append((envelope.id, [r.address for r in failed],
                             [r.last_error for r in failed]))
        return succeed(None)


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
