"""The quickstart's pipeline, shortened (a few images and steps), end to end on the real shared tiles."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from pallava.cli import main

pytestmark = pytest.mark.slow  # end to end: `make test-fast` skips it, `make test` runs it

DATASETS = {"lc25000-lung": 3, "lc25000-colon": 2, "oscc": 2}  # name -> classes


def _command(shared_data, out):
    data = [arg for name in DATASETS for arg in ("--data", str(shared_data / name))]
    return [
        "quickstart",
        "--smoke",
        "--no-progress",
        "--out",
        str(out),
        *data,
        "--samples",
        str(shared_data / "samples"),
    ]


@pytest.fixture(scope="module")
def smoke_run(shared_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart")
    assert main(_command(shared_data, out)) == 0
    return out


def test_cleaning_rejects_the_contaminants_and_keeps_every_record_once(smoke_run):
    clean = smoke_run / "corpus" / "clean"
    raw = [json.loads(line)["id"] for line in (smoke_run / "corpus" / "raw.jsonl").read_text().splitlines()]
    kept = [json.loads(line) for line in (clean / "kept.jsonl").read_text().splitlines()]
    rejected = [json.loads(line) for line in (clean / "rejected.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in kept + rejected) == sorted(raw)
    rejected_ids = {r["id"] for r in rejected}
    assert {i for i in raw if i.startswith(("photo-", "non-human-", "corrupt"))} == rejected_ids
    assert all(r.get("source") != "contaminant" for r in kept)


def test_models_load_and_answer(smoke_run, lung_tiles):
    from pallava.inference import PaLlava
    from pallava.models.plip import PlipZeroShot

    assistant = PaLlava.from_pretrained(smoke_run / "assistant")
    assert isinstance(assistant.ask(lung_tiles[0], "What is the diagnosis?", max_new_tokens=4), str)
    probabilities = PlipZeroShot.from_pretrained(smoke_run / "plip").predict_proba(
        [Image.open(lung_tiles[1])], [["benign lung tissue"], ["lung adenocarcinoma"]]
    )
    assert probabilities.shape == (1, 2) and abs(float(probabilities.sum()) - 1) < 1e-5


def test_reports_and_summary_are_written(smoke_run):
    reports = smoke_run / "reports"
    suite = json.loads((reports / "suite" / "summary.json").read_text())
    assert [row["name"] for row in suite["benchmarks"]] == list(DATASETS)  # one row per dataset
    for row in suite["benchmarks"]:
        classes = DATASETS[row["name"]]
        assert row["n"] == 2 * classes  # 2 dev images per class in the smoke subset
        vqa = json.loads((reports / "suite" / row["name"] / "vqa" / "report.json").read_text())
        assert {"closed", "open", "choice"} <= set(vqa) and vqa["closed"]["n"] > 0
        organ = [
            r
            for r in map(
                json.loads,
                (reports / "suite" / row["name"] / "vqa" / "predictions.jsonl").read_text().splitlines(),
            )
            if "organ" in r["question"].lower()
        ]
        assert organ, "questions span organs"
        for part, head in (("plip-zeroshot", "contrastive"), ("plip-matching", "matching")):
            plip = json.loads((reports / "suite" / row["name"] / part / "report.json").read_text())
            assert len(plip["per_class"]) == classes  # zero-shot over the dataset's own classes
            assert plip["head"] == head and plip["n"] == row["n"]
    table = (reports / "summary.md").read_text()
    assert all(f"| {name} |" in table for name in DATASETS)
    summary = json.loads((reports / "summary.json").read_text())
    assert [step["name"] for step in summary] == [
        "1-corpus",
        "2-plip",
        "3-assistant",
        "4-evaluation",
        "5-example",
        "6-slides",
    ]
    assert list(reports.glob("**/*.png")), "reports come with plots"


def test_rerun_skips_completed_steps(smoke_run, shared_data, capsys):
    assert main(_command(shared_data, smoke_run)) == 0
    printed = capsys.readouterr().out
    assert printed.count("already complete, skipped") == 6
    assert "$ pallava" not in printed  # no step ran a command again


def test_a_folder_made_with_other_settings_is_refused_not_continued(smoke_run, shared_data, tmp_path, capsys):
    """Continuing a finished run with another seed or stain normalisation would skip every step and hand back
    the old models: the run stops first, naming what changed, and leaves the folder as it was."""
    out = tmp_path / "run"
    shutil.copytree(smoke_run, out)
    recorded = json.loads((out / ".quickstart" / "settings.json").read_text())
    assert recorded["seed"] == 0 and recorded["plip_args"] == [] and recorded["smoke"] is True
    assert main([*_command(shared_data, out), "--seed", "1", "--stain-normalize", "macenko"]) == 1
    error = capsys.readouterr().err
    assert "made with other settings (changed: plip_args, seed)" in error and "choose another --out" in error
    assert main([*_command(shared_data, out), "--train-set", "optim.lr=1e-3"]) == 1
    assert "made with other settings (changed: train_overrides)" in capsys.readouterr().err
    assert json.loads((out / ".quickstart" / "settings.json").read_text()) == recorded
    (out / ".quickstart" / "settings.json").unlink()  # a folder from before the record: taken as it is
    assert main(_command(shared_data, out)) == 0
    assert "already complete, skipped" in capsys.readouterr().out


def _split_images(smoke_run) -> dict[str, set[Path]]:
    """The smoke subsets' images by split, over the three datasets."""
    images: dict[str, set[Path]] = {"train": set(), "dev": set()}
    for name in DATASETS:
        with (smoke_run / "data" / name / "manifest.csv").open(newline="") as handle:
            for row in csv.DictReader(handle):
                images[row["split"]].add(Path(row["path"]).resolve())
    return images


def test_slide_step_trains_on_train_tiles_and_evaluates_on_dev_tiles(smoke_run):
    images = _split_images(smoke_run)
    for split in ("train", "dev"):
        index = json.loads((smoke_run / "slides" / split / "index.json").read_text())
        assert {s["organ"] for s in index["slides"]} == {"lung", "colon", "oral cavity"}  # every organ
        for slide in (smoke_run / "slides" / split).glob("*.truth.json"):
            sources = {Path(t["image"]).resolve() for t in json.loads(slide.read_text())["tiles"]}
            assert sources <= images[split], f"{slide.name} holds tiles of another split"
    model = smoke_run / "slide-assistant"
    config = json.loads((model / "slide_config.json").read_text())
    assert Path(config["init"]) == (smoke_run / "assistant").resolve()
    assert (model / "attention-mil.safetensors").is_file()  # the baseline is trained in the same step
    assert list((smoke_run / "slides" / "features").glob("*/*.safetensors")), "features cached under OUT"
    report = json.loads((smoke_run / "reports" / "slides" / "report.json").read_text())
    assert report["n_slides"] == len(index["slides"])
    assert {"slide_model", "attention_mil", "retrieve_then_ask"} <= set(report["methods"])
    step = next(
        s for s in json.loads((smoke_run / "reports" / "summary.json").read_text()) if s["name"] == "6-slides"
    )
    expected = report["methods"]["slide_model"]["tumour_present"]["value"]
    assert step["metrics"]["tumour_present"] == expected
    assert (
        step["metrics"]["mil_tumour_present"] == report["methods"]["attention_mil"]["tumour_present"]["value"]
    )
    row = next(
        line for line in (smoke_run / "reports" / "summary.md").read_text().splitlines() if "6-slides" in line
    )
    assert f"tumour_present {expected:.3f}" in row and "pointing_game" in row


def test_no_slides_leaves_the_slide_step_out(smoke_run, shared_data, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(
        smoke_run, out, ignore=shutil.ignore_patterns("slides", "slide-assistant", "6-slides.json")
    )
    assert main([*_command(shared_data, out), "--no-slides"]) == 0
    assert "virtual-slides" not in capsys.readouterr().out
    summary = json.loads((out / "reports" / "summary.json").read_text())
    assert [step["name"] for step in summary][-1] == "5-example"
    assert not (out / "slide-assistant").exists()


def test_training_commands_run_data_parallel_over_the_requested_processes(tmp_path, monkeypatch):
    """With processes > 1 stage align goes through `accelerate launch` with one thread per process; other
    commands (PLIP and stage instruct, which use threads, and the slide stage) run in this process."""
    import subprocess

    from pallava import quickstart
    from pallava.quickstart import runner as step_runner
    from pallava.train.launch import accelerate_command, default_processes

    launched, in_process = [], []

    def fake_run(command, env):
        launched.append((command, env))
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(step_runner.subprocess, "run", fake_run)
    monkeypatch.setattr(step_runner, "pallava_main", lambda args: in_process.append(args) or 0)
    runner = quickstart.Quickstart(quickstart.QuickstartSettings(out=tmp_path, processes=2, progress=False))
    runner.run_command("plip", "train", "--data", "x.jsonl", "cpu_threads=2")
    runner.run_command("train", "--stage", "align", "--config", "recipe.yaml")
    runner.run_command("train", "--stage", "instruct", "--config", "recipe.yaml")
    runner.run_command("data", "build", "--kind", "vqa")
    runner.run_command("train", "--stage", "slide", "--config", "slide.yaml")
    assert [args[:3] for args in in_process] == [
        ["plip", "train", "--data"],
        ["train", "--stage", "instruct"],
        ["data", "build", "--kind"],
        ["train", "--stage", "slide"],
    ]
    assert len(launched) == 1
    command, env = launched[0]
    assert command[command.index("--num_processes") + 1] == "2"
    assert command[command.index("pallava.cli") + 1 :][:3] == ["train", "--stage", "align"]
    assert env["OMP_NUM_THREADS"] == "1"
    monkeypatch.setattr(
        step_runner.subprocess, "run", lambda command, env: subprocess.CompletedProcess(command, 3)
    )
    with pytest.raises(RuntimeError, match="exit code 3"):
        runner.run_command("train", "--stage", "align")
    assert default_processes() in (1, 2, 4)
    with pytest.raises(ValueError, match="at least 1"):
        accelerate_command(["train"], 0)


def test_a_visible_gpu_keeps_training_in_one_process(monkeypatch):
    """CPU data parallelism is for machines without a GPU: with one, the single process trains on it."""
    import torch

    from pallava.train.launch import default_processes

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert default_processes() == 1
