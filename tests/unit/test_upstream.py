"""Re-checking a url source upstream (``check-upstream``), against a real HTTP server on 127.0.0.1
that serves netCDF files the tests write and change: unchanged files write nothing; a changed file
is named, written to ``upstream.json``, and is the only one the next fetch downloads; a server
without validators, one that answers only ``Last-Modified``, one that is down; secrets stay out of
everything written; and the real Snakemake plans fetch after a change and nothing without one."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pandas as pd
import pytest
import xarray as xr
import yaml

from conv2dlstm import cli
from conv2dlstm.config.validate import validate_config
from conv2dlstm.config.workflow import raw_dir, source_files, upstream_state
from conv2dlstm.data import fetching
from conv2dlstm.errors import DownloadError
from conv2dlstm.fsutil import sha256_file
from conv2dlstm.steps import fetch
from tests.support.servers import FileServer, write_oisst_days
from tests.support.workflow import job_env

START, END = "2019-01-30", "2019-02-02"  # 4 days across a month boundary
DAYS = pd.date_range(START, END)
TEMPLATE = "{date:%Y%m}/oisst-avhrr-v02r01.{date:%Y%m%d}.nc"
NAMES = [f"oisst-avhrr-v02r01.{d:%Y%m%d}.nc" for d in DAYS]
RELATIVE = [f"{d:%Y%m}/{n}" for d, n in zip(DAYS, NAMES)]


@pytest.fixture(scope="module")
def original(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_oisst_days(tmp_path_factory.mktemp("original") / "oisst", START, END)


@pytest.fixture()
def served(original: Path, tmp_path: Path) -> Path:
    """A copy of the files per test: the tests change them."""
    return Path(shutil.copytree(original, tmp_path / "served"))


@pytest.fixture()
def server(served: Path) -> Iterator[FileServer]:
    with FileServer(served) as srv:
        yield srv


def config(url: str, tmp_path: Path, **source: object) -> dict:
    base = {"kind": "url", "url": url, "start": START, "end": END, "retries": 1, "backoff_s": 0.01, "timeout_s": 10}
    return validate_config(
        {
            "name": "up",
            "resources_dir": str(tmp_path / "resources"),
            "synthetic": {"kind": "none"},
            "source": {**base, **source},
        }
    )


def change(path: Path, *, delta: float = 0.5) -> None:
    """The day's file fixed upstream: other values written into a copy, in place (the same size),
    which then replaces the file."""
    import netCDF4

    tmp = path.with_suffix(".tmp")
    shutil.copyfile(path, tmp)
    with netCDF4.Dataset(tmp, "r+") as nc:
        nc["sst"][:] = nc["sst"][:] + delta
    os.replace(tmp, path)


def grow(path: Path) -> None:
    """The day's file replaced upstream by a bigger one (another variable)."""
    with xr.open_dataset(path) as ds:
        bigger = ds.load().assign(extra=ds["sst"] * 2)
    bigger.to_netcdf(path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)


def outcomes(report) -> dict[str, str]:
    return {f.name: f.outcome for f in report.findings}


def test_a_changed_file_is_named_written_down_and_the_only_one_fetched_again(
    server: FileServer, served: Path, tmp_path: Path
) -> None:
    cfg = config(server.url(TEMPLATE), tmp_path)
    out = raw_dir(cfg)
    fetch.main(cfg, out_dir=out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert all(f["etag"].startswith('"') and f["last_modified"].endswith("GMT") for f in manifest["files"])
    assert source_files(cfg) == []  # no state file yet: the fetch rule has no input

    report = fetching.check_upstream(cfg, out_dir=out)
    assert set(outcomes(report).values()) == {"unchanged"} and report.state is None
    assert not upstream_state(cfg).exists()
    assert sum(server.sent.values()) == len(NAMES)  # conditional GETs answered 304: no file sent
    assert sum(server.not_modified.values()) == len(NAMES)
    assert "nothing changed upstream: nothing written, nothing reruns" in report.text()

    change(served / RELATIVE[2])
    report = fetching.check_upstream(cfg, out_dir=out)
    assert outcomes(report) == {n: "changed" if n == NAMES[2] else "unchanged" for n in NAMES}
    assert report.state == upstream_state(cfg) and source_files(cfg) == [str(upstream_state(cfg))]
    state = json.loads(report.state.read_text())
    [entry] = state["changed"]
    assert entry["name"] == NAMES[2] and entry["url"] == server.url(RELATIVE[2])
    assert entry["before"]["sha256"] == sha256_file(out / NAMES[2])
    assert entry["before"]["etag"] != entry["now"]["etag"]
    text = report.text()
    assert f"changed  {NAMES[2]}  {server.url(RELATIVE[2])}  ETag {entry['before']['etag']} -> " in text
    assert f"wrote {report.state}" in text

    sent = dict(server.sent)
    requests = dict(server.requests)
    fetch.main(cfg, out_dir=out)
    assert {r for r in RELATIVE if server.sent[r] > sent.get(r, 0)} == {RELATIVE[2]}
    assert {r for r in RELATIVE if server.requests[r] > requests.get(r, 0)} == {RELATIVE[2]}
    manifest = json.loads((out / "manifest.json").read_text())
    assert [f["sha256"] for f in manifest["files"]] == [sha256_file(served / r) for r in RELATIVE]

    # fetched: the next check finds nothing, writes nothing; a later fetch asks for nothing
    written = report.state.read_bytes()
    assert set(outcomes(fetching.check_upstream(cfg, out_dir=out)).values()) == {"unchanged"}
    assert report.state.read_bytes() == written
    requests = server.gets()
    fetch.main(cfg, out_dir=out)
    assert server.gets() == requests


def test_a_file_found_changed_but_reverted_is_kept_on_304(server: FileServer, served: Path, tmp_path: Path) -> None:
    cfg = config(server.url(TEMPLATE), tmp_path)
    out = raw_dir(cfg)
    fetch.main(cfg, out_dir=out)
    before = (served / RELATIVE[1]).read_bytes()
    change(served / RELATIVE[1])
    assert outcomes(fetching.check_upstream(cfg, out_dir=out))[NAMES[1]] == "changed"
    (served / RELATIVE[1]).write_bytes(before)  # the server went back to the fetched version
    sent, not_modified = sum(server.sent.values()), server.not_modified[RELATIVE[1]]
    fetch.main(cfg, out_dir=out)
    assert sum(server.sent.values()) == sent  # asked again, conditionally: 304, nothing downloaded
    assert server.not_modified[RELATIVE[1]] == not_modified + 1
    assert (out / NAMES[1]).read_bytes() == before


def test_a_pinned_checksum_wins_over_a_change_upstream(server: FileServer, served: Path, tmp_path: Path) -> None:
    pinned = {NAMES[0]: sha256_file(served / RELATIVE[0])}
    cfg = config(server.url(TEMPLATE), tmp_path, checksums=pinned)
    out = raw_dir(cfg)
    fetch.main(cfg, out_dir=out)
    change(served / RELATIVE[0])
    report = fetching.check_upstream(cfg, out_dir=out)
    assert outcomes(report)[NAMES[0]] == "pinned" and report.state is None
    assert "update their checksums to take the new files" in report.text()


def test_a_server_without_validators_compares_sizes_or_downloads(
    server: FileServer, served: Path, tmp_path: Path
) -> None:
    server.send_etag = server.send_last_modified = False
    cfg = config(server.url(TEMPLATE), tmp_path)
    out = raw_dir(cfg)
    fetch.main(cfg, out_dir=out)
    assert not any(
        "etag" in f or "last_modified" in f for f in json.loads((out / "manifest.json").read_text())["files"]
    )
    report = fetching.check_upstream(cfg, out_dir=out)
    assert set(outcomes(report).values()) == {"unknown"} and report.state is None
    assert "rerun with --download to compare" in report.text()

    change(served / RELATIVE[0])  # the same size: only a download tells
    grow(served / RELATIVE[3])
    report = fetching.check_upstream(cfg, out_dir=out)
    assert outcomes(report) == {NAMES[0]: "unknown", NAMES[1]: "unknown", NAMES[2]: "unknown", NAMES[3]: "changed"}
    assert "size " in report.findings[3].detail

    sent = sum(server.sent.values())
    report = fetching.check_upstream(cfg, out_dir=out, download_unknown=True)
    assert outcomes(report) == {NAMES[0]: "changed", NAMES[1]: "unchanged", NAMES[2]: "unchanged", NAMES[3]: "changed"}
    assert "(downloaded)" in report.findings[0].detail
    assert sum(server.sent.values()) == sent + 3  # the three the size could not tell about
    assert sorted(e["name"] for e in json.loads(report.state.read_text())["changed"]) == [NAMES[0], NAMES[3]]
    assert not list(out.glob("*.partial"))

    sent = dict(server.sent)
    fetch.main(cfg, out_dir=out)
    assert {r for r in RELATIVE if server.sent[r] > sent.get(r, 0)} == {RELATIVE[0], RELATIVE[3]}
    assert sha256_file(out / NAMES[0]) == sha256_file(served / RELATIVE[0])


def test_last_modified_alone_is_a_validator(server: FileServer, served: Path, tmp_path: Path) -> None:
    server.send_etag = False
    cfg = config(server.url(TEMPLATE), tmp_path)
    out = raw_dir(cfg)
    fetch.main(cfg, out_dir=out)
    assert set(outcomes(fetching.check_upstream(cfg, out_dir=out)).values()) == {"unchanged"}  # 304
    path = served / RELATIVE[3]
    mtime = path.stat().st_mtime
    change(path)
    os.utime(path, (mtime + 60, mtime + 60))
    report = fetching.check_upstream(cfg, out_dir=out)
    assert outcomes(report)[NAMES[3]] == "changed" and "Last-Modified" in report.findings[3].detail
    assert [e["name"] for e in json.loads(report.state.read_text())["changed"]] == [NAMES[3]]


def test_a_date_filled_upstream_later_is_new(server: FileServer, tmp_path: Path) -> None:
    cfg = config(server.url(TEMPLATE), tmp_path, max_missing=1)
    out = raw_dir(cfg)
    server.not_found.add(RELATIVE[1])
    fetch.main(cfg, out_dir=out)
    assert outcomes(fetching.check_upstream(cfg, out_dir=out))[NAMES[1]] == "absent"
    assert not upstream_state(cfg).exists()
    server.not_found.clear()
    report = fetching.check_upstream(cfg, out_dir=out)
    assert outcomes(report)[NAMES[1]] == "new" and report.state is not None
    fetch.main(cfg, out_dir=out)
    assert "missing" not in json.loads((out / "manifest.json").read_text())


def test_an_unreachable_server_is_a_clear_error_and_writes_nothing(
    served: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with FileServer(served) as server:
        cfg = config(server.url(TEMPLATE), tmp_path)
        fetch.main(cfg, out_dir=raw_dir(cfg))
    # the files are fetched in parallel: whichever fails first is named
    urls = "|".join(re.escape(server.url(rel)) for rel in RELATIVE)
    with pytest.raises(DownloadError, match=rf"^({urls}): failed after 2 attempt\(s\): Connection"):
        fetching.check_upstream(cfg, out_dir=raw_dir(cfg))
    assert not upstream_state(cfg).exists()
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert cli.main(["check-upstream", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "error: " in err and "the server or the network may be down" in err


class AuthServer(FileServer):
    """A :class:`FileServer` that answers 401 unless the request carries the basic auth ``login``
    and the query parameter ``token``."""

    def __init__(self, root: Path, *, login: str, token: str) -> None:
        self.auth = "Basic " + base64.b64encode(login.encode()).decode()
        self.token = token
        super().__init__(root)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        base = super()._handler_class()
        server = self

        class Handler(base):  # type: ignore[misc, valid-type]
            def _serve(self, *, body: bool) -> None:
                query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
                if self.headers.get("Authorization") != server.auth or query.get("token") != [server.token]:
                    self.send_error(401)
                    return
                super()._serve(body=body)

        return Handler


def test_the_command_line_exit_code_and_no_secret_written(
    served: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, caplog
) -> None:
    """With a token from the environment and a login from the netrc file, as a real server needs:
    neither appears in what check-upstream prints, logs or writes."""
    token, password = "s3cr3t-upstream-token-value", "netrc-pa55word-value"
    monkeypatch.setenv("UPSTREAM_TOKEN", token)
    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine 127.0.0.1 login someone password {password}\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    with AuthServer(served, login=f"someone:{password}", token=token) as server:
        cfg = config(server.url(TEMPLATE) + "?token=$UPSTREAM_TOKEN", tmp_path)
        path = tmp_path / "cfg.yaml"
        path.write_text(yaml.safe_dump(cfg))
        fetch.main(cfg, out_dir=raw_dir(cfg))
        assert cli.main(["check-upstream", "--config", str(path), "--exit-code"]) == 0
        change(served / RELATIVE[2])
        assert cli.main(["check-upstream", "--config", str(path)]) == 0
        assert cli.main(["check-upstream", "--config", str(path), "--exit-code"]) == 1
        assert sum(server.not_modified.values()) == len(NAMES) + 2 * (len(NAMES) - 1)  # asked with credentials
    out = capsys.readouterr().out
    assert f"changed  {NAMES[2]}  {server.url(RELATIVE[2])}?token=$UPSTREAM_TOKEN  ETag" in out
    written = [p.read_text() for p in raw_dir(cfg).rglob("*") if p.is_file() and p.suffix != ".nc"]
    assert upstream_state(cfg).read_text() in written
    for text in [out, caplog.text, *written]:
        assert token not in text and password not in text


def test_snakemake_plans_fetch_after_a_change_upstream_and_nothing_without(
    snakemake_exe: str, workflow_copy: Path, server: FileServer, served: Path
) -> None:
    wf = workflow_copy
    cfg = {"name": "up", "synthetic": {"kind": "none"}, "source": {"kind": "url", "url": server.url(TEMPLATE)}}
    cfg["source"].update({"start": START, "end": END, "retries": 1, "backoff_s": 0.01})
    (wf / "up.yaml").write_text(yaml.safe_dump(cfg))
    manifest = "resources/raw/up/manifest.json"

    def snakemake(*args: str) -> str:
        proc = subprocess.run(
            [snakemake_exe, manifest, "--cores", "1", "--configfile", "up.yaml", *args],
            cwd=wf,
            capture_output=True,
            text=True,
            env=job_env(),
            timeout=120,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout + proc.stderr

    def check_upstream() -> str:
        cmd = [sys.executable, "-m", "conv2dlstm", "check-upstream", "--config", "up.yaml"]
        proc = subprocess.run(cmd, cwd=wf, capture_output=True, text=True, env=job_env(), timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    snakemake()
    assert "nothing written" in check_upstream()
    assert "Nothing to be done" in snakemake("-n")
    change(served / RELATIVE[0])
    assert f"changed  {NAMES[0]}" in check_upstream()
    planned = snakemake("-n")
    assert "rule fetch:" in planned and "resources/raw/up/upstream.json" in planned
    # (after that fetch, upstream.json is older than the manifest and nothing is planned: Snakemake's
    # modification-time rule, left out here for the suite's time)
