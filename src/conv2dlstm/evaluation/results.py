"""What a configuration's results are, and where: the summary after ``make run`` and the README's tables.

Both read only what the pipeline wrote (each run's ``metrics.csv`` and ``predictions.nc``, the
compare step's summary) for the configuration given, so a number shown here is a number the
pipeline produced:

- :func:`summary` - where the metrics, plots, comparison, model and MLflow runs are, then per run
  and target variable three lines of skill (``python -m conv2dlstm summary``, printed by
  ``make run``).
- :func:`markdown_tables` - one results table per target variable: RMSE of every run and baseline
  per lead, skill against each baseline with its 95% interval, ACC. :func:`replace_block` puts it
  between the markers ``<!-- results:<experiment> -->`` and ``<!-- /results:<experiment> -->`` of a
  Markdown file (``python -m conv2dlstm tables --write README.md``); :func:`check_block` fails,
  naming the first line that differs, when the file holds other numbers (``--check``). With several
  runs the table compares them instead, one row each (:func:`_comparison_table`), and ``--write``
  also fills the block ``<experiment>:timings`` with the training time per epoch
  (:func:`timings_line`), a measurement that ``--check`` leaves alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from conv2dlstm.config.runs import run_names
from conv2dlstm.config.strata import PLOT_BY_REGION, PLOT_BY_SEASON
from conv2dlstm.config.workflow import compare_stem
from conv2dlstm.errors import ConfigError, DataError
from conv2dlstm.evaluation.baselines import BASELINE_NAMES
from conv2dlstm.textdiff import first_difference

EVALUATE_FILES = ("metrics.csv", "rmse_vs_lead.png", "skill_vs_lead.png", "acc_vs_lead.png", "maps.png", "rmse_map.png")
"""What the evaluate step writes per run besides ``predictions.nc`` and ``predictions.zarr`` (listed in the summary)."""
OPTIONAL_FILES = ("animation.gif", PLOT_BY_REGION, PLOT_BY_SEASON)
"""What it writes when the configuration asks for it (``evaluate.animation_lead``, ``evaluate.regions``,
``evaluate.by_season``), listed when present."""

_LABELS = {name: name.replace("_", " ") for name in BASELINE_NAMES}


@dataclass(frozen=True)
class RunResults:
    """One evaluated run: its ``metrics.csv`` rows, its directories and the test period it covers."""

    name: str
    model: str
    metrics: pd.DataFrame
    evaluate_dir: Path
    model_path: Path
    initial_times: int
    first_time: str
    last_time: str
    lead_unit: str


def _lead_unit(lead_time: Any) -> str:
    """What one lead step is, as the plots label the lead axis (:func:`conv2dlstm.evaluation.plots.lead_label`):
    ``days``, ``6-hour steps``, ... (``prediction_timedelta`` of the predictions: timedeltas)."""
    from conv2dlstm.evaluation.plots import lead_label, lead_step

    return lead_label(lead_step(lead_time)).removeprefix("lead (").removesuffix(")")


def load_run(cfg: dict[str, Any], run: str, root: Path = Path(".")) -> RunResults:
    """The evaluate step's outputs of ``run`` under ``root`` (the working directory of the pipeline): its
    headline rows of ``metrics.csv`` (region and season ``all``), which the summary and tables show."""
    from conv2dlstm.artifacts import predictions as predictions_file
    from conv2dlstm.evaluation.scores import headline, read_metrics_csv

    out = root / cfg["outdir"]
    directory = out / "evaluate" / run
    path = directory / "metrics.csv"
    if not path.is_file():
        raise DataError(f"{path} does not exist: run the pipeline first (make run CONFIG=...), then this command")
    metrics = headline(read_metrics_csv(path))  # the whole grid over the whole test period
    with predictions_file.open(directory / predictions_file.FILENAME) as ds:
        times = pd.DatetimeIndex(ds["time"].values)
        unit = _lead_unit(ds["prediction_timedelta"].values)
        model = str(ds.attrs.get("model_name", run))
    return RunResults(
        name=run,
        model=model,
        metrics=metrics,
        evaluate_dir=directory,
        model_path=out / "train" / run / "model.pt",
        initial_times=len(times),
        first_time=f"{times[0]:%Y-%m-%d}",
        last_time=f"{times[-1]:%Y-%m-%d}",
        lead_unit=unit,
    )


def load(cfg: dict[str, Any], root: Path = Path(".")) -> list[RunResults]:
    """Every configured run's results (:func:`load_run`)."""
    return [load_run(cfg, run, root) for run in run_names(cfg)]


def _values(metrics: pd.DataFrame, model: str, variable: str, metric: str) -> pd.Series:
    rows = metrics[(metrics["model"] == model) & (metrics["variable"] == variable) & (metrics["metric"] == metric)]
    return rows.set_index("lead")["value"].sort_index()


def _num(value: float, digits: int = 3) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _skill(metrics: pd.DataFrame, model: str, variable: str, baseline: str, lead: int, digits: int = 2) -> str:
    """``0.31 [0.26, 0.36]``, or ``not meaningful`` / ``n/a``."""
    prefix = f"skill_vs_{baseline}"

    def get(suffix: str) -> float:
        s = _values(metrics, model, variable, prefix + suffix)
        return float(s.get(lead, float("nan")))

    meaningful = get("_meaningful")
    if math.isfinite(meaningful) and meaningful < 0.5:
        return "not meaningful"
    skill, lower, upper = get(""), get("_lower"), get("_upper")
    if not math.isfinite(skill):
        return "n/a"
    if not (math.isfinite(lower) and math.isfinite(upper)):
        return _num(skill, digits)
    return f"{skill:.{digits}f} [{lower:.{digits}f}, {upper:.{digits}f}]"


def _units(cfg: dict[str, Any], variable: str) -> str:
    entry = cfg["harmonize"]["units"].get(variable)
    return f" ({entry['unit']})" if entry and entry.get("unit") else ""


def markdown_tables(cfg: dict[str, Any], runs: list[RunResults]) -> str:
    """The results of ``runs`` as Markdown: a sentence on the test period, then one table per target."""
    if not runs:
        raise DataError("no evaluated run to tabulate")
    first = runs[0]
    lines = [
        f"Test period {cfg['splits']['test']['start']}..{cfg['splits']['test']['end']}: "
        f"{first.initial_times} initial times ({first.first_time}..{first.last_time}), area-weighted RMSE over "
        "ocean cells in physical units; skill `1 − RMSE/RMSE(baseline)` with its 95% block-bootstrap interval.",
    ]
    lead_steps = int(cfg["windows"]["lead_steps"])
    evaluated = _values(first.metrics, first.model, cfg["variables"]["targets"][0], "rmse").index
    if len(evaluated) and int(max(evaluated)) > lead_steps:  # rolled out past the trained leads
        trained = f"leads 1-{lead_steps}; past them they run" if lead_steps > 1 else "lead 1; past it they run"
        lines[0] += f" The networks are trained for {trained} on their own outputs."
    for variable in cfg["variables"]["targets"]:
        lines += _comparison_table(cfg, runs, variable) if len(runs) > 1 else _table(cfg, runs, variable)
    return "\n".join(lines)


COMPARED_LEADS = (1, 3, 5, 10)
"""The leads of the comparison table (those evaluated, and the last one)."""
HORIZON_BASELINES = ("damped_persistence", "persistence")
"""The baselines whose skill horizon the comparison table shows."""


def _horizon(run: RunResults, variable: str, baseline: str, last: int) -> str:
    value = _values(run.metrics, run.model, variable, f"skill_horizon_vs_{baseline}")
    if value.empty or not math.isfinite(float(value.iloc[0])):
        return "n/a"
    k = int(value.iloc[0])
    return f"≥ {k}" if k >= last else str(k)


def parameter_count(path: Path) -> int | None:
    """Trainable parameters of the model in checkpoint ``path`` (None when the file is missing)."""
    if not path.is_file():
        return None
    from conv2dlstm.training import models

    model, _ = models.load_model(path)
    return models.count_parameters(model)


def _comparison_table(cfg: dict[str, Any], runs: list[RunResults], variable: str) -> list[str]:
    """Several runs side by side, one row each (then the baselines): RMSE at :data:`COMPARED_LEADS`,
    skill against damped persistence at the first and last lead with its 95% interval, the skill
    horizons against :data:`HORIZON_BASELINES`, and the parameters of the trained model."""
    first = runs[0]
    evaluated = list(_values(first.metrics, first.model, variable, "rmse").index)
    if not evaluated:
        raise DataError(f"{first.evaluate_dir / 'metrics.csv'} has no RMSE of {variable!r}")
    last = int(evaluated[-1])
    leads = sorted({k for k in COMPARED_LEADS if k in evaluated} | {last})
    ends = sorted({int(evaluated[0]), last})
    header = (
        [f"{variable}{_units(cfg, variable)}"]
        + [f"RMSE lead {k}" for k in leads]
        + [f"skill vs damped persistence, lead {k} [95%]" for k in ends]
        + [f"skill horizon vs {_LABELS[b]} ({first.lead_unit})" for b in HORIZON_BASELINES]
        + ["parameters"]
    )
    rows = ["", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for run in runs:
        rmse = _values(run.metrics, run.model, variable, "rmse")
        label = run.name if run.name == run.model else f"{run.name} ({run.model})"
        n_params = parameter_count(run.model_path)
        cells = [f"**{_num(float(rmse.get(k, float('nan'))))}**" for k in leads]
        cells += [_skill(run.metrics, run.model, variable, "damped_persistence", k) for k in ends]
        cells += [_horizon(run, variable, b, last) for b in HORIZON_BASELINES]
        cells.append("n/a" if n_params is None else f"{n_params:,}")
        rows.append(_row(f"**{label}**", cells))
    for baseline in BASELINE_NAMES:
        rmse = _values(first.metrics, baseline, variable, "rmse")
        cells = [_num(float(rmse.get(k, float("nan")))) for k in leads] + [""] * (len(header) - 1 - len(leads))
        rows.append(_row(_LABELS[baseline], cells))
    return rows


def timings_line(runs: list[RunResults]) -> str:
    """The median training time per epoch of each run (its ``history.csv``), on this machine: a
    measurement, not a result, so :func:`tables_main` writes it outside the checked block."""
    import os

    parts = []
    for run in runs:
        history = run.model_path.parent / "history.csv"
        if history.is_file():
            seconds = pd.read_csv(history)["seconds"].median()
            parts.append(f"{run.name} {seconds:.1f} s")
    return (
        f"Training time per epoch (median over epochs, `history.csv`), measured on {os.cpu_count()} CPU cores "
        f"({cpu_model()}) by the run that produced the table: " + ", ".join(parts) + "."
    )


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else the machine type."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _row(label: str, cells: list[str]) -> str:
    return f"| {label} | " + " | ".join(cells) + " |"


def _table(cfg: dict[str, Any], runs: list[RunResults], variable: str) -> list[str]:
    """The lines of the table of target ``variable``, after a blank line: its header (the leads of the
    first run), then the rows of :func:`_rmse_rows`, :func:`_skill_rows` and :func:`_acc_rows`. The
    baselines' rows are those of the first run's ``metrics.csv``."""
    first = runs[0]
    leads = list(_values(first.metrics, first.model, variable, "rmse").index)
    if not leads:
        raise DataError(f"{first.evaluate_dir / 'metrics.csv'} has no RMSE of {variable!r}")
    header = f"| {variable}{_units(cfg, variable)}, lead ({first.lead_unit}) | " + " | ".join(map(str, leads))
    return [
        "",
        header + " |",
        "| --- |" + " --- |" * len(leads),
        *_rmse_rows(runs, variable, leads),
        *_skill_rows(runs, variable, leads),
        *_acc_rows(runs, variable, leads),
    ]


def _rmse_rows(runs: list[RunResults], variable: str, leads: list[Any]) -> list[str]:
    """RMSE per lead of every run (bold) and every baseline (damped persistence with its ρ per lead)."""
    base = runs[0].metrics
    rows = []
    for run in runs:
        rmse = _values(run.metrics, run.model, variable, "rmse")
        label = run.name if run.name == run.model else f"{run.name} ({run.model})"
        rows.append(_row(f"**{label}**", [f"**{_num(rmse.get(k, float('nan')))}**" for k in leads]))
    for baseline in BASELINE_NAMES:
        rmse = _values(base, baseline, variable, "rmse")
        label = _LABELS[baseline]
        if baseline == "damped_persistence":
            rho = _values(base, baseline, variable, "rho")
            if not rho.empty:
                label += " (ρ = " + ", ".join(_num(float(rho.get(k, float("nan"))), 2) for k in leads) + ")"
        rows.append(_row(label, [_num(float(rmse.get(k, float("nan")))) for k in leads]))
    return rows


def _skill_rows(runs: list[RunResults], variable: str, leads: list[Any]) -> list[str]:
    """Skill per lead with its 95% interval: of every run against each baseline, then of each other
    baseline against persistence (where ``metrics.csv`` has it)."""
    base = runs[0].metrics
    rows = []
    for run in runs:
        for baseline in BASELINE_NAMES:
            cells = [_skill(run.metrics, run.model, variable, baseline, k) for k in leads]
            rows.append(_row(f"{run.name}: skill vs {_LABELS[baseline]} [95%]", cells))
    for baseline in BASELINE_NAMES[1:]:  # is a baseline itself better than persistence?
        if not _values(base, baseline, variable, f"skill_vs_{BASELINE_NAMES[0]}").empty:
            cells = [_skill(base, baseline, variable, BASELINE_NAMES[0], k, digits=3) for k in leads]
            rows.append(_row(f"{_LABELS[baseline]}: skill vs {_LABELS[BASELINE_NAMES[0]]} [95%]", cells))
    return rows


def _acc_rows(runs: list[RunResults], variable: str, leads: list[Any]) -> list[str]:
    """ACC per lead of every run, next to persistence's."""
    ref = _values(runs[0].metrics, "persistence", variable, "acc")
    rows = []
    for run in runs:
        acc = _values(run.metrics, run.model, variable, "acc")
        rows.append(
            _row(
                f"ACC {run.name} / persistence",
                [f"{_num(float(acc.get(k, float('nan'))))} / {_num(float(ref.get(k, float('nan'))))}" for k in leads],
            )
        )
    return rows


def _markers(key: str) -> tuple[str, str]:
    return f"<!-- results:{key} -->", f"<!-- /results:{key} -->"


def block_key(cfg: dict[str, Any]) -> str:
    """The name of a configuration's block in a Markdown file: its experiment."""
    return str(cfg["experiment"])


def replace_block(text: str, key: str, body: str) -> str:
    """``text`` with the lines between the markers of ``key`` replaced by ``body``; :class:`ConfigError`
    when the markers are missing or out of order."""
    start, end = _markers(key)
    i, j = text.find(start), text.find(end)
    if i < 0 or j < i:
        raise ConfigError(
            f"the file has no block for experiment {key!r}: add the two lines {start} and {end} where its "
            "table belongs, then run the command again"
        )
    return text[: i + len(start)] + "\n" + body.rstrip("\n") + "\n" + text[j:]


def check_block(text: str, key: str, body: str, *, path: str = "the file") -> None:
    """:class:`DataError` naming the first differing line when ``text``'s block ``key`` is not ``body``."""
    expected = replace_block(text, key, body)
    if expected == text:
        return
    start, end = _markers(key)
    found = first_difference(text[text.find(start) + len(start) : text.find(end)].strip("\n"), body.strip("\n"))
    if found is not None:
        n, a, b = found
        raise DataError(
            f"{path}: the results of experiment {key!r} differ from what the pipeline produced, at line {n} "
            f"of the block:\n  {path}: {a}\n  results: {b}\n"
            "regenerate the block with `python -m conv2dlstm tables --config <config> --write "
            f"{path}` (make tables CONFIG=...), or find what changed the results"
        )


def _verdict_line(run: RunResults, variable: str) -> str:
    """Which baselines the run beats at which leads (intervals above zero)."""
    from conv2dlstm.evaluation.scores import skill_intervals, verdict

    skills = skill_intervals(run.metrics[run.metrics["model"] == run.model], by="model")
    skills = skills[skills["variable"] == variable]
    beaten, partly, not_meaningful, no = [], [], [], []
    for baseline in BASELINE_NAMES:
        label, leads = verdict(skills[skills["baseline"] == baseline])
        name = _LABELS[baseline]
        if label == "yes":
            beaten.append(name)
        elif label == "partly":
            partly.append(f"{name} at leads {leads.replace(' ', ', ')} only")
        elif label == "no":
            no.append(name)
        elif label == "not meaningful":
            not_meaningful.append(name)
    parts = []
    if beaten:
        parts.append(f"better than {', '.join(beaten)} at every lead (95% interval above 0)")
    if partly:
        parts.append("better than " + "; ".join(partly))
    if no:
        parts.append(f"NOT better than {', '.join(no)} at any lead")
    if not_meaningful:
        parts.append(f"no meaningful skill vs {', '.join(not_meaningful)} (its climatology lacks training days)")
    return "; ".join(parts) or "no skill intervals in metrics.csv"


def summary(cfg: dict[str, Any], runs: list[RunResults], *, ui: str | None = None) -> str:
    """Where ``runs``' results are, then per run and target variable three lines of skill."""
    stem = compare_stem(cfg)
    lines = [f"Results of experiment {cfg['experiment']!r}:"]
    for run in runs:
        files = [*EVALUATE_FILES, *(name for name in OPTIONAL_FILES if (run.evaluate_dir / name).exists())]
        lines.append(f"  {run.name}: metrics and plots in {run.evaluate_dir}/ ({', '.join(files)})")
        lines.append(f"  {' ' * len(run.name)}  model {run.model_path}")
    lines.append(f"  comparison of runs and baselines: {stem}.csv, {stem}.png")
    lines.append(f"  best model: models:/{cfg['experiment']}@champion (MLflow registry)")
    lines.append(f"  MLflow: {ui or 'make mlflow-ui CONFIG=<this config> prints the address'}")
    first = runs[0]
    lines.append(
        f"Skill on the test period ({first.initial_times} initial times, {first.first_time}..{first.last_time}):"
    )
    for run in runs:
        for variable in cfg["variables"]["targets"]:
            rmse = _values(run.metrics, run.model, variable, "rmse")
            leads = list(rmse.index)
            pers = _values(run.metrics, "persistence", variable, "rmse")
            lines.append(
                f"  {run.name} {variable}: RMSE {', '.join(_num(v) for v in rmse)} at leads "
                f"{leads[0]}-{leads[-1]} {run.lead_unit} (persistence {', '.join(_num(v) for v in pers)})"
                if len(leads) > 1
                else f"  {run.name} {variable}: RMSE {_num(float(rmse.iloc[0]))} at lead {leads[0]} "
                f"{run.lead_unit} (persistence {_num(float(pers.iloc[0]))})"
            )
            skills = [
                f"vs {_LABELS[b]} {_skill(run.metrics, run.model, variable, b, leads[0])}"
                + (f" .. {_skill(run.metrics, run.model, variable, b, leads[-1])}" if len(leads) > 1 else "")
                for b in BASELINE_NAMES
            ]
            lines.append(f"    skill {'; '.join(skills)}")
            lines.append(f"    {_verdict_line(run, variable)}")
            horizons = [
                f"{_LABELS[b]} {_horizon(run, variable, b, int(leads[-1]))}"
                for b in BASELINE_NAMES
                if not _values(run.metrics, run.model, variable, f"skill_horizon_vs_{b}").empty
            ]
            if horizons:
                lines.append(
                    f"    skill horizon ({run.lead_unit} with the 95% interval above 0 from lead 1): vs "
                    + "; ".join(horizons)
                )
    return "\n".join(lines)


def tables_main(cfg: dict[str, Any], *, write: Path | None = None, check: Path | None = None) -> str:
    """Print, write into or check against a Markdown file the tables of ``cfg``'s results."""
    body = markdown_tables(cfg, load(cfg))
    key = block_key(cfg)
    target = write or check
    if target is None:
        return body
    text = Path(target).read_text()
    if check is not None:
        check_block(text, key, body, path=str(check))
    else:
        new = replace_block(text, key, body)
        if _markers(f"{key}:timings")[0] in new:  # a measurement: written, never checked
            new = replace_block(new, f"{key}:timings", timings_line(load(cfg)))
        if new != text:
            Path(write).write_text(new)  # type: ignore[arg-type]
    return body


def ui_hint(cfg: dict[str, Any]) -> str | None:
    """The MLflow UI address of the experiment's runs, or None when the store cannot say."""
    from conv2dlstm.errors import Conv2dLstmError
    from conv2dlstm.tracking import store as tracking

    try:
        uri = tracking.resolve_tracking_uri(cfg)
        return f"{tracking.ui_address(uri, cfg['experiment'])} (after make mlflow-ui CONFIG=<this config>)"
    except Conv2dLstmError:
        return None


def summary_main(cfg: dict[str, Any]) -> str:
    return summary(cfg, load(cfg), ui=ui_hint(cfg))


__all__ = ["RunResults", "check_block", "load", "markdown_tables", "replace_block", "summary", "tables_main"]
