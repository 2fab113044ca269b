"""Downloading the files of source kind ``url``: the HTTP client, verification and the parallel runner.

``http(s)://`` URLs are downloaded with :mod:`requests`, one session per worker thread
(:class:`_SessionPool`); ``file:`` URLs are copied. Each file streams to a hidden ``*.partial``
name and is renamed into place only after it has been verified (``source.checksums``,
``Content-Length``, and that it opens as netCDF: :func:`check_netcdf`); it then gets a
``.<name>.sha256`` :func:`sidecar`, so an interrupted set resumes (:func:`reuse`), and, when it came
over http(s), a ``.<name>.validators.json`` (:func:`validators_sidecar`) with the answer's ``ETag``
and ``Last-Modified`` (:class:`Validators`): what ``check-upstream`` (:mod:`conv2dlstm.data.upstream`)
asks the server about later, and what a job's ``conditional`` request sends, so that a file not
modified upstream (HTTP 304) is kept instead of downloaded again. Transient
failures are retried with exponential backoff: HTTP 408, 425, 429 and 5xx answers, connection
errors and timeouts by urllib3's ``Retry`` mounted on the session (:class:`HttpRetry`, which
honours a server's ``Retry-After`` up to :data:`MAX_RETRY_AFTER_S`), a body cut short by a loop
around the whole download; never 404/410 (:class:`MissingUpstreamError`). :func:`download_all`
runs the jobs in parallel and cancels the rest at the first failure.

URLs may take query values from the environment (``?token=$NAME``, :mod:`conv2dlstm.redact`):
they are resolved only for the request (:func:`request_url`); every message and log line shows
the URL redacted.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, NoReturn, Self, TypeVar

from urllib3.exceptions import InvalidHeader
from urllib3.util.retry import Retry

from conv2dlstm import __version__
from conv2dlstm.artifacts.manifest import FetchedFile
from conv2dlstm.errors import ConfigError, DownloadError
from conv2dlstm.fsutil import atomic_output, sha256_file
from conv2dlstm.redact import RedactingFilter, env_refs, redact_text, redact_url, resolve_env_refs

log = logging.getLogger(__name__)
log.addFilter(RedactingFilter())  # defence in depth: every URL this module logs is redacted

RETRY_STATUS = frozenset({408, 425, 429, *range(500, 600)})
"""HTTP answers retried (by :class:`HttpRetry`): timeouts, too many requests and every server error."""
CHUNK_BYTES = 1 << 20
MAX_RETRY_AFTER_S = 60.0
"""The longest wait before a retry that a server's ``Retry-After`` can ask for."""
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


class _NotModified(Exception):
    """A conditional GET was answered 304 Not Modified: the local file is the server's version."""

    def __init__(self, validators: Validators) -> None:
        super().__init__("not modified")
        self.validators = validators


@dataclass(frozen=True)
class Validators:
    """What an HTTP server says identifies the version of a file it serves (RFC 9110, section 8.8):
    the ``ETag`` and ``Last-Modified`` of its answer, each None when not sent. False when neither was."""

    etag: str | None = None
    last_modified: str | None = None

    def __bool__(self) -> bool:
        return self.etag is not None or self.last_modified is not None

    @classmethod
    def of(cls, headers: Mapping[str, str]) -> Validators:
        """The validators among the answer's ``headers``."""
        return cls(headers.get("ETag") or None, headers.get("Last-Modified") or None)

    def conditional_headers(self) -> dict[str, str]:
        """The headers of a request answered 304 Not Modified while the server's version is still
        this one (``If-None-Match``, which a server prefers, and ``If-Modified-Since``)."""
        headers = {}
        if self.etag is not None:
            headers["If-None-Match"] = self.etag
        if self.last_modified is not None:
            headers["If-Modified-Since"] = self.last_modified
        return headers

    def to_json(self) -> dict[str, str | None]:
        return {"etag": self.etag, "last_modified": self.last_modified}

    def merged(self, newer: Validators) -> Validators:
        """These validators, each replaced by ``newer``'s where that has one (a 304 may update them)."""
        return Validators(newer.etag or self.etag, newer.last_modified or self.last_modified)


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
# URLs
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------------------------------


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


def http_sessions(parallel: int, retries: int, backoff_s: float, stop: threading.Event | None = None) -> _SessionPool:
    """One :mod:`requests` session per worker thread (``parallel`` connections per host), each
    retrying as :func:`http_retry` says; close it when done."""
    return _SessionPool(parallel, http_retry(retries, backoff_s, stop))


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


@contextlib.contextmanager
def _request_errors(url: str, retries: int) -> Iterator[None]:
    """Turn what requests raises while asking for ``url`` into a :class:`DownloadError` naming it
    (redacted), with how many attempts failed when the retries were spent."""
    import requests
    from urllib3.exceptions import MaxRetryError

    shown = redact_url(url)
    try:
        yield
    except (requests.ConnectionError, requests.Timeout) as exc:
        # retried by HttpRetry: a MaxRetryError inside says the retries were spent
        attempts = retries + 1 if exc.args and isinstance(exc.args[0], MaxRetryError) else 1
        raise DownloadError(
            f"{shown}: failed after {attempts} attempt(s): {type(exc).__name__}: {redact_text(str(exc))}; {DOWN_HINT}"
        ) from exc
    except requests.RequestException as exc:
        raise DownloadError(f"{shown}: {type(exc).__name__}: {redact_text(str(exc))}") from exc


def _check_status(resp: Any, url: str, hint: str) -> None:
    """Raise for an answer that is not the file: :class:`MissingUpstreamError` on 404/410, else
    :class:`DownloadError` naming ``url`` (redacted), the status and what to do."""
    shown = redact_url(url)
    status = resp.status_code
    if status in (404, 410):
        raise MissingUpstreamError(f"{shown}: HTTP {status} {resp.reason} (no such file); {hint}")
    if status in RETRY_STATUS:  # what HttpRetry returns once the retries are spent
        history = getattr(getattr(resp.raw, "retries", None), "history", ())
        raise DownloadError(
            f"{shown}: failed after {len(history) + 1} attempt(s): HTTP {status} {resp.reason}; {DOWN_HINT}"
        )
    if status in (401, 403):
        raise DownloadError(f"{shown}: HTTP {status} {resp.reason}; the server refuses access: {credentials_hint(url)}")
    if status >= 300:
        raise DownloadError(f"{shown}: HTTP {status} {resp.reason}; {hint}")


def _content_length(resp: Any) -> int | None:
    """The body's length in bytes as the answer announces it; None when not sent or encoded (gzip)."""
    length = resp.headers.get("Content-Length")
    return int(length) if length and length.isdigit() and not resp.headers.get("Content-Encoding") else None


def _http_get(
    url: str,
    dest: Path,
    session: Any,
    timeout_s: float,
    hint: str,
    retries: int,
    conditional: Validators | None = None,
) -> Validators:
    """Download ``url`` into ``dest``: one GET, which the session's :class:`HttpRetry` repeats on a
    transient failure up to ``retries`` times; returns the answer's :class:`Validators`. Raises
    :class:`_BrokenBody` when the body ends early, :class:`MissingUpstreamError` on 404/410, else
    :class:`DownloadError`. With ``conditional`` validators the GET is conditional: a 304 Not
    Modified raises :class:`_NotModified` (``dest`` unwritten).

    ``url`` is as configured (``$NAME`` query values unresolved); the request goes to
    :func:`request_url` of it, without explicit auth, so requests takes the host's credentials from
    ``~/.netrc`` (or the file named by ``NETRC``), also after a redirect to another host. Messages
    show ``url`` redacted and pass what requests says through :func:`redact_text`.
    """
    import requests

    headers = conditional.conditional_headers() if conditional else None
    with (
        _request_errors(url, retries),
        session.get(request_url(url), stream=True, timeout=timeout_s, headers=headers) as resp,
    ):
        if resp.status_code == 304 and conditional:
            raise _NotModified(Validators.of(resp.headers))
        _check_status(resp, url, hint)
        expected = _content_length(resp)
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
        return Validators.of(resp.headers)


@dataclass(frozen=True)
class Probe:
    """What a server answers about a file without sending it (:func:`probe`)."""

    status: int
    """200 or 206 (the file is there), 304 (not modified since the validators asked about), 404 or 410 (gone)."""
    validators: Validators
    size: int | None
    """The file's size as the answer gives it (None: not given, or the file is not sent)."""


def probe(
    url: str, session: Any, *, timeout_s: float, hint: str, retries: int, conditional: Validators | None
) -> Probe:
    """Ask the server about ``url`` without downloading it: a GET of its first byte (``Range: bytes=0-0``;
    conditional when ``conditional`` holds validators), whose body is not read. Transient failures
    are retried like a download's (the session's :class:`HttpRetry`); an answer that is neither the
    file, 304 nor 404/410 is a :class:`DownloadError` naming the URL (redacted), e.g. a refused login
    or a server that stays down. A GET rather than a HEAD: servers and signed URLs that allow only
    GET answer it as a download would be answered; a server that ignores the range starts sending
    the whole file, and the connection is closed after the headers."""
    headers = {"Range": "bytes=0-0", **(conditional.conditional_headers() if conditional else {})}
    with (
        _request_errors(url, retries),
        session.get(request_url(url), stream=True, timeout=timeout_s, headers=headers) as resp,
    ):
        if resp.status_code == 304 and conditional or resp.status_code in (404, 410):
            return Probe(resp.status_code, Validators.of(resp.headers), None)
        _check_status(resp, url, hint)
        if resp.status_code == 206:
            total = resp.headers.get("Content-Range", "").rpartition("/")[2]
            return Probe(206, Validators.of(resp.headers), int(total) if total.isdigit() else None)
        return Probe(resp.status_code, Validators.of(resp.headers), _content_length(resp))


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


def checksum_upstream(
    url: str, scratch_dir: Path, session: Any, *, timeout_s: float, hint: str, retries: int
) -> tuple[str, Validators]:
    """The sha256 of the file at ``url`` (http(s)) as the server sends it now, and the answer's
    validators: downloaded into a hidden temporary file in ``scratch_dir`` that is removed after."""
    tmp = scratch_dir / f".{url_file_name(url)}.{uuid.uuid4().hex[:8]}.partial"  # fsutil.PARTIAL_GLOB
    try:
        validators = _http_get(url, tmp, session, timeout_s, hint, retries)
        return sha256_file(tmp), validators
    except _BrokenBody as exc:
        raise DownloadError(f"{redact_url(url)}: {exc}; {DOWN_HINT}") from exc
    finally:
        tmp.unlink(missing_ok=True)


@dataclass(frozen=True)
class UrlJob:
    url: str
    dest: Path
    expected_sha256: str | None
    conditional: Validators | None = None
    """Validators of the present ``dest``: the GET is conditional, and a 304 keeps ``dest``."""


def _fetch_one(
    job: UrlJob,
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
    got = Validators()
    try:
        with atomic_output(job.dest) as tmp:
            for attempt in range(retries + 1):
                if stop.is_set():
                    raise DownloadError(cancelled)
                try:
                    if scheme == "file":
                        _file_copy(job.url, tmp, hint)
                    else:
                        got = _http_get(job.url, tmp, sessions.get(), timeout_s, hint, retries, job.conditional)
                    break
                except _Cancelled as exc:
                    raise DownloadError(cancelled) from exc
                except _BrokenBody as exc:
                    if attempt >= retries:
                        raise DownloadError(
                            f"{shown}: failed after {attempt + 1} attempt(s): {exc}; {DOWN_HINT}"
                        ) from exc
                    delay = backoff_s * 2**attempt
                    log.warning("%s: %s; retry %d/%d in %.1f s", shown, exc, attempt + 1, retries, delay)
                    if stop.wait(delay):
                        raise DownloadError(cancelled) from exc
            sha = _verify(tmp, job.url, job.dest.name, job.expected_sha256)
            size = tmp.stat().st_size
    except _NotModified as exc:
        return _not_modified(job, exc.validators)
    with atomic_output(sidecar(job.dest)) as tmp_sidecar:
        tmp_sidecar.write_text(f"{sha}  {job.dest.name}\n")
    if scheme == "file":
        validators_sidecar(job.dest).unlink(missing_ok=True)
    else:
        write_validators(job.dest, sha, got, size)
    return FetchedFile(job.dest, job.url, sha, size, got.etag, got.last_modified)


def _not_modified(job: UrlJob, answered: Validators) -> FetchedFile:
    """The present ``job.dest``, which the server said is its version (304 to a conditional GET);
    the validators are updated with those the 304 carried."""
    validators = (job.conditional or Validators()).merged(answered)
    sha = sha256_file(job.dest)
    size = job.dest.stat().st_size
    write_validators(job.dest, sha, validators, size)
    log.info("%s: not modified upstream (HTTP 304); kept %s", redact_url(job.url), job.dest)
    return FetchedFile(job.dest, job.url, sha, size, validators.etag, validators.last_modified)


def reuse(job: UrlJob, known: dict[str, str]) -> FetchedFile | None:
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
    if not sidecar(job.dest).exists():
        with atomic_output(sidecar(job.dest)) as tmp:
            tmp.write_text(f"{sha}  {job.dest.name}\n")
    validators = read_validators(job.dest, sha) or Validators()
    return FetchedFile(job.dest, job.url, sha, job.dest.stat().st_size, validators.etag, validators.last_modified)


R = TypeVar("R")


def run_parallel(
    jobs: list[UrlJob],
    worker: Callable[[UrlJob, threading.Event], R],
    parallel: int,
    stop: threading.Event | None = None,
) -> list[R]:
    """Run ``worker`` over ``jobs`` on ``parallel`` threads; on the first failure cancel the rest and raise it.

    ``stop`` (a new event by default), handed to each worker, is set on the first failure.
    """
    stop = threading.Event() if stop is None else stop
    results: dict[int, R] = {}
    with ThreadPoolExecutor(max_workers=max(1, parallel), thread_name_prefix="fetch") as pool:
        futures: dict[Future[R], int] = {pool.submit(worker, job, stop): i for i, job in enumerate(jobs)}
        pending = set(futures)
        first_error: BaseException | None = None
        try:
            while pending:
                done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                first_error = _collect(done, futures, results, first_error)
                if first_error is not None and not stop.is_set():
                    _cancel(pending, stop)
        except BaseException:
            _cancel(pending, stop)
            raise
    if first_error is not None:
        _raise_first(first_error, failed=len(jobs) - len(results), total=len(jobs))
    return [results[i] for i in range(len(jobs))]


def _collect(
    done: set[Future[R]],
    futures: Mapping[Future[R], int],
    results: dict[int, R],
    first_error: BaseException | None,
) -> BaseException | None:
    """Put the result of each finished future of ``done`` into ``results`` under its job's index
    (``futures``); returns ``first_error``, or when None the first failure of ``done``."""
    for fut in done:
        if fut.cancelled():
            continue
        exc = fut.exception()
        if exc is None:
            results[futures[fut]] = fut.result()
        elif first_error is None:
            first_error = exc
    return first_error


def _cancel(pending: set[Future[Any]], stop: threading.Event) -> None:
    """Set ``stop`` for the running workers and cancel the jobs not started."""
    stop.set()
    for fut in pending:
        fut.cancel()


def _raise_first(first_error: BaseException, *, failed: int, total: int) -> NoReturn:
    """Raise the first failure; a :class:`DownloadError` among several says how many files were not
    fetched and that the completed ones are kept."""
    if failed > 1 and isinstance(first_error, DownloadError):
        raise DownloadError(
            f"{first_error} ({failed} of {total} files were not fetched; completed files are kept "
            "and are not downloaded again on the next run)"
        ) from first_error
    raise first_error


def sidecar(path: Path) -> Path:
    """The checksum sidecar ``.<name>.sha256`` of a downloaded file, written once it is verified."""
    return path.parent / f".{path.name}.sha256"


def validators_sidecar(path: Path) -> Path:
    """The ``.<name>.validators.json`` of a file downloaded over http(s): the :class:`Validators` of
    the answer it came in, with the file's sha256 and size (:func:`write_validators`)."""
    return path.parent / f".{path.name}.validators.json"


def write_validators(path: Path, sha256: str, validators: Validators, size: int) -> None:
    """Record, atomically, that the server's version of ``path`` (content ``sha256``, ``size``
    bytes) has ``validators`` (both None when the server sent none)."""
    record = {"sha256": sha256, "bytes": size, **validators.to_json()}
    with atomic_output(validators_sidecar(path)) as tmp:
        tmp.write_text(json.dumps(record, indent=1) + "\n")


def read_validators(path: Path, sha256: str) -> Validators | None:
    """The validators recorded for ``path`` when its content is ``sha256``; None when none are
    recorded (a file fetched before they were, or from a ``file:`` URL), the record cannot be read,
    or it belongs to other content (a download interrupted between the file and its record)."""
    try:
        record = json.loads(validators_sidecar(path).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("sha256") != sha256:
        return None
    etag, modified = record.get("etag"), record.get("last_modified")
    return Validators(etag if isinstance(etag, str) else None, modified if isinstance(modified, str) else None)


def sidecar_checksums(out_dir: Path) -> dict[str, str]:
    """File name -> sha256 of the verified files in ``out_dir``, from their :func:`sidecar` files."""
    known: dict[str, str] = {}
    for path in out_dir.glob(".*.sha256"):
        with contextlib.suppress(OSError, IndexError):
            known[path.name[1 : -len(".sha256")]] = path.read_text().split()[0]
    return known


def download_all(
    jobs: list[UrlJob],
    *,
    parallel: int,
    retries: int,
    backoff_s: float,
    timeout_s: float,
    hint: str,
    on_missing: Callable[[UrlJob, MissingUpstreamError], None],
) -> list[FetchedFile | None]:
    """Download, verify and place every job on ``parallel`` threads (one HTTP session each, retrying
    as :func:`http_retry` says); the first failure cancels the rest and is raised (:func:`run_parallel`).

    A job whose file does not exist upstream goes to ``on_missing``, which raises to stop the
    fetch or returns to leave it out (None in the result). ``hint`` ends the message of a file
    that is missing or refused. Progress is logged every 50 files.
    """
    stop = threading.Event()
    sessions = http_sessions(parallel, retries, backoff_s, stop)
    counter = {"n": 0}
    lock = threading.Lock()

    def worker(job: UrlJob, stop: threading.Event) -> FetchedFile | None:
        try:
            result = _fetch_one(
                job,
                sessions=sessions,
                retries=retries,
                backoff_s=backoff_s,
                timeout_s=timeout_s,
                hint=hint,
                stop=stop,
            )
        except MissingUpstreamError as exc:
            on_missing(job, exc)
            return None
        with lock:
            counter["n"] += 1
            if counter["n"] % 50 == 0 or counter["n"] == len(jobs):
                log.info("fetch: %d / %d downloaded", counter["n"], len(jobs))
        return result

    try:
        return run_parallel(jobs, worker, parallel, stop)
    finally:
        sessions.close()
