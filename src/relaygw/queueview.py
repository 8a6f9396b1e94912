"""The queue as relaygwctl shows it (CONTRACT.md section 6), written once for both sides.

``relaygwctl queue list --json`` / ``queue show`` build these from the spool files when
the daemon is not running, and the daemon builds them from the scheduler's envelopes
in memory (``relaygw.control.ListQueue``), where a recipient in flight is
``"delivering"``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from relaygw.envelope import Envelope


def rfc3339(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds").replace(
        "+00:00", "Z")


def parse_rfc3339(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def queue_entry(envelope: Envelope) -> dict[str, Any]:
    """One element of ``queue list --json``: the pending recipients only."""
    return {
        "id": envelope.id,
        "sender": envelope.sender,
        "received": rfc3339(envelope.received),
        "size": envelope.size,
        "held": envelope.held,
        "recipients": [
            {"address": r.address, "state": str(r.state), "attempts": r.attempts,
             "next_attempt": rfc3339(r.next_attempt), "last_error": r.last_error}
            for r in envelope.pending
        ],
    }


def show_entry(envelope: Envelope) -> dict[str, Any]:
    """``queue show``: every recipient (with its original address and last remote)."""
    entry = queue_entry(envelope)
    entry["recipients"] = [
        {"address": r.address, "original": r.original, "state": str(r.state),
         "attempts": r.attempts, "next_attempt": rfc3339(r.next_attempt),
         "last_error": r.last_error, "remote": r.remote} for r in envelope.recipients]
    entry["client"] = envelope.client_address
    entry["helo"] = envelope.helo
    return entry


def queue_listing(envelopes: Iterable[Envelope]) -> list[dict[str, Any]]:
    """Entries in queue-id order (the ids sort by arrival)."""
    return [queue_entry(e) for e in sorted(envelopes, key=lambda e: e.id)]


def queue_json(envelopes: Iterable[Envelope]) -> str:
    return json.dumps(queue_listing(envelopes), indent=2)
