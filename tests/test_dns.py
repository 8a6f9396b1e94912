"""Next-hop resolution: MX order, implicit MX, null MX, errors, the TTL cache, dnspython."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.names import authority, common, server
from twisted.names import dns as tdns
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import TestCase

from relaygw import dns as dns_module
from relaygw.config import DNSConfig
from relaygw.dns import (
    Answer,
    CachingLookup,
    DNSError,
    DNSPythonLookup,
    Hop,
    HostsFile,
    NextHopResolver,
    NXDomain,
    PermanentDNSError,
    TransientDNSError,
    address_literal,
    build_resolver,
    lookup_failed,
)


class FakeLookup:
    """Scripted answers: (name, type) -> Answer or an exception; unknown names are NODATA."""

    def __init__(self, table: dict[tuple[str, str], Answer | Exception]) -> None:
        self.table = table
        self.calls: list[tuple[str, str]] = []

    def lookup(self, name: str, rdtype: str) -> Deferred[Answer]:
        self.calls.append((name, rdtype))
        result = self.table.get((name, rdtype), Answer((), 60))
        if isinstance(result, Exception):
            return fail(result)
        return succeed(result)


class Reverser:
    """An rng whose shuffle reverses: equal-preference groups come out visibly reordered."""

    def shuffle(self, items: list[object]) -> None:
        items.reverse()


def resolved(d: Deferred[list[Hop]]) -> list[Hop]:
    results: list[object] = []
    d.addBoth(results.append)
    assert results, "the Deferred should have fired"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]  # type: ignore[return-value]


def dns_error(d: Deferred[list[Hop]]) -> DNSError:
    results: list[object] = []
    d.addBoth(results.append)
    assert isinstance(results[0], Failure), f"expected a failure, got {results[0]!r}"
    assert isinstance(results[0].value, DNSError)
    return results[0].value


def a(*addresses: str) -> Answer:
    return Answer(tuple(addresses), 300)


def mx(*records: tuple[int, str]) -> Answer:
    return Answer(tuple(records), 300)


# --- next hops -----------------------------------------------------------------------


def test_mx_records_are_tried_by_preference_with_ipv4_first() -> None:
    lookup = FakeLookup({
        ("example.test", "MX"): mx((20, "mx2.example.test."), (10, "mx1.example.test.")),
        ("mx1.example.test", "A"): a("192.0.2.1"),
        ("mx1.example.test", "AAAA"): a("2001:db8::1"),
        ("mx2.example.test", "A"): a("192.0.2.2"),
    })
    hops = resolved(NextHopResolver(lookup).resolve_domain("Example.TEST.", 25))
    assert hops == [Hop("mx1.example.test", "192.0.2.1", 25),
                    Hop("mx1.example.test", "2001:db8::1", 25),
                    Hop("mx2.example.test", "192.0.2.2", 25)]
    assert hops[0].label == "mx1.example.test[192.0.2.1]:25"


def test_equal_preferences_are_shuffled_by_the_injected_rng() -> None:
    lookup = FakeLookup({
        ("example.test", "MX"): mx((10, "a.example.test"), (10, "b.example.test"),
                                   (5, "first.example.test"), (20, "c.example.test"),
                                   (20, "d.example.test")),
    })
    resolver = NextHopResolver(lookup, rng=Reverser())  # type: ignore[arg-type]
    assert resolver.order_mx(lookup.table[("example.test", "MX")].values) == [
        "first.example.test", "b.example.test", "a.example.test",
        "d.example.test", "c.example.test"]


def test_a_seeded_rng_gives_both_orders_and_never_breaks_preference() -> None:
    records = [(10, "a.test"), (10, "b.test"), (30, "z.test")]
    orders = {tuple(NextHopResolver(FakeLookup({}), rng=random.Random(seed)).order_mx(records))
              for seed in range(20)}
    assert orders == {("a.test", "b.test", "z.test"), ("b.test", "a.test", "z.test")}


def test_no_mx_falls_back_to_the_domains_own_addresses() -> None:
    lookup = FakeLookup({
        ("example.test", "A"): a("192.0.2.7"),
        ("example.test", "AAAA"): a("2001:db8::7"),
    })
    hops = resolved(NextHopResolver(lookup).resolve_domain("example.test", 2525))
    assert hops == [Hop("example.test", "192.0.2.7", 2525),
                    Hop("example.test", "2001:db8::7", 2525)]


def test_null_mx_fails_permanently_without_looking_up_addresses() -> None:
    lookup = FakeLookup({("example.test", "MX"): mx((0, "."))})
    error = dns_error(NextHopResolver(lookup).resolve_domain("example.test", 25))
    assert error.permanent
    assert error.reply.startswith("556 5.1.10 ")
    assert lookup.calls == [("example.test", "MX")]


def test_nxdomain_fails_permanently() -> None:
    lookup = FakeLookup({("nowhere.test", "MX"): NXDomain("nowhere.test")})
    error = dns_error(NextHopResolver(lookup).resolve_domain("nowhere.test", 25))
    assert isinstance(error, PermanentDNSError)
    assert error.reply == "550 5.1.2 Host or domain name not found: nowhere.test"


def test_a_timeout_defers() -> None:
    lookup = FakeLookup({("example.test", "MX"): lookup_failed("timeout")})
    error = dns_error(NextHopResolver(lookup).resolve_domain("example.test", 25))
    assert isinstance(error, TransientDNSError)
    assert not error.permanent
    assert error.reply.startswith("451 4.4.3 ")


def test_unresolvable_mx_hosts_are_skipped() -> None:
    lookup = FakeLookup({
        ("example.test", "MX"): mx((10, "gone.example.test"), (20, "mx.example.test")),
        ("gone.example.test", "A"): NXDomain("gone"),
        ("gone.example.test", "AAAA"): NXDomain("gone"),
        ("mx.example.test", "A"): a("192.0.2.9"),
    })
    assert resolved(NextHopResolver(lookup).resolve_domain("example.test", 25)) == [
        Hop("mx.example.test", "192.0.2.9", 25)]


def test_mx_hosts_that_time_out_defer_but_missing_ones_fail() -> None:
    flaky = FakeLookup({
        ("example.test", "MX"): mx((10, "mx.example.test")),
        ("mx.example.test", "A"): lookup_failed("timeout"),
    })
    assert not dns_error(NextHopResolver(flaky).resolve_domain("example.test", 25)).permanent
    missing = FakeLookup({
        ("example.test", "MX"): mx((10, "mx.example.test")),
        ("mx.example.test", "A"): NXDomain("mx"),
        ("mx.example.test", "AAAA"): NXDomain("mx"),
    })
    error = dns_error(NextHopResolver(missing).resolve_domain("example.test", 25))
    assert error.permanent
    assert error.enhanced == "5.4.4"


def test_address_literals_go_straight_there() -> None:
    lookup = FakeLookup({})
    resolver = NextHopResolver(lookup)
    assert resolved(resolver.resolve_domain("[192.0.2.1]", 25)) == [
        Hop("192.0.2.1", "192.0.2.1", 25)]
    assert resolved(resolver.resolve_domain("[ipv6:2001:DB8::1]", 25)) == [
        Hop("2001:db8::1", "2001:db8::1", 25)]
    assert lookup.calls == []
    assert address_literal("[not-an-address]") is None


def test_smarthost_by_address_or_by_name() -> None:
    lookup = FakeLookup({("smart.example.test", "A"): a("10.1.0.25")})
    resolver = NextHopResolver(lookup)
    assert resolved(resolver.resolve_host("10.1.0.26", 587)) == [
        Hop("10.1.0.26", "10.1.0.26", 587)]
    assert resolved(resolver.resolve_host("smart.example.test", 587)) == [
        Hop("smart.example.test", "10.1.0.25", 587)]
    assert ("smart.example.test", "MX") not in lookup.calls


def test_smarthost_localhost_resolves_without_dns(tmp_path: Path) -> None:
    """Even where the hosts file lacks it and the DNS would say NXDOMAIN."""
    hosts = tmp_path / "hosts"
    hosts.write_text("192.0.2.9 other.test\n")
    lookup = FakeLookup({("localhost", "A"): NXDomain("localhost")})
    for hosts_file in (hosts, None, tmp_path / "absent"):
        resolver = NextHopResolver(lookup, hosts_file=hosts_file)
        assert resolved(resolver.resolve_host("LocalHost.", 40027)) == [
            Hop("localhost", "127.0.0.1", 40027), Hop("localhost", "::1", 40027)]
    assert lookup.calls == []


def test_smarthost_name_in_the_hosts_file_resolves_from_it(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text("# comment smart.example.test\n"
                     "2001:db8::25 smart.example.test\n"
                     "192.0.2.25\tsmart.example.test smart  # the hub\n"
                     "::1 localhost\n")
    lookup = FakeLookup({("smart.example.test", "A"): a("10.1.0.25"),
                         ("other.example.test", "A"): a("10.1.0.26")})
    resolver = NextHopResolver(lookup, hosts_file=hosts)
    assert resolved(resolver.resolve_host("Smart.Example.TEST", 25)) == [
        Hop("smart.example.test", "192.0.2.25", 25),
        Hop("smart.example.test", "2001:db8::25", 25)]
    assert resolved(resolver.resolve_host("localhost", 25)) == [Hop("localhost", "::1", 25)]
    assert lookup.calls == []
    assert resolved(resolver.resolve_host("other.example.test", 25)) == [  # not in the file
        Hop("other.example.test", "10.1.0.26", 25)]


def test_unresolvable_smarthost_defers_rather_than_bounces() -> None:
    """A wrong ``via`` is the operator's to fix; the mail waits (Postfix's 4.3.5)."""
    lookup = FakeLookup({("gone.example.test", "A"): NXDomain("gone.example.test"),
                         ("gone.example.test", "AAAA"): NXDomain("gone.example.test")})
    resolver = NextHopResolver(lookup, hosts_file=None)
    for host in ("gone.example.test", "nodata.example.test"):
        error = dns_error(resolver.resolve_host(host, 25))
        assert isinstance(error, TransientDNSError)
        assert not error.permanent
        assert error.reply == (f"451 4.3.5 Host or domain name not found: {host} "
                               "(relayhost configuration problem)")


def test_duplicate_addresses_are_dropped_and_the_list_is_capped() -> None:
    table: dict[tuple[str, str], Answer | Exception] = {
        ("example.test", "MX"): mx(*[(i, f"mx{i}.example.test") for i in range(6)]),
    }
    for i in range(6):
        table[(f"mx{i}.example.test", "A")] = a(f"192.0.2.{i}", "192.0.2.100")
    hops = resolved(NextHopResolver(FakeLookup(table), max_addresses=4)
                    .resolve_domain("example.test", 25))
    assert [h.address for h in hops] == ["192.0.2.0", "192.0.2.100", "192.0.2.1", "192.0.2.2"]


# --- the cache -------------------------------------------------------------------------


def test_answers_are_cached_for_their_ttl() -> None:
    clock = Clock()
    inner = FakeLookup({("example.test", "MX"): Answer(((10, "mx.example.test"),), 60)})
    cache = CachingLookup(inner, clock)
    first = resolved(cache.lookup("example.test", "MX"))  # type: ignore[arg-type]
    clock.advance(59)
    assert resolved(cache.lookup("EXAMPLE.test.", "MX")) == first  # type: ignore[arg-type]
    assert len(inner.calls) == 1
    clock.advance(1)
    resolved(cache.lookup("example.test", "MX"))  # type: ignore[arg-type]
    assert len(inner.calls) == 2


def test_nxdomain_is_cached_but_timeouts_are_not() -> None:
    clock = Clock()
    inner = FakeLookup({("gone.test", "MX"): NXDomain("gone.test"),
                        ("slow.test", "MX"): lookup_failed("timeout")})
    cache = CachingLookup(inner, clock, nxdomain_ttl=30)
    for _ in range(2):
        cache.lookup("gone.test", "MX").addErrback(lambda f: f.trap(NXDomain))
        cache.lookup("slow.test", "MX").addErrback(lambda f: f.trap(TransientDNSError))
    assert inner.calls.count(("gone.test", "MX")) == 1
    assert inner.calls.count(("slow.test", "MX")) == 2
    clock.advance(30)
    cache.lookup("gone.test", "MX").addErrback(lambda f: f.trap(NXDomain))
    assert inner.calls.count(("gone.test", "MX")) == 2


def test_zero_ttl_is_not_cached_and_concurrent_questions_share_one_lookup() -> None:
    clock = Clock()
    pending: list[Deferred[Answer]] = []

    class SlowLookup:
        def lookup(self, name: str, rdtype: str) -> Deferred[Answer]:
            pending.append(Deferred())
            return pending[-1]

    cache = CachingLookup(SlowLookup(), clock)
    first, second = cache.lookup("a.test", "A"), cache.lookup("a.test", "A")
    assert len(pending) == 1
    pending[0].callback(Answer(("192.0.2.1",), 0))
    assert resolved(first) == resolved(second) == Answer(("192.0.2.1",), 0)  # type: ignore
    cache.lookup("a.test", "A")
    assert len(pending) == 2


# --- dnspython against a real DNS server on loopback -----------------------------------

SOA = tdns.Record_SOA(mname=b"ns.example.test", rname=b"hostmaster.example.test",
                      serial=1, refresh=60, retry=60, expire=60, minimum=60, ttl=60)


class Zone(authority.FileAuthority):
    """An in-memory authority (FileAuthority without the file)."""

    def __init__(self, soa: tuple[bytes, object], records: dict[bytes, list[object]]) -> None:
        common.ResolverBase.__init__(self)
        self.soa, self.records = soa, records


class Broken(common.ResolverBase):
    """Every question gets SERVFAIL."""

    def _lookup(self, name: bytes, cls: int, type: int, timeout: object) -> Deferred[object]:
        return fail(RuntimeError("backend down"))


class Silent(DatagramProtocol):
    def datagramReceived(self, data: bytes, addr: object) -> None:
        pass


class DNSPythonLookupTests(TestCase):
    """The threaded dnspython lookup, answering from twisted.names on 127.0.0.1."""

    def setUp(self) -> None:
        self.pool = ThreadPool(minthreads=0, maxthreads=2, name="test-dns")
        self.pool.start()
        self.addCleanup(self.pool.stop)

    def serve(self, resolver: object) -> int:
        factory = server.DNSServerFactory(authorities=[resolver])
        port = reactor.listenUDP(0, tdns.DNSDatagramProtocol(factory), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port

    def lookup_on(self, port: int, timeout: float = 2.0) -> DNSPythonLookup:
        return DNSPythonLookup(reactor, self.pool,
                               DNSConfig(nameservers=(("127.0.0.1", port),), timeout=timeout))

    def zone(self) -> Zone:
        return Zone((b"example.test", SOA), {
            b"example.test": [SOA, tdns.Record_MX(10, b"mx1.example.test", ttl=120),
                              tdns.Record_MX(20, b"mx2.example.test", ttl=120)],
            b"mx1.example.test": [tdns.Record_A("127.0.0.2", ttl=30)],
            b"nomail.example.test": [tdns.Record_MX(0, b"", ttl=30)],
        })

    async def test_mx_answer_with_ttl(self) -> None:
        lookup = self.lookup_on(self.serve(self.zone()))
        answer = await lookup.lookup("example.test", "MX")
        self.assertEqual(sorted(answer.values), [(10, "mx1.example.test"),
                                                 (20, "mx2.example.test")])
        self.assertEqual(answer.ttl, 120)

    async def test_nodata_and_nxdomain(self) -> None:
        lookup = self.lookup_on(self.serve(self.zone()))
        nodata = await lookup.lookup("mx1.example.test", "AAAA")
        self.assertEqual(nodata.values, ())
        with self.assertRaises(NXDomain):
            await lookup.lookup("missing.example.test", "MX")

    async def test_full_resolution_including_null_mx(self) -> None:
        lookup = CachingLookup(self.lookup_on(self.serve(self.zone())), reactor)
        resolver = NextHopResolver(lookup)
        hops = await resolver.resolve_domain("example.test", 2525)
        self.assertEqual(hops, [Hop("mx1.example.test", "127.0.0.2", 2525)])
        with self.assertRaises(PermanentDNSError) as caught:
            await resolver.resolve_domain("nomail.example.test", 25)
        self.assertEqual(caught.exception.enhanced, "5.1.10")

    async def test_servfail_is_transient(self) -> None:
        lookup = self.lookup_on(self.serve(Broken()))
        with self.assertRaises(TransientDNSError) as caught:
            await lookup.lookup("example.test", "MX")
        self.assertIn("SERVFAIL", caught.exception.reply)
        self.flushLoggedErrors(RuntimeError)  # twisted.names logs the backend's failure

    async def test_no_answer_within_the_timeout_is_transient(self) -> None:
        port = reactor.listenUDP(0, Silent(), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        lookup = self.lookup_on(port.getHost().port, timeout=0.2)
        with self.assertRaises(TransientDNSError) as caught:
            await lookup.lookup("example.test", "MX")
        self.assertIn("timeout", caught.exception.reply)


def test_nameservers_must_be_addresses() -> None:
    with pytest.raises(ValueError, match="not an IP address"):
        DNSPythonLookup(reactor, ThreadPool(),
                        DNSConfig(nameservers=(("dns.example.test", 53),)))


def test_the_production_stack_runs_its_pool_with_the_reactor() -> None:
    fake_reactor = MemoryReactorClock()
    resolver = build_resolver(DNSConfig(nameservers=(("127.0.0.1", 5353),)), fake_reactor)
    pool = resolver._lookup._lookup._pool  # type: ignore[attr-defined]
    assert not pool.started
    fake_reactor.run()  # runs the "when running" calls
    assert pool.started
    [(stop, args, kwargs)] = fake_reactor.triggers["during"]["shutdown"]
    stop(*args, **kwargs)
    assert pool.joined


def test_the_hosts_file_is_parsed_once_and_again_when_it_changes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text("192.0.2.25 smart.example.test\n")
    table = HostsFile(hosts)
    parses: list[str] = []
    real_parse = dns_module._parse_hosts
    monkeypatch.setattr(dns_module, "_parse_hosts",
                        lambda text: parses.append(text) or real_parse(text))
    assert table.addresses("smart.example.test") == ["192.0.2.25"]
    assert table.addresses("Smart.Example.Test.") == ["192.0.2.25"]
    assert len(parses) == 1  # a stat per lookup, not a read and a parse
    hosts.write_text("192.0.2.26 smart.example.test\n# and a longer file now\n")
    assert table.addresses("smart.example.test") == ["192.0.2.26"]
    assert len(parses) == 2
    hosts.unlink()
    assert table.addresses("smart.example.test") == []
