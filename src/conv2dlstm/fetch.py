"""Fetch step: get the raw data and describe it in ``manifest.json``.

Source kinds (``cfg["source"]["kind"]``):

``url``
    A URL template expanded with ``{date}`` (a :class:`pandas.Timestamp`, so ``{date:%Y%m%d}``
    works) over ``pd.date_range(start, end, freq=frequency)``. ``http(s)://`` URLs are downloaded
    with :mod:`requests`; ``file:///abs/path`` and ``file:relative/path`` (relative to the working
    directory) are copied. Downloads run in parallel and stream to a hidden ``*.partial`` name,
    renamed into place only after they have been verified (``source.checksums``,
    ``Content-Length``, and that the file opens as netCDF). Transient failures are retried with
    exponential backoff, ``source.backoff_s`` doubling, at most ``source.retries`` times: HTTP
    408, 425, 429 and 5xx answers, connection errors and timeouts by urllib3's ``Retry`` mounted on
    the :mod:`requests` session (:class:`HttpRetry`, which honours a server's ``Retry-After`` up to
    :data:`MAX_RETRY_AFTER_S`), a body cut short by a loop around the whole download; never 404.
    Each verified file gets a ``.<name>.sha256`` sidecar, so an interrupted set resumes: files
    whose checksum matches the sidecar or the previous manifest are not downloaded again. A date
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
files stay for the next attempt).
:func:`open_fetched` opens what a manifest lists as one lazy (Dask) dataset with the raw names;
:func:`open_sources` also checks the files before merging them (duplicate time stamps, units:
:class:`conv2dlstm.harmonize.SourceRules`) and says which file each time step came from.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import shutil
import threading
import time
import urllib.parse
import warnings
from collections.abc import Callable, Hashable
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self, cast

import numpy as np
import pandas as pd
import xarray as xr
from urllib3.exceptions import InvalidHeader
from urllib3.util.retry import Retry

from conv2dlstm import __version__
from conv2dlstm import harmonize as hz
from conv2dlstm.artifacts import manifest as manifest_file
from conv2dlstm.artifacts.manifest import FetchedFile, display_path
from conv2dlstm.errors import ConfigError, DataError, DownloadError
from conv2dlstm.fsutil import atomic_output, discard_partials, sha256_file, sha256_tree, tree_bytes
from conv2dlstm.redact import RedactingFilter, env_refs, redact_text, redact_url, resolve_env_refs

log = logging.getLogger(__name__)
log.addFilter(RedactingFilter())  # defence in depth: every URL this module logs is redacted

RETRY_STATUS = frozenset({408, 425, 429, *range(500, 600)})
"""HTTP answers retried (by :class:`HttpRetry`): timeouts, too many requests and every server error."""
CHUNK_BYTES = 1 << 20
MAX_RETRY_AFTER_S = 60.0
"""The longest wait before a retry that a server's ``Retry-After`` can ask for."""
ZARR_MARKERS = ("zarr.json", ".zgroup", ".zmetadata")
REGION_MARGIN_CELLS = 2
"""Source cells kept beyond each side of ``region`` by the fetch pre-cut (regrid cuts exactly)."""
USER_AGENT = f"conv2dlstm/{__version__} (python-requests)"
# The netCDF-C / HDF5 libraries are not thread-safe: parallel download workers check files one at a time.
_NETCDF_LOCK = threading.Lock()


class MissingUpstreamError(DownloadError):
    """The file of one date does not exist upstream (HTTP 404/410, or no such ``file:`` path)."""


class _BrokenBody(Exception):
    """The body of a 200 answer ended early (connection broken, fewer bytes than ``Content-Length``):
    the whole download is repeated (urllib3's ``Retry`` ends when the headers have arrived)."""


class _Cancelled(Exception):
    """Another file failed while this one waited to retry."""


# --------------------------------------------------------------------------------------------------
# checksums of an earlier fetch
# --------------------------------------------------------------------------------------------------


def _previous_checksums(out_dir: Path) -> dict[str, str]:
    """File name -> sha256 from the previous manifest and the ``.<name>.sha256`` sidecars."""
    known = manifest_file.checksums(out_dir / manifest_file.NAME)
    for sidecar in out_dir.glob(".*.sha256"):
        with contextlib.suppress(OSError, IndexError):
            known[sidecar.name[1 : -len(".sha256")]] = sidecar.read_text().split()[0]
    return known


def _sidecar(path: Path) -> Path:
    return path.parent / f".{path.name}.sha256"


# --------------------------------------------------------------------------------------------------
# verification
# --------------------------------------------------------------------------------------------------


def check_netcdf(path: Path) -> None:
    """Raise ``ValueError`` unless ``path`` is a complete, readable netCDF (3 or 4) file.

    netCDF-4/HDF5 files are opened (HDF5 detects truncation) and one value of every variable is
    read; classic files are also parsed with :mod:`scipy.io` (netCDF-C silently pads a truncated
    classic file with zeros).
    """
    import netCDF4

    with open(path, "rb") as fh:
        magic = fh.read(4)
    try:
        with _NETCDF_LOCK, netCDF4.Dataset(path) as nc:
            for var in nc.variables.values():
                if var.size:
                    var[tuple(-1 if n else slice(None) for n in var.shape)]
    except (OSError, RuntimeError, IndexError, ValueError) as exc:
        raise ValueError(f"{exc}") from exc
    if magic in (b"CDF\x01", b"CDF\x02"):
        from scipy.io import netcdf_file

        try:
            netcdf_file(path, mmap=True).close()
        except Exception as exc:  # scipy raises ValueError/TypeError/IndexError on short files
            raise ValueError(f"classic netCDF file is truncated or corrupt ({exc})") from exc


def _verify(tmp: Path, url: str, name: str, expected_sha256: str | None) -> str:
    """Checksum and netCDF check of a downloaded temporary file; returns its sha256."""
    sha = sha256_file(tmp)
    url = redact_url(url)
    if expected_sha256 is not None and sha != expected_sha256.lower():
        raise DownloadError(
            f"{url}: SHA-256 {sha} does not match source.checksums[{name!r}] = {expected_sha256}; "
            "the file changed upstream or is corrupt (update the checksum only if the new file is right)"
        )
    try:
        check_netcdf(tmp)
    except ValueError as exc:
        raise DownloadError(
            f"{url}: the downloaded file is not a readable netCDF file (truncated or corrupt?): {exc}; "
            "check the URL in a browser, or retry later"
        ) from exc
    return sha


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
    check_env_refs(template)
    return urls


def check_env_refs(url: str) -> None:
    """Every environment variable that a query parameter of ``url`` names as its value
    (``?token=$NAME``, :mod:`conv2dlstm.redact`) is set; else :class:`ConfigError` naming it."""
    unset = [name for name in env_refs(url) if name not in os.environ]
    if unset:
        raise ConfigError(
            f"config key source.url: {redact_url(url)!r} takes query parameter value(s) from "
            f"environment variable(s) {', '.join(unset)}, which are not set; export them (the value is "
            "read when the request is made and never written down)"
        )


def request_url(url: str) -> str:
    """The URL to request: ``url`` with its ``$NAME`` query values read from the environment
    (:func:`conv2dlstm.redact.resolve_env_refs`). It holds secrets: never log it, and pass any
    message that may quote it through :func:`redact_text`."""
    try:
        return resolve_env_refs(url)
    except KeyError:
        check_env_refs(url)
        raise


def url_file_name(url: str) -> str:
    """Destination name: the last path component of the URL."""
    name = urllib.parse.unquote(urllib.parse.urlsplit(url).path).rstrip("/").split("/")[-1]
    if not name or name in (".", ".."):
        raise ConfigError(f"config key source.url: {redact_url(url)!r} has no file name in its path")
    return name


def file_url_path(url: str) -> Path:
    """Local path of a ``file:`` URL: ``file:///abs``, ``file://localhost/abs`` or ``file:relative``."""
    rest = urllib.parse.unquote(url[len("file:") :])
    if rest.startswith("//"):
        host, _, path = rest[2:].partition("/")
        if host not in ("", "localhost"):
            raise ConfigError(
                f"config key source.url: {redact_url(url)!r} names host {host!r}; use file:///absolute/path or "
                "file:relative/path (relative to the working directory)"
            )
        return Path("/" + path)
    return Path(rest)


def url_scheme(url: str) -> str:
    """``http``, ``https`` or ``file``; any other scheme is a :class:`ConfigError`."""
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in ("http", "https", "file"):
        raise ConfigError(
            f"config key source.url: {redact_url(url)!r} uses scheme {scheme or '(none)'!r}; use http://, https:// "
            "or file:"
        )
    if scheme == "file":
        file_url_path(url)  # rejects file://otherhost/...
    return scheme


class HttpRetry(Retry):
    """urllib3's :class:`~urllib3.util.retry.Retry` with the fetch step's schedule and messages.

    - waits ``backoff_factor * 2**k`` seconds before retry ``k + 1`` (urllib3 itself does not wait
      before the first retry), or what the server's ``Retry-After`` asks when that is longer, at
      most :data:`MAX_RETRY_AFTER_S`; a ``Retry-After`` that is neither seconds nor an HTTP date is
      ignored (urllib3 would fail the request);
    - logs one warning per retry naming the URL (redacted), what failed and the wait; urllib3's own
      "Retrying" warning, which quotes the request URL unredacted, is dropped
      (:class:`_DropUrllib3RetryWarning`);
    - a wait ends early, raising :class:`_Cancelled`, once ``stop`` is set (another file failed).
    """

    def __init__(self, *args: Any, stop: threading.Event | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stop = stop

    def new(self, **kw: Any) -> Self:
        retry = super().new(**kw)
        retry.stop = self.stop
        return retry

    def get_backoff_time(self) -> float:
        retries = len(self.history)
        return 0.0 if retries == 0 else self.backoff_factor * 2 ** (retries - 1)

    def parse_retry_after(self, retry_after: str) -> float:
        try:
            seconds = float(retry_after)  # RFC 9110 says whole seconds; a fraction does no harm
        except ValueError:
            try:
                seconds = super().parse_retry_after(retry_after)  # an HTTP date
            except InvalidHeader:
                return 0.0
        return min(seconds, MAX_RETRY_AFTER_S) if seconds > 0 else 0.0  # NaN too

    def delay(self, response: Any = None) -> float:
        """Seconds to wait before the next attempt, after ``response`` (None after an error)."""
        backoff = self.get_backoff_time()
        if response is not None and self.respect_retry_after_header:
            after = self.get_retry_after(response)
            if after is not None:
                return max(after, backoff)
        return backoff

    def sleep(self, response: Any = None) -> None:
        seconds = self.delay(response)
        if self.stop is None:
            time.sleep(seconds)
        elif self.stop.wait(seconds):
            raise _Cancelled()

    def increment(
        self,
        method: str | None = None,
        url: str | None = None,
        response: Any = None,
        error: Exception | None = None,
        _pool: Any = None,
        _stacktrace: TracebackType | None = None,
    ) -> Self:
        retry = super().increment(method, url, response, error, _pool, _stacktrace)  # raises when exhausted
        if error is not None:
            what = f"{type(error).__name__}: {redact_text(str(error))}"
        else:
            what = f"HTTP {response.status} {response.reason}" if response is not None else "failed"
        done = len(retry.history)
        limit = done + retry.total if isinstance(retry.total, int) else done
        log.warning(
            "%s: %s; retry %d/%d in %.1f s", _request_shown(_pool, url), what, done, limit, retry.delay(response)
        )
        return retry


def _request_shown(pool: Any, url: str | None) -> str:
    """The URL urllib3 requests (``url`` a path on ``pool``'s host), redacted."""
    url = url or ""
    if url.startswith("/") and pool is not None:
        default = {"http": 80, "https": 443}.get(pool.scheme)
        port = "" if pool.port in (None, default) else f":{pool.port}"
        url = f"{pool.scheme}://{pool.host}{port}{url}"
    return redact_text(url)


class _DropUrllib3RetryWarning(logging.Filter):
    """Drops urllib3's "Retrying (...) after connection broken" warning for an :class:`HttpRetry`,
    which logs its own line (URL redacted)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        return not (isinstance(args, tuple) and args and isinstance(args[0], HttpRetry))


logging.getLogger("urllib3.connectionpool").addFilter(_DropUrllib3RetryWarning())
for _name in ("urllib3.connectionpool", "urllib3.util.retry"):  # their debug lines quote request URLs
    logging.getLogger(_name).addFilter(RedactingFilter())


def http_retry(retries: int, backoff_s: float, stop: threading.Event | None = None) -> HttpRetry:
    """The retry policy of the HTTP requests of kind ``url`` (``source.retries``, ``source.backoff_s``).

    GET only; :data:`RETRY_STATUS` answers (never 404/410: :class:`MissingUpstreamError`),
    connection errors and timeouts. Once the retries are spent on an HTTP status, the last answer
    is returned (``raise_on_status=False``) and :func:`_http_get` says how many attempts failed.
    """
    return HttpRetry(
        total=retries,
        backoff_factor=backoff_s,
        status_forcelist=RETRY_STATUS,
        allowed_methods=frozenset({"GET"}),
        respect_retry_after_header=True,
        raise_on_status=False,
        stop=stop,
    )


class _SessionPool:
    """One :class:`requests.Session` per worker thread (sessions are not thread-safe), each with
    ``retry`` mounted for http:// and https://."""

    def __init__(self, pool_size: int, retry: Retry) -> None:
        self._local = threading.local()
        self._sessions: list[Any] = []
        self._lock = threading.Lock()
        self._pool_size = pool_size
        self._retry = retry

    def get(self) -> Any:
        session = getattr(self._local, "session", None)
        if session is None:
            import requests
            from requests.adapters import HTTPAdapter

            session = requests.Session()
            adapter = HTTPAdapter(pool_connections=1, pool_maxsize=self._pool_size, max_retries=self._retry)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            session.headers["User-Agent"] = USER_AGENT
            self._local.session = session
            with self._lock:
                self._sessions.append(session)
        return session

    def close(self) -> None:
        with self._lock:
            for s in self._sessions:
                s.close()
            self._sessions.clear()


def credentials_hint(url: str) -> str:
    """For an HTTP 401/403 of ``url``: where its credentials come from and what to fix. Never quotes
    a credential (a ``.netrc`` that cannot be parsed is named by line only)."""
    from netrc import NetrcParseError

    from requests.utils import get_netrc_auth

    host = urllib.parse.urlsplit(url).hostname or "<host>"
    where = os.environ.get("NETRC") or "~/.netrc"
    line = f"'machine {host} login <user> password <password>'"
    tokens = env_refs(url)
    token = f"; or the token in {', '.join('$' + t for t in tokens)} is wrong" if tokens else ""
    try:
        found = get_netrc_auth(url, raise_errors=True)
    except NetrcParseError as exc:
        return f"{where} cannot be parsed (line {exc.lineno}); fix it: each entry is a line {line}{token}"
    except OSError as exc:
        return f"{where} cannot be read ({exc.strerror}); make it readable by you only (chmod 600){token}"
    if found is None:
        return (
            f"no credentials for {host} in {where}: add a line {line} to it (chmod 600 {where}), or, for a "
            f"token, a query parameter valued with an environment variable, e.g. ?token=$MY_TOKEN{token}"
        )
    return f"the server refused the credentials for {host} from {where}: check them there{token}"


DOWN_HINT = "the server or the network may be down (retry later, or raise source.retries / source.timeout_s)"


def _http_get(url: str, dest: Path, session: Any, timeout_s: float, hint: str, retries: int) -> None:
    """Download ``url`` into ``dest``: one GET, which the session's :class:`HttpRetry` repeats on a
    transient failure up to ``retries`` times. Raises :class:`_BrokenBody` when the body ends early,
    :class:`MissingUpstreamError` on 404/410, else :class:`DownloadError`.

    ``url`` is as configured (``$NAME`` query values unresolved); the request goes to
    :func:`request_url` of it, without explicit auth, so requests takes the host's credentials from
    ``~/.netrc`` (or the file named by ``NETRC``), also after a redirect to another host. Messages
    show ``url`` redacted and pass what requests says through :func:`redact_text`.
    """
    import requests
    from urllib3.exceptions import MaxRetryError

    shown = redact_url(url)
    try:
        with session.get(request_url(url), stream=True, timeout=timeout_s) as resp:
            status = resp.status_code
            if status in (404, 410):
                raise MissingUpstreamError(f"{shown}: HTTP {status} {resp.reason} (no such file); {hint}")
            if status in RETRY_STATUS:  # what HttpRetry returns once the retries are spent
                history = getattr(getattr(resp.raw, "retries", None), "history", ())
                raise DownloadError(
                    f"{shown}: failed after {len(history) + 1} attempt(s): HTTP {status} {resp.reason}; {DOWN_HINT}"
                )
            if status in (401, 403):
                raise DownloadError(
                    f"{shown}: HTTP {status} {resp.reason}; the server refuses access: {credentials_hint(url)}"
                )
            if status >= 400:
                raise DownloadError(f"{shown}: HTTP {status} {resp.reason}; {hint}")
            length = resp.headers.get("Content-Length")
            expected = int(length) if length and length.isdigit() and not resp.headers.get("Content-Encoding") else None
            received = 0
            try:
                with open(dest, "wb") as fh:
                    for block in resp.iter_content(CHUNK_BYTES):
                        fh.write(block)
                        received += len(block)
            except (requests.exceptions.ChunkedEncodingError, requests.ConnectionError, requests.Timeout) as exc:
                of = f" of {expected}" if expected is not None else ""
                raise _BrokenBody(
                    f"connection broken after {received}{of} bytes, truncated ({redact_text(str(exc))})"
                ) from exc
            if expected is not None and received != expected:
                raise _BrokenBody(f"truncated: received {received} of {expected} bytes (Content-Length)")
    except (requests.ConnectionError, requests.Timeout) as exc:
        # retried by HttpRetry: a MaxRetryError inside says the retries were spent
        attempts = retries + 1 if exc.args and isinstance(exc.args[0], MaxRetryError) else 1
        raise DownloadError(
            f"{shown}: failed after {attempts} attempt(s): {type(exc).__name__}: {redact_text(str(exc))}; {DOWN_HINT}"
        ) from exc
    except requests.RequestException as exc:
        raise DownloadError(f"{shown}: {type(exc).__name__}: {redact_text(str(exc))}") from exc


def _file_copy(url: str, dest: Path, hint: str) -> None:
    src = file_url_path(url)
    shown = redact_url(url)
    if not src.is_file():
        raise MissingUpstreamError(f"{shown}: {src.absolute()} does not exist; {hint}")
    try:
        with open(src, "rb") as fin, open(dest, "wb") as fout:
            shutil.copyfileobj(fin, fout, CHUNK_BYTES)
    except OSError as exc:
        raise DownloadError(f"{shown}: cannot copy {src}: {exc}") from exc


@dataclass(frozen=True)
class _UrlJob:
    url: str
    dest: Path
    expected_sha256: str | None


def _fetch_one(
    job: _UrlJob,
    *,
    sessions: _SessionPool,
    retries: int,
    backoff_s: float,
    timeout_s: float,
    hint: str,
    stop: threading.Event,
) -> FetchedFile:
    """Download, verify and atomically place one file; messages show the URL redacted.

    The HTTP request retries by itself (the sessions' :class:`HttpRetry`); a body that ends early
    (:class:`_BrokenBody`) repeats the whole download, at most ``retries`` times, waiting
    ``backoff_s * 2**k`` before repeat ``k + 1``.
    """
    scheme = url_scheme(job.url)
    shown = redact_url(job.url)
    cancelled = f"{shown}: cancelled after another file failed"
    with atomic_output(job.dest) as tmp:
        for attempt in range(retries + 1):
            if stop.is_set():
                raise DownloadError(cancelled)
            try:
                if scheme == "file":
                    _file_copy(job.url, tmp, hint)
                else:
                    _http_get(job.url, tmp, sessions.get(), timeout_s, hint, retries)
                break
            except _Cancelled as exc:
                raise DownloadError(cancelled) from exc
            except _BrokenBody as exc:
                if attempt >= retries:
                    raise DownloadError(f"{shown}: failed after {attempt + 1} attempt(s): {exc}; {DOWN_HINT}") from exc
                delay = backoff_s * 2**attempt
                log.warning("%s: %s; retry %d/%d in %.1f s", shown, exc, attempt + 1, retries, delay)
                if stop.wait(delay):
                    raise DownloadError(cancelled) from exc
        sha = _verify(tmp, job.url, job.dest.name, job.expected_sha256)
        size = tmp.stat().st_size
    with atomic_output(_sidecar(job.dest)) as tmp_sidecar:
        tmp_sidecar.write_text(f"{sha}  {job.dest.name}\n")
    return FetchedFile(job.dest, job.url, sha, size)


def _reuse(job: _UrlJob, known: dict[str, str]) -> FetchedFile | None:
    """The already-present destination if its checksum matches what was recorded, else None."""
    if not job.dest.is_file():
        return None
    expected = job.expected_sha256 or known.get(job.dest.name)
    if expected is None:
        return None
    sha = sha256_file(job.dest)
    if sha != expected:
        log.info("%s: present but its checksum differs from the recorded one; fetching again", job.dest)
        return None
    if not _sidecar(job.dest).exists():
        with atomic_output(_sidecar(job.dest)) as tmp:
            tmp.write_text(f"{sha}  {job.dest.name}\n")
    return FetchedFile(job.dest, job.url, sha, job.dest.stat().st_size)


def run_parallel(
    jobs: list[_UrlJob],
    worker: Callable[[_UrlJob, threading.Event], FetchedFile | None],
    parallel: int,
    stop: threading.Event | None = None,
) -> list[FetchedFile | None]:
    """Run ``worker`` over ``jobs`` on ``parallel`` threads; on the first failure cancel the rest and raise it.

    ``stop`` (a new event by default), handed to each worker, is set on the first failure.
    """
    stop = threading.Event() if stop is None else stop
    results: dict[int, FetchedFile | None] = {}
    with ThreadPoolExecutor(max_workers=max(1, parallel), thread_name_prefix="fetch") as pool:
        futures: dict[Future[FetchedFile | None], int] = {
            pool.submit(worker, job, stop): i for i, job in enumerate(jobs)
        }
        pending = set(futures)
        first_error: BaseException | None = None
        try:
            while pending:
                done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for fut in done:
                    if fut.cancelled():
                        continue
                    exc = fut.exception()
                    if exc is None:
                        results[futures[fut]] = fut.result()
                    elif first_error is None:
                        first_error = exc
                if first_error is not None and not stop.is_set():
                    stop.set()
                    for fut in pending:
                        fut.cancel()
        except BaseException:
            stop.set()
            for fut in pending:
                fut.cancel()
            raise
    if first_error is not None:
        failed = len(jobs) - len(results)
        if failed > 1 and isinstance(first_error, DownloadError):
            raise DownloadError(
                f"{first_error} ({failed} of {len(jobs)} files were not fetched; completed files are kept "
                "and are not downloaded again on the next run)"
            ) from first_error
        raise first_error
    return [results[i] for i in range(len(jobs))]


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

    def tolerate(self, job: _UrlJob, exc: MissingUpstreamError) -> None:
        """Record a missing date, or raise when more than ``max_missing`` are missing."""
        date = self.dates.get(job.url, "?")
        with self.lock:
            self.found.append((date, redact_url(job.url)))
            n = len(self.found)
            listed = ", ".join(f"{d} ({u})" for d, u in sorted(self.found)[:5])
        if self.max_missing == 0:
            raise MissingUpstreamError(
                f"{exc} (for a product with missing days, source.max_missing tolerates that many missing "
                "dates, which become reported gaps in the time axis)"
            ) from exc
        if n > self.max_missing:
            raise MissingUpstreamError(
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
    src: dict[str, Any], out_dir: Path, known: dict[str, str], *, missing: list[dict[str, str]] | None = None
) -> list[FetchedFile]:
    """Kind ``url``: download every URL of the template into ``out_dir``; see the module docstring.

    Dates without a file upstream, at most ``source.max_missing`` of them, are appended to
    ``missing`` (``{"date", "url"}``) and left out of the result.
    """
    urls = expand_urls(src["url"], src["start"], src["end"], src["frequency"])
    absent = _MissingDates(
        int(src["max_missing"]),
        url_dates(src["url"], src["start"], src["end"], src["frequency"]),
        f"{src['start']}..{src['end']}",
        [],
        threading.Lock(),
    )
    names: dict[str, str] = {}
    jobs = []
    for url in urls:
        url_scheme(url)
        name = url_file_name(url)
        if name in names:
            raise ConfigError(
                f"config key source.url: {names[name]!r} and {url!r} would both be saved as {name!r}; "
                "the file name (last path component) must differ between dates"
            )
        names[name] = url
        jobs.append(_UrlJob(url, out_dir / name, src["checksums"].get(name)))
    unknown = sorted(set(src["checksums"]) - set(names))
    if unknown:
        log.warning("source.checksums lists files that are not fetched: %s", ", ".join(unknown))
    done: dict[int, FetchedFile] = {}
    todo: list[tuple[int, _UrlJob]] = []
    for i, job in enumerate(jobs):
        reused = _reuse(job, known)
        if reused is not None:
            done[i] = reused
        else:
            todo.append((i, job))
    log.info("fetch: %d file(s) in %s, %d already present and verified", len(jobs), out_dir, len(done))
    if todo:
        hint = (
            f"check source.url (template {src['url']!r}) and the date range source.start..source.end "
            f"({src['start']}..{src['end']})"
        )
        stop = threading.Event()
        sessions = _SessionPool(src["parallel"], http_retry(src["retries"], src["backoff_s"], stop))
        counter = {"n": 0}
        lock = threading.Lock()

        def worker(job: _UrlJob, stop: threading.Event) -> FetchedFile | None:
            try:
                result = _fetch_one(
                    job,
                    sessions=sessions,
                    retries=src["retries"],
                    backoff_s=src["backoff_s"],
                    timeout_s=src["timeout_s"],
                    hint=hint,
                    stop=stop,
                )
            except MissingUpstreamError as exc:
                absent.tolerate(job, exc)
                return None
            with lock:
                counter["n"] += 1
                if counter["n"] % 50 == 0 or counter["n"] == len(todo):
                    log.info("fetch: %d / %d downloaded", counter["n"], len(todo))
            return result

        try:
            fetched = run_parallel([job for _, job in todo], worker, src["parallel"], stop)
        finally:
            sessions.close()
        for (i, _), f in zip(todo, fetched):
            if f is not None:
                done[i] = f
    if not done:
        raise DownloadError(
            f"no date of source.start..source.end ({src['start']}..{src['end']}) has a file upstream "
            f"(template {src['url']!r}); check source.url and the dates"
        )
    if missing is not None:
        missing.extend(absent.records())
    return [done[i] for i in range(len(jobs)) if i in done]


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
        expanded = os.path.expandvars(os.path.expanduser(pattern))
        if glob.has_magic(expanded):
            matches = [Path(p) for p in sorted(glob.glob(expanded, recursive=True))]
        else:
            matches = [Path(expanded)] if Path(expanded).exists() else []
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


def locate_files(src: dict[str, Any]) -> tuple[list[FetchedFile], str]:
    """Kind ``files``: checksum the netCDF files or Zarr stores of ``source.paths`` (no copy)."""
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
                check_netcdf(path)
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


def has_consolidated_metadata(path: Path) -> bool:
    """Whether a local Zarr store has consolidated metadata (v2 ``.zmetadata`` or v3 in ``zarr.json``)."""
    path = Path(path)
    if (path / ".zmetadata").is_file():
        return True
    root = path / "zarr.json"
    with contextlib.suppress(OSError, ValueError):
        return json.loads(root.read_text()).get("consolidated_metadata") is not None
    return False


def open_local_zarr(path: Path, chunks: dict[str, int]) -> xr.Dataset:
    """Open a local Zarr store lazily, with its consolidated metadata when it has some."""
    return xr.open_zarr(path, chunks=chunks, consolidated=has_consolidated_metadata(path))


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


def fetch_zarr(cfg: dict[str, Any], out_dir: Path) -> list[FetchedFile]:
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
    return [FetchedFile(dest, store, sha256_tree(dest), tree_bytes(dest))]


# --------------------------------------------------------------------------------------------------
# kind copernicus
# --------------------------------------------------------------------------------------------------

CREDENTIAL_VARIABLES = ("COPERNICUSMARINE_SERVICE_USERNAME", "COPERNICUSMARINE_SERVICE_PASSWORD")


def fetch_copernicus(cfg: dict[str, Any], out_dir: Path) -> list[FetchedFile]:
    """Kind ``copernicus``: open ``source.dataset_id`` lazily, subset it and write ``<out_dir>/<name>.nc``."""
    src = cfg["source"]
    if not src["dataset_id"]:
        raise ConfigError("config key source.dataset_id: empty; kind copernicus needs a Copernicus Marine dataset id")
    try:
        import copernicusmarine
    except ImportError as exc:
        raise ConfigError(
            "source.kind copernicus needs the optional copernicusmarine package: pip install '.[copernicus]' "
            "(or pip install copernicusmarine)"
        ) from exc
    missing = [v for v in CREDENTIAL_VARIABLES if not os.environ.get(v)]
    if missing:
        raise ConfigError(
            f"source.kind copernicus: environment variable(s) {', '.join(missing)} not set; export your "
            "Copernicus Marine username and password in them (credentials are never read from the config)"
        )
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
    return [FetchedFile(dest, f"copernicusmarine:{src['dataset_id']}", sha256_file(dest), dest.stat().st_size)]


# --------------------------------------------------------------------------------------------------
# entry points
# --------------------------------------------------------------------------------------------------


def main(cfg: dict[str, Any], *, out_dir: Path) -> Path:
    """Fetch ``cfg["source"]`` into ``out_dir``; write and return ``out_dir/manifest.json``."""
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
    if kind == "url":
        files, fmt = fetch_urls(src, out_dir, known, missing=missing), "netcdf"
    elif kind == "files":
        files, fmt = locate_files(src)
    elif kind == "zarr":
        files, fmt = fetch_zarr(cfg, out_dir), "zarr"
    elif kind == "copernicus":
        files, fmt = fetch_copernicus(cfg, out_dir), "netcdf"
    else:
        raise ConfigError(f"config key source.kind: {kind!r} is not one of url, files, zarr, copernicus")
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


@dataclass(frozen=True)
class Sources:
    """The files of a manifest opened as one lazy dataset (raw names), and the file of each time step."""

    dataset: xr.Dataset
    files: tuple[str, ...]
    time_files: dict[Any, str]
    missing: tuple[dict[str, str], ...] = ()

    def file_of(self, time: Any) -> str | None:
        """The file (as listed in the manifest) that time step ``time`` came from, or None."""
        return self.time_files.get(hz.time_key(time))


def _open_part(path: Path, fmt: str, chunks: dict[str, int], manifest: Path) -> xr.Dataset:
    """One listed file (or Zarr store), lazily; :class:`DataError` naming it when it cannot be opened."""
    try:
        if fmt == "zarr":
            return open_local_zarr(path, chunks)
        return xr.open_dataset(str(path), chunks=chunks)
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(
            f"manifest {manifest}: cannot open {display_path(path)} ({type(exc).__name__}: {exc}); the file is "
            "damaged or not netCDF/Zarr: delete it and run the fetch step again"
        ) from exc


def _time_files(parts: list[hz.SourceFile], rename: dict[str, str]) -> dict[Any, str]:
    """Time stamp key (:func:`harmonize.time_key`) -> path of the file holding it."""
    out: dict[Any, str] = {}
    for part in parts:
        name = hz.find_axis(part.ds, "time", rename=rename)
        if name is not None:
            for key in hz.time_keys(part.ds[name].values):
                out.setdefault(key, part.path)
    return out


def open_sources(
    manifest: Path, *, chunks: dict[str, int] | None = None, rules: hz.SourceRules | None = None
) -> Sources:
    """Open every file of ``manifest`` lazily (Dask), check them one by one, and merge them.

    Before anything is merged: time stamps repeated across files (or within one) are refused or
    resolved as ``rules.duplicates`` says (:func:`harmonize.resolve_duplicate_times`), and each
    file's variables are converted to their canonical units (:func:`harmonize.convert_units`).
    Then the files are combined by their coordinates (they must share every coordinate but the one
    they are concatenated along). ``rules`` None: duplicates refused, no unit conversion. Only
    coordinates and attributes are read. Nothing is selected: the regrid step cuts
    ``source.start..end`` (:func:`conv2dlstm.regrid.prepare`), as it does for every kind.
    """
    manifest = Path(manifest)
    doc = manifest_file.read(manifest)
    paths = manifest_file.file_paths(doc, manifest)
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise DataError(
            f"manifest {manifest}: {len(missing)} listed file(s) are missing (first: {missing[0]}); "
            "run the fetch step again"
        )
    rules = rules if rules is not None else hz.SourceRules()
    chunks = {} if chunks is None else chunks
    opened: list[xr.Dataset] = []
    try:
        parts: list[hz.SourceFile] = []
        for path in paths:
            opened.append(_open_part(path, doc["format"], chunks, manifest))
            parts.append(hz.SourceFile(display_path(path), opened[-1]))
        parts = hz.resolve_duplicate_times(parts, rules.duplicates, rename=dict(rules.rename))
        parts = hz.convert_units(parts, rules)
        datasets = [part.ds for part in parts]
        try:
            ds = (
                datasets[0]
                if len(datasets) == 1
                else cast(  # Datasets combine into a Dataset (a DataArray comes only from DataArrays)
                    xr.Dataset,
                    xr.combine_by_coords(
                        datasets,
                        data_vars="minimal",
                        coords="minimal",
                        compat="override",
                        join="exact",
                        combine_attrs="override",
                    ),
                )
            )
        except ValueError as exc:
            raise DataError(
                f"manifest {manifest}: the files cannot be combined into one dataset ({exc}); they must share "
                "their lat/lon grid and differ only along time"
            ) from exc
    except BaseException:
        for each in opened:
            each.close()
        raise

    def close_all() -> None:
        for each in opened:
            each.close()

    ds.set_close(close_all)
    return Sources(
        ds,
        tuple(part.path for part in parts),
        _time_files(parts, dict(rules.rename)),
        tuple(doc.get("missing", [])),
    )


def open_fetched(
    manifest: Path, *, chunks: dict[str, int] | None = None, rules: hz.SourceRules | None = None
) -> xr.Dataset:
    """Open every file of ``manifest`` lazily (Dask) as one dataset with the raw names, as fetched.

    The dataset of :func:`open_sources`: ``chunks=None`` uses the files' own chunks (``{}``);
    repeated time stamps are refused (or resolved by ``rules.duplicates``) and, with ``rules``,
    units are converted file by file. Nothing is selected: for kind ``files`` every time step of the
    listed files is returned, and the regrid step cuts ``source.start..end``
    (:func:`conv2dlstm.regrid.prepare`), as it does for every kind.
    """
    return open_sources(manifest, chunks=chunks, rules=rules).dataset
