"""Importing conv2dlstm sets OpenMP's waiting (spin briefly, then sleep) before torch loads, unless
the environment chose: then it is left as it is."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import conv2dlstm

NAMES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
SHOW = f"import json, os, conv2dlstm; print(json.dumps({{n: os.environ.get(n) for n in {NAMES!r}}}))"


def environment_after_import(**given: str) -> dict[str, str | None]:
    env = {k: v for k, v in os.environ.items() if k not in NAMES}
    env.update(given)
    out = subprocess.run([sys.executable, "-c", SHOW], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_an_environment_without_either_gets_the_brief_spin() -> None:
    assert environment_after_import() == conv2dlstm.OPENMP_WAIT
    assert conv2dlstm.OPENMP_WAIT == {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "1000"}


@pytest.mark.parametrize("name, value", [("OMP_WAIT_POLICY", "ACTIVE"), ("GOMP_SPINCOUNT", "300000")])
def test_an_environment_that_sets_either_is_left_as_it_is(name: str, value: str) -> None:
    expected: dict[str, str | None] = {n: None for n in NAMES}
    expected[name] = value
    assert environment_after_import(**{name: value}) == expected
