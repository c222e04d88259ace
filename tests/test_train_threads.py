"""Training's CPU thread settings: one helper, applied by PLIP pre-training as by the assistant's trainer."""

from __future__ import annotations

import pytest
import torch

from pallava.train import plip as plip_training
from pallava.train.plip_config import PlipTrainConfig
from pallava.train.threads import apply_cpu_threads


@pytest.fixture(autouse=True)
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_cpu_threads_are_set_on_a_cpu_and_left_alone_otherwise(monkeypatch):
    torch.set_num_threads(2)
    assert apply_cpu_threads(None)["threads"] == 2  # null: torch's default stays
    assert apply_cpu_threads(1, "cuda")["threads"] == 2  # a GPU run: the CPU only feeds it
    assert apply_cpu_threads(1, torch.device("cpu"))["threads"] == 1 == torch.get_num_threads()
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    assert apply_cpu_threads(1)["OMP_WAIT_POLICY"] == "PASSIVE"  # reported with the run's settings
    with pytest.raises(ValueError, match="cpu_threads must be at least 1"):
        apply_cpu_threads(0)


def test_plip_recipes_carry_cpu_threads_and_validate_them(tmp_path):
    assert PlipTrainConfig.for_preset("tiny").cpu_threads == 1
    assert PlipTrainConfig.for_preset("tiny", cpu_threads=2).cpu_threads == 2
    recipe = tmp_path / "plip.yaml"
    recipe.write_text("preset: tiny\ncpu_threads: 0\n")
    with pytest.raises(ValueError, match=r"plip\.yaml: cpu_threads must be at least 1 or null, got 0"):
        PlipTrainConfig.from_yaml(recipe)


class _Stop(Exception):
    pass


def test_plip_training_applies_the_recipes_cpu_threads_before_reading_data(monkeypatch, tmp_path):
    seen = []

    def stop(*args, **kwargs):
        seen.append(torch.get_num_threads())
        raise _Stop

    monkeypatch.setattr(plip_training, "read_plip_data", stop)
    torch.set_num_threads(2)
    with pytest.raises(_Stop):
        plip_training.train_plip(
            "unused.csv",
            tmp_path / "out",
            PlipTrainConfig.for_preset("tiny", cpu_threads=1),
            show_progress=False,
        )
    assert seen == [1]


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ({}, "PASSIVE"),  # pallava's default: waiting threads sleep instead of spinning
        ({"OMP_WAIT_POLICY": "ACTIVE"}, "ACTIVE"),  # a user's choice is kept
        ({"GOMP_SPINCOUNT": "300000"}, None),  # so is a spin count (OpenMP's own default then applies)
    ],
)
def test_importing_pallava_sets_a_passive_openmp_wait_unless_the_user_chose(given, expected):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    code = "import os, pallava, torch; print(os.environ.get('OMP_WAIT_POLICY'))"
    out = subprocess.run(
        [sys.executable, "-c", code], env={**env, **given}, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip().splitlines()[-1] == str(expected)
