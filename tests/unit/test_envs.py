"""The pinned conda environments agree with requirements/lock.txt, and the lock with pyproject."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

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


def _env_pins(path: Path) -> dict[str, str]:
    env = yaml.safe_load(path.read_text())
    pins = {}
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            for line in dep["pip"]:
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
        assert lock.get(name) == version, f"{env.name}: {name}=={version} but lock has {lock.get(name)}"


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
