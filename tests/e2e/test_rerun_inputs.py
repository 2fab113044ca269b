"""Reruns after the input data changes or a run is interrupted, with the real Snakemake on the tiny
pipeline (the planning of reruns after a changed key: tests/e2e/test_rerun.py).

- Fixing the input data after a complete run retrains from scratch, and the result equals a run
  on the fixed data in another directory, bit for bit (windows store, weights, metrics.csv).
- A run interrupted during training and rerun equals an uninterrupted one.
- The files of a ``files`` source are the fetch rule's inputs: a file replaced in place, added or
  removed reruns fetch.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import xarray as xr
import yaml

from conv2dlstm.fsutil import sha256_tree
from tests.support.changes import TINY, merge, tiny
from tests.support.workflow import copy_workflow, job_env, planned_rules, run_snakemake, same_weights

pytestmark = pytest.mark.e2e


def _corrupt(path: Path) -> None:
    """Make one raw daily file readable but wrong: +5 degrees everywhere."""
    import xarray as xr

    with xr.open_dataset(path) as ds:
        bad = ds.load()
    bad["sst"] = bad["sst"] + 5.0
    bad["sst"].attrs = ds["sst"].attrs
    bad["sst"].encoding = ds["sst"].encoding
    path.unlink()
    bad.to_netcdf(path)


def test_fixed_input_data_retrains_from_scratch_and_equals_a_fresh_run(tiny_run: Path, tmp_path: Path):
    """A second directory: first a run to the trained model on bad data, then the data is fixed and
    the pipeline rerun. Everything from fetch on is rebuilt, training starts from scratch, and the
    results equal those of tiny_run (the same config on good data) bit for bit."""
    wf = copy_workflow(tmp_path / "wf")
    shutil.copy(TINY, wf / "tiny.yaml")
    run_snakemake(wf, "synth", "--cores", "1", "--configfile", "tiny.yaml")
    raw = sorted((wf / "resources/synthetic/oisst").rglob("*.nc"))[40]  # a training day
    good = tmp_path / "good.nc"
    shutil.copy(raw, good)
    _corrupt(raw)
    run_snakemake(wf, "results/train/convlstm/model.pt", "--cores", "2", "--configfile", "tiny.yaml")
    bad_model = tmp_path / "bad-model.pt"
    shutil.copy(wf / "results/train/convlstm/model.pt", bad_model)
    assert not same_weights(bad_model, tiny_run / "results/train/convlstm/model.pt")

    # The data is fixed upstream. The fetched copy is deleted, as after any bad download (fetch
    # keeps verified copies), and the fetch forced: Snakemake cannot see into the source.
    shutil.copy(good, raw)
    fetched = wf / "resources/raw/oisst" / raw.name
    fetched.unlink()
    (fetched.parent / f".{raw.name}.sha256").unlink(missing_ok=True)
    proc = run_snakemake(wf, "--cores", "2", "--configfile", "tiny.yaml", "--forcerun", "fetch")
    out = proc.stdout + proc.stderr
    for rule in ("regrid", "normalize", "windows", "train", "evaluate"):
        assert f"rule {rule}:" in out, f"{rule} did not rerun"
    log = (wf / "results/logs/train/convlstm.log").read_text()
    assert "resuming" not in log.lower() and "starting fresh" in log.lower(), log[-3000:]

    # two directories, one config, the same data: identical windows, weights and metrics
    assert sha256_tree(wf / "results/windows/oisst.zarr") == sha256_tree(tiny_run / "results/windows/oisst.zarr")
    assert same_weights(wf / "results/train/convlstm/model.pt", tiny_run / "results/train/convlstm/model.pt")
    assert (wf / "results/evaluate/convlstm/metrics.csv").read_bytes() == (
        tiny_run / "results/evaluate/convlstm/metrics.csv"
    ).read_bytes()


def test_interrupted_training_rerun_equals_an_uninterrupted_run(tiny_run: Path, tmp_path: Path):
    wf = tmp_path / "wf"
    shutil.copytree(tiny_run, wf, symlinks=True)
    for out in ("results/train", "results/evaluate", "results/compare", "mlflow.db"):
        target = wf / out
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    exe = Path(sys.executable).parent / "snakemake"
    proc = subprocess.Popen(
        [str(exe), "--cores", "2", "--configfile", "tiny.yaml"],
        cwd=wf,
        env=job_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    history = wf / "results/train/convlstm/history.csv"
    deadline = time.monotonic() + 600
    while not (history.is_file() and len(history.read_text().splitlines()) >= 2):  # one epoch done
        assert proc.poll() is None and time.monotonic() < deadline, "training ended before it was interrupted"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)
    proc.communicate(timeout=300)
    assert not (wf / "results/train/convlstm/model.pt").exists()
    log = (wf / "results/logs/train/convlstm.log").read_text()
    assert "rerun resumes" in log.lower(), log[-3000:]

    run_snakemake(wf, "--cores", "2", "--configfile", "tiny.yaml")
    log = (wf / "results/logs/train/convlstm.log").read_text()
    assert "resuming" in log.lower(), log[-3000:]
    assert same_weights(wf / "results/train/convlstm/model.pt", tiny_run / "results/train/convlstm/model.pt")
    assert (wf / "results/evaluate/convlstm/metrics.csv").read_bytes() == (
        tiny_run / "results/evaluate/convlstm/metrics.csv"
    ).read_bytes()


def test_a_files_source_reruns_fetch_when_a_file_is_replaced_added_or_removed(tiny_run: Path, tmp_path: Path):
    """Data fixed in place reruns: with ``source.kind: files`` (no generation) a file replaced by
    another at the same path, a file added to the glob or one removed plans fetch again (and with it
    everything downstream); an untouched set plans nothing."""
    wf = tmp_path / "wf"
    shutil.copytree(tiny_run, wf, symlinks=True)
    data = wf / "mydata"
    data.mkdir()
    files = sorted((wf / "resources" / "synthetic").rglob("*.nc"))
    assert len(files) > 100, files[:3]
    for f in files:
        shutil.copy2(f, data / f.name)
    cfg = merge(tiny(), {"synthetic": {"kind": "none"}, "source": {"kind": "files", "paths": ["mydata/*.nc"]}})
    config = tmp_path / "files.yaml"
    config.write_text(yaml.safe_dump(cfg))
    manifest = "resources/raw/oisst/manifest.json"
    run_snakemake(wf, manifest, "--cores", "1", "--configfile", str(config))
    assert planned_rules(wf, config, manifest) == set()
    names = sorted(p.name for p in data.iterdir())
    time.sleep(1.1)  # a new modification time on file systems with 1 s resolution
    replaced = data / names[10]
    replaced.write_bytes(replaced.read_bytes())  # touched, same content: Snakemake compares checksums
    assert planned_rules(wf, config, manifest) == set()
    with xr.open_dataset(replaced) as ds:
        fixed = ds.load()
    fixed["sst"] = fixed["sst"] + 0.5  # fixed in place: the same path, other values
    fixed.to_netcdf(data / "fixed.tmp")
    os.replace(data / "fixed.tmp", replaced)
    assert planned_rules(wf, config, manifest) == {"fetch"}
    run_snakemake(wf, manifest, "--cores", "1", "--configfile", str(config))
    assert planned_rules(wf, config, manifest) == set()
    (data / names[-1]).unlink()  # removed from the glob
    assert planned_rules(wf, config, manifest) == {"fetch"}
    shutil.copy2(files[-1], data / "extra.nc")  # added (an old modification time: the set changed)
    assert planned_rules(wf, config, manifest) == {"fetch"}
