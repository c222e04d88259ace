"""The append-only JSONL writer's one rule for a line cut by a crash, tested where it lives."""

from __future__ import annotations

import json

import pytest

from pallava.data.io import AppendOnlyJsonl, JsonlLineError, read_appended

A, B, C = {"id": "a", "n": 1}, {"id": "b", "n": 2}, {"id": "c", "n": 3}


def lines(*records) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def test_a_cut_last_line_is_dropped_and_written_again(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text(lines(A) + json.dumps(B)[:9])  # killed in the middle of writing B
    assert read_appended(path) == [A] and path.read_text().endswith(
        json.dumps(B)[:9]
    )  # reading changes nothing
    with AppendOnlyJsonl(path) as log:
        assert log.records == [A]
        log.append(B)
    assert path.read_text() == lines(A, B)


def test_a_whole_last_line_without_its_newline_is_kept(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text(lines(A) + json.dumps(B))  # killed between the record and its newline
    with AppendOnlyJsonl(path) as log:
        assert log.records == [A, B]
        log.append(C)
    assert path.read_text() == lines(A, B, C)


def test_a_bad_complete_line_is_an_error_naming_file_and_line(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text(lines(A) + "not json\n" + lines(B))
    with AppendOnlyJsonl(path) as log, pytest.raises(JsonlLineError, match=r"out\.jsonl:2: not valid JSON"):
        log.records  # noqa: B018  (opening repairs only the tail; reading meets the bad line)
    path.write_text(lines(A) + "[1, 2]\n")
    with pytest.raises(ValueError, match=r"out\.jsonl:2: expected a JSON object, got list"):
        read_appended(path)


def test_keep_drops_records_on_resume(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text(lines({"step": 1}, {"step": 2}, {"step": 3}) + '{"step": 4')
    with AppendOnlyJsonl(path, keep=lambda r: r["step"] <= 2) as log:
        assert log.records == [{"step": 1}, {"step": 2}]
        log.append({"step": 3, "again": True})
    assert read_appended(path) == [{"step": 1}, {"step": 2}, {"step": 3, "again": True}]
    AppendOnlyJsonl(path, keep=lambda r: False).close()  # a fresh run starts an empty log
    assert path.read_text() == ""
