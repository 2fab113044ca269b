"""How each pipeline step's memory and time grow with the size of the raw data.

    python bench/scale.py                    # 1x, 4x, 16x and 64x the default raw bytes
    python bench/scale.py --factors 1 64     # a subset; 64x is 11 GiB of decoded data
    python bench/scale.py --factors 64 --dask-workers 2   # through an external Dask scheduler
    python bench/scale.py --check            # exit 1 when a target in bench/targets.yaml is missed

The default configuration (synthetic OISST, 3 years of daily 0.25 degree files over a 26 x 26
degree box, regridded to 25 x 25) is scaled in the two ways real inputs grow, with the target grid
and the model unchanged:

- 4x: a finer source, 0.125 degree (4x the cells of every file);
- 16x: 0.125 degree and 4x the days (12 years; the splits keep their proportions: train 2/3, val
  and test 1/6 each);
- 64x: 0.0625 degree over the same 12 years.

The factor is the data volume: the decoded raw data (4 variables, float32) is 0.18, 0.71, 2.8 and
11.3 GiB. The files on disk are smaller (int16, zlib) and compress better at the finer resolution.

``--dask-workers N`` runs every factor through an external Dask cluster instead of each step's own:
a ``dask scheduler`` and N ``dask worker`` processes (one thread each, ``--worker-memory`` each),
started here on 127.0.0.1 and handed to the pipeline as ``dask.scheduler_address``; their memory
counts towards every step's peak.

Every step from fetch to evaluate runs as Snakemake runs it (``snakemake --until <rule>``, one step
at a time, in order). Training runs one epoch of at most 40 batches: its data handling (the whole
training period is read and, when it fits, held on the device) is measured, not its convergence.

Memory is the peak, over the step's lifetime, of the summed proportional set size (PSS, from
``/proc/<pid>/smaps_rollup``) of the step's process tree: the ``python -m conv2dlstm`` process and
every process below it (Dask's worker processes included, and an external cluster's scheduler and
workers; Snakemake's ``benchmark:`` max_rss sees only the job's own process). PSS counts a page
shared by several processes once in all, so the sum is the tree's real footprint. Sampled every
0.1 s.

Results are printed as a table (markdown) and written as JSON to bench/results/scale.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import psutil
import yaml

import targets

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

STEPS = ("fetch", "regrid", "normalize", "windows", "train", "evaluate")
"""Measured steps, in pipeline order (``synth`` generates the input and is run, not measured)."""


@dataclass(frozen=True)
class Scale:
    factor: int
    resolution: float  # source cell width, degrees
    years: int  # of daily files

    def config(self) -> dict:
        """The default configuration scaled (only the keys that change; the default fills the rest)."""
        r = self.resolution
        end_year = 2019 + self.years - 1
        n_train = 2 * self.years / 3  # years
        train_end = _date_after_years(n_train)
        val_end = _date_after_years(n_train + self.years / 6)
        return {
            "experiment": f"scale-{self.factor}x",
            "synthetic": {
                "end": f"{end_year}-12-31",
                "lat": [20.0 + r / 2, 46.0 - r / 2],
                "lon": [280.0 + r / 2, 306.0 - r / 2],
                "resolution": r,
            },
            "source": {"end": f"{end_year}-12-31"},
            "splits": {
                "train": {"start": "2019-01-01", "end": _day_before(train_end)},
                "val": {"start": train_end, "end": _day_before(val_end)},
                "test": {"start": val_end, "end": f"{end_year}-12-31"},
            },
            "train": {"epochs": 1, "max_batches_per_epoch": 40},
            "mlflow": {"log_model": False},
        }

    def volume_bytes(self) -> int:
        """Decoded size of the raw data: 4 OISST variables (sst, anom, err, ice) as float32, every cell, every day."""
        import pandas as pd

        cells = round(26 / self.resolution) ** 2
        days = len(pd.date_range("2019-01-01", f"{2019 + self.years - 1}-12-31"))
        return cells * days * 4 * 4


def _date_after_years(years: float) -> str:
    import pandas as pd

    return str((pd.Timestamp("2019-01-01") + pd.Timedelta(days=round(365.25 * years))).date())


def _day_before(date: str) -> str:
    import pandas as pd

    return str((pd.Timestamp(date) - pd.Timedelta(days=1)).date())


SCALES = {1: Scale(1, 0.25, 3), 4: Scale(4, 0.125, 3), 16: Scale(16, 0.125, 12), 64: Scale(64, 0.0625, 12)}


def _pss_bytes(proc: psutil.Process) -> int:
    """Proportional set size of one process (RSS where smaps_rollup is not readable)."""
    try:
        with open(f"/proc/{proc.pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return proc.memory_info().rss
    except psutil.Error:
        return 0


def _is_step(proc: psutil.Process) -> bool:
    try:
        cmd = proc.cmdline()
    except psutil.Error:
        return False
    return "conv2dlstm" in cmd and "-m" in cmd


class TreeMonitor(threading.Thread):
    """Samples the summed PSS of every ``python -m conv2dlstm`` process below ``root`` and its
    descendants; ``peak`` is the largest sum seen."""

    def __init__(self, root: int, interval_s: float = 0.1, also: tuple[int, ...] = ()) -> None:
        super().__init__(daemon=True)
        self.root, self.interval_s, self.also = root, interval_s, also
        self.peak = 0
        self.stop = threading.Event()

    def sample(self) -> int:
        try:
            below = psutil.Process(self.root).children(recursive=True)
        except psutil.Error:
            return 0
        for pid in self.also:  # an external Dask cluster's processes
            try:
                below.append(psutil.Process(pid))
            except psutil.Error:
                pass
        seen: set[int] = set()
        total = 0
        for proc in below:
            if proc.pid in seen or not (_is_step(proc) or proc.pid in self.also):
                continue
            try:
                tree = [proc, *proc.children(recursive=True)]
            except psutil.Error:
                continue
            for p in tree:
                if p.pid not in seen:
                    seen.add(p.pid)
                    total += _pss_bytes(p)
        return total

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, self.sample())
            self.stop.wait(self.interval_s)


class ExternalCluster:
    """A ``dask scheduler`` and ``workers`` ``dask worker`` processes (one thread and ``memory``
    each) on 127.0.0.1, for the pipeline's ``dask.scheduler_address``; stopped on exit."""

    def __init__(self, workers: int, memory: str, work: Path) -> None:
        self.workers, self.memory, self.work = workers, memory, work
        self.procs: list[subprocess.Popen] = []
        self.address = ""
        self.log: IO[str] | None = None

    def __enter__(self) -> ExternalCluster:
        from distributed import Client

        from tests.support.workflow import job_env

        exe = str(Path(sys.executable).parent / "dask")
        self.work.mkdir(parents=True, exist_ok=True)
        file = self.work / "scheduler.json"
        file.unlink(missing_ok=True)
        self.log = log = (self.work / "cluster.log").open("w")
        start = [
            exe,
            "scheduler",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--no-dashboard",
            "--scheduler-file",
            str(file),
        ]
        self.procs.append(subprocess.Popen(start, env=job_env(), stdout=log, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 60
        while not file.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        if not file.exists():
            self.__exit__()
            raise SystemExit(f"the Dask scheduler did not start; see {self.work / 'cluster.log'}")
        self.address = json.loads(file.read_text())["address"]
        for _ in range(self.workers):
            worker = [exe, "worker", "--scheduler-file", str(file), "--nthreads", "1", "--memory-limit", self.memory]
            worker += ["--no-dashboard", "--local-directory", str(self.work / "workers")]
            self.procs.append(subprocess.Popen(worker, env=job_env(), stdout=log, stderr=subprocess.STDOUT))
        with Client(self.address, timeout=60) as client:
            client.wait_for_workers(self.workers, timeout=120)
        return self

    def pids(self) -> tuple[int, ...]:
        return tuple(p.pid for p in self.procs)

    def __exit__(self, *exc: object) -> None:
        for proc in reversed(self.procs):
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.log is not None:
            self.log.close()


def raw_bytes(wf: Path) -> int:
    return sum(f.stat().st_size for f in (wf / "resources/synthetic").rglob("*") if f.is_file())


def run_scale(scale: Scale, work: Path, cluster: ExternalCluster | None = None) -> dict:
    """Run the scaled pipeline step by step in a fresh copy of the workflow; peak PSS and wall time
    per step (with ``cluster``: through that Dask cluster, its processes counted in every peak)."""
    from tests.support.workflow import copy_workflow, job_env

    wf = copy_workflow(work / f"wf-{scale.factor}x")
    config = scale.config()
    if cluster is not None:
        config["dask"] = {"scheduler_address": cluster.address}
    (wf / "scale.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    exe = str(Path(sys.executable).parent / "snakemake")
    env = job_env()

    def snakemake(rule: str) -> tuple[float, int]:
        cmd = [exe, "--cores", "2", "--configfile", "scale.yaml", "--until", rule, "--quiet", "all"]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=wf, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        monitor = TreeMonitor(proc.pid, also=cluster.pids() if cluster is not None else ())
        monitor.start()
        out, _ = proc.communicate()
        monitor.stop.set()
        monitor.join()
        seconds = time.perf_counter() - t0
        if proc.returncode != 0:
            logs = "\n".join(f"--- {p}\n{p.read_text()[-2000:]}" for p in sorted(wf.glob("results/logs/**/*.log")))
            raise SystemExit(f"scale {scale.factor}x: {rule} failed ({proc.returncode}):\n{out[-4000:]}\n{logs}")
        return seconds, monitor.peak

    snakemake("synth")
    result: dict = {
        "factor": scale.factor,
        "dask": f"external, {cluster.workers} workers of {cluster.memory}" if cluster is not None else "per step",
        "raw_bytes": raw_bytes(wf),
        "volume_bytes": scale.volume_bytes(),
        "steps": {},
    }
    for rule in STEPS:
        seconds, peak = snakemake(rule)
        result["steps"][rule] = {"seconds": round(seconds, 1), "peak_pss_bytes": peak}
        print(f"  {scale.factor:>2}x {rule:<10} {seconds:7.1f} s  {peak / 2**30:6.2f} GiB", flush=True)
    shutil.rmtree(wf, ignore_errors=True)
    return result


def table(results: list[dict]) -> str:
    """Markdown: one row per step, peak memory and time per scale, and the growth from the first to the last."""
    first, last = results[0], results[-1]
    head = ["step"] + [
        f"{r['factor']}x ({r['volume_bytes'] / 2**30:.2f} GiB of data, {r['raw_bytes'] / 2**30:.2f} GiB of files"
        + ("" if r.get("dask", "per step") == "per step" else f"; Dask {r['dask']}")
        + ")"
        for r in results
    ]
    head.append(f"peak {last['factor']}x / {first['factor']}x")
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for step in STEPS:
        cells = [step]
        for r in results:
            s = r["steps"][step]
            cells.append(f"{s['peak_pss_bytes'] / 2**30:.2f} GiB, {s['seconds']:.0f} s")
        growth = last["steps"][step]["peak_pss_bytes"] / max(1, first["steps"][step]["peak_pss_bytes"])
        cells.append(f"{growth:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def check(results: list[dict], targets: dict) -> list[str]:
    missed = []
    first, last = results[0], results[-1]
    for step in STEPS:
        peak = last["steps"][step]["peak_pss_bytes"]
        growth = peak / max(1, first["steps"][step]["peak_pss_bytes"])
        if growth > targets["scale_peak_growth_max"]:
            missed.append(
                f"{step}: peak memory grows {growth:.2f}x from {first['factor']}x to {last['factor']}x "
                f"> {targets['scale_peak_growth_max']}"
            )
        seconds = last["steps"][step]["seconds"] / max(0.1, first["steps"][step]["seconds"])
        volume = last["volume_bytes"] / first["volume_bytes"]
        if seconds > targets["scale_time_growth_vs_volume_max"] * volume:
            missed.append(
                f"{step}: time grows {seconds:.1f}x from {first['factor']}x to {last['factor']}x, more than the "
                f"data ({volume:.1f}x) times {targets['scale_time_growth_vs_volume_max']}"
            )
        if last["factor"] >= 16 and peak > targets["scale_peak_gib_max"] * 2**30:
            missed.append(f"{step}: {peak / 2**30:.2f} GiB at {last['factor']}x > {targets['scale_peak_gib_max']} GiB")
    return missed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--factors", type=int, nargs="+", default=sorted(SCALES), choices=sorted(SCALES))
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument("--work", type=Path, default=None, help="scratch directory (default: a new temporary one)")
    parser.add_argument(
        "--dask-workers", type=int, default=0, help="run through an external Dask cluster of this many workers"
    )
    parser.add_argument("--worker-memory", default="2GiB", help="memory limit of each external worker")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="conv2dlstm-scale-"))
    load = os.getloadavg()
    results = []
    try:
        with contextlib.ExitStack() as stack:
            cluster = None
            if args.dask_workers:
                cluster = stack.enter_context(ExternalCluster(args.dask_workers, args.worker_memory, work / "dask"))
            for factor in sorted(args.factors):
                results.append(run_scale(SCALES[factor], work, cluster))
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    summary = {
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "load_before": load,
        "load_after": os.getloadavg(),
        "results": results,
    }
    targets.write_results("scale", summary)
    print(
        f"\n{summary['machine']}, {summary['cpus']} CPUs, {summary['memory_gib']} GiB; "
        f"load average {load[0]:.2f} before, {summary['load_after'][0]:.2f} after\n"
    )
    print(table(results))
    if args.check and len(results) > 1:
        return targets.report(check(results, targets.load()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
