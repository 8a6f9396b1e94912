"""The TOML configuration: the embedded default, the full example, and every refusal.

Each refusal is one line naming the file, the key and the problem (CONTRACT.md
section 2), so the table below checks the file name, the key and the single line.
"""

from __future__ import annotations

import ipaddress
import tomllib
from pathlib import Path

import pytest

from relaygw.config import (
    DEFAULT_CONFIG_TOML,
    AuthConfig,
    ConfigError,
    DNSConfig,
    LimitsConfig,
    ListenerConfig,
    MetricsConfig,
    QueueConfig,
    RelayConfig,
    RouteConfig,
    TLSConfig,
    load_config,
    parse_config,
    parse_duration,
    parse_host_port,
)

REPO = Path(__file__).resolve().parent.parent

# CONTRACT.md section 2, verbatim.
FULL_EXAMPLE = """\
[server]
hostname = "relay.example.test"      # banner, EHLO, Received, bounces

[[listener]]
endpoint = "tcp:2525:interface=127.0.0.1"   # any Twisted server endpoint string
kind = "smtp"            # smtp | submission | submissions

[tls]                    # inbound certificate; optional
certificate = "etc/tls/relay.pem"
private_key = "etc/tls/relay.key"

[auth]                   # optional
users_file = "etc/relaygw.users"     # written by `relaygwctl passwd`
require_tls = true                   # AUTH offered only inside TLS

[limits]
max_message_size = 26214400          # advertised in SIZE
max_recipients = 100                 # per transaction
max_connections = 1000
max_connections_per_client = 50
command_timeout = "5m"
max_hops = 50                        # Received: headers before a loop is declared
max_auth_failures = 3                # per connection, then 421 and close

[relay]
trusted_networks = ["127.0.0.0/8", "::1/128"]
mx_port = 25                         # port used for MX-routed delivery
tls = "opportunistic"                # default outbound TLS policy

[dns]                                # optional; default: the system resolver
nameservers = ["127.0.0.1:5353"]     # host or host:port
timeout = "5s"

[queue]
directory = "var/spool"
retry_schedule = ["1m", "5m", "15m", "30m", "1h", "2h", "4h"]   # the last repeats
max_age = "5d"                       # then the recipient bounces
concurrency = 100                    # outbound connections in all
per_destination = 10                 # outbound connections per next hop

[metrics]                            # optional
listen = "tcp:9125:interface=127.0.0.1"

[[route]]                            # first match on the recipient domain wins
domains = ["example.test", "*.example.test"]   # exact, "*.suffix", or "*"
action = "local"                     # local | relay | reject
maildir = "var/mail/{domain}/{local}"          # local: the Maildir of a recipient
mailboxes = ["alice", "bob"]         # local, optional: others get 550 5.1.1 at RCPT

[[route]]
domains = ["branch.example.test"]
action = "relay"
via = "10.1.0.25:25"                 # smarthost; without it, MX lookup
tls = "required"                     # none | opportunistic | required | verify
ca_file = "etc/tls/internal-ca.pem"  # for verify; default: the system store
username = "relay"                   # AUTH to the smarthost, optional
password_file = "etc/branch.secret"

[[route]]
domains = ["*"]
action = "relay"
accept_from = "trusted"              # anyone | trusted

[aliases]                            # applied before routing, recursively, loop-safe
"postmaster@example.test" = ["alice@example.test"]
"sales@example.test" = ["bob@branch.example.test", "carol@partner.test"]
"@old.example.test" = ["{local}@example.test"]   # a whole domain forwarded
"""

LISTENER = '[[listener]]\nendpoint = "tcp:2525"\n'
LOCAL_ROUTE = '[[route]]\ndomains = ["a.test"]\naction = "local"\n'
RELAY_ROUTE = '[[route]]\ndomains = ["a.test"]\naction = "relay"\n'


def test_embedded_default() -> None:
    config = load_config(None, default_hostname="mx.example.test")
    assert config.source == "<default>"
    assert config.hostname == "mx.example.test"
    assert config.listeners == (ListenerConfig("tcp:2525:interface=127.0.0.1", "smtp"),)
    assert config.queue.directory == Path("var/spool")
    assert config.queue.journal is True
    assert parse_config(f"{LISTENER}[queue]\njournal = false\n").queue.journal is False
    assert config.relay.trusted_networks == (ipaddress.ip_network("127.0.0.0/8"),
                                             ipaddress.ip_network("::1/128"))
    local, catch_all = config.routes
    assert local.domains == ("localhost",)
    assert local.action == "local"
    assert local.accept_from == "anyone"
    assert local.maildir.startswith("var/mail/")
    assert local.maildir.replace("{domain}", "localhost").replace("{local}", "u") \
        == "var/mail/localhost/u"
    assert catch_all.domains == ("*",)
    assert catch_all.action == "relay"
    assert catch_all.accept_from == "trusted"
    assert catch_all.via is None  # MX lookup
    assert config.aliases == {}
    assert config.tls is None and config.auth is None and config.metrics is None
    assert config.limits == LimitsConfig()
    assert config.queue == QueueConfig()


def test_embedded_default_hostname_is_the_fqdn(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("socket.getfqdn", lambda: "host.from.fqdn.test")
    assert load_config(None).hostname == "host.from.fqdn.test"


def test_embedded_default_is_valid_toml_text() -> None:
    assert tomllib.loads(DEFAULT_CONFIG_TOML)["listener"][0]["kind"] == "smtp"


def test_full_example_of_the_contract(tmp_path: Path) -> None:
    path = tmp_path / "relaygw.toml"
    path.write_text(FULL_EXAMPLE)
    config = load_config(path)
    assert config.source == str(path)
    assert config.hostname == "relay.example.test"
    assert config.listeners == (ListenerConfig("tcp:2525:interface=127.0.0.1", "smtp"),)
    assert config.tls == TLSConfig(Path("etc/tls/relay.pem"), Path("etc/tls/relay.key"))
    assert config.auth == AuthConfig(Path("etc/relaygw.users"), require_tls=True)
    assert config.limits == LimitsConfig(
        max_message_size=26214400, max_recipients=100, max_connections=1000,
        max_connections_per_client=50, command_timeout=300.0, max_hops=50,
        max_auth_failures=3)
    assert config.relay == RelayConfig(
        trusted_networks=(ipaddress.ip_network("127.0.0.0/8"),
                          ipaddress.ip_network("::1/128")),
        mx_port=25, tls="opportunistic")
    assert config.dns == DNSConfig(nameservers=(("127.0.0.1", 5353),), timeout=5.0)
    assert config.queue == QueueConfig(
        directory=Path("var/spool"),
        retry_schedule=(60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0),
        max_age=432000.0, concurrency=100, per_destination=10)
    assert config.metrics == MetricsConfig("tcp:9125:interface=127.0.0.1")
    assert config.routes == (
        RouteConfig(domains=("example.test", "*.example.test"), action="local",
                    accept_from="anyone", maildir="var/mail/{domain}/{local}",
                    mailboxes=frozenset({"alice", "bob"})),
        RouteConfig(domains=("branch.example.test",), action="relay", accept_from="anyone",
                    via=("10.1.0.25", 25), tls="required",
                    ca_file=Path("etc/tls/internal-ca.pem"), username="relay",
                    password_file=Path("etc/branch.secret")),
        RouteConfig(domains=("*",), action="relay", accept_from="trusted"),
    )
    assert dict(config.aliases) == {
        "postmaster@example.test": ("alice@example.test",),
        "sales@example.test": ("bob@branch.example.test", "carol@partner.test"),
        "@old.example.test": ("{local}@example.test",),
    }


def test_etc_example_parses() -> None:
    path = REPO / "etc" / "relaygw.toml"
    if not path.exists():
        pytest.skip("etc/relaygw.toml is not written yet")
    config = load_config(path)
    assert config.listeners
    assert config.routes[-1].domains == ("*",)
    assert config.routes[-1].accept_from == "trusted"


# --- durations and small parsers ---------------------------------------------------


@pytest.mark.parametrize(("value", "seconds"), [
    ("30s", 30.0), ("5m", 300.0), ("2h", 7200.0), ("5d", 432000.0),
    (45, 45.0), (0, 0.0), ("90", 90.0), (" 2h ", 7200.0), ("1.5m", 90.0),
])
def test_parse_duration(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["5x", -1, "-1", "-5m", "", "m", "5 minutes", True, None,
                                   [5], "1e3", float("nan"), float("inf")], ids=repr)
def test_parse_duration_refuses(value: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(value)


@pytest.mark.parametrize(("text", "seconds"), [
    ("command_timeout = \"30s\"", 30.0),
    ("command_timeout = \"5m\"", 300.0),
    ("command_timeout = \"2h\"", 7200.0),
    ("command_timeout = \"5d\"", 432000.0),
    ("command_timeout = 45", 45.0),
])
def test_durations_in_the_file(text: str, seconds: float) -> None:
    config = parse_config(f"{LISTENER}[limits]\n{text}\n")
    assert config.limits.command_timeout == seconds


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_a_toml_nan_or_inf_duration_stops_start_up(value: str) -> None:
    with pytest.raises(ConfigError, match="command_timeout"):
        parse_config(f"{LISTENER}[limits]\ncommand_timeout = {value}\n")


def test_retry_schedule_mixes_strings_and_integers() -> None:
    config = parse_config(f'{LISTENER}[queue]\nretry_schedule = ["30s", 120, "1h"]\n')
    assert config.queue.retry_schedule == (30.0, 120.0, 3600.0)


@pytest.mark.parametrize(("text", "expected"), [
    ("mx.test", ("mx.test", 53)),
    ("mx.test:5353", ("mx.test", 5353)),
    ("192.0.2.1", ("192.0.2.1", 53)),
    ("::1", ("::1", 53)),
    ("[::1]", ("::1", 53)),
    ("[::1]:5353", ("::1", 5353)),
])
def test_parse_host_port(text: str, expected: tuple[str, int]) -> None:
    assert parse_host_port(text, 53) == expected


@pytest.mark.parametrize("text", ["", ":53", "mx.test:0", "mx.test:70000", "mx.test:x",
                                  "[::1", "[::1]x", "[]:53"])
def test_parse_host_port_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_host_port(text, 53)


# --- accept_from defaults -----------------------------------------------------------


@pytest.mark.parametrize(("route", "accept_from"), [
    ('domains = ["a.test"]\naction = "relay"', "anyone"),
    ('domains = ["*.a.test"]\naction = "relay"', "anyone"),
    ('domains = ["*"]\naction = "relay"', "trusted"),
    ('domains = ["a.test", "*"]\naction = "relay"', "trusted"),
    ('domains = ["*"]\naction = "relay"\naccept_from = "anyone"', "anyone"),
    ('domains = ["a.test"]\naction = "local"\naccept_from = "trusted"', "trusted"),
])
def test_accept_from_defaults(route: str, accept_from: str) -> None:
    config = parse_config(f"{LISTENER}[[route]]\n{route}\n")
    assert config.routes[0].accept_from == accept_from


def test_domains_normalised_and_mailboxes_lowercased() -> None:
    config = parse_config(f'{LISTENER}[[route]]\ndomains = ["Example.TEST.", "*.Sub.Test"]\n'
                          f'action = "local"\nmailboxes = ["Alice", "BOB"]\n')
    route = config.routes[0]
    assert route.domains == ("example.test", "*.sub.test")
    assert route.mailboxes == frozenset({"alice", "bob"})


def test_via_without_port_defaults_to_25_and_accepts_ipv6() -> None:
    config = parse_config(f'{LISTENER}{RELAY_ROUTE}via = "smarthost.test"\n'
                          f'[[route]]\ndomains = ["b.test"]\naction = "relay"\n'
                          f'via = "[2001:db8::25]:2525"\n')
    assert config.routes[0].via == ("smarthost.test", 25)
    assert config.routes[1].via == ("2001:db8::25", 2525)


def test_nameservers_are_ip_addresses_with_optional_ports() -> None:
    config = parse_config(f'{LISTENER}[dns]\nnameservers = ["192.0.2.53", "127.0.0.1:5353", '
                          f'"2001:DB8::53", "[::1]:5353", "[::1]"]\n')
    assert config.dns.nameservers == (("192.0.2.53", 53), ("127.0.0.1", 5353),
                                      ("2001:db8::53", 53), ("::1", 5353), ("::1", 53))


def test_a_nameserver_name_is_refused_with_the_reason() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(f'{LISTENER}[dns]\nnameservers = ["127.0.0.1", "localhost"]\n', "r.toml")
    assert str(caught.value) == ("r.toml: dns.nameservers: must be an IP address, "
                                 "optionally with :port, not 'localhost'")


def test_alias_keys_lowercased() -> None:
    config = parse_config(f'{LISTENER}[aliases]\n"Info@Example.Test" = ["a@b.test"]\n')
    assert dict(config.aliases) == {"info@example.test": ("a@b.test",)}


def test_submission_listener_with_tls_and_auth() -> None:
    config = parse_config(
        '[[listener]]\nendpoint = "tcp:2587"\nkind = "submission"\n'
        '[auth]\nusers_file = "u"\n[tls]\ncertificate = "c"\nprivate_key = "k"\n')
    assert config.listeners[0].kind == "submission"
    assert config.auth == AuthConfig(Path("u"), require_tls=True)


def test_haproxy_and_unix_endpoints_are_accepted() -> None:
    config = parse_config('[[listener]]\nendpoint = "haproxy:tcp:2525"\n'
                          '[[listener]]\nendpoint = "unix:/run/relaygw.sock"\n')
    assert [listener.endpoint for listener in config.listeners] == [
        "haproxy:tcp:2525", "unix:/run/relaygw.sock"]


# --- refusals ---------------------------------------------------------------------

BAD = [
    # unknown keys, at every level
    ("unknown-top", f"bogus = 1\n{LISTENER}", "bogus"),
    ("unknown-server", f"{LISTENER}[server]\nhostnme = \"x\"\n", "server.hostnme"),
    ("unknown-listener", '[[listener]]\nendpoint = "tcp:25"\nport = 25\n', "listener[0].port"),
    ("unknown-limits", f"{LISTENER}[limits]\nmax_size = 10\n", "limits.max_size"),
    ("unknown-relay", f"{LISTENER}[relay]\ntrusted = []\n", "relay.trusted"),
    ("unknown-dns", f"{LISTENER}[dns]\nservers = []\n", "dns.servers"),
    ("unknown-queue", f"{LISTENER}[queue]\nretries = 3\n", "queue.retries"),
    ("unknown-tls", f'{LISTENER}[tls]\ncertificate = "c"\nprivate_key = "k"\nca = "x"\n',
     "tls.ca"),
    ("unknown-auth", f'{LISTENER}[auth]\nusers_file = "u"\nusers = "x"\n', "auth.users"),
    ("unknown-metrics", f'{LISTENER}[metrics]\nlisten = "tcp:9125"\npath = "/m"\n',
     "metrics.path"),
    ("unknown-route", f'{LISTENER}{LOCAL_ROUTE}colour = "red"\n', "route[0].colour"),
    ("unknown-second-route", f'{LISTENER}{LOCAL_ROUTE}{RELAY_ROUTE}smarthost = "x"\n',
     "route[1].smarthost"),
    # wrong types
    ("type-hostname", f"{LISTENER}[server]\nhostname = 5\n", "server.hostname"),
    ("type-endpoint", "[[listener]]\nendpoint = 2525\n", "listener[0].endpoint"),
    ("type-listener-table", '[listener]\nendpoint = "tcp:2525"\n', "listener"),
    ("type-limits-table", f"limits = 5\n{LISTENER}", "limits"),
    ("type-max-recipients-str", f'{LISTENER}[limits]\nmax_recipients = "100"\n',
     "limits.max_recipients"),
    ("type-max-recipients-bool", f"{LISTENER}[limits]\nmax_recipients = true\n",
     "limits.max_recipients"),
    ("type-size-float", f"{LISTENER}[limits]\nmax_message_size = 1.5\n",
     "limits.max_message_size"),
    ("type-trusted-string", f'{LISTENER}[relay]\ntrusted_networks = "127.0.0.0/8"\n',
     "relay.trusted_networks"),
    ("type-mx-port", f'{LISTENER}[relay]\nmx_port = "25"\n', "relay.mx_port"),
    ("type-require-tls", f'{LISTENER}[auth]\nusers_file = "u"\nrequire_tls = "yes"\n',
     "auth.require_tls"),
    ("type-nameservers", f'{LISTENER}[dns]\nnameservers = "127.0.0.1"\n', "dns.nameservers"),
    ("type-nameservers-item", f"{LISTENER}[dns]\nnameservers = [53]\n", "dns.nameservers"),
    ("type-retry-schedule", f'{LISTENER}[queue]\nretry_schedule = "1m"\n',
     "queue.retry_schedule"),
    ("type-directory", f"{LISTENER}[queue]\ndirectory = 5\n", "queue.directory"),
    ("type-concurrency", f'{LISTENER}[queue]\nconcurrency = "100"\n', "queue.concurrency"),
    ("type-domains", f'{LISTENER}[[route]]\ndomains = "a.test"\naction = "local"\n',
     "route[0].domains"),
    ("type-domains-item", f'{LISTENER}[[route]]\ndomains = [1]\naction = "local"\n',
     "route[0].domains"),
    ("type-mailboxes", f'{LISTENER}{LOCAL_ROUTE}mailboxes = "alice"\n', "route[0].mailboxes"),
    ("type-maildir", f"{LISTENER}{LOCAL_ROUTE}maildir = 5\n", "route[0].maildir"),
    ("type-via", f"{LISTENER}{RELAY_ROUTE}via = 25\n", "route[0].via"),
    ("type-username", f'{LISTENER}{RELAY_ROUTE}username = 5\npassword_file = "p"\n',
     "route[0].username"),
    ("type-ca-file", f"{LISTENER}{RELAY_ROUTE}ca_file = 5\n", "route[0].ca_file"),
    ("type-alias", f'{LISTENER}[aliases]\n"a@b.test" = "c@d.test"\n', "aliases.a@b.test"),
    # bad durations
    ("duration-unit", f'{LISTENER}[limits]\ncommand_timeout = "5x"\n', "limits.command_timeout"),
    ("duration-negative", f"{LISTENER}[limits]\ncommand_timeout = -1\n",
     "limits.command_timeout"),
    ("duration-negative-str", f'{LISTENER}[limits]\ncommand_timeout = "-1s"\n',
     "limits.command_timeout"),
    ("duration-zero-timeout", f'{LISTENER}[limits]\ncommand_timeout = "0s"\n',
     "limits.command_timeout"),
    ("duration-bool", f"{LISTENER}[limits]\ncommand_timeout = true\n", "limits.command_timeout"),
    ("duration-max-age", f'{LISTENER}[queue]\nmax_age = "5x"\n', "queue.max_age"),
    ("duration-max-age-negative", f"{LISTENER}[queue]\nmax_age = -1\n", "queue.max_age"),
    ("duration-schedule-item", f'{LISTENER}[queue]\nretry_schedule = ["1m", "5x"]\n',
     "queue.retry_schedule"),
    ("duration-schedule-empty", f"{LISTENER}[queue]\nretry_schedule = []\n",
     "queue.retry_schedule"),
    ("duration-schedule-zero", f'{LISTENER}[queue]\nretry_schedule = ["0s"]\n',
     "queue.retry_schedule"),
    ("duration-dns", f'{LISTENER}[dns]\ntimeout = "fast"\n', "dns.timeout"),
    ("duration-dns-zero", f"{LISTENER}[dns]\ntimeout = 0\n", "dns.timeout"),
    # impossible numbers
    ("zero-recipients", f"{LISTENER}[limits]\nmax_recipients = 0\n", "limits.max_recipients"),
    ("negative-connections", f"{LISTENER}[limits]\nmax_connections = -5\n",
     "limits.max_connections"),
    ("mx-port-zero", f"{LISTENER}[relay]\nmx_port = 0\n", "relay.mx_port"),
    ("mx-port-high", f"{LISTENER}[relay]\nmx_port = 65536\n", "relay.mx_port"),
    ("concurrency-zero", f"{LISTENER}[queue]\nconcurrency = 0\n", "queue.concurrency"),
    ("journal-type", f'{LISTENER}[queue]\njournal = "yes"\n', "queue.journal"),
    ("per-destination-negative", f"{LISTENER}[queue]\nper_destination = -1\n",
     "queue.per_destination"),
    # endpoints
    ("endpoint-type", '[[listener]]\nendpoint = "bogus:25"\n', "listener[0].endpoint"),
    ("endpoint-port", '[[listener]]\nendpoint = "tcp:notaport"\n', "listener[0].endpoint"),
    ("endpoint-arg", '[[listener]]\nendpoint = "tcp:25:colour=red"\n', "listener[0].endpoint"),
    ("endpoint-empty", '[[listener]]\nendpoint = ""\n', "listener[0].endpoint"),
    ("endpoint-missing", '[[listener]]\nkind = "smtp"\n', "listener[0].endpoint"),
    ("metrics-endpoint", f'{LISTENER}[metrics]\nlisten = "tcp:x"\n', "metrics.listen"),
    ("metrics-missing", f"{LISTENER}[metrics]\n", "metrics.listen"),
    ("no-listener", "[server]\nhostname = \"x\"\n", "listener"),
    ("listener-kind", '[[listener]]\nendpoint = "tcp:25"\nkind = "lmtp"\n', "listener[0].kind"),
    ("submissions-needs-tls",
     '[[listener]]\nendpoint = "tcp:465"\nkind = "submissions"\n[auth]\nusers_file = "u"\n',
     "listener"),
    ("submission-needs-auth", '[[listener]]\nendpoint = "tcp:587"\nkind = "submission"\n',
     "listener"),
    # networks
    ("cidr-prefix", f'{LISTENER}[relay]\ntrusted_networks = ["10.0.0.0/33"]\n',
     "relay.trusted_networks"),
    ("cidr-text", f'{LISTENER}[relay]\ntrusted_networks = ["localhost"]\n',
     "relay.trusted_networks"),
    ("cidr-v6", f'{LISTENER}[relay]\ntrusted_networks = ["::1/129"]\n', "relay.trusted_networks"),
    ("cidr-type", f"{LISTENER}[relay]\ntrusted_networks = [10]\n", "relay.trusted_networks"),
    ("nameserver-port", f'{LISTENER}[dns]\nnameservers = ["127.0.0.1:99999"]\n',
     "dns.nameservers"),
    ("nameserver-name", f'{LISTENER}[dns]\nnameservers = ["localhost"]\n', "dns.nameservers"),
    ("nameserver-name-port", f'{LISTENER}[dns]\nnameservers = ["ns.example.test:53"]\n',
     "dns.nameservers"),
    # TLS policies and sections
    ("tls-policy-relay", f'{LISTENER}[relay]\ntls = "always"\n', "relay.tls"),
    ("tls-policy-route", f'{LISTENER}{RELAY_ROUTE}tls = "strict"\n', "route[0].tls"),
    ("tls-policy-type", f"{LISTENER}[relay]\ntls = true\n", "relay.tls"),
    ("tls-no-key", f'{LISTENER}[tls]\ncertificate = "c"\n', "tls.private_key"),
    ("tls-no-certificate", f'{LISTENER}[tls]\nprivate_key = "k"\n', "tls.certificate"),
    ("auth-no-users-file", f"{LISTENER}[auth]\nrequire_tls = false\n", "auth.users_file"),
    # routes
    ("route-no-domains", f'{LISTENER}[[route]]\naction = "local"\n', "route[0].domains"),
    ("route-empty-domains", f'{LISTENER}[[route]]\ndomains = []\naction = "local"\n',
     "route[0].domains"),
    ("route-bad-domain", f'{LISTENER}[[route]]\ndomains = ["exa mple.test"]\naction = "local"\n',
     "route[0].domains"),
    ("route-bad-wildcard", f'{LISTENER}[[route]]\ndomains = ["*example.test"]\naction = "relay"\n',
     "route[0].domains"),
    ("route-no-action", f'{LISTENER}[[route]]\ndomains = ["a.test"]\n', "route[0].action"),
    ("route-bad-action", f'{LISTENER}[[route]]\ndomains = ["a.test"]\naction = "deliver"\n',
     "route[0].action"),
    ("route-accept-from", f'{LISTENER}{RELAY_ROUTE}accept_from = "everyone"\n',
     "route[0].accept_from"),
    ("route-maildir-no-local", f'{LISTENER}{LOCAL_ROUTE}maildir = "var/mail/shared"\n',
     "route[0].maildir"),
    ("route-maildir-on-relay", f'{LISTENER}{RELAY_ROUTE}maildir = "var/mail/{{local}}"\n',
     "route[0].maildir"),
    ("route-mailboxes-on-relay", f'{LISTENER}{RELAY_ROUTE}mailboxes = ["a"]\n',
     "route[0].mailboxes"),
    ("route-via-on-local", f'{LISTENER}{LOCAL_ROUTE}via = "mx.test"\n', "route[0].via"),
    ("route-tls-on-reject",
     f'{LISTENER}[[route]]\ndomains = ["a.test"]\naction = "reject"\ntls = "verify"\n',
     "route[0].tls"),
    ("route-via-port", f'{LISTENER}{RELAY_ROUTE}via = "mx.test:0"\n', "route[0].via"),
    ("route-username-alone", f'{LISTENER}{RELAY_ROUTE}username = "u"\n', "route[0].username"),
    ("route-password-alone", f'{LISTENER}{RELAY_ROUTE}password_file = "p"\n',
     "route[0].username"),
    ("route-not-array", f'{LISTENER}[route]\ndomains = ["a.test"]\naction = "local"\n', "route"),
    # aliases
    ("alias-loop", f'{LISTENER}[aliases]\n"a@x.test" = ["b@x.test"]\n"b@x.test" = ["a@x.test"]\n',
     "aliases.a@x.test"),
    ("alias-loop-domains",
     f'{LISTENER}[aliases]\n"@a.test" = ["{{local}}@b.test"]\n"@b.test" = ["{{local}}@a.test"]\n',
     "aliases.@a.test"),
    ("alias-empty", f'{LISTENER}[aliases]\n"a@x.test" = []\n', "aliases.a@x.test"),
    ("alias-bad-key", f'{LISTENER}[aliases]\n"not an address" = ["a@x.test"]\n',
     "aliases.not an address"),
    ("alias-bad-domain-key", f'{LISTENER}[aliases]\n"@bad domain" = ["a@x.test"]\n',
     "aliases.@bad domain"),
    ("alias-bad-target", f'{LISTENER}[aliases]\n"a@x.test" = ["b@@x.test"]\n',
     "aliases.a@x.test"),
    ("alias-target-type", f'{LISTENER}[aliases]\n"a@x.test" = [1]\n', "aliases.a@x.test"),
    ("aliases-not-table", f'aliases = ["a"]\n{LISTENER}', "aliases"),
]


@pytest.mark.parametrize(("text", "key"), [(text, key) for _, text, key in BAD],
                         ids=[name for name, _, _ in BAD])
def test_refusal_is_one_line_naming_file_and_key(tmp_path: Path, text: str, key: str) -> None:
    path = tmp_path / "broken.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    assert f": {key}: " in message, message


def test_toml_syntax_error_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "syntax.toml"
    path.write_text('[[listener]\nendpoint = "tcp:25"\n')
    with pytest.raises(ConfigError, match=r"^.*syntax\.toml: TOML syntax: ") as caught:
        load_config(path)
    assert "\n" not in str(caught.value)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError, match=r"absent\.toml: cannot read") as caught:
        load_config(path)
    assert "\n" not in str(caught.value)


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'# caf\xe9\n[[listener]]\nendpoint = "tcp:25"\n')
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(path)


def test_parse_config_names_its_source() -> None:
    with pytest.raises(ConfigError, match=r"^inline\.toml: bogus: unknown key$"):
        parse_config(f"bogus = 1\n{LISTENER}", "inline.toml")
