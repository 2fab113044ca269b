"""Clear errors at the edges.

- A full disk: every step writes through fsutil.atomic_output (or, for evaluate's staging folder,
  fsutil.full_disk_named), which turns ENOSPC (or EDQUOT) anywhere in the exception chain, or a
  writer's bare failure (netCDF's "HDF error", torch's "unexpected pos") while almost no space is
  left, into a DiskFullError naming the output, the free space and the space needed (at least the
  disk the partial output had taken, measured before it is removed) (the CLI exits 2), leaving no
  partial output. The fetch, train and evaluate steps fill a real small disk.
  Injected at the write boundary, and for real on a 1 MiB tmpfs mounted in a user and mount
  namespace (unshare; nothing on the machine changes, the mount ends with the process).
- source.url: a placeholder other than {date} (with an optional strftime format) is refused by
  validate_config naming source.url and the placeholders allowed, before Snakemake sees it.
- source.variables: refused for kinds url and files, which would ignore it.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import yaml

from conv2dlstm import cli, fsutil
from conv2dlstm.config.validate import validate_config
from conv2dlstm.data import download
from conv2dlstm.errors import ConfigError, DiskFullError, DownloadError
from conv2dlstm.fsutil import atomic_output
from tests.support.workflow import job_env

# -------------------------------------------------------------------------------------------------
# a full disk
# -------------------------------------------------------------------------------------------------


def _enospc() -> OSError:
    return OSError(errno.ENOSPC, "No space left on device")


UNITS = {"bytes": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}


def _needed(message: str) -> tuple[int, int]:
    """The space needed and the free space that a DiskFullError's ``message`` names ("It needs at
    least N more than the F free"), in bytes (to the 0.1 of a unit they are written with)."""
    found = re.search(r"It needs at least ([0-9.]+) (\w+) more than the ([0-9.]+) (\w+) free: ", message)
    assert found, message
    return int(float(found[1]) * UNITS[found[2]]), int(float(found[3]) * UNITS[found[4]])


def _about(n: int, at_least: int) -> bool:
    """``n`` (read from a message) is the disk space of ``at_least`` bytes written: no less (to the
    rounding of the message), and no more than a file system's blocks and preallocation add."""
    return at_least * 0.95 <= n <= at_least * 1.05 + (64 << 10)


def test_enospc_becomes_a_disk_full_error_naming_the_output_and_nothing_is_left(tmp_path: Path) -> None:
    target = tmp_path / "out" / "stats.nc"
    target.parent.mkdir()
    target.write_text("previous")
    with pytest.raises(DiskFullError) as err, atomic_output(target) as tmp:
        tmp.write_bytes(os.urandom(200 << 10))
        raise _enospc()
    msg = str(err.value)
    assert msg.startswith(f"no space left on device writing {target}: the disk holding {target.parent} is full (")
    assert "free of" in msg and "Free space there" in msg and "run the step again" in msg
    # the space needed: at least the 200 KiB the partial file had taken of the disk, beyond what was free
    needed, _ = _needed(msg)
    assert _about(needed, 200 << 10), msg
    assert "of the disk when it filled, and it was not finished (a lower bound)" in msg
    assert "(the partial output was removed, which frees its " in msg
    assert isinstance(err.value.__cause__, OSError) and err.value.__cause__.errno == errno.ENOSPC
    assert sorted(p.name for p in target.parent.iterdir()) == ["stats.nc"]
    assert target.read_text() == "previous"


def test_enospc_wrapped_by_a_writer_is_still_a_full_disk(tmp_path: Path) -> None:
    """fetch's file: copy wraps an OSError in a DownloadError; the chain still says the disk is full."""
    with pytest.raises(DiskFullError, match="no space left on device writing"), atomic_output(tmp_path / "a.nc"):
        try:
            raise _enospc()
        except OSError as exc:
            raise DownloadError("file:x.nc: cannot copy x.nc") from exc
    with pytest.raises(DiskFullError) as err, atomic_output(tmp_path / "b.zarr"):
        raise OSError(errno.EDQUOT, "Disk quota exceeded")
    assert "It needs at least" not in str(err.value)  # nothing written: no lower bound to name
    assert list(tmp_path.iterdir()) == []


def test_the_space_needed_is_what_the_partial_output_had_taken(tmp_path: Path) -> None:
    """Every writer's full disk names the space needed, as a lower bound: the disk space the partial
    file or folder had taken when the disk filled, measured before it is removed (atomic_output's
    temporary, or the folder full_disk_named is given, as evaluate's staging folder)."""
    with pytest.raises(DiskFullError) as err, atomic_output(tmp_path / "x.zarr") as tmp:
        (tmp / "data" / "c").mkdir(parents=True)
        (tmp / "zarr.json").write_bytes(os.urandom(1000))
        (tmp / "data" / "c" / "0").write_bytes(os.urandom(3 << 20))
        raise _enospc()
    needed, _ = _needed(str(err.value))
    assert _about(needed, (3 << 20) + 1000), err.value
    assert list(tmp_path.iterdir()) == []

    out_dir, staging = tmp_path / "evaluate", tmp_path / "evaluate" / ".staging"
    staging.mkdir(parents=True)
    with pytest.raises(DiskFullError) as err, fsutil.full_disk_named(out_dir, partial=staging):
        (staging / "predictions.nc").write_bytes(os.urandom(300 << 10))
        (staging / "metrics.csv").write_bytes(os.urandom(100 << 10))
        raise RuntimeError("write failed") from _enospc()
    msg = str(err.value)
    assert msg.startswith(f"no space left on device writing {out_dir}: the disk holding {tmp_path} is full (")
    needed, _ = _needed(msg)
    assert _about(needed, 400 << 10), msg


def test_hdf_error_is_a_full_disk_only_when_space_is_low(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(RuntimeError, match="^NetCDF: HDF error$"), atomic_output(tmp_path / "a.nc"):
        raise RuntimeError("NetCDF: HDF error")  # plenty of space: some other HDF5 failure, left as is
    monkeypatch.setattr(fsutil, "free_bytes", lambda path: 4096)
    with pytest.raises(DiskFullError, match=r"writing .*a\.nc: the disk holding .* is full \(4.0 KiB free"):
        with atomic_output(tmp_path / "a.nc"):
            raise RuntimeError("NetCDF: HDF error")
    with pytest.raises(DiskFullError), atomic_output(tmp_path / "model.pt"):
        raise RuntimeError(
            "[enforce fail at inline_container.cc:626] . PytorchStreamWriter failed writing file "
            "data/0: file write failed"
        )
    assert list(tmp_path.iterdir()) == []


def test_other_errors_pass_unchanged(tmp_path: Path) -> None:
    with pytest.raises(PermissionError), atomic_output(tmp_path / "a.nc"):
        raise PermissionError(errno.EACCES, "Permission denied")
    with pytest.raises(KeyboardInterrupt), atomic_output(tmp_path / "a.nc"):
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def _big_netcdf(path: Path, mib: float = 2.0) -> Path:
    """A netCDF file of about ``mib`` MiB of incompressible values, one daily step."""
    n = int(mib * (1 << 20) / 4 / 512)
    rng = np.random.default_rng(0)
    ds = xr.Dataset(
        {"sst": (("time", "lat", "lon"), rng.random((1, n, 512), dtype="float32"))},
        coords={
            "time": np.array(["2019-01-01"], dtype="datetime64[ns]"),
            "lat": np.linspace(-60, 60, n),
            "lon": np.linspace(0, 359, 512),
        },
    )
    ds.to_netcdf(path, engine="netcdf4")
    return path


def test_the_cli_exits_2_naming_the_path_when_the_disk_fills(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """ENOSPC injected where fetch copies a file: error message, status 2, no partial, no manifest."""

    src = _big_netcdf(tmp_path / "big.nc", mib=0.1)
    real_copy = shutil.copyfileobj

    def copy_until_full(fin, fout, length=0):
        real_copy(fin, fout, length)
        raise _enospc()

    monkeypatch.setattr(download.shutil, "copyfileobj", copy_until_full)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"source": {"url": f"file://{src}", "start": "2019-01-01", "end": "2019-01-01"}}))
    out = tmp_path / "raw"
    assert cli.main(["fetch", "--config", str(cfg), "--out-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"error: no space left on device writing {out / 'big.nc'}: the disk holding {out} is full" in err, err
    needed, _ = _needed(err)  # the file was copied whole before the disk filled
    assert _about(needed, src.stat().st_size), err
    assert sorted(p.name for p in out.iterdir()) == []


# A real full disk: a 1 MiB tmpfs mounted inside a user and mount namespace of the child process only.
FULL_DISK_SCRIPT = textwrap.dedent("""
    import json, subprocess, sys
    from pathlib import Path
    import numpy as np, xarray as xr
    from conv2dlstm.errors import DiskFullError
    from conv2dlstm.fsutil import atomic_output

    mnt, cfg, steps = Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
    out = {}
    proc = subprocess.run([sys.executable, "-m", "conv2dlstm", "fetch", "--config", cfg, "--out-dir", str(mnt / "raw")],
                          capture_output=True, text=True)
    out["fetch"] = {"rc": proc.returncode, "stderr": proc.stderr[-3000:],
                    "left": sorted(p.name for p in (mnt / "raw").iterdir()) if (mnt / "raw").exists() else []}
    for step, args in steps.items():  # train and evaluate, their outputs on the small disk
        proc = subprocess.run([sys.executable, "-m", "conv2dlstm", step, *args], capture_output=True, text=True)
        folder = mnt / step
        partials = sorted(p.name for p in folder.rglob("*") if p.name.endswith(".partial")) if folder.exists() else []
        out[step] = {"rc": proc.returncode, "stderr": proc.stderr[-3000:], "left": partials}
        if folder.exists():
            subprocess.run(["rm", "-rf", str(folder)], check=True)
    ds = xr.Dataset({"a": (("t", "y", "x"), np.random.default_rng(0).random((8, 256, 256)))})
    for kind in ("netcdf", "zarr"):
        target = mnt / ("out.nc" if kind == "netcdf" else "out.zarr")
        try:
            with atomic_output(target) as tmp:
                if kind == "netcdf":
                    ds.to_netcdf(tmp, engine="netcdf4")
                else:
                    ds.to_zarr(tmp, zarr_format=3, consolidated=False)
            out[kind] = {"error": None}
        except Exception as exc:
            cause = exc.__cause__
            out[kind] = {"error": type(exc).__name__, "message": str(exc),
                         "cause": f"{type(cause).__name__}: {cause}" if cause else None}
        out[kind]["left"] = sorted(p.name for p in mnt.iterdir() if p.name != "raw")
    print("RESULT " + json.dumps(out))
""")


def _namespace_skip_reason() -> str | None:
    """Why a tmpfs cannot be mounted in a user and mount namespace here, or None when it can."""
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return "unshare or mount is not installed"
    probe = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if probe.returncode != 0:
        return f"cannot mount a tmpfs in a user namespace here (unshare: {probe.stderr.strip()[:200]})"
    return None


def _step_args(tmp_path: Path, mnt: Path) -> dict[str, list[str]]:
    """The train and evaluate steps' command lines, their outputs on the small disk ``mnt``: a network
    whose checkpoint is over 1 MiB, and a test period whose predictions and figures are."""
    from conv2dlstm.steps import train
    from tests.support.windows_fixture import make_windows_store

    fx = make_windows_store(tmp_path / "w.zarr", n_time=200, height=48, width=48)
    tracking = {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "log_model": False}
    base = {"experiment": "full-disk", "mlflow": tracking}
    small = validate_config(
        base
        | {
            "model": {"convlstm": {"hidden_channels": [4]}},
            "train": {"epochs": 1, "batch_size": 8, "device": "cpu", "max_batches_per_epoch": 1},
        }
    )
    train.main(small, run="convlstm", windows=fx.store, stats=fx.stats, out_dir=tmp_path / "trained")
    big = validate_config(  # its own store: the failed training must not touch the trained run's
        base
        | {
            "mlflow": {**tracking, "tracking_uri": f"sqlite:///{tmp_path}/mlflow-big.db"},
            "model": {"convlstm": {"hidden_channels": [64, 64]}},
            "train": small["train"],
        }
    )
    data = ["--windows", str(fx.store), "--stats", str(fx.stats)]
    return {
        "train": ["--config-json", json.dumps(big), "--run", "convlstm", *data, "--out-dir", str(mnt / "train")],
        "evaluate": [
            "--config-json",
            json.dumps(small),
            "--run",
            "convlstm",
            *data,
            "--checkpoint",
            str(tmp_path / "trained" / "model.pt"),
            "--out-dir",
            str(mnt / "evaluate"),
        ],
    }


def test_a_really_full_disk_stops_each_writer_with_a_clear_error(tmp_path: Path) -> None:
    reason = _namespace_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    src = _big_netcdf(tmp_path / "big.nc", mib=2.0)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"source": {"url": f"file://{src}", "start": "2019-01-01", "end": "2019-01-01"}}))
    script = tmp_path / "full_disk.py"
    script.write_text(FULL_DISK_SCRIPT)
    mnt = tmp_path / "small-disk"
    mnt.mkdir()
    steps = _step_args(tmp_path, mnt)
    proc = subprocess.run(
        [
            "unshare",
            "--user",
            "--map-root-user",
            "--mount",
            "sh",
            "-c",
            'mount -t tmpfs -o size=1m tmpfs "$1" && exec "$2" "$3" "$1" "$4" "$5"',
            "sh",
            str(mnt),
            sys.executable,
            str(script),
            str(cfg),
            json.dumps(steps),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=job_env(),
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(lines[0][len("RESULT ") :])
    fetched = result["fetch"]
    assert fetched["rc"] == 2, fetched
    assert (
        f"error: no space left on device writing {mnt / 'raw' / 'big.nc'}: the disk holding {mnt / 'raw'} is full"
        in fetched["stderr"]
    ), fetched
    assert fetched["left"] == [], fetched  # no partial file, no manifest
    for step, written in (("train", "last.pt"), ("evaluate", "")):  # torch's zip writer, netCDF in staging
        got = result[step]
        assert got["rc"] == 2, got
        assert f"error: no space left on device writing {mnt / step / written}".rstrip("/") in got["stderr"], got
        assert "Traceback" not in got["stderr"] and got["left"] == [], got
        needed, free = _needed(got["stderr"])
        assert 0 < needed <= 1 << 20 and free < 64 << 10, got  # part of the 1 MiB disk, at most all
    for kind, name in (("netcdf", "out.nc"), ("zarr", "out.zarr")):
        got = result[kind]
        assert got["error"] == "DiskFullError", got
        assert got["message"].startswith(
            f"no space left on device writing {mnt / name}: the disk holding {mnt} is full"
        )
        assert got["left"] == [], got
        needed, free = _needed(got["message"])
        assert 512 << 10 < needed <= 1 << 20 and free < 64 << 10, got  # most of the 1 MiB disk, at most all
    assert "HDF error" in result["netcdf"]["cause"]  # netCDF-4 says only this; the free space decides
    assert "No space left on device" in result["zarr"]["cause"]
    assert not any(mnt.iterdir()), "the tmpfs lived in the child's namespace only"


# -------------------------------------------------------------------------------------------------
# source.url placeholders
# -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("https://h/{day}.nc", r"placeholder \{day\} in 'https://h/\{day\}\.nc' is not allowed"),
        ("https://h/{date:%Y}/{year}.nc", r"placeholder \{year\}"),
        ("https://h/{date.year}.nc", r"placeholder \{date\.year\}"),
        ("https://h/{date!r}.nc", r"placeholder \{date!r\}"),
        ("https://h/{0}.nc", r"placeholder \{0\}"),
        ("https://h/{date:%Q}.nc", r"the format of \{date:%Q\} .* %Q is not a strftime directive"),
        ("https://h/{date:%Y%}.nc", r"ends with a lone '%'"),
        ("https://h/{date:{fmt}}.nc", r"may not hold another placeholder"),
        ("https://h/{date.nc", r"is not a valid template \(expected '\}' before end of string\)"),
        ("https://h/date}.nc", r"is not a valid template \(Single '\}'"),
    ],
)
def test_a_bad_placeholder_in_source_url_is_refused_naming_the_key_and_the_allowed_ones(url: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as err:
        validate_config({"source": {"url": url}})
    msg = str(err.value)
    assert msg.startswith("config key source.url: ")
    assert "the only placeholder is {date}" in msg and "{date:%Y%m%d}" in msg and "{{" in msg


@pytest.mark.parametrize(
    "url",
    [
        "https://h/{date}.nc",
        "https://h/{date:%Y%m}/oisst-avhrr-v02r01.{date:%Y%m%d}.nc",
        "https://h/{date:%Y/%j}/{date:%-d}.nc",
        "https://h/all.nc",
        "https://h/{{literal}}/{date:%Y}.nc",
        "file:resources/{date:%Y}/a.nc?token=$MY_TOKEN",
    ],
)
def test_good_source_url_templates_pass(url: str) -> None:
    assert validate_config({"source": {"url": url}})["source"]["url"] == url


def test_snakemake_names_source_url_for_a_bad_placeholder(snakemake_exe: str, workflow_copy: Path) -> None:
    """Refused while Snakemake parses the configuration, not as a WildcardError of the fetch rule."""
    (workflow_copy / "bad.yaml").write_text(yaml.safe_dump({"source": {"url": "file:data/{day}.nc"}}))
    proc = subprocess.run(
        [snakemake_exe, "-n", "--cores", "1", "--configfile", "bad.yaml"],
        cwd=workflow_copy,
        capture_output=True,
        text=True,
        env=job_env(),
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "invalid configuration: config key source.url: placeholder {day}" in out, out[-3000:]
    assert "WildcardError" not in out


# -------------------------------------------------------------------------------------------------
# source.variables
# -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["url", "files"])
def test_source_variables_is_refused_where_it_would_be_ignored(kind: str) -> None:
    with pytest.raises(ConfigError) as err:
        validate_config({"source": {"kind": kind, "variables": ["analysed_sst"]}})
    msg = str(err.value)
    assert msg.startswith(f"config key source.variables: ['analysed_sst'] has no effect for source.kind '{kind}'")
    assert "variables.inputs" in msg and "variables.targets" in msg and "harmonize.rename" in msg


@pytest.mark.parametrize("kind", ["zarr", "copernicus"])
def test_source_variables_is_kept_for_the_kinds_that_subset_while_fetching(kind: str) -> None:
    assert validate_config({"source": {"kind": kind, "variables": ["sst"]}})["source"]["variables"] == ["sst"]
    assert validate_config({"source": {"kind": "url", "variables": []}})["source"]["variables"] == []
