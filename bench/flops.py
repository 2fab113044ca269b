"""Training throughput of every registered network against the CPU's measured fp32 peak.

    python bench/flops.py                 # every network, at the default grid and at 128 x 128
    python bench/flops.py --check         # exit 1 when a network misses bench/targets.yaml's fraction

In one process, on the same threads: the practical fp32 peak, the best GFLOP/s of three kernels
(best of several rounds each): a 2048 x 2048 sgemm (``a @ b``: MKL, which torch's ``Linear`` layers
call), a GEMM through oneDNN (a 1 x 1 convolution, whose FLOPs are exactly a matrix
product's) and a 3 x 3 convolution (oneDNN's direct algorithm, so ``flop_counter``'s count is what
it computes). On an AMD CPU MKL's sgemm may run at half of oneDNN's rate (docs/performance.md): the
peak is the machine's, not one library's. Then per network and grid the FLOPs of one training step
(forward and backward, counted by ``torch.utils.flop_counter``, per sample) and its samples per
second (median of rounds after a warm-up), so the achieved GFLOP/s and its fraction of the peak.
Small grids are bound by per-call overhead rather than arithmetic: at the default grid the bench
also times batches of 4 x 16, and the step's batch-independent time (the intercept of time against
batch size: kernel launches, the optimizer, weight-gradient reductions) is reported as a share of a
batch-16 step. Results are printed and written as JSON to bench/results/ (git-ignored).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import conv2dlstm  # before torch loads: the pipeline's OpenMP waiting, unless the environment sets it
import targets

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


def conv_peak(channels: int, kernel: int, size: int, batch: int = 16, rounds: int = 5) -> float:
    """Counted GFLOP/s (``flop_counter``) of the best of ``rounds`` forward passes of a ``kernel`` x
    ``kernel`` convolution, ``channels`` to ``channels`` on ``batch`` maps of ``size`` squared (same
    padding), channels-last, as the networks run theirs."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    conv = torch.nn.Conv2d(channels, channels, kernel, padding=kernel // 2, bias=kernel > 1)
    conv = conv.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    x = torch.randn(batch, channels, size, size).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        with FlopCounterMode(display=False) as counter:
            conv(x)
        flops = counter.get_total_flops()
        best = min(_timed(lambda: conv(x)) for _ in range(rounds))
    return flops / best / 1e9


def peaks() -> dict[str, float]:
    """GFLOP/s of the three kernels of the practical peak (module docstring)."""
    return {
        "sgemm 2048 (MKL)": sgemm_peak(),
        "GEMM via oneDNN (1x1 conv, 1024 ch, 16 x 32 x 32)": conv_peak(1024, 1, 32),
        "3x3 conv (oneDNN, 64 ch, 16 x 128 x 128)": conv_peak(64, 3, 128),
    }


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


def bench_network(name: str, height: int, width: int, peak: float, *, overhead: bool = False) -> dict:
    import torch

    from conv2dlstm.training.models import build_model, count_parameters

    torch.manual_seed(0)
    model = build_model(name, **default_kwargs(name, height, width)).train()
    x = torch.randn(BATCH, 5, 1, height, width)  # (batch, time, channel, lat, lon)
    y = torch.randn(BATCH, 3, 1, height, width)  # (batch, lead, channel, lat, lon)
    flops = step_flops(model, x, y) / BATCH
    rate = samples_per_s(model, x, y)
    achieved = flops * rate / 1e9
    row = {
        "network": name,
        "grid": f"{height}x{width}",
        "parameters": count_parameters(model),
        "gflop_per_sample": flops / 1e9,
        "samples_per_s": rate,
        "gflop_per_s": achieved,
        "fraction_of_peak": achieved / peak,
    }
    if overhead:  # time per step = fixed + per_sample * batch, from batches of 16 and 64
        big = 4 * BATCH
        rate_big = samples_per_s(model, x.repeat(4, 1, 1, 1, 1), y.repeat(4, 1, 1, 1, 1))
        per_sample = (big / rate_big - BATCH / rate) / (big - BATCH)
        fixed = BATCH / rate - BATCH * per_sample
        row.update(
            samples_per_s_batch64=rate_big,
            fixed_ms_per_step=1e3 * fixed,
            fixed_share_batch16=fixed * rate / BATCH,
            fraction_of_peak_batch64=flops * rate_big / 1e9 / peak,
        )
    return row


def main(argv: list[str] | None = None) -> int:
    import torch

    from conv2dlstm.evaluation.results import cpu_model
    from conv2dlstm.training.hostmemory import retain_freed_memory
    from conv2dlstm.training.models import model_names

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 when a target of bench/targets.yaml is missed")
    parser.add_argument("--networks", nargs="*", default=None, help="networks to measure (default: all registered)")
    args = parser.parse_args(argv)
    kernels = peaks()
    peak = max(kernels.values())
    rows = []
    print(
        f"fp32 peak on {torch.get_num_threads()} threads ({cpu_model()}; {targets.describe_instruction_sets()}), "
        f"{conv2dlstm.openmp_waiting()}, "
        f"{retain_freed_memory()}: "
        + ", ".join(f"{kernel} {rate:.1f}" for kernel, rate in kernels.items())
        + f" GFLOP/s; fractions of {peak:.1f}"
    )
    for name in args.networks or model_names():
        for height, width in GRIDS:
            row = bench_network(name, height, width, peak, overhead=(height, width) == GRIDS[0])
            rows.append(row)
            print(
                f"{name:12s} {row['grid']:>8s}: {row['gflop_per_sample']:.3f} GFLOP/sample, "
                f"{row['samples_per_s']:.1f} samples/s, {row['gflop_per_s']:.1f} GFLOP/s = "
                f"{100 * row['fraction_of_peak']:.0f}% of the peak"
                + (
                    f"; batch-independent {row['fixed_ms_per_step']:.1f} ms per step = "
                    f"{100 * row['fixed_share_batch16']:.0f}% of a batch-16 step, batch 64: "
                    f"{row['samples_per_s_batch64']:.1f} samples/s = {100 * row['fraction_of_peak_batch64']:.0f}%"
                    if "fixed_ms_per_step" in row
                    else ""
                )
            )
    targets.write_results(
        "flops",
        {
            "peak_kernels_gflop_per_s": kernels,
            "peak_gflop_per_s": peak,
            "openmp_waiting": conv2dlstm.openmp_waiting(),
            "host_memory": retain_freed_memory(),
            "networks": rows,
        },
    )
    if not args.check:
        return 0
    floors = targets.load()["peak_fraction_min"]
    return targets.report(
        [
            f"{r['network']} at {r['grid']}: {100 * r['fraction_of_peak']:.0f}% < {100 * floors[r['grid']]:.0f}%"
            for r in rows
            if r["fraction_of_peak"] < floors.get(r["grid"], 0.0)
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
