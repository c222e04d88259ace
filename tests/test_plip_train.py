"""PLIP training end to end through the CLI on real data: learning, checkpoints, resume, reports, export."""

import csv
import json
from pathlib import Path

import pytest
import yaml
from transformers import CLIPVisionModel

from pallava.cli import main
from pallava.train.plip import RECIPES, PlipTrainConfig

pytestmark = pytest.mark.slow  # end to end: `make test-fast` skips it, `make test` runs it

REPO = Path(__file__).resolve().parents[1]
PER_CLASS_TRAIN, PER_CLASS_DEV = 16, 10


@pytest.fixture(scope="module")
def small_manifest(lung, tmp_path_factory) -> Path:
    """A class-balanced subset of the real manifest: a few train images and dev images per class."""
    rows = list(csv.DictReader((lung / "manifest.csv").open()))
    keep, counts = [], {}
    for row in rows:
        limit = PER_CLASS_TRAIN if row["split"] == "train" else PER_CLASS_DEV
        key = (row["split"], row["label"])
        if counts.get(key, 0) < limit:
            counts[key] = counts.get(key, 0) + 1
            keep.append({**row, "path": str(lung / row["path"])})
    path = tmp_path_factory.mktemp("data") / "manifest.csv"
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "label", "cluster", "split"])
        writer.writeheader()
        writer.writerows(keep)
    return path


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    """The tiny recipe with a smaller text tower and batch, for a few steps."""
    recipe = tmp_path_factory.mktemp("recipe") / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "preset": "tiny",
                "batch_size": 12,
                "epochs": 3,
                "max_steps": 10,
                "lr": 1e-3,
                "text_lr": 1e-4,
                "text_layers": 1,
                "itm_max_pairs": 4,
                "freeze_text_embeddings": True,
                "save_every": 4,
                "keep_checkpoints": 2,
            }
        )
    )
    return recipe


@pytest.fixture(scope="module")
def trained(small_manifest, recipe, tmp_path_factory) -> Path:
    """8 training steps, zero-shot probed on the dev images before and after."""
    out = tmp_path_factory.mktemp("plip")
    code = main(
        [
            "plip",
            "train",
            "--data",
            str(small_manifest),
            "--out",
            str(out),
            "--config",
            str(recipe),
            "--eval-data",
            str(small_manifest),
            "--eval-split",
            "dev",
            "--max-steps",
            "8",
        ]
    )
    assert code == 0
    return out


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_training_improves_zero_shot_accuracy(trained):
    evals = [row for row in _log(trained) if "zeroshot_accuracy" in row]
    assert [row["step"] for row in evals] == [0, 8]
    assert evals[-1]["zeroshot_accuracy"] > evals[0]["zeroshot_accuracy"]
    losses = [row["loss_itc"] for row in _log(trained) if "loss_itc" in row]
    assert len(losses) == 8 and min(losses[-3:]) < losses[0]


def test_outputs_checkpoints_and_resume(trained, small_manifest, recipe):
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "training_curve.png",
        "label_map.json",
        "vision_tower/config.json",
        "vision_tower/model.safetensors",
    ):
        assert (trained / name).is_file(), name
    assert any((trained / "logs").rglob("events.out.tfevents*"))
    assert sorted(p.name for p in (trained / "checkpoints").iterdir()) == ["ckpt-0000004", "ckpt-0000008"]
    assert (trained / "checkpoints" / "ckpt-0000008" / "COMPLETE").is_file()
    summary = json.loads((trained / "training_summary.json").read_text())
    assert summary["steps"] == 8 and summary["global_batch"] == 12
    # The last checkpoint half-written (as if the run had died while saving step 8): it is never loaded, and
    # resuming from step 4 replays steps 5-8 exactly.
    uninterrupted = [row for row in _log(trained) if "loss" in row]
    last = trained / "checkpoints" / "ckpt-0000008"
    (last / "COMPLETE").unlink()
    last.rename(last.with_name("ckpt-0000008.tmp"))
    code = main(
        [
            "plip",
            "train",
            "--data",
            str(small_manifest),
            "--out",
            str(trained),
            "--config",
            str(recipe),
            "--max-steps",
            "8",
            "--resume",
        ]
    )
    assert code == 0
    assert [row for row in _log(trained) if "loss" in row] == uninterrupted
    assert sorted(p.name for p in (trained / "checkpoints").iterdir()) == ["ckpt-0000004", "ckpt-0000008"]


def test_zeroshot_and_retrieval_reports(trained, small_manifest, tmp_path):
    assert (
        main(
            [
                "plip",
                "zeroshot",
                "--model",
                str(trained),
                "--data",
                str(small_manifest),
                "--out",
                str(tmp_path / "zs"),
            ]
        )
        == 0
    )
    report = json.loads((tmp_path / "zs" / "report.json").read_text())
    assert report["n"] == 3 * PER_CLASS_DEV
    assert {"accuracy", "macro_f1", "per_class", "confusion_matrix"} <= report.keys()
    assert sum(map(sum, report["confusion_matrix"])) == report["n"]
    assert set(report["per_class"]) == {"lung_aca", "lung_n", "lung_scc"}
    assert (tmp_path / "zs" / "confusion_matrix.png").stat().st_size > 0
    assert (
        main(
            [
                "plip",
                "retrieve",
                "--model",
                str(trained),
                "--data",
                str(small_manifest),
                "--split",
                "dev",
                "--out",
                str(tmp_path / "ret"),
            ]
        )
        == 0
    )
    retrieval = json.loads((tmp_path / "ret" / "report.json").read_text())
    for direction in ("image_to_text", "text_to_image"):
        recalls = [retrieval[direction][f"R@{k}"] for k in (1, 5, 10)]
        assert recalls == sorted(recalls) and 0 <= recalls[0] <= recalls[-1] <= 1


def test_export_vision_cli(trained, tmp_path):
    assert main(["plip", "export-vision", "--model", str(trained), "--out", str(tmp_path / "vision")]) == 0
    assert CLIPVisionModel.from_pretrained(tmp_path / "vision").config.hidden_size == 128


def test_cli_reports_bad_input(tmp_path, capsys):
    assert main(["plip", "train", "--data", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "o")]) == 1
    assert "PLIP data not found" in capsys.readouterr().err


@pytest.mark.parametrize("preset", sorted(RECIPES))
def test_shipped_recipe_files_match_the_presets(preset):
    assert PlipTrainConfig.from_yaml(REPO / "configs" / f"plip-{preset}.yaml") == RECIPES[preset]
