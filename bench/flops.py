"""Training throughput of every registered network against the CPU's measured fp32 peak.

    python bench/flops.py                 # every network, at the default grid and at 128 x 128
    python bench/flops.py --check         # exit 1 when a network misses bench/targets.yaml's fraction

In one process, on the same threads: the practical fp32 peak, the larger of a big sgemm's GFLOP/s
and a big 3 x 3 convolution's counted GFLOP/s (best of several rounds each: oneDNN may compute a
3 x 3 convolution with fewer multiplications than ``flop_counter`` counts, and the networks'
convolutions are counted the same way, so against sgemm alone they could exceed 100%); then per
network and grid the FLOPs of one training step (forward and backward, counted by
``torch.utils.flop_counter``, per sample) and its samples per second (median of rounds after a
warm-up), so the achieved GFLOP/s and its fraction of the peak. Small grids are bound by per-call
overhead rather than arithmetic: the report gives both grids so the difference shows. Results are
printed and written as JSON to bench/results/ (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import yaml

import conv2dlstm  # before torch loads: the pipeline's OpenMP waiting, unless the environment sets it

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
GRIDS = ((25, 25), (128, 128))
BATCH = 16


def sgemm_peak(n: int = 2048, rounds: int = 5) -> float:
    """GFLOP/s of the best of ``rounds`` ``n x n`` float32 matrix products (2 n^3 FLOPs each)."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    best = min(_timed(lambda: a @ b) for _ in range(rounds))
    return 2 * n**3 / best / 1e9


def conv_peak(channels: int = 64, size: int = 128, batch: int = 16, rounds: int = 5) -> float:
    """Counted GFLOP/s (``flop_counter``'s direct-convolution count) of the best of ``rounds`` forward
    passes of a 3 x 3 convolution, ``channels`` to ``channels`` on ``batch`` maps of ``size`` squared,
    channels-last: oneDNN may compute it with fewer multiplications (Winograd), so this can exceed
    the sgemm peak, and the networks' convolutions are counted the same way."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    conv = torch.nn.Conv2d(channels, channels, 3, padding=1).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    x = torch.randn(batch, channels, size, size).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        with FlopCounterMode(display=False) as counter:
            conv(x)
        flops = counter.get_total_flops()
        best = min(_timed(lambda: conv(x)) for _ in range(rounds))
    return flops / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def step_flops(model, x, y) -> int:
    """FLOPs of one forward + backward of ``model`` on the batch ``x``, ``y``."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def samples_per_s(model, x, y, *, rounds: int = 5, steps: int = 3) -> float:
    """Training samples per second (AdamW step included): median of ``rounds`` of ``steps`` steps."""
    import torch

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def run() -> None:
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            torch.nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()

    run()  # warm-up: oneDNN primitives, allocator
    return x.shape[0] * steps / statistics.median(_timed(run) for _ in range(rounds))


def default_kwargs(name: str, height: int, width: int) -> dict:
    """``build_model`` keyword arguments of the registered network ``name`` with the sizes of
    config/config.yaml, for the default task (SST, 5 input days, 3 leads) on a ``height x width`` grid."""
    from conv2dlstm.config.validate import load_config
    from conv2dlstm.training.models import model_kwargs_from_config

    cfg = load_config(REPO / "config" / "config.yaml")
    return model_kwargs_from_config(
        {**cfg["model"], "name": name},
        input_variables=["sst"],
        target_variables=["sst"],
        input_steps=5,
        lead_steps=3,
        height=height,
        width=width,
    )


def bench_network(name: str, height: int, width: int, peak: float) -> dict:
    import torch

    from conv2dlstm.training.models import build_model, count_parameters

    torch.manual_seed(0)
    model = build_model(name, **default_kwargs(name, height, width)).train()
    x = torch.randn(BATCH, 5, 1, height, width)  # (batch, time, channel, lat, lon)
    y = torch.randn(BATCH, 3, 1, height, width)  # (batch, lead, channel, lat, lon)
    flops = step_flops(model, x, y) / BATCH
    rate = samples_per_s(model, x, y)
    achieved = flops * rate / 1e9
    return {
        "network": name,
        "grid": f"{height}x{width}",
        "parameters": count_parameters(model),
        "gflop_per_sample": flops / 1e9,
        "samples_per_s": rate,
        "gflop_per_s": achieved,
        "fraction_of_peak": achieved / peak,
    }


def main(argv: list[str] | None = None) -> int:
    import torch

    from conv2dlstm.evaluation.results import cpu_model
    from conv2dlstm.training.hostmemory import retain_freed_memory
    from conv2dlstm.training.models import model_names

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 when a target of bench/targets.yaml is missed")
    parser.add_argument("--networks", nargs="*", default=None, help="networks to measure (default: all registered)")
    args = parser.parse_args(argv)
    sgemm, conv = sgemm_peak(), conv_peak()
    peak = max(sgemm, conv)
    rows = []
    print(
        f"fp32 peak: sgemm {sgemm:.1f}, 3x3 convolution {conv:.1f} (counted) GFLOP/s on {torch.get_num_threads()} "
        f"threads ({cpu_model()}), {conv2dlstm.openmp_waiting()}, {retain_freed_memory()}; fractions of {peak:.1f}"
    )
    for name in args.networks or model_names():
        for height, width in GRIDS:
            row = bench_network(name, height, width, peak)
            rows.append(row)
            print(
                f"{name:12s} {row['grid']:>8s}: {row['gflop_per_sample']:.3f} GFLOP/sample, "
                f"{row['samples_per_s']:.1f} samples/s, {row['gflop_per_s']:.1f} GFLOP/s = "
                f"{100 * row['fraction_of_peak']:.0f}% of the peak"
            )
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "flops.json").write_text(
        json.dumps(
            {
                "sgemm_gflop_per_s": sgemm,
                "conv3x3_counted_gflop_per_s": conv,
                "peak_gflop_per_s": peak,
                "openmp_waiting": conv2dlstm.openmp_waiting(),
                "host_memory": retain_freed_memory(),
                "networks": rows,
            },
            indent=1,
        )
    )
    if not args.check:
        return 0
    targets = yaml.safe_load((HERE / "targets.yaml").read_text())["peak_fraction_min"]
    missed = [
        f"{r['network']} at {r['grid']}: {100 * r['fraction_of_peak']:.0f}% < {100 * targets[r['grid']]:.0f}%"
        for r in rows
        if r["fraction_of_peak"] < targets.get(r["grid"], 0.0)
    ]
    for line in missed:
        print(f"MISSED {line}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
