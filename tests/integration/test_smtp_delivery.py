"""Real clients (smtplib, swaks) send to a local route; the mail lands in the Maildir."""

from __future__ import annotations

import re
import smtplib
import subprocess
from pathlib import Path

import pytest

from .harness import (
    HOSTNAME,
    Daemon,
    DaemonFactory,
    base_config,
    make_message,
    make_message_id,
    queue_id,
    send_smtplib,
    wait_for_message,
)

pytestmark = pytest.mark.integration

MAX_SIZE = 200_000
HELO = "client.example.test"


@pytest.fixture(scope="module")
def daemon(module_daemons: DaemonFactory) -> Daemon:
    config = base_config(trusted=["127.0.0.1/32"])
    config["limits"] = {"max_message_size": MAX_SIZE}
    return module_daemons.start(config)


def _check_received(received: str, qid: str, helo: str, client: str = "127.0.0.1") -> None:
    assert re.search(rf"\bfrom {re.escape(helo)}\b", received), received
    assert client in received, received
    assert re.search(rf"\bby {re.escape(HOSTNAME)}\b", received), received
    assert re.search(r"\bwith ESMTP\b", received), received
    assert qid in received, received


def _assert_maildir_shape(maildir: Path) -> None:
    for sub in ("tmp", "new", "cur"):
        assert (maildir / sub).is_dir(), f"{maildir}/{sub} missing"
    assert not list((maildir / "tmp").iterdir()), "files left in tmp/"


def test_banner_and_ehlo_features(daemon: Daemon) -> None:
    client = smtplib.SMTP(timeout=10)
    try:
        code, banner = client.connect(daemon.host, daemon.port)
        assert (code, banner.decode()) == (220, f"{HOSTNAME} ESMTP relaygw")
        code, _ = client.ehlo(HELO)
        assert code == 250
        for keyword in ("pipelining", "8bitmime", "enhancedstatuscodes"):
            assert client.has_extn(keyword), client.esmtp_features
        assert client.esmtp_features["size"] == str(MAX_SIZE)
        assert not client.has_extn("starttls"), "STARTTLS offered without [tls]"
        assert not client.has_extn("auth"), "AUTH offered without [auth]"
    finally:
        client.close()


def test_smtplib_delivers_to_maildir(daemon: Daemon) -> None:
    mid = make_message_id()
    body = "first line\r\n.leading dot\r\n\r\nlast line\r\n"
    message = make_message("sender@remote.test", ["alice1@example.test"], body=body,
                           message_id=mid)
    with daemon.smtp() as client:
        client.ehlo(HELO)
        qid = send_smtplib(client, "sender@remote.test", ["alice1@example.test"], message)
    (msg,) = wait_for_message(daemon, "example.test", "alice1")
    assert msg["Message-ID"] == mid
    assert msg["Return-Path"] == "<sender@remote.test>"
    assert msg["Delivered-To"] == "alice1@example.test"
    assert len(msg.get_all("Return-Path") or []) == 1
    received = msg.get_all("Received") or []
    assert len(received) == 1
    _check_received(str(received[0]), qid, HELO)
    assert msg.get_payload() == body.replace("\r\n", "\n")
    _assert_maildir_shape(daemon.maildir("example.test", "alice1"))
    # section 5: one log line per event, with the queue id and the recipient
    daemon.wait_log(qid, "alice1@example.test", "deliver")


def test_many_recipients_one_copy_each(daemon: Daemon) -> None:
    rcpts = ["multi1@example.test", "multi2@example.test", "MULTI3@example.test"]
    with daemon.smtp() as client:
        client.ehlo(HELO)
        qid = send_smtplib(client, "sender@remote.test", rcpts, make_message("s@r.test", rcpts))
    for local in ("multi1", "multi2"):
        (msg,) = wait_for_message(daemon, "example.test", local)
        assert msg["Delivered-To"] == f"{local}@example.test"
        assert qid in str(msg["Received"])
    delivered = [p for p in daemon.delivered() if "multi3" in str(p).lower()]
    assert len(delivered) <= 1


def test_null_sender_and_8bit_body(daemon: Daemon) -> None:
    body = "caf\u00e9 \u00fcber na\u00efve\r\n"
    message = make_message("x@remote.test", ["eight@example.test"], body=body,
                           extra_headers=["MIME-Version: 1.0",
                                          "Content-Type: text/plain; charset=utf-8",
                                          "Content-Transfer-Encoding: 8bit"])
    with daemon.smtp() as client:
        client.ehlo(HELO)
        code, _ = client.mail("", ["BODY=8BITMIME"])
        assert code == 250
        assert client.rcpt("eight@example.test")[0] == 250
        queue_id(client.data(message))
    (msg,) = wait_for_message(daemon, "example.test", "eight")
    assert msg["Return-Path"] == "<>"
    raw = daemon.maildir("example.test", "eight").joinpath("new")
    (path,) = list(raw.iterdir())
    assert body.encode() in path.read_bytes().replace(b"\n", b"\r\n")


def test_several_transactions_on_one_connection(daemon: Daemon) -> None:
    ids = set()
    with daemon.smtp() as client:
        client.ehlo(HELO)
        for _ in range(3):
            ids.add(send_smtplib(client, "s@remote.test", ["serial@example.test"],
                                 make_message("s@remote.test", ["serial@example.test"])))
        assert client.rset()[0] == 250
        assert client.noop()[0] == 250
    assert len(ids) == 3, "queue ids must differ"
    msgs = wait_for_message(daemon, "example.test", "serial", count=3)
    assert {next(i for i in ids if i in str(m["Received"])) for m in msgs} == ids


def test_swaks_delivers(daemon: Daemon) -> None:
    result = subprocess.run(
        ["swaks", "--server", f"{daemon.host}:{daemon.port}", "--to", "swaks@example.test",
         "--from", "sender@remote.test", "--helo", "swaks.example.test",
         "--header", "Subject: via swaks", "--body", "swaks body", "--pipeline"],
        capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    match = re.search(r"<-\s+250 2\.0\.0 Ok: queued as (\S+)", result.stdout)
    assert match, result.stdout
    assert re.search(r"<-\s+220 " + re.escape(HOSTNAME) + r" ESMTP relaygw", result.stdout)
    assert re.search(r"<-\s+221 2\.\d\.\d", result.stdout), result.stdout
    (msg,) = wait_for_message(daemon, "example.test", "swaks")
    assert msg["Subject"] == "via swaks"
    assert msg["Delivered-To"] == "swaks@example.test"
    _check_received(str(msg["Received"]), match.group(1), "swaks.example.test")


def test_swaks_refused_relay_from_untrusted_address(daemon: Daemon) -> None:
    result = subprocess.run(
        ["swaks", "--server", f"{daemon.host}:{daemon.port}", "--local-interface", "127.0.0.5",
         "--to", "someone@elsewhere.test", "--from", "sender@remote.test",
         "--helo", "swaks.example.test"],
        capture_output=True, text=True, timeout=30)
    assert result.returncode != 0, result.stdout
    assert re.search(r"<\*\*\s+554 5\.7\.1", result.stdout), result.stdout


def test_received_names_untrusted_client_address(daemon: Daemon) -> None:
    with daemon.smtp(source="127.0.0.6") as client:
        client.ehlo("far.example.test")
        qid = send_smtplib(client, "s@remote.test", ["fromfar@example.test"],
                           make_message("s@remote.test", ["fromfar@example.test"]))
    (msg,) = wait_for_message(daemon, "example.test", "fromfar")
    _check_received(str(msg["Received"]), qid, "far.example.test", client="127.0.0.6")
