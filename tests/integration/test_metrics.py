"""``[metrics] listen`` on the real daemon: /metrics counts what happened, /healthz says ok."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from .harness import (
    DELIVERY_TIMEOUT,
    DaemonFactory,
    base_config,
    is_listening,
    make_message,
    pick_port,
    send_smtplib,
    wait_for,
    wait_for_message,
)

pytestmark = pytest.mark.integration


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.status == 200
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_count_received_and_delivered_messages(daemons: DaemonFactory) -> None:
    metrics_port = pick_port()
    config = base_config()
    config["metrics"] = {"listen": f"tcp:{metrics_port}:interface=127.0.0.1"}
    daemon = daemons.start(config)
    wait_for(lambda: is_listening("127.0.0.1", metrics_port), 10.0, "metrics port listening")

    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/healthz",
                                timeout=5) as response:
        assert response.status == 200
        assert response.read() == b"ok"
    before = scrape(metrics_port)
    assert before[("relaygw_messages_received_total", ())] == 0.0
    assert before[("relaygw_deliveries_total", (("result", "delivered"),))] == 0.0

    with daemon.smtp() as smtp:
        smtp.ehlo("client.example.test")
        for n in range(2):
            send_smtplib(smtp, "alice@client.test", ["bob@example.test"],
                         make_message("alice@client.test", ["bob@example.test"], f"m{n}"))
        # One rejection: base_config routes rejected.test to action "reject".
        code, _ = smtp.mail("alice@client.test")
        assert code == 250
        code, _ = smtp.rcpt("x@rejected.test")
        assert code >= 500
        smtp.rset()
    wait_for_message(daemon, "example.test", "bob", count=2)

    def settled() -> dict | None:
        got = scrape(metrics_port)
        done = got[("relaygw_deliveries_total", (("result", "delivered"),))] == 2.0
        return got if done and got[("relaygw_queue_messages", ())] == 0.0 else None

    got = wait_for(settled, DELIVERY_TIMEOUT, lambda: repr(scrape(metrics_port)))
    assert got[("relaygw_messages_received_total", ())] == 2.0
    assert got[("relaygw_deliveries_total", (("result", "deferred"),))] == 0.0
    assert got[("relaygw_deliveries_total", (("result", "bounced"),))] == 0.0
    assert got[("relaygw_smtp_rejections_total", (("reason", "rejected"),))] == 1.0
    wait_for(lambda: scrape(metrics_port)[("relaygw_smtp_connections", ())] == 0.0,
             DELIVERY_TIMEOUT, "the SMTP session is closed")

    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/other", timeout=5)
    assert missing.value.code == 404
