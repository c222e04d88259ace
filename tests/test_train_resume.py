"""Exact resume: a run killed with SIGKILL and resumed reproduces the uninterrupted run's losses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pallava.train import checkpoints
from pallava.train.config import load_recipe
from pallava.train.feedback import read_jsonl
from pallava.train.trainer import train

pytestmark = pytest.mark.slow  # end to end: `make test-fast` skips it, `make test` runs it

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "assistant-tiny.yaml"
KILL_AT = 5


def _overrides(manifest: Path, cache: Path) -> list[str]:
    # 10 samples at batch 2 = 5 steps per epoch: the run crosses an epoch boundary after the kill.
    return [
        f"data.path={manifest}",
        "data.limit=10",
        "train.batch_size=2",
        "train.max_steps=8",
        "train.cpu_threads=1",
        "optim.lr=3e-3",
        "checkpoint.every=2",
        "checkpoint.keep_last=2",
        "logging.tensorboard=false",
        "logging.num_samples=0",
        f"feature_cache.dir={cache}",
    ]


def test_sigkill_and_resume_reproduce_the_uninterrupted_losses(shared_data, tmp_path):
    manifest = shared_data / "lc25000-lung" / "manifest.csv"
    overrides = _overrides(manifest, tmp_path / "cache")
    reference = train(load_recipe(CONFIG, "align", overrides), tmp_path / "reference", progress=False)

    killed = tmp_path / "killed"
    script = textwrap.dedent(f"""
        import os, signal
        from pallava.train.config import load_recipe
        from pallava.train.trainer import train

        def kill(trainer, record):
            if record["step"] == {KILL_AT}:
                os.kill(os.getpid(), signal.SIGKILL)

        train(load_recipe({str(CONFIG)!r}, "align", {overrides!r}), {str(killed)!r}, progress=False,
        callbacks=[kill])
    """)
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    assert not (killed / "config.json").exists()
    assert [step for step, _ in checkpoints.list_complete(killed / "checkpoints")] == [2, 4]
    assert [r["step"] for r in read_jsonl(killed / "metrics.jsonl")] == list(range(1, KILL_AT + 1))
    # Debris of a later checkpoint cut short, and a folder with the final name but no marker: never used.
    (killed / "checkpoints" / "ckpt-0000006.tmp").mkdir()
    (killed / "checkpoints" / "ckpt-0000006.tmp" / "optimizer.bin").write_bytes(b"half written")
    (killed / "checkpoints" / "ckpt-0000008").mkdir()

    train(load_recipe(CONFIG, "align", overrides), killed, progress=False)
    expected = read_jsonl(reference / "metrics.jsonl")
    resumed = read_jsonl(killed / "metrics.jsonl")
    assert [r["step"] for r in resumed] == list(range(1, 9))
    for want, got in zip(expected, resumed, strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5, abs=1e-6), got["step"]
        assert got["lr"] == pytest.approx(want["lr"])
        assert got["epoch"] == want["epoch"]
    assert not (killed / "checkpoints" / "ckpt-0000006.tmp").exists()
    history = json.loads((killed / "training_history.json").read_text())
    assert history[0]["timings_s"]["steps_run"] == 8 - 4


def test_resume_refuses_a_changed_recipe_and_never_starts_over(shared_data, tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints" / "ckpt-0000002").mkdir(parents=True)
    (out / "checkpoints" / "ckpt-0000002" / checkpoints.COMPLETE_MARKER).write_text("complete\n")
    recipe = load_recipe(
        CONFIG,
        "align",
        [
            f"data.path={shared_data / 'lc25000-lung' / 'manifest.csv'}",
            "data.limit=2",
            "train.batch_size=2",
            "train.max_steps=1",
            "checkpoint.every=0",
            "logging.num_samples=0",
            f"feature_cache.dir={tmp_path / 'cache'}",
        ],
    )
    changed = recipe.to_dict()
    changed["optim"]["lr"] = 0.5
    import yaml

    (out / "recipe.yaml").write_text(yaml.safe_dump(changed))
    with pytest.raises(ValueError, match=r"cannot resume, the recipe changed in \['optim.lr'\]"):
        train(recipe, out, progress=False)
    # Starting over instead removes the old checkpoints, so they cannot be resumed by mistake later.
    train(recipe, out, resume=False, progress=False)
    assert checkpoints.latest_complete(out / "checkpoints") is None
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1]
