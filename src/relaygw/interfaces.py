"""The seams between the queue and its transports.

A transport is told to make one attempt for a group of recipients of one
message that share a destination, and answers with one DeliveryResult per
recipient, in order. It never touches the spool: recording outcomes,
retrying and bouncing are the scheduler's job.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from twisted.internet.defer import Deferred
from zope.interface import Interface

from relaygw.envelope import Envelope, Recipient


class Status(Enum):
    DELIVERED = "delivered"
    DEFERRED = "deferred"   # transient: try again per retry_schedule
    FAILED = "failed"       # permanent: bounce


@dataclass(frozen=True, slots=True)
class DeliveryResult:
    status: Status
    reply: str                  # e.g. "250 2.0.0 Ok" or "550 5.1.1 no such user"
    remote: str | None = None   # the next hop that answered, e.g. "mx1.example.test[192.0.2.1]"
    # The destination as a whole could not be reached (no hop took the session
    # before MAIL, or DNS failed transiently), as opposed to a reply about this
    # recipient. The scheduler backs the whole destination off on it. A hint
    # about the attempt, not part of the outcome: left out of ==.
    destination_failed: bool = field(default=False, compare=False)

    @classmethod
    def delivered(cls, reply: str = "250 2.0.0 Ok", remote: str | None = None) -> DeliveryResult:
        return cls(Status.DELIVERED, reply, remote)

    @classmethod
    def deferred(cls, reply: str, remote: str | None = None, *,
                 destination_failed: bool = False) -> DeliveryResult:
        return cls(Status.DEFERRED, reply, remote, destination_failed)

    @classmethod
    def failed(cls, reply: str, remote: str | None = None) -> DeliveryResult:
        return cls(Status.FAILED, reply, remote)


class IDeliverer(Interface):
    """A transport: local Maildir, outbound SMTP relay."""

    def destination(recipient: Recipient) -> str:  # type: ignore[misc]
        """The key that per-destination concurrency and back-off are counted on."""

    def deliver(envelope: Envelope, message_path: Path,  # type: ignore[misc]
                recipients: Sequence[Recipient]) -> Deferred[list[DeliveryResult]]:
        """One attempt for ``recipients`` (one destination); one result each, in order.

        The Deferred must not errback: a transport turns its own errors into
        DEFERRED results.
        """


class IInlineDeliverer(IDeliverer):
    """A transport whose attempt is also a coroutine. Optional.

    The scheduler's attempt is a coroutine: awaiting the transport's coroutine
    directly saves the Deferred ``deliver`` wraps it in, and a trip through
    Twisted's trampoline each time the attempt waits and resumes."""

    def deliver_inline(envelope: Envelope, message_path: Path,  # type: ignore[misc]
                       recipients: Sequence[Recipient]
                       ) -> Coroutine[object, object, list[DeliveryResult]]:
        """What ``deliver`` does, as a coroutine; it must not raise either."""


class IBacklogAware(Interface):
    """A transport that can use knowing whether more work for a destination is waiting.

    Optional. The relay transport keeps a finished SMTP session open for the
    next message only when one is ready (Postfix's on-demand connection cache).
    """

    def use_backlog(backlog: Callable[[str], int]) -> None:  # type: ignore[misc]
        """Called once by the scheduler: ``backlog(destination)`` is how many groups
        for that destination are ready but not yet handed to the transport."""
