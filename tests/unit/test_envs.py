"""The pinned conda environments agree with requirements/lock.txt, and the lock with pyproject.

A pin agrees with the lock when pip, constrained by the lock, would accept it: the lock's own
version, or that version with a local label naming a build (``torch==2.13.0+cu126`` of
envs/train-cu126.yaml).
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _lock() -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements" / "lock.txt").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"lock line {line!r} is not an exact pin"
            pins[_norm(name)] = version
    return pins


def _pip_lines(path: Path) -> list[str]:
    """The ``pip:`` section of a conda environment file: requirements and pip options."""
    env = yaml.safe_load(path.read_text())
    return [line for dep in env["dependencies"] if isinstance(dep, dict) for line in dep["pip"]]


def _env_pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in _pip_lines(path):
        if line.startswith("-"):  # an option, such as --extra-index-url
            continue
        req = Requirement(line)
        spec = list(req.specifier)
        assert len(spec) == 1 and spec[0].operator == "==", f"{path.name}: {line} is not pinned"
        pins[_norm(req.name)] = spec[0].version
    return pins


@pytest.mark.parametrize("env", sorted((REPO / "envs").glob("*.yaml")), ids=lambda p: p.name)
def test_env_pins_match_lock(env):
    lock = _lock()
    pins = _env_pins(env)
    assert pins, f"{env.name} pins nothing"
    for name, version in pins.items():
        assert name in lock, f"{env.name}: {name} is not in requirements/lock.txt"
        accepted = SpecifierSet(f"=={lock[name]}").contains(version, prereleases=True)
        assert accepted and Version(version).public == lock[name], (
            f"{env.name}: {name}=={version} but lock has {lock[name]}"
        )


def test_cuda_train_env_is_the_train_env_with_a_cuda_torch():
    """envs/train-<tag>.yaml: envs/train.yaml but for torch's build, taken from the PyTorch index of
    that tag."""
    base = yaml.safe_load((REPO / "envs" / "train.yaml").read_text())
    variants = sorted((REPO / "envs").glob("train-cu*.yaml"))
    assert variants, "no CUDA variant of envs/train.yaml"
    for path in variants:
        tag = path.stem.removeprefix("train-")
        env = yaml.safe_load(path.read_text())
        assert env["name"] == f"{base['name']}-{tag}" and env["channels"] == base["channels"]
        conda = [dep for dep in env["dependencies"] if not isinstance(dep, dict)]
        assert conda == [dep for dep in base["dependencies"] if not isinstance(dep, dict)]
        pins, base_pins = _env_pins(path), _env_pins(REPO / "envs" / "train.yaml")
        assert {k: v for k, v in pins.items() if k != "torch"} == {k: v for k, v in base_pins.items() if k != "torch"}
        assert Version(pins["torch"]).local == tag and Version(pins["torch"]).public == base_pins["torch"]
        # An extra index: the other packages still come from PyPI.
        options = [line for line in _pip_lines(path) if line.startswith("-")]
        assert options == [f"--extra-index-url https://download.pytorch.org/whl/{tag}"]


def test_lock_satisfies_pyproject_and_envs_cover_it():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    lock = _lock()
    covered = set()
    for env in (REPO / "envs").glob("*.yaml"):
        covered |= set(_env_pins(env))
    reqs = list(project["dependencies"]) + list(project["optional-dependencies"]["workflow"])
    for line in reqs:
        req = Requirement(line)
        name = _norm(req.name)
        assert name in lock, f"{req.name} is a dependency but not in requirements/lock.txt"
        assert req.specifier.contains(lock[name], prereleases=True), f"lock {name}=={lock[name]} violates {line}"
        assert name in covered, f"{req.name} is in no envs/*.yaml"
    assert lock["torch"] == "2.13.0"
