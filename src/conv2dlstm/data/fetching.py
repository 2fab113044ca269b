"""Fetching: get a source's raw data and describe it in ``manifest.json`` (:func:`fetch_source`).

Source kinds (``cfg["source"]["kind"]``):

``url``
    A URL template expanded with ``{date}`` (a :class:`pandas.Timestamp`, so ``{date:%Y%m%d}``
    works) over ``pd.date_range(start, end, freq=frequency)``. ``http(s)://`` URLs are downloaded
    with :mod:`requests`; ``file:///abs/path`` and ``file:relative/path`` (relative to the working
    directory) are copied (:mod:`conv2dlstm.data.download`). Downloads run in parallel and stream to a
    hidden ``*.partial`` name, renamed into place only after they have been verified
    (``source.checksums``, ``Content-Length``, and that the file opens as netCDF). Transient
    failures are retried with exponential backoff, ``source.backoff_s`` doubling, at most
    ``source.retries`` times: HTTP 408, 425, 429 and 5xx answers, connection errors and timeouts by
    urllib3's ``Retry`` mounted on the :mod:`requests` session (:class:`~conv2dlstm.data.download.HttpRetry`,
    which honours a server's ``Retry-After`` up to :data:`~conv2dlstm.data.download.MAX_RETRY_AFTER_S`), a
    body cut short by a loop around the whole download; never 404.
    Each verified file gets a ``.<name>.sha256`` sidecar, so an interrupted set resumes: files
    whose checksum matches the sidecar or the previous manifest are not downloaded again; and,
    over http(s), the answer's ``ETag``/``Last-Modified`` (``.<name>.validators.json``, also listed
    in the manifest), with which :func:`check_upstream` asks the server whether a file changed
    since (:mod:`conv2dlstm.data.upstream`): a file it found changed is asked for again with a
    conditional GET (kept on 304 Not Modified), whatever its checksum. A date
    whose file does not exist upstream (HTTP 404/410, or a missing ``file:`` path) stops the fetch,
    unless ``source.max_missing`` tolerates that many: they are listed under ``missing`` in the
    manifest and become gaps in the time axis, which the regrid step reports.
``files``
    Local netCDF files or Zarr stores (paths or globs); nothing is copied.
``zarr``
    An fsspec URL of a Zarr store, opened lazily and subset by time, variables and region before
    the subset is written to ``<out_dir>/<name>.zarr``.
``copernicus``
    Copernicus Marine (optional ``copernicusmarine`` package, credentials from the environment),
    opened lazily, subset and written to ``<out_dir>/<name>.nc``.

The manifest (:mod:`conv2dlstm.artifacts.manifest`) is written last, atomically, and only when
every file succeeded; a failed fetch leaves no partial file and no manifest (complete, verified
files stay for the next attempt). Opening what a manifest lists as one dataset is
:mod:`conv2dlstm.data.sources`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
import urllib.parse
import warnings
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from conv2dlstm.artifacts import manifest as manifest_file
from conv2dlstm.artifacts.manifest import FetchedFile
from conv2dlstm.config.sources import SOURCE_KINDS as KINDS
from conv2dlstm.config.sources import expand_path
from conv2dlstm.data import download, upstream
from conv2dlstm.data import harmonize as hz
from conv2dlstm.errors import ConfigError, DataError, DownloadError
from conv2dlstm.fsutil import atomic_output, discard_partials, sha256_file, sha256_tree, tree_bytes
from conv2dlstm.redact import RedactingFilter, redact_text, redact_url

log = logging.getLogger(__name__)
log.addFilter(RedactingFilter())  # defence in depth: every URL this module logs is redacted

ZARR_MARKERS = ("zarr.json", ".zgroup", ".zmetadata")
SOURCE_KINDS = tuple(KINDS)
"""The source kinds (:data:`conv2dlstm.config.sources.SOURCE_KINDS`, the one table of them)."""
"""The source kinds :func:`main` fetches (config key ``source.kind``)."""
REGION_MARGIN_CELLS = 2
"""Source cells kept beyond each side of ``region`` by the fetch pre-cut (regrid cuts exactly)."""


# --------------------------------------------------------------------------------------------------
# checksums of an earlier fetch
# --------------------------------------------------------------------------------------------------


def _previous_checksums(out_dir: Path) -> dict[str, str]:
    """File name -> sha256 from the previous manifest and the ``.<name>.sha256`` sidecars."""
    return manifest_file.checksums(out_dir / manifest_file.NAME) | download.sidecar_checksums(out_dir)


# --------------------------------------------------------------------------------------------------
# kind url
# --------------------------------------------------------------------------------------------------


def expand_urls(template: str, start: str, end: str, frequency: str) -> list[str]:
    """The distinct URLs of ``template`` over the dates of ``start..end`` (order kept)."""
    try:
        dates = pd.date_range(pd.Timestamp(start), pd.Timestamp(end), freq=frequency)
    except ValueError as exc:
        raise ConfigError(f"config key source.frequency: {frequency!r} is not a pandas frequency ({exc})") from exc
    if len(dates) == 0:
        raise ConfigError(
            f"config keys source.start/end/frequency: {start}..{end} at {frequency!r} contains no date; check the range"
        )
    urls: list[str] = []
    seen: set[str] = set()
    for date in dates:
        try:
            url = template.format(date=date)
        except (KeyError, IndexError, ValueError, AttributeError) as exc:
            raise ConfigError(
                f"config key source.url: template {redact_url(template)!r} cannot be expanded "
                f"({type(exc).__name__}: {exc}); the only placeholder is {{date}}, e.g. {{date:%Y%m%d}}"
            ) from exc
        if url not in seen:
            seen.add(url)
            urls.append(url)
    download.check_env_refs(template)
    return urls


def url_dates(template: str, start: str, end: str, frequency: str) -> dict[str, str]:
    """The first date (``YYYY-MM-DD``) of each URL of the template over ``start..end``."""
    out: dict[str, str] = {}
    for date in pd.date_range(pd.Timestamp(start), pd.Timestamp(end), freq=frequency):
        out.setdefault(template.format(date=date), f"{date:%Y-%m-%d}")
    return out


@dataclass
class _MissingDates:
    """Dates without a file upstream, tolerated up to ``source.max_missing`` (shared by the workers)."""

    max_missing: int
    dates: dict[str, str]
    period: str
    found: list[tuple[str, str]]
    lock: threading.Lock

    def tolerate(self, job: download.UrlJob, exc: download.MissingUpstreamError) -> None:
        """Record a missing date, or raise when more than ``max_missing`` are missing."""
        date = self.dates.get(job.url, "?")
        with self.lock:
            self.found.append((date, redact_url(job.url)))
            n = len(self.found)
            listed = ", ".join(f"{d} ({u})" for d, u in sorted(self.found)[:5])
        if self.max_missing == 0:
            raise download.MissingUpstreamError(
                f"{exc} (for a product with missing days, source.max_missing tolerates that many missing "
                "dates, which become reported gaps in the time axis)"
            ) from exc
        if n > self.max_missing:
            raise download.MissingUpstreamError(
                f"at least {n} dates of source.start..source.end ({self.period}) have no file upstream (HTTP "
                f"404/410 or no such file), more than source.max_missing = {self.max_missing}: {listed}"
                f"{' ...' if n > 5 else ''}; check source.url and source.start/end, or raise "
                "source.max_missing to accept them as gaps"
            ) from exc
        log.warning(
            "%s: no file upstream for %s (%s); tolerated as a gap in the time axis (%d of at most "
            "source.max_missing = %d)",
            redact_url(job.url),
            date,
            exc,
            n,
            self.max_missing,
        )

    def records(self) -> list[dict[str, str]]:
        """The manifest's ``missing`` list: ``{"date", "url"}`` (redacted) in date order."""
        return [{"date": d, "url": u} for d, u in sorted(self.found)]


def fetch_urls(
    cfg: dict[str, Any], out_dir: Path, *, known: dict[str, str], missing: list[dict[str, str]]
) -> tuple[list[FetchedFile], str]:
    """Kind ``url``: download every URL of the template into ``out_dir``; see the module docstring.

    Dates without a file upstream, at most ``source.max_missing`` of them, are appended to
    ``missing`` (``{"date", "url"}``) and left out of the result.
    """
    src = cfg["source"]
    urls = expand_urls(src["url"], src["start"], src["end"], src["frequency"])
    absent = _MissingDates(
        int(src["max_missing"]),
        url_dates(src["url"], src["start"], src["end"], src["frequency"]),
        f"{src['start']}..{src['end']}",
        [],
        threading.Lock(),
    )
    jobs = _url_jobs(urls, out_dir, src["checksums"])
    stale = upstream.stale_files(out_dir, known)  # found changed upstream by check-upstream
    done: dict[int, FetchedFile] = {}
    todo: list[tuple[int, download.UrlJob]] = []
    asked = 0
    for i, job in enumerate(jobs):
        if job.dest.name in stale and job.expected_sha256 is None:  # a pinned checksum wins
            todo.append((i, dataclasses.replace(job, conditional=stale[job.dest.name])))
            asked += 1
            continue
        reused = download.reuse(job, known)
        if reused is not None:
            done[i] = reused
        else:
            todo.append((i, job))
    log.info(
        "fetch: %d file(s) in %s, %d already present and verified, %d found changed upstream (check-upstream)",
        len(jobs),
        out_dir,
        len(done),
        asked,
    )
    if todo:
        done.update(_download_urls(todo, src, on_missing=absent.tolerate))
    if not done:
        raise DownloadError(
            f"no date of source.start..source.end ({src['start']}..{src['end']}) has a file upstream "
            f"(template {src['url']!r}); check source.url and the dates"
        )
    missing.extend(absent.records())
    return [done[i] for i in range(len(jobs)) if i in done], "netcdf"


def check_upstream(cfg: dict[str, Any], *, out_dir: Path, download_unknown: bool = False) -> upstream.Report:
    """Ask the server whether each file of the url source fetched into ``out_dir`` changed upstream
    and, when some did, write ``out_dir/upstream.json`` so that the next run fetches them again
    (:mod:`conv2dlstm.data.upstream`); ``download_unknown`` downloads the files that the server's
    answer cannot tell about, to compare checksums. Needs a fetch before (its checksums)."""
    src = cfg["source"]
    if cfg["synthetic"]["kind"] != "none":
        raise ConfigError(
            f"check-upstream: the configuration generates its data (synthetic.kind: {cfg['synthetic']['kind']}), "
            "so there is nothing upstream to re-check; it is for source.kind url with synthetic.kind none"
        )
    if src["kind"] != "url":
        why = {
            "files": "Snakemake itself reruns fetch when one of source.paths changes",
            "zarr": "a Zarr store is re-read with `snakemake --forcerun fetch`",
            "copernicus": "a Copernicus Marine dataset is fetched again with `snakemake --forcerun fetch`",
        }.get(src["kind"], "")
        raise ConfigError(f"check-upstream re-checks sources of kind url, not source.kind {src['kind']!r}: {why}")
    out_dir = Path(out_dir)
    known = _previous_checksums(out_dir)
    if not known:
        raise DataError(
            f"check-upstream: {out_dir} holds no fetched file of source {cfg['name']!r} (no manifest.json, no "
            "checksum sidecar): there is nothing to re-check yet; run the workflow (snakemake, make run) first"
        )
    urls = expand_urls(src["url"], src["start"], src["end"], src["frequency"])
    opts = upstream.Options(
        parallel=src["parallel"],
        retries=src["retries"],
        backoff_s=src["backoff_s"],
        timeout_s=src["timeout_s"],
        hint=f"check source.url (template {src['url']!r})",
        download=download_unknown,
    )
    findings = upstream.check(_url_jobs(urls, out_dir, src["checksums"]), known, opts)
    return upstream.Report(cfg["name"], findings, upstream.write_state(out_dir, cfg["name"], findings))


def _url_jobs(urls: list[str], out_dir: Path, checksums: dict[str, str]) -> list[download.UrlJob]:
    """One download job per URL, into ``out_dir`` under the URL's file name, with its expected
    checksum from ``checksums`` (``source.checksums``; a WARNING names the files it lists that are not
    fetched). :class:`ConfigError` when two URLs share a file name."""
    names: dict[str, str] = {}
    jobs = []
    for url in urls:
        download.url_scheme(url)
        name = download.url_file_name(url)
        if name in names:
            raise ConfigError(
                f"config key source.url: {names[name]!r} and {url!r} would both be saved as {name!r}; "
                "the file name (last path component) must differ between dates"
            )
        names[name] = url
        jobs.append(download.UrlJob(url, out_dir / name, checksums.get(name)))
    unknown = sorted(set(checksums) - set(names))
    if unknown:
        log.warning("source.checksums lists files that are not fetched: %s", ", ".join(unknown))
    return jobs


def _download_urls(
    todo: list[tuple[int, download.UrlJob]],
    src: dict[str, Any],
    *,
    on_missing: Callable[[download.UrlJob, download.MissingUpstreamError], None],
) -> dict[int, FetchedFile]:
    """Download the jobs of ``todo`` (``(index, job)``) as ``src`` (``source``) configures; the fetched
    files by index. A job whose file does not exist upstream goes to ``on_missing``, which raises to
    stop the fetch or returns to leave it out."""
    hint = (
        f"check source.url (template {src['url']!r}) and the date range source.start..source.end "
        f"({src['start']}..{src['end']})"
    )
    fetched = download.download_all(
        [job for _, job in todo],
        parallel=src["parallel"],
        retries=src["retries"],
        backoff_s=src["backoff_s"],
        timeout_s=src["timeout_s"],
        hint=hint,
        on_missing=on_missing,
    )
    return {i: f for (i, _), f in zip(todo, fetched) if f is not None}


# --------------------------------------------------------------------------------------------------
# kind files
# --------------------------------------------------------------------------------------------------


def is_zarr_store(path: Path) -> bool:
    """A directory holding Zarr (v2 or v3) metadata, or any path ending in ``.zarr``."""
    path = Path(path)
    if path.is_dir():
        return path.suffix == ".zarr" or any((path / marker).exists() for marker in ZARR_MARKERS)
    return False


def resolve_paths(patterns: list[str]) -> list[Path]:
    """Expand ``~``, environment variables and globs; every pattern must match something."""
    if not patterns:
        raise ConfigError(
            "config key source.paths: empty; kind files needs netCDF files or Zarr stores (globs allowed)"
        )
    out: list[Path] = []
    for pattern in patterns:
        matches = expand_path(pattern)
        if not matches:
            raise DownloadError(
                f"config key source.paths: {pattern!r} matches no file or directory (relative paths are "
                f"resolved against the working directory {Path.cwd()}); fix the path, or run the step "
                "that creates the data first"
            )
        for match in matches:
            if match not in out:
                out.append(match)
    return out


def locate_files(
    cfg: dict[str, Any], out_dir: Path, *, known: dict[str, str], missing: list[dict[str, str]]
) -> tuple[list[FetchedFile], str]:
    """Kind ``files``: checksum the netCDF files or Zarr stores of ``source.paths`` (no copy)."""
    src = cfg["source"]
    files: list[FetchedFile] = []
    formats = set()
    for path in resolve_paths(src["paths"]):
        path = path.absolute()
        if is_zarr_store(path):
            formats.add("zarr")
            sha = sha256_tree(path)
        elif path.is_dir():
            raise DataError(
                f"source.paths: {path} is a directory but not a Zarr store (no zarr.json or .zgroup); "
                "point source.paths at the files inside it, e.g. a glob like dir/*.nc"
            )
        else:
            formats.add("netcdf")
            try:
                download.check_netcdf(path)
            except ValueError as exc:
                raise DataError(f"source.paths: {path} is not a readable netCDF file: {exc}") from exc
            sha = sha256_file(path)
        files.append(FetchedFile(path, path.as_uri(), sha, tree_bytes(path)))
    if len(formats) > 1:
        raise DataError(
            "source.paths mixes netCDF files and Zarr stores; list one format only (convert one side, "
            "or use two datasets)"
        )
    return files, formats.pop()


# --------------------------------------------------------------------------------------------------
# kind zarr (and the subsetting shared with copernicus)
# --------------------------------------------------------------------------------------------------


def explicit_variables(cfg: dict[str, Any]) -> list[str]:
    """``source.variables`` (raw names), empty when the variables follow ``variables.inputs/targets``."""
    return list(cfg["source"]["variables"])


def select_variables(ds: xr.Dataset, cfg: dict[str, Any], where: str) -> xr.Dataset:
    """Keep the data variables the configuration needs, by their raw names.

    ``source.variables`` when given (each must exist). Otherwise each of ``variables.inputs +
    targets`` under its own name or under a source name that ``harmonize.rename`` maps onto it;
    when one of them is not found by name, every variable is kept (harmonize may recognise it
    under another name).
    """
    explicit = explicit_variables(cfg)
    if explicit:
        missing = [n for n in explicit if n not in ds.data_vars]
        if missing:
            raise DataError(
                f"{where}: variable(s) {missing} of source.variables are not in the source; it has "
                f"{sorted(map(str, ds.data_vars))}; fix source.variables"
            )
        return ds[explicit]
    standard = list(dict.fromkeys(cfg["variables"]["inputs"] + cfg["variables"]["targets"]))
    rename = cfg.get("harmonize", {}).get("rename", {})
    keep: list[str] = []
    for name in standard:
        found = [c for c in [name, *(raw for raw, std in rename.items() if std == name)] if c in ds.data_vars]
        if not found:
            log.info("%s: variable %r not found by name; keeping all variables for harmonize", where, name)
            return ds
        keep.extend(found)
    return ds[list(dict.fromkeys(keep))]


def _rename(cfg: dict[str, Any]) -> dict[str, str]:
    return dict(cfg.get("harmonize", {}).get("rename", {}))


def select_time(
    ds: xr.Dataset, start: str, end: str, where: str, *, rename: dict[str, str] | None = None
) -> xr.Dataset:
    """The whole days ``start..end`` of a raw dataset (:func:`harmonize.select_period`).

    The time axis is the one :func:`harmonize.find_axis` finds (``rename`` as in
    ``harmonize.rename``). Without a datetime time axis (none found, or a non-standard calendar)
    ``ds`` is returned unchanged and the regrid step selects the period after harmonizing.
    """
    name = hz.find_axis(ds, "time", rename=rename)
    if name is None:
        log.info("%s: no time coordinate found; time is not subset", where)
        return ds
    if not np.issubdtype(ds[name].dtype, np.datetime64):
        log.info("%s: time %r is not datetime64 (non-standard calendar?); time is not subset", where, name)
        return ds
    return hz.select_period(
        ds, start, end, time=name, what=f"{where}: source.start..source.end", fix="fix source.start/end"
    )


def select_region(
    ds: xr.Dataset, region: dict[str, Any], where: str, *, rename: dict[str, str] | None = None
) -> xr.Dataset:
    """Pre-cut ``region`` (harmonized longitudes) from a raw dataset, :data:`REGION_MARGIN_CELLS` cells wider.

    A thin wrapper around :func:`harmonize.select_region` on the raw axes (:func:`harmonize.find_axis`).
    The longitude bounds are converted to the source's convention (0..360 when its longitudes
    exceed 180). A box that wraps across the source's longitude seam is not cut in longitude, and an
    axis that is not found is not cut (harmonize and regrid cut exactly later).
    """
    names = {key: hz.find_axis(ds, key, rename=rename) for key in ("lat", "lon")}
    ranges: dict[str, list[float]] = {}
    for key, name in names.items():
        bounds = region.get(key)
        if bounds is None:
            continue
        if name is None:
            log.info("%s: no 1-D %s coordinate found; region.%s is applied by the regrid step", where, key, key)
            continue
        lo, hi = float(bounds[0]), float(bounds[1])
        if key == "lon":
            if hi - lo >= 360.0:
                continue
            convention = "0..360" if float(np.nanmax(ds[name].values)) > 180.0 else "-180..180"
            lo, hi = (float(v) for v in hz.wrap_longitude(np.array([lo, hi]), convention))
            if lo > hi:
                log.info("%s: region.lon %s wraps across the source's seam; longitudes are not cut", where, bounds)
                continue
        ranges[key] = [lo, hi]
    try:
        return hz.select_region(
            ds,
            ranges.get("lat"),
            ranges.get("lon"),
            lat=names["lat"] or "lat",
            lon=names["lon"] or "lon",
            margin_cells=REGION_MARGIN_CELLS,
        )
    except DataError as exc:
        raise DataError(f"{where}: {exc}") from exc


_KEEP_ENCODING = ("dtype", "_FillValue", "scale_factor", "add_offset", "units", "calendar")


def _prepare_for_zarr(ds: xr.Dataset, original: xr.Dataset) -> xr.Dataset:
    """Uniform Dask chunks (the source's chunk sizes) and encodings that do not pin old chunks."""
    chunks: dict[Hashable, int] = {}
    for var in original.variables.values():
        if var.chunks is not None:
            for dim, sizes in zip(var.dims, var.chunks):
                chunks[dim] = max(chunks.get(dim, 0), max(sizes))
    ds = ds.chunk({d: min(c, ds.sizes[d]) for d, c in chunks.items() if d in ds.dims})
    return clean_encoding(ds)


def clean_encoding(ds: xr.Dataset) -> xr.Dataset:
    """Drop storage encodings (chunks, compressors, ...) inherited from the source, keep CF packing."""
    ds = ds.copy()
    for var in ds.variables.values():
        var.encoding = {k: v for k, v in var.encoding.items() if k in _KEEP_ENCODING}
    return ds


def zarr_storage_options(store: str) -> dict[str, Any]:
    """fsspec options for opening ``store``: for http(s) stores, aiohttp's ``trust_env``, so that
    the host's credentials come from ``~/.netrc`` (or the file named by ``NETRC``) as for the url
    source (and proxies from the environment); nothing for other stores, whose file systems (s3fs,
    gcsfs, ...) read credentials from their own environment variables and files."""
    if urllib.parse.urlsplit(store).scheme.lower() in ("http", "https"):
        return {"storage_options": {"client_kwargs": {"trust_env": True}}}
    return {}


def open_zarr_source(store: str) -> xr.Dataset:
    """Open an fsspec Zarr store lazily (``chunks={}``: the store's own chunks); messages show the
    store redacted (:func:`redact_text`)."""
    shown = redact_url(store)
    try:
        with warnings.catch_warnings():
            # Zarr v3 stores written by xarray carry consolidated metadata, which zarr flags as
            # outside the v3 specification; it is what makes remote stores fast to open.
            warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
            return xr.open_zarr(store, chunks={}, **zarr_storage_options(store))
    except (FileNotFoundError, KeyError, ValueError, OSError) as exc:
        raise DownloadError(
            f"source.store: cannot open Zarr store {shown!r} ({type(exc).__name__}: {redact_text(str(exc))}); "
            "check the URL (remote stores need consolidated metadata or a zarr.json at the root)"
        ) from exc
    except Exception as exc:  # zarr raises its own errors (GroupNotFoundError, ...)
        raise DownloadError(
            f"source.store: cannot open Zarr store {shown!r} ({type(exc).__name__}: {redact_text(str(exc))})"
        ) from exc


def subset(ds: xr.Dataset, cfg: dict[str, Any], where: str) -> xr.Dataset:
    """Time, variable and region subset of a lazy dataset (nothing is read)."""
    src = cfg["source"]
    ds = select_variables(ds, cfg, where)
    ds = select_time(ds, src["start"], src["end"], where, rename=_rename(cfg))
    return select_region(ds, cfg.get("region", {}), where, rename=_rename(cfg))


def fetch_zarr(
    cfg: dict[str, Any], out_dir: Path, *, known: dict[str, str], missing: list[dict[str, str]]
) -> tuple[list[FetchedFile], str]:
    """Kind ``zarr``: subset a remote (or local) Zarr store and write it to ``<out_dir>/<name>.zarr``."""
    store = cfg["source"]["store"]
    if not store:
        raise ConfigError("config key source.store: empty; kind zarr needs an fsspec URL of a Zarr store")
    original = open_zarr_source(store)
    shown = redact_url(store)
    ds = _prepare_for_zarr(subset(original, cfg, f"zarr store {shown}"), original)
    dest = out_dir / f"{cfg['name']}.zarr"
    log.info("fetch: writing %s (%s) from %s", dest, dict(ds.sizes), shown)
    try:
        with atomic_output(dest) as tmp:
            ds.to_zarr(tmp, mode="w", zarr_format=3, consolidated=False)
    except (OSError, KeyError) as exc:
        raise DownloadError(
            f"{shown}: reading the subset failed ({type(exc).__name__}: {redact_text(str(exc))}); retry later"
        ) from exc
    return [FetchedFile(dest, store, sha256_tree(dest), tree_bytes(dest))], "zarr"


# --------------------------------------------------------------------------------------------------
# kind copernicus
# --------------------------------------------------------------------------------------------------

CREDENTIAL_VARIABLES = ("COPERNICUSMARINE_SERVICE_USERNAME", "COPERNICUSMARINE_SERVICE_PASSWORD")


def fetch_copernicus(
    cfg: dict[str, Any], out_dir: Path, *, known: dict[str, str], missing: list[dict[str, str]]
) -> tuple[list[FetchedFile], str]:
    """Kind ``copernicus``: open ``source.dataset_id`` lazily, subset it and write ``<out_dir>/<name>.nc``."""
    src = cfg["source"]
    if not src["dataset_id"]:
        raise ConfigError("config key source.dataset_id: empty; kind copernicus needs a Copernicus Marine dataset id")
    copernicusmarine = _copernicus_toolbox()
    kwargs = _copernicus_request(cfg)
    try:
        ds = copernicusmarine.open_dataset(**kwargs)
    except Exception as exc:  # the toolbox raises many exception types (network, auth, catalogue)
        said = redact_text(str(exc), secrets=(kwargs["username"], kwargs["password"]))
        raise DownloadError(
            f"Copernicus Marine dataset {src['dataset_id']!r}: {type(exc).__name__}: {said}; check "
            "source.dataset_id, the credentials and the network"
        ) from exc
    where = f"Copernicus Marine dataset {src['dataset_id']}"
    ds = select_variables(ds, cfg, where)
    depth = hz.find_axis(ds, "vertical", rename=_rename(cfg))
    level = int(cfg.get("harmonize", {}).get("level", 0))
    if depth is not None and ds.sizes[ds[depth].dims[0]] > level + 1:
        ds = ds.isel({ds[depth].dims[0]: slice(0, level + 1)})
    ds = clean_encoding(ds)
    dest = out_dir / f"{cfg['name']}.nc"
    try:
        with atomic_output(dest) as tmp:
            ds.to_netcdf(tmp, engine="netcdf4")
    except (OSError, RuntimeError) as exc:
        raise DownloadError(f"{where}: download failed ({type(exc).__name__}: {exc}); retry later") from exc
    return [
        FetchedFile(dest, f"copernicusmarine:{src['dataset_id']}", sha256_file(dest), dest.stat().st_size)
    ], "netcdf"


def _copernicus_toolbox() -> Any:
    """The ``copernicusmarine`` module, once the credentials are in the environment
    (:data:`CREDENTIAL_VARIABLES`); else :class:`ConfigError` saying what to install or set."""
    try:
        import copernicusmarine
    except ImportError as exc:
        raise ConfigError(
            "source.kind copernicus needs the optional copernicusmarine package: pip install '.[copernicus]' "
            "(or pip install copernicusmarine)"
        ) from exc
    unset = [v for v in CREDENTIAL_VARIABLES if not os.environ.get(v)]
    if unset:
        raise ConfigError(
            f"source.kind copernicus: environment variable(s) {', '.join(unset)} not set; export your "
            "Copernicus Marine username and password in them (credentials are never read from the config)"
        )
    return copernicusmarine


def _copernicus_request(cfg: dict[str, Any]) -> dict[str, Any]:
    """The arguments of ``copernicusmarine.open_dataset``: the dataset, the credentials, the period
    (whole days), the explicit variables, and the region widened by 0.5 degree (longitudes in
    -180..180; none when the region crosses the antimeridian there)."""
    src = cfg["source"]
    explicit = explicit_variables(cfg)
    region = cfg.get("region", {})
    kwargs: dict[str, Any] = {
        "dataset_id": src["dataset_id"],
        "username": os.environ[CREDENTIAL_VARIABLES[0]],
        "password": os.environ[CREDENTIAL_VARIABLES[1]],
        "start_datetime": f"{src['start']}T00:00:00",
        "end_datetime": f"{src['end']}T23:59:59",
    }
    if explicit:
        kwargs["variables"] = explicit
    if region.get("lat") is not None:
        kwargs["minimum_latitude"], kwargs["maximum_latitude"] = region["lat"][0] - 0.5, region["lat"][1] + 0.5
    if region.get("lon") is not None:
        lo, hi = (float(v) for v in hz.wrap_longitude(np.array(region["lon"], dtype=float), "-180..180"))
        if lo <= hi:  # Copernicus Marine uses -180..180
            kwargs["minimum_longitude"], kwargs["maximum_longitude"] = lo - 0.5, hi + 0.5
    return kwargs


# --------------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------------


def fetch_source(cfg: dict[str, Any], *, out_dir: Path) -> Path:
    """Fetch ``cfg["source"]`` into ``out_dir``; write and return ``out_dir/manifest.json``. The fetch
    step runs it on the configured period; the forecast on its input days."""
    src = cfg["source"]
    kind = src["kind"]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = out_dir / manifest_file.NAME
    known = _previous_checksums(out_dir)
    manifest_path.unlink(missing_ok=True)  # a failed fetch must not leave the previous manifest behind
    for stray in discard_partials(out_dir):
        log.info("fetch: discarded %s left by an interrupted run", stray)
    started = time.monotonic()
    missing: list[dict[str, str]] = []
    if kind not in SOURCE_KINDS:
        raise ConfigError(f"config key source.kind: {kind!r} is not one of {', '.join(SOURCE_KINDS)}")
    fetcher = FETCHERS[kind]
    files, fmt = fetcher(cfg, out_dir, known=known, missing=missing)
    manifest = manifest_file.build(kind, fmt, files, **({"missing": missing} if missing else {}))
    manifest_file.write(manifest_path, manifest)
    log.info(
        "fetch: %d file(s), %.1f MB, in %.1f s -> %s",
        len(files),
        sum(f.bytes for f in files) / 1e6,
        time.monotonic() - started,
        manifest_path,
    )
    return manifest_path


FETCHERS = {name: globals()[kind.fetcher] for name, kind in KINDS.items()}
"""Per source kind, its fetcher (named in :data:`conv2dlstm.config.sources.SOURCE_KINDS`)."""
