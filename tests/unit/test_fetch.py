"""Fetch: URL templates over a real HTTP server on 127.0.0.1 and file: URLs, resume, retries and
failures that leave nothing partial; local files and globs; a Zarr store subset over HTTP."""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from conv2dlstm.artifacts import manifest as manifest_file
from conv2dlstm.config.validate import validate_config
from conv2dlstm.data import download, fetching, regridding, sources
from conv2dlstm.errors import ConfigError, DataError, DownloadError
from conv2dlstm.fsutil import sha256_file, sha256_tree
from conv2dlstm.steps import fetch, synthetic
from tests.support.servers import FileServer, write_oisst_days

START, END = "2019-01-30", "2019-02-03"  # 5 days across a month boundary
DAYS = pd.date_range(START, END)
TEMPLATE = "{date:%Y%m}/oisst-avhrr-v02r01.{date:%Y%m%d}.nc"
NAMES = [f"oisst-avhrr-v02r01.{d:%Y%m%d}.nc" for d in DAYS]
RELATIVE = [f"{d:%Y%m}/{n}" for d, n in zip(DAYS, NAMES)]


def fetch_cfg(**source: object) -> dict:
    base = {"start": START, "end": END, "retries": 2, "backoff_s": 0.01, "timeout_s": 10, "parallel": 3}
    return validate_config({"name": "t", "source": {**base, **source}})


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Five OISST-like daily files in the NCEI layout (8 x 8 cells), as the synth step writes them."""
    return write_oisst_days(tmp_path_factory.mktemp("served") / "oisst", START, END)


@pytest.fixture()
def server(served: Path) -> Iterator[FileServer]:
    with FileServer(served) as srv:
        yield srv


def leftovers(out: Path) -> list[str]:
    """Temporaries a failed fetch must not leave behind."""
    return sorted(p.name for p in out.rglob("*partial*"))


def test_url_over_http_writes_verified_files_and_manifest(server: FileServer, served: Path, tmp_path: Path) -> None:
    out = tmp_path / "raw"
    manifest_path = fetch.main(fetch_cfg(url=server.url(TEMPLATE)), out_dir=out)
    assert manifest_path == out / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    assert manifest["kind"] == "url" and manifest["format"] == "netcdf"
    assert [Path(f["path"]).name for f in manifest["files"]] == NAMES
    assert [f["url"] for f in manifest["files"]] == [server.url(r) for r in RELATIVE]
    for entry, rel in zip(manifest["files"], RELATIVE):
        path = Path(entry["path"])
        assert path.parent.resolve() == out.resolve()
        assert entry["sha256"] == sha256_file(path) == sha256_file(served / rel)
        assert entry["bytes"] == path.stat().st_size
    assert manifest["sha256"] == manifest_file.digest(
        [manifest_file.FetchedFile(Path(f["path"]), f["url"], f["sha256"], f["bytes"]) for f in manifest["files"]]
    )
    assert server.gets() == len(DAYS)
    assert leftovers(out) == []
    ds = sources.open_fetched(manifest_path)
    assert ds["sst"].chunks is not None  # lazy (Dask)
    assert ds.sizes["time"] == len(DAYS) and ds.sizes["lat"] == 8
    expected = xr.open_dataset(served / RELATIVE[2])
    np.testing.assert_array_equal(ds["sst"].isel(time=2).values, expected["sst"].isel(time=0).values)


def test_manifest_readers_check_its_format_version(served: Path, tmp_path: Path) -> None:
    """The manifest artifact: written with its format version; a manifest of another version (or of
    none) is refused naming the file and the fetch step, and gives no checksums to resume from."""
    path = fetch.main(fetch_cfg(url=f"file://{served}/{TEMPLATE}"), out_dir=tmp_path / "raw")
    doc = manifest_file.read(path)
    assert doc["format_version"] == manifest_file.FORMAT_VERSION
    assert [p.name for p in manifest_file.file_paths(doc, path)] == NAMES
    assert manifest_file.checksums(path) == {n: sha256_file(tmp_path / "raw" / n) for n in NAMES}
    for version in (0, None):
        manifest_file.write(path, {**doc, "format_version": version})
        with pytest.raises(
            DataError, match=rf"manifest {path} has format_version {version}, this version reads 1.*fetch"
        ):
            manifest_file.read(path)
        with pytest.raises(DataError, match="format_version"):
            sources.open_fetched(path)
        assert manifest_file.checksums(path) == {}


def test_an_unknown_source_kind_names_the_kinds(tmp_path: Path) -> None:
    cfg = fetch_cfg()
    cfg["source"]["kind"] = "ftp"  # past the schema, which lists the same fetching.SOURCE_KINDS
    with pytest.raises(ConfigError, match="source.kind: 'ftp' is not one of url, files, zarr, copernicus"):
        fetch.main(cfg, out_dir=tmp_path / "raw")
    assert fetching.SOURCE_KINDS == ("url", "files", "zarr", "copernicus")


def test_file_urls_absolute_and_relative(served: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(served.parent)
    absolute = fetch.main(fetch_cfg(url=f"file://{served}/{TEMPLATE}"), out_dir=tmp_path / "abs")
    relative = fetch.main(fetch_cfg(url=f"file:{served.name}/{TEMPLATE}"), out_dir=tmp_path / "rel")
    a, r = json.loads(absolute.read_text()), json.loads(relative.read_text())
    assert a["sha256"] == r["sha256"]
    assert [f["sha256"] for f in a["files"]] == [sha256_file(served / rel) for rel in RELATIVE]
    assert r["files"][0]["url"] == f"file:oisst/{RELATIVE[0]}"


def test_resume_fetches_only_missing_or_changed_files(server: FileServer, tmp_path: Path) -> None:
    out = tmp_path / "raw"
    cfg = fetch_cfg(url=server.url(TEMPLATE))
    server.not_found.add(RELATIVE[3])
    with pytest.raises(DownloadError):
        fetch.main(cfg, out_dir=out)
    assert not (out / "manifest.json").exists()
    done_first = {n for n in NAMES if (out / n).exists()}
    assert NAMES[3] not in done_first
    # an interrupted run's temporary, and a file whose content no longer matches its record
    (out / f".{NAMES[0]}.1234abcd.partial").write_bytes(b"half a file")
    changed = sorted(done_first)[0]
    (out / changed).write_bytes(b"not what was downloaded")
    server.not_found.clear()
    before = dict(server.requests)
    fetch.main(cfg, out_dir=out)
    fetched_again = {rel.split("/")[1] for rel in RELATIVE if server.requests[rel] > before.get(rel, 0)}
    assert fetched_again == (set(NAMES) - done_first) | {changed}
    assert leftovers(out) == []
    # a complete set resumes with no request at all
    before = server.gets()
    fetch.main(cfg, out_dir=out)
    assert server.gets() == before


def test_404_is_an_immediate_clear_error_and_leaves_nothing(server: FileServer, tmp_path: Path) -> None:
    out = tmp_path / "raw"
    server.not_found.add(RELATIVE[1])
    url = server.url(RELATIVE[1])
    with pytest.raises(DownloadError, match="404") as info:
        fetch.main(fetch_cfg(url=server.url(TEMPLATE), retries=3), out_dir=out)
    message = str(info.value)
    assert url in message and "source.url" in message and "source.start" in message
    assert server.requests[RELATIVE[1]] == 1  # no retry on 404
    assert not (out / "manifest.json").exists()
    assert not (out / NAMES[1]).exists() and leftovers(out) == []


def test_transient_503s_are_retried_with_backoff(server: FileServer, tmp_path: Path) -> None:
    server.transient[RELATIVE[0]] = 2
    fetch.main(fetch_cfg(url=server.url(TEMPLATE), retries=2), out_dir=tmp_path / "ok")
    assert server.requests[RELATIVE[0]] == 3
    server.transient[RELATIVE[0]] = 5
    with pytest.raises(DownloadError, match=r"503.*") as info:
        fetch.main(fetch_cfg(url=server.url(TEMPLATE), retries=1), out_dir=tmp_path / "fail")
    assert server.url(RELATIVE[0]) in str(info.value) and "2 attempt" in str(info.value)
    assert not (tmp_path / "fail" / "manifest.json").exists() and leftovers(tmp_path / "fail") == []


class BusyServer(FileServer):
    """A :class:`FileServer` that answers its first ``busy`` GETs with 503 and ``Retry-After: <retry_after>``."""

    def __init__(self, root: Path, *, busy: int, retry_after: str) -> None:
        self.busy = busy
        self.retry_after = retry_after
        super().__init__(root)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        base = super()._handler_class()
        server = self

        class BusyHandler(base):  # type: ignore[misc, valid-type]
            def _serve(self, *, body: bool) -> None:
                with server._lock:
                    busy = body and server.busy > 0
                    server.busy -= busy
                if not busy:
                    super()._serve(body=body)
                    return
                self.send_response(503)
                self.send_header("Retry-After", server.retry_after)
                self.send_header("Content-Length", "0")
                self.end_headers()

        return BusyHandler


@pytest.mark.parametrize(("retry_after", "wait_s"), [("3600", 0.5), ("0", 0.3)])
def test_retry_after_is_honoured_up_to_the_cap_and_logged(
    served: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    retry_after: str,
    wait_s: float,
) -> None:
    """The wait before a retry is the server's Retry-After, at most MAX_RETRY_AFTER_S, and never
    shorter than the backoff; each retry logs one line naming the URL, the answer and the wait."""
    monkeypatch.setattr(download, "MAX_RETRY_AFTER_S", 0.5)
    with BusyServer(served, busy=1, retry_after=retry_after) as srv:
        start = time.monotonic()
        with caplog.at_level(logging.WARNING):
            fetch.main(fetch_cfg(url=srv.url(TEMPLATE), parallel=1, backoff_s=0.3), out_dir=tmp_path / "raw")
        elapsed = time.monotonic() - start
        assert srv.gets() == len(DAYS)  # the 503 is not counted: it never reached FileServer
    assert wait_s <= elapsed < 30
    retries = [r.getMessage() for r in caplog.records if "retry" in r.getMessage()]
    assert retries == [f"{srv.url(RELATIVE[0])}: HTTP 503 Service Unavailable; retry 1/2 in {wait_s:.1f} s"]


def test_truncated_body_is_an_error_naming_the_url(server: FileServer, tmp_path: Path) -> None:
    out = tmp_path / "raw"
    server.truncate[RELATIVE[2]] = 500  # Content-Length announces the whole file
    with pytest.raises(DownloadError, match="truncated") as info:
        fetch.main(fetch_cfg(url=server.url(TEMPLATE), retries=1), out_dir=out)
    assert server.url(RELATIVE[2]) in str(info.value)
    assert server.requests[RELATIVE[2]] == 2  # a broken transfer is retried
    assert not (out / NAMES[2]).exists() and not (out / "manifest.json").exists()
    assert leftovers(out) == []


def test_corrupt_netcdf_is_an_error_and_is_removed(server: FileServer, served: Path, tmp_path: Path) -> None:
    out = tmp_path / "raw"
    server.corrupt[RELATIVE[4]] = (served / RELATIVE[4]).stat().st_size // 2  # consistent Content-Length
    with pytest.raises(DownloadError, match="not a readable netCDF") as info:
        fetch.main(fetch_cfg(url=server.url(TEMPLATE)), out_dir=out)
    assert server.url(RELATIVE[4]) in str(info.value)
    assert not (out / NAMES[4]).exists() and not (out / "manifest.json").exists()
    assert leftovers(out) == []


def test_checksums_are_verified(server: FileServer, served: Path, tmp_path: Path) -> None:
    good = {n: sha256_file(served / rel) for n, rel in zip(NAMES, RELATIVE)}
    fetch.main(fetch_cfg(url=server.url(TEMPLATE), checksums=good), out_dir=tmp_path / "ok")
    bad = {**good, NAMES[2]: "0" * 64}
    out = tmp_path / "bad"
    with pytest.raises(DownloadError, match=r"SHA-256 .* does not match source.checksums") as info:
        fetch.main(fetch_cfg(url=server.url(TEMPLATE), checksums=bad), out_dir=out)
    assert server.url(RELATIVE[2]) in str(info.value) and "0" * 64 in str(info.value)
    assert not (out / NAMES[2]).exists() and not (out / "manifest.json").exists()
    assert leftovers(out) == []


def test_a_failed_refetch_removes_the_previous_manifest(server: FileServer, tmp_path: Path) -> None:
    out = tmp_path / "raw"
    fetch.main(fetch_cfg(url=server.url(TEMPLATE)), out_dir=out)
    with pytest.raises(DownloadError):
        fetch.main(fetch_cfg(url=server.url(TEMPLATE), end="2019-02-04"), out_dir=out)
    assert not (out / "manifest.json").exists()
    assert all((out / n).exists() for n in NAMES)  # verified files stay for the next attempt


@pytest.mark.parametrize(
    ("source", "match"),
    [
        ({"url": "{when:%Y}/a.nc"}, r"source.url.*\{date\}"),
        ({"url": "http://127.0.0.1:9/{date:%Y%m%d}/data.nc"}, "would both be saved as 'data.nc'"),
        ({"url": "ftp://127.0.0.1/{date:%Y%m%d}.nc"}, "scheme 'ftp'"),
        ({"url": "file://otherhost/{date:%Y%m%d}.nc"}, "names host 'otherhost'"),
        ({"url": "file:x/{date:%Y%m%d}.nc", "frequency": "not-a-freq"}, "source.frequency"),
    ],
)
def test_bad_url_configuration_is_a_config_error(tmp_path: Path, source: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        fetch.main(fetch_cfg(**source), out_dir=tmp_path / "raw")
    assert not (tmp_path / "raw" / "manifest.json").exists()


def test_missing_file_url_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match=r"does not exist.*source.url"):
        fetch.main(fetch_cfg(url=f"file://{tmp_path}/nothing/{{date:%Y%m%d}}.nc"), out_dir=tmp_path / "raw")


# -------------------------------------------------------------------------------------------------
# kind files
# -------------------------------------------------------------------------------------------------


def test_files_kind_with_a_glob_records_paths_without_copying(
    served: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(served.parent)
    out = tmp_path / "raw"
    cfg = fetch_cfg(kind="files", paths=["oisst/2019*/*.nc"], start="2019-01-31", end="2019-02-01")
    manifest = json.loads(fetch.main(cfg, out_dir=out).read_text())
    assert manifest["format"] == "netcdf"
    assert [f["path"] for f in manifest["files"]] == [f"oisst/{rel}" for rel in RELATIVE]  # relative to the cwd
    assert [f["sha256"] for f in manifest["files"]] == [sha256_file(served / rel) for rel in RELATIVE]
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json"]  # nothing copied
    assert "time" not in manifest
    # open_fetched opens what was listed, all of it; the regrid step cuts source.start..end (one place).
    ds = sources.open_fetched(out / "manifest.json")
    assert [str(t)[:10] for t in ds["time"].values] == [f"{d:%Y-%m-%d}" for d in DAYS]
    assert all(str(t)[11:16] == "12:00" for t in ds["time"].values)  # OISST stamps days at noon
    prepared = regridding.prepare(ds, cfg)
    assert [str(t)[:16] for t in prepared["time"].values] == ["2019-01-31T12:00", "2019-02-01T12:00"]


def test_files_kind_missing_glob_names_the_pattern(tmp_path: Path) -> None:
    pattern = str(tmp_path / "nowhere" / "*.nc")
    with pytest.raises(DownloadError, match="matches no file") as info:
        fetch.main(fetch_cfg(kind="files", paths=[pattern]), out_dir=tmp_path / "raw")
    assert pattern in str(info.value)
    assert not (tmp_path / "raw" / "manifest.json").exists()


def test_files_kind_rejects_a_file_that_is_not_netcdf(tmp_path: Path) -> None:
    bad = tmp_path / "bad.nc"
    bad.write_text("<html>not found</html>")
    with pytest.raises(DataError, match="not a readable netCDF"):
        fetch.main(fetch_cfg(kind="files", paths=[str(bad)]), out_dir=tmp_path / "raw")


# -------------------------------------------------------------------------------------------------
# kind zarr
# -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def zarr_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Zarr v3 store (time, lat, lon) of 20 days, 0..360 longitudes, consolidated metadata."""
    root = tmp_path_factory.mktemp("zarr")
    lat = synthetic.axis_centres(30.25, 35.75, 0.5)
    lon = synthetic.axis_centres(290.25, 297.75, 0.5)
    ds = synthetic.oisst_dataset(pd.date_range("2019-03-01", periods=20), lat, lon, seed=2).isel(zlev=0, drop=True)
    for var in ds.variables.values():
        var.encoding = {}
    ds = ds.chunk({"time": 4, "lat": 6, "lon": 8})
    with warnings.catch_warnings():  # consolidated v3 metadata is what remote stores publish
        warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
        ds.to_zarr(root / "sst.zarr", zarr_format=3, consolidated=True, mode="w")
    return root


def test_zarr_over_http_subset_by_time_variables_and_region(zarr_root: Path, tmp_path: Path) -> None:
    original = xr.open_zarr(zarr_root / "sst.zarr")
    with FileServer(zarr_root) as srv:
        cfg = validate_config(
            {
                "name": "remote",
                "source": {"kind": "zarr", "store": srv.url("sst.zarr"), "start": "2019-03-05", "end": "2019-03-10"},
                "variables": {"inputs": ["sst"], "targets": ["sst"]},
                "region": {"lat": [32.0, 33.0], "lon": [-68.0, -66.0]},  # -180..180, store is 0..360
            }
        )
        manifest_path = fetch.main(cfg, out_dir=tmp_path / "raw")
        assert srv.gets() > 0
    manifest = json.loads(manifest_path.read_text())
    assert manifest["kind"] == "zarr" and manifest["format"] == "zarr"
    store = Path(manifest["files"][0]["path"])
    assert (
        store == (tmp_path / "raw" / "remote.zarr") or store.resolve() == (tmp_path / "raw" / "remote.zarr").resolve()
    )
    assert manifest["files"][0]["sha256"] == sha256_tree(store)
    ds = sources.open_fetched(manifest_path)
    assert list(ds.data_vars) == ["sst"]
    assert [str(t)[:10] for t in ds["time"].values] == [f"2019-03-{d:02d}" for d in range(5, 11)]
    # the region with a two-cell margin, converted to the store's 0..360 longitudes
    np.testing.assert_allclose(ds["lat"].values, np.arange(31.25, 33.76, 0.5))
    np.testing.assert_allclose(ds["lon"].values, np.arange(291.25, 294.76, 0.5))
    expected = original["sst"].sel(time=ds["time"], lat=ds["lat"], lon=ds["lon"])
    np.testing.assert_array_equal(ds["sst"].values, expected.values)
    assert leftovers(tmp_path / "raw") == []


def test_zarr_unknown_variable_and_bad_store_are_clear_errors(zarr_root: Path, tmp_path: Path) -> None:
    cfg = fetch_cfg(kind="zarr", store=str(zarr_root / "sst.zarr"), variables=["chl"], start="2019-03-01")
    with pytest.raises(DataError, match=r"\['chl'\].*source.variables"):
        fetch.main(cfg, out_dir=tmp_path / "raw")
    with pytest.raises(DownloadError, match="cannot open Zarr store"):
        fetch.main(fetch_cfg(kind="zarr", store=str(tmp_path / "missing.zarr")), out_dir=tmp_path / "raw")
    assert not (tmp_path / "raw" / "manifest.json").exists() and leftovers(tmp_path / "raw") == []


def test_files_kind_accepts_a_zarr_store(zarr_root: Path, tmp_path: Path) -> None:
    cfg = fetch_cfg(kind="files", paths=[str(zarr_root / "*.zarr")], start="2019-03-01", end="2019-03-20")
    manifest = json.loads(fetch.main(cfg, out_dir=tmp_path / "raw").read_text())
    assert manifest["format"] == "zarr"
    assert manifest["files"][0]["sha256"] == sha256_tree(zarr_root / "sst.zarr")
    assert sources.open_fetched(tmp_path / "raw" / "manifest.json").sizes["time"] == 20


def raw_grid(lon: np.ndarray, time_name: str = "time") -> xr.Dataset:
    """A raw source: noon-stamped days, descending latitude (1-degree cells), longitudes as given."""
    times = pd.date_range("2020-01-01 12:00", periods=6, freq="D")
    lat = np.arange(40.0, 29.0, -1.0)
    data = np.zeros((times.size, lat.size, lon.size), np.float32)
    return xr.Dataset(
        {"sst": ((time_name, "latitude", "longitude"), data)},
        coords={time_name: times, "latitude": lat, "longitude": lon},
    )


def test_subset_uses_harmonize_period_and_region_rules() -> None:
    raw = raw_grid(np.arange(280.0, 300.0, 1.0))  # 0..360 longitudes
    cfg = validate_config(
        {"source": {"start": "2020-01-02", "end": "2020-01-04"}, "region": {"lat": [33.0, 35.0], "lon": [-75.0, -72.0]}}
    )
    sub = fetching.subset(raw, cfg, "test source")
    # Whole days, end included, noon stamps: Jan 2, 3 and 4.
    assert [str(t)[:16] for t in sub["time"].values] == [f"2020-01-0{d}T12:00" for d in (2, 3, 4)]
    np.testing.assert_array_equal(sub["latitude"].values, np.arange(37.0, 30.0, -1.0))  # 33..35 +- 2 cells
    np.testing.assert_array_equal(sub["longitude"].values, np.arange(283.0, 291.0, 1.0))  # 285..288 +- 2 cells
    # The time axis under another name is found through harmonize.rename.
    renamed = raw_grid(np.arange(280.0, 300.0, 1.0), time_name="date")
    assert fetching.select_time(renamed, "2020-01-02", "2020-01-02", "x").sizes["date"] == 6  # not recognised
    cut = fetching.select_time(renamed, "2020-01-02", "2020-01-02", "x", rename={"date": "time"})
    assert [str(t)[:16] for t in cut["date"].values] == ["2020-01-02T12:00"]
    with pytest.raises(DataError, match=r"^src: source\.start\.\.source\.end 2021-01-01\.\.2021-01-02 contains no"):
        fetching.select_time(raw, "2021-01-01", "2021-01-02", "src")


def test_region_across_the_source_seam_is_not_cut_in_longitude() -> None:
    raw = raw_grid(np.arange(-179.5, 180.0, 1.0))  # -180..180 source
    across = fetching.select_region(raw, {"lat": [33.0, 35.0], "lon": [170.0, 190.0]}, "src")
    assert across.sizes["longitude"] == 360 and across.sizes["latitude"] == 7
    with pytest.raises(DataError, match=r"^src: region lat \[50\.0, 60\.0\].*covers latitude 30\.\.40"):
        fetching.select_region(raw, {"lat": [50.0, 60.0], "lon": None}, "src")


# -------------------------------------------------------------------------------------------------
# kind copernicus
# -------------------------------------------------------------------------------------------------


def test_copernicus_without_package_or_credentials_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in fetching.CREDENTIAL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    cfg = fetch_cfg(kind="copernicus", dataset_id="cmems_mod_glo_bgc_my_0.25deg_P1D-m")
    try:
        import copernicusmarine  # noqa: F401
    except ImportError:
        match = r"pip install '\.\[copernicus\]'"
    else:
        match = "COPERNICUSMARINE_SERVICE_USERNAME"
    with pytest.raises(ConfigError, match=match):
        fetch.main(cfg, out_dir=tmp_path / "raw")
    assert not (tmp_path / "raw" / "manifest.json").exists()


def _copernicus_skip_reason() -> str | None:
    """Why the real Copernicus Marine download cannot run here, or None when it can."""
    try:
        import copernicusmarine  # noqa: F401
    except ImportError:
        return "the optional copernicusmarine package is not installed (pip install '.[copernicus]')"
    missing = [v for v in fetching.CREDENTIAL_VARIABLES if not os.environ.get(v)]
    if missing:
        return f"Copernicus Marine credentials are not in the environment ({', '.join(missing)})"
    return None


@pytest.mark.skipif(_copernicus_skip_reason() is not None, reason=str(_copernicus_skip_reason()))
def test_copernicus_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real, tiny download (2 days, about 1 x 1 degree of surface nitrate); needs the internet."""
    monkeypatch.chdir(tmp_path)
    cfg = validate_config(
        {
            "name": "bgc",
            "source": {
                "kind": "copernicus",
                "dataset_id": "cmems_mod_glo_bgc_my_0.25deg_P1D-m",
                "start": "2019-01-01",
                "end": "2019-01-02",
                "variables": ["no3"],
            },
            "variables": {"inputs": ["no3"], "targets": ["no3"]},
            "region": {"lat": [30.0, 31.0], "lon": [-40.0, -39.0]},
        }
    )
    manifest_path = fetch.main(cfg, out_dir=tmp_path / "raw")
    manifest = json.loads(manifest_path.read_text())
    assert manifest["kind"] == "copernicus" and manifest["format"] == "netcdf"
    [entry] = manifest["files"]
    path = Path(entry["path"])
    assert path.name == "bgc.nc" and entry["sha256"] == sha256_file(path) and entry["bytes"] == path.stat().st_size
    assert entry["url"] == "copernicusmarine:cmems_mod_glo_bgc_my_0.25deg_P1D-m"
    assert leftovers(tmp_path / "raw") == []
    ds = sources.open_fetched(manifest_path)
    assert list(ds.data_vars) == ["no3"]
    assert [str(t)[:10] for t in ds["time"].values] == ["2019-01-01", "2019-01-02"]
    lat, lon = ds["latitude"].values, ds["longitude"].values
    assert 29.4 <= lat.min() <= 30.0 and 31.0 <= lat.max() <= 31.6  # the region, 0.5 degree wider
    assert -40.6 <= lon.min() <= -40.0 and -39.0 <= lon.max() <= -38.4
    assert ds.sizes.get("depth", 1) == 1  # harmonize.level 0: only the surface level is fetched
    surface = regridding.prepare(ds, cfg)["no3"].values
    assert surface.shape[0] == 2 and np.isfinite(surface).any()
    assert np.nanmin(surface) >= 0.0  # nitrate concentration, mmol m-3
