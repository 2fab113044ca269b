"""Benchmarks of the pipeline's hot paths on generated data; targets in bench/targets.yaml.

    python bench/run.py                  # regrid, streaming and training benchmarks
    python bench/run.py --pipeline       # also the whole default Snakemake pipeline
    python bench/run.py --check          # exit 1 when a target in bench/targets.yaml is missed

Results are printed and written as JSON to bench/results/ (git-ignored). Training runs on CUDA
too when a GPU is present (bf16 autocast), reported separately.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import targets

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def bench_regrid(work: Path) -> dict:
    """Default config: synth -> fetch -> regrid; time the regrid step alone."""
    from conv2dlstm.config.validate import load_config
    from conv2dlstm.steps import fetch, regrid, synthetic

    cfg = load_config(REPO / "config" / "config.yaml")
    os.chdir(work)
    synthetic.main(cfg, out_dir=Path("resources/synthetic/oisst"))
    manifest = fetch.main(cfg, out_dir=Path("resources/raw/oisst"))
    t0 = time.perf_counter()
    regrid.main(cfg, manifest=manifest, out=work / "regrid.zarr", threads=2, memory_mb=4000)
    seconds = time.perf_counter() - t0
    n_files = len(json.loads(Path(manifest).read_text())["files"])
    return {"regrid_seconds": seconds, "regrid_files_per_s": n_files / seconds}


def bench_stream(work: Path) -> dict:
    """Windows store from the regridded data; random single-sample reads from Zarr."""
    import numpy as np

    from conv2dlstm.artifacts.windows_store import WindowsStore
    from conv2dlstm.config.validate import load_config
    from conv2dlstm.steps import normalize, windows

    cfg = load_config(REPO / "config" / "config.yaml")
    normalize.main(cfg, data=work / "regrid.zarr", out=work / "stats.nc", threads=2, memory_mb=4000)
    windows.main(
        cfg, data=work / "regrid.zarr", stats=work / "stats.nc", out=work / "windows.zarr", threads=2, memory_mb=4000
    )
    store = WindowsStore(work / "windows.zarr")
    order = np.random.default_rng(0).permutation(len(store.starts("train")))[:300]
    t0 = time.perf_counter()
    for i in order:
        store.sample("train", int(i))
    seconds = time.perf_counter() - t0
    return {"stream_samples_per_s": len(order) / seconds}


def bench_train(work: Path) -> dict:
    """Forward + backward samples/s of every network at default sizes on the default grid."""
    import torch

    from conv2dlstm.training.models import build_model, model_names

    sys.path.insert(0, str(HERE))
    from flops import default_kwargs

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    out: dict[str, float] = {}
    for device in devices:
        for name in model_names():
            model = build_model(name, **default_kwargs(name, 25, 25)).to(device)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
            batch = 16 if device == "cpu" else 256
            x = torch.randn(batch, 5, 1, 25, 25, device=device)  # (batch, time, channel, lat, lon)
            y = torch.randn(batch, 3, 1, 25, 25, device=device)
            autocast = (
                torch.autocast("cuda", dtype=torch.bfloat16)
                if device == "cuda"
                else torch.autocast("cpu", enabled=False)
            )

            def step(model=model, opt=opt, x=x, y=y, autocast=autocast) -> None:
                opt.zero_grad(set_to_none=True)
                with autocast:
                    loss = torch.nn.functional.mse_loss(model(x).float(), y)
                loss.backward()
                opt.step()

            for _ in range(3):
                step()
            if device == "cuda":
                torch.cuda.synchronize()
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < 5.0:
                step()
                n += batch
            if device == "cuda":
                torch.cuda.synchronize()
            out[f"train_samples_per_s_{name}_{device}"] = n / (time.perf_counter() - t0)
    return out


def bench_shared_cpu(work: Path) -> dict:
    """Training samples/s alone and next to a busy neighbour: the project's OpenMP waiting against
    sleeping at once (passive) and spinning (spin)."""
    sys.path.insert(0, str(HERE))
    import shared_cpu

    out = {}
    for name in ("project", "passive", "spin"):
        policy = shared_cpu.POLICIES[name]
        alone = shared_cpu.measure(policy, seconds=8, neighbour=False)
        shared = shared_cpu.measure(policy, seconds=8, neighbour=True)
        out |= {
            f"shared_cpu_{name}_alone": alone,
            f"shared_cpu_{name}_shared": shared,
            f"shared_cpu_{name}_ratio": shared / alone,
        }
    return out


def bench_pipeline(work: Path) -> dict:
    """The whole default pipeline in a clean copy of the tracked files, as `make run` runs it."""
    sys.path.insert(0, str(REPO))
    from tests.support.workflow import copy_workflow, job_env

    wf = copy_workflow(work / "wf")
    exe = Path(sys.executable).parent / "snakemake"
    t0 = time.perf_counter()
    subprocess.run([str(exe), "--cores", "2", "--quiet"], cwd=wf, check=True, env=job_env())
    return {"pipeline_seconds": time.perf_counter() - t0}


def check(results: dict, goals: dict) -> list[str]:
    """The targets of ``goals`` (bench/targets.yaml) that ``results`` miss, one line each."""
    missed = []
    if "pipeline_seconds" in results and results["pipeline_seconds"] > goals["pipeline_seconds_max"]:
        missed.append(f"pipeline {results['pipeline_seconds']:.0f} s > {goals['pipeline_seconds_max']} s")
    if results["regrid_seconds"] > goals["regrid_seconds_max"]:
        missed.append(f"regrid {results['regrid_seconds']:.1f} s > {goals['regrid_seconds_max']} s")
    if results["stream_samples_per_s"] < goals["stream_samples_per_s_min"]:
        missed.append(f"streaming {results['stream_samples_per_s']:.0f}/s < {goals['stream_samples_per_s_min']}/s")
    loader_ratio = results["stream_samples_per_s"] / results["train_samples_per_s_convlstm_cpu"]
    if loader_ratio < goals["loader_vs_train_min"]:
        missed.append(f"the Zarr loader feeds {loader_ratio:.1f}x the training speed < {goals['loader_vs_train_min']}x")
    shared = results["shared_cpu_project_shared"] / results["shared_cpu_passive_shared"]
    if shared < goals["shared_vs_passive_min"]:
        missed.append(f"shared CPU: {shared:.2f} of passive waiting's speed < {goals['shared_vs_passive_min']}")
    alone = results["shared_cpu_project_alone"] / results["shared_cpu_spin_alone"]
    if alone < goals["alone_vs_spin_min"]:
        missed.append(f"alone: {alone:.2f} of spinning's speed < {goals['alone_vs_spin_min']}")
    for name, floor in goals["train_samples_per_s_min"].items():
        got = results[f"train_samples_per_s_{name}_cpu"]
        if got < floor:
            missed.append(f"train {name} {got:.0f} samples/s < {floor}")
    return missed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", action="store_true", help="also time the whole default pipeline")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args()
    goals = targets.load()
    work = Path(tempfile.mkdtemp(prefix="conv2dlstm-bench-"))
    cwd = os.getcwd()
    try:
        results: dict = {"machine": platform.platform(), "cpus": os.cpu_count()}
        results.update(bench_regrid(work))
        results.update(bench_stream(work))
        results.update(bench_train(work))
        results.update(bench_shared_cpu(work))
        if args.pipeline:
            results.update(bench_pipeline(work))
    finally:
        os.chdir(cwd)
        shutil.rmtree(work, ignore_errors=True)
    out = targets.write_results("run", results, stamped=True)
    print(json.dumps(results, indent=2))
    status = targets.report(check(results, goals))
    print(f"results: {out}")
    return status if args.check else 0


if __name__ == "__main__":
    raise SystemExit(main())
