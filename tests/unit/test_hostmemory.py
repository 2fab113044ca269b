"""Importing conv2dlstm.training keeps the host memory torch frees: a large tensor allocated again
reuses the pages of the last one instead of faulting in fresh ones, unless the environment chose."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from conv2dlstm.errors import ConfigError
from conv2dlstm.training import hostmemory

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
TENSOR_PAGES = 64 * 2**20 // 4096  # a 64 MiB tensor: above glibc's largest mmap threshold (32 MiB)

# a process that imports the training package, then allocates, fills and frees a 64 MiB tensor 24
# times: its minor page faults per allocation over the last 8 (the heap settles over the first few, as
# over a training run's first steps), and its allocator's state
MEASURE = f"""
import resource, torch
from conv2dlstm.training import hostmemory
for i in range(24):
    if i == 16:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.empty({TENSOR_PAGES * 1024}); t.fill_(1.0); del t
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 8)
print(hostmemory.retain_freed_memory())
"""


def allocate_in_new_process(**given: str) -> tuple[float, str]:
    """(page faults per 64 MiB allocation, the state text) of :data:`MEASURE` with the environment ``given``."""
    env = {k: v for k, v in os.environ.items() if k not in (*hostmemory.ENVIRONMENT, hostmemory.OPT_OUT)}
    env.pop("GLIBC_TUNABLES", None)
    env.update(given)
    out = subprocess.run(
        [sys.executable, "-c", MEASURE], env=env, capture_output=True, text=True, check=True, timeout=120
    ).stdout.splitlines()
    return float(out[0]), out[1]


@pytest.mark.skipif(not GLIBC, reason="the mechanism is glibc's mallopt")
def test_freed_memory_is_reused_without_page_faults() -> None:
    faults, state = allocate_in_new_process()
    assert state.startswith("freed memory kept (glibc mallopt M_MMAP_MAX=0")
    assert faults < TENSOR_PAGES / 100, f"{faults:.0f} page faults per allocation of {TENSOR_PAGES} pages"


@pytest.mark.skipif(not GLIBC, reason="the mechanism is glibc's mallopt")
@pytest.mark.parametrize(
    "given",
    [{"CONV2DLSTM_MALLOC": "system"}, {"MALLOC_TOP_PAD_": "131072"}, {"GLIBC_TUNABLES": "glibc.malloc.top_pad=131072"}],
    ids=["opt-out", "malloc-variable", "glibc-tunables"],
)
def test_an_environment_that_chooses_is_left_as_it_is(given: dict[str, str]) -> None:
    """Without the mechanism, each allocation faults its pages in again (what the mechanism removes)."""
    faults, state = allocate_in_new_process(**given)
    name, value = next(iter(given.items()))
    assert f"{name}={value}" in state
    assert faults > TENSOR_PAGES / 2, f"{faults:.0f} page faults per allocation of {TENSOR_PAGES} pages"


def test_an_unknown_choice_is_refused_with_the_values_it_takes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hostmemory, "_state", None)
    monkeypatch.setenv(hostmemory.OPT_OUT, "tcmalloc")
    with pytest.raises(ConfigError, match=r"CONV2DLSTM_MALLOC='tcmalloc' is not keep or system; unset it"):
        hostmemory.retain_freed_memory()


def test_environment_tuning_names_what_the_environment_gives() -> None:
    assert hostmemory.environment_tuning({}) is None
    assert hostmemory.environment_tuning({"GLIBC_TUNABLES": "glibc.rtld.nns=2"}) is None
    given = {"MALLOC_ARENA_MAX": "2", "GLIBC_TUNABLES": "glibc.malloc.tcache_count=0", "PATH": "/bin"}
    assert hostmemory.environment_tuning(given) == "MALLOC_ARENA_MAX=2 GLIBC_TUNABLES=glibc.malloc.tcache_count=0"


def test_the_data_steps_leave_the_allocator_as_it_comes() -> None:
    """Regrid, normalize and windows bound their memory by chunks (bench/scale.py measures it): the
    training package, which keeps freed memory, is not imported on their way."""
    code = (
        "import sys, conv2dlstm.cli, conv2dlstm.steps.fetch, conv2dlstm.steps.synthetic, "
        "conv2dlstm.steps.regrid, conv2dlstm.steps.normalize, conv2dlstm.steps.windows; "
        "print(sorted(m for m in sys.modules if m.startswith('conv2dlstm.training')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"


def test_the_train_step_refuses_an_unknown_choice_before_any_work(tmp_path: Path) -> None:
    env = {**os.environ, hostmemory.OPT_OUT: "jemalloc"}
    out = tmp_path / "train"
    args = ["--config-json", "{}", "--run", "convlstm", "--windows", "w", "--stats", "s", "--out-dir", str(out)]
    done = subprocess.run(
        [sys.executable, "-m", "conv2dlstm", "train", *args], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2, done.stderr
    assert (
        "error: CONV2DLSTM_MALLOC='jemalloc' is not keep or system; unset it (keep) or set it to system" in done.stderr
    )
    assert "Traceback" not in done.stderr and not out.exists()
