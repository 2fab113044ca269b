"""How `make setup` chooses torch's build (docs/gpu.md), checked without a network or a GPU.

`make -n` prints the commands setup would run. With ``TORCH_INDEX``, a first pip install takes
``TORCH`` from that index alone, and the second, constrained by requirements/lock.txt, keeps that
build (the lock's ``torch==2.13.0`` accepts a build's local version, ``2.13.0+cu126``); without it,
one install takes ``TORCH`` and the locked packages from the default index.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

REPO = Path(__file__).resolve().parents[2]
INDEX = "https://example.invalid/whl/cu126"

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def setup_commands(venv: Path, **variables: str) -> list[list[str]]:
    """The commands of ``make setup VENV=venv NAME=value ...``, as argument lists, without running them."""
    env = {k: v for k, v in os.environ.items() if k not in {"TORCH", "TORCH_INDEX", "MAKEFLAGS", "MFLAGS", "MAKELEVEL"}}
    args = [f"{name}={value}" for name, value in variables.items()]
    out = subprocess.run(
        ["make", "--no-print-directory", "-n", "setup", f"VENV={venv}", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert not venv.exists()  # nothing ran
    return [shlex.split(line) for line in out.splitlines() if line.strip()]


def pip_installs(commands: list[list[str]]) -> list[list[str]]:
    """The ``pip install`` commands, each from ``install`` on, in order."""
    return [cmd[cmd.index("install") :] for cmd in commands if "pip" in cmd and "install" in cmd]


def lock_pin(name: str) -> str:
    """The ``name==version`` line of requirements/lock.txt."""
    for line in (REPO / "requirements" / "lock.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#") and Requirement(line).name == name:
            return line.strip()
    raise AssertionError(f"{name} is not in requirements/lock.txt")


def test_torch_index_is_used_for_torch_alone(tmp_path: Path) -> None:
    installs = pip_installs(setup_commands(tmp_path / "venv", TORCH_INDEX=INDEX))
    torch = [cmd for cmd in installs if lock_pin("torch") in cmd]
    assert len(torch) == 1, installs
    (cmd,) = torch
    assert cmd[cmd.index("--index-url") + 1] == INDEX
    # torch first; then everything else from the default index, constrained by the lock.
    rest = installs[installs.index(cmd) + 1 :]
    assert rest and all("-c" in c and "requirements/lock.txt" in c for c in rest), installs
    assert not any("--index-url" in c or "--extra-index-url" in c for c in rest), installs


def test_without_torch_index_every_install_uses_the_default_index(tmp_path: Path) -> None:
    installs = pip_installs(setup_commands(tmp_path / "venv"))
    assert any(lock_pin("torch") in cmd for cmd in installs), installs
    assert not any(opt in cmd for cmd in installs for opt in ("--index-url", "--extra-index-url")), installs


def test_torch_can_name_a_build(tmp_path: Path) -> None:
    """TORCH=torch==2.13.0+cu126: an installed 2.13.0+cpu does not satisfy it, so pip replaces it."""
    installs = pip_installs(setup_commands(tmp_path / "venv", TORCH="torch==2.13.0+cu126", TORCH_INDEX=INDEX))
    (cmd,) = [cmd for cmd in installs if "torch==2.13.0+cu126" in cmd]
    assert cmd[cmd.index("--index-url") + 1] == INDEX


def test_lock_accepts_torch_builds_of_its_version() -> None:
    pin = Requirement(lock_pin("torch"))
    assert str(pin.specifier) == "==2.13.0"
    for build in ("2.13.0", "2.13.0+cu126", "2.13.0+cu128", "2.13.0+cpu"):
        assert pin.specifier.contains(build), build
    for other in ("2.13.1", "2.13.1+cu126", "2.12.0+cu126"):
        assert not pin.specifier.contains(other), other
    # The reverse does not hold: a pin of one build refuses the others.
    assert not SpecifierSet("==2.13.0+cu126").contains("2.13.0+cpu")
