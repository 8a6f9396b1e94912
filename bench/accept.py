#!/usr/bin/env python3
"""Durable accept throughput of relaygw, next to a private Postfix instance.

Both servers get the same load from Postfix's ``smtp-source``: 4 KiB message
bodies, one SMTP connection per message, N sessions in parallel. Both relay
the bench domain to a next hop that is down (127.0.0.1:1), so every accepted
message stays spooled and the figure measures accept (fsynced queue write)
plus the deferral it causes (a refused connection, or none while the dead
next hop is suspended), not delivery.

Run from the repository root::

    .venv/bin/python bench/accept.py                  # 1000 msgs, 1/10/50 sessions, 3 runs
    .venv/bin/python bench/accept.py --quick          # a few seconds, for a smoke test
    .venv/bin/python bench/accept.py --no-postfix     # relaygw only

The Postfix instance is private: its own main.cf/master.cf, queue and data
directories in a temporary directory, started with ``postfix -c DIR``; the
system's /etc/postfix is read but never changed. It needs root (mail_owner
``postfix``, setgid_group ``postdrop``, as installed by the Debian package).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

from _common import (
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
    load_average,
    run_load,
    running,
    table,
    unwind_on_termination,
)

DEAD_NEXT_HOP = ("127.0.0.1", 1)


def accept_relaygw(workdir: Path) -> Relaygw:
    """relaygw relaying the bench domain to the dead next hop, retrying hourly."""
    return Relaygw(workdir, DEAD_NEXT_HOP, queue=['retry_schedule = ["1h"]', 'max_age = "5d"'],
                   route_note=" (down: messages stay spooled), retry_schedule 1h")


def accept_postfix(workdir: Path) -> Postfix:
    """A private Postfix relaying the bench domain to the dead next hop."""
    return Postfix(workdir, DEAD_NEXT_HOP, route_note=" (down: messages stay queued)")


def measure(smtp_source: str, server: Server, count: int, sessions: int) -> Sample:
    """One run: settle, load, settle; the rate and the CPU per message it cost."""
    server.settle()
    cpu_before = server.cpu_seconds()
    elapsed = run_load(smtp_source, server, count, sessions)
    # The CPU figure includes the deferral work the messages caused after the run.
    server.settle()
    cpu = server.cpu_seconds() - cpu_before
    return Sample(rate=count / elapsed, cpu_per_msg=cpu / count)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argument_parser(__doc__ or "", "1,10,50")
    args = p.parse_args(argv)
    check_arguments(p, args)
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; 0 on success, 1 on a failure, 130 on interruption."""
    args = parse_args(argv)
    smtp_source = find_tool("smtp-source")
    if smtp_source is None:
        print("accept.py: smtp-source not found (Debian package 'postfix')", file=sys.stderr)
        return 1
    use_postfix = not args.no_postfix
    if use_postfix:
        reason = Postfix.available()
        if reason:
            print(f"accept.py: skipping Postfix: {reason}", file=sys.stderr)
            use_postfix = False
    unwind_on_termination()

    args.workdir.mkdir(parents=True, exist_ok=True)
    top = Path(tempfile.mkdtemp(prefix="relaygw-bench-", dir=args.workdir))
    fs_type = filesystem_type(top)
    results = Results()
    try:
        with contextlib.ExitStack() as stack:
            servers: list[Server] = []
            if not args.no_relaygw:
                (top / "relaygw").mkdir()
                servers.append(stack.enter_context(running(accept_relaygw(top / "relaygw"))))
            if use_postfix:
                (top / "postfix").mkdir()
                servers.append(stack.enter_context(running(accept_postfix(top / "postfix"))))
            print(f"durable accept: {BODY_BYTES}-byte bodies (+~130 bytes of headers) from "
                  f"smtp-source, one connection per message, {args.count} messages per run, "
                  f"{args.runs} run(s), {os.cpu_count()} CPU(s) shared by load and server")
            print(f"load average before: {load_average()}")
            print(f"spool on {fs_type} ({top})"
                  + ("  WARNING: tmpfs, fsync is free here" if fs_type == "tmpfs" else ""))
            for server in servers:
                print(f"  {server.describe()}")
            for server in servers:  # warm-up: imports, process pools, first deferral
                run_load(smtp_source, server, WARMUP_MESSAGES, 1)
            sent = dict.fromkeys((s.name for s in servers), WARMUP_MESSAGES)
            for sessions in args.sessions_list:
                for run in range(args.runs):
                    for server in servers:  # interleaved, so drift hits both alike
                        sample = measure(smtp_source, server, args.count, sessions)
                        sent[server.name] += args.count
                        results.add(server.name, sessions, sample)
                        print(f"  {server.name:8} sessions={sessions:<3} run {run + 1}: "
                              f"{sample.rate:7.1f} msg/s, "
                              f"{sample.cpu_per_msg * 1000:6.2f} ms CPU/msg", flush=True)
            print(f"load average after: {load_average()} (other work on the machine skews "
                  f"the figures; the ratio less so, runs are interleaved)")
            print()
            print("messages/second, median (min-max); server CPU ms per message "
                  "(includes deferring the message)")
            print(table(results, [s.name for s in servers], args.sessions_list))
            for server in servers:
                queued = server.queued()
                if queued is not None and queued != sent[server.name]:
                    print(f"WARNING: {server.name} queue holds {queued} messages, "
                          f"{sent[server.name]} were accepted")
                elif queued is not None:
                    print(f"{server.name}: all {queued} accepted messages are in its queue")
                else:
                    print(f"{server.name}: queue not counted ({server.name}ctl queue list "
                          f"--json unavailable)")
                if isinstance(server, Relaygw):
                    errors = server.errors()
                    if errors:
                        print(f"WARNING: relaygw logged {len(errors)} error line(s), "
                              f"e.g. {errors[0][:200]}")
    except BenchError as e:
        print(f"accept.py: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("accept.py: interrupted; servers stopped", file=sys.stderr)
        return 130
    finally:
        if args.keep:
            print(f"kept {top}", file=sys.stderr)
        else:
            shutil.rmtree(top, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
