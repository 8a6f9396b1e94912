"""The queue's value types: an envelope with per-recipient delivery state.

Stored as JSON (never pickle) beside the message file, rewritten whole after
every attempt so that the file on disk is always one consistent record.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

ENVELOPE_VERSION = 1


class RecipientState(StrEnum):
    QUEUED = "queued"        # never tried yet
    DEFERRED = "deferred"    # tried, failed transiently, waiting for next_attempt
    DELIVERING = "delivering"  # in flight (in memory only; never written as such)
    DELIVERED = "delivered"
    FAILED = "failed"        # permanent failure: bounced (or dropped for sender <>)



_STATES = {state.value: state for state in RecipientState}  # cheaper than the Enum call
_DELIVERED = RecipientState.DELIVERED
_FAILED = RecipientState.FAILED
# json.dumps with options builds a new encoder at every call: this one is made once.
_ENVELOPE_JSON = json.JSONEncoder(separators=(",", ":"), sort_keys=True)


@dataclass(slots=True)
class Recipient:
    address: str                  # after alias expansion: where it goes
    original: str                 # as the client gave it at RCPT
    action: str                   # "local" or "relay"
    maildir: str | None = None    # local: the Maildir chosen at RCPT time
    state: RecipientState = RecipientState.QUEUED
    attempts: int = 0
    next_attempt: float | None = None
    last_error: str | None = None
    remote: str | None = None     # the next hop of the last attempt

    @property
    def domain(self) -> str:
        return self.address.rpartition("@")[2].lower()


@dataclass(slots=True)
class Envelope:
    id: str
    sender: str                   # "" is the null reverse path <>
    recipients: list[Recipient]
    received: float               # epoch seconds
    size: int = 0
    client_address: str = ""
    helo: str = ""
    held: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def pending(self) -> list[Recipient]:
        # Pending: queued, deferred or delivering. Identity tests, because a set
        # lookup (Enum.__hash__ is Python code) costs more, and the scheduler asks
        # this several times per message.
        return [r for r in self.recipients
                if r.state is not _DELIVERED and r.state is not _FAILED]

    def to_bytes(self) -> bytes:
        # Built by hand: dataclasses.asdict deep-copies, and this runs after
        # every attempt of every message.
        recipients = []
        for r in self.recipients:
            state = r.state
            if state is RecipientState.DELIVERING:  # in flight is not a state on disk
                state = RecipientState.DEFERRED if r.attempts else RecipientState.QUEUED
            recipients.append({
                "action": r.action, "address": r.address, "attempts": r.attempts,
                "last_error": r.last_error, "maildir": r.maildir,
                "next_attempt": r.next_attempt, "original": r.original,
                "remote": r.remote, "state": state.value,
            })
        data = {
            "client_address": self.client_address, "extra": self.extra, "held": self.held,
            "helo": self.helo, "id": self.id, "received": self.received,
            "recipients": recipients, "sender": self.sender, "size": self.size,
            "version": ENVELOPE_VERSION,
        }
        return _ENVELOPE_JSON.encode(data).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> Envelope:
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("an envelope is a JSON object")
        if data.pop("version", None) != ENVELOPE_VERSION:
            raise ValueError("unknown envelope version")
        recipients = [Recipient(**{**r, "state": _STATES[r["state"]]})
                      for r in data.pop("recipients")]
        return cls(recipients=recipients, **data)
