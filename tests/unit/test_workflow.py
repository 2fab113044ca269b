"""Snakemake itself, run for real on temporary copies of the workflow."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from conv2dlstm.config.workflow import export_package_path
from tests.support.changes import CHANGES, merge, tiny
from tests.support.workflow import TINY, job_env


def _snakemake(exe: str, cwd: Path, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True, env=job_env(), timeout=timeout)


def test_lint_has_no_findings(snakemake_exe, repo_root):
    proc = _snakemake(snakemake_exe, repo_root, "--lint", "--dry-run")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Congratulations, your workflow is in a good condition!" in proc.stdout + proc.stderr


@pytest.mark.parametrize("configfile", ["config/config.yaml", "config/seed_no3.yaml", "config/sweep.yaml"])
def test_dry_run_builds_the_whole_dag(snakemake_exe, workflow_copy, configfile):
    proc = _snakemake(snakemake_exe, workflow_copy, "-n", "--cores", "2", "--configfile", configfile)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    for rule in ("fetch", "regrid", "normalize", "windows", "train", "evaluate", "compare"):
        assert f"rule {rule}:" in out
    if configfile.endswith("sweep.yaml"):
        for run in ("convlstm-lr0.001", "convlstm-lr0.003", "conv2d_lstm-lr0.001", "conv2d_lstm-lr0.003"):
            assert f"results/train/{run}/model.pt" in out, run


def test_bad_config_stops_before_any_job(snakemake_exe, workflow_copy):
    bad = workflow_copy / "bad.yaml"
    bad.write_text("windows:\n  input_stpes: 5\n")
    proc = _snakemake(snakemake_exe, workflow_copy, "--cores", "1", "--configfile", str(bad))
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "config key windows: unknown key(s) 'input_stpes'" in out
    assert not (workflow_copy / "resources").exists()
    assert not (workflow_copy / "results").exists()


def test_export_package_path_prepends_once(tmp_path):
    env = {"PYTHONPATH": f"/x{':'}/y"}
    first = export_package_path(tmp_path, env)
    second = export_package_path(tmp_path, env)
    assert first == second == f"{tmp_path.resolve()}/src:/x:/y"
    assert export_package_path(tmp_path, {}) == f"{tmp_path.resolve()}/src"


def test_train_gpus_follow_the_run_config():
    from conv2dlstm.config.validate import validate_config
    from conv2dlstm.config.workflow import train_gpus

    cfg = validate_config(
        {
            "runs": [
                {"name": "one"},
                {"name": "four", "train": {"gpus": 4}},
                {"name": "cpu", "train": {"device": "cpu", "gpus": 2}},
            ]
        }
    )
    assert [train_gpus(cfg, r) for r in ("one", "four", "cpu")] == [1, 4, 0]


def test_default_profile_loads_by_itself(snakemake_exe, workflow_copy):
    """profiles/default beside the Snakefile is Snakemake 9's workflow profile: it applies to a plain
    run (its printshellcmds shows each step's command) and together with --profile slurm."""
    proc = _snakemake(snakemake_exe, workflow_copy, "-n", "--cores", "2")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "Using workflow specific profile profiles/default" in out
    assert "Shell command: python -m conv2dlstm regrid" in out
    proc = _snakemake(snakemake_exe, workflow_copy, "-n", "--profile", "slurm")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "Using profiles slurm and workflow specific profile profiles/default" in out


def test_rule_params_are_the_result_keys(snakemake_exe, workflow_copy):
    """What Snakemake records as each rule's params (its rerun trigger) is the step's result config,
    one 'key=value' param per key (the tiny configuration's half year of synthetic data: values
    other than the defaults, and seconds of data to write where the default's three years take 15)."""
    import json

    from conv2dlstm.config.keys import result_config
    from conv2dlstm.config.validate import validate_config

    shutil.copy(TINY, workflow_copy / "tiny.yaml")
    proc = _snakemake(snakemake_exe, workflow_copy, "--cores", "1", "synth", "--configfile", "tiny.yaml")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    meta = next((workflow_copy / ".snakemake/metadata").iterdir())
    record = json.loads(meta.read_text())
    cfg = validate_config(__import__("yaml").safe_load(TINY.read_text()))
    assert cfg["synthetic"]["end"] != validate_config({})["synthetic"]["end"]
    assert record["params"] == sorted(_snakemake_params(cfg, "synth")), record["params"]
    synthetic = result_config(cfg, "synth")["synthetic"]
    assert set(record["params"]) == {repr(f"synthetic.{k}={json.dumps(v)}") for k, v in synthetic.items()}


def _snakemake_params(cfg: dict, *steps: str, run: str | None = None) -> set[str]:
    """A job's params as Snakemake compares them with those it recorded: the set of their repr()."""
    from types import SimpleNamespace

    from conv2dlstm.config.workflow import determines_params

    wildcards = SimpleNamespace(run=run) if run else SimpleNamespace()
    return {repr(param(wildcards)) for param in determines_params(cfg, *steps)}


@pytest.mark.parametrize(
    ("change", "steps", "differs"),
    [
        ({"source": {"parallel": 9, "retries": 0, "timeout_s": 5}}, ("fetch",), False),
        ({"source": {"url": "file:x/{date:%Y}.nc"}}, ("fetch",), True),
        ({"source": {"paths": ["a.nc"]}}, ("fetch",), False),  # kind url does not read paths
        ({"source": {"kind": "files", "paths": ["a.nc"]}}, ("fetch",), True),
        ({"grid": {"method": "linear"}}, ("regrid",), True),
        ({"dask": {"scheduler_address": "tcp://127.0.0.1:1"}}, ("regrid",), False),
        ({"model": {"conv2d_lstm": {"filters": [8]}}}, ("train",), False),  # the inactive architecture
        ({"model": {"name": "conv2d_lstm"}, "runs": [{"name": "convlstm"}]}, ("train",), True),
        ({"train": {"device": "cpu", "num_workers": 2, "compile": True, "gpus": 2}}, ("train",), False),
        ({"runs": [{"name": "convlstm", "train": {"epochs": 3}}]}, ("train",), True),
        ({"evaluate": {"batch_size": 2}}, ("evaluate",), False),
        ({"normalize": {"per_pixel": True}}, ("fetch", "regrid", "normalize"), True),  # a forecast's
        ({"windows": {"stride": 2}}, ("fetch", "regrid", "normalize"), False),
    ],
)
def test_params_change_exactly_with_the_result_config(change, steps, differs):
    """Snakemake's rerun trigger: a job's params differ exactly when its steps' result config does."""
    from conv2dlstm.config.keys import RUN_STEPS, result_digest
    from conv2dlstm.config.validate import validate_config

    base, changed = validate_config({}), validate_config(change)
    run = "convlstm" if steps[0] in RUN_STEPS else None
    assert (_snakemake_params(base, *steps, run=run) != _snakemake_params(changed, *steps, run=run)) is differs
    assert any(result_digest(base, s, run) != result_digest(changed, s, run) for s in steps) is differs


def test_params_reason_names_only_the_changed_keys():
    """The reason `snakemake -n` gives for a changed setting (Snakemake's own message): the changed
    key's old and new value, not the whole configuration of the step."""
    from snakemake.persistence import ParamsChange

    from conv2dlstm.config.validate import validate_config

    old = _snakemake_params(validate_config({}), "train", run="convlstm")
    new = _snakemake_params(validate_config({"train": {"epochs": 4}}), "train", run="convlstm")
    reason = str(ParamsChange(only_old=old - new, only_new=new - old))
    assert reason == (
        "Union of exclusive params before and now across all output: before: 'train.epochs=10' now: 'train.epochs=4' "
    )
    fetch = _snakemake_params(validate_config({}), "fetch")
    files = _snakemake_params(validate_config({"source": {"kind": "files", "paths": ["a.nc"]}}), "fetch")
    assert files - fetch == {"""'source.kind="files"'""", """'source.paths=["a.nc"]'"""}


@pytest.mark.parametrize("name", sorted(CHANGES))
def test_every_key_changes_exactly_its_steps_params(name: str) -> None:
    """Changing one key changes the rule params (Snakemake's rerun trigger) of exactly the steps it
    determines (its x-steps annotation), for every job of those steps; path keys name outputs
    instead and change no params. The real Snakemake's plan for each kind of key is
    tests/e2e/test_rerun.py."""
    from conv2dlstm.config import keys
    from conv2dlstm.config.runs import run_names
    from conv2dlstm.config.validate import validate_config

    spec = {s.name: s for s in keys.key_specs()}[name]
    before = validate_config(tiny())
    after = validate_config(merge(tiny(), CHANGES[name]))
    common_runs = sorted(set(run_names(before)) & set(run_names(after)))
    changed = set()
    for step in keys.STEPS:
        for run in common_runs if step in keys.RUN_STEPS else [None]:
            if _snakemake_params(before, step, run=run) != _snakemake_params(after, step, run=run):
                changed.add(step)
    expected = set() if spec.output_path else {s for s in keys.STEPS if spec.determines(s, before)}
    if before["synthetic"]["kind"] == "none":
        expected.discard("synth")
    if set(run_names(before)) != set(run_names(after)):  # a new run name (model.name): new train jobs
        assert changed <= expected and expected <= changed | set(keys.RUN_STEPS), (name, changed, expected)
    else:
        assert changed == expected, (name, sorted(changed), sorted(expected))
