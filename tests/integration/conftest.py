"""Fixtures for the integration tests: the real daemon, an SMTP sink, a DNS server, a CA."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .dnsfixture import DNSServer
from .harness import DaemonFactory, pick_port
from .sink import Script, SMTPSink
from .tlsutil import TestCA

SinkFactory = Callable[..., SMTPSink]


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[DaemonFactory]:
    """Start ``twistd relaygw`` processes (``daemons.start(config)``); all stopped at the end."""
    factory = DaemonFactory(tmp_path / "daemons")
    try:
        yield factory
    finally:
        factory.stop_all()


@pytest.fixture(scope="module")
def module_daemons(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonFactory]:
    """As ``daemons``, shared by the tests of one module (for read-only dialog tests)."""
    factory = DaemonFactory(tmp_path_factory.mktemp("daemons"))
    try:
        yield factory
    finally:
        factory.stop_all()


@pytest.fixture
def sink_factory() -> Iterator[SinkFactory]:
    """``sink_factory(host="127.0.0.2", port=None, script=None, tls=None)`` -> started sink."""
    sinks: list[SMTPSink] = []

    def make(host: str = "127.0.0.2", port: int | None = None, *, script: Script | None = None,
             **kwargs: object) -> SMTPSink:
        sink = SMTPSink(host, port or pick_port(host), script=script, **kwargs)  # type: ignore[arg-type]
        sinks.append(sink)
        return sink.start()

    try:
        yield make
    finally:
        for sink in sinks:
            sink.stop()


@pytest.fixture
def dns_server(tmp_path: Path) -> Iterator[DNSServer]:
    """An unstarted DNS server; ``dns_server.start(records)`` runs it. Stopped at the end."""
    server = DNSServer(tmp_path / "dns")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def test_ca(tmp_path: Path) -> TestCA:
    return TestCA(tmp_path / "ca")
