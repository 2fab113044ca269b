"""The summary and the README's tables come from the pipeline's outputs (conv2dlstm.evaluation.results), on a
small generated evaluate folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conv2dlstm.artifacts import predictions as predictions_file
from conv2dlstm.cli import main
from conv2dlstm.config.validate import validate_config
from conv2dlstm.errors import ConfigError, DataError
from conv2dlstm.evaluation import results
from conv2dlstm.evaluation.baselines import BASELINE_NAMES

RMSE = {
    "convlstm": [0.2, 0.3],
    "persistence": [0.4, 0.6],
    "climatology": [0.7, 0.7],
    "damped_persistence": [0.35, 0.5],
    "training_mean": [0.8, 0.8],
}


def _write_run(
    root: Path,
    cfg: dict,
    *,
    meaningful_climatology: bool = True,
    run: str = "convlstm",
    network: str = "convlstm",
    scale: float = 1.0,
) -> None:
    """``<outdir>/evaluate/<run>/{metrics.csv,predictions.nc}`` for two daily leads, the network's RMSE
    that of :data:`RMSE` times ``scale``, with the skill horizon rows."""
    rows = []
    rmse_of = {network: [v * scale for v in RMSE["convlstm"]], **{k: v for k, v in RMSE.items() if k != "convlstm"}}
    for model, values in rmse_of.items():
        for lead, value in enumerate(values, start=1):
            rows.append((run, model, "sst", lead, "rmse", value))
            rows.append((run, model, "sst", lead, "acc", 0.9 - 0.1 * lead if model != "climatology" else 0.0))
            for baseline in BASELINE_NAMES:
                if baseline == model:
                    continue
                skill = 1 - value / RMSE[baseline][lead - 1]
                meaningful = meaningful_climatology or baseline == "persistence"
                for suffix, v in (
                    ("", skill if meaningful else np.nan),
                    ("_lower", skill - 0.05 if meaningful else np.nan),
                    ("_upper", skill + 0.05 if meaningful else np.nan),
                    ("_meaningful", float(meaningful)),
                ):
                    rows.append((run, model, "sst", lead, f"skill_vs_{baseline}{suffix}", v))
        for baseline in BASELINE_NAMES:
            if baseline != model:
                lower = [1 - v / RMSE[baseline][k] - 0.05 for k, v in enumerate(values)]
                horizon = next((k for k, x in enumerate(lower) if not x > 0), len(lower))
                rows.append((run, model, "sst", 0, f"skill_horizon_vs_{baseline}", horizon))
        if model == "damped_persistence":
            rows += [(run, model, "sst", lead, "rho", rho) for lead, rho in ((1, 0.9), (2, 0.75))]
    out = root / cfg["outdir"] / "evaluate" / run
    out.mkdir(parents=True)
    pd.DataFrame(rows, columns=["run", "model", "variable", "lead", "metric", "value"]).to_csv(
        out / "metrics.csv", index=False
    )
    times = pd.date_range("2021-07-05T12:00", periods=4, freq="D").values
    with predictions_file.PredictionsWriter(  # the evaluate step's writer: four initial times, two daily leads
        out / predictions_file.FILENAME,
        init_times=times,
        valid_times=times[:, None] + np.array([1, 2])[None, :] * np.timedelta64(1, "D"),
        variables=["sst"],
        lat=np.array([20.0, 21.0]),
        lon=np.array([-60.0, -59.0]),
        units={"sst": "degC"},
        attrs={"model_name": network},
    ):
        pass


@pytest.fixture
def cfg() -> dict:
    return validate_config({"experiment": "exp-a"})


def test_tables_render_every_score_with_its_interval(tmp_path: Path, cfg: dict) -> None:
    _write_run(tmp_path, cfg)
    table = results.markdown_tables(cfg, results.load(cfg, tmp_path))
    lines = table.splitlines()
    assert lines[0].startswith("Test period 2021-07-01..2021-12-31: 4 initial times (2021-07-05..2021-07-08)")
    assert "| sst (degC), lead (days) | 1 | 2 |" in lines
    assert "| **convlstm** | **0.200** | **0.300** |" in lines
    assert "| damped persistence (ρ = 0.90, 0.75) | 0.350 | 0.500 |" in lines
    assert "| convlstm: skill vs persistence [95%] | 0.50 [0.45, 0.55] | 0.50 [0.45, 0.55] |" in lines
    assert "| damped persistence: skill vs persistence [95%] | 0.125 [0.075, 0.175] | 0.167 [0.117, 0.217] |" in lines
    assert "| ACC convlstm / persistence | 0.800 / 0.800 | 0.700 / 0.700 |" in lines


def test_a_skill_that_is_not_meaningful_says_so(tmp_path: Path, cfg: dict) -> None:
    _write_run(tmp_path, cfg, meaningful_climatology=False)
    runs = results.load(cfg, tmp_path)
    table = results.markdown_tables(cfg, runs).splitlines()
    assert "| convlstm: skill vs climatology [95%] | not meaningful | not meaningful |" in table
    text = results.summary(cfg, runs)
    assert "better than persistence at every lead" in text
    assert "no meaningful skill vs climatology, damped persistence" in text


def test_summary_names_where_the_results_are(tmp_path: Path, cfg: dict) -> None:
    _write_run(tmp_path, cfg)
    text = results.summary(cfg, results.load(cfg, tmp_path), ui="http://127.0.0.1:5000/#/experiments/1/runs")
    assert "results/evaluate/convlstm/" in text and "results/train/convlstm/model.pt" in text
    assert "results/compare/exp-a.csv, results/compare/exp-a.png" in text
    assert "models:/exp-a@champion" in text and "http://127.0.0.1:5000/#/experiments/1/runs" in text
    assert "convlstm sst: RMSE 0.200, 0.300 at leads 1-2 days (persistence 0.400, 0.600)" in text
    assert "better than persistence, climatology, damped persistence, training mean at every lead" in text


def test_write_then_check_a_markdown_block(tmp_path: Path, cfg: dict) -> None:
    _write_run(tmp_path, cfg)
    body = results.markdown_tables(cfg, results.load(cfg, tmp_path))
    doc = "# Title\n\n<!-- results:exp-a -->\nold\n<!-- /results:exp-a -->\n\ntail\n"
    new = results.replace_block(doc, "exp-a", body)
    assert new.startswith("# Title\n\n<!-- results:exp-a -->\n" + body + "\n<!-- /results:exp-a -->")
    assert new.endswith("\n\ntail\n")
    results.check_block(new, "exp-a", body)
    assert results.replace_block(new, "exp-a", body) == new  # idempotent

    changed = new.replace("**0.200**", "**0.201**")
    with pytest.raises(DataError, match=r"at line 5 of the block:\n  README.md: \| \*\*convlstm\*\* \| \*\*0.201"):
        results.check_block(changed, "exp-a", body, path="README.md")
    with pytest.raises(DataError, match="at line 4"):
        results.check_block(new.replace("| --- | --- | --- |\n", ""), "exp-a", body)
    with pytest.raises(ConfigError, match="no block for experiment 'exp-b'.*<!-- results:exp-b -->"):
        results.replace_block(doc, "exp-b", body)


def test_tables_cli_writes_and_checks(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "c.yaml"
    config.write_text("experiment: exp-a\n")
    _write_run(tmp_path, validate_config({"experiment": "exp-a"}))
    readme = tmp_path / "README.md"
    readme.write_text("<!-- results:exp-a -->\n<!-- /results:exp-a -->\n")
    assert main(["tables", "--config", str(config), "--check", str(readme)]) == 2
    assert "differ from what the pipeline produced" in capsys.readouterr().err
    assert main(["tables", "--config", str(config), "--write", str(readme)]) == 0
    assert "**0.200**" in readme.read_text()
    assert main(["tables", "--config", str(config), "--check", str(readme)]) == 0
    assert "the results of experiment 'exp-a' match" in capsys.readouterr().out


def test_no_results_yet_is_a_clear_error(tmp_path: Path, cfg: dict) -> None:
    with pytest.raises(DataError, match=r"results/evaluate/convlstm/metrics.csv does not exist: run the pipeline"):
        results.load(cfg, tmp_path)


def test_several_runs_are_compared_side_by_side(tmp_path: Path) -> None:
    """With several runs: one row per run (RMSE at the compared leads, skill vs damped persistence at
    the first and last lead, skill horizons, parameters), the baselines below; --write also fills the
    timings block, which --check leaves alone."""
    cfg = validate_config(  # trained for lead 1, scored to lead 2
        {
            "experiment": "exp-z",
            "windows": {"lead_steps": 1},
            "evaluate": {"max_lead": 2},
            "runs": [{"name": "convlstm"}, {"name": "worse", "model": {"name": "unet"}}],
        }
    )
    _write_run(tmp_path, cfg)
    _write_run(tmp_path, cfg, run="worse", network="unet", scale=1.5)
    lines = results.markdown_tables(cfg, results.load(cfg, tmp_path)).splitlines()
    assert lines[0].endswith("The networks are trained for lead 1; past it they run on their own outputs.")
    header = next(line for line in lines if line.startswith("| sst"))
    assert header == (
        "| sst (degC) | RMSE lead 1 | RMSE lead 2 | skill vs damped persistence, lead 1 [95%] | skill vs damped "
        "persistence, lead 2 [95%] | skill horizon vs damped persistence (days) | skill horizon vs persistence "
        "(days) | parameters |"
    )
    assert "| **convlstm** | **0.200** | **0.300** | 0.43 [0.38, 0.48] | 0.40 [0.35, 0.45] | ≥ 2 | ≥ 2 | n/a |" in lines
    # 0.3 / 0.35 and 0.45 / 0.5: skill 0.14 then 0.10, its lower bound above 0 at both leads
    assert (
        "| **worse (unet)** | **0.300** | **0.450** | 0.14 [0.09, 0.19] | 0.10 [0.05, 0.15] | ≥ 2 | ≥ 2 | n/a |"
        in lines
    )
    assert "| persistence | 0.400 | 0.600 |  |  |  |  |  |" in lines

    for run, seconds in (("convlstm", [2.0, 1.0, 3.0]), ("worse", [4.0])):
        history = tmp_path / cfg["outdir"] / "train" / run / "history.csv"
        history.parent.mkdir(parents=True)
        pd.DataFrame({"epoch": range(1, len(seconds) + 1), "seconds": seconds}).to_csv(history, index=False)
    readme = tmp_path / "README.md"
    readme.write_text(
        "<!-- results:exp-z -->\n<!-- /results:exp-z -->\n"
        "<!-- results:exp-z:timings -->\n<!-- /results:exp-z:timings -->\n"
    )
    config = tmp_path / "z.yaml"
    config.write_text(
        "experiment: exp-z\nwindows: {lead_steps: 1}\nevaluate: {max_lead: 2}\n"
        "runs: [{name: convlstm}, {name: worse, model: {name: unet}}]\n"
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path)
        assert main(["tables", "--config", str(config), "--write", str(readme)]) == 0
        text = readme.read_text()
        assert "measured on" in text and "convlstm 2.0 s, worse 4.0 s" in text
        readme.write_text(text.replace("convlstm 2.0 s", "convlstm 9.9 s"))  # another machine's timings
        assert main(["tables", "--config", str(config), "--check", str(readme)]) == 0
