"""Atomic checkpoints: only sealed, final-named folders are ever picked up; keep-last-k pruning."""

from __future__ import annotations

import pytest

from pallava.train import checkpoints


def _write(directory, step: int, commit: bool = True):
    tmp = checkpoints.begin(directory, step)
    (tmp / "weights.bin").write_bytes(bytes([step]) * 16)
    return checkpoints.commit(tmp) if commit else tmp


def test_latest_complete_ignores_partial_and_unsealed_folders(tmp_path):
    assert checkpoints.latest_complete(tmp_path / "missing") is None
    _write(tmp_path, 2)
    _write(tmp_path, 4)
    partial = _write(tmp_path, 6, commit=False)  # killed while writing
    unsealed = tmp_path / checkpoints.checkpoint_name(8)  # final name but no marker
    unsealed.mkdir()
    (unsealed / "weights.bin").write_bytes(b"half")
    latest = checkpoints.latest_complete(tmp_path)
    assert latest.name == "ckpt-0000004"
    assert (latest / checkpoints.COMPLETE_MARKER).is_file()
    assert (latest / "weights.bin").read_bytes() == bytes([4]) * 16
    assert [step for step, _ in checkpoints.list_complete(tmp_path)] == [2, 4]
    assert checkpoints.clean_partial(tmp_path) == [partial]
    assert not partial.exists()


def test_commit_is_a_rename_and_a_resaved_step_replaces_the_old_copy(tmp_path):
    tmp = checkpoints.begin(tmp_path, 3)
    assert tmp.name.endswith(checkpoints.TMP_SUFFIX)
    (tmp / "a").write_text("first")
    final = checkpoints.commit(tmp)
    assert not tmp.exists() and final.name == "ckpt-0000003"
    again = checkpoints.begin(tmp_path, 3)
    (again / "a").write_text("second")
    checkpoints.commit(again)
    assert (final / "a").read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-0000003"]


def test_prune_keeps_the_newest(tmp_path):
    for step in (1, 2, 3, 4):
        _write(tmp_path, step)
    removed = checkpoints.prune(tmp_path, keep_last=2)
    assert [p.name for p in removed] == ["ckpt-0000001", "ckpt-0000002"]
    assert [step for step, _ in checkpoints.list_complete(tmp_path)] == [3, 4]
    with pytest.raises(ValueError, match="keep_last"):
        checkpoints.prune(tmp_path, keep_last=0)


def test_commit_refuses_a_final_folder(tmp_path):
    final = _write(tmp_path, 1)
    with pytest.raises(ValueError, match="temporary"):
        checkpoints.commit(final)
