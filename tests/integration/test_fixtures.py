"""Self-tests of the harness: the sink, the DNS server, the CA and the TOML writer."""

from __future__ import annotations

import smtplib
import tomllib

import dns.exception
import dns.resolver
import pytest

from .conftest import SinkFactory
from .dnsfixture import DNSServer
from .harness import RawSMTP, Reply, base_config, make_message, pick_common_port, to_toml
from .sink import Script
from .tlsutil import TestCA

pytestmark = pytest.mark.integration


def test_toml_writer_round_trips() -> None:
    config = base_config(mailboxes=["alice"])
    config["aliases"] = {"@old.example.test": ["{local}@example.test"], "a@b.test": ["c@d.test"]}
    config["listener"] = [{"endpoint": "tcp:2525:interface=127.0.0.1", "kind": "smtp"}]
    config["limits"] = {"max_message_size": 1000, "command_timeout": "1s"}
    assert tomllib.loads(to_toml(config)) == config


def test_reply_enhanced_code_check() -> None:
    assert Reply(250, ("2.0.0 Ok",)).has_enhanced_codes()
    assert Reply(250, ("2.0.0 a", "2.0.0 b")).enhanced == "2.0.0"
    assert not Reply(250, ("2.0.0 a", "b")).has_enhanced_codes()
    assert not Reply(550, ("4.1.1 wrong class",)).has_enhanced_codes()
    assert not Reply(500, ("Error",)).has_enhanced_codes()


def test_sink_records_a_message_from_smtplib(sink_factory: SinkFactory) -> None:
    sink = sink_factory("127.0.0.2")
    message = make_message("a@example.test", ["b@example.net"], body="one\r\n.two\r\n")
    with smtplib.SMTP(sink.host, sink.port, timeout=10) as client:
        code, features = client.ehlo("client.example.test")
        assert code == 250 and b"PIPELINING" in features
        client.sendmail("a@example.test", ["b@example.net", "c@example.net"], message)
    (got,) = sink.wait_for_messages(1)
    assert got.mail_from == "a@example.test"
    assert got.rcpt_tos == ("b@example.net", "c@example.net")
    assert got.helo == "client.example.test"
    assert not got.tls
    assert b"\r\n.two\r\n" in got.content  # dot-unstuffed


def test_sink_scripted_replies(sink_factory: SinkFactory) -> None:
    sink = sink_factory("127.0.0.3", script=Script(
        rcpt={"bad@example.net": "550 5.1.1 no such user"},
        data=["451 4.3.0 try again"],
    ))
    message = make_message("a@example.test", ["good@example.net"])
    with smtplib.SMTP(sink.host, sink.port, timeout=10) as client:
        client.ehlo("c.example.test")
        assert client.mail("a@example.test")[0] == 250
        assert client.rcpt("bad@example.net") == (550, b"5.1.1 no such user")
        assert client.rcpt("good@example.net")[0] == 250
        assert client.data(message) == (451, b"4.3.0 try again")
        client.rset()
        assert client.mail("a@example.test")[0] == 250
        assert client.rcpt("good@example.net")[0] == 250
        assert client.data(message)[0] == 250  # the list was used up: accept
    assert len(sink.wait_for_messages(1)) == 1

    sink.script = Script(greeting="421 4.3.2 busy")
    with RawSMTP(sink.host, sink.port) as raw:
        assert raw.read_reply().code == 421
        assert raw.wait_closed()


def test_sinks_share_one_port_on_several_addresses(sink_factory: SinkFactory) -> None:
    hosts = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    port = pick_common_port(hosts)
    sinks = [sink_factory(host, port) for host in hosts]
    for sink in sinks:
        with smtplib.SMTP(sink.host, port, timeout=10) as client:
            client.sendmail("a@example.test", ["x@example.net"], make_message("a@x", ["x@y"]))
    assert all(len(s.wait_for_messages(1)) == 1 for s in sinks)


def test_sink_starttls_with_test_ca(sink_factory: SinkFactory, test_ca: TestCA) -> None:
    cert = test_ca.issue(["mx1.example.net"], ips=["127.0.0.4"])
    sink = sink_factory("127.0.0.4", tls=cert.server_context())
    with smtplib.SMTP(sink.host, sink.port, timeout=10) as client:
        client.ehlo("c.example.test")
        assert client.has_extn("starttls")
        client.starttls(context=test_ca.client_context())  # verifies chain and IP SAN
        client.ehlo("c.example.test")
        assert not client.has_extn("starttls")
        client.sendmail("a@example.test", ["b@example.net"], make_message("a@x", ["b@y"]))
    (got,) = sink.wait_for_messages(1)
    assert got.tls


@pytest.fixture
def running_dns(dns_server: DNSServer) -> DNSServer:
    return dns_server.start({
        "example.net": {"MX": [[10, "mx1.example.net"], [20, "mx2.example.net"]]},
        "mx1.example.net": {"A": ["127.0.0.2"]},
        "mx2.example.net": {"A": ["127.0.0.3"], "AAAA": ["::1"]},
        "nullmx.example.net": {"MX": [[0, "."]]},
        "nomx.example.net": {"A": ["127.0.0.4"]},
    }, timeout=["slow.example.net"])


def _resolver(server: DNSServer) -> dns.resolver.Resolver:
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [server.host]
    resolver.port = server.port
    resolver.lifetime = 3.0
    return resolver


def test_dns_fixture_serves_mx_a_nullmx_nxdomain(running_dns: DNSServer) -> None:
    resolver = _resolver(running_dns)
    mx = sorted((r.preference, r.exchange.to_text()) for r in resolver.resolve("example.net", "MX"))
    assert mx == [(10, "mx1.example.net."), (20, "mx2.example.net.")]
    assert [r.address for r in resolver.resolve("mx1.example.net", "A")] == ["127.0.0.2"]
    assert [r.address for r in resolver.resolve("mx2.example.net", "AAAA")] == ["::1"]
    (null,) = resolver.resolve("nullmx.example.net", "MX")
    assert (null.preference, null.exchange.to_text()) == (0, ".")
    with pytest.raises(dns.resolver.NXDOMAIN):
        resolver.resolve("missing.example.net", "MX")
    with pytest.raises(dns.resolver.NoAnswer):
        resolver.resolve("nomx.example.net", "MX")
    tcp = resolver.resolve("example.net", "MX", tcp=True)
    assert len(tcp) == 2


def test_dns_fixture_timeout_and_update(running_dns: DNSServer) -> None:
    resolver = _resolver(running_dns)
    resolver.lifetime = 1.0
    with pytest.raises(dns.exception.Timeout):
        resolver.resolve("slow.example.net", "MX")
    running_dns.update({"example.net": {"MX": [[5, "mx9.example.net"]]}})
    (mx,) = resolver.resolve("example.net", "MX")
    assert mx.exchange.to_text() == "mx9.example.net."
