"""The package's modules are byte-compiled by ``make setup`` and the tests' workflow copies keep them:
where ``PYTHONDONTWRITEBYTECODE`` is set, a job would otherwise compile every module it imports from
source (0.1-0.2 s of CPU per job, docs/performance.md)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.workflow import REPO, copy_workflow, job_env, run_make

MODULES = ("conv2dlstm.cli", "conv2dlstm.steps.train", "conv2dlstm.steps.evaluate")


def _sources_of_imports(wf: Path) -> dict[str, str]:
    """The package's modules that ``python -v`` imports from ``wf/src``, each with what its code
    object came from: its compiled file (``pyc``) or its source (``py``)."""
    proc = subprocess.run(
        [sys.executable, "-v", "-c", "; ".join(f"import {m}" for m in MODULES)],
        cwd=wf,
        env=job_env({"PYTHONPATH": str(wf / "src"), "PYTHONDONTWRITEBYTECODE": "1"}),
        capture_output=True,
        text=True,
        check=True,
    )
    package = re.escape(str(wf / "src" / "conv2dlstm"))
    loaded = {}
    for path in re.findall(rf"^# code object from '?({package}\S*?)'?$", proc.stderr, flags=re.M):
        source = Path(path)
        if source.suffix == ".pyc":  # <dir>/__pycache__/<name>.cpython-3xx.pyc
            source = source.parent.parent / (source.name.split(".")[0] + ".py")
        loaded[str(source.relative_to(wf / "src"))] = Path(path).suffix.lstrip(".")
    return loaded


def test_make_setup_compiles_the_package_and_workflow_copies_keep_it(tmp_path):
    if subprocess.run(["make", "-q", ".venv/.installed"], cwd=REPO, env=job_env()).returncode != 0:
        pytest.fail(f"{REPO}/.venv is older than pyproject.toml or requirements/lock.txt: run `make setup` first")
    run_make(REPO, "setup")  # installed already: compiles the package's changed modules only
    wf = copy_workflow(tmp_path / "wf")

    loaded = _sources_of_imports(wf)
    assert len(loaded) > 20 and "conv2dlstm/steps/evaluate.py" in loaded, loaded
    assert {name for name, kind in loaded.items() if kind != "pyc"} == set()

    # a changed module is compiled from its source again (Python checks the source's size and time)
    changed = wf / "src/conv2dlstm/errors.py"
    stat = changed.stat()
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 2_000_000_000))
    loaded = _sources_of_imports(wf)
    assert {name for name, kind in loaded.items() if kind != "pyc"} == {"conv2dlstm/errors.py"}
