"""``pytest --cpu-durations=N``: the N tests that used the most CPU time, as ``--durations`` lists
the longest by wall time. On a suite whose workers outnumber the cores, wall time measures the
contention as much as the test; CPU time measures the work, and what the suite's time is made of.

A test's CPU time is its worker's (user and system) plus that of every subprocess the worker waited
for during the test (``getrusage(RUSAGE_CHILDREN)``: a Snakemake run and all its jobs, a server the
test stopped), over its setup, call and teardown. Processes nobody waits for (daemons such as
SLURM's) are not counted. Under pytest-xdist each worker measures its own tests and the report
carries the figure to the controller, which prints the table."""

from __future__ import annotations

import resource
from collections.abc import Iterator

import pytest

KEY = "cpu_s"


def _cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    waited = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + waited.ru_utime + waited.ru_stime


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--cpu-durations",
        type=int,
        default=None,
        metavar="N",
        help="list the N tests that used the most CPU time (their own and their subprocesses'); 0 for all",
    )


def _measured(item: pytest.Item) -> Iterator[None]:
    start = _cpu_seconds()
    yield
    item.user_properties.append((KEY, _cpu_seconds() - start))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    yield from _measured(item)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    yield from _measured(item)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Iterator[None]:
    yield from _measured(item)


class _Totals:
    """CPU seconds per test id, summed from the reports of its three phases."""

    def __init__(self) -> None:
        self.by_test: dict[str, float] = {}

    @pytest.hookimpl
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        # each phase's report carries the properties measured so far; the teardown's has all three
        if report.when == "teardown":
            self.by_test[report.nodeid] = sum(v for k, v in report.user_properties if k == KEY)

    @pytest.hookimpl
    def pytest_terminal_summary(self, terminalreporter) -> None:
        n = terminalreporter.config.getoption("cpu_durations")
        ranked = sorted(self.by_test.items(), key=lambda kv: kv[1], reverse=True)
        total = sum(self.by_test.values())
        terminalreporter.write_sep("=", f"{'all' if n == 0 else f'most {n}'} CPU-consuming tests")
        for nodeid, seconds in ranked if n == 0 else ranked[:n]:
            terminalreporter.write_line(f"{seconds:8.2f}s {nodeid}")
        terminalreporter.write_line(f"{total:8.2f}s in all, {len(ranked)} tests")


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("cpu_durations") is not None and not hasattr(config, "workerinput"):
        config.pluginmanager.register(_Totals(), "cpu-durations-totals")
