"""A real ``mlflow server`` on 127.0.0.1 for tests: started on a free port, answering ``/health``,
stopped (SIGTERM to its main process stops its workers) and started again on the same port."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
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


class MlflowServer:
    """``mlflow server --backend-store-uri <backend> [extra...]`` run in ``cwd``, output appended to ``log``."""

    def __init__(self, cwd: Path, backend: str, *extra: str, log: Path | None = None) -> None:
        self.cwd = Path(cwd)
        self.args = ["--backend-store-uri", backend, *extra]
        self.log = Path(log) if log else self.cwd / "mlflow-server.log"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> MlflowServer:
        exe = Path(sys.executable).parent / "mlflow"
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [str(exe), "server", *self.args, "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
                cwd=self.cwd,
                # no job-runner processes (MLflow's GenAI jobs; five huey consumers of ~200 MB each)
                env=job_env({"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}),
                stdout=out,
                stderr=subprocess.STDOUT,
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
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) != 0:
                    return
            time.sleep(0.2)

    def __enter__(self) -> MlflowServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
