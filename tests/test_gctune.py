"""The garbage collector's settings: raised and frozen under twistd, left alone elsewhere."""

from __future__ import annotations

import gc
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from relaygw import gctune


@pytest.fixture
def restored_gc() -> Iterator[None]:
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


def test_tune_raises_the_young_threshold_and_freezes_what_exists(restored_gc: None) -> None:
    _, middle, oldest = gc.get_threshold()
    gc.unfreeze()
    gctune.tune()
    assert gc.get_threshold() == (gctune.YOUNG_THRESHOLD, middle, oldest)
    assert gc.get_freeze_count() > 0


SETTINGS_AFTER_MAKE_SERVICE = """
import gc
from twisted.application.app import ServerOptions
from relaygw import tap
options = tap.Options()
options.parseOptions([])
options.parent = {parent}
tap.makeService(options)
print(gc.get_threshold()[0], gc.get_freeze_count() > 0)
"""


@pytest.mark.parametrize(("parent", "expected"), [
    ("ServerOptions()", f"{gctune.YOUNG_THRESHOLD} True"),  # twistd relaygw
    ('{"nodaemon": True}', f"{gc.get_threshold()[0]} False"),  # a test or an embedding program
])
def test_make_service_tunes_the_collector_only_for_twistd(tmp_path: Path, parent: str,
                                                          expected: str) -> None:
    script = SETTINGS_AFTER_MAKE_SERVICE.format(parent=parent)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60, check=True, cwd=tmp_path)
    assert out.stdout.strip().splitlines()[-1] == expected
