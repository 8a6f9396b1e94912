"""Scenario d of bench/run.py: the memory of idle SMTP sessions held open.

This process opens N TCP connections to the server, reads each 220 banner
and keeps them all open without a word. The server's memory is taken before
(after one warm-up session, once it is idle) and with the N sessions open
(once it is idle again): the difference over N is its cost per session.

relaygw is one process: its RSS is the figure (its PSS is printed too, but it
moves with whatever else maps the same libraries, other Pythons included).
Postfix runs one ``smtpd`` process per session, so its figure is the sum
over all the instance's processes, as RSS (shared pages counted in each
process) and as PSS (shared pages split among the processes that map them,
from /proc/PID/smaps_rollup), the fair one; the ratio per session is
relaygw's RSS over Postfix's PSS.
One process per session makes Postfix slow to reach thousands of sessions,
so it is measured at a smaller count (``--postfix-idle-sessions``); the
table says which count each server was measured at, and the ratio is per
session.

Each run starts fresh servers (memory an earlier run freed may not go back
to the system). The servers' limits are raised above N: relaygw's
``[limits]`` max_connections and max_connections_per_client, Postfix's
``default_process_limit``; command timeouts are long (30 min). The file
descriptor limit of this process, which the servers inherit, is raised too.
Client source addresses are spread over 127.0.3.x, a thousand sessions each,
so that ephemeral ports never run short.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from _common import (
    DEAD_NEXT_HOP,
    BenchError,
    Postfix,
    Relaygw,
    Server,
    Settings,
    format_table,
    memory_kib,
    raise_nofile,
    ratio,
    running,
    summary,
)

CLIENT_NETWORK = "127.0.3."  # the client's source addresses: 127.0.3.1, .2, ...
SESSIONS_PER_ADDRESS = 1000
BATCH = 50  # connections in flight at once (Twisted's listen backlog is 50)
RELAYGW_TARGET_MIB = 200  # 10,000 idle sessions under 200 MiB RSS in all
TARGET_SESSIONS = 10_000


@dataclass
class IdleSample:
    """One run: the server's memory before and with ``sessions`` idle sessions."""

    sessions: int
    rss_before: int  # KiB, summed over the server's processes
    pss_before: int
    rss: int
    pss: int
    processes: int
    open_seconds: float  # how long opening them all took

    @property
    def rss_per_session(self) -> float:
        return (self.rss - self.rss_before) / self.sessions

    @property
    def pss_per_session(self) -> float:
        return (self.pss - self.pss_before) / self.sessions


class IdleClients:
    """Sessions this process holds open: connected, banner read, then silent."""

    def __init__(self) -> None:
        self.sockets: list[socket.socket] = []

    def __enter__(self) -> IdleClients:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self, address: str, port: int, count: int, timeout: float = 120.0) -> None:
        """Open ``count`` sessions, ``BATCH`` at a time; BenchError if one gets no 220."""
        end = len(self.sockets) + count
        for first in range(len(self.sockets), end, BATCH):
            self._open_batch(address, port, range(first, min(first + BATCH, end)), timeout)

    def _open_batch(self, address: str, port: int, numbers: range, timeout: float) -> None:
        with selectors.DefaultSelector() as selector:
            for number in numbers:
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                self.sockets.append(s)  # closed by close(), whatever happens
                s.setblocking(False)
                s.bind((f"{CLIENT_NETWORK}{number // SESSIONS_PER_ADDRESS + 1}", 0))
                s.connect_ex((address, port))  # EINPROGRESS; the banner says it worked
                selector.register(s, selectors.EVENT_READ, bytearray())
            deadline = time.monotonic() + timeout
            while selector.get_map():
                events = selector.select(max(0.0, deadline - time.monotonic()))
                if not events:
                    raise BenchError(f"{len(selector.get_map())} session(s) got no banner "
                                     f"in {timeout:g}s ({len(self.sockets)} opened)")
                for key, _ in events:
                    s, received = key.fileobj, key.data
                    assert isinstance(s, socket.socket)
                    try:
                        chunk = s.recv(512)
                    except OSError as e:
                        raise BenchError(f"a session failed ({len(self.sockets)} opened): "
                                         f"{e}") from None
                    received += chunk
                    if not chunk or b"\n" in received:
                        if not received.startswith(b"220"):
                            raise BenchError(f"session refused after {len(self.sockets)} "
                                             f"opened: {bytes(received)[:200]!r}")
                        selector.unregister(s)

    def close(self) -> None:
        for s in self.sockets:
            s.close()
        self.sockets.clear()


def server_pids(server: Server) -> list[int]:
    if isinstance(server, Relaygw):
        return [server.pid] if server.pid is not None else []
    if isinstance(server, Postfix):
        return server.instance_pids()
    return []


def open_sockets(pids: list[int]) -> int:
    """Sockets open in ``pids``, summed (a check that the sessions are really held)."""
    count = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fd_dir = Path(f"/proc/{pid}/fd")
            count += sum(1 for fd in fd_dir.iterdir()
                         if os.readlink(fd).startswith("socket:"))
    return count


def measure(server: Server, sessions: int) -> IdleSample:
    """Memory before and with ``sessions`` idle sessions on a freshly started server."""
    with IdleClients() as warm_up:
        warm_up.open(server.address, server.port, 1)
    server.settle()
    rss_before, pss_before = memory_kib(server_pids(server))
    with IdleClients() as clients:
        started = time.monotonic()
        clients.open(server.address, server.port, sessions)
        opened = time.monotonic() - started
        server.settle(timeout=60)
        pids = server_pids(server)
        held = open_sockets(pids)
        if held < sessions:
            raise BenchError(f"{server.name} holds {held} sockets, not the {sessions} sessions "
                             f"opened")
        rss, pss = memory_kib(pids)
    return IdleSample(sessions, rss_before, pss_before, rss, pss, len(pids), opened)


def idle_relaygw(workdir: Path, sessions: int) -> Relaygw:
    limit = str(sessions + 100)
    return Relaygw(workdir, DEAD_NEXT_HOP, limits={
        "max_connections": limit, "max_connections_per_client": limit,
        "command_timeout": '"30m"'})


def idle_postfix(workdir: Path, sessions: int) -> Postfix:
    return Postfix(workdir, DEAD_NEXT_HOP, extra_main_cf=[
        f"default_process_limit = {sessions + 100}", "smtpd_timeout = 1800s",
        "smtpd_client_connection_count_limit = 0"])


def idle_phase(cfg: Settings) -> dict[str, list[IdleSample]]:
    """Every run: relaygw, then Postfix, each freshly started; samples per server."""
    counts = {"relaygw": cfg.idle_sessions}
    if cfg.postfix:
        counts["postfix"] = cfg.postfix_idle_sessions
    limit = raise_nofile(max(counts.values()) + 1024)
    if limit < max(counts.values()) + 64:
        raise BenchError(f"idle sessions: the open files limit is {limit}, too low for "
                         f"{max(counts.values())} sessions")
    print(f"idle sessions: connect, read the banner, stay silent; relaygw at "
          f"{cfg.idle_sessions}, " + (f"Postfix at {cfg.postfix_idle_sessions} (one smtpd "
          f"process per session)" if cfg.postfix else "Postfix not measured")
          + f"; {cfg.runs} run(s), fresh servers each run; open files limit {limit}",
          flush=True)
    samples: dict[str, list[IdleSample]] = {name: [] for name in counts}
    for run in range(cfg.runs):
        for name, sessions in counts.items():
            workdir = cfg.top / f"idle-{name}-{run + 1}"
            workdir.mkdir()
            make = idle_relaygw if name == "relaygw" else idle_postfix
            with running(make(workdir, sessions)) as server:
                sample = measure(server, sessions)
            samples[name].append(sample)
            print(f"  {name:8} run {run + 1}: {sessions} sessions opened in "
                  f"{sample.open_seconds:.1f}s; RSS {sample.rss_before / 1024:.0f} -> "
                  f"{sample.rss / 1024:.0f} MiB ({sample.rss_per_session:.1f} KiB/session), "
                  f"PSS {sample.pss_before / 1024:.0f} -> {sample.pss / 1024:.0f} MiB "
                  f"({sample.pss_per_session:.1f} KiB/session), {sample.processes} "
                  f"process(es)", flush=True)
    return samples


def idle_table(samples: dict[str, list[IdleSample]]) -> str:
    """(d): per server, its memory with the sessions open and per session; the ratio."""
    headers = ["server", "sessions", "RSS before MiB", "RSS MiB", "KiB/session RSS", "PSS MiB",
               "KiB/session PSS", "processes"]
    rows = []
    for name, runs in samples.items():
        rows.append([name, str(runs[0].sessions),
                     summary([s.rss_before / 1024 for s in runs], ".0f"),
                     summary([s.rss / 1024 for s in runs], ".0f"),
                     summary([s.rss_per_session for s in runs], ".1f"),
                     summary([s.pss / 1024 for s in runs], ".0f"),
                     summary([s.pss_per_session for s in runs], ".1f"),
                     summary([float(s.processes) for s in runs], ".0f")])
    lines = [format_table(headers, rows)]
    if samples.get("postfix"):
        def median(name: str, kind: str) -> float:
            return statistics.median(getattr(s, f"{kind}_per_session") for s in samples[name])
        by_pss = ratio(median("relaygw", "rss"), median("postfix", "pss"))
        by_rss = ratio(median("relaygw", "rss"), median("postfix", "rss"))
        lines.append(f"per session, relaygw/postfix (lower is better): {by_pss}, relaygw's RSS "
                     f"(one process) over Postfix's PSS (summed over its processes, shared "
                     f"pages split); {by_rss} by RSS alone; relaygw at "
                     f"{samples['relaygw'][0].sessions} sessions, postfix at "
                     f"{samples['postfix'][0].sessions}")
    relaygw = samples["relaygw"]
    total = statistics.median(s.rss / 1024 for s in relaygw)
    sessions = relaygw[0].sessions
    verdict = "met" if total < RELAYGW_TARGET_MIB and sessions >= TARGET_SESSIONS else (
        "NOT met" if total >= RELAYGW_TARGET_MIB else f"not judged at {sessions} sessions")
    lines.append(f"target: {TARGET_SESSIONS} idle sessions under {RELAYGW_TARGET_MIB} MiB RSS "
                 f"in all: relaygw {total:.0f} MiB at {sessions} sessions: {verdict}")
    return "\n".join(lines)
