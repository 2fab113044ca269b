from __future__ import annotations

import subprocess
import sys

import yaml

from conv2dlstm.cli import main
from tests.conftest import job_env


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
        capture_output=True, text=True, env=job_env(),
    )
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr
