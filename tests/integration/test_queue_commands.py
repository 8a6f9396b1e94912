"""``relaygwctl queue flush|hold|release|delete`` against the real daemon (the control
socket) and against a stopped one (the spool files)."""

from __future__ import annotations

import re
import socket
import subprocess
from pathlib import Path
from typing import Any

from .conftest import SinkFactory
from .harness import RELAYGWCTL, Daemon, DaemonFactory, pick_port, wait_for
from .relay_helpers import (
    mail_log_lines,
    queue_list,
    relay_config,
    send,
    smarthost_route,
)

DOWN = "127.0.0.1:9"  # discard: nothing listens; mail stays deferred


def ctl(daemon: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    assert daemon.config_path is not None
    return subprocess.run([str(RELAYGWCTL), "--config", str(daemon.config_path), *args],
                          cwd=daemon.run_dir, capture_output=True, text=True, timeout=30)


def entry(daemon: Daemon, queue_id: str) -> dict[str, Any] | None:
    return next((e for e in queue_list(daemon) if e["id"] == queue_id), None)


def spool_files(daemon: Daemon, queue_id: str) -> list[str]:
    return sorted(p.name for p in (daemon.run_dir / "var" / "spool").glob(f"{queue_id}.*"))


def deferred_message(daemon: Daemon, address: str = "user@down.test") -> str:
    queue_id = send(daemon, [address]).queue_id
    # an outcome (deferred, or parked behind the dead next hop: no attempt counted)
    daemon.wait_log(queue_id, f"to=<{address}>", "deferred")
    return queue_id


def down_config(via: str = DOWN) -> dict[str, Any]:
    return relay_config(routes=[smarthost_route("down.test", *via.split(":"))],  # type: ignore[arg-type]
                        retry=["1h"])


def test_hold_release_delete_on_the_running_daemon(daemons: DaemonFactory) -> None:
    daemon = daemons.start(down_config())
    queue_id = deferred_message(daemon)
    assert (daemon.run_dir / "var" / "spool" / "control.sock").stat().st_mode & 0o777 == 0o600

    result = ctl(daemon, "queue", "hold", queue_id)
    assert (result.returncode, result.stdout) == (0, f"held {queue_id}\n"), result.stderr
    assert entry(daemon, queue_id)["held"] is True  # type: ignore[index]
    result = ctl(daemon, "queue", "flush", queue_id)
    assert result.returncode == 1 and "held" in result.stderr

    result = ctl(daemon, "queue", "release", queue_id)
    assert (result.returncode, result.stdout) == (0, f"released {queue_id}\n"), result.stderr
    # due now: the scheduler takes it at once (and parks it: its next hop is still dead)
    wait_for(lambda: len(mail_log_lines(daemon, queue_id, "to=<user@down.test>")) >= 2, 5,
             lambda: f"a second outcome for {queue_id}\n{daemon.output()[-3000:]}")
    assert entry(daemon, queue_id)["held"] is False  # type: ignore[index]

    result = ctl(daemon, "queue", "delete", queue_id)
    assert (result.returncode, result.stdout) == (0, f"deleted {queue_id}\n"), result.stderr
    assert entry(daemon, queue_id) is None
    assert spool_files(daemon, queue_id) == []
    result = ctl(daemon, "queue", "hold", queue_id)
    assert result.returncode == 1
    assert result.stderr == f"relaygwctl: no such message in the queue: {queue_id}\n"
    assert daemon.running


def test_flush_delivers_once_the_next_hop_is_up(daemons: DaemonFactory,
                                                sink_factory: SinkFactory) -> None:
    port = pick_port("127.0.0.2")
    daemon = daemons.start(down_config(f"127.0.0.2:{port}"))
    queue_id = deferred_message(daemon)
    sink = sink_factory(host="127.0.0.2", port=port)
    result = ctl(daemon, "queue", "flush")
    assert (result.returncode, result.stdout) == (0, "flushed 1 message\n"), result.stderr
    sink.wait_for_messages(1, timeout=5)
    wait_for(lambda: entry(daemon, queue_id) is None, 5, "the message leaves the queue")
    result = ctl(daemon, "queue", "flush", queue_id)
    assert result.returncode == 1
    assert result.stderr == f"relaygwctl: no such message in the queue: {queue_id}\n"


def test_commands_on_a_stopped_daemon(daemons: DaemonFactory) -> None:
    daemon = daemons.start(down_config())
    kept = deferred_message(daemon)
    dropped = deferred_message(daemon, "other@down.test")
    daemon.stop()
    socket = daemon.run_dir / "var" / "spool" / "control.sock"

    result = ctl(daemon, "queue", "flush")
    assert result.returncode == 1
    assert result.stderr == f"relaygwctl: relaygw is not running (no control socket at " \
                            f"{Path('var/spool/control.sock')})\n"
    assert not socket.exists()

    result = ctl(daemon, "queue", "hold", kept)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"held {kept} ")
    assert entry(daemon, kept)["held"] is True  # type: ignore[index]

    result = ctl(daemon, "queue", "delete", dropped)
    assert result.returncode == 0, result.stderr
    assert spool_files(daemon, dropped) == []
    assert [e["id"] for e in queue_list(daemon)] == [kept]

    # the hold survives a restart: no attempt is made while it is held
    daemon.start()
    attempts = len(mail_log_lines(daemon, kept, "to=<user@down.test>"))
    result = ctl(daemon, "queue", "flush")
    assert (result.returncode, result.stdout) == (0, "flushed 0 messages\n"), result.stderr
    result = ctl(daemon, "queue", "release", kept)
    assert result.returncode == 0, result.stderr
    wait_for(lambda: mail_log_lines(daemon, kept, "to=<user@down.test>")[attempts:], 5,
             lambda: f"an outcome for {kept} after release\n{daemon.output()[-3000:]}")


def test_usage_and_bad_ids(daemons: DaemonFactory) -> None:
    daemon = daemons.start(down_config())
    for args in (["queue", "hold"], ["queue", "delete"], ["queue", "bogus"],
                 ["queue", "flush", "A", "B"]):
        assert ctl(daemon, *args).returncode == 2, args
    for command in ("flush", "hold", "release", "delete"):
        result = ctl(daemon, "queue", command, "../etc/passwd")
        assert (result.returncode, result.stderr) == (
            1, "relaygwctl: not a queue id: ../etc/passwd\n"), command


def test_after_a_crash_the_stale_socket_means_not_running(daemons: DaemonFactory) -> None:
    daemon = daemons.start(down_config())
    queue_id = deferred_message(daemon)
    daemon.kill9()
    assert (daemon.run_dir / "var" / "spool" / "control.sock").exists()  # left behind
    result = ctl(daemon, "queue", "hold", queue_id)
    assert result.returncode == 0, result.stderr
    assert "relaygw is not running" in result.stdout
    daemon.start()  # replaces the stale socket
    result = ctl(daemon, "queue", "release", queue_id)
    assert (result.returncode, result.stdout) == (0, f"released {queue_id}\n"), result.stderr


def test_queue_list_json_asks_the_running_daemon(daemons: DaemonFactory) -> None:
    """The contract's shape, from the daemon's memory: a delivery in flight (to a next
    hop that accepts the connection and never greets) shows as ``delivering``."""
    port = pick_port("127.0.0.2")
    silent = socket.create_server(("127.0.0.2", port))  # listens, never accepts nor greets
    try:
        daemon = daemons.start(down_config(f"127.0.0.2:{port}"))
        queue_id = send(daemon, ["user@down.test"]).queue_id

        def in_flight() -> dict[str, Any] | None:
            found = entry(daemon, queue_id)
            return found if found and found["recipients"][0]["state"] == "delivering" \
                else None

        found = wait_for(in_flight, 10, "the recipient in flight in queue list --json")
        assert set(found) == {"id", "sender", "received", "size", "held", "recipients"}
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", found["received"])
        assert isinstance(found["size"], int) and found["held"] is False
        [rcpt] = found["recipients"]
        assert set(rcpt) == {"address", "state", "attempts", "next_attempt", "last_error"}
        assert rcpt["address"] == "user@down.test"
        result = ctl(daemon, "queue", "show", queue_id)
        assert result.returncode == 0, result.stderr
        assert '"state": "delivering"' in result.stdout
        daemon.stop()
        # with no daemon: the spool files, where a delivery in flight is not a state
        [stored] = [e for e in queue_list(daemon) if e["id"] == queue_id]
        assert stored["recipients"][0]["state"] in ("queued", "deferred")
    finally:
        silent.close()
