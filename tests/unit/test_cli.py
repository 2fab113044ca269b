from __future__ import annotations

import subprocess
import sys

import yaml

from conv2dlstm.cli import main
from tests.support.workflow import job_env


def test_validate_config_prints_defaults(capsys, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train: {epochs: 3}\n")
    assert main(["validate-config", "--config", str(cfg)]) == 0
    out = yaml.safe_load(capsys.readouterr().out)
    assert out["train"]["epochs"] == 3 and out["train"]["batch_size"] == 16


def test_bad_config_exits_2_with_named_key(capsys):
    assert main(["validate-config", "--config-json", '{"windows": {"input_steps": 0}}']) == 2
    err = capsys.readouterr().err
    assert "error: config key windows.input_steps" in err
    assert "Traceback" not in err


def test_module_entry_point_exit_code(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "conv2dlstm", "validate-config", "--config", str(tmp_path / "nope.yaml")],
        capture_output=True,
        text=True,
        env=job_env(),
    )
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr


def test_validate_config_shows_what_snakemake_runs_with(capsys, repo_root, tmp_path):
    """`snakemake --configfile X` merges X over config/config.yaml (Snakemake's own update_config);
    `validate-config --config X` fills X from the schema defaults. One set of defaults: the same."""
    import copy

    from snakemake.utils import update_config

    from conv2dlstm.config.validate import validate_config

    base = yaml.safe_load((repo_root / "config/config.yaml").read_text())
    user = tmp_path / "my.yaml"
    user.write_text(
        "grid: {lat: {start: 22.0, stop: 40.0, step: 2.0}}\nsource: {checksums: {a.nc: '" + "0" * 64 + "'}}\n"
        "runs: [{name: a, train: {epochs: 2}}]\n"
    )
    for path in (repo_root / "config/seed_no3.yaml", repo_root / "config/sweep.yaml", user):
        merged = copy.deepcopy(base)
        update_config(merged, yaml.safe_load(path.read_text()))
        assert main(["validate-config", "--config", str(path)]) == 0
        shown = yaml.safe_load(capsys.readouterr().out)
        assert shown == validate_config(merged), path
