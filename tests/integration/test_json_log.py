"""The mail log as JSON lines: twistd --logger relaygw.logs.jsonLogger."""

from __future__ import annotations

import json
from typing import Any

import pytest

from .harness import TWISTD, DaemonFactory, base_config, make_message, send_smtplib, wait_for

pytestmark = pytest.mark.integration


def events(text: str) -> list[dict[str, Any]]:
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            found.append(json.loads(line))  # every JSON-looking line must parse
    return found


def test_json_log_lines_carry_the_mail_events(daemons: DaemonFactory) -> None:
    daemon = daemons.prepare(base_config(mailboxes=["alice"]))
    assert daemon.config_path is not None
    command = [str(TWISTD), "-n", "--pidfile=", "--logger", "relaygw.logs.jsonLogger",
               "relaygw", "--config", str(daemon.config_path)]
    daemon.command = lambda: command  # type: ignore[method-assign]
    daemon.start()
    message = make_message("s@remote.test", ["alice@example.test"])
    with daemon.smtp() as smtp:
        send_smtplib(smtp, "s@remote.test", ["alice@example.test"], message)
    with daemon.raw(source="127.0.0.5") as raw:  # an untrusted client tries to relay
        raw.banner()
        raw.ehlo("probe.example.net")
        raw.cmd("MAIL FROM:<x@example.net>")
        raw.cmd("RCPT TO:<victim@outside.test>")
        raw.cmd("QUIT")

    def mail_events() -> list[dict[str, Any]] | None:
        found = [e for e in events(daemon.output()) if e.get("event")]
        kinds = {e["event"] for e in found}
        return found if {"connect", "received", "delivered", "reject"} <= kinds else None

    found = wait_for(mail_events, 20, lambda: daemon.output()[-3000:])
    assert found is not None
    received = next(e for e in found if e["event"] == "received")
    delivered = next(e for e in found if e["event"] == "delivered")
    reject = next(e for e in found if e["event"] == "reject")
    assert received["queue_id"] == delivered["queue_id"]
    assert received["sender"] == "s@remote.test"
    assert delivered["recipient"] == "alice@example.test"
    assert delivered["relay"] == "local"
    assert delivered["reply"].startswith("250")
    assert reject["reason"] == "relay_denied"
    assert reject["reply"].startswith("554 5.7.1")
    assert reject["client"] == "127.0.0.5"
    assert reject["recipient"] == "victim@outside.test"
    # the readable text is there too, for people reading the JSON
    assert delivered["text"].startswith(f"{delivered['queue_id']}: to=<alice@example.test>")
