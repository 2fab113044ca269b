"""Reruns you can trust, with the real Snakemake on a tiny complete pipeline.

- After a complete run, changing one key makes `snakemake --dry-run` plan exactly the steps its
  x-steps annotation names, and those downstream of them (tests/support/plan.py); a runtime key
  plans nothing. Run for every path key and one key of each kind of plan; every key's rule params
  are checked in tests/unit/test_workflow.py.
- A changed learning rate trains a new model, recorded in a new MLflow run with the new rate.

Reruns after the input data changes or a run is interrupted: tests/e2e/test_rerun_inputs.py.
"""

from __future__ import annotations

import shutil
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import yaml

from conv2dlstm.config import keys
from conv2dlstm.config.validate import validate_config
from conv2dlstm.errors import ConfigError
from tests.support.changes import CHANGES, REFUSED, RUN_CHANGES, SWEEP_CHANGES, merge, tiny
from tests.support.plan import steps_planned_by
from tests.support.workflow import dry_run, planned_rules, run_snakemake, same_weights

pytestmark = pytest.mark.e2e


ADDS_OUTPUTS = ("evaluate.regions", "evaluate.by_season")
"""Keys whose change (tests/support/changes.py) adds outputs to the evaluate rule: skill_by_region.png,
skill_by_season.png. Snakemake compares params only when every declared output has a record, so these
rerun evaluate because `rule all` asks for every evaluate output (workflow/rules/common.smk)."""


def test_every_kind_of_key_plans_exactly_its_steps(tiny_run: Path, tmp_path: Path):
    """The real Snakemake plans what the annotations say, for every path key and for one key of each
    kind of plan (the keys whose change must plan the same steps); that every other key's change
    changes exactly its steps' rule params, which is all Snakemake reads, is
    tests/unit/test_workflow.py::test_every_key_changes_exactly_its_steps_params."""
    specs = {s.name: s for s in keys.key_specs()}
    assert set(CHANGES) | set(REFUSED) == set(specs), "every schema key needs a row in CHANGES or REFUSED"
    for name, change in REFUSED.items():
        with pytest.raises(ConfigError, match=f"config key {name}:"):
            validate_config(merge(tiny(), change))
    base = tiny()
    cases, kinds = [], set()
    for name, change in CHANGES.items():
        changed = merge(base, change)
        assert keys.get(validate_config(changed), name) != keys.get(validate_config(base), name), name
        expected = steps_planned_by(specs[name], validate_config(base))
        kind = frozenset(expected)
        # a key whose change adds a file that a rule declares (a figure drawn only when configured) is
        # planned by that file, not by its params: every such key is a case of its own
        if specs[name].output_path or kind not in kinds or name in ADDS_OUTPUTS:
            kinds.add(kind)
            cases.append((name, changed, expected))
    assert len(cases) >= 10, [name for name, _, _ in cases]
    for label, (runs, expected) in RUN_CHANGES.items():
        cases.append((f"runs: {label}", {**base, "runs": runs}, expected))
    for label, (sweep, expected) in SWEEP_CHANGES.items():
        cases.append((f"sweep: {label}", {**base, "sweep": sweep}, expected))
    # the changed configs live outside the workflow copy: the dry-runs leave tiny_run untouched
    files = []
    for i, (_, changed, _) in enumerate(cases):
        path = tmp_path / f"case{i}.yaml"
        path.write_text(yaml.safe_dump(changed))
        files.append(path)
    assert planned_rules(tiny_run, tiny_run / "tiny.yaml") == set(), "the complete run must have nothing to do"
    with ThreadPoolExecutor(2) as pool:
        planned = list(pool.map(lambda f: planned_rules(tiny_run, f), files))
    wrong = {
        name: (sorted(got), sorted(expected)) for (name, _, expected), got in zip(cases, planned) if got != expected
    }
    assert not wrong, f"key: (planned, expected) {wrong}"


def test_dry_run_reason_is_the_changed_value(tiny_run: Path, tmp_path: Path):
    """`snakemake -n` says why a step reruns in one line: the changed key, old and new value (one
    rule param per key, conv2dlstm.config.workflow.determines_params), not the step's whole configuration."""
    changed = tmp_path / "epochs.yaml"
    changed.write_text(yaml.safe_dump(merge(tiny(), {"train": {"epochs": 3}})))
    out = dry_run(tiny_run, changed)
    reasons = [line.strip() for line in out.splitlines() if "reason: Params have changed" in line]
    assert reasons == [
        "reason: Params have changed since last execution: Union of exclusive params before and now across all "
        "output: before: 'train.epochs=4' now: 'train.epochs=3'"
    ], out


def _mlflow_runs(wf: Path, experiment: str = "tiny") -> list[tuple[str, str, dict[str, str], dict[str, str]]]:
    """(run id, status, params, tags) of every run of ``experiment`` in the workflow's mlflow.db."""
    with sqlite3.connect(wf / "mlflow.db") as db:
        runs = db.execute(
            "select r.run_uuid, r.status from runs r join experiments e on r.experiment_id = e.experiment_id"
            " where e.name = ? order by r.start_time",
            (experiment,),
        ).fetchall()
        return [
            (
                rid,
                status,
                dict(db.execute("select key, value from params where run_uuid = ?", (rid,)).fetchall()),
                dict(db.execute("select key, value from tags where run_uuid = ?", (rid,)).fetchall()),
            )
            for rid, status in runs
        ]


def test_changed_learning_rate_trains_a_new_model_in_a_new_mlflow_run(tiny_run: Path, tmp_path: Path):
    wf = tmp_path / "wf"
    shutil.copytree(tiny_run, wf, symlinks=True)
    old_model = wf / "old-model.pt"
    shutil.copy(wf / "results/train/convlstm/model.pt", old_model)
    (wf / "lr.yaml").write_text(yaml.safe_dump(merge(tiny(), {"train": {"learning_rate": 0.0005}})))
    proc = run_snakemake(wf, "--cores", "2", "--configfile", "lr.yaml")
    out = proc.stdout + proc.stderr
    for rule in ("synth", "fetch", "regrid", "normalize", "windows"):
        assert f"rule {rule}:" not in out, f"{rule} re-ran"
    model = wf / "results/train/convlstm/model.pt"
    assert not same_weights(model, old_model)
    log = (wf / "results/logs/train/convlstm.log").read_text()
    assert "train.learning_rate" in log and "0.0005" in log, log[-3000:]
    assert list((wf / "results/train/convlstm/stale").glob("*/last.pt")), "the stale checkpoint is kept aside"
    runs = _mlflow_runs(wf)
    assert len(runs) == 2, runs
    (old_id, _, old_params, old_tags), (new_id, status, new_params, _) = runs
    assert old_params["train.learning_rate"] == "0.003" and new_params["train.learning_rate"] == "0.0005"
    assert status == "FINISHED" and old_tags.get("superseded_by") == new_id
    assert runs[1][3]["data.time_gaps"] == "0" and runs[1][3]["data.missing_dates"] == ""  # gaps of the data
    ckpt = torch.load(model, map_location="cpu", weights_only=True)
    assert ckpt["mlflow_run_id"] == new_id
    assert "test_rmse_sst_lead1" in {k for k in _metric_keys(wf, new_id)}


def _metric_keys(wf: Path, run_id: str) -> set[str]:
    with sqlite3.connect(wf / "mlflow.db") as db:
        return {k for (k,) in db.execute("select distinct key from metrics where run_uuid = ?", (run_id,))}
