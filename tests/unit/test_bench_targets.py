"""bench/targets.py, which every bench imports: the targets it reads, how a missed one is reported,
where results are written. (The benches themselves run with `make bench`, never in the tests.)"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

from tests.support.workflow import REPO

_spec = importlib.util.spec_from_file_location("bench_targets", REPO / "bench" / "targets.py")
assert _spec is not None and _spec.loader is not None
targets = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(targets)


def test_every_target_is_checked_by_a_bench_and_every_key_a_bench_reads_is_there() -> None:
    """The keys the benches look up (``targets.load()["..."]``, ``goals["..."]``) are those of the file."""
    keys = set(targets.load())
    used = {
        key
        for path in (REPO / "bench").glob("*.py")
        for key in re.findall(r"""(?:load\(\)|goals|targets)\[["'](\w+)["']\]""", path.read_text())
    }
    assert used, "no bench looks a target up"
    assert used <= keys, f"read by a bench, not in bench/targets.yaml: {sorted(used - keys)}"
    assert keys <= used, f"in bench/targets.yaml, checked by no bench: {sorted(keys - used)}"


def test_results_are_written_as_json_under_the_bench_s_name(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(targets, "RESULTS", tmp_path / "results")
    for name in targets.ISA_CAPS:
        monkeypatch.delenv(name, raising=False)
    path = targets.write_results("flops", {"peak": 503.8})
    assert path == tmp_path / "results" / "flops.json"
    assert json.loads(path.read_text()) == {"peak": 503.8, "instruction_set_caps": {}}
    stamped = targets.write_results("run", [1, 2], stamped=True)
    assert re.fullmatch(r"run-\d{8}-\d{6}\.json", stamped.name), stamped.name
    assert json.loads(stamped.read_text()) == [1, 2]


@pytest.mark.parametrize(("missed", "status"), [([], 0), (["convlstm at 25x25: 34% < 40%"], 1)])
def test_a_missed_target_is_printed_and_fails_the_check(missed, status, capsys) -> None:
    assert targets.report(missed) == status
    assert capsys.readouterr().out.splitlines() == [f"MISSED: {line}" for line in missed]


def test_results_record_the_instruction_set_caps_they_ran_under(tmp_path: Path, monkeypatch) -> None:
    """A bench run as on an AVX2-only CPU (each library's cap set) says so in its results and header."""
    monkeypatch.setattr(targets, "RESULTS", tmp_path / "results")
    for name in targets.ISA_CAPS:
        monkeypatch.delenv(name, raising=False)
    assert targets.describe_instruction_sets() == "the CPU's own instruction sets"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    assert targets.instruction_set_caps() == {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    assert targets.describe_instruction_sets() == (
        "instruction sets capped: ATEN_CPU_CAPABILITY=avx2, ONEDNN_MAX_CPU_ISA=AVX2"
    )
    written = json.loads(targets.write_results("keras_side_by_side", {"settings": []}).read_text())
    assert written["instruction_set_caps"] == {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    assert json.loads(targets.write_results("run", [1]).read_text()) == [1]  # a list is written as it is
