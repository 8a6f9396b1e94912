"""Routing at RCPT time: aliases, route matching, accept_from, refusals, relay probes."""

from __future__ import annotations

import ipaddress

import pytest

from relaygw.addresses import Mailbox, parse_mailbox, parse_path
from relaygw.config import parse_config
from relaygw.envelope import Recipient
from relaygw.routing import (
    NO_ROUTE,
    REJECTED,
    RELAY_DENIED,
    TRUST_CACHE,
    UNKNOWN_MAILBOX,
    Refusal,
    Router,
    domain_matches,
    is_trusted_address,
    maildir_for,
)

CONFIG = """\
[[listener]]
endpoint = "tcp:2525"

[relay]
trusted_networks = ["127.0.0.0/8", "::1/128", "192.0.2.0/24", "2001:db8::/32"]

[[route]]
domains = ["example.test"]
action = "local"
maildir = "/mail/{domain}/{local}"
mailboxes = ["alice", "Bob", "postmaster"]

[[route]]
domains = ["*.example.test"]
action = "relay"
via = "10.0.0.1:25"

[[route]]
domains = ["spam.test", "*.spam.test"]
action = "reject"

[[route]]
domains = ["first.test"]
action = "local"
maildir = "/first/{local}"

[[route]]
domains = ["first.test", "internal.test"]
action = "relay"
accept_from = "trusted"

[[route]]
domains = ["open.test"]
action = "relay"

[[route]]
domains = ["local.test"]
action = "local"
maildir = "/mail/{domain}/{local}"

[[route]]
domains = ["private.test"]
action = "local"
maildir = "/private/{local}"
accept_from = "trusted"

[[route]]
domains = ["*"]
action = "relay"
accept_from = "trusted"

[aliases]
"postmaster@example.test" = ["alice@example.test"]
"sales@example.test" = ["bob@example.test", "carol@partner.test"]
"broken@example.test" = ["x@spam.test"]
"ghost@example.test" = ["nobody@example.test"]
"half@example.test" = ["alice@example.test", "nobody@example.test"]
"@old.test" = ["{local}@example.test"]
"boss@private.test" = ["boss@private.test", "alice@example.test"]
"""

ROUTER = Router(parse_config(CONFIG))

# (id, RCPT path, trusted client?, expected: a Refusal or [(address, action, maildir)])
CASES: list[tuple[str, str, bool, Refusal | list[tuple[str, str, str | None]]]] = [
    ("exact-local", "<alice@example.test>", False,
     [("alice@example.test", "local", "/mail/example.test/alice")]),
    ("mailbox-case-insensitive", "<ALICE@Example.TEST>", False,
     [("ALICE@example.test", "local", "/mail/example.test/alice")]),
    ("mailbox-listed-in-caps", "<bob@example.test>", False,
     [("bob@example.test", "local", "/mail/example.test/bob")]),
    ("unknown-mailbox", "<nobody@example.test>", False, UNKNOWN_MAILBOX),
    ("unknown-mailbox-trusted", "<nobody@example.test>", True, UNKNOWN_MAILBOX),
    ("suffix-matches-subdomain", "<u@sub.example.test>", False,
     [("u@sub.example.test", "relay", None)]),
    ("suffix-matches-deeper", "<u@a.b.example.test>", False, [("u@a.b.example.test", "relay",
                                                              None)]),
    ("suffix-not-lookalike", "<u@badexample.test>", False, RELAY_DENIED),  # falls to "*"
    ("reject-route", "<u@spam.test>", True, REJECTED),
    ("reject-route-untrusted", "<u@spam.test>", False, REJECTED),
    ("reject-subdomain", "<u@x.spam.test>", False, REJECTED),
    ("first-match-wins", "<u@first.test>", False, [("u@first.test", "local", "/first/u")]),
    ("second-domain-of-route", "<u@internal.test>", True, [("u@internal.test", "relay", None)]),
    ("trusted-route-untrusted", "<u@internal.test>", False, RELAY_DENIED),
    ("anyone-relay", "<u@open.test>", False, [("u@open.test", "relay", None)]),
    ("trusted-local-route", "<u@private.test>", True, [("u@private.test", "local",
                                                         "/private/u")]),
    ("trusted-local-untrusted", "<u@private.test>", False, RELAY_DENIED),
    ("star-trusted", "<u@elsewhere.test>", True, [("u@elsewhere.test", "relay", None)]),
    ("star-untrusted", "<u@elsewhere.test>", False, RELAY_DENIED),
    ("star-literal-trusted", "<u@[192.0.2.9]>", True, [("u@[192.0.2.9]", "relay", None)]),
    ("star-literal-untrusted", "<u@[192.0.2.9]>", False, RELAY_DENIED),
    # aliases: the address belongs to us, so anyone may send to it
    ("alias-local", "<postmaster@example.test>", False,
     [("alice@example.test", "local", "/mail/example.test/alice")]),
    ("alias-local-and-relay-untrusted", "<sales@example.test>", False,
     [("bob@example.test", "local", "/mail/example.test/bob"),
      ("carol@partner.test", "relay", None)]),
    ("alias-to-reject-route", "<broken@example.test>", False, REJECTED),
    ("alias-to-unknown-mailbox", "<ghost@example.test>", False, UNKNOWN_MAILBOX),
    ("alias-one-target-refused", "<half@example.test>", True, UNKNOWN_MAILBOX),
    ("domain-alias", "<alice@old.test>", False,
     [("alice@example.test", "local", "/mail/example.test/alice")]),
    ("domain-alias-unknown", "<zed@old.test>", False, UNKNOWN_MAILBOX),
    ("alias-self-copy-keeps-access-check-off", "<boss@private.test>", False,
     [("boss@private.test", "local", "/private/boss"),
      ("alice@example.test", "local", "/mail/example.test/alice")]),
    # relay probes
    ("percent-hack-stays-local", "<user%other.test@local.test>", False,
     [("user%other.test@local.test", "local", "/mail/local.test/user%other.test")]),
    ("quoted-at-stays-local", '<"user@other.test"@local.test>', False,
     [('"user@other.test"@local.test', "local", "/mail/local.test/user@other.test")]),
    ("source-route-untrusted", "<@local.test:user@other.test>", False, RELAY_DENIED),
    ("source-route-trusted", "<@local.test:user@other.test>", True,
     [("user@other.test", "relay", None)]),
    ("source-route-to-local", "<@elsewhere.test:u@local.test>", False,
     [("u@local.test", "local", "/mail/local.test/u")]),
    # local parts that are unsafe as file names
    ("dotdot-slash", '<"../x"@local.test>', False, UNKNOWN_MAILBOX),
    ("dotdot", '<".."@local.test>', True, UNKNOWN_MAILBOX),
    ("hidden", '<".x"@local.test>', False, UNKNOWN_MAILBOX),
    ("slash", '<"a/b"@local.test>', False, UNKNOWN_MAILBOX),
    ("backslash", '<"a\\\\b"@local.test>', False, UNKNOWN_MAILBOX),
    ("empty-quoted", '<""@local.test>', False, UNKNOWN_MAILBOX),
    ("quoted-space-is-fine", '<"a b"@local.test>', False,
     [('"a b"@local.test', "local", "/mail/local.test/a b")]),
]


@pytest.mark.parametrize(("path", "trusted", "expected"),
                         [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_route_recipient(path: str, trusted: bool,
                         expected: Refusal | list[tuple[str, str, str | None]]) -> None:
    mailbox = parse_path(path, allow_null=False)
    assert mailbox is not None
    outcome = ROUTER.route_recipient(mailbox, trusted)
    if isinstance(expected, Refusal):
        assert outcome == expected
        return
    assert isinstance(outcome, list)
    assert [(r.address, r.action, r.maildir) for r in outcome] == expected
    for recipient in outcome:
        assert recipient.original == str(mailbox)
        assert recipient.attempts == 0 and recipient.next_attempt is None


@pytest.mark.parametrize(("refusal", "reply"), [
    (RELAY_DENIED, "554 5.7.1"),
    (NO_ROUTE, "550 5.7.1"),
    (REJECTED, "550 5.7.1"),
    (UNKNOWN_MAILBOX, "550 5.1.1"),
])
def test_refusal_replies(refusal: Refusal, reply: str) -> None:
    assert refusal.reply.startswith(reply + " ")
    assert "\n" not in refusal.reply and refusal.reason


def test_no_route_is_refused() -> None:
    router = Router(parse_config(
        '[[listener]]\nendpoint = "tcp:2525"\n'
        '[[route]]\ndomains = ["example.test"]\naction = "local"\n'))
    assert router.route_recipient(parse_mailbox("u@other.test"), True) == NO_ROUTE
    assert router.route_recipient(parse_mailbox("u@sub.example.test"), True) == NO_ROUTE
    assert router.find_route("other.test") is None


def test_a_remembered_route_is_the_same_answer_for_every_spelling_and_bounded(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from relaygw import routing
    monkeypatch.setattr(routing, "ROUTE_CACHE", 2)
    router = Router(parse_config(
        '[[listener]]\nendpoint = "tcp:2525"\n'
        '[[route]]\ndomains = ["example.test"]\naction = "local"\n'))
    for _ in range(2):  # the second time from memory
        assert router.find_route("Example.TEST.") is router.config.routes[0]
        assert router.find_route("example.test") is router.config.routes[0]
        assert router.find_route("other.test") is None
    assert len(router._routes) <= 2


def test_alias_target_without_route_refuses_the_rcpt() -> None:
    router = Router(parse_config(
        '[[listener]]\nendpoint = "tcp:2525"\n'
        '[[route]]\ndomains = ["example.test"]\naction = "local"\n'
        '[aliases]\n"fwd@example.test" = ["u@nowhere.test"]\n'))
    assert router.route_recipient(parse_mailbox("fwd@example.test"), True) == NO_ROUTE


def test_default_maildir_and_recipient_record() -> None:
    router = Router(parse_config(
        '[[listener]]\nendpoint = "tcp:2525"\n'
        '[[route]]\ndomains = ["localhost"]\naction = "local"\n'))
    outcome = router.route_recipient(parse_mailbox("Root@LocalHost"), False)
    assert outcome == [Recipient(address="Root@localhost", original="Root@localhost",
                                 action="local", maildir="var/mail/localhost/root")]


def test_domain_alias_template_that_makes_a_bad_address_is_refused() -> None:
    # A quoted local part does not survive "{local}-x@..." as an address, and a
    # 64-octet local part grows past the limit: refused at RCPT, never a crash.
    router = Router(parse_config(
        '[[listener]]\nendpoint = "tcp:2525"\n'
        '[[route]]\ndomains = ["example.test"]\naction = "local"\n'
        '[aliases]\n"@old.test" = ["{local}-old@example.test"]\n'))
    assert router.route_recipient(parse_mailbox("u@old.test"), False) == [
        Recipient(address="u-old@example.test", original="u@old.test", action="local",
                  maildir="var/mail/example.test/u-old")]
    for address in ('"a b"@old.test', f"{'a' * 64}@old.test"):
        outcome = router.route_recipient(parse_mailbox(address), False)
        assert isinstance(outcome, Refusal), address
        assert outcome.code == 550


@pytest.mark.parametrize(("pattern", "domain", "matches"), [
    ("*", "anything.test", True),
    ("*", "[192.0.2.1]", True),
    ("example.test", "example.test", True),
    ("example.test", "sub.example.test", False),
    ("*.example.test", "sub.example.test", True),
    ("*.example.test", "a.b.example.test", True),
    ("*.example.test", "example.test", False),
    ("*.example.test", "badexample.test", False),
    ("*.example.test", ".example.test", False),
])
def test_domain_matches(pattern: str, domain: str, matches: bool) -> None:
    assert domain_matches(pattern, domain) is matches


def test_find_route_ignores_case_and_root_dot() -> None:
    route = ROUTER.find_route("Example.TEST.")
    assert route is not None and route.action == "local"


NETWORKS = [ipaddress.ip_network(n) for n in ("127.0.0.0/8", "::1/128", "192.0.2.0/24",
                                              "2001:db8::/32")]


@pytest.mark.parametrize(("host", "trusted"), [
    ("127.0.0.1", True),
    ("127.255.0.9", True),
    ("192.0.2.200", True),
    ("192.0.3.1", False),
    ("10.0.0.1", False),
    ("::1", True),
    ("::2", False),
    ("2001:db8::25", True),
    ("2001:db9::25", False),
    ("::ffff:127.0.0.1", True),      # IPv4-mapped IPv6 (a dual-stack listener)
    ("::ffff:192.0.2.7", True),
    ("::ffff:10.0.0.1", False),
    ("fe80::1%eth0", False),
    ("2001:db8::1%eth0", True),      # a zone id does not hide the address
    ("localhost", False),
    ("", False),
])
def test_is_trusted_address(host: str, trusted: bool) -> None:
    assert is_trusted_address(host, NETWORKS) is trusted
    assert ROUTER.is_trusted(host) is trusted
    assert ROUTER.is_trusted(host) is trusted  # the remembered answer


def test_remembered_trust_stays_right_past_the_cache_size() -> None:
    router = Router(parse_config(CONFIG))
    hosts = [str(ipaddress.ip_address("192.0.1.0") + i) for i in range(TRUST_CACHE + 600)]
    for _ in range(2):
        for host in hosts:
            assert router.is_trusted(host) is host.startswith("192.0.2."), host


@pytest.mark.parametrize("local", ["a\tb", "a\x7fb", "a\nb", "..", ".", "", "a/b", "a\\b"],
                         ids=repr)
def test_maildir_for_refuses_names_unsafe_on_disk(local: str) -> None:
    route = ROUTER.find_route("local.test")
    assert route is not None
    assert maildir_for(route, Mailbox(local, "local.test")) is None


def test_refusal_is_never_a_mailbox() -> None:
    assert not isinstance(ROUTER.route_recipient(Mailbox("u", "elsewhere.test"), False), list)


# --- <Postmaster> (RFC 5321 4.5.1) ----------------------------------------------------


def postmaster_router(routes: str, aliases: str = "") -> Router:
    return Router(parse_config(f'[[listener]]\nendpoint = "tcp:2525"\n{routes}\n{aliases}',
                               "<test>"))


@pytest.mark.parametrize(("routes", "aliases", "address", "action"), [
    ('[[route]]\ndomains = ["relay.example.test"]\naction = "local"\n', "",
     "postmaster@relay.example.test", "local"),
    ('[[route]]\ndomains = ["example.test"]\naction = "local"\n'
     '[[route]]\ndomains = ["*"]\naction = "relay"\n', "",
     "postmaster@example.test", "local"),
    ('[[route]]\ndomains = ["*"]\naction = "relay"\n',
     '[aliases]\n"postmaster@example.test" = ["ops@elsewhere.test"]\n',
     "ops@elsewhere.test", "relay"),
    ('[[route]]\ndomains = ["*.example.test"]\naction = "relay"\nvia = "10.0.0.1:25"\n'
     '[[route]]\ndomains = ["*"]\naction = "relay"\naccept_from = "trusted"\n', "",
     "postmaster@relay.example.test", "relay"),
], ids=["the hostname's own", "a parent domain's, before a relay", "an alias",
        "relayed by a route naming its domain, trusted or not"])
def test_postmaster_goes_where_one_is_configured(routes: str, aliases: str, address: str,
                                                 action: str) -> None:
    _, outcome = postmaster_router(routes, aliases).route_postmaster("relay.example.test")
    assert not isinstance(outcome, Refusal)
    assert [(r.address, r.action) for r in outcome] == [(address, action)]


def test_postmaster_is_never_relayed_by_the_catch_all_alone() -> None:
    """An MX lookup of this host's own name: its mail would come back here."""
    router = postmaster_router('[[route]]\ndomains = ["*"]\naction = "relay"\n')
    mailbox, outcome = router.route_postmaster("relay.example.test")
    assert (str(mailbox), outcome) == ("postmaster@relay.example.test", UNKNOWN_MAILBOX)


def test_postmaster_with_no_route_at_all_is_the_hostnames_refusal() -> None:
    router = postmaster_router('[[route]]\ndomains = ["other.test"]\naction = "local"\n')
    mailbox, outcome = router.route_postmaster("relay.example.test")
    assert (str(mailbox), outcome) == ("postmaster@relay.example.test", NO_ROUTE)
    _, single = router.route_postmaster("localhost")
    assert single == NO_ROUTE
