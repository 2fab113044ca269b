"""Shared fixtures. Test data is generated in the tests (tiny, seeded); nothing is downloaded. The
helpers that run the workflow are in tests/support/workflow.py."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

# The suite runs three workers on two cores by design (many tests wait on servers and subprocesses),
# so its processes and the pipelines they start often outnumber the cores: OpenMP threads that sleep
# at once keep each its share there, where the pipeline's brief spin costs (docs/performance.md,
# "Training on a shared CPU"; the environment still wins).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import conv2dlstm  # noqa: F401  (leaves the waiting above as it is, before any test module imports torch)
from conv2dlstm.evaluation import metrics
from tests.support import reference as _reference
from tests.support.cases import LAT, MASK, cube_shape, forecast_cube
from tests.support.workflow import REPO, TINY, copy_workflow, link_environment, run_make, run_snakemake, shared_run

pytest_plugins = [
    "tests.support.cpu_durations",  # pytest --cpu-durations=N
    "tests.support.order",  # the longest files first (E2E_FIRST)
]


@pytest.fixture(autouse=True)
def _no_exported_tracking_uri(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test starts without ``MLFLOW_TRACKING_URI``: ``mlflow.set_tracking_uri`` (which the train
    step calls) exports it into the process, and it wins over a configuration's store, so a later test
    of the same worker would log into an earlier test's store. A test that wants it sets it."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


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


@pytest.fixture
def workflow_copy(tmp_path: Path) -> Path:
    """A temporary copy of the workflow to run Snakemake in."""
    return copy_workflow(tmp_path / "wf")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, worker_id) -> Path:
    """A workflow copy in which the tiny pipeline (``tests/configs/tiny.yaml``, as ``tiny.yaml``) ran
    to completion. Shared by the rerun, forecast, SLURM, MLflow UI and tracking tests; a test that
    changes it works on a copy."""

    def build(wf: Path) -> None:
        shutil.copy(TINY, wf / "tiny.yaml")
        run_snakemake(wf, "--cores", "2", "--configfile", "tiny.yaml")

    return shared_run(tmp_path_factory, worker_id, "tiny", build)


@pytest.fixture(scope="session")
def local_default_run(tmp_path_factory, worker_id) -> Path:
    """A workflow copy in which the README's first command ran: ``make run`` (the whole default
    pipeline, ``snakemake --cores 2``, then the summary, whose output is kept in ``make-run.log``).
    Shared by the end-to-end tests of the default configuration; a test that changes it works on a
    copy."""

    def build(wf: Path) -> None:
        link_environment(wf)
        proc = run_make(wf, "run")
        (wf / "make-run.log").write_text(proc.stdout)

    return shared_run(tmp_path_factory, worker_id, "default", build)


# Small forecast cases (tests/support/cases.py), shared by the tests of scores, plots and evaluate


@pytest.fixture
def scored():
    """Model off by +1, persistence by +2, climatology by -4 everywhere on the ocean."""
    rng = np.random.default_rng(0)
    truth = forecast_cube(rng.normal(20, 3, size=cube_shape(n_var=2)), variables=("sst", "no3")).where(MASK)
    clim = truth - 4.0
    forecasts = {"model": truth + 1.0, "persistence": truth + 2.0, "climatology": clim}
    weights = metrics.area_weights(LAT, MASK)
    return _reference.score_forecasts(forecasts, truth, clim, weights)


@pytest.fixture
def forecast_set():
    """Model, persistence and climatology forecasts with land, NaN in the ocean and an undefined ACC."""
    rng = np.random.default_rng(7)
    shape = cube_shape(n=7, n_lead=3, n_var=2)
    clim = forecast_cube(rng.normal(20, 1, size=shape), variables=("sst", "no3"), n_lead=3).where(MASK)
    truth = (clim + rng.normal(0, 1, size=shape)).where(MASK)
    truth[4, 0, 0, 0, 0] = np.nan  # a missing observation in the ocean
    model = (truth + rng.normal(0.3, 0.5, size=shape)).where(MASK)
    model[2] = clim[2]  # zero anomalies at time 2: its ACC is undefined and left out of the mean
    persistence = (truth + rng.normal(0, 2, size=shape)).where(MASK)
    return {"model": model, "persistence": persistence, "climatology": clim}, truth, clim
