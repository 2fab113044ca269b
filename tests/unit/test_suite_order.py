"""`make test` starts the longest test files first (``E2E_FIRST`` in tests/support/order.py).

pytest-xdist's ``--dist loadfile`` hands out whole files; by default it reorders them by their
number of tests, most first, which put the end-to-end files (a few long tests each) last. Here the
command line of ``make test`` runs a generated suite, ordered by the project's own hook: a file named
as the first of ``E2E_FIRST``, with one test, beside files of many short tests.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.order import E2E_FIRST

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def make_test_pytest_args() -> list[str]:
    """The arguments ``make test`` gives pytest (``-n``, ``--dist`` and the rest), without running it."""
    out = subprocess.run(
        ["make", "--no-print-directory", "-n", "test", "VENV=/nonexistent/venv", "PYTEST_ARGS="],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    (line,) = [line for line in out.splitlines() if " pytest " in line]
    args = shlex.split(line.split(";")[0])
    return args[args.index("pytest") + 1 :]


def test_make_test_starts_the_conftest_s_first_file_first(tmp_path: Path) -> None:
    suite = tmp_path / "suite"
    suite.mkdir()
    log = tmp_path / "started.log"
    (suite / "conftest.py").write_text(
        "import sys, time\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "from tests.support.order import pytest_collection_modifyitems  # the project's order\n\n"
        "def pytest_runtest_setup(item):\n"
        f"    with open({str(log)!r}, 'a') as f:\n"
        "        f.write(f'{time.monotonic()} {item.path.name}\\n')\n"
    )
    first = E2E_FIRST[0]
    (suite / first).write_text("def test_long():\n    pass\n")
    for n in range(8):  # files of more tests, which xdist's reordering would hand out before it
        body = "".join(f"def test_{k}():\n    __import__('time').sleep(0.3)\n\n" for k in range(n + 3))
        (suite / f"test_many_{n}.py").write_text(body)
    args = [a for a in make_test_pytest_args() if a != "tests"]
    done = subprocess.run(
        [sys.executable, "-m", "pytest", *args, "-p", "no:cacheprovider", "-q", str(suite)],
        cwd=suite,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "-n" in args and "loadfile" in args
    started = sorted((float(t), name) for t, name in (line.split() for line in log.read_text().splitlines()))
    workers = int(args[args.index("-n") + 1])
    names = [name for _, name in started]
    assert len(names) == 1 + sum(n + 3 for n in range(8))
    assert first in names[:workers], names  # among the first tests to start, one per worker
