"""Training speed on a CPU shared with another busy process, per OpenMP waiting policy.

    python bench/shared_cpu.py [--seconds 10] [--policies project passive spin]

Each measurement is a fresh process training the default ConvLSTM (config/config.yaml sizes, batch
16, 25 x 25 grid, forward + backward + AdamW) for ``--seconds`` and reporting samples/s, either
alone or next to a neighbour: a second process doing the same training with the same policy (what a
second job of the pipeline on the same node does). The policies differ only in the environment the
process starts with (OpenMP reads it once, when torch loads):

- ``project``: what importing ``conv2dlstm`` sets when the environment sets neither variable
  (``conv2dlstm.OPENMP_WAIT``: OMP_WAIT_POLICY=PASSIVE, GOMP_SPINCOUNT=1000, a brief spin, then sleep);
- ``passive``: OMP_WAIT_POLICY=PASSIVE (threads sleep at once);
- ``spin``: OMP_WAIT_POLICY=ACTIVE (threads spin while they wait);
- ``libgomp``: libgomp's own default, GOMP_SPINCOUNT=300000 (spin for a while, then sleep);
- ``one-thread``: OMP_NUM_THREADS=1.

Every other policy has OMP_NUM_THREADS = the cores. Alone and shared are measured side by side in
one run. The targets (bench/targets.yaml): the project's policy keeps ``shared_vs_passive_min`` of
PASSIVE's speed when shared (the fair share) and ``alone_vs_spin_min`` of ACTIVE's speed alone.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

WORKER = r"""
import sys, time
import conv2dlstm  # before torch loads: OpenMP reads how to wait once, when torch loads it
import torch
from conv2dlstm.config.validate import load_config
from conv2dlstm.training.models import build_model, model_kwargs_from_config

seconds = float(sys.argv[1])
cfg = load_config(sys.argv[2])
kwargs = model_kwargs_from_config(cfg["model"], input_variables=["sst"], target_variables=["sst"],
                                  input_steps=5, lead_steps=3, height=25, width=25)
model = build_model("convlstm", **kwargs)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
x = torch.randn(16, 5, 1, 25, 25)  # (batch, time, channel, lat, lon)
y = torch.randn(16, 3, 1, 25, 25)

def step():
    opt.zero_grad(set_to_none=True)
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()

for _ in range(3):
    step()
n, t0 = 0, time.perf_counter()
while time.perf_counter() - t0 < seconds:
    step()
    n += 16
print(n / (time.perf_counter() - t0), flush=True)
"""

POLICIES = {
    "project": {},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "spin": {"OMP_WAIT_POLICY": "ACTIVE"},
    "libgomp": {"GOMP_SPINCOUNT": "300000"},
    "one-thread": {"OMP_NUM_THREADS": "1"},
}


def _env(policy: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")}
    env["OMP_NUM_THREADS"] = str(os.cpu_count() or 1)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    env.update(policy)
    return env


def _start(policy: dict[str, str], seconds: float) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, str(seconds), str(REPO / "config/config.yaml")],
        env=_env(policy),
        stdout=subprocess.PIPE,
        text=True,
    )


def measure(policy: dict[str, str], *, seconds: float, neighbour: bool) -> float:
    """Samples/s of one training process with ``policy``, alone or next to one with the same policy."""
    other = _start(policy, seconds + 20) if neighbour else None
    try:
        if other is not None:
            time.sleep(3.0)  # the neighbour is past its start-up and busy
        proc = _start(policy, seconds)
        out, _ = proc.communicate(timeout=seconds + 120)
        if proc.returncode:
            raise RuntimeError(f"worker failed ({proc.returncode})")
        return float(out.strip().splitlines()[-1])
    finally:
        if other is not None:
            other.kill()
            other.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--policies", nargs="*", choices=list(POLICIES), default=list(POLICIES))
    args = parser.parse_args()
    rows = {}
    for name in args.policies:
        alone = measure(POLICIES[name], seconds=args.seconds, neighbour=False)
        shared = measure(POLICIES[name], seconds=args.seconds, neighbour=True)
        rows[name] = {"alone": alone, "shared": shared, "ratio": shared / alone}
    print(f"cores: {os.cpu_count()}; convlstm default, batch 16, 25x25; {args.seconds:.0f} s per measurement")
    print(f"{'policy':<12} {'alone/s':>9} {'shared/s':>9} {'shared/alone':>13}")
    for name, r in rows.items():
        print(f"{name:<12} {r['alone']:9.1f} {r['shared']:9.1f} {r['ratio']:13.2f}")
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
