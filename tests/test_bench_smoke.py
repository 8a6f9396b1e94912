"""Smoke tests of bench/accept.py and bench/relay.py: a quick run prints a table
with positive rates."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ACCEPT = REPO / "bench" / "accept.py"
RELAY = REPO / "bench" / "relay.py"


def have_tool(name: str) -> bool:
    """A Postfix tool on PATH or in /usr/sbin."""
    return shutil.which(name) is not None or os.access(f"/usr/sbin/{name}", os.X_OK)


pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not have_tool("smtp-source"),
                       reason="smtp-source (Debian package postfix) is not installed"),
]

needs_postfix = pytest.mark.skipif(os.geteuid() != 0 or not have_tool("postfix"),
                                   reason="a private Postfix instance needs root and postfix")
needs_sink = pytest.mark.skipif(not have_tool("smtp-sink"),
                                reason="smtp-sink (Debian package postfix) is not installed")


def run_bench(script: Path, *args: str) -> str:
    """Run ``script --quick`` with ``args``; its stdout (fails the test on non-zero exit)."""
    result = subprocess.run([sys.executable, str(script), "--quick", *args],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result.stdout


def table_rows(output: str) -> list[list[str]]:
    """The first table's data rows (after the dashed rule), split on whitespace."""
    lines = output.splitlines()
    rule = next(i for i, line in enumerate(lines) if re.fullmatch(r"[- ]+", line) and "-" in line)
    rows = []
    for line in lines[rule + 1:]:
        if not re.match(r"\s*\d+\s", line):
            break
        rows.append(line.split())
    return rows


def test_quick_relaygw_only() -> None:
    output = run_bench(ACCEPT, "--no-postfix")
    assert "relaygw msg/s" in output
    rows = table_rows(output)
    assert [int(r[0]) for r in rows] == [1, 10, 50]
    for row in rows:
        assert float(row[1]) > 0, output


@needs_postfix
def test_quick_with_postfix() -> None:
    output = run_bench(ACCEPT, "--sessions", "1,10")
    assert "postfix msg/s" in output
    assert "relaygw/postfix" in output
    rows = table_rows(output)
    assert [int(r[0]) for r in rows] == [1, 10]
    for row in rows:
        relaygw, postfix, ratio = float(row[1]), float(row[3]), float(row[5])
        assert relaygw > 0 and postfix > 0 and ratio > 0, output


@needs_sink
def test_relay_quick_relaygw_only() -> None:
    output = run_bench(RELAY, "--no-postfix")
    assert "relaygw msg/s" in output
    assert "PIPELINING" in output  # the sink offers it, as checked at start-up
    rows = table_rows(output)
    assert [int(r[0]) for r in rows] == [10, 50]
    for row in rows:
        assert float(row[1]) > 0 and float(row[2]) > 0, output
    assert "relaygw: queue empty, every message delivered" in output
    # 20 warm-up messages and a run of 100 at each of the 2 session counts.
    assert "relaygw log: delivered 220, deferred 0," in output, output


@needs_sink
@needs_postfix
def test_relay_quick_with_postfix() -> None:
    output = run_bench(RELAY, "--sessions", "10")
    assert "relaygw/postfix" in output
    assert "default_destination_concurrency_limit = " in output
    rows = table_rows(output)
    assert [int(r[0]) for r in rows] == [10]
    relaygw, postfix, ratio = float(rows[0][1]), float(rows[0][3]), float(rows[0][5])
    assert relaygw > 0 and postfix > 0 and ratio > 0, output
    assert "postfix: queue empty, every message delivered" in output
    # 20 warm-up messages and one run of 100, each delivered once, none deferred.
    assert "relaygw log: delivered 120, deferred 0," in output, output
    assert "postfix log: sent 120, deferred 0," in output, output
