"""Every registered network with its 4-D weights in the default layout (NCHW) and channels-last (NHWC).

    python bench/memory_format.py [--rounds 5] [--grids 25 128] [--networks ...]
    python bench/memory_format.py --check   # exit 1 where the registry's layout is the slower one

In one process, on the same threads, per network and grid: a training step (forward, backward,
AdamW; batch 16, 5 input days of 1 variable, 3 leads) and a forward pass without gradients, for the
same weights in both layouts, the layouts alternating round by round (median of ``--rounds``), so a
machine whose speed drifts affects both alike. The registry's ``channels_last`` (the layout
:func:`conv2dlstm.training.models.build_model` gives) is printed beside each: it is set where the
step is faster channels-last; ``--check`` fails where the registry's layout makes a step slower than
the other layout by more than ``memory_format_tolerance`` (bench/targets.yaml). Results are printed
and written as JSON to bench/results/ (git-ignored).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import conv2dlstm
import targets
from flops import default_kwargs

HERE = Path(__file__).resolve().parent
BATCH = 16
LAYOUTS = ("nchw", "channels_last")


def _seconds(fn, repeat: int) -> float:
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def bench_network(name: str, size: int, rounds: int) -> dict:
    import torch

    from conv2dlstm.config import networks
    from conv2dlstm.training.models import build_model

    kwargs = default_kwargs(name, size, size)
    x = torch.randn(BATCH, 5, 1, size, size)  # (batch, time, channel, lat, lon)
    y = torch.randn(BATCH, 3, 1, size, size)  # (batch, lead, channel, lat, lon)
    fmt = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
    runs = {}
    for layout in LAYOUTS:
        torch.manual_seed(0)
        model = build_model(name, **kwargs).to(memory_format=fmt[layout]).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

        def step(model=model, optimizer=optimizer) -> None:
            optimizer.zero_grad(set_to_none=True)
            torch.nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()

        def forward(model=model) -> None:
            with torch.no_grad():
                model(x)

        step(), forward()  # warm-up: oneDNN primitives, allocator
        runs[layout] = (step, forward)
    repeat = 3 if size <= 48 else 1
    times: dict[str, dict[str, list[float]]] = {k: {"step": [], "forward": []} for k in LAYOUTS}
    for _ in range(rounds):
        for layout in LAYOUTS:
            step, forward = runs[layout]
            times[layout]["step"].append(_seconds(step, repeat))
            times[layout]["forward"].append(_seconds(forward, repeat))
    med = {k: {part: statistics.median(v) for part, v in t.items()} for k, t in times.items()}
    return {
        "network": name,
        "grid": f"{size}x{size}",
        "registry_channels_last": networks.network(name).channels_last,
        "step_ms": {k: 1000 * v["step"] for k, v in med.items()},
        "forward_ms": {k: 1000 * v["forward"] for k, v in med.items()},
        "step_speedup": med["nchw"]["step"] / med["channels_last"]["step"],
        "forward_speedup": med["nchw"]["forward"] / med["channels_last"]["forward"],
    }


def main(argv: list[str] | None = None) -> int:
    import torch

    from conv2dlstm.evaluation.results import cpu_model
    from conv2dlstm.training.hostmemory import retain_freed_memory
    from conv2dlstm.training.models import model_names

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--grids", type=int, nargs="+", default=[25, 128])
    parser.add_argument("--networks", nargs="*", default=None, help="networks to measure (default: all registered)")
    parser.add_argument("--check", action="store_true", help="exit 1 where the registry's layout is the slower one")
    args = parser.parse_args(argv)
    threads = f"{torch.get_num_threads()} threads, {conv2dlstm.openmp_waiting()}, {retain_freed_memory()}"
    print(f"{cpu_model()}, {threads}; batch {BATCH}")
    print(
        "| network, grid | step NCHW / channels-last (ms) | speed-up | forward NCHW / channels-last (ms) "
        "| speed-up | registry |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    rows = []
    for name in args.networks or model_names():
        for size in args.grids:
            r = bench_network(name, size, args.rounds)
            rows.append(r)
            print(
                f"| {name} {r['grid']} | {r['step_ms']['nchw']:.1f} / {r['step_ms']['channels_last']:.1f} | "
                f"{r['step_speedup']:.2f}x | {r['forward_ms']['nchw']:.1f} / {r['forward_ms']['channels_last']:.1f} | "
                f"{r['forward_speedup']:.2f}x | {'channels-last' if r['registry_channels_last'] else 'NCHW'} |",
                flush=True,
            )
    targets.write_results("memory_format", {"cpu": cpu_model(), "networks": rows})
    if not args.check:
        return 0
    tolerance = targets.load()["memory_format_tolerance"]
    missed = []
    for r in rows:
        chosen_vs_other = r["step_speedup"] if r["registry_channels_last"] else 1 / r["step_speedup"]
        if chosen_vs_other < 1 - tolerance:
            layout = "channels-last" if r["registry_channels_last"] else "NCHW"
            missed.append(
                f"{r['network']} {r['grid']}: its registry layout ({layout}) is {chosen_vs_other:.2f}x the other"
            )
    return targets.report(missed)


if __name__ == "__main__":
    raise SystemExit(main())
