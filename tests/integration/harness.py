"""Integration harness: the real ``twistd -n relaygw`` on loopback, and clients to talk to it.

Everything here waits by polling against a deadline; nothing sleeps a fixed time.
"""

from __future__ import annotations

import contextlib
import email.parser
import email.policy
import json
import os
import re
import signal
import smtplib
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

VENV_BIN = Path(sys.executable).parent
TWISTD = VENV_BIN / "twistd"
RELAYGWCTL = VENV_BIN / "relaygwctl"

HOSTNAME = "relay.example.test"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
DELIVERY_TIMEOUT = 20.0


# --- waiting -----------------------------------------------------------------------------


class Timeout(AssertionError):
    """A condition polled against a deadline did not come true."""


def wait_for(
    predicate: Callable[[], T | None],
    timeout: float,
    message: str | Callable[[], str] = "condition",
    interval: float = 0.05,
) -> T:
    """Poll ``predicate`` until it returns something truthy; return that, or raise Timeout."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            raise Timeout(f"not true after {timeout:.1f}s: {text}")
        time.sleep(interval)


# --- ports -------------------------------------------------------------------------------


def pick_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def pick_common_port(hosts: Iterable[str]) -> int:
    """A TCP port free on every one of ``hosts`` (for a shared mx_port across sinks)."""
    hosts = list(hosts)
    for _ in range(50):
        port = pick_port(hosts[0])
        try:
            for host in hosts[1:]:
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                    s.bind((host, port))
        except OSError:
            continue
        return port
    raise RuntimeError(f"no common free port on {hosts}")


def _proc_net_hex(host: str) -> str:
    return f"{int.from_bytes(socket.inet_aton(host), sys.byteorder):08X}"


def listening_sockets() -> set[tuple[str, int, str]] | None:
    """(address, port, inode) of TCP sockets in LISTEN, from /proc/net/tcp{,6}; None if unknown."""
    found: set[tuple[str, int, str]] = set()
    seen_any = False
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(name).read_text().splitlines()[1:]
        except OSError:
            continue
        seen_any = True
        for line in lines:
            parts = line.split()
            if len(parts) < 10 or parts[3] != "0A":
                continue
            address, port_hex = parts[1].split(":")
            found.add((address, int(port_hex, 16), parts[9]))
    return found if seen_any else None


def _socket_inodes(pid: int) -> set[str] | None:
    try:
        links = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
    except OSError:
        return None
    return {link[8:-1] for link in links if link.startswith("socket:[")}


def is_listening(host: str, port: int, pid: int | None = None) -> bool:
    """True when something listens on host:port (or on the wildcard with that port).

    With ``pid``, only a socket that process holds counts (another run's daemon on the
    same port does not), where /proc tells.
    """
    sockets = listening_sockets()
    if sockets is None:  # no /proc: fall back to a probe connection
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            return False
    wanted = {_proc_net_hex(host), _proc_net_hex("0.0.0.0"), "0" * 32}
    wanted.add("0000000000000000FFFF0000" + _proc_net_hex(host))
    inodes = {inode for address, p, inode in sockets if address in wanted and p == port}
    if pid is None or not inodes:
        return bool(inodes)
    owned = _socket_inodes(pid)
    return bool(inodes & owned) if owned is not None else True


def listening_ports_of(pid: int) -> set[int]:
    """Ports on which process ``pid`` holds a listening TCP socket (empty if unknown)."""
    owned = _socket_inodes(pid) or set()
    return {port for _, port, inode in listening_sockets() or set() if inode in owned}


def port_listened(port: int) -> bool:
    """True when any address listens on ``port``."""
    sockets = listening_sockets() or set()
    return any(p == port for _, p, _ in sockets)


# --- configuration -----------------------------------------------------------------------

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else json.dumps(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {value!r} as TOML")


def _is_table_array(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, Mapping) for v in value)


def to_toml(data: Mapping[str, Any], prefix: str = "") -> str:
    """Write the small TOML subset our configs use: tables, arrays of tables, scalars, lists."""
    lines: list[str] = []
    tables: list[tuple[str, Mapping[str, Any]]] = []
    arrays: list[tuple[str, list[Mapping[str, Any]]]] = []
    for key, value in data.items():
        name = f"{prefix}.{_toml_key(key)}" if prefix else _toml_key(key)
        if isinstance(value, Mapping):
            tables.append((name, value))
        elif _is_table_array(value):
            arrays.append((name, value))
        else:
            lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    out = "\n".join(lines) + ("\n" if lines else "")
    for name, table in tables:
        out += f"\n[{name}]\n" + to_toml(table, name)
    for name, items in arrays:
        for item in items:
            out += f"\n[[{name}]]\n" + to_toml(item, name)
    return out


def base_config(
    *,
    trusted: list[str] | None = None,
    retry: list[str] | None = None,
    mailboxes: list[str] | None = None,
) -> dict[str, Any]:
    """A config with one local route ``example.test``, a reject route and the ``*`` relay.

    The listener is added by DaemonFactory.start() when the dict has none.
    """
    local: dict[str, Any] = {
        "domains": ["example.test"],
        "action": "local",
        "maildir": "var/mail/{domain}/{local}",
    }
    if mailboxes is not None:
        local["mailboxes"] = mailboxes
    return {
        "server": {"hostname": HOSTNAME},
        "relay": {"trusted_networks": trusted if trusted is not None else ["127.0.0.1/32"]},
        "queue": {"directory": "var/spool", "retry_schedule": retry or ["1s"]},
        "route": [
            local,
            {"domains": ["rejected.test"], "action": "reject"},
            {"domains": ["*"], "action": "relay", "accept_from": "trusted"},
        ],
    }


# --- the daemon --------------------------------------------------------------------------


class DaemonExited(AssertionError):
    """twistd exited while we waited for it to listen."""


@dataclass
class Daemon:
    """One ``twistd -n --pidfile= relaygw`` process in its own run directory."""

    run_dir: Path
    host: str
    port: int
    config_path: Path | None
    extra_args: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    exit_codes: list[int] = field(default_factory=list)

    @property
    def stdout_path(self) -> Path:
        return self.run_dir / "twistd.stdout"

    @property
    def stderr_path(self) -> Path:
        return self.run_dir / "twistd.stderr"

    def command(self) -> list[str]:
        cmd = [str(TWISTD), "-n", "--pidfile=", "relaygw"]
        if self.config_path is not None:
            cmd += ["--config", str(self.config_path)]
        return cmd + self.extra_args

    # lifecycle

    def spawn(self) -> subprocess.Popen[bytes]:
        """Start the process without waiting for anything."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.starts += 1
        marker = f"===== relaygw harness: start {self.starts} =====\n".encode()
        with self.stdout_path.open("ab") as out, self.stderr_path.open("ab") as err:
            out.write(marker)
            err.write(marker)
            out.flush()
            err.flush()
            env = dict(os.environ, PYTHONUNBUFFERED="1")
            self.proc = subprocess.Popen(
                self.command(), cwd=self.run_dir, stdout=out, stderr=err,
                stdin=subprocess.DEVNULL, env=env, start_new_session=True,
            )
        return self.proc

    def start(self, timeout: float = START_TIMEOUT) -> Daemon:
        self.spawn()
        self.wait_listening(timeout)
        return self

    def wait_listening(self, timeout: float = START_TIMEOUT) -> None:
        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                self.exit_codes.append(self.proc.returncode)
                raise DaemonExited(
                    f"twistd exited {self.proc.returncode} before listening on "
                    f"{self.host}:{self.port}:\n{self.output()[-4000:]}")
            return is_listening(self.host, self.port, pid=self.proc.pid)

        wait_for(ready, timeout, lambda: f"twistd listening on {self.host}:{self.port}\n"
                 + self.output()[-4000:])

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; the exit status (None if never started)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        code = self.proc.returncode
        self.exit_codes.append(code)
        self.proc = None
        return code

    def kill9(self) -> None:
        """SIGKILL at once, and reap it."""
        assert self.proc is not None and self.proc.poll() is None, "not running"
        self.proc.kill()
        self.proc.wait(STOP_TIMEOUT)
        self.exit_codes.append(self.proc.returncode)
        self.proc = None

    def restart(self, timeout: float = START_TIMEOUT) -> Daemon:
        if self.running:
            self.stop()
        return self.start(timeout)

    # output

    def output(self) -> str:
        """Everything twistd printed on stdout and stderr, over all its starts."""
        parts = []
        for path in (self.stdout_path, self.stderr_path):
            with contextlib.suppress(OSError):
                parts.append(path.read_text(errors="replace"))
        return "\n".join(parts)

    def log_lines(self) -> list[str]:
        return self.output().splitlines()

    def wait_log(self, *needles: str, timeout: float = DELIVERY_TIMEOUT) -> str:
        """The first log line containing every needle (case-insensitive)."""
        lowered = [n.lower() for n in needles]

        def find() -> str | None:
            for line in self.log_lines():
                if all(n in line.lower() for n in lowered):
                    return line
            return None

        return wait_for(find, timeout, lambda: f"a log line with {needles!r} in:\n"
                        + self.output()[-4000:])

    # mail

    def maildir(self, domain: str, local: str) -> Path:
        return self.run_dir / "var" / "mail" / domain / local

    def delivered(self) -> list[Path]:
        """Every file in any ``var/mail/*/*/new/``."""
        return sorted((self.run_dir / "var" / "mail").glob("*/*/new/*"))

    def smtp(self, source: str | None = None, timeout: float = 10.0) -> smtplib.SMTP:
        return smtplib.SMTP(self.host, self.port, timeout=timeout,
                            source_address=(source, 0) if source else None)

    def raw(self, source: str | None = None, timeout: float = 10.0) -> RawSMTP:
        return RawSMTP(self.host, self.port, source=source, timeout=timeout)


class DaemonFactory:
    """Starts daemons in fresh run directories under ``base`` and stops them all at the end."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.daemons: list[Daemon] = []

    def prepare(
        self,
        config: Mapping[str, Any] | str | None = None,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        extra_args: list[str] | None = None,
    ) -> Daemon:
        """Write the config (adding an smtp listener on ``host``:free port) without starting."""
        run_dir = self.base / f"run{len(self.daemons)}"
        run_dir.mkdir(parents=True)
        port = port or pick_port(host)
        config_path: Path | None = None
        if isinstance(config, str):
            config_path = run_dir / "relaygw.toml"
            config_path.write_text(config)
        elif config is not None:
            data = dict(config)
            data.setdefault("listener", [{"endpoint": f"tcp:{port}:interface={host}",
                                          "kind": "smtp"}])
            config_path = run_dir / "relaygw.toml"
            config_path.write_text(to_toml(data))
        daemon = Daemon(run_dir=run_dir, host=host, port=port, config_path=config_path,
                        extra_args=list(extra_args or []))
        self.daemons.append(daemon)
        return daemon

    def start(self, config: Mapping[str, Any] | str | None = None, **kwargs: Any) -> Daemon:
        return self.prepare(config, **kwargs).start()

    def stop_all(self) -> None:
        for daemon in self.daemons:
            with contextlib.suppress(Exception):
                daemon.stop()


# --- replies and a raw client ------------------------------------------------------------

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?: |$)")


@dataclass(frozen=True)
class Reply:
    code: int
    lines: tuple[str, ...]  # the text after "NNN-" / "NNN "

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    @property
    def enhanced(self) -> str | None:
        match = _ENHANCED.match(self.lines[0]) if self.lines else None
        return match.group(0).strip() if match else None

    def __str__(self) -> str:
        return "\n".join(f"{self.code} {line}" for line in self.lines)

    def has_enhanced_codes(self) -> bool:
        """Every line carries an RFC 3463 code whose class matches the reply's first digit."""
        for line in self.lines:
            match = _ENHANCED.match(line)
            if not match or match.group(1) != str(self.code)[0]:
                return False
        return True


def expect(reply: Reply, code: int, enhanced: str | None = None) -> Reply:
    """Assert the reply code, and the enhanced status code when given (or its presence)."""
    assert reply.code == code, f"expected {code} {enhanced or ''}, got: {reply}"
    if enhanced is not None:
        assert reply.enhanced == enhanced, f"expected {code} {enhanced}, got: {reply}"
    if code // 100 in (2, 4, 5):
        assert reply.has_enhanced_codes(), f"reply without RFC 3463 code: {reply}"
    return reply


class ConnectionClosed(AssertionError):
    pass


class RawSMTP:
    """Bytes over a socket, optionally from a chosen source address (127.0.0.x)."""

    def __init__(self, host: str, port: int, *, source: str | None = None,
                 timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(
            (host, port), timeout=timeout, source_address=(source, 0) if source else None)
        self.timeout = timeout
        self.buffer = b""
        self.replies: list[Reply] = []
        self.exempt: set[int] = set()  # indexes in replies that need no RFC 3463 code

    def check_enhanced_codes(self) -> None:
        """Assert RFC 2034: every 2xx/4xx/5xx reply but the greeting and EHLO/HELO's has one."""
        for index, reply in enumerate(self.replies):
            if index in self.exempt or (index == 0 and reply.code == 220):
                continue
            if reply.code // 100 in (2, 4, 5):
                assert reply.has_enhanced_codes(), f"reply without RFC 3463 code: {reply}"

    def __enter__(self) -> RawSMTP:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def _read_line(self, deadline: float) -> bytes:
        while b"\n" not in self.buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no complete reply line; have {self.buffer!r}")
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                raise ConnectionClosed(f"connection closed; pending {self.buffer!r}")
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line.rstrip(b"\r")

    def read_reply(self, timeout: float | None = None) -> Reply:
        deadline = time.monotonic() + (timeout if timeout is not None else self.timeout)
        lines: list[str] = []
        code = 0
        while True:
            line = self._read_line(deadline).decode("utf-8", "replace")
            match = re.match(r"^(\d{3})([ -])(.*)$", line) or re.match(r"^(\d{3})()$", line)
            assert match, f"malformed reply line {line!r}"
            code = int(match.group(1))
            lines.append(match.group(3))
            if match.group(2) != "-":
                break
        reply = Reply(code, tuple(lines))
        self.replies.append(reply)
        return reply

    def send(self, data: bytes | str) -> None:
        if isinstance(data, str):
            data = data.encode()
        self.sock.sendall(data)

    def cmd(self, line: str | bytes, timeout: float | None = None) -> Reply:
        if isinstance(line, str):
            line = line.encode()
        self.send(line + b"\r\n")
        reply = self.read_reply(timeout)
        if line[:4].upper() in (b"EHLO", b"HELO"):
            self.exempt.add(len(self.replies) - 1)
        return reply

    def ehlo(self, name: str = "client.example.test") -> Reply:
        """EHLO, asserting 250 (EHLO replies carry no RFC 3463 codes, per RFC 2034)."""
        reply = self.cmd(f"EHLO {name}")
        assert reply.code == 250, f"EHLO: {reply}"
        return reply

    def banner(self) -> Reply:
        return self.read_reply()

    def wait_closed(self, timeout: float = 5.0) -> bool:
        """True once the server closed the connection (data before EOF is kept in buffer)."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                return False
            except (ConnectionResetError, BrokenPipeError):
                return True
            if not chunk:
                return True
            self.buffer += chunk

    def start_mail(self, sender: str, rcpts: Iterable[str], helo: str = "client.example.test"
                   ) -> None:
        """EHLO, MAIL, RCPTs, DATA with every reply asserted positive."""
        self.ehlo(helo)
        expect(self.cmd(f"MAIL FROM:<{sender}>"), 250)
        for rcpt in rcpts:
            expect(self.cmd(f"RCPT TO:<{rcpt}>"), 250)
        reply = self.cmd("DATA")
        assert reply.code == 354, f"DATA: {reply}"


QUEUED = re.compile(r"^2\.0\.0 Ok: queued as (\S+)$")


def queue_id(reply: Reply | tuple[int, bytes]) -> str:
    """The id in ``250 2.0.0 Ok: queued as <id>``, asserting the exact form."""
    if isinstance(reply, Reply):
        code, text = reply.code, reply.text
    else:
        code, text = reply[0], reply[1].decode()
    match = QUEUED.match(text)
    assert code == 250 and match, f"expected '250 2.0.0 Ok: queued as <id>', got {code} {text!r}"
    return match.group(1)


# --- messages ----------------------------------------------------------------------------


def make_message(
    sender: str,
    rcpts: Iterable[str],
    subject: str = "test",
    body: str = "hello\r\n",
    *,
    message_id: str | None = None,
    extra_headers: Iterable[str] = (),
) -> bytes:
    """A small RFC 5322 message with CRLF line ends (body must already use CRLF)."""
    headers = [
        f"From: <{sender}>",
        f"To: {', '.join(f'<{r}>' for r in rcpts)}",
        f"Subject: {subject}",
        f"Message-ID: {message_id or make_message_id()}",
        "Date: Mon, 23 Nov 2026 12:00:00 +0000",
        *extra_headers,
    ]
    return ("\r\n".join(headers) + "\r\n\r\n" + body).encode()


_counter = 0


def make_message_id() -> str:
    global _counter
    _counter += 1
    return f"<{os.getpid()}.{time.monotonic_ns()}.{_counter}@client.example.test>"


def send_smtplib(
    smtp: smtplib.SMTP,
    sender: str,
    rcpts: Iterable[str],
    message: bytes,
) -> str:
    """One transaction on an open smtplib connection (EHLO done by smtplib); the queue id."""
    rcpts = list(rcpts)
    code, text = smtp.mail(sender)
    assert code == 250, f"MAIL: {code} {text!r}"
    for rcpt in rcpts:
        code, text = smtp.rcpt(rcpt)
        assert code == 250, f"RCPT {rcpt}: {code} {text!r}"
    return queue_id(smtp.data(message))


def parse_message(path: Path) -> EmailMessage:
    with path.open("rb") as f:
        msg = email.parser.BytesParser(policy=email.policy.default).parse(f)
    assert isinstance(msg, EmailMessage)
    return msg


def wait_for_files(directory: Path, count: int, timeout: float = DELIVERY_TIMEOUT) -> list[Path]:
    """Wait until ``directory`` holds at least ``count`` files; return them sorted."""

    def files() -> list[Path] | None:
        found = sorted(p for p in directory.glob("*") if p.is_file()) if directory.is_dir() else []
        return found if len(found) >= count else None

    return wait_for(files, timeout, lambda: f"{count} files in {directory} "
                    f"(have {len(list(directory.glob('*'))) if directory.is_dir() else 0})")


def wait_for_message(daemon: Daemon, domain: str, local: str, count: int = 1,
                     timeout: float = DELIVERY_TIMEOUT) -> list[EmailMessage]:
    new = daemon.maildir(domain, local) / "new"
    try:
        paths = wait_for_files(new, count, timeout)
    except Timeout as e:
        raise Timeout(f"{e}\n--- daemon output ---\n{daemon.output()[-4000:]}") from None
    return [parse_message(p) for p in paths]


def find_delivered(daemon: Daemon, token: str) -> list[Path]:
    """Delivered files (any Maildir of this daemon) whose bytes contain ``token``."""
    needle = token.encode()
    found = []
    for path in daemon.delivered():
        with contextlib.suppress(OSError):
            if needle in path.read_bytes():
                found.append(path)
    return found


def barrier(daemon: Daemon, rcpt: str = "barrier@example.test") -> None:
    """Send a message from 127.0.0.1 and wait for its delivery.

    Whatever the daemon accepted before it has then had the same chance to be delivered:
    checking that a refused message is absent afterwards needs no fixed sleep.
    """
    token = make_message_id()
    with daemon.smtp(source="127.0.0.1") as client:
        client.ehlo("barrier.example.test")
        send_smtplib(client, "barrier@remote.test", [rcpt],
                     make_message("barrier@remote.test", [rcpt], message_id=token))
    wait_for(lambda: find_delivered(daemon, token), DELIVERY_TIMEOUT,
             lambda: f"barrier message {token}\n{daemon.output()[-3000:]}")


def message_ids(paths: Iterable[Path]) -> list[str]:
    return [str(parse_message(p)["Message-ID"]).strip() for p in paths]
