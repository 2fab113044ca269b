"""fsutil: atomic outputs leave nothing partial, stray temporaries are discarded, sizes and digests."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from conv2dlstm.fsutil import atomic_output, discard_partials, sha256_file, sha256_tree, tree_bytes


def test_atomic_output_file_and_directory(tmp_path: Path) -> None:
    with atomic_output(tmp_path / "a" / "out.txt") as tmp:
        assert tmp.parent == tmp_path / "a" and tmp.name.startswith(".out.txt.") and tmp.name.endswith(".partial")
        tmp.write_text("one")
    with atomic_output(tmp_path / "store.zarr") as tmp:
        tmp.mkdir()
        (tmp / "zarr.json").write_text("{}")
    with atomic_output(tmp_path / "a" / "out.txt") as tmp:  # replaces the previous output
        tmp.write_text("two")
    assert (tmp_path / "a" / "out.txt").read_text() == "two"
    assert (tmp_path / "store.zarr" / "zarr.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a", "out.txt", "store.zarr", "zarr.json"]


def test_atomic_output_failure_keeps_the_previous_output(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    target.write_text("previous")
    with pytest.raises(RuntimeError, match="boom"), atomic_output(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert target.read_text() == "previous"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]
    with pytest.raises(FileNotFoundError, match="nothing was written"), atomic_output(tmp_path / "empty"):
        pass


def test_discard_partials_removes_only_stray_temporaries(tmp_path: Path) -> None:
    (tmp_path / ".a.nc.1234abcd.partial").write_bytes(b"half a file")
    (tmp_path / ".b.zarr.deadbeef.partial").mkdir()
    (tmp_path / ".b.zarr.deadbeef.partial" / "zarr.json").write_text("{}")
    (tmp_path / "a.nc").write_bytes(b"complete")
    (tmp_path / ".a.nc.sha256").write_text("x  a.nc\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / ".c.nc.0000.partial").write_bytes(b"not a direct child")
    removed = discard_partials(tmp_path)
    assert [p.name for p in removed] == [".a.nc.1234abcd.partial", ".b.zarr.deadbeef.partial"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".a.nc.sha256", "a.nc", "sub"]
    assert (tmp_path / "sub" / ".c.nc.0000.partial").exists()
    assert discard_partials(tmp_path / "missing") == []


def test_discard_partials_of_one_output_leaves_the_others(tmp_path: Path) -> None:
    for name in (".a.nc.1234abcd.partial", ".a.nc.x.y.partial", ".ab.nc.1234abcd.partial", ".b[1].nc.0000.partial"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in discard_partials(tmp_path, of="a.nc")] == [".a.nc.1234abcd.partial", ".a.nc.x.y.partial"]
    assert [p.name for p in discard_partials(tmp_path, of="b[1].nc")] == [".b[1].nc.0000.partial"]  # no glob
    assert sorted(p.name for p in tmp_path.iterdir()) == [".ab.nc.1234abcd.partial"]


def test_tree_bytes_and_digests(tmp_path: Path) -> None:
    store = tmp_path / "s.zarr"
    (store / "x").mkdir(parents=True)
    (store / "zarr.json").write_bytes(b"12345")
    (store / "x" / "c.0").write_bytes(b"abc")
    assert tree_bytes(store) == 8
    assert tree_bytes(store / "zarr.json") == 5
    assert sha256_file(store / "x" / "c.0") == hashlib.sha256(b"abc").hexdigest()
    expected = hashlib.sha256()
    for rel, content in (("x/c.0", b"abc"), ("zarr.json", b"12345")):
        expected.update(rel.encode())
        expected.update(hashlib.sha256(content).digest())
    assert sha256_tree(store) == expected.hexdigest()
    assert sha256_tree(store / "zarr.json") == hashlib.sha256(b"12345").hexdigest()
