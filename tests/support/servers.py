"""A real HTTP file server on 127.0.0.1 for tests, with injectable faults.

``FileServer(root)`` serves the files under ``root`` (GET, HEAD and single byte ranges, which
fsspec uses for Zarr) from a :class:`http.server.ThreadingHTTPServer` on a random port, in a
background thread. Faults are set per URL path relative to ``root`` (e.g. ``"201901/a.nc"``):

- ``not_found``: answer 404 even if the file exists;
- ``transient[path] = n``: answer 503 to the first ``n`` GETs, then serve normally;
- ``truncate[path] = n``: announce the full ``Content-Length`` but send only ``n`` bytes and close;
- ``corrupt[path] = n``: serve only the first ``n`` bytes with a matching ``Content-Length``.

``requests[path]`` counts the GETs of each path; ``sent[path]`` those answered with the whole file
(200, not a range), ``not_modified[path]`` those answered 304.

Like a real file server it sends validators: an ``ETag`` (the SHA-256 of the content, so a file
rewritten within the same second gets another) and a ``Last-Modified`` (the file's modification
time), and answers a conditional request (``If-None-Match``, else ``If-Modified-Since``) 304 Not
Modified while they still hold. ``send_etag = False`` / ``send_last_modified = False`` stop sending
one (and honouring its condition): a server without validators.
"""

from __future__ import annotations

import collections
import email.utils
import hashlib
import threading
import urllib.parse
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType


class FileServer:
    """Serve a directory on ``http://127.0.0.1:<port>/`` with fault injection (see module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.requests: collections.Counter[str] = collections.Counter()
        self.sent: collections.Counter[str] = collections.Counter()
        self.not_modified: collections.Counter[str] = collections.Counter()
        self.send_etag = True
        self.send_last_modified = True
        self.not_found: set[str] = set()
        self.transient: dict[str, int] = {}
        self.truncate: dict[str, int] = {}
        self.corrupt: dict[str, int] = {}
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="test-http", daemon=True
        )

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def url(self, relative: str) -> str:
        """Full URL of ``relative`` (a path under ``root``)."""
        return f"{self.base_url}/{relative.lstrip('/')}"

    def gets(self, suffix: str = "") -> int:
        """Number of GETs of paths ending with ``suffix`` (all GETs when empty)."""
        with self._lock:
            return sum(n for p, n in self.requests.items() if p.endswith(suffix))

    def __enter__(self) -> FileServer:
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # one request per connection: truncation closes cleanly

            def log_message(self, format: str, *args: object) -> None:
                pass

            def _relative(self) -> str:
                return urllib.parse.unquote(urllib.parse.urlsplit(self.path).path).lstrip("/")

            def do_HEAD(self) -> None:
                self._serve(body=False)

            def do_GET(self) -> None:
                self._serve(body=True)

            def _validators(self, path: Path, data: bytes) -> dict[str, str]:
                headers = {}
                if server.send_etag:
                    headers["ETag"] = f'"{hashlib.sha256(data).hexdigest()[:16]}"'
                if server.send_last_modified:
                    headers["Last-Modified"] = email.utils.formatdate(path.stat().st_mtime, usegmt=True)
                return headers

            def _not_modified(self, path: Path, validators: dict[str, str]) -> bool:
                """Whether a conditional request's validators still hold (RFC 9110, 13.2.2)."""
                match = self.headers.get("If-None-Match")
                if match is not None:
                    return "ETag" in validators and (
                        match.strip() == "*" or validators["ETag"] in [m.strip() for m in match.split(",")]
                    )
                since = self.headers.get("If-Modified-Since")
                if since is None or "Last-Modified" not in validators:
                    return False
                try:
                    return int(path.stat().st_mtime) <= email.utils.parsedate_to_datetime(since).timestamp()
                except (TypeError, ValueError):
                    return False

            def _serve(self, *, body: bool) -> None:
                rel = self._relative()
                with server._lock:
                    if body:
                        server.requests[rel] += 1
                    if rel in server.transient and server.transient[rel] > 0 and body:
                        server.transient[rel] -= 1
                        self.send_error(HTTPStatus.SERVICE_UNAVAILABLE)
                        return
                path = (server.root / rel).resolve()
                if rel in server.not_found or not path.is_file() or server.root not in path.parents:
                    self.send_error(HTTPStatus.NOT_FOUND)
                    return
                data = path.read_bytes()
                validators = self._validators(path, data)
                if self._not_modified(path, validators):
                    with server._lock:
                        server.not_modified[rel] += 1
                    self.send_response(HTTPStatus.NOT_MODIFIED)
                    for name, value in validators.items():
                        self.send_header(name, value)
                    self.end_headers()
                    return
                if rel in server.corrupt:
                    data = data[: server.corrupt[rel]]
                status, start, total = HTTPStatus.OK, 0, len(data)
                header = self.headers.get("Range")
                if header and header.startswith("bytes="):
                    first, _, last = header[len("bytes=") :].partition("-")
                    if first:
                        start, end = int(first), int(last) + 1 if last else len(data)
                    else:
                        start, end = max(0, len(data) - int(last)), len(data)
                    data, status = data[start:end], HTTPStatus.PARTIAL_CONTENT
                self.send_response(status)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(data)))
                for name, value in validators.items():
                    self.send_header(name, value)
                if status == HTTPStatus.PARTIAL_CONTENT:
                    self.send_header("Content-Range", f"bytes {start}-{start + len(data) - 1}/{total}")
                self.end_headers()
                if not body:
                    return
                with server._lock:
                    server.sent[rel] += status == HTTPStatus.OK
                if rel in server.truncate:
                    data = data[: server.truncate[rel]]
                self.wfile.write(data)
                self.wfile.flush()

        return Handler


def write_oisst_days(root: Path, start: str, end: str) -> Path:
    """OISST-like daily files of ``start..end`` in the NCEI layout (8 x 8 cells at 0.25 degree), as
    the synth step writes them, under ``root``: what the tests' servers serve."""
    from conv2dlstm.config.validate import validate_config
    from conv2dlstm.steps import synthetic

    cfg = validate_config(
        {"synthetic": {"kind": "oisst", "start": start, "end": end, "lat": [30.125, 31.875], "lon": [290.125, 291.875]}}
    )
    synthetic.main(cfg, out_dir=root)
    return root
