"""Scaling out behind HAProxy: two relaygw instances, PROXY protocol v1, a real haproxy.

HAProxy balances (roundrobin) a TCP frontend over two ``twistd relaygw`` processes,
each listening on ``haproxy:tcp:PORT:interface=127.0.0.1`` and given the client's
address by the PROXY header HAProxy sends (``send-proxy``). Every TCP connection a
relaygw sees comes from 127.0.0.1 (HAProxy itself), which is trusted; what must count
is the real client's address:

- the Received: header names the real client (127.0.0.5), not HAProxy's 127.0.0.1;
- the relay decision is the real client's: 554 5.7.1 from 127.0.0.5, 250 from 127.0.0.1;
- HAProxy's SMTP health checks (``option smtpchk``, sent with the PROXY header) pass.
"""

from __future__ import annotations

import contextlib
import shutil
import smtplib
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .harness import (
    STOP_TIMEOUT,
    Daemon,
    DaemonFactory,
    RawSMTP,
    base_config,
    expect,
    find_delivered,
    is_listening,
    make_message,
    make_message_id,
    parse_message,
    pick_port,
    send_smtplib,
    wait_for,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy is not installed"),
]

UNTRUSTED = "127.0.0.5"
TRUSTED = "127.0.0.1"

HAPROXY_CFG = """\
global
    maxconn 256
    stats socket {stats} mode 600 level admin

defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s

frontend smtp
    bind 127.0.0.1:{port}
    default_backend relaygw

backend relaygw
    balance roundrobin
    option smtpchk HELO haproxy.example.test
    server a 127.0.0.1:{port_a} send-proxy check inter 300ms
    server b 127.0.0.1:{port_b} send-proxy check inter 300ms
"""


@dataclass
class HAProxy:
    port: int
    proc: subprocess.Popen[bytes]
    stderr_path: Path
    stats: Path

    def output(self) -> str:
        with contextlib.suppress(OSError):
            return self.stderr_path.read_text(errors="replace")
        return ""

    def server_states(self) -> dict[str, tuple[str, str]]:
        """``{server: (status, check_status)}`` of the backend, from the stats socket."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5.0)
            s.connect(str(self.stats))
            s.sendall(b"show stat\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        lines = data.decode().splitlines()
        header = lines[0].lstrip("# ").split(",")
        states = {}
        for line in lines[1:]:
            row = dict(zip(header, line.split(","), strict=False))
            if row.get("pxname") == "relaygw" and row.get("svname") in ("a", "b"):
                states[row["svname"]] = (row["status"], row["check_status"])
        return states

    def raw(self, source: str) -> RawSMTP:
        return RawSMTP("127.0.0.1", self.port, source=source)


@dataclass
class Cluster:
    haproxy: HAProxy
    instances: list[Daemon]


def _relaygw(daemons: DaemonFactory) -> Daemon:
    port = pick_port()
    config = base_config(trusted=["127.0.0.1/32"])
    config["listener"] = [{"endpoint": f"haproxy:tcp:{port}:interface=127.0.0.1",
                           "kind": "smtp"}]
    return daemons.start(config, port=port)


@pytest.fixture
def cluster(daemons: DaemonFactory, tmp_path: Path) -> Iterator[Cluster]:
    a, b = _relaygw(daemons), _relaygw(daemons)
    port = pick_port()
    cfg = tmp_path / "haproxy.cfg"
    stats = tmp_path / "haproxy.stats"
    cfg.write_text(HAPROXY_CFG.format(port=port, port_a=a.port, port_b=b.port, stats=stats))
    check = subprocess.run(["haproxy", "-c", "-f", str(cfg)], capture_output=True, timeout=10)
    assert check.returncode == 0, check.stdout + check.stderr
    stderr_path = tmp_path / "haproxy.stderr"
    with stderr_path.open("wb") as err:
        proc = subprocess.Popen(["haproxy", "-f", str(cfg), "-db"], stdout=err, stderr=err,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    haproxy = HAProxy(port, proc, stderr_path, stats)
    try:
        def ready() -> bool:
            assert proc.poll() is None, f"haproxy exited {proc.returncode}:\n{haproxy.output()}"
            return is_listening("127.0.0.1", port, pid=proc.pid)

        wait_for(ready, 10.0, lambda: f"haproxy listening on {port}\n{haproxy.output()}")
        yield Cluster(haproxy, [a, b])
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(STOP_TIMEOUT)
        daemons.stop_all()


def _send(haproxy: HAProxy, source: str, rcpt: str, token: str) -> None:
    with smtplib.SMTP("127.0.0.1", haproxy.port, timeout=10,
                      source_address=(source, 0)) as client:
        client.ehlo("client.example.test")
        send_smtplib(client, "sender@remote.test", [rcpt],
                     make_message("sender@remote.test", [rcpt], message_id=token))


def test_received_header_names_the_real_client_on_both_instances(cluster: Cluster) -> None:
    tokens = [make_message_id() for _ in range(4)]
    for token in tokens:  # one connection each: roundrobin alternates a, b, a, b
        _send(cluster.haproxy, UNTRUSTED, "alice@example.test", token)

    where: dict[str, Path] = {}

    def all_delivered() -> bool:
        for token in tokens:
            for index, daemon in enumerate(cluster.instances):
                found = find_delivered(daemon, token)
                if found:
                    where[token] = found[0]
                    assert len(found) == 1, f"{token} delivered twice: {found}"
                    assert index in (0, 1)
        return len(where) == len(tokens)

    wait_for(all_delivered, 20.0, lambda: f"all of {tokens} delivered; have {sorted(where)}")

    by_instance = {d.run_dir: [t for t in tokens if d.run_dir in where[t].parents]
                   for d in cluster.instances}
    assert all(by_instance.values()), f"roundrobin: both instances deliver, got {by_instance}"

    for token, path in where.items():
        received = parse_message(path).get_all("Received") or []
        assert received, f"{path}: no Received: header"
        first = str(received[0])
        assert f"[{UNTRUSTED}]" in first, f"{token}: Received: names {first!r}"
        assert f"[{TRUSTED}]" not in first, f"{token}: HAProxy's address in {first!r}"


def test_relay_decision_is_the_real_clients(cluster: Cluster) -> None:
    # two connections from each address so that both instances answer each of them
    for _ in range(2):
        with cluster.haproxy.raw(UNTRUSTED) as client:
            assert client.banner().code == 220
            client.ehlo()
            expect(client.cmd("MAIL FROM:<sender@remote.test>"), 250)
            expect(client.cmd("RCPT TO:<someone@elsewhere.test>"), 554, "5.7.1")
            expect(client.cmd("QUIT"), 221)
    for _ in range(2):
        with cluster.haproxy.raw(TRUSTED) as client:
            assert client.banner().code == 220
            client.ehlo()
            expect(client.cmd("MAIL FROM:<sender@remote.test>"), 250)
            expect(client.cmd("RCPT TO:<someone@elsewhere.test>"), 250)
            expect(client.cmd("RSET"), 250)
            expect(client.cmd("QUIT"), 221)

    for daemon in cluster.instances:  # each instance saw the real untrusted client
        daemon.wait_log(UNTRUSTED, timeout=5.0)


def test_haproxy_smtp_health_checks_with_proxy_header_pass(cluster: Cluster) -> None:
    """``option smtpchk`` + ``send-proxy``: the check sends the PROXY header, then HELO."""
    haproxy = cluster.haproxy
    both_up = {"a": ("UP", "L7OK"), "b": ("UP", "L7OK")}
    wait_for(lambda: haproxy.server_states() == both_up, 10.0,
             lambda: f"both servers UP by an SMTP check: {haproxy.server_states()}\n"
             f"{haproxy.output()}")
    # and a stopped instance is seen DOWN (the check really talks to relaygw)
    cluster.instances[0].stop()
    wait_for(lambda: haproxy.server_states().get("a", ("",))[0] == "DOWN", 10.0,
             lambda: f"a DOWN: {haproxy.server_states()}")
    assert haproxy.server_states()["b"] == ("UP", "L7OK")
