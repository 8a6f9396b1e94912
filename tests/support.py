"""Shared fakes for the inbound SMTP tests: a gateway, sessions over StringTransport.

A FakeGateway is the ``Gateway`` protocol of relaygw.smtpserver made of real
parts (a Router over a parsed Config, a Spool in a temporary directory, a
MailLog, a ConnectionLimiter) with a Clock for time and a direct call for the
spool's blocking work. ``accepted`` and ``etrn`` only record what they get.

A Session drives one SMTPServerProtocol over a StringTransport: ``send`` feeds
bytes and returns the reply lines written since the previous call.
"""

from __future__ import annotations

import errno
import functools
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.failure import Failure

from relaygw.config import Config, parse_config
from relaygw.envelope import Envelope
from relaygw.journal import Journal
from relaygw.logs import MailLog
from relaygw.routing import Router
from relaygw.smtpserver import ConnectionLimiter, SMTPServerProtocol
from relaygw.spool import BlockingRunner, Spool

HOSTNAME = "relay.example.test"
TRUSTED_PEER = IPv4Address("TCP", "127.0.0.5", 1234)
UNTRUSTED_PEER = IPv4Address("TCP", "192.0.2.7", 1234)

# Every reply but the banner, the HELO/EHLO answer and 354 carries an RFC 3463 code.
ENHANCED = re.compile(r"^\d{3}[ -][245]\.\d{1,3}\.\d{1,3} ")
REPLY_LINE = re.compile(r"^[2-5]\d\d[ -]")
QUEUED = re.compile(r"^250 2\.0\.0 Ok: queued as ([0-9A-F]{19})$")
RECEIVED_HEADER = re.compile(
    rb"Received: from [^\r\n]* \(\[[^\r\n]*\]\)\r\n"
    rb"\tby [^\r\n]* id [0-9A-F]{19}(?:\r\n\tfor <[^\r\n]*>)?; "
    rb"[A-Z][a-z]{2}, \d{2} [A-Z][a-z]{2} \d{4} \d{2}:\d{2}:\d{2} [+-]\d{4}\r\n")

LIMITS = {
    "max_message_size": 200_000,
    "max_recipients": 5,
    "max_connections": 10,
    "max_connections_per_client": 5,
    "command_timeout": "30s",
    "max_hops": 50,
}

ROUTES = """
[[route]]
domains = ["example.test"]
action = "local"
mailboxes = ["alice", "bob"]

[[route]]
domains = ["reject.test"]
action = "reject"

[[route]]
domains = ["branch.example.test"]
action = "relay"
via = "10.1.0.25:25"

[[route]]
domains = ["*"]
action = "relay"

[aliases]
"postmaster@example.test" = ["alice@example.test"]
"sales@example.test" = ["bob@example.test", "carol@partner.test"]
"@old.example.test" = ["{local}@example.test"]
"ghost@example.test" = ["nobody@example.test"]
"""


def config_text(directory: Path, **limits: int | str) -> str:
    values = {**LIMITS, **limits}
    lines = [f"{key} = {value!r}" if isinstance(value, int) else f'{key} = "{value}"'
             for key, value in values.items()]
    return (f'[server]\nhostname = "{HOSTNAME}"\n\n'
            '[[listener]]\nendpoint = "tcp:0:interface=127.0.0.1"\n\n'
            f'[queue]\ndirectory = "{directory}"\n\n'
            "[limits]\n" + "\n".join(lines) + "\n" + ROUTES)


def direct_runner(fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
    """The spool's blocking work done at once (a thread pool in production)."""
    return maybeDeferred(fn, *args)


class ManualRunner:
    """Blocking work that waits for the test: nothing runs before ``run_all``."""

    def __init__(self) -> None:
        self.pending: list[tuple[Callable[..., Any], tuple[Any, ...], Deferred[Any]]] = []

    def __call__(self, fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.pending.append((fn, args, d))
        return d

    def run_all(self) -> None:
        while self.pending:
            fn, args, d = self.pending.pop(0)
            maybeDeferred(fn, *args).chainDeferred(d)


class FailingOS:
    """The ``os`` module, except that ``write`` and/or ``fsync`` fail (a full disk);
    a write to an ``O_DSYNC`` file fails with ``fsync`` (the data written, not
    made durable)."""

    def __init__(self, *, write: bool = False, fsync: bool = False,
                 error: int = errno.ENOSPC) -> None:
        self.fail_write = write
        self.fail_fsync = fsync  # also an O_DSYNC write: its sync
        self.error = error
        self.calls: list[str] = []
        self._dsync_fds: set[int] = set()

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def write(self, fd: int, data: Any) -> int:
        self.calls.append("write")
        if self.fail_write:
            raise OSError(self.error, os.strerror(self.error))
        return os.write(fd, data)

    def fsync(self, fd: int) -> None:
        self.calls.append("fsync")
        if self.fail_fsync:
            raise OSError(self.error, os.strerror(self.error))
        os.fsync(fd)

    def open(self, path: Any, flags: int, mode: int = 0o777, **kwargs: Any) -> int:
        fd = os.open(path, flags, mode, **kwargs)
        if flags & os.O_DSYNC:
            self._dsync_fds.add(fd)
        else:
            self._dsync_fds.discard(fd)
        return fd

    def writev(self, fd: int, buffers: Any) -> int:  # the journal's write
        self.calls.append("writev")
        if self.fail_write:
            raise OSError(self.error, os.strerror(self.error))
        written = os.writev(fd, buffers)
        if self.fail_fsync and fd in self._dsync_fds:  # an O_DSYNC write is its sync
            raise OSError(self.error, os.strerror(self.error))
        return written

    def fdatasync(self, fd: int) -> None:  # the journal's flush
        self.calls.append("fdatasync")
        if self.fail_fsync:
            raise OSError(self.error, os.strerror(self.error))
        os.fdatasync(fd)


class NoSyncOS(FailingOS):
    """The ``os`` module without fsync: for property tests that run thousands of
    commits and are not about durability."""

    def fsync(self, fd: int) -> None:
        pass


@dataclass
class FakeGateway:
    """relaygw.smtpserver.Gateway from real parts, recording what it is handed."""

    config: Config
    router: Router
    spool: Spool
    clock: Clock
    maillog: MailLog = field(default_factory=MailLog)
    connections: ConnectionLimiter = field(default_factory=ConnectionLimiter)
    server_tls: Any = None     # relaygw.tlsserver.ServerTLS when a test enables TLS
    authenticator: Any = None  # relaygw.auth.Authenticator when a test enables AUTH
    accepted_envelopes: list[Envelope] = field(default_factory=list)
    etrn_domains: list[str] = field(default_factory=list)

    def accepted(self, envelope: Envelope) -> None:
        self.accepted_envelopes.append(envelope)

    def etrn(self, domain: str) -> None:
        self.etrn_domains.append(domain)

    # --- what is in the spool -------------------------------------------------

    @property
    def directory(self) -> Path:
        return self.spool.directory

    def files(self) -> list[str]:
        """The spool's files (not the journal's directory), and journaled ids."""
        return sorted([p.name for p in self.directory.iterdir() if p.name != "journal"]
                      + [f"{queue_id} (journaled)" for queue_id in self.spool.journaled])

    def queued_ids(self) -> list[str]:
        return self.spool.queue_ids()

    def message(self, queue_id: str) -> bytes:
        return self.spool.read_message(queue_id)

    def envelope(self, queue_id: str) -> Envelope:
        return self.spool.load(queue_id)

    def body(self, queue_id: str) -> bytes:
        """The spooled message without the Received: header the server put first."""
        message = self.message(queue_id)
        match = RECEIVED_HEADER.match(message)
        assert match, message[:300]
        return message[match.end():]


@functools.lru_cache(maxsize=32)
def _parsed(limits: tuple[tuple[str, int | str], ...]) -> Config:
    """Parsing checks the listener endpoint through Twisted's plugins: once is enough."""
    return parse_config(config_text(Path("var/spool"), **dict(limits)), "<test>")


def make_gateway(directory: Path, *, run_blocking: BlockingRunner = direct_runner,
                 os_module: Any = os, journal: bool = False,
                 **limits: int | str) -> FakeGateway:
    """``journal``: small messages go to a journal written at once (no thread)."""
    spool_dir = Path(directory) / "spool"
    config = _parsed(tuple(sorted(limits.items())))
    config = replace(config, queue=replace(config.queue, directory=spool_dir))
    spool = Spool(spool_dir, run_blocking, os_module,
                  journal=Journal(spool_dir / "journal", None, os_module)
                  if journal else None)
    spool.prepare()
    return FakeGateway(config=config, router=Router(config), spool=spool, clock=Clock())


class Session:
    """One client connection: bytes in, reply lines out.

    While ``Session.registry`` is a list, every new session is appended to it
    (a test module can then check every reply its dialogs produced).
    """

    registry: ClassVar[list[Session] | None] = None

    def __init__(self, gateway: FakeGateway, peer: IPv4Address = TRUSTED_PEER,
                 kind: str = "smtp") -> None:
        if Session.registry is not None:
            Session.registry.append(self)
        self.gateway = gateway
        self.transport = StringTransport(peerAddress=peer)
        self.protocol = SMTPServerProtocol(gateway, kind, "test")
        self.protocol.makeConnection(self.transport)
        self._seen = 0

    def send(self, data: bytes | str) -> list[str]:
        """Feed ``data`` in one piece; the reply lines written since the last call."""
        if isinstance(data, str):
            data = data.encode()
        self.protocol.dataReceived(data)
        return self.new_lines()

    def send_pieces(self, pieces: list[bytes]) -> list[str]:
        for piece in pieces:
            self.protocol.dataReceived(piece)
        return self.new_lines()

    def new_lines(self) -> list[str]:
        value = self.transport.value()
        fresh, self._seen = value[self._seen:], len(value)
        return split_replies(fresh)

    def all_lines(self) -> list[str]:
        return split_replies(self.transport.value())

    @property
    def closed(self) -> bool:
        """True once the server asked for the connection to close."""
        return bool(self.transport.disconnecting)

    def lose(self) -> None:
        """The connection goes away (what the reactor does after loseConnection)."""
        self.protocol.connectionLost(Failure(ConnectionDone()))


def split_replies(raw: bytes) -> list[str]:
    assert raw == b"" or raw.endswith(b"\r\n"), raw[-50:]
    text = raw.decode("utf-8")
    return text.split("\r\n")[:-1] if text else []


def greet(gateway: FakeGateway, peer: IPv4Address = TRUSTED_PEER,
          helo: str = "client.test") -> Session:
    """A session past the banner and EHLO."""
    session = Session(gateway, peer)
    session.send(f"EHLO {helo}\r\n")
    session.new_lines()
    return session


def transaction(body: bytes, sender: str = "sender@client.test",
                recipients: tuple[str, ...] = ("alice@example.test",)) -> bytes:
    """MAIL, RCPT..., DATA, an already dot-stuffed body ending with CRLF, the dot."""
    commands = [f"MAIL FROM:<{sender}>".encode()]
    commands += [f"RCPT TO:<{r}>".encode() for r in recipients]
    commands.append(b"DATA")
    return b"\r\n".join(commands) + b"\r\n" + body + b".\r\n"


def is_exempt_from_enhanced_code(line: str, previous: list[str]) -> bool:
    """The banner, HELO/EHLO answers (RFC 2034 section 3), 354 and 334 carry no RFC 3463
    code."""
    if line.startswith("220 ") or line.startswith("354 ") or line.startswith("334 "):
        return True  # 334: an RFC 4954 challenge is base64, no status code
    if line.startswith("250-"):
        return True  # EHLO lines: the first is the hostname, then keywords
    # the last line of an EHLO answer, or the one-line HELO answer: "250 hostname"
    return line == f"250 {HOSTNAME}" or bool(previous and previous[-1].startswith("250-"))


def malformed_replies(lines: list[str]) -> list[str]:
    """Lines that are not SMTP replies, or lack the enhanced code where one is due."""
    bad = []
    for index, line in enumerate(lines):
        if not REPLY_LINE.match(line):
            bad.append(line)
        elif not is_exempt_from_enhanced_code(line, lines[:index]) and not ENHANCED.match(line):
            bad.append(line)
    return bad


@contextmanager
def log_events() -> Iterator[list[dict[str, Any]]]:
    """Collect every twisted.logger event while the block runs."""
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(events.append)


@contextmanager
def logged_errors() -> Iterator[list[dict[str, Any]]]:
    """Collect every twisted.logger event with a failure or at level error or worse."""
    errors: list[dict[str, Any]] = []

    def observer(event: dict[str, Any]) -> None:
        level = event.get("log_level")
        if "log_failure" in event or level in (LogLevel.error, LogLevel.critical):
            errors.append(event)

    globalLogPublisher.addObserver(observer)
    try:
        yield errors
    finally:
        globalLogPublisher.removeObserver(observer)
