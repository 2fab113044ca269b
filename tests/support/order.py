"""The order in which the suite's test files start (a pytest plugin of tests/conftest.py): the longest
end-to-end files first, so that the workers of ``make test`` finish together. Its own module, with
no import but pytest's, so that tests/unit/test_suite_order.py can order a generated suite by it
without loading the project's fixtures."""

from __future__ import annotations

E2E_FIRST = (
    "test_quickstart.py",
    "test_zoo.py",
    "test_seed.py",
    "test_slurm.py",
    "test_rerun_inputs.py",
    "test_tracking_load.py",
    "test_rerun.py",
    "test_mlflow_ui.py",
    "test_forecast.py",
)
"""The longest test files (a minute or more each, ``docs/performance.md``), longest first."""


def pytest_collection_modifyitems(config, items) -> None:
    """Start the longest test files first, so that the workers of ``make test`` (pytest-xdist,
    ``--dist loadfile``: a file's tests stay on one worker) finish together. xdist keeps this order
    only with ``--no-loadscope-reorder`` (in the Makefile; tests/unit/test_suite_order.py): by
    default it hands out the files with the most tests first."""
    rank = {name: n for n, name in enumerate(E2E_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
