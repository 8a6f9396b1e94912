"""A transport placeholder that defers every recipient (wiring before the relay lands)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from relaygw.envelope import Envelope, Recipient
from relaygw.interfaces import DeliveryResult, IDeliverer


@implementer(IDeliverer)
class UnavailableDeliverer:
    def destination(self, recipient: Recipient) -> str:
        return recipient.domain

    def deliver(self, envelope: Envelope, message_path: Path,
                recipients: Sequence[Recipient]) -> Deferred[list[DeliveryResult]]:
        return succeed([DeliveryResult.deferred("451 4.4.0 relay transport unavailable")]
                       * len(recipients))
