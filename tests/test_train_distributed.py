"""Two processes under `accelerate launch` on CPU give the single process's losses on the same global
batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pallava.train.config import load_recipe
from pallava.train.feedback import read_jsonl
from pallava.train.launch import free_port
from pallava.train.trainer import train

pytestmark = pytest.mark.slow  # end to end: `make test-fast` skips it, `make test` runs it

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "assistant-tiny.yaml"
ACCELERATE_CONFIG = CONFIG.parent / "accelerate" / "cpu-2proc.yaml"
STEPS = 3


def _overrides(manifest: Path, cache: Path, batch_size: int) -> list[str]:
    return [
        f"data.path={manifest}",
        "data.limit=12",
        f"train.batch_size={batch_size}",
        f"train.max_steps={STEPS}",
        "train.cpu_threads=1",
        "optim.lr=3e-3",
        "optim.warmup_ratio=0",
        "checkpoint.every=2",
        "logging.tensorboard=false",
        "logging.num_samples=0",
        f"feature_cache.dir={cache}",
    ]


def _launch(out: Path, overrides: list[str]) -> subprocess.CompletedProcess:
    """`pallava train --stage align` in two processes under `accelerate launch`, one thread each."""
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ACCELERATE_CONFIG),
        "--main_process_port",
        str(free_port()),
        "-m",
        "pallava.cli",
        "train",
        "--stage",
        "align",
        "--config",
        str(CONFIG),
        "--out",
        str(out),
        "--no-progress",
        *overrides,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    except subprocess.TimeoutExpired as error:  # a hung worker: show what the two processes said
        stdout, stderr = (
            out.decode(errors="replace") if isinstance(out, bytes) else out or ""  # partial output is bytes
            for out in (error.output, error.stderr)
        )
        pytest.fail(
            f"accelerate launch did not finish in {error.timeout:.0f} s\nstdout:\n{stdout}\nstderr:\n{stderr}"
        )


def test_two_process_accelerate_launch_matches_one_process(shared_data, tmp_path):
    manifest = shared_data / "lc25000-lung" / "manifest.csv"
    single = train(
        load_recipe(CONFIG, "align", _overrides(manifest, tmp_path / "cache-1", 4)),
        tmp_path / "single",
        progress=False,
    )

    double = tmp_path / "double"
    result = _launch(double, _overrides(manifest, tmp_path / "cache-2", 2))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "global batch 4" in result.stdout

    one, two = read_jsonl(single / "metrics.jsonl"), read_jsonl(double / "metrics.jsonl")
    assert [r["step"] for r in two] == list(range(1, STEPS + 1))
    for a, b in zip(one, two, strict=True):
        assert b["tokens"] == a["tokens"]  # the same samples in every global batch
        assert b["samples_per_s"] > 0
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), b["step"]
    # The feature cache was filled by both processes (each encoded its share) and read by both.
    assert len(list((tmp_path / "cache-2").rglob("features-r1-*.safetensors"))) == 1
    # The same trained weights, and a checkpoint holding one RNG state per process.
    ckpt = double / "checkpoints" / "ckpt-0000002"
    assert sorted(p.name for p in ckpt.glob("random_states_*.pkl")) == [
        "random_states_0.pkl",
        "random_states_1.pkl",
    ]
    # The all-reduce sums gradients in another order than one process does. Where a gradient is
    # near zero that rounding can change Adam's normalised step for that element, so a rare
    # element may differ by up to a few steps' size; every other element must agree closely.
    a = load_file(single / "model.safetensors")
    b = load_file(double / "model.safetensors")
    step_size = 3e-3  # optim.lr above
    for name in (n for n in a if n.startswith("connector.")):
        close = torch.isclose(b[name], a[name], rtol=1e-3, atol=1e-5)
        assert close.float().mean() > 0.999, name
        assert (b[name] - a[name]).abs().max() <= 2 * STEPS * step_size, name


def test_two_processes_train_the_vision_tower(shared_data, tmp_path):
    # Distributed training stops at its first step if a trainable parameter gets no gradient; a trainable
    # tower's post-LayerNorm and the layers above the feature layer never reach the loss.
    manifest = shared_data / "lc25000-lung" / "manifest.csv"
    out = tmp_path / "vision"
    settings = [o for o in _overrides(manifest, tmp_path / "cache", 2) if not o.startswith("feature_cache.")]
    result = _launch(
        out,
        [
            *settings,
            "train.max_steps=2",
            "trainable.vision=true",
            "optim.lr_vision=1e-4",
            "feature_cache.enabled=false",
        ],
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "trainable {'vision': " in result.stdout and "'vision': 0," not in result.stdout
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2]
