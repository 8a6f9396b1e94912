"""The journal through the real twistd process: small messages are journaled,
seen by relaygwctl after a kill -9, and given queue files at the next start.

The smarthost is down throughout, so messages after the first are parked
behind it without an attempt, and stay in the journal until the kill.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from .harness import RELAYGWCTL, DaemonFactory, pick_port, wait_for
from .relay_helpers import queue_list, relay_config, send, smarthost_route

pytestmark = pytest.mark.integration

SMARTHOST = "127.0.0.3"


def queue_files(spool: Path) -> set[str]:
    return {p.name[:-2] for p in spool.glob("*.q")}


def syncers(parent: int) -> list[str]:
    """The journal syncer children of process ``parent``."""
    found = []
    for entry in (p for p in Path("/proc").iterdir() if p.name.isdigit()):
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes()
        except OSError:  # ended while looked at
            continue
        if int(stat.rpartition(")")[2].split()[1]) == parent \
                and b"relaygw.syncchild" in command:
            found.append(entry.name)
    return found


def segments(spool: Path) -> list[Path]:
    return sorted((spool / "journal").glob("*.log"))


def test_journaled_mail_survives_kill9_is_listed_offline_and_becomes_queue_files(
        daemons: DaemonFactory) -> None:
    port = pick_port(SMARTHOST)  # nothing listens: the next hop is down
    daemon = daemons.start(relay_config(routes=[smarthost_route("smart.test", SMARTHOST, port)],
                                        retry=["1h"]))
    spool = daemon.run_dir / "var" / "spool"
    sent = [send(daemon, [f"user{n}@smart.test"]) for n in range(6)]
    ids = {s.queue_id for s in sent}
    wait_for(lambda: all(e["recipients"][0]["state"] == "deferred"
                         for e in queue_list(daemon)) or None, 30,
             lambda: f"not all deferred: {queue_list(daemon)}")
    journaled = ids - queue_files(spool)
    assert journaled, "every message got a queue file: the journal was not used"
    assert segments(spool)

    children = syncers(daemon.proc.pid)
    assert children, "no syncer child: the journal is synced in the reactor thread"
    daemon.kill9()
    wait_for(lambda: not [pid for pid in children if Path(f"/proc/{pid}").exists()] or None,
             10, lambda: f"the syncer outlived its daemon: {children}")
    listed = {e["id"] for e in queue_list(daemon)}  # relaygw is stopped: read from disk
    assert listed == ids
    gone = sorted(journaled)[0]
    deleted = subprocess.run(
        [str(RELAYGWCTL), "--config", str(daemon.config_path), "queue", "delete", gone],
        cwd=daemon.run_dir, capture_output=True, text=True, timeout=30)
    assert deleted.returncode == 0, deleted.stdout + deleted.stderr

    daemon.start()
    assert queue_files(spool) == ids - {gone}  # converted before the queue was read back
    assert {e["id"] for e in queue_list(daemon)} == ids - {gone}
    assert len(segments(spool)) == 1  # only the new, current one
    assert not [line for line in daemon.log_lines() if "damaged" in line]
