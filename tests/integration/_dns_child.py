"""The DNS fixture's child process: a twisted.names server answering from a JSON zone file.

Run as ``python _dns_child.py ZONE.json HOST``; binds one port for both UDP and TCP on
HOST and prints ``PORT <n>`` when ready. The zone file is re-read on every query, so a
test may change the answers while the server runs. Format::

    {"records": {"example.net": {"MX": [[10, "mx1.example.net"]], "A": ["127.0.0.2"]},
                 "nullmx.test": {"MX": [[0, "."]]}},
     "timeout": ["slow.test"],      # never answered (the resolver times out)
     "servfail": ["broken.test"]}   # SERVFAIL

A name absent from "records" is NXDOMAIN; a name present without the asked type is
NOERROR with no answer.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.error import CannotListenError
from twisted.names import common, dns, error, server

TTL = 60


class JSONZoneResolver(common.ResolverBase):
    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path

    def _zone(self) -> dict[str, Any]:
        return json.loads(self.path.read_text())

    def _records(self, name: str, qtype: int, data: dict[str, Any]) -> list[dns.RRHeader]:
        out: list[dns.RRHeader] = []
        bname = name.encode()

        def add(rtype: int, payload: Any) -> None:
            out.append(dns.RRHeader(bname, rtype, dns.IN, TTL, payload, auth=True))

        for pref, host in data.get("MX", []) if qtype in (dns.MX, dns.ALL_RECORDS) else []:
            add(dns.MX, dns.Record_MX(pref, b"" if host in (".", "") else host.encode(),
                                      ttl=TTL))
        for ip in data.get("A", []) if qtype in (dns.A, dns.ALL_RECORDS) else []:
            add(dns.A, dns.Record_A(ip, ttl=TTL))
        for ip in data.get("AAAA", []) if qtype in (dns.AAAA, dns.ALL_RECORDS) else []:
            add(dns.AAAA, dns.Record_AAAA(ip, ttl=TTL))
        for text in data.get("TXT", []) if qtype in (dns.TXT, dns.ALL_RECORDS) else []:
            add(dns.TXT, dns.Record_TXT(text.encode(), ttl=TTL))
        if "CNAME" in data and qtype != dns.CNAME:
            target = data["CNAME"]
            add(dns.CNAME, dns.Record_CNAME(target.encode(), ttl=TTL))
            zone = self._zone()["records"]
            if target in zone:
                out += self._records(target, qtype, zone[target])
        elif "CNAME" in data:
            add(dns.CNAME, dns.Record_CNAME(data["CNAME"].encode(), ttl=TTL))
        return out

    def _lookup(self, name: bytes | str, cls: int, type: int, timeout: Any = None
                ) -> defer.Deferred[Any]:
        text = (name.decode() if isinstance(name, bytes) else name).lower().rstrip(".")
        zone = self._zone()
        if text in zone.get("timeout", []):
            return defer.Deferred()  # never answered
        if text in zone.get("servfail", []):
            return defer.fail(error.DNSServerError(text))
        records = zone.get("records", {})
        if text not in records:
            return defer.fail(error.AuthoritativeDomainError(text))
        return defer.succeed((self._records(text, type, records[text]), [], []))


def main() -> None:
    zone_path, host = Path(sys.argv[1]), sys.argv[2]
    factory = server.DNSServerFactory(authorities=[JSONZoneResolver(zone_path)])
    protocol = dns.DNSDatagramProtocol(controller=factory)
    for _ in range(100):
        tcp = reactor.listenTCP(0, factory, interface=host)  # type: ignore[attr-defined]
        port = tcp.getHost().port
        try:
            reactor.listenUDP(port, protocol, interface=host)  # type: ignore[attr-defined]
        except CannotListenError:  # UDP port taken: try another
            tcp.stopListening()
            continue
        break
    else:
        raise SystemExit("no port free for both UDP and TCP")
    sys.stdout.write(f"PORT {port}\n")
    sys.stdout.flush()
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
