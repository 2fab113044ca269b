"""``pytest --cpu-durations`` (tests/support/cpu_durations.py) counts a test's subprocesses and not
its waiting, in one process and under pytest-xdist."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.support.workflow import REPO

SUITE = textwrap.dedent(
    """
    import subprocess, sys, time

    BURN = "import time\\nt = time.process_time()\\nwhile time.process_time() - t < 1.0:\\n    pass"

    def test_burns_in_a_subprocess():
        subprocess.run([sys.executable, "-c", BURN], check=True)

    def test_waits():
        time.sleep(1.0)
    """
)


@pytest.mark.parametrize("workers", [[], ["-n", "2"]], ids=["one process", "xdist"])
def test_a_test_counts_its_subprocesses_cpu_and_not_its_waiting(tmp_path: Path, workers: list[str]) -> None:
    (tmp_path / "conftest.py").write_text('pytest_plugins = ["tests.support.cpu_durations"]\n')
    (tmp_path / "test_generated.py").write_text(SUITE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--cpu-durations=0", *workers, "."],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    seconds = {m[2]: float(m[1]) for m in re.finditer(r"^\s*([\d.]+)s \S*::(test_\w+)$", proc.stdout, re.M)}
    assert set(seconds) == {"test_burns_in_a_subprocess", "test_waits"}, proc.stdout
    assert seconds["test_burns_in_a_subprocess"] >= 1.0, proc.stdout
    assert seconds["test_waits"] < 0.5, proc.stdout
    assert re.search(r"^\s*[\d.]+s in all, 2 tests$", proc.stdout, re.M), proc.stdout
