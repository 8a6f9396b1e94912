"""Scenario e of bench/run.py: restarting relaygw on a big spool whose next hop is down.

The spool is built with relaygw's own spool module (``relaygw.spool.Spool``:
``open_incoming``, ``write``, ``commit``, as the SMTP server queues a
message), never by writing its files here: the on-disk format is the
module's business. Only fsync is skipped (``Spool`` takes an ``os``
stand-in whose ``fsync`` does nothing), and one sync(2) at the end writes it
all back before the daemon starts. Several processes build it in parallel.
Every message has a 1 KiB body and one recipient in the bench domain, which
is relayed to 127.0.0.1:1 (down), with ``retry_schedule = ["1h"]``.

Each run starts ``twistd -n relaygw`` on that spool (page cache warm: the
spool was just written or just read by the run before) and measures, from
the moment the process is started:

- banner: until an SMTP connection gets its 220 greeting;
- loaded: until ``/metrics`` (a ``[metrics] listen`` is configured) says
  ``relaygw_queue_messages`` is N: the scheduler holds the whole queue;
- resumed: until the first attempts are done: every message that was due has
  had its attempt or been parked behind the dead next hop, which the daemon
  counts in ``relaygw_deliveries_total{result="deferred"}``. The time is the
  first scrape at which that counter had its final value, final meaning that
  the queue was loaded and the daemon had then been idle (under 10% of a core)
  for 0.75 s with the counter unchanged. On the first run every message is
  due; a later run finds the few that were really tried (their next attempt
  is an hour away) not due, so its "attempted" column is a little lower;
- RSS once resumed, and peak RSS (VmHWM) since the start;
- idle CPU: the daemon's user+sys over ``--idle-window`` seconds once
  resumed, with nothing due and no scrape, as a percentage of one core;
- stop: seconds from SIGTERM until the process has exited.

/metrics is scraped every 0.25 s, and a scrape waits for the reactor like
any client, so the loaded and resumed figures are upper bounds, to within a
quarter of a second.

Postfix is not measured here: its queue would have to be filled through
smtp-source or postdrop (minutes for 100,000 messages), and Postfix does not
load its queue at start-up (qmgr scans incoming and deferred a bit at a
time), so a restart figure would not compare like with like.
"""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import time
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _common import (
    DEAD_NEXT_HOP,
    RECIPIENT,
    SENDER,
    BenchError,
    Relaygw,
    Settings,
    format_table,
    proc_status_kib,
    summary,
    tail,
)
from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure

from relaygw.envelope import Envelope, Recipient
from relaygw.spool import Spool

MESSAGE = (b"Received: from client.bench.test ([127.0.0.1]) by relaygw.bench.test with ESMTP\r\n"
           b"From: <" + SENDER.encode() + b">\r\nTo: <" + RECIPIENT.encode() + b">\r\n"
           b"Subject: queued while the next hop is down\r\n\r\n" + b"x" * 78 * 13 + b"\r\n")
POLL = 0.25  # seconds between scrapes of /metrics
QUIET_POLLS = 3  # scrapes in a row with the daemon idle and the counter unchanged
QUIET_SHARE = 0.10  # idle: under this share of one core
DEFERRED = 'relaygw_deliveries_total{result="deferred"}'
QUEUE = "relaygw_queue_messages"
TARGET_RESUME_S = 10.0  # the targets at 100,000 queued messages
TARGET_RSS_MIB = 500
TARGET_CPU_PERCENT = 1.0
TARGET_MESSAGES = 100_000


# --------------------------------------------------------------------------- building


class NoFsync:
    """The ``os`` module with ``fsync`` doing nothing: the spool's own writes, unsynced."""

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    @staticmethod
    def fsync(fd: int) -> None:
        pass


def direct(fn: Any, *args: Any) -> Deferred[Any]:
    """The spool's ``run_blocking``: the call itself, here and now."""
    return succeed(fn(*args))


def generate(directory: Path, count: int) -> None:
    """Queue ``count`` messages in ``directory`` through relaygw.spool, fsync skipped."""
    spool = Spool(directory, direct, NoFsync())
    spool.prepare()
    for _ in range(count):
        incoming = spool.open_incoming()
        incoming.write(MESSAGE)
        envelope = Envelope(id=incoming.id, sender=SENDER, received=time.time(),
                            recipients=[Recipient(address=RECIPIENT, original=RECIPIENT,
                                                  action="relay")],
                            client_address="127.0.0.1", helo="client.bench.test")
        failures: list[Failure] = []
        spool.commit(incoming, envelope).addErrback(failures.append)
        if failures:
            failures[0].raiseException()


def build_spool(directory: Path, messages: int) -> float:
    """Build the spool with one process per CPU; the seconds it took, sync(2) included."""
    started = time.monotonic()
    workers = max(1, min(os.cpu_count() or 1, messages // 500 or 1))
    shares = [messages // workers + (i < messages % workers) for i in range(workers)]
    procs = [subprocess.Popen([sys.executable, __file__, str(directory), str(share)],
                              stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for share in shares]
    failed = []
    for proc in procs:
        _, err = proc.communicate()
        if proc.returncode != 0:
            failed.append(err.strip()[-1000:])
    if failed:
        raise BenchError(f"building the spool with relaygw.spool failed (has its API "
                         f"changed? see bench/bigspool.py generate()):\n{failed[0]}")
    os.sync()
    return time.monotonic() - started


# --------------------------------------------------------------------------- measuring


@dataclass
class SpoolSample:
    """One restart on the big spool; seconds from the process start."""

    banner: float
    loaded: float
    resumed: float
    attempted: int  # messages the deferred counter counted (attempted or parked)
    rss_kib: int
    peak_kib: int
    idle_cpu_percent: float
    stop: float


def banner_time(server: Relaygw, deadline: float) -> float:
    """``time.monotonic()`` at which a connection got the 220 greeting."""
    while True:
        if not server.alive():
            raise BenchError(f"relaygw exited during start-up; log:\n{tail(server.log)}")
        with suppress(OSError), socket.create_connection((server.address, server.port),
                                                         timeout=1) as s:
            # Connected: the listener is up; the greeting waits for the reactor.
            s.settimeout(max(0.1, deadline - time.monotonic()))
            data = b""
            while b"\n" not in data and (chunk := s.recv(512)):
                data += chunk
            if data.startswith(b"220"):
                at = time.monotonic()
                with suppress(OSError):
                    s.sendall(b"QUIT\r\n")
                return at
        if time.monotonic() > deadline:
            raise BenchError(f"relaygw did not greet in time; log:\n{tail(server.log)}")
        time.sleep(0.02)


def measure(server: Relaygw, messages: int, window: float) -> SpoolSample:
    """Start twistd on the spool, follow it until resumed and idle, measure, stop it."""
    budget = 120 + messages * 0.004  # generous: relaygw 0.1 took ~0.5 ms per message
    started = server.launch()
    try:
        deadline = started + budget
        banner = banner_time(server, deadline) - started
        assert server.pid is not None
        loaded: float | None = None
        history: list[tuple[float, float]] = []  # (seconds since start, deferred count)
        quiet = 0
        cpu, then = server.cpu_seconds(), time.monotonic()
        while True:
            if not server.alive():
                raise BenchError(f"relaygw exited; log:\n{tail(server.log)}")
            scrape = server.metrics(timeout=max(1.0, deadline - time.monotonic()))
            now = time.monotonic()
            if scrape is not None:
                if loaded is None and scrape.get(QUEUE, 0) >= messages:
                    loaded = now - started
                history.append((now - started, scrape.get(DEFERRED, 0.0)))
            cpu_now = server.cpu_seconds()
            idle = cpu_now - cpu <= QUIET_SHARE * (now - then)
            cpu = cpu_now
            then = now
            steady = len(history) >= 2 and history[-1][1] == history[-2][1]
            quiet = quiet + 1 if idle and steady and loaded is not None else 0
            if quiet >= QUIET_POLLS:
                break
            if now > deadline:
                got = f"{scrape.get(QUEUE)} queued" if scrape else "no /metrics answer"
                raise BenchError(f"relaygw did not resume {messages} messages and go idle in "
                                 f"{budget:g}s ({got}); log:\n{tail(server.log)}")
            time.sleep(POLL)
        assert loaded is not None
        final = history[-1][1]
        resumed = max(loaded, next(t for t, deferred in history if deferred == final))
        rss = proc_status_kib(server.pid, "VmRSS") or 0
        peak = proc_status_kib(server.pid, "VmHWM") or 0
        before = server.cpu_seconds()
        time.sleep(window)
        idle_cpu = (server.cpu_seconds() - before) / window * 100
    finally:
        stopping = time.monotonic()
        server.stop()
        stop = time.monotonic() - stopping
    return SpoolSample(banner, loaded, resumed, int(final), rss, peak, idle_cpu, stop)


def spool_phase(cfg: Settings) -> list[SpoolSample]:
    """Build the spool once, then restart relaygw on it ``cfg.runs`` times."""
    workdir = cfg.top / "spool-relaygw"
    workdir.mkdir()
    server = Relaygw(workdir, DEAD_NEXT_HOP, metrics=True,
                     queue=['retry_schedule = ["1h"]', 'max_age = "5d"'])
    print(f"big spool: {cfg.spool_messages} queued messages (1 KiB bodies), next hop down "
          f"(127.0.0.1:1), retry_schedule 1h; {cfg.runs} restart(s), idle window "
          f"{cfg.idle_window:g}s", flush=True)
    built = build_spool(server.spool, cfg.spool_messages)
    print(f"  spool built with relaygw.spool (fsync skipped, then sync) in {built:.1f}s",
          flush=True)
    samples = []
    for run in range(cfg.runs):
        sample = measure(server, cfg.spool_messages, cfg.idle_window)
        samples.append(sample)
        print(f"  relaygw  run {run + 1}: banner at {sample.banner:.2f}s, queue loaded at "
              f"{sample.loaded:.2f}s, resumed at {sample.resumed:.2f}s ({sample.attempted} "
              f"attempted or parked), RSS {sample.rss_kib / 1024:.0f} MiB (peak "
              f"{sample.peak_kib / 1024:.0f}), idle CPU {sample.idle_cpu_percent:.2f}% of a "
              f"core, stopped in {sample.stop:.2f}s", flush=True)
    errors = server.errors()
    if errors:
        print(f"WARNING: relaygw logged {len(errors)} error line(s), e.g. {errors[0][:300]}")
    print("  postfix: not measured (filling a Postfix queue takes minutes through "
          "smtp-source, and Postfix does not load its queue at start-up: no like-for-like "
          "restart figure)")
    return samples


def spool_table(samples: list[SpoolSample], messages: int) -> str:
    """(e): the restart figures, medians (min-max), and the targets."""
    headers = ["messages", "banner s", "loaded s", "resumed s", "attempted", "RSS MiB",
               "peak RSS MiB", "idle CPU %", "stop s"]
    row = [str(messages),
           summary([s.banner for s in samples], ".2f"),
           summary([s.loaded for s in samples], ".2f"),
           summary([s.resumed for s in samples], ".2f"),
           summary([float(s.attempted) for s in samples], ".0f"),
           summary([s.rss_kib / 1024 for s in samples], ".0f"),
           summary([s.peak_kib / 1024 for s in samples], ".0f"),
           summary([s.idle_cpu_percent for s in samples], ".2f"),
           summary([s.stop for s in samples], ".2f")]
    resumed = statistics.median(s.resumed for s in samples)
    rss = statistics.median(s.rss_kib / 1024 for s in samples)
    cpu = statistics.median(s.idle_cpu_percent for s in samples)

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    scale = "" if messages >= TARGET_MESSAGES else f" (judged at {messages}, not {TARGET_MESSAGES})"
    return "\n".join([
        format_table(headers, [row]),
        f"targets{scale}: resumed within {TARGET_RESUME_S:g}s of start: {resumed:.1f}s, "
        f"{verdict(resumed <= TARGET_RESUME_S)}; under {TARGET_RSS_MIB} MiB RSS: {rss:.0f} MiB, "
        f"{verdict(rss < TARGET_RSS_MIB)}; under {TARGET_CPU_PERCENT:g}% of a core while "
        f"nothing is due: {cpu:.2f}%, {verdict(cpu < TARGET_CPU_PERCENT)}"])


if __name__ == "__main__":  # a worker of build_spool: DIRECTORY COUNT
    generate(Path(sys.argv[1]), int(sys.argv[2]))
