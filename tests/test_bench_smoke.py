"""Smoke test of bench/run.py: ``--quick`` runs every scenario (a-f) with small
counts and prints its tables with positive figures. It keeps the benchmark from
rotting; it times nothing (the figures go to the README, not into assertions).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RUN = REPO / "bench" / "run.py"


def have_tool(name: str) -> bool:
    """A Postfix tool on PATH or in /usr/sbin."""
    return shutil.which(name) is not None or os.access(f"/usr/sbin/{name}", os.X_OK)


WITH_POSTFIX = os.geteuid() == 0 and have_tool("postfix")

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not (have_tool("smtp-source") and have_tool("smtp-sink")),
                       reason="smtp-source/smtp-sink (Debian package postfix) not installed"),
]


@pytest.fixture(scope="module")
def output() -> str:
    """stdout of one ``bench/run.py --quick`` (with Postfix when it can run here)."""
    args = [] if WITH_POSTFIX else ["--no-postfix"]
    result = subprocess.run([sys.executable, str(RUN), "--quick", *args], cwd=REPO,
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result.stdout


Table = tuple[list[str], list[str], list[str]]  # header cells, row lines, notes below


def tables(output: str) -> dict[str, list[Table]]:
    """The result tables by their title's first word ("(a)", "(b)", ...), in order."""
    results = output.split("==== results ====", 1)[1]
    found: dict[str, list[Table]] = {}
    for block in results.strip().split("\n\n"):
        lines = block.splitlines()
        if len(lines) >= 4 and re.fullmatch(r"[- ]+", lines[2]):
            key = lines[0].split(" ", 1)[0]
            rows = [line for line in lines[3:] if not re.match(r"(per session|targets?)\b", line)]
            notes = [line for line in lines[3:] if line not in rows]
            found.setdefault(key, []).append((lines[1].split("  "), rows, notes))
    return found


def numbers(row: str) -> list[float]:
    return [float(cell) for cell in row.split() if re.fullmatch(r"-?\d+(\.\d+)?", cell)]


def test_throughput_tables(output: str) -> None:
    found = tables(output)
    sessions = {"(a)": [[1, 10, 50]], "(b)": [[10, 50]], "(c)": [[1, 10], [1, 10]]}
    for key, expected in sessions.items():
        assert [[int(numbers(r)[0]) for r in rows] for _, rows, _ in found[key]] == expected
        for _, rows, _ in found[key]:
            for row in rows:
                assert all(value > 0 for value in numbers(row)), row
                # sessions, msg/s, CPU (+ peak RSS); with Postfix its two and the ratio
                assert len(numbers(row)) >= (6 if WITH_POSTFIX else 3), row
    assert "relaygw: all 340 accepted messages are in its queue" in output
    assert "relaygw: queue empty, every message delivered" in output
    # 20 warm-up messages, then 100 at 10 and at 50 sessions, then 10 at 1 and at 10.
    assert "relaygw log: delivered 240, deferred 0," in output
    if WITH_POSTFIX:
        assert "postfix: queue empty, every message delivered" in output
        assert "postfix log: sent 240, deferred 0," in output


def test_cpu_table(output: str) -> None:
    [(_, rows, _)] = tables(output)["(f)"]
    assert len(rows) == 3 + 2 + 2 + 2
    for row in rows:
        values = numbers(row)
        assert len(values) == (4 + 1 if WITH_POSTFIX else 2 + 1), row  # "4 KiB" counts too
        assert all(value > 0 for value in values), row


def test_idle_table(output: str) -> None:
    [(_, rows, notes)] = tables(output)["(d)"]
    relaygw = next(row for row in rows if row.split()[0] == "relaygw")
    sessions, rss_before, rss = numbers(relaygw)[:3]
    assert sessions == 1000 and rss_before > 0 and rss > 0
    if WITH_POSTFIX:
        postfix = next(row for row in rows if row.split()[0] == "postfix")
        values = numbers(postfix)
        assert values[0] == 50 and all(value > 0 for value in values), postfix
        assert any(note.startswith("per session, relaygw/postfix") for note in notes)
    assert any(note.startswith("target: 10000 idle sessions") for note in notes)


def test_spool_table(output: str) -> None:
    [(_, [row], notes)] = tables(output)["(e)"]
    messages, banner, loaded, resumed, attempted, rss, peak, idle_cpu, stop = numbers(row)
    assert messages == 2000 and attempted == 2000
    assert 0 < banner and 0 < loaded <= resumed
    assert rss > 0 and peak >= rss and idle_cpu >= 0 and stop >= 0  # a quick exit prints 0.00
    assert notes and notes[0].startswith("targets (judged at 2000")
