"""A real ``mlflow server`` on 127.0.0.1 for tests: started on a free port, answering ``/health``,
stopped (SIGTERM to its main process stops its workers) and started again on the same port.

``MlflowServer(..., app_name="basic-auth", env={...})`` runs MLflow's authentication (its ``/health``
needs none); :class:`MakeMlflowServer` is the Makefile's ``make mlflow-server`` itself, run in a
directory holding the Makefile (its process group is stopped). :func:`rest` sends one REST request,
with HTTP basic credentials or none.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

from tests.support.workflow import job_env

START_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    """Wait until ``url`` answers 200; fail early when ``proc`` (the server) exits."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode} before {url} answered")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer within {timeout_s} s")
        time.sleep(0.3)


def rest(
    url: str,
    method: str = "GET",
    body: dict | None = None,
    *,
    user: str | None = None,
    password: str | None = None,
) -> tuple[int, str]:
    """``(HTTP status, response text)`` of one request to ``url`` (a JSON ``body``), with HTTP basic
    credentials when ``user`` is given; an error status is returned, not raised."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if user is not None:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return int(resp.status), resp.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode(errors="replace")


class MlflowServer:
    """``mlflow server [--app-name <app_name>] --backend-store-uri <backend> [extra...]`` run in ``cwd``,
    output appended to ``log``; ``env`` is added to its environment (e.g. ``MLFLOW_AUTH_CONFIG_PATH``,
    ``MLFLOW_AUTH_ADMIN_PASSWORD`` and ``MLFLOW_FLASK_SERVER_SECRET_KEY`` of ``app_name="basic-auth"``),
    a name given None removed from it."""

    process_group = False
    """Run in a session of its own and stop its whole process group (a wrapper such as make)."""

    def __init__(
        self,
        cwd: Path,
        backend: str,
        *extra: str,
        log: Path | None = None,
        app_name: str | None = None,
        env: dict[str, str | None] | None = None,
    ) -> None:
        self.cwd = Path(cwd)
        self.args = [*(["--app-name", app_name] if app_name else []), "--backend-store-uri", backend, *extra]
        self.env = dict(env or {})
        self.log = Path(log) if log else self.cwd / "mlflow-server.log"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        exe = Path(sys.executable).parent / "mlflow"
        return [str(exe), "server", *self.args, "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]

    def environment(self) -> dict[str, str]:
        # no job-runner processes (MLflow's GenAI jobs; five huey consumers of ~200 MB each)
        env = job_env({"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        for name, value in self.env.items():
            if value is None:
                env.pop(name, None)
            else:
                env[name] = value
        return env

    def start(self) -> MlflowServer:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                self.command(),
                cwd=self.cwd,
                env=self.environment(),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=self.process_group,
            )
        try:
            wait_http(f"{self.url}/health", START_TIMEOUT_S, self.proc)
        except Exception:
            self.stop()
            raise RuntimeError(f"mlflow server did not start:\n{self.log.read_text()[-3000:]}") from None
        return self

    def stop(self) -> None:
        """Stop the server and wait until its port refuses connections."""
        if self.proc is not None and self.proc.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.proc.wait(timeout=30)
        if self.process_group and self.proc is not None:  # the wrapper may end before the server
            deadline = time.monotonic() + 30
            while self._group_alive() and time.monotonic() < deadline:
                time.sleep(0.2)
            if self._group_alive():
                self._signal(signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) != 0:
                    return
            time.sleep(0.2)

    def _signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        if not self.process_group:
            self.proc.send_signal(sig)
            return
        try:
            os.killpg(self.proc.pid, sig)  # the session started for it: its id is the wrapper's pid
        except ProcessLookupError:
            pass

    def _group_alive(self) -> bool:
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True

    def __enter__(self) -> MlflowServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class MakeMlflowServer(MlflowServer):
    """``make mlflow-server MLFLOW_HOST=127.0.0.1 MLFLOW_PORT=<free port> [variables...]`` in ``cwd`` (a
    directory with the Makefile, pyproject.toml, requirements/lock.txt and a ``.venv`` that is up to
    date, so that make installs nothing); ``env`` changes make's environment as it does the server's."""

    process_group = True

    def __init__(self, cwd: Path, *variables: str, log: Path | None = None, env: dict[str, str | None] | None = None):
        super().__init__(cwd, "", log=log, env=env)
        self.variables = list(variables)

    def command(self) -> list[str]:
        return [
            "make",
            "--no-print-directory",
            "mlflow-server",
            "MLFLOW_HOST=127.0.0.1",
            f"MLFLOW_PORT={self.port}",
            *self.variables,
        ]
