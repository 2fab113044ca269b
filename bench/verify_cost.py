"""What verifying every chunk read costs: the windows and regridded stores read with and without it.

    python bench/verify_cost.py [--rounds 5] [--samples 200] [--grids 25 128] [--days 1096]

For each grid (``H = W``), a windows store of ``--days`` daily steps x 1 variable, float32, written
as the windows step writes it (``zarrstore.write_store``, chunks of ``input_steps + lead_steps`` = 8
steps, the default), and a regridded store of the same cube (chunks of 256 steps, as the regrid step
writes it). Each is read the ways the steps read it:

- ``open``: ``WindowsStore(path)`` (verified: the record, every file's size, the metadata digests);
- ``cube``: ``read_time_range(0, T)``, the whole cube, as ``InMemoryWindows`` loads a split;
- ``samples``: ``--samples`` random training windows one at a time (``WindowsStore.sample``), as
  the DataLoader's workers stream them;
- ``regrid mean``: ``regridded.open(path)["sst"].mean()`` through Dask's threaded scheduler (2
  threads), as normalize and windows read the regridded store.

*Without verification* is the same code reading through a plain ``zarr.storage.LocalStore``
(``zarrstore.open_store`` replaced), so the difference is the verification alone. The two are
measured alternately, ``--rounds`` times (the order swapped each round); the table gives the
median seconds of each and the ratio verified / plain. Results are also written as JSON to
``bench/results/verify_cost.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(REPO), str(REPO / "src")]

import targets  # noqa: E402  (bench/, this script's folder)
from conv2dlstm import zarrstore  # noqa: E402
from conv2dlstm.artifacts import regridded  # noqa: E402
from conv2dlstm.artifacts.windows_store import WindowsStore  # noqa: E402

STEPS = 8
"""``input_steps + lead_steps`` of the default configuration (5 + 3): the windows store's time chunk."""


@contextlib.contextmanager
def plain_reads() -> Iterator[None]:
    """Readers open stores through a plain ``LocalStore``: no record, no digest checked."""
    from zarr.storage import LocalStore

    def plain(path: str | Path, **_: Any) -> LocalStore:
        return LocalStore(Path(path), read_only=True)

    with mock.patch.object(zarrstore, "open_store", plain):
        yield


def make_stores(work: Path, size: int, days: int) -> tuple[Path, Path]:
    """A windows store and a regridded store of ``days`` x 1 variable x ``size`` x ``size`` float32."""
    import dask

    from tests.support.windows_fixture import make_windows_store

    windows = work / f"windows_{size}.zarr"
    fx = make_windows_store(
        windows, n_time=days, height=size, width=size, input_steps=5, lead_steps=3, noise=0.1, time_chunk=STEPS
    )
    import xarray as xr

    ds = xr.Dataset(
        {"sst": (("time", "lat", "lon"), fx.physical[:, 0], {"units": "degC"})},
        coords={"time": fx.time, "lat": fx.lat, "lon": fx.lon},
        attrs={"format_version": regridded.FORMAT_VERSION},
    )
    regrid = work / f"regrid_{size}.zarr"
    with dask.config.set(scheduler="threads", num_workers=2):
        zarrstore.write_store(ds.chunk({"time": 256}), regrid)
    return windows, regrid


def _seconds(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measures(windows: Path, regrid: Path, samples: int) -> dict[str, Callable[[], object]]:
    """The reads timed, by name; each opens what it reads (so that both modes open their own way)."""
    import dask

    n_train = WindowsStore(windows).starts("train").size
    order = np.random.default_rng(0).permutation(n_train)[:samples]

    def read_samples() -> None:
        store = WindowsStore(windows)
        for i in order:
            store.sample("train", int(i))

    def read_cube() -> np.ndarray:
        store = WindowsStore(windows)
        return store.read_time_range(0, store.time.size)

    def regrid_mean() -> float:
        with dask.config.set(scheduler="threads", num_workers=2):
            return float(regridded.open(regrid)["sst"].mean())

    return {
        "open": lambda: WindowsStore(windows),
        "cube": read_cube,
        "samples": read_samples,
        "regrid mean": regrid_mean,
    }


def run(windows: Path, regrid: Path, *, rounds: int, samples: int) -> dict[str, dict[str, float]]:
    """Median seconds of each measure, verified and plain, alternating; and their ratio."""
    fns = measures(windows, regrid, samples)
    times: dict[str, dict[str, list[float]]] = {name: {"verified": [], "plain": []} for name in fns}
    for fn in fns.values():  # warm-up: page cache, imports, Zarr's event loop
        fn()
        with plain_reads():
            fn()
    for r in range(rounds):
        modes = ("verified", "plain") if r % 2 == 0 else ("plain", "verified")
        for name, fn in fns.items():
            for mode in modes:
                with plain_reads() if mode == "plain" else contextlib.nullcontext():
                    times[name][mode].append(_seconds(fn))
    out = {}
    for name, t in times.items():
        verified, plain = statistics.median(t["verified"]), statistics.median(t["plain"])
        out[name] = {"verified_s": verified, "plain_s": plain, "ratio": verified / plain}
    return out


def _store_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--grids", type=int, nargs="+", default=[25, 128])
    parser.add_argument("--days", type=int, default=1096)
    args = parser.parse_args()
    results: dict[str, Any] = {
        "cores": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "rounds": args.rounds,
        "samples": args.samples,
        "days": args.days,
        "grids": {},
    }
    with tempfile.TemporaryDirectory(prefix="verify_cost_") as tmp:
        for size in args.grids:
            windows, regrid = make_stores(Path(tmp), size, args.days)
            rows = run(windows, regrid, rounds=args.rounds, samples=args.samples)
            results["grids"][f"{size}x{size}"] = {
                "windows_store_mb": _store_bytes(windows) / 1e6,
                "regrid_store_mb": _store_bytes(regrid) / 1e6,
                **rows,
            }
    print(
        f"cores: {results['cores']}; {args.days} days x 1 variable, float32; median of {args.rounds} alternating "
        f"rounds; samples: {args.samples} random training windows"
    )
    print(f"{'grid':<9} {'read':<12} {'verified s':>11} {'plain s':>9} {'verified/plain':>15}")
    for grid, rows in results["grids"].items():
        for name, r in rows.items():
            if isinstance(r, dict):
                print(f"{grid:<9} {name:<12} {r['verified_s']:11.4f} {r['plain_s']:9.4f} {r['ratio']:15.2f}")
        print(
            f"{grid:<9} store sizes: windows {rows['windows_store_mb']:.1f} MB, regrid {rows['regrid_store_mb']:.1f} MB"
        )
    targets.write_results("verify_cost", results)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
