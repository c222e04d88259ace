"""Training on real data through the CLI: the loss falls, only the chosen modules change, stages chain."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from pallava import PaLlavaForConditionalGeneration, load_preset
from pallava.cli import main
from pallava.inference import PaLlava
from pallava.train.feedback import read_jsonl

pytestmark = pytest.mark.slow  # end to end: `make test-fast` skips it, `make test` runs it

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "assistant-tiny.yaml"
SMALL = [
    "data.limit=24",
    "train.batch_size=4",
    "train.cpu_threads=1",
    "logging.num_samples=2",
    "logging.max_new_tokens=4",
    "logging.tensorboard=true",
]


def _train(stage: str, manifest: Path, out: Path, cache: Path, *extra: str) -> None:
    args = [
        "train",
        "--stage",
        stage,
        "--config",
        str(CONFIG),
        "--data",
        str(manifest),
        "--out",
        str(out),
        "--no-progress",
        *SMALL,
        f"feature_cache.dir={cache}",
        *extra,
    ]
    assert main(args) == 0


@pytest.fixture(scope="module")
def align_run(shared_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("train-loop")
    out = root / "align"
    _train(
        "align",
        shared_data / "lc25000-lung" / "manifest.csv",
        out,
        root / "cache",
        "train.max_steps=12",
        "trainable.llm=false",
        "optim.lr=5e-3",
        "optim.lr_lora=1e-2",
        "optim.warmup_ratio=0.1",
        "checkpoint.every=6",
        "logging.sample_every=6",
        "train.cpu_threads=auto",  # the ThreadGovernor (train/threads.py) in a real run
    )
    return out


def test_loss_falls_on_real_captions_and_the_run_leaves_its_records(align_run):
    metrics = read_jsonl(align_run / "metrics.jsonl")
    assert [r["step"] for r in metrics] == list(range(1, 13))
    losses = [r["loss"] for r in metrics]
    assert all(torch.isfinite(torch.tensor(losses)))
    # The tiny LLM is random and frozen here (its fixed lm_head bounds the logits), so the loss can only
    # fall a little below log(vocabulary) = 8.32; a clear fall still shows the connector and LoRA learning.
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.25
    # Per-module learning rates: LoRA at twice the connector's rate throughout warm-up and decay.
    for record in metrics[1:]:
        assert record["lr"]["lora"] == pytest.approx(2 * record["lr"]["connector"])
    # Linear warm-up over ceil(10% of 12) = 2 steps, then the peak, then cosine decay.
    assert [r["lr"]["connector"] for r in metrics[:3]] == pytest.approx([0.0, 2.5e-3, 5e-3])
    assert metrics[-1]["lr"]["connector"] < metrics[5]["lr"]["connector"]  # cosine decay
    samples = read_jsonl(align_run / "samples.jsonl")
    assert sorted({s["step"] for s in samples}) == [6, 12] and len(samples) == 4
    assert all(s["reference"] and "answer" in s for s in samples)
    assert list((align_run / "tensorboard").glob("events.out.tfevents.*"))
    assert (align_run / "loss_curve.png").stat().st_size > 0
    assert [p.name for p in (align_run / "checkpoints").iterdir()] == ["ckpt-0000006"]
    history = json.loads((align_run / "training_history.json").read_text())
    assert [h["stage"] for h in history] == ["align"] and history[0]["samples"] == 24
    if (os.cpu_count() or 1) > 1:  # cpu_threads: auto probes all cores, then one thread, then keeps one
        threads = [r["threads"] for r in metrics]
        assert threads[:6] == [os.cpu_count()] * 3 + [1] * 3 and set(threads) <= {os.cpu_count(), 1}, threads


def test_only_connector_and_lora_weights_change_when_the_rest_is_frozen(align_run):
    trained = PaLlavaForConditionalGeneration.from_pretrained(align_run).state_dict()
    initial = load_preset("tiny", seed=0)[0].state_dict()
    assert trained.keys() == initial.keys()
    changed = {name for name in trained if not torch.equal(trained[name], initial[name])}
    assert any(name.startswith("connector.") for name in changed)
    assert any("lora_B" in name for name in changed)
    assert all(name.startswith("connector.") or "lora_" in name for name in changed), sorted(changed)[:5]


def test_instruct_starts_from_align_and_exports_with_a_model_card(align_run, shared_data, tmp_path):
    out = tmp_path / "instruct"
    _train(
        "instruct",
        shared_data / "lc25000-lung" / "manifest.csv",
        out,
        align_run.parent / "cache",
        f"model.init={align_run}",
        "train.max_steps=3",
        "trainable.llm_modules=[lm_head]",
        "optim.lr_lora=2e-4",
        "optim.lr_connector=1e-4",
        "data.answer_types=[closed,open]",
    )
    history = json.loads((out / "training_history.json").read_text())
    assert [h["stage"] for h in history] == ["align", "instruct"]
    first = read_jsonl(out / "metrics.jsonl")[1]["lr"]
    assert set(first) == {"connector", "lora", "llm"}  # lm_head trains in its own group at the base lr
    assert first["lora"] == pytest.approx(2 * first["connector"])

    report = tmp_path / "report.json"
    report.write_text(
        json.dumps(
            {
                "task": "vqa",
                "scorer": "strict",
                "data": "dev.csv",
                "split": "dev",
                "closed": {"n": 240, "accuracy": 0.9125},
                "open": {"n": 120, "accuracy": 0.85},
            }
        )
    )
    exported = tmp_path / "export"
    assert (
        main(
            [
                "export",
                "--model",
                str(out),
                "--out",
                str(exported),
                "--merge-lora",
                "--eval-report",
                str(report),
            ]
        )
        == 0
    )
    card = (exported / "README.md").read_text()
    for text in (
        "Base models",
        "Stage `align`",
        "Stage `instruct`",
        "split `train`",
        "closed: accuracy 0.9125",
        "LoRA: merged",
        "learning rates",
        "precision fp32",
        "random initialisation",
    ):
        assert text in card, text
    answer = PaLlava.from_pretrained(exported).ask(
        shared_data / "lc25000-lung" / "images" / "lung_n" / "lungn100.jpeg",
        "What is the diagnosis?",
        max_new_tokens=3,
    )
    assert isinstance(answer, str)
    assert main(["export", "--model", str(out), "--out", str(exported)]) == 1  # refuses a non-empty folder


def test_gradient_checkpointing_gives_the_same_losses(shared_data, tmp_path):
    manifest = shared_data / "lc25000-lung" / "manifest.csv"
    losses = {}
    for flag in ("false", "true"):
        _train(
            "align",
            manifest,
            tmp_path / flag,
            tmp_path / "cache",
            "data.limit=8",
            "train.max_steps=2",
            "optim.warmup_ratio=0",
            "logging.num_samples=0",
            "logging.tensorboard=false",
            "checkpoint.every=0",
            f"train.gradient_checkpointing={flag}",
        )
        losses[flag] = [r["loss"] for r in read_jsonl(tmp_path / flag / "metrics.jsonl")]
    assert losses["true"] == pytest.approx(losses["false"], rel=1e-5)


@pytest.mark.parametrize("policy", ["truncate", "drop"])
def test_an_overlong_sample_never_stops_a_run(shared_data, tmp_path, capsys, policy):
    # One sample far over max_length (2,048 tokens) among short ones, drawn in every epoch; the question of
    # another is over the limit by itself (it is also a candidate fixed sample, asked at the end of the run).
    tiles = sorted((shared_data / "lc25000-lung" / "images" / "lung_n").iterdir())[:8]
    records = [
        {
            "id": f"s{i}",
            "image": str(tile),
            "conversations": [
                {"from": "human", "value": "<image>\nWhat is shown?"},
                {"from": "gpt", "value": "benign lung tissue"},
            ],
        }
        for i, tile in enumerate(tiles)
    ]
    records[3]["conversations"][1]["value"] = " ".join(["tissue"] * 3000)
    records[5]["conversations"][0]["value"] = "<image>\n" + " ".join(["describe"] * 3000)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / policy
    _train(
        "align",
        data,
        out,
        tmp_path / "cache",
        "data.limit=null",
        "train.epochs=3",
        "logging.num_samples=8",
        "checkpoint.every=0",
        "logging.tensorboard=false",
        f"data.overlong={policy}",
    )
    summary = json.loads((out / "run_summary.json").read_text())
    metrics = read_jsonl(out / "metrics.jsonl")
    log = capsys.readouterr().out
    left_out = {5} if policy == "truncate" else {3, 5}  # a question over the limit cannot be asked
    assert [h["id"] for h in read_jsonl(out / "samples.jsonl")] == [
        f"s{i}" for i in range(8) if i not in left_out
    ]
    if policy == "truncate":
        assert summary["samples"] == 8 and len(metrics) == 6  # 3 epochs x 2 steps of batch 4
        assert summary["overlong"] == {"policy": "truncate", "truncated": 6}  # 2 samples in each of 3 epochs
        assert sum(r.get("truncated", 0) for r in metrics) == 6
        assert log.count("over-long sample(s) cut to the processor's max_length") == 1
    else:
        assert summary["samples"] == 6 and len(metrics) == 3  # 6 samples: one step of 4 per epoch
        assert summary["overlong"] == {"policy": "drop", "dropped": 2, "dropped_ids": ["s3", "s5"]}
        assert "left out 2 of 8 samples over 2048 tokens: s3, s5" in log
        assert not any("truncated" in r for r in metrics)
