"""Prometheus metrics: ``[metrics] listen`` serves ``/metrics`` and ``/healthz``.

Each gateway has its own ``CollectorRegistry`` (never prometheus_client's
global one), so tests and several gateways in one process stay independent.
The counters are fed by the mail log (``MailLog.metrics``), which already sees
every event; the gauges read the gateway's live state at scrape time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge
from prometheus_client.exposition import generate_latest
from twisted.web.pages import notFound
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request, Site

from relaygw.envelope import Envelope
from relaygw.scheduler import Event

# Delivery outcomes, per recipient. "expired" (given up after max_queue_time)
# is a bounce: it counts under result="bounced", and also in
# relaygw_deliveries_expired_total, so that sum(relaygw_deliveries_total)
# still counts each final outcome once.
RESULTS = ("delivered", "deferred", "bounced")

# The reasons the SMTP server gives MailLog.reject (smtpserver.py, routing.py),
# exposed at 0 from the start; any other reason still counts when it happens.
REJECTION_REASONS = (
    "relay_denied", "unknown_mailbox", "rejected", "no_route", "syntax",
    "too_many_recipients", "size", "bare_newline", "line_too_long", "hops", "storage",
    "timeout", "too_many_connections", "etrn_denied", "auth_failed",
)


class GatewayMetrics:
    """The gateway's metrics, in their own registry; the MailLog's observer."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.messages_received = Counter(
            "relaygw_messages_received", "Messages accepted into the queue.",
            registry=self.registry)
        self.deliveries = Counter(
            "relaygw_deliveries", "Delivery outcomes per recipient (expired counts as bounced).",
            ["result"], registry=self.registry)
        # The labelled children, looked up once: ``.labels()`` takes a lock and
        # checks its arguments at every call, and the counters move per message.
        self._deliveries = {result: self.deliveries.labels(result=result)
                            for result in RESULTS}
        self.expired = Counter(
            "relaygw_deliveries_expired",
            "Recipients bounced because they stayed queued too long (also in bounced).",
            registry=self.registry)
        self.rejections = Counter(
            "relaygw_smtp_rejections", "SMTP commands and connections refused, by reason.",
            ["reason"], registry=self.registry)
        self._rejections = {reason: self.rejections.labels(reason=reason)
                            for reason in REJECTION_REASONS}
        self.queue_messages = Gauge(
            "relaygw_queue_messages", "Messages in the queue (held by the scheduler).",
            registry=self.registry)
        self.smtp_connections = Gauge(
            "relaygw_smtp_connections", "Open SMTP sessions, all listeners.",
            registry=self.registry)

    def bind(self, gateway: Any) -> None:
        """Read the gauges from ``gateway`` (its scheduler and connections) at scrape time."""
        self.watch(lambda: len(gateway.scheduler.messages), lambda: gateway.connections.total)

    def watch(self, queue_messages: Callable[[], float],
              smtp_connections: Callable[[], float]) -> None:
        self.queue_messages.set_function(queue_messages)
        self.smtp_connections.set_function(smtp_connections)

    # --- the MailLog observer ----------------------------------------------------------

    def received(self, envelope: Envelope, client: str) -> None:
        self.messages_received.inc()

    def reject(self, reason: str) -> None:
        _child(self._rejections, self.rejections, reason).inc()

    def outcome(self, event: Event) -> None:
        kind = event.kind
        if kind == "expired":
            self.expired.inc()
            kind = "bounced"
        _child(self._deliveries, self.deliveries, kind).inc()

    # --- exposition ----------------------------------------------------------------------

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class MetricsPage(Resource):
    """``/metrics``: the exposition text, generated on the reactor thread (it is cheap:
    a handful of series), so no thread pool is involved."""

    isLeaf = True

    def __init__(self, metrics: GatewayMetrics) -> None:
        super().__init__()
        self.metrics = metrics

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
        return self.metrics.exposition()

    render_HEAD = render_GET


class HealthPage(Resource):
    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"ok"

    render_HEAD = render_GET


class Root(Resource):
    def getChild(self, path: bytes, request: Request) -> IResource:
        return notFound()


class QuietSite(Site):
    """No access log: a scrape every few seconds would drown the mail log."""

    def log(self, request: Request) -> None:
        pass


def metrics_site(metrics: GatewayMetrics) -> Site:
    """The HTTP site for ``[metrics] listen``: ``/metrics`` and ``/healthz``."""
    root = Root()
    root.putChild(b"metrics", MetricsPage(metrics))
    root.putChild(b"healthz", HealthPage())
    site = QuietSite(root)
    site.displayTracebacks = False
    return site


def _child(children: dict[str, Any], counter: Counter, value: str) -> Any:
    """The counter's child for its one label's ``value``, looked up once and kept."""
    child = children.get(value)
    if child is None:
        child = children[value] = counter.labels(value)
    return child
