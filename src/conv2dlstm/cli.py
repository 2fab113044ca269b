"""Command line: ``python -m conv2dlstm <step> [flags]``, one subcommand per workflow rule.

The CLI only maps flags to the ``main`` function of each step's module; all logic lives in the
modules. Heavy imports (torch, mlflow, dask) happen inside the step that needs them, so that
``--help`` and light steps start fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from conv2dlstm.errors import ConfigError, Conv2dLstmError

log = logging.getLogger("conv2dlstm")


def _add_config(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--config",
        type=Path,
        nargs="+",
        help="YAML configuration file(s), each merged over the ones before as snakemake --configfile merges "
        "them (validated; defaults filled in)",
    )
    g.add_argument("--config-json", help="configuration as a JSON string (what the Snakemake rules pass)")


def _add_compute(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=1, help="CPU threads for the step's Dask workers")
    p.add_argument("--memory-mb", type=int, default=None, help="memory limit of the step's Dask workers, MB")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m conv2dlstm",
        description="Conv2D-LSTM ocean forecasting pipeline steps (normally run by Snakemake).",
    )
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="step", required=True, metavar="STEP")
    _add_config_commands(sub)
    _add_result_commands(sub)
    _add_data_steps(sub)
    _add_model_steps(sub)
    _add_verify(sub)
    _add_ensemble(sub)
    _add_compare(sub)
    _add_forecast(sub)
    _add_mlflow_sync(sub)
    return parser


def _add_config_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``validate-config``, ``models`` and ``config-defaults``: a configuration, its networks and the
    schema's defaults."""
    p = sub.add_parser("validate-config", help="validate a configuration and print it with defaults filled in")
    _add_config(p)

    p = sub.add_parser("models", help="the registered networks and their parameter counts on the configuration's grid")
    _add_config(p)

    p = sub.add_parser(
        "config-defaults",
        help="config/config.yaml as the schema gives it (every key, its default and description); "
        "--write writes it, --check fails when a file differs",
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument("--write", type=Path, default=None, help="file to write (e.g. config/config.yaml)")
    g.add_argument("--check", type=Path, default=None, help="file that must equal the generated text")


def _add_result_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``ui-address``, ``summary`` and ``tables``: where a configuration's results are, and their tables."""
    p = sub.add_parser(
        "ui-address", help="print the MLflow UI address of the configuration's experiment (its training runs)"
    )
    _add_config(p)
    p.add_argument(
        "--base", default=None, help="where the UI is served (default: the tracking server, or http://127.0.0.1:5000)"
    )
    p.add_argument("--label", action="store_true", help="print 'MLflow UI: <address>' with the experiment's name")

    p = sub.add_parser(
        "summary", help="where a configuration's results are (metrics, plots, comparison, model, MLflow) and its skill"
    )
    _add_config(p)

    p = sub.add_parser(
        "tables",
        help="the results tables of a configuration (Markdown); --write puts them into a file's "
        "<!-- results:<experiment> --> block, --check fails when the block holds other numbers",
    )
    _add_config(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--write", type=Path, default=None, help="Markdown file whose block to replace (e.g. README.md)")
    g.add_argument("--check", type=Path, default=None, help="Markdown file whose block must equal the results")


def _add_data_steps(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The steps that make the data: ``synth``, ``fetch``, ``regrid``, ``normalize``, ``windows``; and
    ``check-upstream``, which is no rule: it asks whether a url source's files changed upstream."""
    p = sub.add_parser("synth", help="generate the embedded synthetic ocean in its real file format")
    _add_config(p)
    p.add_argument("--out-dir", type=Path, required=True)

    p = sub.add_parser("fetch", help="download or locate the raw data; writes manifest.json")
    _add_config(p)
    p.add_argument("--out-dir", type=Path, required=True)

    p = sub.add_parser(
        "check-upstream",
        help="whether the files of a url source changed on the server since they were fetched; when some did, "
        "writes <resources_dir>/raw/<name>/upstream.json so that the next run fetches them again",
    )
    _add_config(p)
    p.add_argument(
        "--download",
        action="store_true",
        help="download the files the server's answer cannot tell about (no ETag or Last-Modified, same size) "
        "into a temporary file and compare their SHA-256",
    )
    p.add_argument(
        "--exit-code", action="store_true", help="exit with status 1 when files changed upstream (as git diff does)"
    )

    p = sub.add_parser("regrid", help="harmonize to (time, lat, lon) and regrid to the target grid (Zarr)")
    _add_config(p)
    _add_compute(p)
    p.add_argument("--manifest", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)

    p = sub.add_parser("normalize", help="fit normalization statistics and climatology on the training period")
    _add_config(p)
    _add_compute(p)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)

    p = sub.add_parser("windows", help="write the normalized cube and window indices (Zarr)")
    _add_config(p)
    _add_compute(p)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--stats", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)


def _add_model_steps(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The steps of one run: ``train`` and ``evaluate``."""
    p = sub.add_parser("train", help="train one run's model, checkpointing every epoch, tracked in MLflow")
    _add_config(p)
    p.add_argument("--run", required=True, help="run name (one of the config's runs)")
    p.add_argument("--windows", type=Path, required=True)
    p.add_argument("--stats", type=Path, required=True)
    p.add_argument("--out-dir", type=Path, required=True)
    p.add_argument(
        "--time-limit-minutes",
        type=float,
        default=None,
        help="the job's time limit: checkpoint and exit non-zero shortly before it (rerun resumes)",
    )

    p = sub.add_parser("evaluate", help="score a trained run and the baselines on the test period")
    _add_config(p)
    p.add_argument("--run", required=True)
    p.add_argument("--windows", type=Path, required=True)
    p.add_argument("--stats", type=Path, required=True)
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--out-dir", type=Path, required=True)


def _add_verify(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "verify", help="check every chunk of a pipeline Zarr store against the digests it was written with"
    )
    p.add_argument("stores", type=Path, nargs="+", help="regridded or windows stores (.zarr)")


def _add_ensemble(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "ensemble",
        help="score a seed ensemble (runs that differ only in train.seed): its mean like a network, its CRPS, "
        "spread-skill ratio and rank histogram; logged as its own MLflow run",
    )
    _add_config(p)
    p.add_argument(
        "--ensemble",
        required=True,
        help="the ensemble's name, e.g. convlstm-ens (its members: the runs that differ only in train.seed)",
    )
    p.add_argument("--predictions", type=Path, nargs="+", required=True, help="predictions.nc of each member")
    p.add_argument("--windows", type=Path, required=True)
    p.add_argument("--stats", type=Path, required=True)
    p.add_argument("--out-dir", type=Path, required=True)


def _add_compare(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "compare",
        help="one table and one plot comparing all runs and baselines; with a "
        "configuration, also tags the sweep's MLflow runs and registers the best model (champion)",
    )
    _add_config(p)
    p.add_argument("--metrics", type=Path, nargs="+", required=True, help="metrics.csv of each run")
    p.add_argument(
        "--ensembles",
        type=Path,
        nargs="*",
        default=[],
        help="metrics.csv of each ensemble (the ensemble step's): their ensemble means are listed as rows",
    )
    p.add_argument(
        "--models",
        type=Path,
        nargs="*",
        default=[],
        help="model.pt of each run (its mlflow_run_id.txt names the MLflow run)",
    )
    p.add_argument("--out-csv", type=Path, required=True)
    p.add_argument("--out-plot", type=Path, required=True)


def _add_forecast(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "forecast",
        help="forecast from the latest input days with the champion (or a given) model; "
        "writes CF netCDF and Zarr in the WeatherBench 2 layout",
    )
    _add_config(p)
    p.add_argument(
        "--stats", type=Path, required=True, help="the statistics file of the model's run (normalize output)"
    )
    which = p.add_mutually_exclusive_group()
    which.add_argument("--checkpoint", type=Path, default=None, help="a checkpoint file (model.pt, best.pt)")
    which.add_argument("--run-id", default=None, help="an MLflow run id (its artifact checkpoints/best.pt)")
    p.add_argument("--init-date", default=None, help="initial date YYYY-MM-DD (default: source.end)")
    p.add_argument("--out-nc", type=Path, required=True, help="netCDF output")
    p.add_argument("--out-zarr", type=Path, required=True, help="Zarr output (a directory)")
    p.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="fetched input files and downloaded checkpoints (default <resources_dir>/forecast/<name>)",
    )


def _add_mlflow_sync(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "mlflow-sync",
        help="copy the runs of a local MLflow store (offline jobs) to a tracking server: params, metric "
        "histories, tags, artifacts, models, registered versions and aliases; a rerun copies only what is new",
    )
    _add_config(p)
    p.add_argument(
        "--from",
        dest="source",
        default=None,
        help="the store the jobs logged to (default: the configuration's mlflow.tracking_uri, else sqlite:///mlflow.db)",
    )
    p.add_argument(
        "--to",
        dest="target",
        required=True,
        help="the tracking server (or store) to copy into, e.g. http://login01:5000; credentials go in "
        "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD, never in the URI",
    )
    p.add_argument(
        "--experiment",
        nargs="+",
        action="extend",
        default=[],
        metavar="NAME",
        help="experiments to copy (default: all; Default only when it holds runs)",
    )


def _config(args: argparse.Namespace) -> dict[str, Any]:
    from conv2dlstm.config.validate import load_config

    if args.config_json is not None and not args.config_json.strip():
        raise ConfigError(
            '--config-json is empty (the rules pass "$CONV2DLSTM_CONFIG", which the Snakefile sets); run '
            "the step through Snakemake, or give the configuration with --config FILE"
        )
    return load_config(args.config, json_text=args.config_json)


def _step_config(args: argparse.Namespace, full: dict[str, Any]) -> dict[str, Any]:
    """What the step ``args.step`` may read of the configuration ``full`` (for train and evaluate, in
    the configuration of the run ``args.run``).

    Each step sees only the keys that determine it or run it (conv2dlstm.config.keys): reading any other
    key is a KeyError, not a silent dependency that would not rerun the step when it changes.
    """
    from conv2dlstm.config.keys import step_view
    from conv2dlstm.config.validate import run_config

    step = args.step
    return step_view(run_config(full, args.run) if step in ("train", "evaluate") else full, step)


def _validate_config(args: argparse.Namespace) -> None:
    import yaml

    sys.stdout.write(yaml.safe_dump(_config(args), sort_keys=False))


def _models(args: argparse.Namespace) -> None:
    from conv2dlstm.config.modelsize import grid_shape
    from conv2dlstm.training.models import parameter_counts

    cfg = _config(args)
    height, width = grid_shape(cfg["grid"])
    print(
        f"networks on the {height} x {width} grid, {len(cfg['variables']['inputs'])} input and "
        f"{len(cfg['variables']['targets'])} target variable(s), {cfg['windows']['input_steps']} input steps, "
        f"{cfg['windows']['lead_steps']} lead(s) (model.name: {cfg['model']['name']}):"
    )
    for name, count in parameter_counts(cfg).items():
        mark = "*" if name == cfg["model"]["name"] else " "
        print(f"{mark} {name:<14} {count:>14,}" if isinstance(count, int) else f"{mark} {name:<14} {count}")


def _config_defaults(args: argparse.Namespace) -> None:
    from conv2dlstm.config import defaults

    if args.check is not None:
        defaults.check(args.check.read_text() if args.check.is_file() else "", path=str(args.check))
        print(f"{args.check}: as the schema gives it")
    elif args.write is not None:
        args.write.write_text(defaults.render())
        print(f"{args.write}: written from the schema")
    else:
        sys.stdout.write(defaults.render())


def _verify(args: argparse.Namespace) -> None:
    from conv2dlstm import zarrstore

    for store, problems in zarrstore.verify_stores(args.stores):  # raises after the last, if damaged
        print(f"{store}: {'ok' if not problems else 'DAMAGED'}", *(f"  {p}" for p in problems), sep="\n")


def _ui_address(args: argparse.Namespace) -> None:
    from conv2dlstm.tracking import store as tracking

    cfg = _config(args)
    address = tracking.ui_address(tracking.resolve_tracking_uri(cfg), cfg["experiment"], args.base)
    if args.label:
        print(f"MLflow UI: {address}  (the training runs of experiment {cfg['experiment']!r}; Ctrl-C stops it)")
    else:
        print(address)


def _summary(args: argparse.Namespace) -> None:
    from conv2dlstm.evaluation import results

    print(results.summary_main(_config(args)))


def _tables(args: argparse.Namespace) -> None:
    from conv2dlstm.evaluation import results

    cfg = _config(args)
    body = results.tables_main(cfg, write=args.write, check=args.check)
    if args.check is not None:
        print(f"{args.check}: the results of experiment {cfg['experiment']!r} match")
    elif args.write is not None:
        print(f"{args.write}: the block of experiment {cfg['experiment']!r} is up to date")
    else:
        print(body)


def _compare(args: argparse.Namespace) -> None:
    view = None
    if args.config is not None or args.config_json is not None:
        from conv2dlstm.config.keys import step_view

        view = step_view(_config(args), "compare")
    importlib.import_module("conv2dlstm.steps.compare").main(
        metrics=args.metrics,
        out_csv=args.out_csv,
        out_plot=args.out_plot,
        cfg=view,
        models=args.models,
        ensembles=args.ensembles,
    )


def _forecast(args: argparse.Namespace) -> None:
    from conv2dlstm.config.keys import step_view

    full = _config(args)
    importlib.import_module("conv2dlstm.steps.forecast").main(
        step_view(full, "evaluate"),  # reads what evaluate may read: the data keys, devices, tracking, paths
        stats=args.stats,
        out_nc=args.out_nc,
        out_zarr=args.out_zarr,
        work_dir=args.work_dir,
        checkpoint=args.checkpoint,
        run_id=args.run_id,
        init_date=args.init_date,
    )


def _mlflow_sync(args: argparse.Namespace) -> None:
    from conv2dlstm.tracking import sync

    source = args.source
    if source is None:
        given = args.config is not None or args.config_json is not None
        source = sync.default_source(_config(args) if given else None)
    report = sync.sync(source, args.target, args.experiment)
    print(report.summary())


def _synth(args: argparse.Namespace) -> None:
    cfg = _step_config(args, _config(args))
    importlib.import_module("conv2dlstm.steps.synthetic").main(cfg, out_dir=args.out_dir)


def _fetch(args: argparse.Namespace) -> None:
    cfg = _step_config(args, _config(args))
    importlib.import_module("conv2dlstm.steps.fetch").main(cfg, out_dir=args.out_dir)


def _check_upstream(args: argparse.Namespace) -> int:
    report = importlib.import_module("conv2dlstm.steps.check_upstream").main(_config(args), download=args.download)
    return 1 if args.exit_code and report.changed else 0


def _regrid(args: argparse.Namespace) -> None:
    cfg = _step_config(args, _config(args))
    importlib.import_module("conv2dlstm.steps.regrid").main(
        cfg, manifest=args.manifest, out=args.out, threads=args.threads, memory_mb=args.memory_mb
    )


def _normalize(args: argparse.Namespace) -> None:
    cfg = _step_config(args, _config(args))
    importlib.import_module("conv2dlstm.steps.normalize").main(
        cfg, data=args.data, out=args.out, threads=args.threads, memory_mb=args.memory_mb
    )


def _windows(args: argparse.Namespace) -> None:
    cfg = _step_config(args, _config(args))
    importlib.import_module("conv2dlstm.steps.windows").main(
        cfg, data=args.data, stats=args.stats, out=args.out, threads=args.threads, memory_mb=args.memory_mb
    )


def _train(args: argparse.Namespace) -> None:
    from conv2dlstm.config.keys import sweep_tags

    full = _config(args)
    cfg = _step_config(args, full)
    train = importlib.import_module("conv2dlstm.steps.train")
    if args.time_limit_minutes:
        importlib.import_module("conv2dlstm.training.preemption").set_deadline(args.time_limit_minutes)
    train.main(cfg, run=args.run, windows=args.windows, stats=args.stats, out_dir=args.out_dir, sweep=sweep_tags(full))


def _evaluate(args: argparse.Namespace) -> None:
    cfg = _step_config(args, _config(args))
    importlib.import_module("conv2dlstm.steps.evaluate").main(
        cfg,
        run=args.run,
        windows=args.windows,
        stats=args.stats,
        checkpoint=args.checkpoint,
        out_dir=args.out_dir,
    )


def _ensemble(args: argparse.Namespace) -> None:
    cfg = _step_config(args, _config(args))
    importlib.import_module("conv2dlstm.steps.ensemble").main(
        cfg,
        name=args.ensemble,
        predictions=args.predictions,
        windows=args.windows,
        stats=args.stats,
        out_dir=args.out_dir,
    )


# The handler of each subcommand of build_parser, by name.
_HANDLERS: dict[str, Callable[[argparse.Namespace], int | None]] = {
    "validate-config": _validate_config,
    "models": _models,
    "config-defaults": _config_defaults,
    "ui-address": _ui_address,
    "summary": _summary,
    "tables": _tables,
    "synth": _synth,
    "fetch": _fetch,
    "check-upstream": _check_upstream,
    "regrid": _regrid,
    "normalize": _normalize,
    "windows": _windows,
    "train": _train,
    "evaluate": _evaluate,
    "ensemble": _ensemble,
    "verify": _verify,
    "compare": _compare,
    "forecast": _forecast,
    "mlflow-sync": _mlflow_sync,
}


def _dispatch(args: argparse.Namespace) -> int:
    """Run the step's handler; its exit status (0 unless the handler returns another)."""
    return _HANDLERS[args.step](args) or 0


def _redact_output() -> None:
    """Defence in depth: every log line, traceback and error this process prints goes through
    :func:`conv2dlstm.redact.redact_text` (no URL credential or token reaches a console or log)."""
    from conv2dlstm.redact import RedactingFilter, redacting_excepthook

    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
    sys.excepthook = redacting_excepthook


def main(argv: list[str] | None = None) -> int:
    from conv2dlstm.redact import redact_text

    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    _redact_output()
    try:
        return _dispatch(args)
    except Conv2dLstmError as exc:
        log.debug("user error", exc_info=True)
        print(f"error: {redact_text(str(exc))}", file=sys.stderr)
        return 2
