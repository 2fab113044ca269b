""".ci/run sets up once, then lints while the tests run: both always run, the lint's output is
shown, and either one failing fails CI. Run with ``make`` (and the packages CI installs) replaced by
commands that record their calls and exit with a chosen status."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.workflow import REPO

FAKE_MAKE = """#!/bin/sh
echo "$1" >> "$CALLS"
case "$1" in
  lint) echo "lint says: one finding"; exit "$LINT_STATUS" ;;
  test) sleep 0.2; echo "tests ran"; exit "$TEST_STATUS" ;;
esac
"""


@pytest.mark.parametrize(("lint_status", "test_status"), [(0, 0), (1, 0), (0, 2), (1, 2)])
def test_lint_and_tests_both_run_and_either_fails_ci(tmp_path: Path, lint_status: int, test_status: int) -> None:
    repo = tmp_path / "repo"
    (repo / ".ci").mkdir(parents=True)
    shutil.copy(REPO / ".ci" / "run", repo / ".ci" / "run")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "make").write_text(FAKE_MAKE)
    for tool in ("slurmctld", "munged", "chromium", "chromedriver"):  # present: nothing to install
        (bin_dir / tool).write_text("#!/bin/sh\nexit 0\n")
    for script in bin_dir.iterdir():
        script.chmod(0o755)
    calls = tmp_path / "calls"
    env = {
        "PATH": f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin",
        "CALLS": str(calls),
        "LINT_STATUS": str(lint_status),
        "TEST_STATUS": str(test_status),
    }
    proc = subprocess.run(["bash", ".ci/run"], cwd=repo, env=env, capture_output=True, text=True, timeout=60)
    assert (proc.returncode == 0) == (lint_status == 0 and test_status == 0), proc.stdout + proc.stderr
    made = calls.read_text().split()
    assert made[0] == "setup" and sorted(made[1:]) == ["lint", "test"], made
    assert "lint says: one finding" in proc.stdout and "tests ran" in proc.stdout
    assert f"make test: exit status {test_status}; make lint: exit status {lint_status}" in proc.stdout
