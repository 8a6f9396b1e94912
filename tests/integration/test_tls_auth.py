"""Inbound TLS and AUTH against the real ``twistd relaygw``.

One daemon with a ``submission`` listener (STARTTLS, AUTH required), a
``submissions`` listener (implicit TLS) and an ``smtp`` listener; its
certificate comes from a throwaway CA, its users file from ``relaygwctl passwd``.
Clients connect from 127.0.0.5, which is not in ``trusted_networks``.
"""

from __future__ import annotations

import base64
import os
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
from dataclasses import dataclass

import pytest

from .conftest import SinkFactory
from .harness import (
    HOSTNAME,
    RELAYGWCTL,
    Daemon,
    DaemonFactory,
    base_config,
    make_message,
    make_message_id,
    pick_port,
    send_smtplib,
    wait_for,
    wait_for_message,
)
from .sink import SMTPSink
from .tlsutil import TestCA

pytestmark = pytest.mark.integration

UNTRUSTED = "127.0.0.5"
USER = "alice"
PASSWORD = "integration pass phrase"
SMARTHOST = "127.0.0.2"


@dataclass
class Secure:
    daemon: Daemon
    submission: int
    submissions: int
    smtp: int
    sink: SMTPSink
    ca: TestCA

    def client_context(self) -> ssl.SSLContext:
        return self.ca.client_context()

    def connect(self, port: int, source: str = UNTRUSTED) -> smtplib.SMTP:
        return smtplib.SMTP("127.0.0.1", port, timeout=10, source_address=(source, 0))


def relaygwctl_passwd(daemon: Daemon, user: str, password: str) -> subprocess.CompletedProcess[str]:
    assert daemon.config_path is not None
    return subprocess.run([str(RELAYGWCTL), "passwd", user, "--config", str(daemon.config_path)],
                          input=password + "\n", capture_output=True, text=True,
                          cwd=daemon.run_dir, timeout=30)


@pytest.fixture
def secure(daemons: DaemonFactory, sink_factory: SinkFactory, test_ca: TestCA) -> Secure:
    sink = sink_factory(SMARTHOST)
    issued = test_ca.issue([HOSTNAME], ips=["127.0.0.1"], stem="relay")
    submission, submissions, smtp = (pick_port() for _ in range(3))
    config = base_config(trusted=["127.0.0.1/32"])
    config["listener"] = [
        {"endpoint": f"tcp:{submission}:interface=127.0.0.1", "kind": "submission"},
        {"endpoint": f"tcp:{submissions}:interface=127.0.0.1", "kind": "submissions"},
        {"endpoint": f"tcp:{smtp}:interface=127.0.0.1", "kind": "smtp"},
    ]
    config["tls"] = {"certificate": str(issued.chain), "private_key": str(issued.private_key)}
    config["auth"] = {"users_file": "etc/relaygw.users", "require_tls": True}
    config["route"][:0] = [{"domains": ["far.test"], "action": "relay", "accept_from": "trusted",
                            "via": f"{SMARTHOST}:{sink.port}", "tls": "none"}]
    daemon = daemons.prepare(config, port=submission)
    (daemon.run_dir / "etc").mkdir()
    done = relaygwctl_passwd(daemon, USER, PASSWORD)
    assert done.returncode == 0, done.stderr
    users_file = daemon.run_dir / "etc" / "relaygw.users"
    assert users_file.stat().st_mode & 0o777 == 0o600
    assert PASSWORD not in users_file.read_text()
    daemon.start()
    for port in (submissions, smtp):
        wait_for(lambda p=port: _listening(p), 10, f"port {port}")
    return Secure(daemon, submission, submissions, smtp, sink, test_ca)


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def test_starttls_login_on_submission_lands_with_esmtpsa(secure: Secure) -> None:
    token = make_message_id()
    with secure.connect(secure.submission) as client:
        client.ehlo("client.example.test")
        assert client.has_extn("starttls")
        assert not client.has_extn("auth")  # require_tls: not before TLS
        code, _ = client.starttls(context=secure.client_context())
        assert code == 220
        client.ehlo("client.example.test")
        assert not client.has_extn("starttls")
        assert client.esmtp_features["auth"].split() == ["PLAIN", "LOGIN"]
        code, text = client.login(USER, PASSWORD)
        assert (code, text[:5]) == (235, b"2.7.0")
        send_smtplib(client, "owner@client.example.test", ["alice@example.test"],
                     make_message("owner@client.example.test", ["alice@example.test"],
                                  message_id=token))
    [message] = wait_for_message(secure.daemon, "example.test", "alice")
    received = str(message["Received"])
    assert "with ESMTPSA" in received and f"[{UNTRUSTED}]" in received
    assert message["Message-ID"].strip() == token


def test_mail_before_auth_on_submission(secure: Secure) -> None:
    with secure.connect(secure.submission) as client:
        client.ehlo("client.example.test")
        code, text = client.docmd("AUTH", "PLAIN " + base64.b64encode(
            f"\0{USER}\0{PASSWORD}".encode()).decode())
        assert (code, text[:6]) == (538, b"5.7.11")  # not in clear text
        client.starttls(context=secure.client_context())
        client.ehlo("client.example.test")
        code, text = client.mail("owner@client.example.test")
        assert (code, text[:5]) == (530, b"5.7.0")
        with pytest.raises(smtplib.SMTPAuthenticationError) as failed:
            client.login(USER, "wrong")
        assert failed.value.smtp_code == 535 and failed.value.smtp_error[:5] == b"5.7.8"


def test_implicit_tls_on_submissions(secure: Secure) -> None:
    with smtplib.SMTP_SSL("127.0.0.1", secure.submissions, timeout=10,
                          source_address=(UNTRUSTED, 0),
                          context=secure.client_context()) as client:
        client.ehlo("client.example.test")
        assert not client.has_extn("starttls")
        client.login(USER, PASSWORD)
        assert isinstance(client.sock, ssl.SSLSocket)
        assert client.sock.version() in ("TLSv1.2", "TLSv1.3")
        send_smtplib(client, "owner@client.example.test", ["alice@example.test"],
                     make_message("owner@client.example.test", ["alice@example.test"]))
    [message] = wait_for_message(secure.daemon, "example.test", "alice")
    assert "with ESMTPSA" in str(message["Received"])


def test_relay_after_auth_from_an_untrusted_address(secure: Secure) -> None:
    # without AUTH, from the same address, on the smtp listener: refused
    with secure.connect(secure.smtp) as client:
        client.ehlo("client.example.test")
        client.starttls(context=secure.client_context())
        client.ehlo("client.example.test")
        client.mail("owner@client.example.test")
        code, text = client.rcpt("bob@far.test")
        assert (code, text[:5]) == (554, b"5.7.1")
    token = make_message_id()
    with secure.connect(secure.submission) as client:
        client.ehlo("client.example.test")
        client.starttls(context=secure.client_context())
        client.ehlo("client.example.test")
        client.login(USER, PASSWORD)
        send_smtplib(client, "owner@client.example.test", ["bob@far.test"],
                     make_message("owner@client.example.test", ["bob@far.test"],
                                  message_id=token))
    [sunk] = secure.sink.wait_for_messages(1)
    assert sunk.rcpt_tos == ("bob@far.test",)
    assert token.encode() in sunk.content
    assert b"with ESMTPSA" in sunk.content.split(b"\r\n\r\n", 1)[0]


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks not installed")
def test_swaks_tls_auth_login(secure: Secure) -> None:
    done = subprocess.run(
        ["swaks", "--server", f"127.0.0.1:{secure.submission}", "--local-interface", UNTRUSTED,
         "--tls", "--auth", "LOGIN", "--auth-user", USER, "--auth-password", PASSWORD,
         "--ehlo", "swaks.example.test", "--from", "owner@client.example.test",
         "--to", "alice@example.test", "--timeout", "10"],
        capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "235 2.7.0" in done.stdout
    [message] = wait_for_message(secure.daemon, "example.test", "alice")
    assert "with ESMTPSA" in str(message["Received"])


def test_commands_injected_behind_starttls_are_dropped(secure: Secure) -> None:
    """The real TCP transport: MAIL sent in the same packet as STARTTLS never runs."""
    with socket.create_connection(("127.0.0.1", secure.smtp), timeout=10,
                                  source_address=("127.0.0.1", 0)) as raw:
        reader = raw.makefile("rb")
        assert reader.readline().startswith(b"220 ")
        raw.sendall(b"EHLO client.example.test\r\n")
        while not reader.readline().startswith(b"250 "):
            pass
        raw.sendall(b"STARTTLS\r\nMAIL FROM:<evil@attacker.test>\r\n"
                    b"RCPT TO:<alice@example.test>\r\n")
        assert reader.readline() == b"220 2.0.0 Ready to start TLS\r\n"
        tls = secure.client_context().wrap_socket(raw, server_hostname="127.0.0.1")
        tls_reader = tls.makefile("rb")
        tls.sendall(b"RCPT TO:<alice@example.test>\r\n")
        assert tls_reader.readline().startswith(b"503 5.5.1")  # no MAIL: it was dropped
        tls.sendall(b"MAIL FROM:<a@client.example.test>\r\n")  # a fresh transaction,
        assert tls_reader.readline().startswith(b"250 2.1.0")  # not a nested one
        tls.sendall(b"MAIL FROM:<b@client.example.test>\r\n")
        assert tls_reader.readline().startswith(b"503 5.5.1")  # nested: now there is one
        tls.sendall(b"QUIT\r\n")
        assert tls_reader.readline().startswith(b"221 ")


def test_sighup_reloads_the_certificate(secure: Secure) -> None:
    def serial() -> int:
        with smtplib.SMTP_SSL("127.0.0.1", secure.submissions, timeout=10,
                              context=secure.client_context()) as client:
            assert isinstance(client.sock, ssl.SSLSocket)
            der = client.sock.getpeercert(binary_form=True)
            assert der is not None
            from cryptography import x509
            return x509.load_der_x509_certificate(der).serial_number

    before = serial()
    secure.ca.issue([HOSTNAME], ips=["127.0.0.1"], stem="relay")  # renewed in place
    assert secure.daemon.proc is not None
    os.kill(secure.daemon.proc.pid, signal.SIGHUP)
    wait_for(lambda: serial() != before, 10, "the renewed certificate served")
    assert secure.daemon.running


def test_passwords_never_reach_the_log(secure: Secure) -> None:
    with secure.connect(secure.submission) as client:
        client.ehlo("client.example.test")
        client.starttls(context=secure.client_context())
        client.ehlo("client.example.test")
        with pytest.raises(smtplib.SMTPAuthenticationError):
            client.login(USER, "wrong secret")
        client.login(USER, PASSWORD)
    secure.daemon.wait_log("authenticated as alice")
    output = secure.daemon.output()
    for secret in (PASSWORD, "wrong secret", base64.b64encode(PASSWORD.encode()).decode(),
                   base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()):
        assert secret not in output


def test_passwd_without_auth_section(daemons: DaemonFactory) -> None:
    daemon = daemons.prepare(base_config())
    done = relaygwctl_passwd(daemon, USER, PASSWORD)
    assert done.returncode == 1
    assert len(done.stderr.strip().splitlines()) == 1 and "[auth]" in done.stderr
