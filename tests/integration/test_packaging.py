"""The plugin is installed and the embedded default config runs."""

from __future__ import annotations

import smtplib
import socket
import subprocess

import pytest

from .harness import (
    TWISTD,
    DaemonFactory,
    base_config,
    is_listening,
    make_message,
    parse_message,
    send_smtplib,
    wait_for,
)

pytestmark = pytest.mark.integration


def test_twistd_help_lists_relaygw() -> None:
    result = subprocess.run([str(TWISTD), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    commands = [line.split()[0] for line in result.stdout.splitlines()
                if line.startswith("    ") and line.split()]
    assert "relaygw" in commands, result.stdout


def test_relaygw_help_names_config_option() -> None:
    result = subprocess.run([str(TWISTD), "relaygw", "--help"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "--config" in result.stdout


def _port_2525_free() -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", 2525))
        except OSError:
            return False
    return not is_listening("127.0.0.1", 2525)


def test_default_config_listens_on_2525_and_delivers_localhost(daemons: DaemonFactory) -> None:
    if not _port_2525_free():
        pytest.skip("127.0.0.1:2525 is busy")
    daemon = daemons.prepare(None, host="127.0.0.1", port=2525)
    try:
        daemon.start()
    except AssertionError:
        if "Address already in use" in daemon.output():
            pytest.skip("127.0.0.1:2525 was taken meanwhile")
        raise
    assert daemon.config_path is None and "--config" not in daemon.command()
    with smtplib.SMTP(timeout=10) as client:
        code, banner = client.connect("127.0.0.1", 2525)
        assert (code, banner.decode()) == (220, f"{socket.getfqdn()} ESMTP relaygw")
        client.ehlo("client.example.test")
        qid = send_smtplib(client, "someone@example.test", ["user@localhost"],
                           make_message("someone@example.test", ["user@localhost"]))
    mail = daemon.run_dir / "var" / "mail"
    paths = wait_for(lambda: sorted(mail.glob("**/new/*")), 20, "delivery under ./var/mail")
    assert len(paths) == 1
    assert paths[0].parent.parent == mail / "localhost" / "user"
    assert qid in str(parse_message(paths[0])["Received"])
    assert (daemon.run_dir / "var" / "spool").is_dir()


def test_sigterm_exits_zero_and_stops_listening(daemons: DaemonFactory) -> None:
    daemon = daemons.start(base_config())
    assert daemon.stop() == 0, daemon.output()[-3000:]
    assert not is_listening(daemon.host, daemon.port)
