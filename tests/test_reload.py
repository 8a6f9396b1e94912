"""Gateway.reload: a whole-config reload that keeps the sessions in flight."""

from __future__ import annotations

from pathlib import Path

from twisted.internet.address import IPv4Address
from twisted.internet.defer import maybeDeferred
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogLevel, globalLogPublisher

from relaygw.config import parse_config
from relaygw.service import Gateway
from relaygw.smtpserver import SMTPServerProtocol
from support import split_replies

BASE = """
[server]
hostname = "relay.test"
[[listener]]
endpoint = "{endpoint}"
[relay]
trusted_networks = ["127.0.0.0/8"]
[queue]
directory = "{spool}"
retry_schedule = ["1m", "5m"]
concurrency = 5
[[route]]
domains = ["old.test"]
action = "local"
maildir = "{mail}/{{domain}}/{{local}}"
mailboxes = ["alice"]
{extra}
[[route]]
domains = ["*"]
action = "relay"
accept_from = "trusted"
"""

NEW_ROUTE = """
[[route]]
domains = ["new.test"]
action = "local"
maildir = "{mail}/{{domain}}/{{local}}"
mailboxes = ["bob"]
"""


def sync_run(fn, *args):  # type: ignore[no-untyped-def]
    return maybeDeferred(fn, *args)


def write(tmp_path: Path, *, extra: str = "", endpoint: str = "tcp:2525:interface=127.0.0.1",
          retry: str = '["1m", "5m"]', name: str = "relaygw.toml") -> Path:
    text = BASE.format(endpoint=endpoint, spool=tmp_path / "spool", mail=tmp_path / "mail",
                       extra=extra.format(mail=tmp_path / "mail"))
    text = text.replace('retry_schedule = ["1m", "5m"]', f"retry_schedule = {retry}")
    path = tmp_path / name
    path.write_text(text)
    return path


def make_gateway(tmp_path: Path) -> tuple[Gateway, Path]:
    path = write(tmp_path)
    config = parse_config(path.read_text(), str(path))
    gateway = Gateway(config, MemoryReactorClock(), sync_run)
    gateway.spool.prepare()
    return gateway, path


class Client:
    def __init__(self, gateway: Gateway, peer: str = "192.0.2.7") -> None:
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", peer, 1234))
        self.protocol = SMTPServerProtocol(gateway, "smtp", "test")
        self.protocol.makeConnection(self.transport)
        self.seen = 0

    def send(self, line: str) -> list[str]:
        self.protocol.dataReceived(line.encode() + b"\r\n")
        value = self.transport.value()
        fresh, self.seen = value[self.seen:], len(value)
        return split_replies(fresh)


class Logged:
    def __init__(self) -> None:
        self.events: list[dict[str, object]] = []

    def __enter__(self) -> Logged:
        globalLogPublisher.addObserver(self.events.append)
        return self

    def __exit__(self, *exc: object) -> None:
        globalLogPublisher.removeObserver(self.events.append)

    def lines(self, level: LogLevel) -> list[str]:
        from twisted.logger import formatEvent
        return [formatEvent(e) for e in self.events if e.get("log_level") == level
                and str(e.get("log_namespace", "")).startswith("relaygw")]


def test_new_route_accepted_by_a_session_in_flight(tmp_path: Path) -> None:
    gateway, path = make_gateway(tmp_path)
    client = Client(gateway)
    client.send("EHLO client.test")
    assert client.send("MAIL FROM:<x@client.test>")[0].startswith("250")
    assert client.send("RCPT TO:<bob@new.test>")[0].startswith("554 5.7.1")

    write(tmp_path, extra=NEW_ROUTE)
    with Logged() as logged:
        assert gateway.reload_from(path)
    assert logged.lines(LogLevel.info) == [f"configuration reloaded from {path}"]
    assert logged.lines(LogLevel.error) == []

    # The same session, at its next command, sees the new route.
    assert client.send("RCPT TO:<bob@new.test>")[0].startswith("250")
    assert client.send("RCPT TO:<carol@new.test>")[0].startswith("550 5.1.1")
    assert client.send("RCPT TO:<alice@old.test>")[0].startswith("250")
    assert gateway.router.find_route("new.test") is not None
    relay = gateway.scheduler.deliverers["relay"]
    assert relay._router.find_route("new.test").mailboxes == frozenset({"bob"})  # type: ignore[attr-defined]


def test_bad_config_refused_with_one_error_line(tmp_path: Path) -> None:
    gateway, path = make_gateway(tmp_path)
    before = gateway.config
    text = path.read_text()
    path.write_text(text.replace('concurrency = 5', 'concurrency = "many"'))
    with Logged() as logged:
        assert not gateway.reload_from(path)
    errors = logged.lines(LogLevel.error)
    assert len(errors) == 1
    assert str(path) in errors[0] and "queue.concurrency" in errors[0]
    assert "keeping the previous configuration" in errors[0]
    assert logged.lines(LogLevel.info) == []
    assert gateway.config is before
    client = Client(gateway)
    client.send("EHLO client.test")
    client.send("MAIL FROM:<x@client.test>")
    assert client.send("RCPT TO:<alice@old.test>")[0].startswith("250")


def test_missing_file_refused(tmp_path: Path) -> None:
    gateway, _ = make_gateway(tmp_path)
    before = gateway.config
    with Logged() as logged:
        assert not gateway.reload_from(tmp_path / "gone.toml")
    (error,) = logged.lines(LogLevel.error)
    assert "gone.toml" in error and "cannot read" in error
    assert gateway.config is before


def test_listener_change_needs_a_restart(tmp_path: Path) -> None:
    gateway, path = make_gateway(tmp_path)
    old_listeners = gateway.config.listeners
    write(tmp_path, endpoint="tcp:2600:interface=127.0.0.1", extra=NEW_ROUTE)
    with Logged() as logged:
        assert gateway.reload_from(path)
    warnings = logged.lines(LogLevel.warn)
    assert warnings == ["reload: needs a restart: listener (the running value stays)"]
    assert gateway.config.listeners == old_listeners
    assert gateway.router.find_route("new.test") is not None  # the rest applies


def test_queue_limits_change_live(tmp_path: Path) -> None:
    gateway, path = make_gateway(tmp_path)
    text = path.read_text().replace("concurrency = 5", "concurrency = 7\nmax_age = \"1d\"")
    text = text.replace(str(tmp_path / "spool"), str(tmp_path / "elsewhere"))
    text = text.replace('retry_schedule = ["1m", "5m"]',
                        'retry_schedule = ["30s"]\njournal = false')
    path.write_text(text)
    with Logged() as logged:
        assert gateway.reload_from(path)
    assert logged.lines(LogLevel.warn) == [
        "reload: needs a restart: queue.directory (the running value stays)",
        "reload: needs a restart: queue.journal (the running value stays)"]
    assert gateway.config.queue.journal is True and gateway.spool.journal is not None
    queue = gateway.scheduler.config
    assert queue.retry_schedule == (30.0,)
    assert queue.max_age == 86400.0
    assert queue.directory == tmp_path / "spool"
    assert gateway.scheduler._global.limit == 7
    assert gateway.scheduler._global.tokens == 7
    assert gateway.config.queue.directory == tmp_path / "spool"


def test_limits_and_trusted_networks_change_live(tmp_path: Path) -> None:
    gateway, path = make_gateway(tmp_path)
    text = path.read_text().replace('["127.0.0.0/8"]', '["127.0.0.0/8", "192.0.2.0/24"]')
    path.write_text(text + "\n[limits]\nmax_recipients = 1\n")
    client = Client(gateway)
    client.send("EHLO client.test")
    client.send("MAIL FROM:<x@client.test>")
    assert client.send("RCPT TO:<someone@far.test>")[0].startswith("554 5.7.1")
    assert gateway.reload_from(path)
    assert client.send("RCPT TO:<someone@far.test>")[0].startswith("250")
    assert client.send("RCPT TO:<other@far.test>")[0].startswith("452 4.5.3")
