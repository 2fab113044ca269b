"""Shared fixtures. Test data is generated in the tests (tiny, seeded); nothing is downloaded."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import conv2dlstm  # noqa: F401  (sets OMP_WAIT_POLICY before any test module imports torch)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def snakemake_exe() -> str:
    exe = Path(sys.executable).parent / "snakemake"
    if exe.exists():
        return str(exe)
    found = shutil.which("snakemake")
    if found is None:
        pytest.fail("snakemake is not installed in the test environment; run `make test`")
    return found


def copy_workflow(dest: Path) -> Path:
    """Copy the tracked workflow files (no results, no data) to ``dest``, as a fresh clone would have."""
    files = (
        subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=REPO,
            check=True,
            capture_output=True,
        )
        .stdout.decode()
        .split("\0")
    )
    for rel in filter(None, files):
        src = REPO / rel
        if not src.exists() or src.is_dir():
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            os.symlink(os.readlink(src), target)
        else:
            shutil.copy2(src, target)
    return dest


@pytest.fixture
def workflow_copy(tmp_path: Path) -> Path:
    """A temporary copy of the workflow to run Snakemake in."""
    return copy_workflow(tmp_path / "wf")


def job_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for subprocesses: this interpreter's bin first on PATH, no stray tracking URI."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("DASK_SCHEDULER_ADDRESS", None)
    env.setdefault("PYTHONUNBUFFERED", "1")
    if extra:
        env.update(extra)
    return env


def run_snakemake(cwd: Path, *args: str, timeout: int = 1500, env: dict[str, str] | None = None):
    """Run the real ``snakemake`` of this environment in ``cwd``; fail with its output on error."""
    exe = Path(sys.executable).parent / "snakemake"
    cmd = [str(exe) if exe.exists() else "snakemake", *args]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env or job_env(), timeout=timeout)
    if proc.returncode != 0:
        logs = "\n".join(
            f"--- {p.relative_to(cwd)}\n{p.read_text()[-3000:]}" for p in sorted(cwd.glob("results/**/logs/**/*.log"))
        )
        pytest.fail(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-5000:]}\n{proc.stderr[-5000:]}\n{logs}"
        )
    return proc


TINY = REPO / "tests/configs/tiny.yaml"


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A workflow copy in which the tiny pipeline (``tests/configs/tiny.yaml``, as ``tiny.yaml``) ran
    to completion. Shared by the rerun and forecast tests; a test that changes it works on a copy."""
    wf = copy_workflow(tmp_path_factory.mktemp("tiny") / "wf")
    shutil.copy(TINY, wf / "tiny.yaml")
    run_snakemake(wf, "--cores", "2", "--configfile", "tiny.yaml")
    return wf


@pytest.fixture(scope="session")
def local_default_run(tmp_path_factory) -> Path:
    """A workflow copy in which the whole default pipeline ran locally (``snakemake --cores 2``),
    shared by the end-to-end tests of the default configuration."""
    wf = copy_workflow(tmp_path_factory.mktemp("default") / "wf")
    run_snakemake(wf, "--cores", "2")
    return wf
