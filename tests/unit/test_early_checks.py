"""What the configuration alone decides stops the real Snakemake when it parses the configuration.

Each case is a plain ``snakemake --cores 1 --configfile bad.yaml`` in a fresh copy of the workflow
(Snakemake merges bad.yaml over config/config.yaml): it must exit non-zero with the message naming
the key, before any job (no ``resources/`` nor ``results/`` directory), and
``python -m conv2dlstm validate-config --config bad.yaml`` must report the same message.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.workflow import job_env

GLOBAL_QUARTER_DEGREE = (
    "grid:\n  lat: {start: -89.875, stop: 89.875, step: 0.25}\n  lon: {start: -179.875, stop: 179.875, step: 0.25}\n"
)

# id -> (bad.yaml, fragments of the message). The first fragment starts the message.
CASES: dict[str, tuple[str, tuple[str, ...]]] = {
    "misspelt train key in a run": (
        "runs:\n  - {name: ok}\n  - {name: a, train: {learning_rte: 0.1}}\n",
        ("runs[1] (name 'a'): config key train: unknown key(s) 'learning_rte'", "learning_rate", "check the spelling"),
    ),
    "misspelt model key in a run": (
        "runs:\n  - {name: nb, model: {name: conv2d_lstm, conv2d_lstm: {filter: [8]}}}\n",
        ("runs[0] (name 'nb'): config key model.conv2d_lstm: unknown key(s) 'filter'", "filters"),
    ),
    "batch not divisible by gpus": (
        "train: {batch_size: 30, gpus: 4}\n",
        (
            "config keys train.batch_size and train.gpus: train.batch_size = 30 (the global batch) is not "
            "divisible by the 4 training processes",
            "set train.batch_size to a multiple of 4, e.g. 32",
        ),
    ),
    "batch not divisible by a run's gpus": (
        "runs:\n  - {name: one}\n  - {name: ddp, train: {gpus: 3}}\n",
        (
            "runs[1] (name 'ddp'): config keys train.batch_size and train.gpus: train.batch_size = 16",
            "set train.batch_size to a multiple of 3",
        ),
    ),
    "conv2d_lstm too large for the grid": (
        "model: {name: conv2d_lstm}\n" + GLOBAL_QUARTER_DEGREE,
        (
            "config key model.conv2d_lstm.max_parameters: model conv2d_lstm would have 1,246,269,888 parameters "
            "on the 720x1440 grid",
            "above model.conv2d_lstm.max_parameters = 20,000,000",
            "`model.name: convlstm`",
            "a coarser grid",
            "raise model.conv2d_lstm.max_parameters",
        ),
    ),
    "conv2d_lstm of a run above its max_parameters": (
        "runs:\n  - {name: small}\n  - {name: nb, model: {name: conv2d_lstm, conv2d_lstm: {max_parameters: 100000}}}\n",
        (
            "runs[1] (name 'nb'): config key model.conv2d_lstm.max_parameters: model conv2d_lstm would have "
            "423,891 parameters on the 25x25 grid",
            "100,000",
        ),
    ),
    "grid too small for the conv2d_lstm blocks": (
        "model: {name: conv2d_lstm}\n"
        "grid:\n  lat: {start: 30.5, stop: 34.5, step: 1.0}\n  lon: {start: -69.5, stop: -65.5, step: 1.0}\n",
        (
            "config key model.conv2d_lstm: the 5x5 grid (lat x lon cells of grid.lat and grid.lon) is too small",
            "5x5 -> 1x1 -> -1x-1",
            "model.name: convlstm",
        ),
    ),
    "validation split shorter than a window": (
        "splits:\n  val: {start: '2021-01-01', end: '2021-01-05'}\n",
        (
            "config key splits.val: 2021-01-01..2021-01-05 holds 5 day(s), fewer than one window of "
            "windows.input_steps + windows.lead_steps = 5 + 3 = 8",
            "lengthen splits.val to at least 8 days",
        ),
    ),
    "windows longer than the test split": (
        "splits:\n  test: {start: '2021-07-01', end: '2021-07-20'}\nwindows: {input_steps: 15, lead_steps: 7}\n",
        (
            "config key splits.test: 2021-07-01..2021-07-20 holds 20 day(s)",
            "= 15 + 7 = 22",
            "lower windows.input_steps or windows.lead_steps",
        ),
    ),
    "impossible date in a split": (
        "splits:\n  val: {start: '2019-05-01', end: '2019-05-32'}\n",
        (
            "config key splits.val.end: '2019-05-32' is not a calendar date (day is out of range for month); "
            "write it as YYYY-MM-DD",
        ),
    ),
    "impossible source.end": (
        "source: {end: '2019-02-30'}\n",
        ("config key source.end: '2019-02-30' is not a calendar date (day is out of range for month)",),
    ),
    "impossible synthetic.start": (
        "synthetic: {start: '2019-13-01'}\n",
        ("config key synthetic.start: '2019-13-01' is not a calendar date (month must be in 1..12)",),
    ),
}


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=job_env(), timeout=300)


@pytest.mark.parametrize(("bad_yaml", "fragments"), CASES.values(), ids=CASES.keys())
def test_config_error_stops_snakemake_before_any_job(snakemake_exe, workflow_copy, bad_yaml, fragments):
    bad = workflow_copy / "bad.yaml"
    bad.write_text(bad_yaml)

    proc = _run([snakemake_exe, "--cores", "1", "--configfile", str(bad)], workflow_copy)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert f"invalid configuration: {fragments[0]}" in out, out
    for fragment in fragments[1:]:
        assert fragment in out, (fragment, out)
    assert not (workflow_copy / "resources").exists(), "a job ran"
    assert not (workflow_copy / "results").exists(), "a job ran"

    cli = _run([sys.executable, "-m", "conv2dlstm", "validate-config", "--config", str(bad)], workflow_copy)
    assert cli.returncode == 2, cli.stdout + cli.stderr
    message = cli.stderr.strip().splitlines()[-1].removeprefix("error: ")
    assert message.startswith(fragments[0]), message
    assert f"invalid configuration: {message}" in out  # the same words, whether Snakemake or the CLI reads it
