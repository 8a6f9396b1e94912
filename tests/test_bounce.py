"""RFC 3464 bounces, parsed back with the email package."""

from __future__ import annotations

import email
from email.message import Message

import pytest

from relaygw.bounce import build_bounce, header_block, remote_name, status_of
from relaygw.envelope import Envelope, Recipient, RecipientState

ORIGINAL = (b"Received: from client ([192.0.2.9])\r\n\tby relay.test (relaygw) with ESMTP id Q1\r\n"
            b"From: Sender <s@src.test>\r\nTo: a@dst.test\r\nSubject: hello\r\n"
            b"Message-ID: <orig@src.test>\r\n\r\nthe body, never quoted\r\n")


def failed(address: str, reply: str, remote: str | None = None,
           original: str | None = None) -> Recipient:
    return Recipient(address=address, original=original or address, action="relay",
                     state=RecipientState.FAILED, attempts=1, last_error=reply, remote=remote)


def bounce(recipients: list[Recipient]) -> Message:
    envelope = Envelope(id="Q1", sender="s@src.test", recipients=recipients,
                        received=1_700_000_000.0)
    raw = build_bounce(envelope, recipients, header_block(ORIGINAL), "relay.test",
                       1_700_000_100.0)
    assert b"\r\n" in raw and b"\n" not in raw.replace(b"\r\n", b"")  # CRLF only
    return email.message_from_bytes(raw)


def test_structure_is_a_multipart_report() -> None:
    message = bounce([failed("a@dst.test", "550 5.1.1 <a@dst.test>: user unknown",
                             remote="mx1.dst.test[192.0.2.1]:25")])
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    assert message["From"].startswith("MAILER-DAEMON@relay.test")
    assert message["To"] == "<s@src.test>"
    assert message["Auto-Submitted"] == "auto-replied"
    parts = message.get_payload()
    assert [p.get_content_type() for p in parts] == [
        "text/plain", "message/delivery-status", "text/rfc822-headers"]
    assert "a@dst.test" in parts[0].get_payload()


def test_delivery_status_fields() -> None:
    message = bounce([failed("a@dst.test", "550 5.1.1 <a@dst.test>: user unknown",
                             remote="mx1.dst.test[192.0.2.1]:25", original="alias@src.test")])
    status = message.get_payload()[1]
    per_message, per_recipient = status.get_payload()
    assert per_message["Reporting-MTA"] == "dns; relay.test"
    assert per_message["Arrival-Date"]
    assert per_recipient["Final-Recipient"] == "rfc822; a@dst.test"
    assert per_recipient["Original-Recipient"] == "rfc822; alias@src.test"
    assert per_recipient["Action"] == "failed"
    assert per_recipient["Status"] == "5.1.1"
    assert per_recipient["Remote-MTA"] == "dns; mx1.dst.test"
    assert per_recipient["Diagnostic-Code"] == "smtp; 550 5.1.1 <a@dst.test>: user unknown"


def test_all_failed_recipients_in_one_bounce() -> None:
    message = bounce([failed("a@dst.test", "550 5.1.1 no"), failed("b@dst.test", "552 5.2.2 full")])
    blocks = message.get_payload()[1].get_payload()[1:]
    assert [b["Final-Recipient"] for b in blocks] == ["rfc822; a@dst.test", "rfc822; b@dst.test"]
    assert [b["Status"] for b in blocks] == ["5.1.1", "5.2.2"]


def test_expiry_reports_4_4_7() -> None:
    message = bounce([failed("a@dst.test", "4.4.7 message expired after 432000s in the queue;"
                                           " last error: 451 4.4.1 connection refused")])
    block = message.get_payload()[1].get_payload()[1]
    assert block["Status"] == "4.4.7"
    assert block["Diagnostic-Code"].startswith("X-relaygw; 4.4.7")


def test_original_headers_quoted_body_not() -> None:
    message = bounce([failed("a@dst.test", "550 5.1.1 no")])
    quoted = message.get_payload()[2].get_payload()
    assert "Message-ID: <orig@src.test>" in quoted
    assert "Subject: hello" in quoted
    assert "the body, never quoted" not in quoted


@pytest.mark.parametrize(("reply", "status"), [
    ("550 5.1.1 user unknown", "5.1.1"),
    ("554 5.7.1 relay denied", "5.7.1"),
    ("450 4.2.0 try later", "5.2.0"),       # a failed recipient is never reported as 4.x.x
    ("4.4.7 expired", "4.4.7"),
    ("550 no enhanced code", "5.0.0"),
    ("556 5.1.10 null MX", "5.1.10"),
    ("550-5.7.1 first line of many", "5.7.1"),
    ("550 rejected: listed at 10.2.1.1", "5.0.0"),  # an address is no status
    ("554 host 192.168.4.5 blocked", "5.0.0"),
])
def test_status_of(reply: str, status: str) -> None:
    assert status_of(reply) == status


@pytest.mark.parametrize(("remote", "name"), [
    ("mx1.dst.test[192.0.2.1]:25", "mx1.dst.test"),
    ("smarthost.test:2525", "smarthost.test"),
    (None, None),
    ("", None),
])
def test_remote_name(remote: str | None, name: str | None) -> None:
    assert remote_name(remote) == name


def test_header_block_stops_at_the_blank_line() -> None:
    assert header_block(ORIGINAL).endswith(b"Message-ID: <orig@src.test>\r\n")
    assert header_block(b"No-Body: yes\r\n") == b"No-Body: yes\r\n"


def test_each_bounce_has_a_message_id_of_its_own() -> None:
    """A message can bounce in several rounds (a 550 now, expiry later)."""
    first = bounce([failed("a@dst.test", "550 5.1.1 no")])
    second = bounce([failed("b@dst.test", "4.4.7 message expired")])
    assert first["Message-ID"] != second["Message-ID"]
    assert first["Message-ID"].endswith(".bounce@relay.test>")
