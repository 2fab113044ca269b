"""Training with the host memory torch frees kept (the project's) against glibc as it comes.

    python bench/host_memory.py [--rounds 2] [--grids 25 128] [--networks ...]
    python bench/host_memory.py --check    # exit 1 where keeping the memory is slower (host_memory_tolerance)

Per network and grid, each measurement is a fresh process, as a pipeline's train step is: it
builds the network (the defaults of config/config.yaml, 1 variable, 5 days, 3 leads, batch 16),
warms up, and reports training samples/s (forward, backward, AdamW; median of rounds,
bench/flops.py's ``samples_per_s``), its minor page faults per step and its peak resident memory.
``CONV2DLSTM_MALLOC=system`` leaves glibc's allocator as it comes
(:mod:`conv2dlstm.training.hostmemory`); ``keep`` is the default. The two alternate, process by
process, for ``--rounds`` rounds; the table gives the median per setting. Results are printed and
written as JSON to bench/results/ (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import targets

HERE = Path(__file__).resolve().parent
SETTINGS = ("system", "keep")

WORKER = """
import json, resource, sys
sys.path.insert(0, {here!r})
import flops
import torch
from conv2dlstm.training.models import build_model
name, size = {name!r}, {size}
torch.manual_seed(0)
model = build_model(name, **flops.default_kwargs(name, size, size)).train()
x = torch.randn(flops.BATCH, 5, 1, size, size)  # (batch, time, channel, lat, lon)
y = torch.randn(flops.BATCH, 3, 1, size, size)  # (batch, lead, channel, lat, lon)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
rate = flops.samples_per_s(model, x, y, rounds=5, steps=3)  # 1 + 5 calls of 3 steps
usage = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({{"samples_per_s": rate, "faults_per_step": (usage.ru_minflt - before) / 18,
                  "peak_rss_mib": usage.ru_maxrss / 1024}}))
"""


def measure(name: str, size: int, setting: str) -> dict:
    """One fresh process training ``name`` at ``size`` squared with ``CONV2DLSTM_MALLOC=setting``."""
    env = {**os.environ, "CONV2DLSTM_MALLOC": setting}
    code = WORKER.format(here=str(HERE), name=name, size=size)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    from conv2dlstm.evaluation.results import cpu_model
    from conv2dlstm.training.models import model_names

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--grids", type=int, nargs="+", default=[25, 128])
    parser.add_argument("--networks", nargs="*", default=None, help="networks to measure (default: all registered)")
    parser.add_argument("--check", action="store_true", help="exit 1 where kept memory trains slower (tolerance)")
    args = parser.parse_args(argv)
    print(f"{cpu_model()}, {os.cpu_count()} cores; one process per measurement, {args.rounds} rounds")
    print(
        "| network, grid | samples/s system / kept | speed-up | page faults per step system / kept "
        "| peak RSS MiB system / kept |"
    )
    print("| --- | --- | --- | --- | --- |")
    rows = []
    for name in args.networks or model_names():
        for size in args.grids:
            runs: dict[str, list[dict]] = {s: [] for s in SETTINGS}
            for _ in range(args.rounds):
                for setting in SETTINGS:
                    runs[setting].append(measure(name, size, setting))
            med = {s: {k: statistics.median(r[k] for r in runs[s]) for k in runs[s][0]} for s in SETTINGS}
            rows.append({"network": name, "grid": f"{size}x{size}", "runs": runs, "median": med})
            sys_, keep = med["system"], med["keep"]
            print(
                f"| {name} {size}x{size} | {sys_['samples_per_s']:.1f} / {keep['samples_per_s']:.1f} "
                f"| {keep['samples_per_s'] / sys_['samples_per_s']:.2f}x "
                f"| {sys_['faults_per_step']:,.0f} / {keep['faults_per_step']:,.0f} "
                f"| {sys_['peak_rss_mib']:,.0f} / {keep['peak_rss_mib']:,.0f} |",
                flush=True,
            )
    targets.write_results("host_memory", {"cpu": cpu_model(), "rows": rows})
    if not args.check:
        return 0
    tolerance = targets.load()["host_memory_tolerance"]
    return targets.report(
        [
            f"{r['network']} at {r['grid']}: kept / system = {ratio:.2f} < {1 - tolerance:.2f}"
            for r in rows
            if (ratio := r["median"]["keep"]["samples_per_s"] / r["median"]["system"]["samples_per_s"]) < 1 - tolerance
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
