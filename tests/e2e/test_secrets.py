"""No secret is ever written down.

Credentials come from ~/.netrc (or the file named by NETRC) and the environment, never from the
configuration: a URL with user info or a literal secret query parameter is refused before any job,
naming the key, showing the URL redacted and saying where the credentials go. Everything that
prints or writes a URL redacts it (conv2dlstm.redact). The end-to-end checks plant a secret in
every place one can be given (~/.netrc, read by a real fetch from a server that demands HTTP basic
auth; a query token from the environment; the Copernicus Marine and object-store credential
variables; a refused URL with a password), run the real steps, and search every file written
(outputs, logs, manifest, MLflow database, .snakemake) and the console for each secret, as bytes.
"""

from __future__ import annotations

import base64
import json
import shutil
import sqlite3
import subprocess
import sys
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr
import yaml

from conv2dlstm.config.validate import validate_config
from conv2dlstm.data import download
from conv2dlstm.errors import ConfigError, DownloadError
from conv2dlstm.redact import redact_text, redact_url, url_secret_problem
from conv2dlstm.steps import fetch, synthetic
from tests.support.servers import FileServer, write_oisst_days
from tests.support.workflow import REPO, copy_workflow, job_env, run_snakemake

START, END = "2019-01-30", "2019-02-01"
TEMPLATE = "{date:%Y%m}/oisst-avhrr-v02r01.{date:%Y%m%d}.nc"
NAMES = [f"oisst-avhrr-v02r01.{d:%Y%m%d}.nc" for d in pd.date_range(START, END)]

# The planted secrets: each is unique, so finding one anywhere is a leak.
LOGIN = "netrc-login-5f1c2a"
PASSWORD = "netrc-pw-9d7e3b-S3CR3T"
TOKEN = "query-token-4b8a6c-S3CR3T"
URL_PASSWORD = "url-pw-2e6f0d-S3CR3T"
SECRET_ENV = {
    "COPERNICUSMARINE_SERVICE_USERNAME": "cmems-user-7a3e91",
    "COPERNICUSMARINE_SERVICE_PASSWORD": "cmems-pw-1c5b8f-S3CR3T",
    "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE6D2F4A8B",
    "AWS_SECRET_ACCESS_KEY": "aws-secret-8e2d4c-S3CR3T",
    "CONV2DLSTM_TEST_TOKEN": TOKEN,
}
SECRETS = list(
    dict.fromkeys(
        [
            LOGIN,
            PASSWORD,
            TOKEN,
            URL_PASSWORD,
            *SECRET_ENV.values(),
            base64.b64encode(f"{LOGIN}:{PASSWORD}".encode()).decode(),  # the Authorization header's value
        ]
    )
)


class AuthFileServer(FileServer):
    """A :class:`FileServer` that answers 401 unless the request carries HTTP basic auth with
    ``login``/``password`` and, when ``token`` is given, the query parameter ``token=<token>``."""

    def __init__(self, root: Path, *, login: str, password: str, token: str | None = None) -> None:
        self.expected_auth = "Basic " + base64.b64encode(f"{login}:{password}".encode()).decode()
        self.token = token
        self.refused = 0
        super().__init__(root)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        base = super()._handler_class()
        server = self

        class AuthHandler(base):  # type: ignore[misc, valid-type]
            def _serve(self, *, body: bool) -> None:
                query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
                ok = self.headers.get("Authorization") == server.expected_auth
                if server.token is not None:
                    ok = ok and query.get("token") == [server.token]
                if not ok:
                    server.refused += 1
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", 'Basic realm="test"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                super()._serve(body=body)

        return AuthHandler


def write_netrc(path: Path, host: str = "127.0.0.1", login: str = LOGIN, password: str = PASSWORD) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"machine {host}\n  login {login}\n  password {password}\n")
    path.chmod(0o600)
    return path


def snapshot(root: Path) -> dict[Path, bytes]:
    """The files under ``root`` and their contents (inputs that :func:`leaks` skips while unchanged)."""
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file() and not p.is_symlink()}


def leaks(
    root: Path, texts: dict[str, str], *, planted: set[Path], inputs: dict[Path, bytes] | None = None
) -> list[str]:
    """Where any of :data:`SECRETS` occurs: in a file under ``root`` (read as bytes, recursively;
    the planted sources, and ``inputs`` while unchanged, excepted) or in one of ``texts`` (name ->
    captured console output)."""
    found = []
    needles = [(s, s.encode()) for s in SECRETS]
    inputs = inputs or {}
    for path in sorted(root.rglob("*")):
        if path in planted or not path.is_file() or path.is_symlink():
            continue
        data = path.read_bytes()
        if inputs.get(path) == data:
            continue
        found += [f"{path.relative_to(root)}: {s}" for s, b in needles if b in data]
    for name, text in texts.items():
        found += [f"{name}: {s}" for s, _ in needles if s in text]
    return found


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three OISST-like daily files in the NCEI layout, as the synth step writes them."""
    return write_oisst_days(tmp_path_factory.mktemp("served") / "oisst", START, END)


@pytest.fixture()
def auth_server(served: Path) -> Iterator[AuthFileServer]:
    with AuthFileServer(served, login=LOGIN, password=PASSWORD) as srv:
        yield srv


def fetch_cfg(url: str, **source: object) -> dict:
    base = {"start": START, "end": END, "retries": 0, "backoff_s": 0.01, "timeout_s": 10, "parallel": 2}
    return validate_config({"name": "t", "source": {**base, "url": url, **source}})


# -------------------------------------------------------------------------------------------------
# redaction
# -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("https://user:pw@host/a.nc", "https://user:***@host/a.nc"),
        ("https://ghp_abc123@host/a.nc", "https://***@host/a.nc"),
        ("http://u:p@ss@host:8080/x", "http://u:***@host:8080/x"),
        ("https://h/a.nc?token=abc&day=1", "https://h/a.nc?token=***&day=1"),
        (
            "https://h/a.nc?X-Amz-Signature=ab&X-Amz-Credential=cd&x=1",
            "https://h/a.nc?X-Amz-Signature=***&X-Amz-Credential=***&x=1",
        ),
        (
            "https://h/a.nc?sig=ab&api_key=cd&subscription-key=ef&keyword=sst",
            "https://h/a.nc?sig=***&api_key=***&subscription-key=***&keyword=sst",
        ),
        ("https://h/api/a.nc?code=ab12&region=eu", "https://h/api/a.nc?code=***&region=eu"),
        ("https://h/a.nc?token=$MY_TOKEN", "https://h/a.nc?token=$MY_TOKEN"),
        ("error: https://h/a.nc?token=$MY_TOKEN: failed", "error: https://h/a.nc?token=$MY_TOKEN: failed"),
        ("error: https://h/a.nc?token=abc: failed", "error: https://h/a.nc?token=***: failed"),
        (
            "Max retries exceeded with url: /a.nc?access_token=abc (Caused by",
            "Max retries exceeded with url: /a.nc?access_token=*** (Caused by",
        ),
        ("{'Authorization': 'Basic dXNlcjpwdw=='}", "{'Authorization': 'Basic ***'}"),
        ("postgresql://mlflow:pw@db/mlflow", "postgresql://mlflow:***@db/mlflow"),
        ("file:resources/a@b/x.nc", "file:resources/a@b/x.nc"),
        ("sqlite:///mlflow.db", "sqlite:///mlflow.db"),
    ],
)
def test_redact_hides_user_info_secret_query_values_and_auth_headers(text: str, shown: str) -> None:
    assert redact_text(text) == shown


def test_a_resolved_environment_token_is_redacted_wherever_it_appears(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONV2DLSTM_TEST_TOKEN", "tok/en+42!")
    url = download.request_url("https://h/a.nc?code=$CONV2DLSTM_TEST_TOKEN")
    assert url == "https://h/a.nc?code=tok%2Fen%2B42%21"  # 'code' does not look secret by name
    assert "tok" not in redact_url(url) and "tok" not in redact_text("it said tok/en+42! twice: tok%2Fen%2B42%21")


@pytest.mark.parametrize(
    ("key", "cfg", "where"),
    [
        (
            "source.url",
            {"source": {"url": f"https://someone:{URL_PASSWORD}@data.example.org/{{date:%Y%m%d}}.nc"}},
            "machine data.example.org login <user> password <password>",
        ),
        ("source.url", {"source": {"url": f"https://{URL_PASSWORD}@data.example.org/{{date:%Y%m%d}}.nc"}}, "~/.netrc"),
        (
            "source.url",
            {"source": {"url": f"https://h/{{date:%Y%m%d}}.nc?access_token={URL_PASSWORD}"}},
            "?token=$MY_TOKEN",
        ),
        ("source.store", {"source": {"kind": "zarr", "store": f"https://u:{URL_PASSWORD}@h/era5.zarr"}}, "~/.netrc"),
        (
            "source.store",
            {"source": {"kind": "zarr", "store": f"s3://{URL_PASSWORD}@bucket/era5.zarr"}},
            "AWS_SECRET_ACCESS_KEY",
        ),
        (
            "source.paths[1]",
            {"source": {"kind": "files", "paths": ["a.nc", f"https://u:{URL_PASSWORD}@h/b.nc"]}},
            "local files only",
        ),
        (
            "mlflow.tracking_uri",
            {"mlflow": {"tracking_uri": f"postgresql://mlflow:{URL_PASSWORD}@db/mlflow"}},
            "~/.pgpass",
        ),
        (
            "mlflow.tracking_uri",
            {"mlflow": {"tracking_uri": f"https://mlflow.example.org/?token={URL_PASSWORD}"}},
            "MLFLOW_TRACKING_TOKEN",
        ),
        ("dask.scheduler_address", {"dask": {"scheduler_address": f"tls://u:{URL_PASSWORD}@10.0.0.1:8786"}}, "tls"),
    ],
)
def test_a_credential_in_a_url_is_refused_naming_the_key_and_where_it_goes(key: str, cfg: dict, where: str) -> None:
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
    msg = str(err.value)
    assert msg.startswith(f"config key {key}: ") and "***" in msg and where in msg, msg
    assert URL_PASSWORD not in msg


def test_a_query_value_from_the_environment_is_accepted_and_written_as_its_name() -> None:
    cfg = fetch_cfg(f"http://127.0.0.1:9/{TEMPLATE}?token=$CONV2DLSTM_TEST_TOKEN")
    assert cfg["source"]["url"].endswith("?token=$CONV2DLSTM_TEST_TOKEN")
    assert url_secret_problem(cfg["source"]["url"]) is None
    with pytest.raises(ConfigError, match=r"config key mlflow.tracking_uri: .*only source.url resolves"):
        validate_config({"mlflow": {"tracking_uri": "https://mlflow.example.org/?token=$MY_TOKEN"}})


def test_an_unset_environment_token_is_a_config_error_before_any_download(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("CONV2DLSTM_TEST_TOKEN", raising=False)
    with pytest.raises(ConfigError, match=r"config key source.url: .*CONV2DLSTM_TEST_TOKEN, which are not set"):
        fetch.main(fetch_cfg(f"http://127.0.0.1:9/{TEMPLATE}?token=$CONV2DLSTM_TEST_TOKEN"), out_dir=tmp_path / "raw")


# -------------------------------------------------------------------------------------------------
# ~/.netrc: requests reads it for a Session given no auth (HOME, and NETRC); fsspec's aiohttp too
# -------------------------------------------------------------------------------------------------


def test_http_fetch_authenticates_with_netrc_in_home(
    auth_server: AuthFileServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NETRC", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    write_netrc(tmp_path / "home" / ".netrc")
    manifest = json.loads(fetch.main(fetch_cfg(auth_server.url(TEMPLATE)), out_dir=tmp_path / "raw").read_text())
    assert [Path(f["path"]).name for f in manifest["files"]] == NAMES
    assert auth_server.refused == 0 and auth_server.gets() == len(NAMES)


def test_http_fetch_authenticates_with_the_netrc_file_named_by_NETRC(
    auth_server: AuthFileServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "empty-home"))
    monkeypatch.setenv("NETRC", str(write_netrc(tmp_path / "elsewhere" / "credentials")))
    fetch.main(fetch_cfg(auth_server.url(TEMPLATE)), out_dir=tmp_path / "raw")
    assert auth_server.refused == 0 and auth_server.gets() == len(NAMES)


def test_http_401_says_where_the_credentials_go(
    auth_server: AuthFileServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NETRC", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with pytest.raises(
        DownloadError,
        match=r"HTTP 401.*no credentials for 127\.0\.0\.1 in ~/\.netrc: add a line "
        r"'machine 127\.0\.0\.1 login <user> password <password>'",
    ):
        fetch.main(fetch_cfg(auth_server.url(TEMPLATE)), out_dir=tmp_path / "raw")
    write_netrc(tmp_path / "home" / ".netrc", password="not-the-password")
    with pytest.raises(
        DownloadError, match=r"HTTP 401.*refused the credentials for 127\.0\.0\.1 from ~/\.netrc"
    ) as err:
        fetch.main(fetch_cfg(auth_server.url(TEMPLATE)), out_dir=tmp_path / "raw")
    assert "not-the-password" not in str(err.value)
    (tmp_path / "home" / ".netrc").write_text(f"machine 127.0.0.1 login {LOGIN} password\n{PASSWORD} x\n")
    with pytest.raises(DownloadError, match=r"~/\.netrc cannot be parsed \(line \d+\)") as err:
        fetch.main(fetch_cfg(auth_server.url(TEMPLATE)), out_dir=tmp_path / "raw")
    assert LOGIN not in str(err.value) and PASSWORD not in str(err.value)
    assert not (tmp_path / "raw" / "manifest.json").exists()


def test_zarr_http_store_authenticates_with_netrc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """kind zarr over http(s): fsspec's aiohttp session trusts the environment, so ~/.netrc applies."""
    root = tmp_path / "stores"
    time = pd.date_range(START, END)
    ds = xr.Dataset(
        {"sst": (("time", "lat", "lon"), np.arange(len(time) * 4 * 4, dtype="float32").reshape(len(time), 4, 4))},
        coords={"time": time, "lat": [30.0, 31.0, 32.0, 33.0], "lon": [-70.0, -69.0, -68.0, -67.0]},
    )
    ds.to_zarr(root / "sst.zarr", zarr_format=3, consolidated=True)
    monkeypatch.delenv("NETRC", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    write_netrc(tmp_path / "home" / ".netrc")
    with AuthFileServer(root, login=LOGIN, password=PASSWORD) as srv:
        cfg = validate_config(
            {"name": "z", "source": {"kind": "zarr", "store": srv.url("sst.zarr"), "start": START, "end": END}}
        )
        manifest = json.loads(fetch.main(cfg, out_dir=tmp_path / "raw").read_text())
        assert srv.refused == 0
    assert manifest["files"][0]["url"] == cfg["source"]["store"]
    assert xr.open_zarr(tmp_path / "raw" / "z.zarr")["sst"].shape == (len(time), 4, 4)


# -------------------------------------------------------------------------------------------------
# every secret planted, the real steps run: nothing written down, nothing printed
# -------------------------------------------------------------------------------------------------


def _cli(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "conv2dlstm", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_the_leak_search_reads_hidden_directories_and_databases(tmp_path: Path) -> None:
    (tmp_path / ".snakemake" / "metadata").mkdir(parents=True)
    (tmp_path / ".snakemake" / "metadata" / "abc").write_text(json.dumps({"params": [TOKEN]}))
    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        db.execute("create table params (key text, value text)")
        db.execute("insert into params values ('source.url', ?)", (f"https://h/?t={PASSWORD}",))
    (tmp_path / "input.txt").write_text(LOGIN)
    found = leaks(
        tmp_path,
        {"console": f"x {URL_PASSWORD} y"},
        planted=set(),
        inputs=snapshot(tmp_path) | {tmp_path / "mlflow.db": b"", tmp_path / ".snakemake/metadata/abc": b""},
    )
    assert found == [f".snakemake/metadata/abc: {TOKEN}", f"mlflow.db: {PASSWORD}", f"console: {URL_PASSWORD}"]


def test_no_secret_is_written_down_by_the_fetch_cli(served: Path, tmp_path: Path) -> None:
    home, work = tmp_path / "home", tmp_path / "work"
    netrc = write_netrc(home / ".netrc")
    work.mkdir()
    env = job_env({"HOME": str(home), **SECRET_ENV})
    env.pop("NETRC", None)
    console: dict[str, str] = {}
    planted = {netrc}

    def run(label: str, source: dict, *extra: str) -> subprocess.CompletedProcess[str]:
        cfg_path = work / f"{label}.yaml"
        base = {"start": START, "end": END, "retries": 1, "backoff_s": 0.01, "timeout_s": 10, "parallel": 2}
        cfg_path.write_text(yaml.safe_dump({"name": label, "source": {**base, **source}}))
        if URL_PASSWORD in cfg_path.read_text():
            planted.add(cfg_path)  # the user's own file holding the refused URL
        proc = _cli([*extra, "fetch", "--config", str(cfg_path), "--out-dir", f"raw/{label}"], work, env)
        console[label] = proc.stdout + proc.stderr
        return proc

    with AuthFileServer(served, login=LOGIN, password=PASSWORD, token=TOKEN) as srv:
        # ~/.netrc and a query token from the environment: the server demands both
        ok = run("ok", {"url": srv.url(TEMPLATE) + "?token=$CONV2DLSTM_TEST_TOKEN"})
        assert ok.returncode == 0, console["ok"]
        assert srv.refused == 0 and srv.gets() == len(NAMES)
        manifest = json.loads((work / "raw/ok/manifest.json").read_text())
        assert [f["url"] for f in manifest["files"]] == [
            srv.url(f"{d:%Y%m}/{n}") + "?token=$CONV2DLSTM_TEST_TOKEN" for d, n in zip(pd.date_range(START, END), NAMES)
        ]
        # a missing file on the server, asked for with the token (the 404 message quotes the URL)
        missing = run("missing", {"url": srv.url("nowhere/" + TEMPLATE) + "?token=$CONV2DLSTM_TEST_TOKEN"})
        assert missing.returncode == 2 and "HTTP 404" in console["missing"], console["missing"]
    # the server gone: requests quotes the request URL, token resolved, in its connection error;
    # at DEBUG the CLI also logs the whole traceback
    down = run("down", {"url": srv.url(TEMPLATE) + "?token=$CONV2DLSTM_TEST_TOKEN"}, "--log-level", "DEBUG")
    assert down.returncode == 2 and "ConnectionError" in console["down"], console["down"]
    assert "Traceback" in console["down"] and "token=***" in console["down"], console["down"]
    assert (
        "error: http://127.0.0.1:" in console["down"]
        and "?token=$CONV2DLSTM_TEST_TOKEN: failed after 2 attempt(s)" in console["down"]
    ), console["down"]
    # a password in the URL: refused before anything runs, shown redacted, with the fix
    refused = run("refused", {"url": f"http://someone:{URL_PASSWORD}@127.0.0.1:9/{TEMPLATE}"})
    assert refused.returncode == 2, console["refused"]
    assert "error: config key source.url: 'http://someone:***@127.0.0.1:9/" in console["refused"]
    assert "machine 127.0.0.1 login <user> password <password>" in console["refused"]
    assert not (work / "raw/refused").exists()
    validated = _cli(["validate-config", "--config", str(work / "refused.yaml")], work, env)
    console["validate-config"] = validated.stdout + validated.stderr
    assert validated.returncode == 2 and "someone:***@" in console["validate-config"]

    assert leaks(tmp_path, console, planted=planted) == []


@pytest.mark.e2e
def test_no_secret_is_written_down_by_the_pipeline(tmp_path: Path) -> None:
    """The tiny pipeline, whole, through Snakemake: its data from a server that demands HTTP basic
    auth (from ~/.netrc) and a query token (from the environment), every other credential variable
    set; then a fetch that fails with the token in its URL, and a configuration with a password in
    its URL. No secret in any file (outputs, logs, manifest, mlflow.db, .snakemake) or console."""
    tiny = yaml.safe_load((REPO / "tests/configs/tiny.yaml").read_text())
    served = tmp_path / "served"
    synthetic.main(validate_config({"synthetic": tiny["synthetic"]}), out_dir=served)
    home = tmp_path / "home"
    netrc = write_netrc(home / ".netrc")
    wf = copy_workflow(tmp_path / "wf")
    inputs = snapshot(wf)  # the workflow's own files (this test's source among them) are no output
    env = job_env({"HOME": str(home), **SECRET_ENV})
    env.pop("NETRC", None)
    console: dict[str, str] = {}
    planted = {netrc}

    def config(name: str, url: str, **source: object) -> str:
        cfg = {
            **tiny,
            "synthetic": {**tiny["synthetic"], "kind": "none"},
            "source": {**tiny["source"], "url": url, "parallel": 4, **source},
        }
        (wf / name).write_text(yaml.safe_dump(cfg))
        return name

    with AuthFileServer(served, login=LOGIN, password=PASSWORD, token=TOKEN) as srv:
        url = srv.url(TEMPLATE) + "?token=$CONV2DLSTM_TEST_TOKEN"
        proc = run_snakemake(wf, "--cores", "2", "--configfile", config("secret.yaml", url), env=env)
        console["pipeline"] = proc.stdout + proc.stderr
        assert srv.refused == 0 and srv.gets() == 181
    assert (wf / "results/compare/tiny.csv").is_file()
    with sqlite3.connect(wf / "mlflow.db") as db:
        params = dict(db.execute("select key, value from params").fetchall())
    assert params and params.get("source.url", url) == url  # the variable's name, not its value

    # the server gone: the fetch job fails with the token in its request URL (the verified files
    # removed first: a forced fetch keeps them and would not ask the server)
    shutil.rmtree(wf / "resources/raw")
    failed = subprocess.run(
        [
            str(Path(sys.executable).parent / "snakemake"),
            "--cores",
            "1",
            "--forcerun",
            "fetch",
            "--until",
            "fetch",
            "--configfile",
            config("down.yaml", url, retries=0),
        ],
        cwd=wf,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    console["failed fetch"] = failed.stdout + failed.stderr
    assert failed.returncode != 0
    assert "Connection" in (wf / "results/logs/fetch.log").read_text()
    # a password in the URL: Snakemake stops while parsing the configuration
    refused = subprocess.run(
        [
            str(Path(sys.executable).parent / "snakemake"),
            "-n",
            "--cores",
            "1",
            "--configfile",
            config("refused.yaml", f"http://someone:{URL_PASSWORD}@127.0.0.1:9/{TEMPLATE}"),
        ],
        cwd=wf,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    planted.add(wf / "refused.yaml")
    console["refused"] = refused.stdout + refused.stderr
    assert refused.returncode != 0 and "someone:***@127.0.0.1:9" in console["refused"], console["refused"]

    assert (wf / ".snakemake/metadata").is_dir() and (wf / "mlflow.db").is_file()
    assert leaks(tmp_path, console, planted=planted, inputs=inputs) == []
