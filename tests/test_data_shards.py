"""Parquet shards: streaming writes, disjoint complete per-process splits, seeded order, embedded images;
and the build/shard CLI that feeds training."""

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from pallava.cli import main as cli_main
from pallava.data.io import iter_records
from pallava.data.records import Conversation
from pallava.data.shards import ShardStream, iter_shards, list_shards, write_shards

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _records(n):
    return ({"id": f"r{i:04d}", "image": f"{i}.jpg", "caption": f"caption {i}"} for i in range(n))


@pytest.fixture()
def shards(tmp_path):
    return write_shards(
        _records(103), tmp_path / "shards", records_per_shard=40, row_group_size=7, progress=False
    )


def test_write_shards_layout_and_round_trip(shards, tmp_path):
    assert [p.name for p in shards] == ["shard-00000.parquet", "shard-00001.parquet", "shard-00002.parquet"]
    index = json.loads((tmp_path / "shards" / "index.json").read_text())
    assert [s["records"] for s in index["shards"]] == [40, 40, 23] and index["records"] == 103
    assert not list((tmp_path / "shards").glob("*.partial"))
    assert [r["id"] for r in iter_records(tmp_path / "shards")] == [f"r{i:04d}" for i in range(103)]
    with pytest.raises(ValueError, match="already holds"):
        write_shards(_records(1), tmp_path / "shards", progress=False)


@pytest.mark.parametrize("world_size", [1, 2, 3, 8, 20])
def test_ranks_are_disjoint_and_cover_everything(shards, world_size):
    seen = Counter()
    for rank in range(world_size):
        seen.update(r["id"] for r in iter_shards(shards, rank, world_size, seed=5, epoch=1))
    assert set(seen) == {f"r{i:04d}" for i in range(103)} and set(seen.values()) == {1}


def test_seeded_order_is_deterministic_and_changes_per_epoch(shards):
    first = [r["id"] for r in iter_shards(shards, 1, 3, seed=0, epoch=0)]
    assert first == [r["id"] for r in iter_shards(shards, 1, 3, seed=0, epoch=0)]
    assert first != [r["id"] for r in iter_shards(shards, 1, 3, seed=0, epoch=1)]
    assert [r["id"] for r in iter_shards(shards)] == sorted(r["id"] for r in iter_shards(shards))


def test_equal_shares_for_collective_training(shards):
    counts = [sum(1 for _ in iter_shards(shards, rank, 4, equal=True)) for rank in range(4)]
    assert len(set(counts)) == 1 and counts[0] > 0
    with pytest.raises(ValueError, match="rank must be in"):
        list(iter_shards(shards, 4, 4))


def test_shard_stream_splits_across_dataloader_workers(shards):
    stream = ShardStream(shards, rank=1, world_size=2, seed=3)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)
    from_workers = sorted(r["id"] for r in loader)
    expected = sorted(r["id"] for rank in (2, 3) for r in iter_shards(shards, rank, 4, seed=3))
    assert from_workers == expected and len(set(from_workers)) == len(from_workers)


def test_embedded_images_round_trip(tmp_path):
    tiles = sorted((SHARED / "lc25000-lung" / "images" / "lung_n").glob("*.jpeg"))[:3]
    if not tiles:
        pytest.skip("shared data not available")
    records = [{"id": t.stem, "image": t.name, "caption": "benign lung"} for t in tiles]
    paths = write_shards(
        records, tmp_path / "s", embed_images=True, image_root=tiles[0].parent, progress=False
    )
    rows = list(iter_shards(paths, with_images=True))
    assert [r["image_bytes"] for r in rows] == [t.read_bytes() for t in tiles]
    with pytest.raises(ValueError, match="record x: field 'image': file not found"):
        write_shards([{"id": "x", "image": "missing.jpg"}], tmp_path / "t", embed_images=True, progress=False)
    assert list_shards(paths[0]) == [paths[0]]


def test_cli_build_and_shard(tmp_path, capsys):
    manifest = SHARED / "lc25000-lung" / "manifest.csv"
    if not manifest.is_file():
        pytest.skip("shared data not available")
    captions, vqa = tmp_path / "captions.jsonl", tmp_path / "vqa.jsonl"
    assert (
        cli_main(
            [
                "data",
                "build",
                "--kind",
                "captions",
                "--input",
                str(manifest),
                "--split",
                "dev",
                "--out",
                str(captions),
                "--no-progress",
            ]
        )
        == 0
    )
    assert (
        cli_main(
            [
                "data",
                "build",
                "--kind",
                "vqa",
                "--input",
                str(manifest),
                "--split",
                "dev",
                "--out",
                str(vqa),
                "--no-progress",
            ]
        )
        == 0
    )
    assert (
        cli_main(
            [
                "data",
                "shard",
                "--input",
                str(captions),
                "--out",
                str(tmp_path / "cap-shards"),
                "--shard-size",
                "50",
                "--no-progress",
            ]
        )
        == 0
    )
    stage1 = tmp_path / "stage1.jsonl"
    assert (
        cli_main(
            [
                "data",
                "build",
                "--kind",
                "stage1",
                "--input",
                str(tmp_path / "cap-shards"),
                "--out",
                str(stage1),
                "--no-progress",
            ]
        )
        == 0
    )
    assert (
        cli_main(
            [
                "data",
                "build",
                "--kind",
                "stage2",
                "--input",
                str(vqa),
                "--out",
                str(tmp_path / "s2.jsonl"),
                "--no-progress",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    # per image 6 diagnosis questions (choice twice) and 2 on malignancy (one organ: no organ questions)
    assert "wrote 120 captions" in out and "wrote 960 vqa" in out and "in 3 shards" in out
    conversations = [Conversation.from_dict(r) for r in iter_records(stage1)]
    assert len(conversations) == 120 and all("<image>" in c.conversations[0]["value"] for c in conversations)
    stage2 = [Conversation.from_dict(r) for r in iter_records(tmp_path / "s2.jsonl")]
    diagnosis = [c for c in stage2 if c.meta["answer_type"] == "closed" and c.meta["question"] == "diagnosis"]
    assert Counter(c.conversations[1]["value"] for c in diagnosis) == {"yes": 120, "no": 120}
    assert (
        cli_main(
            [
                "data",
                "build",
                "--kind",
                "vqa",
                "--input",
                str(manifest),
                "--labels",
                "nct-crc-he",
                "--out",
                str(vqa),
            ]
        )
        == 1
    )
    assert (
        "labels ['lung_aca', 'lung_n', 'lung_scc'] are not in the label map 'nct-crc-he'"
        in capsys.readouterr().err
    )
    assert cli_main(["data", "build", "--kind", "stage1", "--input", str(vqa), "--out", str(stage1)]) == 1
    assert "vqa.jsonl: record 0: caption pair" in capsys.readouterr().err
