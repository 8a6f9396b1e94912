"""Next hops for outbound relay: MX by preference, implicit MX, null MX, address literals.

Three layers, each replaceable in tests:

- ``DNSPythonLookup`` asks the DNS one question (name, type). It runs dnspython's
  synchronous resolver in a small, bounded thread pool rather than speaking DNS
  over Twisted UDP ourselves: dnspython already does the fiddly, well-tested
  parts (resolv.conf, retrying across nameservers, TCP fallback on truncation,
  CNAME chains, negative TTLs from the SOA), a lookup is short and bounded by
  ``[dns] timeout``, and a pool of a few threads caps the load we can put on it.
  Re-implementing the transport would be more code for us to get wrong.
- ``CachingLookup`` keeps answers (and NXDOMAIN) for their TTL on an injected
  clock, and shares one question in flight between callers.
- ``NextHopResolver`` turns a domain into an ordered list of ``Hop`` to try in
  turn, and DNS trouble into a ``DNSError`` that says whether to bounce or retry.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import dns.exception
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver
from twisted.internet.defer import Deferred, DeferredList, fail, succeed
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from relaygw.config import DNSConfig


@dataclass(frozen=True, slots=True)
class Hop:
    """One address to try: the name we check TLS against, where we connect."""

    hostname: str
    address: str
    port: int

    @property
    def label(self) -> str:
        """Postfix-style name for logs and DeliveryResult.remote."""
        return f"{self.hostname}[{self.address}]:{self.port}"


class DNSError(Exception):
    """A lookup that gives no hop; ``permanent`` decides bounce (True) or retry."""

    permanent = False

    def __init__(self, code: int, enhanced: str, text: str) -> None:
        super().__init__(f"{code} {enhanced} {text}")
        self.code = code
        self.enhanced = enhanced
        self.text = text

    @property
    def reply(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}"


class PermanentDNSError(DNSError):
    permanent = True


class TransientDNSError(DNSError):
    permanent = False


class NXDomain(Exception):
    """The name does not exist (a lookup's answer, cached like any other)."""


@dataclass(frozen=True, slots=True)
class Answer:
    """What one question got: MX values are (preference, host), A/AAAA are addresses.

    An empty ``values`` is NODATA: the name exists without records of that type.
    A null MX's host is ``"."``.
    """

    values: tuple[Any, ...]
    ttl: float


class Lookup(Protocol):
    """Asks one DNS question; errbacks with NXDomain or TransientDNSError only."""

    def lookup(self, name: str, rdtype: str) -> Deferred[Answer]: ...


def lookup_failed(text: str) -> TransientDNSError:
    return TransientDNSError(451, "4.4.3", f"Host or domain name lookup failed: {text}")


# --- dnspython in a thread pool -------------------------------------------------


def dns_thread_pool(reactor: Any, size: int = 4) -> ThreadPool:
    """A small pool started and stopped with ``reactor`` (like reactor.getThreadPool)."""
    pool = ThreadPool(minthreads=0, maxthreads=size, name="relaygw-dns")
    reactor.callWhenRunning(pool.start)
    reactor.addSystemEventTrigger("during", "shutdown", pool.stop)
    return pool


def system_resolver() -> dns.resolver.Resolver:
    """The resolver of /etc/resolv.conf; a local one if that file is missing or empty."""
    try:
        return dns.resolver.Resolver(configure=True)
    except dns.resolver.NoResolverConfiguration:
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = ["127.0.0.1"]
        return resolver


def configured_resolver(config: DNSConfig,
                        resolver: dns.resolver.Resolver | None = None) -> dns.resolver.Resolver:
    """A dnspython resolver asking ``[dns] nameservers`` (else resolv.conf's), with
    ``[dns] timeout`` as the lifetime of one question."""
    if resolver is None:
        resolver = system_resolver() if not config.nameservers else \
            dns.resolver.Resolver(configure=False)
    if config.nameservers:
        for host, _port in config.nameservers:
            try:
                ipaddress.ip_address(host)
            except ValueError:
                raise ValueError(f"[dns] nameservers: {host!r} is not an IP address"
                                 ) from None
        resolver.nameservers = [dns.nameserver.Do53Nameserver(host, port)
                                for host, port in config.nameservers]
    resolver.lifetime = config.timeout
    resolver.timeout = min(2.0, config.timeout)  # per try; the lifetime bounds all
    return resolver


class DNSPythonLookup:
    """dnspython's blocking resolver, called in ``pool`` so the reactor never waits."""

    def __init__(self, reactor: IReactorFromThreads, pool: ThreadPool,
                 config: DNSConfig | None = None,
                 resolver: dns.resolver.Resolver | None = None) -> None:
        self._reactor = reactor
        self._pool = pool
        self._resolver = configured_resolver(config or DNSConfig(), resolver)

    def lookup(self, name: str, rdtype: str) -> Deferred[Answer]:
        return deferToThreadPool(self._reactor, self._pool,  # type: ignore[arg-type]
                                 self._blocking_lookup, name, rdtype)

    def _blocking_lookup(self, name: str, rdtype: str) -> Answer:
        """Runs in a pool thread: touch nothing shared but the (read-only) resolver."""
        return blocking_lookup(self._resolver, name, rdtype)


def blocking_lookup(resolver: dns.resolver.Resolver, name: str, rdtype: str) -> Answer:
    """One question, synchronously; raises NXDomain or TransientDNSError (lookup_failed)."""
    try:
        answer = resolver.resolve(dns.name.from_text(name), rdtype,
                                  search=False, raise_on_no_answer=False)
    except dns.resolver.NXDOMAIN:
        raise NXDomain(name) from None
    except dns.exception.Timeout:
        raise lookup_failed(f"timeout looking up {rdtype} of {name}") from None
    except dns.resolver.NoNameservers:
        raise lookup_failed(f"no nameserver answered {rdtype} of {name} "
                            "(SERVFAIL or refused)") from None
    except dns.exception.DNSException as e:
        raise lookup_failed(f"{rdtype} of {name}: {e}") from None
    ttl = float(answer.chaining_result.minimum_ttl)
    if answer.rrset is None:
        return Answer((), ttl)
    if answer.rdtype == dns.rdatatype.MX:
        values: tuple[Any, ...] = tuple(
            (int(rr.preference), rr.exchange.to_text(omit_final_dot=True))
            for rr in answer.rrset)
    else:
        values = tuple(str(rr.address) for rr in answer.rrset)
    return Answer(values, ttl)


# --- cache ----------------------------------------------------------------------------


class CachingLookup:
    """Keeps each answer (and each NXDOMAIN) for its TTL; transient failures are not kept.

    Concurrent callers of the same question share one lookup, so a burst of
    deliveries to one domain asks the DNS once.
    """

    def __init__(self, lookup: Lookup, clock: IReactorTime, *, max_ttl: float = 86400.0,
                 nxdomain_ttl: float = 300.0, max_entries: int = 10000) -> None:
        self._lookup = lookup
        self._clock = clock
        self._max_ttl = max_ttl
        self._nxdomain_ttl = nxdomain_ttl
        self._max_entries = max_entries
        self._cache: dict[tuple[str, str], tuple[float, Answer | NXDomain]] = {}
        self._waiting: dict[tuple[str, str], list[Deferred[Answer]]] = {}

    def lookup(self, name: str, rdtype: str) -> Deferred[Answer]:
        key = (name.lower().rstrip("."), rdtype)
        now = self._clock.seconds()
        cached = self._cache.get(key)
        if cached is not None:
            expires, result = cached
            if now < expires:
                if isinstance(result, NXDomain):
                    return fail(NXDomain(name))
                return succeed(result)
            del self._cache[key]
        waiter: Deferred[Answer] = Deferred()
        if key in self._waiting:
            self._waiting[key].append(waiter)
            return waiter
        self._waiting[key] = [waiter]
        self._lookup.lookup(key[0], rdtype).addBoth(self._answered, key)
        return waiter

    def _answered(self, result: Answer | Failure, key: tuple[str, str]) -> None:
        waiters = self._waiting.pop(key, [])
        now = self._clock.seconds()
        if isinstance(result, Answer):
            ttl = min(result.ttl, self._max_ttl)
            if ttl > 0:
                self._store(key, now + ttl, result)
        elif result.check(NXDomain):
            self._store(key, now + self._nxdomain_ttl, NXDomain(key[0]))
        for waiter in waiters:
            if isinstance(result, Failure):
                waiter.errback(Failure(result.value, result.type, result.tb))
            else:
                waiter.callback(result)

    def _store(self, key: tuple[str, str], expires: float, result: Answer | NXDomain) -> None:
        if len(self._cache) >= self._max_entries:
            now = self._clock.seconds()
            for stale in [k for k, (exp, _) in self._cache.items() if exp <= now]:
                del self._cache[stale]
            if len(self._cache) >= self._max_entries:
                self._cache.pop(next(iter(self._cache)))  # the oldest insertion
        self._cache[key] = (expires, result)


# --- next hops ---------------------------------------------------------------------


def address_literal(domain: str) -> str | None:
    """The address in ``[192.0.2.1]`` / ``[IPv6:2001:db8::1]`` (RFC 5321 4.1.3), else None."""
    if not (domain.startswith("[") and domain.endswith("]")):
        return None
    inner = domain[1:-1]
    if inner.lower().startswith("ipv6:"):
        inner = inner[5:]
    try:
        return str(ipaddress.ip_address(inner))
    except ValueError:
        return None


@functools.lru_cache(maxsize=1024)
def _ip(text: str) -> str | None:
    """``text`` as a normalized IP address, else None. A smarthost's ``via`` is
    looked at on every delivery, so the parse is remembered."""
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


HOSTS_FILE = Path("/etc/hosts")


class HostsFile:
    """A hosts(5) file: name -> addresses, in the file's order. Parsed again
    only when it changes (a stat per lookup, on the reactor thread: reading
    and parsing a big file at every delivery would stall it)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._version: tuple[int, int, int] | None = None
        self._names: dict[str, list[str]] = {}

    def addresses(self, name: str) -> list[str]:
        try:
            stat = os.stat(self.path)
        except OSError:
            return []  # no file: nothing in it
        version = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        if version != self._version:
            try:
                text = self.path.read_text(encoding="utf-8", errors="replace")
            except OSError:
                return []
            self._names, self._version = _parse_hosts(text), version
        return list(self._names.get(name.lower().rstrip("."), ()))


def _parse_hosts(text: str) -> dict[str, list[str]]:
    names: dict[str, list[str]] = {}
    for line in text.splitlines():
        fields = line.partition("#")[0].split()
        address = _ip(fields[0]) if fields else None
        if address is None:
            continue
        for name in fields[1:]:
            found = names.setdefault(name.lower().rstrip("."), [])
            if address not in found:
                found.append(address)
    return names


class NextHopResolver:
    """Turns a destination into the ordered hops to try; errbacks with DNSError only.

    A smarthost's name is looked up in ``hosts_file`` before the DNS, as the
    system resolver would (dnspython never reads it); None skips the file.
    """

    def __init__(self, lookup: Lookup, *, rng: random.Random | None = None,
                 max_addresses: int = 10, hosts_file: Path | None = HOSTS_FILE) -> None:
        self._lookup = lookup
        self._shuffle: Callable[[list[Any]], None] = (rng or random.Random()).shuffle
        self._max_addresses = max_addresses
        self._hosts = HostsFile(hosts_file) if hosts_file is not None else None

    def resolve_domain(self, domain: str, port: int) -> Deferred[list[Hop]]:
        """MX-routed delivery to ``domain`` (RFC 5321 section 5.1, RFC 7505)."""
        return Deferred.fromCoroutine(self._resolve_domain(domain, port))

    def resolve_host(self, host: str, port: int) -> Deferred[list[Hop]]:
        """A smarthost: its addresses only, no MX. An address (the usual ``via``)
        or a name in the hosts file answers at once, without a coroutine."""
        literal = address_literal(host) or _ip(host)
        if literal is not None:
            return succeed([Hop(literal, literal, port)])
        name = host.lower().rstrip(".")
        local = self._local_addresses(name)
        if local:
            return succeed([Hop(name, address, port) for address in local])
        return Deferred.fromCoroutine(self._resolve_host(name, port))

    def _local_addresses(self, name: str) -> list[str]:
        """``name`` in the hosts file, else loopback for ``localhost`` (RFC 6761 6.3:
        never a question for the DNS, and a DNS may well say NXDOMAIN). An edit of
        the file needs no restart (``HostsFile``)."""
        found = self._hosts.addresses(name) if self._hosts is not None else []
        if not found and (name == "localhost" or name.endswith(".localhost")):
            found = ["127.0.0.1", "::1"]
        found.sort(key=lambda address: ":" in address)  # IPv4 first, as from the DNS
        return found[:self._max_addresses]

    async def _resolve_host(self, name: str, port: int) -> list[Hop]:
        hops, transient = await self._hops([name], port)
        if hops:
            return hops
        if transient is not None:
            raise transient
        # A smarthost that does not exist is the operator's mistake, not the
        # recipient's: defer, so the mail waits for the fixed config (Postfix's
        # "relayhost configuration problem", 4.3.5), rather than bounce it.
        raise TransientDNSError(451, "4.3.5", f"Host or domain name not found: {name} "
                                "(relayhost configuration problem)")

    async def _resolve_domain(self, domain: str, port: int) -> list[Hop]:
        literal = address_literal(domain)
        if literal is not None:
            return [Hop(literal, literal, port)]
        name = domain.lower().rstrip(".")
        try:
            mx = await self._lookup.lookup(name, "MX")
        except NXDomain:
            raise PermanentDNSError(550, "5.1.2",
                                    f"Host or domain name not found: {name}") from None
        if not mx.values:
            hosts = [name]  # implicit MX: the domain's own addresses
        elif len(mx.values) == 1 and mx.values[0][1] in (".", ""):
            raise PermanentDNSError(556, "5.1.10",
                                    f"Domain {name} does not accept mail (null MX)")
        else:
            hosts = self.order_mx(mx.values)
        hops, transient = await self._hops(hosts, port)
        if hops:
            return hops
        if transient is not None:
            raise transient
        what = "MX hosts" if mx.values else "MX or address records"
        raise PermanentDNSError(550, "5.4.4", f"Domain {name} has no usable {what}")

    def order_mx(self, records: Iterable[tuple[int, str]]) -> list[str]:
        """Host names by preference, each equal-preference group shuffled (RFC 5321 5.1)."""
        groups: dict[int, list[str]] = {}
        for preference, host in records:
            host = host.lower().rstrip(".")
            if host and host not in groups.setdefault(preference, []):
                groups[preference].append(host)
        ordered: list[str] = []
        for preference in sorted(groups):
            group = groups[preference]
            self._shuffle(group)
            ordered.extend(h for h in group if h not in ordered)
        return ordered

    async def _hops(self, hosts: Sequence[str],
                    port: int) -> tuple[list[Hop], TransientDNSError | None]:
        """Addresses of every host, in host order, IPv4 first; the last transient error."""
        lookups = []
        for host in hosts:
            lookups.append(self._addresses(host))
        outcomes = await DeferredList(lookups, consumeErrors=True)
        hops: list[Hop] = []
        seen: set[str] = set()
        transient: TransientDNSError | None = None
        for host, (_ok, (addresses, error)) in zip(hosts, outcomes, strict=True):
            if error is not None:
                transient = error
            for address in addresses:
                if address not in seen:
                    seen.add(address)
                    hops.append(Hop(host, address, port))
        return hops[:self._max_addresses], transient

    def _addresses(self, host: str) -> Deferred[tuple[list[str], TransientDNSError | None]]:
        literal = _ip(host)
        if literal is not None:  # an MX naming an address: wrong, but harmless to honour
            return succeed(([literal], None))
        return Deferred.fromCoroutine(self._host_addresses(host))

    async def _host_addresses(self, host: str) -> tuple[list[str], TransientDNSError | None]:
        both = await DeferredList([self._lookup.lookup(host, "A"),
                                   self._lookup.lookup(host, "AAAA")], consumeErrors=True)
        addresses: list[str] = []
        error: TransientDNSError | None = None
        for ok, result in both:
            if ok:
                addresses.extend(result.values)
            elif result.check(TransientDNSError):
                error = result.value
            elif not result.check(NXDomain):
                error = lookup_failed(f"{host}: {result.getErrorMessage()}")
        return addresses, (None if addresses else error)


def build_resolver(config: DNSConfig, reactor: Any, *, pool_size: int = 10,
                   rng: random.Random | None = None,
                   hosts_file: Path | None = HOSTS_FILE) -> NextHopResolver:
    """The production stack: dnspython in a pool started with ``reactor``, then a TTL cache.

    ``pool_size`` bounds the lookups in flight; each can take up to
    ``config.timeout`` when the DNS is down.
    """
    pool = dns_thread_pool(reactor, pool_size)
    lookup = CachingLookup(DNSPythonLookup(reactor, pool, config), reactor)
    return NextHopResolver(lookup, rng=rng, hosts_file=hosts_file)
