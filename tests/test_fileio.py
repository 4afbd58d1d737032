"""Atomic writes (cmc_kit.fileio): all or nothing at the target path."""

import os

import numpy as np
import pytest

from cmc_kit.fileio import atomic_path, atomic_write_bytes


def test_atomic_path_renames_onto_the_target_and_fsyncs(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    target = tmp_path / "new" / "folder" / "layout.npy"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp.suffix == ".npy" and tmp != target
        np.save(tmp, np.arange(5))  # would append ".npy" to a name without that suffix
        assert not target.exists()  # nothing at the target until the block succeeds
    np.testing.assert_array_equal(np.load(target), np.arange(5))
    assert synced, "the temporary file was not fsynced before the rename"
    assert sorted(p.name for p in target.parent.iterdir()) == ["layout.npy"]


def test_an_error_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    target = tmp_path / "table.csv"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="writer broke"):
        with atomic_path(target) as tmp:
            tmp.write_text("half a ta")
            raise RuntimeError("writer broke")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["table.csv"]


def test_temporary_names_are_unique(tmp_path):
    target = tmp_path / "page.html"
    with atomic_path(target) as first, atomic_path(target) as second:
        assert first != second
        first.write_text("1")
        second.write_text("2")
    assert target.read_text() == "1"  # the outer block finishes last and wins


def test_atomic_write_bytes_replaces_the_content(tmp_path):
    target = tmp_path / "blob.bin"
    assert atomic_write_bytes(target, b"\x00\x01") == target
    atomic_write_bytes(target, b"\xff")
    assert target.read_bytes() == b"\xff"
    assert [p.name for p in tmp_path.iterdir()] == ["blob.bin"]
