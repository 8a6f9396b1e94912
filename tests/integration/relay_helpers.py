"""Helpers for the relay integration tests (test_relay*.py): configs, queue, bounces.

Built on the shared harness (harness.py, sink.py, dnsfixture.py); nothing here sleeps a
fixed time: every wait polls against a deadline.
"""

from __future__ import annotations

import contextlib
import email.parser
import email.policy
import json
import subprocess
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from email.message import EmailMessage, Message
from pathlib import Path
from typing import Any

from .harness import (
    DELIVERY_TIMEOUT,
    HOSTNAME,
    RELAYGWCTL,
    Daemon,
    base_config,
    make_message,
    make_message_id,
    parse_message,
    send_smtplib,
    wait_for,
    wait_for_files,
)
from .sink import SMTPSink, SunkMessage

OWNER = "owner@example.test"   # a local sender: its bounces land in a Maildir we can read
MAILER_DAEMON = f"MAILER-DAEMON@{HOSTNAME}"


# --- configuration -----------------------------------------------------------------


def relay_config(
    *,
    routes: Iterable[Mapping[str, Any]] = (),
    nameserver: str | None = None,
    mx_port: int | None = None,
    tls: str | None = None,
    retry: list[str] | None = None,
    max_age: str | None = None,
) -> dict[str, Any]:
    """``base_config`` plus ``routes`` (tried before the others) and relay/DNS/queue knobs."""
    config = base_config(retry=retry or ["1s"])
    config["route"][:0] = [dict(r) for r in routes]
    if mx_port is not None:
        config["relay"]["mx_port"] = mx_port
    if tls is not None:
        config["relay"]["tls"] = tls
    if nameserver is not None:
        config["dns"] = {"nameservers": [nameserver], "timeout": "2s"}
    if max_age is not None:
        config["queue"]["max_age"] = max_age
    return config


def smarthost_route(domain: str, host: str, port: int, **extra: Any) -> dict[str, Any]:
    return {"domains": [domain], "action": "relay", "via": f"{host}:{port}", **extra}


# --- sending -----------------------------------------------------------------------


@dataclass(frozen=True)
class Sent:
    queue_id: str
    message_id: str
    data: bytes


def send(daemon: Daemon, rcpts: Iterable[str], *, sender: str = OWNER,
         body: str = "hello\r\n", subject: str = "relay test") -> Sent:
    """One message over smtplib from 127.0.0.1 (trusted); asserts the 250 queued reply."""
    rcpts = list(rcpts)
    mid = make_message_id()
    data = make_message(sender or "nobody@example.test", rcpts, subject, body, message_id=mid)
    with daemon.smtp(source="127.0.0.1") as client:
        client.ehlo("client.example.test")
        qid = send_smtplib(client, sender, rcpts, data)
    return Sent(qid, mid, data)


# --- the queue, seen through relaygwctl ---------------------------------------------


def queue_list(daemon: Daemon) -> list[dict[str, Any]]:
    """``relaygwctl --config FILE queue list --json``, run where twistd runs."""
    assert daemon.config_path is not None
    result = subprocess.run(
        [str(RELAYGWCTL), "--config", str(daemon.config_path), "queue", "list", "--json"],
        cwd=daemon.run_dir, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, f"relaygwctl queue list: {result.stdout}{result.stderr}"
    entries = json.loads(result.stdout)
    assert isinstance(entries, list), result.stdout
    return entries


def queue_recipient(daemon: Daemon, queue_id: str, address: str) -> dict[str, Any] | None:
    for entry in queue_list(daemon):
        if entry["id"] == queue_id:
            for rcpt in entry["recipients"]:
                if rcpt["address"].lower() == address.lower():
                    return rcpt  # type: ignore[no-any-return]
    return None


def wait_queue_recipient(daemon: Daemon, queue_id: str, address: str,
                         predicate: Callable[[dict[str, Any]], bool],
                         timeout: float = DELIVERY_TIMEOUT) -> dict[str, Any]:
    """Poll ``queue list --json`` until ``address`` of ``queue_id`` satisfies ``predicate``."""
    seen: list[Any] = []

    def check() -> dict[str, Any] | None:
        rcpt = queue_recipient(daemon, queue_id, address)
        seen[:] = [rcpt]
        return rcpt if rcpt is not None and predicate(rcpt) else None

    return wait_for(check, timeout, lambda: f"{queue_id} {address} in the queue: last seen "
                    f"{seen}\n{daemon.output()[-3000:]}", interval=0.2)


def wait_queue_empty(daemon: Daemon, timeout: float = DELIVERY_TIMEOUT) -> None:
    last: list[Any] = []

    def empty() -> bool:
        last[:] = queue_list(daemon)
        return not last

    wait_for(empty, timeout, lambda: f"an empty queue; have {last}\n{daemon.output()[-3000:]}",
             interval=0.2)


# --- bounces -----------------------------------------------------------------------


def owner_new(daemon: Daemon) -> Path:
    local, _, domain = OWNER.partition("@")
    return daemon.maildir(domain, local) / "new"


def owner_files(daemon: Daemon) -> list[Path]:
    new = owner_new(daemon)
    return sorted(p for p in new.iterdir() if p.is_file()) if new.is_dir() else []


def wait_bounces(daemon: Daemon, count: int = 1,
                 timeout: float = DELIVERY_TIMEOUT) -> list[Path]:
    try:
        return wait_for_files(owner_new(daemon), count, timeout)
    except AssertionError as e:
        raise AssertionError(f"{e}\n--- daemon output ---\n{daemon.output()[-4000:]}") from None


@dataclass
class Bounce:
    """An RFC 3464 report, taken apart with the email package."""

    message: EmailMessage
    per_message: Message           # the first block of message/delivery-status
    per_recipient: list[Message]   # one block per failed recipient
    headers_text: str              # the text/rfc822-headers part

    def recipient(self, address: str) -> Message:
        for block in self.per_recipient:
            if address.lower() in str(block["Final-Recipient"]).lower():
                return block
        raise AssertionError(f"no per-recipient block for {address}: "
                             f"{[str(b['Final-Recipient']) for b in self.per_recipient]}")


def parse_bounce(path: Path) -> Bounce:
    """Parse and check the RFC 3464 shape; assertion errors say what is missing."""
    msg = parse_message(path)
    assert msg.get_content_type() == "multipart/report", msg.get_content_type()
    assert msg.get_param("report-type") == "delivery-status", msg["Content-Type"]
    parts = list(msg.iter_parts())
    types = [p.get_content_type() for p in parts]
    assert "message/delivery-status" in types, types
    assert "text/rfc822-headers" in types, types
    assert types.index("message/delivery-status") < types.index("text/rfc822-headers"), types
    status = parts[types.index("message/delivery-status")]
    blocks = status.get_payload()
    assert isinstance(blocks, list) and len(blocks) >= 2, f"delivery-status blocks: {blocks!r}"
    headers = parts[types.index("text/rfc822-headers")]
    payload = headers.get_payload(decode=True)
    text = payload.decode("ascii", "replace") if isinstance(payload, bytes) else str(payload)
    return Bounce(message=msg, per_message=blocks[0], per_recipient=list(blocks[1:]),
                  headers_text=text)


def check_bounce_envelope(path: Path) -> Bounce:
    """From MAILER-DAEMON@<hostname>, envelope sender <> (Return-Path), reporting MTA us."""
    bounce = parse_bounce(path)
    msg = bounce.message
    assert MAILER_DAEMON.lower() in str(msg["From"]).lower(), msg["From"]
    assert msg.get_all("Return-Path") == ["<>"], msg.get_all("Return-Path")
    assert str(msg["To"]).strip("<> ").lower() == OWNER, msg["To"]
    assert HOSTNAME in str(bounce.per_message["Reporting-MTA"]), bounce.per_message.items()
    return bounce


def assert_failed_block(block: Message, address: str, status: str) -> None:
    assert address.lower() in str(block["Final-Recipient"]).lower(), block.items()
    assert str(block["Final-Recipient"]).lower().startswith("rfc822;"), block.items()
    assert str(block["Action"]).strip().lower() == "failed", block.items()
    assert str(block["Status"]).strip() == status, block.items()


# --- the sink ----------------------------------------------------------------------


def sunk_message_id(message: SunkMessage) -> str:
    parsed = email.parser.BytesParser(policy=email.policy.default).parsebytes(
        message.content, headersonly=True)
    return str(parsed["Message-ID"]).strip()


def sink_events(sink: SMTPSink, stage: str) -> list[str]:
    with sink.state.lock:
        return [detail for s, detail in sink.state.events if s == stage]


def mail_log_lines(daemon: Daemon, *needles: str) -> list[str]:
    lowered = [n.lower() for n in needles]
    return [line for line in daemon.log_lines() if all(n in line.lower() for n in lowered)]


def other_mail(daemon: Daemon, exclude: str = "barrier") -> list[Path]:
    """Every delivered file of this daemon but the barrier messages."""
    found = []
    for path in daemon.delivered():
        with contextlib.suppress(OSError):
            if f"{exclude}@remote.test".encode() not in path.read_bytes():
                found.append(path)
    return found
