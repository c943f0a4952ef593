"""Atomic outputs: a failure half-way leaves the previous output intact and no temp files."""

import json

import pytest

from stagediff.io import atomic_dir, dir_digest, write_json


def test_atomic_dir_replaces_whole_on_success(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with atomic_dir(out) as tmp:
        (tmp / "new.txt").write_text("new")
        assert not (out / "new.txt").exists()  # nothing visible before the end
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_dir_keeps_old_output_on_failure(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "half.txt").write_text("half")
            raise RuntimeError("killed")
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_write_json_round_trip_and_no_temp(tmp_path):
    write_json(tmp_path / "m" / "x.json", {"b": 1, "a": 0.5})
    assert json.loads((tmp_path / "m/x.json").read_text()) == {"a": 0.5, "b": 1}
    assert [p.name for p in (tmp_path / "m").iterdir()] == ["x.json"]


def test_dir_digest_sees_names_and_contents(tmp_path):
    (tmp_path / "a").write_text("1")
    d1 = dir_digest(tmp_path)
    (tmp_path / "a").write_text("2")
    assert dir_digest(tmp_path) != d1
    (tmp_path / "a").rename(tmp_path / "b")
    (tmp_path / "b").write_text("1")
    assert dir_digest(tmp_path) != d1
