"""Routing: what happens to a recipient, decided at RCPT time. Pure, no I/O.

Order: aliases first (recursively), then the first ``[[route]]`` whose domain
pattern matches (exact, ``*.suffix``, ``*``). A client must be allowed to use
the route of the address it *gave*: ``accept_from = "trusted"`` refuses an
untrusted client with 554 5.7.1. An address covered by an alias belongs to
us, so anyone may send to it; its targets are routed without the
``accept_from`` check (the organisation configured the forwarding), but a
target that no route takes, that a ``reject`` route refuses or that names an
unknown mailbox refuses the whole RCPT: a refused recipient never turns into
a bounce later.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from relaygw import aliases as alias_expansion
from relaygw.addresses import AddressError, Mailbox
from relaygw.config import Config, IPNetwork, RouteConfig
from relaygw.envelope import Recipient


@dataclass(frozen=True, slots=True)
class Refusal:
    code: int
    enhanced: str
    text: str
    reason: str  # short label for logs and metrics

    @property
    def reply(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}"


RELAY_DENIED = Refusal(554, "5.7.1", "Relay access denied", "relay_denied")
NO_ROUTE = Refusal(550, "5.7.1", "Recipient address rejected: no route to this domain",
                   "no_route")
REJECTED = Refusal(550, "5.7.1", "Recipient address rejected: access denied", "rejected")
UNKNOWN_MAILBOX = Refusal(550, "5.1.1", "Recipient address rejected: user unknown",
                          "unknown_mailbox")


def domain_matches(pattern: str, domain: str) -> bool:
    """``*`` matches all; ``*.suffix`` matches strict subdomains of suffix; else exact."""
    if pattern == "*":
        return True
    if pattern.startswith("*."):
        return domain.endswith(pattern[1:]) and len(domain) > len(pattern) - 1
    return domain == pattern


def is_trusted_address(host: str, networks: Iterable[IPNetwork]) -> bool:
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return any(address in network for network in networks)


def maildir_for(route: RouteConfig, mailbox: Mailbox) -> str | None:
    """The Maildir path of a local recipient, or None if its name is unsafe on disk."""
    local = mailbox.unquoted_local.lower()
    if (not local or local.startswith(".") or "/" in local or "\\" in local
            or any(ord(c) < 0x20 or c == "\x7f" for c in local)):
        return None
    return route.maildir.replace("{domain}", mailbox.domain).replace("{local}", local)


TRUST_CACHE = 4096  # client addresses whose trust is remembered (then forgotten at once)
ROUTE_CACHE = 4096  # recipient domains whose route is remembered (likewise)


class Router:
    """Answers "where does this recipient go?" for one loaded Config.

    A reload makes a new Router, so what one remembers of its Config (the trust
    of client addresses) never outlives that Config."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._trusted: dict[str, bool] = {}
        self._routes: dict[str, RouteConfig | None] = {}

    def find_route(self, domain: str) -> RouteConfig | None:
        """The first route matching ``domain``; asked at RCPT and again at each
        delivery, so the answer is remembered per domain (routes change only with
        the Config, and a reload makes a new Router)."""
        try:
            return self._routes[domain]
        except KeyError:
            pass
        if len(self._routes) >= ROUTE_CACHE:
            self._routes.clear()
        route = self._routes[domain] = self._match(domain.lower().rstrip("."))
        return route

    def _match(self, domain: str) -> RouteConfig | None:
        for route in self.config.routes:
            if any(domain_matches(pattern, domain) for pattern in route.domains):
                return route
        return None

    def is_trusted(self, host: str) -> bool:
        """Whether ``host`` is in ``trusted_networks``; asked at every RCPT, and
        parsing the address costs more than the rest of the routing."""
        trusted = self._trusted.get(host)
        if trusted is None:
            if len(self._trusted) >= TRUST_CACHE:
                self._trusted.clear()
            trusted = is_trusted_address(host, self.config.relay.trusted_networks)
            self._trusted[host] = trusted
        return trusted

    def route_recipient(self, mailbox: Mailbox, trusted: bool) -> Refusal | list[Recipient]:
        """Refuse, or return the recipients this address becomes (aliases expanded)."""
        try:
            targets = alias_expansion.expand(self.config.aliases, mailbox)
        except AddressError:
            # A template such as "{local}-x@..." made an address RFC 5321 refuses
            # (a quoted local part, or one grown past 64 octets): no such mailbox.
            return UNKNOWN_MAILBOX
        if targets is None:
            outcome = self._route_one(mailbox, mailbox, check_access=True, trusted=trusted)
            return outcome if isinstance(outcome, Refusal) else [outcome]
        recipients = []
        for target in targets:
            outcome = self._route_one(target, mailbox, check_access=False, trusted=trusted)
            if isinstance(outcome, Refusal):
                return outcome
            recipients.append(outcome)
        return recipients

    def route_postmaster(self, hostname: str) -> tuple[Mailbox, Refusal | list[Recipient]]:
        """Where ``RCPT TO:<Postmaster>`` (no domain) goes. RFC 5321 4.5.1 says it
        MUST be accepted, so it is routed as a trusted client's would be.

        Postfix takes it as ``postmaster@$myhostname``, a local address whose
        alias names a person. relaygw tries ``postmaster@<hostname>``, then
        ``postmaster@`` each parent domain of the hostname (relay.example.test,
        then example.test), and takes the first that is delivered locally or
        aliased; else the first relayed by a route that names its domain (a
        hub for the organisation's mail). Never one only the catch-all ``*``
        relays: that is an MX lookup of this host's own name, mail back to
        itself (a loop, then a bounce to whatever sender the client gave). With
        none of these the configuration names no postmaster: refused, as an
        unknown mailbox, or with the hostname's refusal."""
        labels = hostname.lower().rstrip(".").split(".")
        domains = [".".join(labels[i:]) for i in range(max(len(labels) - 1, 1))]
        relayed: tuple[Mailbox, Refusal | list[Recipient]] | None = None
        refused: tuple[Mailbox, Refusal | list[Recipient]] | None = None
        for domain in domains:
            mailbox = Mailbox("postmaster", domain)
            outcome = self.route_recipient(mailbox, trusted=True)
            if isinstance(outcome, Refusal):
                refused = refused or (mailbox, outcome)
            elif any(r.action == "local" or r.address.lower() != str(mailbox).lower()
                     for r in outcome):
                return mailbox, outcome
            elif relayed is None and self._named_route(domain):
                relayed = (mailbox, outcome)
        return relayed or refused or (Mailbox("postmaster", domains[0]), UNKNOWN_MAILBOX)

    def _named_route(self, domain: str) -> bool:
        """Whether ``domain``'s route names it (exactly or by ``*.suffix``), not
        only the catch-all ``*``."""
        route = self.find_route(domain)
        return route is not None and any(
            pattern != "*" and domain_matches(pattern, domain) for pattern in route.domains)

    def _route_one(self, target: Mailbox, original: Mailbox, *, check_access: bool,
                   trusted: bool) -> Refusal | Recipient:
        route = self.find_route(target.domain)
        if route is None:
            return NO_ROUTE
        if check_access and route.accept_from == "trusted" and not trusted:
            return RELAY_DENIED
        if route.action == "reject":
            return REJECTED
        if route.action == "local":
            if (route.mailboxes is not None
                    and target.unquoted_local.lower() not in route.mailboxes):
                return UNKNOWN_MAILBOX
            maildir = maildir_for(route, target)
            if maildir is None:
                return UNKNOWN_MAILBOX
            return Recipient(address=str(target), original=str(original), action="local",
                             maildir=maildir)
        return Recipient(address=str(target), original=str(original), action="relay")
