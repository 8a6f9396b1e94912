"""Metrics: the counters the mail log feeds, the live gauges, the HTTP resources, the wiring."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.address import IPv4Address
from twisted.internet.defer import maybeDeferred
from twisted.internet.testing import MemoryReactorClock, StringTransport

from relaygw.config import parse_config
from relaygw.envelope import Envelope, Recipient
from relaygw.logs import MailLog
from relaygw.metrics import GatewayMetrics, metrics_site
from relaygw.scheduler import Event
from relaygw.service import build_service


def samples(metrics: GatewayMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The exposition text, parsed back: {(sample name, sorted labels): value}."""
    text = metrics.exposition().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def envelope(queue_id: str) -> Envelope:
    return Envelope(id=queue_id, sender="s@src.test", received=0.0, size=10, recipients=[
        Recipient(address=f"r@{queue_id}.test", original=f"r@{queue_id}.test", action="local")])


def event(kind: str, queue_id: str = "Q1") -> Event:
    env = envelope(queue_id)
    return Event(kind, env, env.recipients[0], "250 ok", 1.0)


def test_a_known_sequence_gives_exactly_those_counts() -> None:
    metrics = GatewayMetrics()
    log = MailLog()
    log.metrics = metrics
    log.received(envelope("Q1"), "192.0.2.1")
    log.received(envelope("Q2"), "192.0.2.1")
    log.outcome(event("delivered"))
    log.outcome(event("deferred"))
    log.outcome(event("bounced"))
    log.reject("192.0.2.1", "RCPT", "554 5.7.1 Relay access denied", "relay_denied")
    log.reject("192.0.2.1", "RCPT", "554 5.7.1 Relay access denied", "relay_denied")
    log.reject("192.0.2.1", "DATA", "552 5.3.4 too big", "size", queue_id="Q3")

    got = samples(metrics)
    assert got[("relaygw_messages_received_total", ())] == 2.0
    for result in ("delivered", "deferred", "bounced"):
        assert got[("relaygw_deliveries_total", (("result", result),))] == 1.0
    assert got[("relaygw_deliveries_expired_total", ())] == 0.0
    assert got[("relaygw_smtp_rejections_total", (("reason", "relay_denied"),))] == 2.0
    assert got[("relaygw_smtp_rejections_total", (("reason", "size"),))] == 1.0
    rejections = {labels: value for (name, labels), value in got.items()
                  if name == "relaygw_smtp_rejections_total"}
    assert sum(rejections.values()) == 3.0


def test_series_exist_at_zero_before_any_event() -> None:
    got = samples(GatewayMetrics())
    assert got[("relaygw_messages_received_total", ())] == 0.0
    for result in ("delivered", "deferred", "bounced"):
        assert got[("relaygw_deliveries_total", (("result", result),))] == 0.0
    for reason in ("relay_denied", "unknown_mailbox", "no_route", "too_many_connections"):
        assert got[("relaygw_smtp_rejections_total", (("reason", reason),))] == 0.0
    assert got[("relaygw_queue_messages", ())] == 0.0
    assert got[("relaygw_smtp_connections", ())] == 0.0


def test_expired_counts_as_bounced_and_as_expired() -> None:
    metrics = GatewayMetrics()
    metrics.outcome(event("expired"))
    got = samples(metrics)
    assert got[("relaygw_deliveries_total", (("result", "bounced"),))] == 1.0
    assert got[("relaygw_deliveries_expired_total", ())] == 1.0


def test_an_unlisted_reason_still_counts() -> None:
    metrics = GatewayMetrics()
    metrics.reject("something_new")
    assert samples(metrics)[("relaygw_smtp_rejections_total",
                             (("reason", "something_new"),))] == 1.0


def test_gauges_read_the_gateway_at_scrape_time() -> None:
    gateway = SimpleNamespace(scheduler=SimpleNamespace(messages={}),
                              connections=SimpleNamespace(total=0))
    metrics = GatewayMetrics()
    metrics.bind(gateway)
    gateway.scheduler.messages.update({"A": object(), "B": object(), "C": object()})
    gateway.connections.total = 4
    got = samples(metrics)
    assert got[("relaygw_queue_messages", ())] == 3.0
    assert got[("relaygw_smtp_connections", ())] == 4.0
    del gateway.scheduler.messages["A"]
    gateway.connections.total = 1
    got = samples(metrics)
    assert got[("relaygw_queue_messages", ())] == 2.0
    assert got[("relaygw_smtp_connections", ())] == 1.0


def test_registries_are_independent() -> None:
    one, two = GatewayMetrics(), GatewayMetrics()
    one.received(envelope("Q1"), "x")
    assert samples(one)[("relaygw_messages_received_total", ())] == 1.0
    assert samples(two)[("relaygw_messages_received_total", ())] == 0.0


# --- HTTP: the real Site, fed raw requests over an in-memory transport ----------------------


def http_get(metrics: GatewayMetrics, path: str) -> tuple[int, dict[str, str], bytes]:
    site = metrics_site(metrics)
    protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(f"GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n".encode())
    raw = transport.value()
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip()
               for k, _, v in (line.partition(":") for line in header_lines)}
    return int(status_line.split()[1]), headers, body


def test_http_metrics_serves_the_exposition_text() -> None:
    metrics = GatewayMetrics()
    metrics.received(envelope("Q1"), "x")
    metrics.outcome(event("delivered"))
    status, headers, body = http_get(metrics, "/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain")
    got = {(s.name, tuple(sorted(s.labels.items()))): s.value
           for family in text_string_to_metric_families(body.decode()) for s in family.samples}
    assert got[("relaygw_messages_received_total", ())] == 1.0
    assert got[("relaygw_deliveries_total", (("result", "delivered"),))] == 1.0


def test_http_healthz_and_unknown_paths() -> None:
    metrics = GatewayMetrics()
    assert http_get(metrics, "/healthz")[::2] == (200, b"ok")
    assert http_get(metrics, "/nothing")[0] == 404


# --- wiring ------------------------------------------------------------------------------

CONFIG = """
[server]
hostname = "relay.test"
[[listener]]
endpoint = "tcp:2525:interface=127.0.0.1"
[queue]
directory = "{spool}"
[[route]]
domains = ["*"]
action = "relay"
"""


def sync_run(fn, *args):  # type: ignore[no-untyped-def]
    return maybeDeferred(fn, *args)


def test_build_service_listens_for_metrics_when_configured(tmp_path: Path) -> None:
    text = CONFIG.format(spool=tmp_path / "spool") + \
        '[metrics]\nlisten = "tcp:9125:interface=127.0.0.1"\n'
    reactor = MemoryReactorClock()
    top = build_service(parse_config(text), reactor, run_blocking=sync_run)
    top.startService()
    try:
        assert [(port, interface) for port, _, _, interface in reactor.tcpServers] == [
            (2525, "127.0.0.1"), (9125, "127.0.0.1")]
        gateway = top.getServiceNamed("gateway")
        metrics = gateway.maillog.metrics
        assert isinstance(metrics, GatewayMetrics)
        gateway.maillog.received(envelope("Q1"), "x")
        gateway.connections.total = 2
        got = samples(metrics)
        assert got[("relaygw_messages_received_total", ())] == 1.0
        assert got[("relaygw_smtp_connections", ())] == 2.0
        assert got[("relaygw_queue_messages", ())] == 0.0
    finally:
        top.stopService()


def test_build_service_without_metrics_does_not_listen(tmp_path: Path) -> None:
    reactor = MemoryReactorClock()
    top = build_service(parse_config(CONFIG.format(spool=tmp_path / "spool")), reactor,
                        run_blocking=sync_run)
    top.startService()
    try:
        assert [port for port, *_ in reactor.tcpServers] == [2525]
        assert top.getServiceNamed("gateway").maillog.metrics is None
    finally:
        top.stopService()
