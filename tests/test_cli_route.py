"""``relaygwctl route ADDRESS``: the route, then the next hop with what the DNS says.

A real twisted.names server (tests/integration/dnsfixture.py, a child process on
127.0.0.1 and a free port) answers from a dict; the CLI asks it synchronously
through ``[dns] nameservers``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from integration.dnsfixture import DNSServer
from relaygw.cli import main

ZONE = {
    "mx.test": {"MX": [[20, "mx2.mx.test"], [10, "mx1.mx.test"]]},
    "mx1.mx.test": {"A": ["192.0.2.1"]},
    "mx2.mx.test": {"A": ["192.0.2.2"], "AAAA": ["2001:db8::2"]},
    "implicit.test": {"A": ["192.0.2.3"]},
    "nullmx.test": {"MX": [[0, "."]]},
}


@pytest.fixture(scope="module")
def dns_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DNSServer]:
    server = DNSServer(tmp_path_factory.mktemp("dns")).start(ZONE, timeout=["slow.test"])
    yield server
    server.stop()


@pytest.fixture
def config(tmp_path: Path, dns_server: DNSServer) -> Path:
    path = tmp_path / "relaygw.toml"
    path.write_text(f'''
[server]
hostname = "relay.example.test"

[[listener]]
endpoint = "tcp:0:interface=127.0.0.1"

[queue]
directory = "{tmp_path / 'spool'}"

[relay]
trusted_networks = ["127.0.0.0/8"]

[dns]
nameservers = ["{dns_server.nameserver}"]
timeout = "1s"

[[route]]
domains = ["hub.test"]
action = "relay"
via = "smarthost.test:2525"

[[route]]
domains = ["*"]
action = "relay"
''')
    return path


def route(config: Path, address: str, capsys: pytest.CaptureFixture[str]) -> list[str]:
    assert main(["--config", str(config), "route", address]) == 0
    out = capsys.readouterr().out
    return out.splitlines()


def next_hop(lines: list[str]) -> list[str]:
    start = next(i for i, line in enumerate(lines) if line.startswith("next hop for "))
    return lines[start:]


def test_mx_records_in_preference_order_with_addresses(config: Path,
                                                      capsys: pytest.CaptureFixture[str]
                                                      ) -> None:
    lines = route(config, "user@mx.test", capsys)
    assert any(line.startswith("trusted client: user@mx.test: route 2") for line in lines)
    assert next_hop(lines) == [
        "next hop for mx.test: MX, port 25, tls opportunistic",
        "  MX 10 mx1.mx.test (192.0.2.1)",
        "  MX 20 mx2.mx.test (192.0.2.2, 2001:db8::2)",
    ]


def test_implicit_mx(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert next_hop(route(config, "user@implicit.test", capsys))[1:] == [
        "  implicit MX: A 192.0.2.3"]


def test_null_mx(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert next_hop(route(config, "user@nullmx.test", capsys))[1:] == [
        "  null MX (RFC 7505): mail to this domain fails"]


def test_nxdomain(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert next_hop(route(config, "user@nowhere.test", capsys))[1:] == [
        "  NXDOMAIN: nowhere.test does not exist"]


def test_dns_failure_is_information_not_an_error(config: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    [line] = next_hop(route(config, "user@slow.test", capsys))[1:]
    assert line.startswith("  DNS lookup failed: ")


def test_smarthost_needs_no_dns(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lines = route(config, "user@hub.test", capsys)
    assert next_hop(lines) == [
        "next hop for hub.test: smarthost smarthost.test:2525, tls opportunistic"]
