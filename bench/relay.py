#!/usr/bin/env python3
"""End-to-end relay throughput of relaygw, next to a private Postfix instance.

Both servers get the same load from Postfix's ``smtp-source`` (4 KiB message
bodies, one SMTP connection per message, N sessions in parallel) and relay
every message to a next hop that takes it: Postfix's ``smtp-sink``, which
answers 250 to everything, offers PIPELINING and throws the mail away. Each
server has a sink of its own, so each sink's running counter (``-c``, read
from its stdout as it changes) says when that server's last message arrived.
A run's figure is messages per second from the start of smtp-source until
the sink has received the run's last message: accept, durable spool write,
queue manager, outbound SMTP, and removal from the queue once delivered.

Run from the repository root::

    .venv/bin/python bench/relay.py                   # 1000 msgs, 10/50 sessions, 3 runs
    .venv/bin/python bench/relay.py --large           # also 1 MiB messages, with peak RSS
    .venv/bin/python bench/relay.py --quick           # a few seconds, for a smoke test
    .venv/bin/python bench/relay.py --no-postfix      # relaygw only

relaygw runs with its queue defaults (``concurrency`` 100, ``per_destination``
10, connection reuse on demand); Postfix with its own defaults (printed at the
start) except what a private instance relaying to the sink needs. The
Postfix instance needs root, as for bench/accept.py.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from _common import (
    BENCH_DOMAIN,
    BODY_BYTES,
    WARMUP_MESSAGES,
    BenchError,
    Postfix,
    Relaygw,
    Results,
    Sample,
    Server,
    argument_parser,
    check_arguments,
    filesystem_type,
    find_tool,
    free_port,
    load_average,
    peak_rss_column,
    proc_status_kib,
    reset_peak_rss,
    run_load,
    running,
    table,
    tail,
    unwind_on_termination,
    wait_for,
    wait_for_banner,
)

RELAYGW_SINK_ADDRESS = "127.0.0.73"
POSTFIX_SINK_ADDRESS = "127.0.0.74"
LARGE_BODY_BYTES = 1024 * 1024
LARGE_SESSIONS = "1,10"
# The Postfix parameters that shape relaying to the sink, printed as in effect.
POSTFIX_SETTINGS = (
    "relayhost", "relay_transport", "default_destination_concurrency_limit",
    "relay_destination_concurrency_limit", "initial_destination_concurrency",
    "default_process_limit", "smtp_connection_cache_on_demand", "smtp_tls_security_level",
    "message_size_limit",
)
COUNTER = re.compile(rb"mesg=(\d+)")


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


def relay_relaygw(workdir: Path, sink: Sink) -> Relaygw:
    """relaygw relaying the bench domain to the sink; [queue] left at its defaults."""
    return Relaygw(workdir, sink.hop,
                   route_note=' (smtp-sink), tls = "none"; [queue] defaults: '
                              'concurrency 100, per_destination 10')


def relay_postfix(workdir: Path, sink: Sink) -> Postfix:
    """A private Postfix relaying the bench domain to the sink."""
    return Postfix(workdir, sink.hop, extra_main_cf=["smtp_tls_security_level = none"],
                   route_note=" (smtp-sink), smtp_tls_security_level none")


def pending(server: Server) -> int:
    """Messages still in the server's queue (cheap: no CLI)."""
    if isinstance(server, Relaygw):
        return server.spooled()
    return server.queued() or 0


def server_pid(server: Server) -> int | None:
    return server.pid if isinstance(server, Relaygw) else None


# --------------------------------------------------------------------------- measuring


@dataclass
class Run:
    """One end-to-end run."""

    sample: Sample
    accepted: float  # seconds until smtp-source was done (all accepted)
    delivered: float  # seconds until the sink had the last message
    extra: int  # messages the sink got beyond the count (duplicates, bounces)


def measure(smtp_source: str, server: Server, sink: Sink, count: int, sessions: int,
            body_bytes: int) -> Run:
    """One run: settle, load, wait for the sink, settle; rate, CPU and peak RSS."""
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
    run_load(smtp_source, server, count, sessions, body_bytes)
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
    sample = Sample(rate=count / delivered, cpu_per_msg=cpu / count, peak_rss_kib=peak)
    return Run(sample, accepted, delivered, sink.count - base - count)


def run_scenario(title: str, smtp_source: str, pairs: list[tuple[Server, Sink]], count: int,
                 sessions_list: list[int], runs: int, body_bytes: int) -> Results:
    """Interleaved runs of every server for each session count; one line per run."""
    results = Results()
    print(f"{title}: {count} messages per run, {runs} run(s)")
    for sessions in sessions_list:
        for run in range(runs):
            for server, sink in pairs:  # interleaved, so drift hits both alike
                r = measure(smtp_source, server, sink, count, sessions, body_bytes)
                results.add(server.name, sessions, r.sample)
                rss = (f", peak RSS {r.sample.peak_rss_kib / 1024:.0f} MiB"
                       if r.sample.peak_rss_kib is not None else "")
                extra = f", {r.extra} EXTRA message(s) at the sink" if r.extra else ""
                print(f"  {server.name:8} sessions={sessions:<3} run {run + 1}: "
                      f"{r.sample.rate:7.1f} msg/s end to end, "
                      f"{r.sample.cpu_per_msg * 1000:6.2f} ms CPU/msg (all accepted at "
                      f"{r.accepted:.2f}s, last delivered at {r.delivered:.2f}s{rss}{extra})",
                      flush=True)
    return results


# --------------------------------------------------------------------------- report


def report_logs(servers: list[Server]) -> None:
    """Deferrals, bounces and errors the servers logged during the whole benchmark."""
    for server in servers:
        if isinstance(server, Relaygw):
            outcomes = {kind: server.log_lines(f"status={kind} ")
                        for kind in ("delivered", "deferred", "bounced", "expired")}
            problems = server.errors() + server.log_lines("unreachable", "#warn]")
        elif isinstance(server, Postfix):
            outcomes = {kind: server.log_lines(f"status={kind}")
                        for kind in ("sent", "deferred", "bounced")}
            problems = server.log_lines("warning:", "fatal:", "panic:", "error:")
        else:
            continue
        counts = ", ".join(f"{kind} {len(lines)}" for kind, lines in outcomes.items())
        print(f"{server.name} log: {counts}")
        for kind, lines in outcomes.items():
            if kind not in ("delivered", "sent") and lines:
                print(f"WARNING: {server.name} logged {len(lines)} {kind}, e.g. "
                      f"{lines[0][:300]}")
        if problems:
            print(f"WARNING: {server.name} logged {len(problems)} warning/error line(s), "
                  f"e.g. {problems[0][:300]}")


def print_settings(servers: list[Server]) -> None:
    """What shapes relaying: relaygw's queue defaults, Postfix's parameters in effect."""
    for server in servers:
        if isinstance(server, Postfix):
            values = server.postconf(*POSTFIX_SETTINGS)
            print("  postfix settings: " + ", ".join(
                f"{name} = {values.get(name, '?')}" for name in POSTFIX_SETTINGS))


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argument_parser(__doc__ or "", "10,50")
    p.add_argument("--large", action="store_true",
                   help=f"also relay {LARGE_BODY_BYTES // 1024} KiB messages at "
                        f"{LARGE_SESSIONS} sessions, with relaygw's peak RSS")
    p.add_argument("--large-count", type=int, default=100,
                   help="messages per run of the --large scenario (default 100)")
    args = p.parse_args(argv)
    check_arguments(p, args)
    if args.quick:
        args.large_count = min(args.large_count, 10)
    if args.large_count < 1:
        p.error("--large-count must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; 0 on success, 1 on a failure, 130 on interruption."""
    args = parse_args(argv)
    smtp_source = find_tool("smtp-source")
    if smtp_source is None or find_tool("smtp-sink") is None:
        print("relay.py: smtp-source and smtp-sink not found (Debian package 'postfix')",
              file=sys.stderr)
        return 1
    use_postfix = not args.no_postfix
    if use_postfix:
        reason = Postfix.available()
        if reason:
            print(f"relay.py: skipping Postfix: {reason}", file=sys.stderr)
            use_postfix = False
    unwind_on_termination()

    args.workdir.mkdir(parents=True, exist_ok=True)
    top = Path(tempfile.mkdtemp(prefix="relaygw-bench-", dir=args.workdir))
    fs_type = filesystem_type(top)
    try:
        with contextlib.ExitStack() as stack:
            # Sinks first: they stop last, after the servers QUIT their cached sessions.
            pairs: list[tuple[Server, Sink]] = []
            makers: list[tuple[str, str, Callable[[Path, Sink], Server]]] = []
            if not args.no_relaygw:
                makers.append(("relaygw", RELAYGW_SINK_ADDRESS, relay_relaygw))
            if use_postfix:
                makers.append(("postfix", POSTFIX_SINK_ADDRESS, relay_postfix))
            for name, address, make in makers:
                (top / name).mkdir()
                sink = stack.enter_context(running(Sink(top, address, name)))
                server = stack.enter_context(running(make(top / name, sink)))
                pairs.append((server, sink))
            servers = [server for server, _ in pairs]
            print(f"end-to-end relay: {BODY_BYTES}-byte bodies (+~130 bytes of headers) from "
                  f"smtp-source, one connection per message, relayed to smtp-sink; "
                  f"{args.runs} run(s), {os.cpu_count()} CPU(s) shared by load, server and "
                  f"sink")
            print("a run lasts from the start of smtp-source until the sink has the run's "
                  "last message")
            print(f"load average before: {load_average()}")
            print(f"spool on {fs_type} ({top})"
                  + ("  WARNING: tmpfs, fsync is free here" if fs_type == "tmpfs" else ""))
            for server, sink in pairs:
                print(f"  {server.describe()}")
                print(f"  {sink.describe()}")
            print_settings(servers)
            for server, sink in pairs:  # warm-up: imports, process pools, first connections
                base = sink.count
                sink.expect(base + WARMUP_MESSAGES)
                run_load(smtp_source, server, WARMUP_MESSAGES, 1)
                if sink.wait(60) is None:
                    raise BenchError(f"{server.name}: the warm-up messages did not reach the "
                                     f"sink in 60s ({sink.count - base} did); log:\n"
                                     f"{tail(server.log)}")
            results = run_scenario("4 KiB messages", smtp_source, pairs, args.count,
                                   args.sessions_list, args.runs, BODY_BYTES)
            large: Results | None = None
            large_sessions = [int(s) for s in LARGE_SESSIONS.split(",")]
            if args.large:
                large = run_scenario(f"{LARGE_BODY_BYTES // 1024} KiB messages", smtp_source,
                                     pairs, args.large_count, large_sessions, args.runs,
                                     LARGE_BODY_BYTES)
            print(f"load average after: {load_average()} (other work on the machine skews "
                  f"the figures; the ratio less so, runs are interleaved)")
            print()
            names = [s.name for s in servers]
            print("end to end, messages/second, median (min-max); server CPU ms per message "
                  "(accept, queue, relay)")
            print(table(results, names, args.sessions_list))
            if large is not None:
                print()
                print(f"{LARGE_BODY_BYTES // 1024} KiB messages, {args.large_count} per run: "
                      f"end to end, messages/second; relaygw peak RSS (VmHWM, reset before "
                      f"each run)")
                print(table(large, names, large_sessions,
                            {"relaygw": [("peak RSS MiB", peak_rss_column)]}))
            for server in servers:
                queued = server.queued()
                if queued:
                    print(f"WARNING: {server.name} queue still holds {queued} message(s)")
                elif queued == 0:
                    print(f"{server.name}: queue empty, every message delivered")
            report_logs(servers)
    except BenchError as e:
        print(f"relay.py: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("relay.py: interrupted; servers stopped", file=sys.stderr)
        return 130
    finally:
        if args.keep:
            print(f"kept {top}", file=sys.stderr)
        else:
            shutil.rmtree(top, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
