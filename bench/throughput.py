"""Scenarios a, b, c and f of bench/run.py: throughput, peak RSS, CPU per message.

Both servers get the same load from Postfix's ``smtp-source``: one SMTP
connection per message, N sessions in parallel, runs interleaved (relaygw,
Postfix, relaygw, ...) so that drift on the machine hits both alike.

- accept (a, and c's accept half): the bench domain is relayed to a next hop
  that is down (127.0.0.1:1), so every accepted message stays queued: the
  figure is the fsynced accept plus the deferral it causes, not delivery.
- end to end (b, and c's other half): each server relays to a Postfix
  ``smtp-sink`` of its own (250 to everything, PIPELINING, discards), whose
  running counter says when the run's last message arrived. A run lasts from
  the start of smtp-source until then: accept, spool, queue manager, outbound
  SMTP, removal from the queue.
- CPU per message (f): user+sys of the server's processes over a run (from
  before the load until the server is idle again, deferrals included),
  divided by the messages; printed for every table of a, b and c.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from _common import (
    BENCH_DOMAIN,
    BODY_BYTES,
    DEAD_NEXT_HOP,
    WARMUP_MESSAGES,
    BenchError,
    Postfix,
    Relaygw,
    Results,
    Sample,
    Server,
    Settings,
    find_tool,
    format_table,
    free_port,
    peak_rss_column,
    proc_status_kib,
    ratio,
    reset_peak_rss,
    run_load,
    running,
    summary,
    table,
    tail,
    wait_for,
    wait_for_banner,
)

LARGE_BODY_BYTES = 1024 * 1024
ACCEPT_SESSIONS = [1, 10, 50]
E2E_SESSIONS = [10, 50]
LARGE_SESSIONS = [1, 10]
RELAYGW_SINK_ADDRESS = "127.0.0.73"
POSTFIX_SINK_ADDRESS = "127.0.0.74"
# The Postfix parameters that shape relaying to the sink, printed as in effect.
POSTFIX_SETTINGS = (
    "relayhost", "relay_transport", "default_destination_concurrency_limit",
    "relay_destination_concurrency_limit", "initial_destination_concurrency",
    "default_process_limit", "smtp_connection_cache_on_demand", "smtp_tls_security_level",
    "message_size_limit",
)
COUNTER = re.compile(rb"mesg=(\d+)")


@dataclass
class Outcome:
    """One table of scenarios a-c: its samples per server and session count."""

    label: str  # the row name in the CPU table (f), e.g. "accept 4 KiB"
    title: str  # what the table measures
    sessions: list[int]
    count: int  # messages per run
    body_bytes: int
    rss: bool = False  # relaygw's peak RSS is a column
    results: Results = field(default_factory=Results)


# --------------------------------------------------------------------------- the sink


class Sink:
    """Postfix's ``smtp-sink -c`` on address:port; ``count`` is its message counter.

    smtp-sink rewrites a ``sess=N quit=N mesg=N`` line (ended by CR) on stdout
    whenever a session ends, a QUIT comes or a final dot is received; a thread
    reads it as it comes and notes when the count reached the awaited total.
    """

    def __init__(self, workdir: Path, address: str, label: str) -> None:
        self.address = address
        self.port = free_port(address)
        self.label = label
        self.stderr_path = workdir / f"sink-{label}.log"
        self.tool = find_tool("smtp-sink") or "smtp-sink"
        self.proc: subprocess.Popen[bytes] | None = None
        self.thread: threading.Thread | None = None
        self.count = 0
        self.ehlo: list[str] = []
        self._cond = threading.Condition()
        self._target: int | None = None
        self._reached: float | None = None
        self._eof = False

    @property
    def hop(self) -> tuple[str, int]:
        return self.address, self.port

    def command(self) -> list[str]:
        command = [self.tool, "-c", "-h", f"sink.{BENCH_DOMAIN}"]
        if os.geteuid() == 0:  # smtp-sink refuses to run as root without -u
            with contextlib.suppress(KeyError):
                pwd.getpwnam("nobody")
                command += ["-u", "nobody"]
            if "-u" not in command:
                command += ["-u", "postfix"]
        return [*command, f"{self.address}:{self.port}", "1000"]

    def start(self) -> None:
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL,
                                         stdout=subprocess.PIPE, stderr=err,
                                         start_new_session=True)
        self.thread = threading.Thread(target=self._read, name=f"sink-{self.label}",
                                       daemon=True)
        self.thread.start()
        try:
            wait_for_banner(self.address, self.port,
                            lambda: self.proc is not None and self.proc.poll() is None,
                            15, f"smtp-sink for {self.label}")
        except BenchError as e:
            raise BenchError(f"{e}; {tail(self.stderr_path)}") from None
        self.ehlo = self._probe_ehlo()
        if "PIPELINING" not in self.ehlo:
            raise BenchError(f"smtp-sink on {self.address}:{self.port} does not offer "
                             f"PIPELINING: {self.ehlo}")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.thread is not None:
            self.thread.join(timeout=5)

    def _probe_ehlo(self) -> list[str]:
        """The EHLO keywords the sink offers (no message is sent)."""
        with socket.create_connection((self.address, self.port), timeout=5) as s:
            reader = s.makefile("rb")
            reader.readline()
            s.sendall(b"EHLO probe.bench.test\r\n")
            keywords = []
            while True:
                line = reader.readline().decode("ascii", "replace")
                if not line.startswith("250"):
                    raise BenchError(f"smtp-sink answered EHLO with {line.strip()!r}")
                keywords.append(line[4:].strip().split(" ")[0].upper())
                if line[3:4] != "-":
                    break
            s.sendall(b"QUIT\r\n")
            reader.readline()
        return [k for k in keywords[1:] if k]

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        pending = b""
        while True:
            data = os.read(fd, 65536)
            now = time.perf_counter()
            if not data:
                break
            *records, pending = (pending + data).split(b"\r")
            counts = [int(m.group(1)) for r in records if (m := COUNTER.search(r))]
            if not counts:
                continue
            with self._cond:
                self.count = max(self.count, *counts)
                if (self._target is not None and self._reached is None
                        and self.count >= self._target):
                    self._reached = now
                    self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def expect(self, total: int) -> None:
        """Start waiting for the counter to reach ``total``."""
        with self._cond:
            self._target = total
            self._reached = time.perf_counter() if self.count >= total else None

    def wait(self, timeout: float) -> float | None:
        """perf_counter() time at which the counter reached the total; None on timeout."""
        with self._cond:
            self._cond.wait_for(lambda: self._reached is not None or self._eof, timeout)
            if self._reached is None and self._eof:
                raise BenchError(f"smtp-sink for {self.label} exited: "
                                 f"{tail(self.stderr_path)}")
            return self._reached

    def describe(self) -> str:
        return (f"sink for {self.label}: smtp-sink -c on {self.address}:{self.port} "
                f"(250 to everything, discards; offers {' '.join(self.ehlo)})")


# --------------------------------------------------------------------------- servers


def accept_relaygw(workdir: Path) -> Relaygw:
    """relaygw relaying the bench domain to the dead next hop, retrying hourly."""
    return Relaygw(workdir, DEAD_NEXT_HOP, queue=['retry_schedule = ["1h"]', 'max_age = "5d"'],
                   route_note=" (down: messages stay spooled), retry_schedule 1h")


def accept_postfix(workdir: Path) -> Postfix:
    """A private Postfix relaying the bench domain to the dead next hop."""
    return Postfix(workdir, DEAD_NEXT_HOP, route_note=" (down: messages stay queued)")


def relay_relaygw(workdir: Path, sink: Sink) -> Relaygw:
    """relaygw relaying the bench domain to the sink; [queue] left at its defaults."""
    return Relaygw(workdir, sink.hop, metrics=True,
                   route_note=' (smtp-sink), tls = "none"; [queue] defaults: '
                              'concurrency 100, per_destination 10')


def relay_postfix(workdir: Path, sink: Sink) -> Postfix:
    """A private Postfix relaying the bench domain to the sink."""
    return Postfix(workdir, sink.hop, extra_main_cf=["smtp_tls_security_level = none"],
                   route_note=" (smtp-sink), smtp_tls_security_level none")


def pending(server: Server) -> int:
    """Messages still in the server's queue (cheap: no CLI)."""
    if isinstance(server, Relaygw) and (size := server.queue_size()) is not None:
        return size
    return server.queued() or 0


def server_pid(server: Server) -> int | None:
    return server.pid if isinstance(server, Relaygw) else None


def workdir(cfg: Settings, name: str) -> Path:
    path = cfg.top / name
    path.mkdir()
    return path


# --------------------------------------------------------------------------- measuring

Measure = Callable[[Server, int, Outcome], tuple[Sample, str]]


def measure_accept(cfg: Settings, server: Server, sessions: int,
                   outcome: Outcome) -> tuple[Sample, str]:
    """One accept run: settle, load, settle; rate, CPU per message, relaygw's peak RSS."""
    server.settle()
    pid = server_pid(server)
    if pid is not None:
        reset_peak_rss(pid)
    cpu_before = server.cpu_seconds()
    elapsed = run_load(cfg.smtp_source, server, outcome.count, sessions, outcome.body_bytes)
    server.settle()  # the CPU figure includes the deferral work the messages caused
    cpu = server.cpu_seconds() - cpu_before
    peak = proc_status_kib(pid, "VmHWM") if pid is not None else None
    sample = Sample(rate=outcome.count / elapsed, cpu_per_msg=cpu / outcome.count,
                    peak_rss_kib=peak)
    return sample, ""


def measure_e2e(cfg: Settings, server: Server, sink: Sink, sessions: int,
                outcome: Outcome) -> tuple[Sample, str]:
    """One end-to-end run: settle, load, wait for the sink, settle."""
    count = outcome.count
    server.settle()
    with contextlib.suppress(BenchError):
        wait_for(lambda: pending(server) == 0, 30, f"{server.name}'s queue to empty")
    left = pending(server)
    if left:
        print(f"WARNING: {server.name} queue holds {left} message(s) before the run",
              file=sys.stderr)
    pid = server_pid(server)
    if pid is not None:
        reset_peak_rss(pid)
    cpu_before = server.cpu_seconds()
    base = sink.count
    sink.expect(base + count)
    started = time.perf_counter()
    run_load(cfg.smtp_source, server, count, sessions, outcome.body_bytes)
    accepted = time.perf_counter() - started
    timeout = max(120.0, count * 0.2)
    reached = sink.wait(timeout)
    if reached is None:
        raise BenchError(f"{server.name}: {sink.count - base} of {count} messages reached the "
                         f"sink {timeout:g}s after the load ended; {pending(server)} still "
                         f"queued")
    delivered = reached - started
    server.settle()
    cpu = server.cpu_seconds() - cpu_before
    peak = proc_status_kib(pid, "VmHWM") if pid is not None else None
    extra = sink.count - base - count
    detail = (f" (all accepted at {accepted:.2f}s, last delivered at {delivered:.2f}s"
              + (f", {extra} EXTRA message(s) at the sink" if extra else "") + ")")
    return Sample(rate=count / delivered, cpu_per_msg=cpu / count, peak_rss_kib=peak), detail


def interleave(cfg: Settings, outcome: Outcome, servers: list[Server], measure: Measure) -> None:
    """Every session count, ``cfg.runs`` rounds of one run per server; a line per run."""
    print(f"{outcome.title}: {outcome.count} messages per run, {cfg.runs} run(s)", flush=True)
    for sessions in outcome.sessions:
        for run in range(cfg.runs):
            for server in servers:
                sample, detail = measure(server, sessions, outcome)
                outcome.results.add(server.name, sessions, sample)
                rss = (f", peak RSS {sample.peak_rss_kib / 1024:.0f} MiB"
                       if sample.peak_rss_kib is not None else "")
                print(f"  {server.name:8} sessions={sessions:<3} run {run + 1}: "
                      f"{sample.rate:7.1f} msg/s, {sample.cpu_per_msg * 1000:6.2f} ms CPU/msg"
                      f"{rss}{detail}", flush=True)


# --------------------------------------------------------------------------- the phases


# phase: (4 KiB sessions, row label, table title, the 4 KiB half's scenario letter)
PHASES = {
    "accept": (ACCEPT_SESSIONS, "accept", "durable accept", "a"),
    "e2e": (E2E_SESSIONS, "end to end", "end to end to smtp-sink", "b"),
}


def phase_outcomes(cfg: Settings, phase: str, small: bool, large: bool) -> list[Outcome]:
    """The 4 KiB and the 1 MiB scenario of a phase, as far as they were asked for."""
    sessions, label, title, letter = PHASES[phase]
    outcomes = []
    if small:
        outcomes.append(Outcome(f"{label} 4 KiB", f"({letter}) {title}, 4 KiB bodies",
                                sessions, cfg.count, BODY_BYTES))
    if large:
        outcomes.append(Outcome(f"{label} 1 MiB", f"(c) {title}, 1 MiB bodies",
                                LARGE_SESSIONS, cfg.large_count, LARGE_BODY_BYTES, rss=True))
    return outcomes


def accept_phase(cfg: Settings, small: bool, large: bool) -> list[Outcome]:
    """Scenario a (4 KiB) and c's accept half (1 MiB), on one pair of servers."""
    outcomes = phase_outcomes(cfg, "accept", small, large)
    with contextlib.ExitStack() as stack:
        servers: list[Server] = [stack.enter_context(running(
            accept_relaygw(workdir(cfg, "accept-relaygw"))))]
        if cfg.postfix:
            servers.append(stack.enter_context(running(
                accept_postfix(workdir(cfg, "accept-postfix")))))
        print("accept: the next hop is down, every accepted message stays queued; "
              "smtp-source, one connection per message")
        for server in servers:
            print(f"  {server.describe()}")
        for server in servers:  # warm-up: imports, process pools, the first deferral
            run_load(cfg.smtp_source, server, WARMUP_MESSAGES, 1)
        for outcome in outcomes:
            interleave(cfg, outcome, servers,
                       lambda server, sessions, o: measure_accept(cfg, server, sessions, o))
        sent = WARMUP_MESSAGES + sum(o.count * len(o.sessions) * cfg.runs for o in outcomes)
        for server in servers:
            queued = server.queued()
            if queued is not None and queued != sent:
                print(f"WARNING: {server.name} queue holds {queued} messages, {sent} were "
                      f"accepted")
            elif queued is not None:
                print(f"{server.name}: all {queued} accepted messages are in its queue")
        report_logs(servers, relayed=False)
    return outcomes


def e2e_phase(cfg: Settings, small: bool, large: bool) -> list[Outcome]:
    """Scenario b (4 KiB) and c's end-to-end half (1 MiB), each server with its own sink."""
    outcomes = phase_outcomes(cfg, "e2e", small, large)
    with contextlib.ExitStack() as stack:
        # Sinks first: they stop last, after the servers QUIT their cached sessions.
        makers: list[tuple[str, str, Callable[[Path, Sink], Server]]] = [
            ("relaygw", RELAYGW_SINK_ADDRESS, relay_relaygw)]
        if cfg.postfix:
            makers.append(("postfix", POSTFIX_SINK_ADDRESS, relay_postfix))
        sinks: dict[str, Sink] = {}
        servers: list[Server] = []
        for name, address, make in makers:
            path = workdir(cfg, f"e2e-{name}")
            sink = stack.enter_context(running(Sink(path, address, name)))
            servers.append(stack.enter_context(running(make(path, sink))))
            sinks[name] = sink
        print("end to end: each server relays to an smtp-sink of its own; a run lasts from "
              "the start of smtp-source until the sink has the run's last message")
        for server in servers:
            print(f"  {server.describe()}")
            print(f"  {sinks[server.name].describe()}")
            if isinstance(server, Postfix):
                values = server.postconf(*POSTFIX_SETTINGS)
                print("  postfix settings: " + ", ".join(
                    f"{name} = {values.get(name, '?')}" for name in POSTFIX_SETTINGS))
        for server in servers:  # warm-up: imports, process pools, first connections
            sink = sinks[server.name]
            base = sink.count
            sink.expect(base + WARMUP_MESSAGES)
            run_load(cfg.smtp_source, server, WARMUP_MESSAGES, 1)
            if sink.wait(60) is None:
                raise BenchError(f"{server.name}: the warm-up messages did not reach the "
                                 f"sink in 60s ({sink.count - base} did); log:\n"
                                 f"{tail(server.log)}")
        for outcome in outcomes:
            interleave(cfg, outcome, servers, lambda server, sessions, o: measure_e2e(
                cfg, server, sinks[server.name], sessions, o))
        for server in servers:
            queued = server.queued()
            if queued:
                print(f"WARNING: {server.name} queue still holds {queued} message(s)")
            elif queued == 0:
                print(f"{server.name}: queue empty, every message delivered")
        report_logs(servers, relayed=True)
    return outcomes


# --------------------------------------------------------------------------- report


def report_logs(servers: list[Server], relayed: bool) -> None:
    """Outcomes, deferrals and errors the servers logged (deferrals only if ``relayed``)."""
    for server in servers:
        if isinstance(server, Relaygw):
            outcomes = {kind: server.log_lines(f"status={kind} ")
                        for kind in ("delivered", "deferred", "bounced", "expired")}
            problems = server.errors()
            if relayed:
                problems += server.log_lines("unreachable", "#warn]")
        elif isinstance(server, Postfix):
            outcomes = {kind: server.log_lines(f"status={kind}")
                        for kind in ("sent", "deferred", "bounced")}
            problems = server.log_lines("warning:", "fatal:", "panic:", "error:")
        else:
            continue
        counts = ", ".join(f"{kind} {len(lines)}" for kind, lines in outcomes.items())
        print(f"{server.name} log: {counts}")
        for kind, lines in outcomes.items():
            if relayed and kind not in ("delivered", "sent") and lines:
                print(f"WARNING: {server.name} logged {len(lines)} {kind}, e.g. "
                      f"{lines[0][:300]}")
        if problems:
            print(f"WARNING: {server.name} logged {len(problems)} warning/error line(s), "
                  f"e.g. {problems[0][:300]}")


def outcome_table(outcome: Outcome, names: list[str]) -> str:
    """One scenario's table: msg/s and CPU ms/msg, medians (min-max), and the ratio."""
    title = (f"{outcome.title}, {outcome.count} messages per run: messages/second, median "
             f"(min-max); server CPU ms per message"
             + ("; relaygw peak RSS (VmHWM, reset before each run)" if outcome.rss else ""))
    extra = {"relaygw": [("peak RSS MiB", peak_rss_column)]} if outcome.rss else None
    return f"{title}\n{table(outcome.results, names, outcome.sessions, extra)}"


def cpu_table(outcomes: list[Outcome], names: list[str]) -> str:
    """Scenario f: CPU milliseconds per message for every row of a-c, with the ratio."""
    headers = ["scenario", "sessions", *(f"{name} CPU ms/msg" for name in names)]
    if len(names) == 2:
        headers.append(f"{names[0]}/{names[1]}")
    rows = []
    for outcome in outcomes:
        for sessions in outcome.sessions:
            row = [outcome.label, str(sessions)]
            medians: list[float | None] = []
            for name in names:
                values = [s.cpu_per_msg * 1000 for s in outcome.results.get(name, sessions)]
                row.append(summary(values, ".2f"))
                medians.append(statistics.median(values) if values else None)
            if len(names) == 2:
                row.append(ratio(medians[0], medians[1]))
            rows.append(row)
    return format_table(headers, rows)
