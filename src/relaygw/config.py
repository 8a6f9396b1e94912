"""The TOML configuration, read into frozen typed records and validated whole.

Every problem is a ConfigError carrying one line, "FILE: KEY: PROBLEM", which
start-up prints before exiting non-zero; nothing is listened on. Relative paths
are kept relative: they resolve against the directory twistd runs in
(``--rundir``), which twistd enters only after the service is built.
"""

from __future__ import annotations

import ipaddress
import math
import re
import socket
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from relaygw.addresses import AddressError, parse_mailbox

ListenerKind = Literal["smtp", "submission", "submissions"]
RouteAction = Literal["local", "relay", "reject"]
TLSPolicy = Literal["none", "opportunistic", "required", "verify"]
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

LISTENER_KINDS = ("smtp", "submission", "submissions")
ROUTE_ACTIONS = ("local", "relay", "reject")
TLS_POLICIES = ("none", "opportunistic", "required", "verify")
DEFAULT_MAILDIR = "var/mail/{domain}/{local}"

DEFAULT_CONFIG_TOML = """\
# The embedded default: a working relay for the machine it runs on.
[[listener]]
endpoint = "tcp:2525:interface=127.0.0.1"
kind = "smtp"

[relay]
trusted_networks = ["127.0.0.0/8", "::1/128"]

[queue]
directory = "var/spool"

[[route]]
domains = ["localhost"]
action = "local"
maildir = "var/mail/{domain}/{local}"

[[route]]
domains = ["*"]
action = "relay"
accept_from = "trusted"
"""


class ConfigError(Exception):
    """A configuration problem, already phrased as the one line an operator reads."""


@dataclass(frozen=True)
class ListenerConfig:
    endpoint: str
    kind: ListenerKind = "smtp"


@dataclass(frozen=True)
class TLSConfig:
    certificate: Path
    private_key: Path


@dataclass(frozen=True)
class AuthConfig:
    users_file: Path
    require_tls: bool = True


@dataclass(frozen=True)
class LimitsConfig:
    max_message_size: int = 26214400
    max_recipients: int = 100
    max_connections: int = 1000
    max_connections_per_client: int = 50
    command_timeout: float = 300.0
    max_hops: int = 50
    max_auth_failures: int = 3


@dataclass(frozen=True)
class RelayConfig:
    trusted_networks: tuple[IPNetwork, ...] = (
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )
    mx_port: int = 25
    tls: TLSPolicy = "opportunistic"


@dataclass(frozen=True)
class DNSConfig:
    nameservers: tuple[tuple[str, int], ...] = ()
    timeout: float = 5.0


@dataclass(frozen=True)
class QueueConfig:
    directory: Path = Path("var/spool")
    retry_schedule: tuple[float, ...] = (60, 300, 900, 1800, 3600, 7200, 14400)
    max_age: float = 5 * 86400
    concurrency: int = 100
    per_destination: int = 10
    journal: bool = True  # small messages committed to the journal (relaygw.journal)


@dataclass(frozen=True)
class MetricsConfig:
    listen: str


@dataclass(frozen=True)
class RouteConfig:
    domains: tuple[str, ...]
    action: RouteAction
    accept_from: Literal["anyone", "trusted"]
    maildir: str = DEFAULT_MAILDIR
    mailboxes: frozenset[str] | None = None
    via: tuple[str, int] | None = None
    tls: TLSPolicy | None = None
    ca_file: Path | None = None
    username: str | None = None
    password_file: Path | None = None


@dataclass(frozen=True)
class Config:
    source: str
    hostname: str
    listeners: tuple[ListenerConfig, ...]
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    relay: RelayConfig = field(default_factory=RelayConfig)
    dns: DNSConfig = field(default_factory=DNSConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    routes: tuple[RouteConfig, ...] = ()
    aliases: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    tls: TLSConfig | None = None
    auth: AuthConfig | None = None
    metrics: MetricsConfig | None = None


# --- value parsers -------------------------------------------------------------

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, None: 1}


def parse_duration(value: object) -> float:
    """Seconds from ``"30s"``, ``"5m"``, ``"2h"``, ``"5d"`` or an integer of seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as \"30s\" or an integer of seconds")
    if isinstance(value, int | float):
        if not math.isfinite(value):  # TOML's nan and inf: no time at all, or never
            raise ValueError(f"a duration must be a finite number of seconds, not {value}")
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            return float(match.group(1)) * _UNITS[match.group(2)]
        raise ValueError(f"bad duration {value!r} (use a number with s, m, h or d)")
    raise ValueError("expected a duration such as \"30s\" or an integer of seconds")


def parse_host_port(value: str, default_port: int) -> tuple[str, int]:
    """``host``, ``host:port``, ``[v6]`` or ``[v6]:port``."""
    value = value.strip()
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"bad address {value!r}")
        port_text = rest[1:] if rest else ""
    elif value.count(":") > 1:  # a bare IPv6 address, no port
        host, port_text = value, ""
    else:
        host, _, port_text = value.partition(":")
    if not host:
        raise ValueError(f"bad address {value!r}")
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"bad port in {value!r}")
    return host, int(port_text)


def check_endpoint(description: str) -> None:
    """Raise ValueError when a Twisted server endpoint string does not parse."""
    from twisted.internet.endpoints import serverFromString
    from twisted.internet.testing import MemoryReactor

    if description.startswith("systemd:"):
        # Parsing it needs the sockets systemd passes (LISTEN_FDS), which exist
        # only under systemd; `relaygwctl check` must still accept the file.
        if not re.fullmatch(r"systemd:(?:[a-zA-Z]+=[^:]+)(?::[a-zA-Z]+=[^:]+)*", description):
            raise ValueError(f"endpoint {description!r} does not parse")
        return
    try:
        serverFromString(MemoryReactor(), description)
    except Exception as e:
        raise ValueError(f"endpoint {description!r} does not parse: {e}") from None


# --- the reader ----------------------------------------------------------------


class _Table:
    """One TOML table being read: remembers which keys were used, to refuse unknown ones."""

    def __init__(self, source: str, prefix: str, data: object) -> None:
        self.source = source
        self.prefix = prefix
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: {prefix}: expected a table")
        self.data: dict[str, Any] = data

    def error(self, key: str, problem: str) -> ConfigError:
        name = f"{self.prefix}.{key}" if self.prefix and key else (self.prefix or key)
        return ConfigError(f"{self.source}: {name}: {problem}")

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
        if key not in self.data:
            return default
        value = self.data[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) and bool not in kinds:
            raise self.error(key, f"expected {_kind_name(kinds)}, got a boolean")
        if not isinstance(value, kinds):
            raise self.error(key, f"expected {_kind_name(kinds)}, got {type(value).__name__}")
        return value

    def convert(self, key: str, parse: Callable[[Any], Any], default: Any = None) -> Any:
        if key not in self.data:
            return default
        try:
            return parse(self.data[key])
        except ValueError as e:
            raise self.error(key, str(e)) from None

    def positive_int(self, key: str, default: int) -> int:
        value = self.get(key, int, default)
        if value <= 0:
            raise self.error(key, "must be a positive integer")
        return int(value)

    def strings(self, key: str, default: tuple[str, ...] = ()) -> tuple[str, ...]:
        value = self.get(key, list, None)
        if value is None:
            return default
        if not all(isinstance(item, str) for item in value):
            raise self.error(key, "expected a list of strings")
        return tuple(value)

    def refuse_unknown(self, known: set[str]) -> None:
        for key in self.data:
            if key not in known:
                raise self.error(key, "unknown key")


def _kind_name(kinds: tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "a boolean",
             list: "a list", dict: "a table"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _duration(value: object) -> float:
    return parse_duration(value)


def _network(value: object) -> IPNetwork:
    if not isinstance(value, str):
        raise ValueError("expected CIDR strings such as \"192.0.2.0/24\"")
    try:
        return ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ValueError(f"bad CIDR {value!r}") from None


def _networks(value: object) -> tuple[IPNetwork, ...]:
    if not isinstance(value, list):
        raise ValueError("expected a list of CIDR strings")
    return tuple(_network(item) for item in value)


def _endpoint(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError("expected an endpoint string such as \"tcp:2525\"")
    check_endpoint(value)
    return value


def _choice(options: tuple[str, ...]) -> Callable[[object], str]:
    def parse(value: object) -> str:
        if value not in options:
            raise ValueError(f"must be one of {', '.join(options)}; got {value!r}")
        return str(value)

    return parse


def _path(value: object) -> Path:
    if not isinstance(value, str) or not value:
        raise ValueError("expected a path string")
    return Path(value)


def _domain_pattern(value: str) -> str:
    if value.strip().endswith("*."):
        raise ValueError(f"bad domain pattern {value!r} (exact, \"*.suffix\" or \"*\")")
    pattern = value.strip().lower().rstrip(".")
    body = pattern[2:] if pattern.startswith("*.") else pattern
    if pattern == "*":
        return pattern
    if pattern.startswith("*") and not pattern.startswith("*."):
        raise ValueError(f"bad domain pattern {value!r} (exact, \"*.suffix\" or \"*\")")
    if not body or not re.fullmatch(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*", body):
        raise ValueError(f"bad domain pattern {value!r} (exact, \"*.suffix\" or \"*\")")
    return pattern


def load_config(path: str | Path | None = None, *, default_hostname: str | None = None) -> Config:
    """Read and validate ``path`` (None: the embedded default). Raises ConfigError."""
    if path is None:
        source, text = "<default>", DEFAULT_CONFIG_TOML
    else:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"{source}: cannot read: {e.strerror or e}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{source}: not UTF-8 text") from None
    return parse_config(text, source, default_hostname=default_hostname)


def parse_config(text: str, source: str = "<string>", *,
                 default_hostname: str | None = None) -> Config:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: TOML syntax: {e}") from None
    top = _Table(source, "", data)
    top.refuse_unknown({"server", "listener", "tls", "auth", "limits", "relay", "dns",
                        "queue", "metrics", "route", "aliases"})

    server = _Table(source, "server", data.get("server", {}))
    server.refuse_unknown({"hostname"})
    hostname = server.get("hostname", str) or default_hostname or socket.getfqdn()

    listeners = _listeners(source, data)
    tls = _tls(source, data)
    auth = _auth(source, data)
    limits = _limits(source, data)
    relay = _relay(source, data)
    dns = _dns(source, data)
    queue = _queue(source, data)
    metrics = None
    if "metrics" in data:
        table = _Table(source, "metrics", data["metrics"])
        table.refuse_unknown({"listen"})
        listen = table.convert("listen", _endpoint)
        if listen is None:
            raise table.error("listen", "missing")
        metrics = MetricsConfig(listen=listen)
    routes = _routes(source, data)
    aliases = _aliases(source, data)
    for listener in listeners:
        if listener.kind == "submissions" and tls is None:
            raise ConfigError(f"{source}: listener: kind \"submissions\" needs a [tls] section")
        if listener.kind in ("submission", "submissions") and auth is None:
            raise ConfigError(
                f"{source}: listener: kind \"{listener.kind}\" needs an [auth] section")
    return Config(source=source, hostname=hostname, listeners=listeners, limits=limits,
                  relay=relay, dns=dns, queue=queue, routes=routes, aliases=aliases,
                  tls=tls, auth=auth, metrics=metrics)


def _listeners(source: str, data: dict[str, Any]) -> tuple[ListenerConfig, ...]:
    raw = data.get("listener", [])
    if not isinstance(raw, list):
        raise ConfigError(f"{source}: listener: expected [[listener]] tables")
    listeners = []
    for index, item in enumerate(raw):
        table = _Table(source, f"listener[{index}]", item)
        table.refuse_unknown({"endpoint", "kind"})
        endpoint = table.convert("endpoint", _endpoint)
        if endpoint is None:
            raise table.error("endpoint", "missing")
        kind = table.convert("kind", _choice(LISTENER_KINDS), "smtp")
        listeners.append(ListenerConfig(endpoint=endpoint, kind=kind))
    if not listeners:
        raise ConfigError(f"{source}: listener: at least one [[listener]] is needed")
    return tuple(listeners)


def _tls(source: str, data: dict[str, Any]) -> TLSConfig | None:
    if "tls" not in data:
        return None
    table = _Table(source, "tls", data["tls"])
    table.refuse_unknown({"certificate", "private_key"})
    certificate = table.convert("certificate", _path)
    private_key = table.convert("private_key", _path)
    if certificate is None:
        raise table.error("certificate", "missing")
    if private_key is None:
        raise table.error("private_key", "missing")
    return TLSConfig(certificate=certificate, private_key=private_key)


def _auth(source: str, data: dict[str, Any]) -> AuthConfig | None:
    if "auth" not in data:
        return None
    table = _Table(source, "auth", data["auth"])
    table.refuse_unknown({"users_file", "require_tls"})
    users_file = table.convert("users_file", _path)
    if users_file is None:
        raise table.error("users_file", "missing")
    return AuthConfig(users_file=users_file, require_tls=table.get("require_tls", bool, True))


def _limits(source: str, data: dict[str, Any]) -> LimitsConfig:
    table = _Table(source, "limits", data.get("limits", {}))
    d = LimitsConfig()
    table.refuse_unknown(set(d.__dataclass_fields__))
    timeout = table.convert("command_timeout", _duration, d.command_timeout)
    if timeout <= 0:
        raise table.error("command_timeout", "must be longer than zero")
    return LimitsConfig(
        max_message_size=table.positive_int("max_message_size", d.max_message_size),
        max_recipients=table.positive_int("max_recipients", d.max_recipients),
        max_connections=table.positive_int("max_connections", d.max_connections),
        max_connections_per_client=table.positive_int(
            "max_connections_per_client", d.max_connections_per_client),
        command_timeout=timeout,
        max_hops=table.positive_int("max_hops", d.max_hops),
        max_auth_failures=table.positive_int("max_auth_failures", d.max_auth_failures),
    )


def _relay(source: str, data: dict[str, Any]) -> RelayConfig:
    table = _Table(source, "relay", data.get("relay", {}))
    d = RelayConfig()
    table.refuse_unknown({"trusted_networks", "mx_port", "tls"})
    mx_port = table.get("mx_port", int, d.mx_port)
    if not 0 < mx_port < 65536:
        raise table.error("mx_port", "must be a port number (1-65535)")
    return RelayConfig(
        trusted_networks=table.convert("trusted_networks", _networks, d.trusted_networks),
        mx_port=mx_port,
        tls=table.convert("tls", _choice(TLS_POLICIES), d.tls),
    )


def _dns(source: str, data: dict[str, Any]) -> DNSConfig:
    table = _Table(source, "dns", data.get("dns", {}))
    table.refuse_unknown({"nameservers", "timeout"})
    try:
        servers = [_nameserver(item) for item in table.strings("nameservers")]
    except ValueError as e:
        raise table.error("nameservers", str(e)) from None
    timeout = table.convert("timeout", _duration, DNSConfig.timeout)
    if timeout <= 0:
        raise table.error("timeout", "must be longer than zero")
    return DNSConfig(nameservers=tuple(servers), timeout=timeout)


def _nameserver(value: str) -> tuple[str, int]:
    """An IP address, optionally with ``:port`` (``[v6]:port``). Not a name: the
    resolver must reach its nameserver before it can resolve anything, so a name
    would need a resolver of its own (resolv.conf(5) takes addresses only too)."""
    host, port = parse_host_port(value, 53)
    try:
        return str(ipaddress.ip_address(host)), port
    except ValueError:
        raise ValueError(f"must be an IP address, optionally with :port, not {value!r}"
                         ) from None


def _queue(source: str, data: dict[str, Any]) -> QueueConfig:
    table = _Table(source, "queue", data.get("queue", {}))
    d = QueueConfig()
    table.refuse_unknown(set(d.__dataclass_fields__))
    schedule = d.retry_schedule
    if "retry_schedule" in table.data:
        raw = table.get("retry_schedule", list)
        try:
            schedule = tuple(parse_duration(item) for item in raw)
        except ValueError as e:
            raise table.error("retry_schedule", str(e)) from None
        if not schedule:
            raise table.error("retry_schedule", "needs at least one duration")
        if any(delay <= 0 for delay in schedule):
            raise table.error("retry_schedule", "every delay must be longer than zero")
    max_age = table.convert("max_age", _duration, d.max_age)
    if max_age <= 0:
        raise table.error("max_age", "must be longer than zero")
    return QueueConfig(
        directory=table.convert("directory", _path, d.directory),
        retry_schedule=schedule,
        max_age=max_age,
        concurrency=table.positive_int("concurrency", d.concurrency),
        per_destination=table.positive_int("per_destination", d.per_destination),
        journal=table.get("journal", bool, d.journal),
    )


_ROUTE_KEYS = {"domains", "action", "accept_from", "maildir", "mailboxes", "via", "tls",
               "ca_file", "username", "password_file"}


def _routes(source: str, data: dict[str, Any]) -> tuple[RouteConfig, ...]:
    raw = data.get("route", [])
    if not isinstance(raw, list):
        raise ConfigError(f"{source}: route: expected [[route]] tables")
    routes = []
    for index, item in enumerate(raw):
        table = _Table(source, f"route[{index}]", item)
        table.refuse_unknown(_ROUTE_KEYS)
        domains = table.strings("domains")
        if not domains:
            raise table.error("domains", "a route needs at least one domain")
        try:
            domains = tuple(_domain_pattern(d) for d in domains)
        except ValueError as e:
            raise table.error("domains", str(e)) from None
        action = table.convert("action", _choice(ROUTE_ACTIONS))
        if action is None:
            raise table.error("action", "missing (local, relay or reject)")
        default_accept = "trusted" if "*" in domains else "anyone"
        accept_from = table.convert("accept_from", _choice(("anyone", "trusted")), default_accept)
        maildir = table.get("maildir", str, DEFAULT_MAILDIR)
        if "{local}" not in maildir:
            raise table.error("maildir", "must contain {local}, or every recipient shares one")
        mailboxes = table.strings("mailboxes", None)  # type: ignore[arg-type]
        via = table.convert("via", lambda v: parse_host_port(_string(v), 25))
        route = RouteConfig(
            domains=domains, action=action, accept_from=accept_from, maildir=maildir,
            mailboxes=frozenset(m.lower() for m in mailboxes) if mailboxes is not None else None,
            via=via,
            tls=table.convert("tls", _choice(TLS_POLICIES)),
            ca_file=table.convert("ca_file", _path),
            username=table.get("username", str),
            password_file=table.convert("password_file", _path),
        )
        if action != "local" and ("maildir" in table.data or "mailboxes" in table.data):
            raise table.error("maildir" if "maildir" in table.data else "mailboxes",
                              "only a local route has mailboxes")
        if action != "relay":
            for key in ("via", "tls", "ca_file", "username", "password_file"):
                if key in table.data:
                    raise table.error(key, "only a relay route has a next hop")
        if (route.username is None) != (route.password_file is None):
            raise table.error("username", "username and password_file go together")
        routes.append(route)
    return tuple(routes)


def _string(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError("expected a string")
    return value


def _aliases(source: str, data: dict[str, Any]) -> dict[str, tuple[str, ...]]:
    table = _Table(source, "aliases", data.get("aliases", {}))
    aliases: dict[str, tuple[str, ...]] = {}
    for key in table.data:
        targets = table.strings(key)
        if not targets:
            raise table.error(key, "an alias needs at least one target")
        name = key.strip().lower()
        if name.startswith("@"):
            if not re.fullmatch(r"@[a-z0-9_-]+(\.[a-z0-9_-]+)*", name):
                raise table.error(key, "bad domain alias (\"@domain\")")
        else:
            try:
                parse_mailbox(name)
            except AddressError as e:
                raise table.error(key, f"bad address: {e}") from None
        checked = []
        for target in targets:
            try:
                parse_mailbox(target.replace("{local}", "x").replace("{domain}", "x.test"))
            except AddressError as e:
                raise table.error(key, f"bad target {target!r}: {e}") from None
            checked.append(target.strip())
        aliases[name] = tuple(checked)
    from relaygw.aliases import AliasLoop, find_alias_loop

    try:
        find_alias_loop(aliases)
    except AliasLoop as e:
        raise table.error(e.key, f"alias loop: {e}") from None
    return aliases
