"""Re-checking the files of a ``url`` source upstream: ``python -m conv2dlstm check-upstream``.

Snakemake reruns a rule when one of its input files changes, and a ``url`` source has none: once
fetched, a file changed on the server would never be seen again. :func:`check` asks the server,
for every URL of the source, whether its file is still the one fetched, and :func:`write_state`
records those that are not in ``<resources_dir>/raw/<name>/upstream.json``, which is an input of
the fetch rule once it exists (:func:`conv2dlstm.config.workflow.source_files`): the next run
fetches again, and what follows reruns. When nothing changed nothing is written and nothing reruns.

How a file is compared (:func:`check`, one request per file, none downloads a file unless asked):

- fetched over http(s) with validators recorded (``.<name>.validators.json``,
  :func:`conv2dlstm.data.download.write_validators`): a conditional GET (``If-None-Match`` with
  the recorded ``ETag``, ``If-Modified-Since`` with the recorded ``Last-Modified``); 304 is
  unchanged. A server that ignores the conditions and sends 200 is compared on its ``ETag``, else
  its ``Last-Modified``;
- without validators (a server that sends none, or a file fetched before they were recorded): the
  size the server announces against the local file's; the same size cannot tell, and the file is
  reported ``unknown`` unless ``download`` is set, which downloads it into a temporary file and
  compares its SHA-256 with the recorded one (after which the server's validators, if it now sends
  some, are recorded for the next check);
- ``file:`` URLs: the SHA-256 of the file the URL names;
- a date without a local file (a gap tolerated by ``source.max_missing``, or never fetched): a file
  there now is ``new``.

A file pinned by ``source.checksums`` that changed upstream is reported ``pinned`` and not fetched
again (the pinned file wins; update the checksum to take the new one); a file gone upstream (HTTP
404/410) is reported ``gone`` and its local copy kept.

The fetch step reads the state back (:func:`stale_files`): a file listed there whose local copy is
still the one found changed is asked for again with a conditional GET (304 keeps it), the others
are reused as before, without a request. The state file stays after that fetch (removing it would
change the fetch rule's inputs and rerun it); the next check that finds a change rewrites it.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import json
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conv2dlstm.config.workflow import UPSTREAM_STATE
from conv2dlstm.data import download
from conv2dlstm.fsutil import atomic_output, sha256_file
from conv2dlstm.redact import RedactingFilter, redact_text, redact_url

log = logging.getLogger(__name__)
log.addFilter(RedactingFilter())

CHANGED = ("changed", "new")
"""The outcomes that make :func:`write_state` write: the next fetch gets these files."""
OUTCOMES = ("unchanged", "changed", "new", "pinned", "gone", "unknown", "absent")
"""What :func:`check` finds for a file: the same as fetched; changed upstream; there now but not
fetched before; changed but pinned by ``source.checksums`` (kept); no longer upstream (kept);
cannot tell without a download; still not upstream."""


@dataclass(frozen=True)
class Finding:
    """What :func:`check` found for one file of the source."""

    name: str
    url: str
    """The file's URL, redacted (:func:`conv2dlstm.redact.redact_url`)."""
    outcome: str
    """One of :data:`OUTCOMES`."""
    detail: str
    """What was compared, e.g. ``ETag "a" -> "b"``, or why it could not be."""
    before: dict[str, Any] = field(default_factory=dict)
    """The local file as fetched: ``sha256``, ``bytes``, ``etag``, ``last_modified`` (None: not recorded)."""
    now: dict[str, Any] = field(default_factory=dict)
    """What the server said: ``etag``, ``last_modified``, ``bytes`` (or ``sha256`` when downloaded)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "url": self.url,
            "outcome": self.outcome,
            "detail": self.detail,
            "before": self.before,
            "now": self.now,
        }


@dataclass
class Report:
    """Every file's :class:`Finding`, and the state file when one was written."""

    source: str
    findings: list[Finding]
    state: Path | None = None

    def of(self, *outcomes: str) -> list[Finding]:
        return [f for f in self.findings if f.outcome in outcomes]

    @property
    def changed(self) -> list[Finding]:
        """The files the next fetch gets again (:data:`CHANGED`)."""
        return self.of(*CHANGED)

    def text(self) -> str:
        """What ``check-upstream`` prints: a line per file that is not unchanged, then what happens next."""
        counts = {o: len(self.of(o)) for o in OUTCOMES if self.of(o)}
        lines = [
            f"check-upstream: {len(self.findings)} file(s) of source {self.source!r}: "
            + ", ".join(f"{n} {o}" for o, n in counts.items())
        ]
        for f in self.findings:
            if f.outcome not in ("unchanged", "absent"):
                lines.append(f"  {f.outcome:<8} {f.name}  {f.url}  {f.detail}")
        if self.state is not None:
            lines.append(
                f"wrote {self.state}: the next `snakemake` (make run) fetches the {len(self.changed)} file(s) "
                "marked changed or new again and reruns what follows"
            )
        elif self.of("unknown"):
            unknown = len(self.of("unknown"))
            lines.append(f"no change found ({unknown} file(s) unknown): nothing written, nothing reruns")
        else:
            lines.append("nothing changed upstream: nothing written, nothing reruns")
        if self.of("unknown"):
            lines.append(
                "unknown: the server sends no ETag or Last-Modified (or none was recorded) and the size is the "
                "same; rerun with --download to compare the files' SHA-256 (downloads each such file once)"
            )
        if self.of("pinned"):
            lines.append(
                "pinned: source.checksums fixes these files, so they are kept; update their checksums to take "
                "the new files"
            )
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# checking
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    """How the requests are made (``source.parallel``, ``retries``, ``backoff_s``, ``timeout_s``)
    and whether a file that validators cannot tell about is downloaded (``download``)."""

    parallel: int
    retries: int
    backoff_s: float
    timeout_s: float
    hint: str
    download: bool = False


def check(jobs: list[download.UrlJob], known: dict[str, str], opts: Options) -> list[Finding]:
    """Ask upstream about the file of every job (see the module docstring), ``opts.parallel`` at a
    time; ``known`` is the recorded sha256 by file name. Raises :class:`~conv2dlstm.errors.DownloadError`
    naming the URL (redacted) when a server cannot be reached or refuses the request."""
    stop = threading.Event()
    sessions = download.http_sessions(opts.parallel, opts.retries, opts.backoff_s, stop)

    def worker(job: download.UrlJob, stop: threading.Event) -> Finding:
        if download.url_scheme(job.url) == "file":
            return _check_file_url(job, known)
        return _check_http(job, known, sessions.get(), opts)

    try:
        return download.run_parallel(jobs, worker, opts.parallel, stop)
    finally:
        sessions.close()


def _present_sha(job: download.UrlJob, known: dict[str, str]) -> str | None:
    """The recorded sha256 of the job's local file; None when there is no local file (or no record)."""
    return known.get(job.dest.name) if job.dest.is_file() else None


def _check_file_url(job: download.UrlJob, known: dict[str, str]) -> Finding:
    src = download.file_url_path(job.url)
    name, url = job.dest.name, redact_url(job.url)
    sha = _present_sha(job, known)
    if sha is None:
        there = src.is_file()
        return Finding(name, url, "new" if there else "absent", f"{src} {'exists now' if there else 'still missing'}")
    before = {"sha256": sha, "bytes": job.dest.stat().st_size}
    if not src.is_file():
        return Finding(name, url, "gone", f"{src} does not exist; the local copy is kept", before)
    now_sha = sha256_file(src)
    outcome = "unchanged" if now_sha == sha else _changed(job)
    detail = f"SHA-256 {sha[:12]}... -> {now_sha[:12]}..." if now_sha != sha else "the same SHA-256"
    return Finding(name, url, outcome, detail, before, {"sha256": now_sha, "bytes": src.stat().st_size})


def _changed(job: download.UrlJob) -> str:
    """``pinned`` for a file whose checksum ``source.checksums`` fixes, else ``changed``."""
    return "pinned" if job.expected_sha256 is not None else "changed"


def _check_http(job: download.UrlJob, known: dict[str, str], session: Any, opts: Options) -> Finding:
    name, url = job.dest.name, redact_url(job.url)
    sha = _present_sha(job, known)
    if sha is None:
        probe = _probe(job, session, opts, None)
        if probe.status in (404, 410):
            return Finding(name, url, "absent", f"HTTP {probe.status}: still not upstream")
        return Finding(name, url, "new", "not fetched before, there now", {}, _now(probe))
    recorded = download.read_validators(job.dest, sha)
    size = job.dest.stat().st_size
    before = {"sha256": sha, "bytes": size, **(recorded or download.Validators()).to_json()}
    probe = _probe(job, session, opts, recorded or None)
    if probe.status == 304:
        return Finding(name, url, "unchanged", "HTTP 304 Not Modified", before, _now(probe))
    if probe.status in (404, 410):
        return Finding(name, url, "gone", f"HTTP {probe.status}: no longer upstream; the local copy is kept", before)
    verdict, detail = compare(recorded, probe, size)
    now = _now(probe)
    if verdict is None and opts.download:
        now_sha, validators = download.checksum_upstream(
            job.url, job.dest.parent, session, timeout_s=opts.timeout_s, hint=opts.hint, retries=opts.retries
        )
        verdict = now_sha != sha
        detail = f"SHA-256 {sha[:12]}... -> {now_sha[:12]}..." if verdict else "the same SHA-256"
        detail += " (downloaded)"
        now = {**now, **validators.to_json(), "sha256": now_sha}
        if not verdict and validators:  # the next check asks with them instead of downloading
            download.write_validators(job.dest, sha, validators, size)
    outcome = "unknown" if verdict is None else _changed(job) if verdict else "unchanged"
    return Finding(name, url, outcome, detail, before, now)


def _probe(
    job: download.UrlJob, session: Any, opts: Options, conditional: download.Validators | None
) -> download.Probe:
    return download.probe(
        job.url, session, timeout_s=opts.timeout_s, hint=opts.hint, retries=opts.retries, conditional=conditional
    )


def _now(probe: download.Probe) -> dict[str, Any]:
    return {**probe.validators.to_json(), "bytes": probe.size}


def compare(recorded: download.Validators | None, probe: download.Probe, size: int) -> tuple[bool | None, str]:
    """Whether the server's file (a 200 answer, ``probe``) differs from the local one (``size``
    bytes, fetched with the ``recorded`` validators): True, False, or None when nothing tells;
    with what was compared. The ``ETag`` decides when both sides have one, else ``Last-Modified``
    (as dates), else a size that differs."""
    old, new = recorded or download.Validators(), probe.validators
    if old.etag is not None and new.etag is not None:
        same = old.etag == new.etag
        return (not same, f"ETag {old.etag} (the same)" if same else f"ETag {old.etag} -> {new.etag}")
    if old.last_modified is not None and new.last_modified is not None:
        same = _http_date(old.last_modified) == _http_date(new.last_modified)
        text = f"Last-Modified {old.last_modified}"
        return (not same, f"{text} (the same)" if same else f"{text} -> {new.last_modified}")
    if probe.size is not None and probe.size != size:
        return True, f"size {size} -> {probe.size} bytes"
    why = "the server sends no ETag or Last-Modified" if not new else "no ETag or Last-Modified was recorded at fetch"
    same_size = f"the same size ({size} bytes)" if probe.size is not None else "no size announced"
    return None, f"{why}, {same_size}: --download compares the SHA-256"


def _http_date(text: str) -> dt.datetime | str:
    """An HTTP date (RFC 9110) as a datetime; the text itself when it does not parse."""
    try:
        return email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return text


# --------------------------------------------------------------------------------------------------
# the state file
# --------------------------------------------------------------------------------------------------


def state_path(out_dir: Path) -> Path:
    """``<out_dir>/upstream.json`` (:data:`conv2dlstm.config.workflow.UPSTREAM_STATE`)."""
    return Path(out_dir) / UPSTREAM_STATE


def write_state(out_dir: Path, source: str, findings: list[Finding]) -> Path | None:
    """Write, atomically, the files found changed or new (:data:`CHANGED`) to :func:`state_path`,
    with the time of the check (so that each check that finds a change gives the file new content,
    which Snakemake's checksum comparison sees); None, writing nothing, when there are none. URLs
    are redacted; no credential is written."""
    changed = [f.to_json() for f in findings if f.outcome in CHANGED]
    if not changed:
        return None
    doc = {
        "checked_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "source": source,
        "changed": changed,
    }
    path = state_path(out_dir)
    with atomic_output(path) as tmp:
        tmp.write_text(redact_text(json.dumps(doc, indent=1)) + "\n")
    return path


def read_state(out_dir: Path) -> list[dict[str, Any]]:
    """The ``changed`` entries of :func:`state_path`; [] when there is none (a WARNING when it
    cannot be read: the fetch then reuses every verified file, as without a check)."""
    path = state_path(out_dir)
    if not path.is_file():
        return []
    try:
        doc = json.loads(path.read_text())
        entries = doc["changed"]
        if not isinstance(entries, list):
            raise TypeError("'changed' is not a list")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("%s cannot be read (%s); run check-upstream again", path, exc)
        return []
    return [e for e in entries if isinstance(e, dict)]


def stale_files(out_dir: Path, known: dict[str, str]) -> dict[str, download.Validators | None]:
    """The files of :func:`state_path` whose local copy is still the one found changed (its
    recorded sha256 and validators those of the finding's ``before``), by name, with the validators
    to ask with (None: download unconditionally). A file fetched again since is not stale: its
    checksum, or its validators (when the server's new version had the same content), differ."""
    stale: dict[str, download.Validators | None] = {}
    for entry in read_state(out_dir):
        name, before = entry.get("name"), entry.get("before") or {}
        sha = before.get("sha256") if isinstance(before, dict) else None
        if not isinstance(name, str) or not sha or known.get(name) != sha or not (Path(out_dir) / name).is_file():
            continue
        recorded = download.read_validators(Path(out_dir) / name, sha) or download.Validators()
        if (recorded.etag, recorded.last_modified) != (before.get("etag"), before.get("last_modified")):
            continue
        stale[name] = recorded or None
    return stale
