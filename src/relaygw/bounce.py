"""RFC 3464 delivery status notifications (bounces). Pure: bytes in, bytes out.

A bounce is a multipart/report with a human-readable part, a
message/delivery-status part (one per-recipient block for every recipient
that failed in the same attempt) and the original message's headers as
text/rfc822-headers. It is sent from MAILER-DAEMON@hostname with the null
envelope sender, through the queue like any other message.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence
from datetime import UTC, datetime
from email.utils import format_datetime

from relaygw.envelope import Envelope, Recipient

MAX_QUOTED_HEADERS = 64 * 1024
# The enhanced code where a reply carries one: first, or right after the reply
# code; never a dotted number further on (an IP address in the text).
_STATUS = re.compile(r"^(?:\d{3}[ -])?([245])\.(\d{1,3})\.(\d{1,3})\b")
_REPLY = re.compile(r"^\d{3}[ -]")


def status_of(reply: str, default: str = "5.0.0") -> str:
    """The RFC 3463 code of a failure; a permanent failure is never reported as 4.x.x
    except expiry, which RFC 3463 spells 4.4.7."""
    match = _STATUS.match(reply)
    if not match:
        return default
    status = ".".join(match.groups())
    if status.startswith("4.") and status != "4.4.7":
        return "5" + status[1:]
    return status


def remote_name(remote: str | None) -> str | None:
    if not remote:
        return None
    return remote.split("[", 1)[0].split(":", 1)[0] or None


def _date(epoch: float) -> str:
    return format_datetime(datetime.fromtimestamp(epoch, UTC).astimezone())


def header_block(message: bytes) -> bytes:
    """The header section of a message (without the blank line), bounded."""
    end = message.find(b"\r\n\r\n")
    headers = message if end < 0 else message[: end + 2]
    return headers[:MAX_QUOTED_HEADERS]


def build_bounce(envelope: Envelope, failed: Sequence[Recipient], original_headers: bytes,
                 hostname: str, now: float) -> bytes:
    boundary = f"{envelope.id}.{int(now)}/{hostname}"
    lines_human = [
        f"This is the mail system at host {hostname}.",
        "",
        "I'm sorry to have to inform you that your message could not",
        "be delivered to one or more recipients. The reasons are below.",
        "",
    ]
    per_recipient = []
    for rcpt in failed:
        reply = rcpt.last_error or "5.0.0 delivery failed"
        lines_human.append(f"<{rcpt.address}>: {reply}")
        block = [f"Final-Recipient: rfc822; {rcpt.address}"]
        if rcpt.original != rcpt.address:
            block.append(f"Original-Recipient: rfc822; {rcpt.original}")
        block += ["Action: failed", f"Status: {status_of(reply)}"]
        remote = remote_name(rcpt.remote)
        if remote:
            block.append(f"Remote-MTA: dns; {remote}")
        kind = "smtp" if _REPLY.match(reply) else "X-relaygw"
        block.append(f"Diagnostic-Code: {kind}; {_one_line(reply)}")
        per_recipient.append("\r\n".join(block))
    headers = [
        f"From: MAILER-DAEMON@{hostname} (Mail Delivery System)",
        f"To: <{envelope.sender}>",
        "Subject: Undelivered Mail Returned to Sender",
        f"Date: {_date(now)}",
        # Unique per bounce: one message can bounce in several rounds.
        f"Message-ID: <{envelope.id}.{secrets.token_hex(6)}.bounce@{hostname}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary="{boundary}"',
        "Content-Transfer-Encoding: 7bit",
    ]
    status_fields = "\r\n".join([
        f"Reporting-MTA: dns; {hostname}",
        f"X-Relaygw-Queue-ID: {envelope.id}",
        f"Arrival-Date: {_date(envelope.received)}",
    ])
    parts = [
        "\r\n".join(headers),
        "",
        "This is a MIME-encapsulated message.",
        "",
        f"--{boundary}",
        "Content-Description: Notification",
        "Content-Type: text/plain; charset=us-ascii",
        "",
        "\r\n".join(lines_human),
        "",
        f"--{boundary}",
        "Content-Description: Delivery report",
        "Content-Type: message/delivery-status",
        "",
        status_fields,
        "",
        "\r\n\r\n".join(per_recipient),
        "",
        f"--{boundary}",
        "Content-Description: Undelivered Message Headers",
        "Content-Type: text/rfc822-headers",
        "",
    ]
    quoted = original_headers.decode("ascii", "replace").rstrip("\r\n")
    text = "\r\n".join(parts) + "\r\n" + quoted + f"\r\n\r\n--{boundary}--\r\n"
    return text.encode("ascii", "replace")


def _one_line(text: str) -> str:
    return " ".join(text.split())
