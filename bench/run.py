#!/usr/bin/env python3
"""The relaygw benchmark: every scenario of the performance issue, one command.

Scenarios (``--only`` takes a comma-separated list of their names):

  accept  (a) durable accept, 4 KiB bodies, 1/10/50 sessions
  e2e     (b) end to end: accept, spool, relay to smtp-sink; 4 KiB, 10/50 sessions
  large   (c) 1 MiB bodies, 1/10 sessions, accept and end to end, relaygw's peak RSS
  idle    (d) 10,000 idle sessions held open: relaygw's RSS; Postfix's at 1,000
  spool   (e) restart on a spool of 100,000 queued messages (next hop down): time to
              greet and to resume, RSS, CPU while idle
  (f), CPU milliseconds per message of the server, is a table of its own for a-c.

relaygw runs under ``twistd -n relaygw`` with a generated config; Postfix, where
installed (and as root), as a private instance (``postfix -c DIR`` in a temporary
directory; /etc/postfix is never changed) measured in the same run, interleaved.
Postfix's ``smtp-source`` is the load generator for both; ``smtp-sink`` the next
hop end to end. Each figure is the median of ``--runs`` runs with (min-max).
See bench/throughput.py, bench/idle.py and bench/bigspool.py for what each
scenario measures exactly.

Run from the repository root::

    .venv/bin/python bench/run.py                     # everything, 3 runs (15-20 minutes)
    .venv/bin/python bench/run.py --only accept,e2e   # some scenarios
    .venv/bin/python bench/run.py --quick             # small counts, 1 run: a smoke test
    .venv/bin/python bench/run.py --no-postfix        # relaygw only
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import (
    BenchError,
    Postfix,
    Settings,
    filesystem_type,
    find_tool,
    load_average,
    unwind_on_termination,
)
from bigspool import spool_phase, spool_table
from idle import idle_phase, idle_table
from throughput import Outcome, accept_phase, cpu_table, e2e_phase, outcome_table

SCENARIOS = ("accept", "e2e", "large", "idle", "spool")
REPO = Path(__file__).resolve().parent.parent
OUTCOME_ORDER = ["accept 4 KiB", "end to end 4 KiB", "accept 1 MiB", "end to end 1 MiB"]
# Option: (full run, --quick). An option given on the command line wins over both.
SIZES: dict[str, tuple[float, float]] = {
    "runs": (3, 1),
    "count": (1000, 100),
    "large_count": (100, 10),
    "idle_sessions": (10_000, 1000),
    "postfix_idle_sessions": (1000, 50),
    "spool_messages": (100_000, 2000),
    "idle_window": (30.0, 3.0),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0],
                                epilog="\n\n".join((__doc__ or "").split("\n\n")[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(SCENARIOS),
                   help=f"comma-separated scenarios (default: all of {','.join(SCENARIOS)})")
    p.add_argument("--quick", action="store_true",
                   help="small counts and one run: the smoke test (well under a minute)")
    p.add_argument("--runs", type=int, help="runs of each scenario (default 3; quick 1)")
    p.add_argument("--count", type=int,
                   help="4 KiB messages per run of accept and e2e (default 1000; quick 100)")
    p.add_argument("--large-count", type=int,
                   help="1 MiB messages per run of large (default 100; quick 10)")
    p.add_argument("--idle-sessions", type=int,
                   help="relaygw's idle sessions (default 10000; quick 1000)")
    p.add_argument("--postfix-idle-sessions", type=int,
                   help="Postfix's idle sessions, one process each (default 1000; quick 50)")
    p.add_argument("--spool-messages", type=int,
                   help="queued messages of the spool scenario (default 100000; quick 2000)")
    p.add_argument("--idle-window", type=float,
                   help="seconds of idle CPU measured in the spool scenario (default 30; "
                        "quick 3)")
    p.add_argument("--no-postfix", action="store_true", help="measure relaygw only")
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp"),
                   help="where the temporary spools go; must be a real disk for fsync to "
                        "mean anything (default /var/tmp)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = p.parse_args(argv)
    args.scenarios = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(args.scenarios) - set(SCENARIOS)
    if unknown or not args.scenarios:
        p.error(f"--only: choose among {', '.join(SCENARIOS)}")
    for name, (full, quick) in SIZES.items():
        if getattr(args, name) is None:
            setattr(args, name, type(full)(quick if args.quick else full))
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


# --------------------------------------------------------------------------- the header


def command_output(*command: str) -> str:
    """stdout of a command, stripped; empty if it fails."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        return subprocess.run(command, capture_output=True, text=True, timeout=30,
                              check=True).stdout.strip()
    return ""


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or "unknown CPU"


def memory_total() -> str:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB RAM"
    return "unknown RAM"


def header(top: Path) -> list[str]:
    """When, on what and with what the figures were measured."""
    fs_type = filesystem_type(top)
    revision = command_output("git", "-C", str(REPO), "rev-parse", "--short", "HEAD")
    if revision and command_output("git", "-C", str(REPO), "status", "--porcelain",
                                   "--untracked-files=no"):
        revision += ", with uncommitted changes"
    postconf = find_tool("postconf")
    postfix = (command_output(postconf, "-dh", "mail_version") if postconf else "") or "absent"
    try:
        relaygw = importlib.metadata.version("relaygw")
        twisted = importlib.metadata.version("twisted")
    except importlib.metadata.PackageNotFoundError:
        relaygw = twisted = "unknown"
    return [
        f"relaygw benchmark, {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}",
        f"machine: {os.cpu_count()} x {cpu_model()}, {memory_total()}, "
        f"{platform.system()} {platform.release()}",
        f"workdir: {top} on {fs_type}"
        + ("  WARNING: tmpfs, fsync is free here" if fs_type == "tmpfs" else ""),
        f"versions: relaygw {relaygw}" + (f" (git {revision})" if revision else "")
        + f", Python {platform.python_version()}, Twisted {twisted}, Postfix {postfix}",
        f"load average before: {load_average()}",
    ]


# --------------------------------------------------------------------------- main


def report(tables: list[str]) -> None:
    """The results: every table measured, then the load average."""
    if tables:
        print()
        print("==== results ====")
        for text in tables:
            print()
            print(text)
        print()
    print(f"load average after: {load_average()} (other work on the machine skews the "
          f"figures; the ratios less so, runs are interleaved)", flush=True)


def main(argv: list[str] | None = None) -> int:
    """Run the scenarios asked for; 0 on success, 1 on a failure, 130 on interruption."""
    args = parse_args(argv)
    smtp_source = find_tool("smtp-source")
    throughput = {"accept", "e2e", "large"} & set(args.scenarios)
    if throughput and smtp_source is None:
        print("run.py: smtp-source not found (Debian package 'postfix')", file=sys.stderr)
        return 1
    if {"e2e", "large"} & set(args.scenarios) and find_tool("smtp-sink") is None:
        print("run.py: smtp-sink not found (Debian package 'postfix')", file=sys.stderr)
        return 1
    use_postfix = not args.no_postfix
    if use_postfix and (reason := Postfix.available()):
        print(f"run.py: skipping Postfix: {reason}", file=sys.stderr)
        use_postfix = False
    unwind_on_termination()

    args.workdir.mkdir(parents=True, exist_ok=True)
    top = Path(tempfile.mkdtemp(prefix="relaygw-bench-", dir=args.workdir))
    cfg = Settings(top=top, smtp_source=smtp_source or "smtp-source", postfix=use_postfix,
                   runs=args.runs, count=args.count, large_count=args.large_count,
                   idle_sessions=args.idle_sessions,
                   postfix_idle_sessions=args.postfix_idle_sessions,
                   spool_messages=args.spool_messages, idle_window=args.idle_window)
    names = ["relaygw", "postfix"] if use_postfix else ["relaygw"]
    print("\n".join(header(top)))
    print(f"scenarios: {', '.join(args.scenarios)}; {cfg.runs} run(s) each", flush=True)
    tables: list[str] = []
    try:
        scenarios = set(args.scenarios)
        outcomes: list[Outcome] = []
        if {"accept", "large"} & scenarios:
            outcomes += accept_phase(cfg, "accept" in scenarios, "large" in scenarios)
        if {"e2e", "large"} & scenarios:
            outcomes += e2e_phase(cfg, "e2e" in scenarios, "large" in scenarios)
        outcomes.sort(key=lambda o: OUTCOME_ORDER.index(o.label))
        tables += [outcome_table(outcome, names) for outcome in outcomes]
        if outcomes:
            tables.append("(f) server CPU milliseconds per message (user+sys of all its "
                          "processes, until idle again), median (min-max); the ratio: lower "
                          "is better\n" + cpu_table(outcomes, names))
        if "idle" in scenarios:
            tables.append("(d) idle sessions held open: the server's memory, median "
                          "(min-max)\n" + idle_table(idle_phase(cfg)))
        if "spool" in scenarios:
            tables.append("(e) restart on a big spool, next hop down: seconds from process "
                          "start, median (min-max)\n"
                          + spool_table(spool_phase(cfg), cfg.spool_messages))
        report(tables)
    except BenchError as e:
        report(tables)
        print(f"run.py: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("run.py: interrupted; servers stopped", file=sys.stderr)
        return 130
    finally:
        if args.keep:
            print(f"kept {top}", file=sys.stderr)
        else:
            shutil.rmtree(top, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
