"""How `make setup` chooses torch's build (docs/gpu.md), checked without a network or a GPU.

`make -n` prints the commands setup would run. A first pip install takes ``TORCH`` alone: from
``TORCH_INDEX`` when it is set, otherwise from the default index constrained by
requirements/lock.txt. The rest, constrained by the lock, keeps that build (the lock's
``torch==2.13.0`` accepts a build's local version, ``2.13.0+cu126``): uv installs it (``UV``, a
pinned release), and pip where uv cannot.
"""

from __future__ import annotations

import os
import re
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
    commands: list[list[str]] = []
    for line in out.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        command: list[str] = []
        for token in [*lexer, ";"]:
            if token in {"&&", "||", ";", "{", "}"}:
                if command:
                    commands.append(command)
                command = []
            else:
                command.append(token)
    return commands


def pip_installs(commands: list[list[str]]) -> list[list[str]]:
    """The ``pip install`` and ``uv pip install`` commands, each from ``install`` on, in order."""
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
    assert_locked_rest(installs[installs.index(cmd) + 1 :])


def assert_locked_rest(rest: list[list[str]]) -> None:
    """After torch: uv (a pinned release), then the project by uv and by pip, both from the lock."""
    uv = [c for c in rest if any(arg.startswith("uv") for arg in c[1:])]
    assert len(uv) == 1 and any(arg.startswith("uv==") for arg in uv[0]), rest
    project = [c for c in rest if ".[workflow,test]" in c]
    assert len(project) == 2, rest  # uv, and pip where uv fails
    assert all("-c" in c and c[c.index("-c") + 1] == "requirements/lock.txt" for c in project), rest
    assert not any("--index-url" in c or "--extra-index-url" in c for c in rest), rest


def test_without_torch_index_every_install_uses_the_default_index(tmp_path: Path) -> None:
    installs = pip_installs(setup_commands(tmp_path / "venv"))
    assert not any(opt in cmd for cmd in installs for opt in ("--index-url", "--extra-index-url")), installs
    # torch alone first, its dependencies constrained by the lock, then the rest.
    (cmd,) = [cmd for cmd in installs if lock_pin("torch") in cmd]
    assert cmd[cmd.index("-c") + 1] == "requirements/lock.txt" and "-e" not in cmd, cmd
    assert_locked_rest(installs[installs.index(cmd) + 1 :])


def test_uv_failing_falls_back_to_pip() -> None:
    """The recipe's own shell line: pip installs the project exactly when installing uv, or uv's
    install, fails (each command replaced by its exit status; the control flow is the Makefile's)."""
    venv = "/nonexistent/venv"
    out = subprocess.run(
        ["make", "--no-print-directory", "-n", "setup", f"VENV={venv}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.replace("\\\n", " ")
    (recipe,) = [line for line in out.splitlines() if "uv==" in line]
    get_uv = re.compile(re.escape(f"{venv}/bin/python -m pip install") + r' --quiet "uv==[^"]+"')
    uv_install = re.compile(re.escape(f"{venv}/bin/uv pip install") + r"[^;]*")
    pip_install = re.compile(re.escape(f"{venv}/bin/python -m pip install") + r"[^;]*")
    for get_uv_rc, uv_rc, pip_runs in ((0, 0, False), (1, 0, True), (0, 1, True)):
        script = get_uv.sub(f"(exit {get_uv_rc})", recipe, count=1)
        script = uv_install.sub(f"(exit {uv_rc})", script, count=1)
        script = pip_install.sub("echo PIP-RAN", script, count=1)
        assert "/nonexistent" not in script, script
        run = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30)
        assert run.returncode == 0 and ("PIP-RAN" in run.stdout) is pip_runs, (get_uv_rc, uv_rc, run.stdout)


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
