"""SIGHUP reloads the whole configuration file without dropping sessions."""

from __future__ import annotations

import signal

import pytest

from .harness import (
    DaemonFactory,
    RawSMTP,
    base_config,
    expect,
    find_delivered,
    make_message,
    make_message_id,
    queue_id,
    to_toml,
    wait_for,
)

pytestmark = pytest.mark.integration


def _rcpt_code(daemon, rcpt: str) -> int:  # type: ignore[no-untyped-def]
    with RawSMTP(daemon.host, daemon.port, source="127.0.0.5") as raw:
        raw.banner()
        raw.ehlo()
        expect(raw.cmd("MAIL FROM:<sender@remote.test>"), 250)
        return raw.cmd(f"RCPT TO:<{rcpt}>").code


def test_sighup_reloads_routes_and_refuses_a_broken_file(daemons: DaemonFactory) -> None:
    config = base_config(trusted=["127.0.0.1/32"], mailboxes=["alice"])
    daemon = daemons.start(config)
    assert daemon.config_path is not None and daemon.proc is not None
    assert _rcpt_code(daemon, "bob@example.test") == 550
    listener = f"tcp:{daemon.port}:interface={daemon.host}"

    # A session opened before the SIGHUP, mid-transaction.
    with RawSMTP(daemon.host, daemon.port, source="127.0.0.5") as early:
        early.banner()
        early.ehlo()
        expect(early.cmd("MAIL FROM:<sender@remote.test>"), 250)
        expect(early.cmd("RCPT TO:<alice@example.test>"), 250)

        config["route"][0]["mailboxes"] = ["alice", "bob"]
        config["route"].insert(0, {"domains": ["new.test"], "action": "local",
                                   "maildir": "var/mail/{domain}/{local}",
                                   "mailboxes": ["carol"]})
        config["listener"] = [{"endpoint": listener, "kind": "smtp"}]
        daemon.config_path.write_text(to_toml(config))
        daemon.proc.send_signal(signal.SIGHUP)
        daemon.wait_log("configuration reloaded from", str(daemon.config_path))
        wait_for(lambda: _rcpt_code(daemon, "carol@new.test") == 250, 10,
                 lambda: daemon.output()[-3000:])
        assert _rcpt_code(daemon, "bob@example.test") == 250

        # The early session goes on, and sees the new routes at its next command.
        expect(early.cmd("RCPT TO:<bob@example.test>"), 250)
        token = make_message_id()
        expect(early.cmd("DATA"), 354)
        early.send(make_message("sender@remote.test", ["alice@example.test",
                                                       "bob@example.test"],
                                message_id=token) + b".\r\n")
        queue_id(early.read_reply())
        expect(early.cmd("QUIT"), 221)
    wait_for(lambda: len(find_delivered(daemon, token)) == 2, 20,
             lambda: daemon.output()[-3000:])

    # A broken file: one error line, the daemon runs on with the previous config.
    daemon.config_path.write_text(to_toml(config).replace(
        'action = "local"', 'action = "deliver"', 1))
    daemon.proc.send_signal(signal.SIGHUP)
    line = daemon.wait_log("reload refused", "keeping the previous configuration")
    assert str(daemon.config_path) in line and "route[0]" in line and "action" in line
    assert sum("reload refused" in entry for entry in daemon.log_lines()) == 1
    assert daemon.running
    assert _rcpt_code(daemon, "carol@new.test") == 250
    assert _rcpt_code(daemon, "dave@new.test") == 550
