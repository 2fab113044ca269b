"""Helpers of the tests that run the workflow: a copy of the checkout, the environment jobs get, and
real Snakemake and make runs in it (imported by tests/conftest.py's fixtures and by tests)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def copy_workflow(dest: Path) -> Path:
    """Copy the tracked workflow files (no results, no data) to ``dest``, as a fresh clone would have,
    and the package's byte-compiled modules, as ``make setup`` leaves them (they stay valid: a copy
    keeps its source file's size and modification time, which Python checks)."""
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
    for compiled in (REPO / "src").glob("**/__pycache__/*.pyc"):
        source_dir = dest / compiled.parent.parent.relative_to(REPO)
        if source_dir.is_dir():
            (source_dir / "__pycache__").mkdir(exist_ok=True)
            shutil.copy2(compiled, source_dir / "__pycache__" / compiled.name)
    return dest


def job_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for subprocesses: this interpreter's bin first on PATH, no stray tracking URI."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("DASK_SCHEDULER_ADDRESS", None)
    for name in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS", "MAKEOVERRIDES"):  # under `make test`: a user's make
        env.pop(name, None)
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


def shared_run(tmp_path_factory, worker_id: str, name: str, build) -> Path:
    """A pipeline run that every test of the session reads, built once: ``build(wf)`` in a fresh
    workflow copy ``wf``. Under pytest-xdist (``make test`` runs three workers) the first worker to
    need it builds it under a file lock in the session's shared temporary folder and the others
    wait for it; a build that failed is not reused (every worker that needs it fails)."""
    if worker_id == "master":  # one process: a session temporary folder of its own
        wf = copy_workflow(tmp_path_factory.mktemp(name) / "wf")
        build(wf)
        return wf
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp().parent  # shared by the session's workers
    wf, done, failed = root / name / "wf", root / name / "complete", root / name / "failed"
    with FileLock(str(root / f"{name}.lock")):
        if failed.exists():
            pytest.fail(f"the shared {name} run failed in another worker: {failed.read_text()[:3000]}")
        if not done.exists():
            shutil.rmtree(wf.parent, ignore_errors=True)
            copy_workflow(wf)
            try:
                build(wf)
            except BaseException as exc:
                failed.write_text(str(exc))
                raise
            done.touch()
    return wf


def run_make(cwd: Path, *args: str, timeout: int = 1500, env: dict[str, str] | None = None):
    """Run ``make <args>`` in ``cwd`` (a workflow copy whose ``.venv`` is this environment, see
    :func:`link_environment`); fail with its output on error."""
    proc = subprocess.run(
        ["make", *args], cwd=cwd, capture_output=True, text=True, env=env or job_env(), timeout=timeout
    )
    if proc.returncode != 0:
        pytest.fail(f"make {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-5000:]}\n{proc.stderr[-5000:]}")
    return proc


def link_environment(wf: Path) -> None:
    """Make this test environment the ``.venv`` of the workflow copy ``wf``, as ``make setup`` left it
    in the checkout: the README's ``make`` commands then run as written, without setting up again.
    Fails when ``make setup`` would install again (pyproject.toml or the lock changed since)."""
    (wf / ".venv").symlink_to(Path(sys.prefix), target_is_directory=True)
    if subprocess.run(["make", "-q", ".venv/.installed"], cwd=wf).returncode != 0:
        pytest.fail(f"{sys.prefix} is older than pyproject.toml or requirements/lock.txt: run `make setup` first")


def dry_run(wf: Path, configfile: Path, *targets: str) -> str:
    """What `snakemake --dry-run [targets]` prints."""
    exe = Path(sys.executable).parent / "snakemake"
    proc = subprocess.run(
        [str(exe), *targets, "-n", "--cores", "2", "--configfile", str(configfile)],
        cwd=wf,
        capture_output=True,
        text=True,
        env=job_env(),
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    return out


def planned_rules(wf: Path, configfile: Path, *targets: str) -> set[str]:
    """The rules `snakemake --dry-run [targets]` would run (its job stats table), without `all`."""
    out = dry_run(wf, configfile, *targets)
    if "Nothing to be done" in out:
        return set()
    table = out[out.index("Job stats:") :]
    rules = set()
    for line in table.splitlines()[3:]:
        parts = line.split()
        if len(parts) != 2 or parts[0] == "total":
            break
        rules.add(parts[0])
    return rules - {"all"}


def model_state(path: Path) -> dict:
    """The weights of a checkpoint (``model_state``), read as the project reads them: weights only."""
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)["model_state"]


def same_weights(a: Path, b: Path) -> bool:
    """Whether two checkpoints hold the same weights, bit for bit."""
    import torch

    sa, sb = model_state(a), model_state(b)
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
