"""Smoke test of bench/accept.py: a quick run prints a table with positive rates."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "accept.py"



def have_tool(name: str) -> bool:
    """A Postfix tool on PATH or in /usr/sbin."""
    return shutil.which(name) is not None or os.access(f"/usr/sbin/{name}", os.X_OK)


pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not have_tool("smtp-source"),
                       reason="smtp-source (Debian package postfix) is not installed"),
]


def run_bench(*args: str) -> str:
    """Run accept.py --quick with ``args``; its stdout (fails the test on non-zero exit)."""
    result = subprocess.run([sys.executable, str(SCRIPT), "--quick", *args],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result.stdout


def table_rows(output: str) -> list[list[str]]:
    """The table's data rows (after the dashed rule), split on whitespace."""
    lines = output.splitlines()
    rule = next(i for i, line in enumerate(lines) if re.fullmatch(r"[- ]+", line) and "-" in line)
    rows = []
    for line in lines[rule + 1:]:
        if not re.match(r"\s*\d+\s", line):
            break
        rows.append(line.split())
    return rows


def test_quick_relaygw_only() -> None:
    output = run_bench("--no-postfix")
    assert "relaygw msg/s" in output
    rows = table_rows(output)
    assert [int(r[0]) for r in rows] == [1, 10, 50]
    for row in rows:
        assert float(row[1]) > 0, output


@pytest.mark.skipif(os.geteuid() != 0 or not have_tool("postfix"),
                    reason="a private Postfix instance needs root and postfix")
def test_quick_with_postfix() -> None:
    output = run_bench("--sessions", "1,10")
    assert "postfix msg/s" in output
    assert "relaygw/postfix" in output
    rows = table_rows(output)
    assert [int(r[0]) for r in rows] == [1, 10]
    for row in rows:
        relaygw, postfix, ratio = float(row[1]), float(row[3]), float(row[5])
        assert relaygw > 0 and postfix > 0 and ratio > 0, output
