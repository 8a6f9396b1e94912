"""Aliases are applied before routing: an address alias and a whole-domain alias."""

from __future__ import annotations

import pytest

from .harness import (
    Daemon,
    DaemonFactory,
    RawSMTP,
    base_config,
    expect,
    find_delivered,
    make_message,
    make_message_id,
    queue_id,
    wait_for,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def daemon(module_daemons: DaemonFactory) -> Daemon:
    config = base_config(trusted=["127.0.0.1/32"], mailboxes=["alice", "bob", "carol"])
    config["aliases"] = {
        "postmaster@example.test": ["alice@example.test"],
        "team@example.test": ["bob@example.test", "carol@example.test"],
        "chain@example.test": ["postmaster@example.test"],
        "@old.example.test": ["{local}@example.test"],
    }
    return module_daemons.start(config)


def _send(daemon: Daemon, rcpt: str, source: str = "127.0.0.5") -> tuple[str, str]:
    token = make_message_id()
    with RawSMTP(daemon.host, daemon.port, source=source) as raw:
        raw.banner()
        raw.start_mail("sender@remote.test", [rcpt])
        raw.send(make_message("sender@remote.test", [rcpt], message_id=token) + b".\r\n")
        qid = queue_id(raw.read_reply())
        raw.check_enhanced_codes()
    return token, qid


def _mailboxes(daemon: Daemon, token: str, count: int) -> list[str]:
    paths = wait_for(lambda: (lambda f: f if len(f) >= count else None)(
        find_delivered(daemon, token)), 20,
        lambda: f"{count} deliveries of {token}\n{daemon.output()[-3000:]}")
    return sorted(f"{p.parent.parent.name}@{p.parent.parent.parent.name}" for p in paths)


def test_address_alias(daemon: Daemon) -> None:
    token, _ = _send(daemon, "postmaster@example.test")
    assert _mailboxes(daemon, token, 1) == ["alice@example.test"]


def test_alias_to_several(daemon: Daemon) -> None:
    token, _ = _send(daemon, "team@example.test")
    assert _mailboxes(daemon, token, 2) == ["bob@example.test", "carol@example.test"]


def test_recursive_alias(daemon: Daemon) -> None:
    token, _ = _send(daemon, "chain@example.test")
    assert _mailboxes(daemon, token, 1) == ["alice@example.test"]


def test_whole_domain_alias(daemon: Daemon) -> None:
    token, qid = _send(daemon, "bob@old.example.test")
    assert _mailboxes(daemon, token, 1) == ["bob@example.test"]
    (path,) = find_delivered(daemon, token)
    text = path.read_text()
    assert "Delivered-To: bob@example.test" in text
    assert qid in text


def test_whole_domain_alias_to_unknown_mailbox_refused_at_rcpt(daemon: Daemon) -> None:
    with RawSMTP(daemon.host, daemon.port, source="127.0.0.5") as raw:
        raw.banner()
        raw.ehlo()
        expect(raw.cmd("MAIL FROM:<sender@remote.test>"), 250)
        expect(raw.cmd("RCPT TO:<zed@old.example.test>"), 550, "5.1.1")
