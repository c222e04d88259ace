"""Training's CPU thread settings: one helper, applied by PLIP pre-training as by the assistant's trainer."""

from __future__ import annotations

import pytest
import torch

from pallava.train import plip as plip_training
from pallava.train.plip_config import PlipTrainConfig
from pallava.train.threads import ThreadGovernor, apply_cpu_threads, encoding_threads, thread_governor


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


def test_encoding_takes_this_processs_share_of_the_cores_then_gives_it_back(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 4)
    torch.set_num_threads(1)
    with encoding_threads("cpu", processes=2) as threads:
        assert threads == 2 == torch.get_num_threads()
    assert torch.get_num_threads() == 1
    with pytest.raises(RuntimeError), encoding_threads("cpu", processes=1):
        assert torch.get_num_threads() == 4
        raise RuntimeError("encoding failed")
    assert torch.get_num_threads() == 1  # restored after an error too
    with encoding_threads("cuda", processes=1) as threads:
        assert threads == 1 == torch.get_num_threads()  # a GPU encodes: the CPU count stays


def test_plip_recipes_carry_cpu_threads_and_validate_them(tmp_path):
    assert PlipTrainConfig.for_preset("tiny").cpu_threads == "auto"
    assert PlipTrainConfig.for_preset("tiny", cpu_threads=2).cpu_threads == 2
    recipe = tmp_path / "plip.yaml"
    recipe.write_text("preset: tiny\ncpu_threads: 0\n")
    with pytest.raises(ValueError, match=r"plip\.yaml: cpu_threads must be at least 1, 'auto' or null"):
        PlipTrainConfig.from_yaml(recipe)
    recipe.write_text("preset: tiny\ncpu_threads: many\n")
    with pytest.raises(ValueError, match=r"plip\.yaml: cpu_threads .* got 'many'"):
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
    ("argv", "given", "expected"),
    [
        ("serve", {}, "PASSIVE None"),  # pallava's default: waiting threads sleep instead of spinning
        ("train --stage align", {}, "None 300000"),  # training spins; its governor handles a busy machine
        ("train", {"OMP_WAIT_POLICY": "PASSIVE"}, "PASSIVE None"),  # a user's choice is kept
        ("serve", {"GOMP_SPINCOUNT": "1000"}, "None 1000"),  # so is a spin count
    ],
)
def test_importing_pallava_chooses_the_openmp_wait_by_command_unless_the_user_chose(argv, given, expected):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    code = (
        f"import os, sys; sys.argv = ['pallava', *{argv.split()!r}]; import pallava, torch; "
        "print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env={**env, **given}, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip().splitlines()[-1] == expected


def test_training_commands_are_told_apart_from_the_rest():
    from pallava import _training_command

    for argv in ("train --stage align", "plip train --data x", "quickstart --out x", "quickstart"):
        assert _training_command(argv.split()), argv
    for argv in ("serve", "plip zero-shot", "eval suite", "slide map", "", "data build --kind stage1"):
        assert not _training_command(argv.split()), argv


class _Threads:
    """Records the governor's thread counts; step times come from a table of seconds per count."""

    def __init__(self):
        self.set: list[int] = []

    def __call__(self, count: int) -> None:
        self.set.append(count)


def _run(governor: ThreadGovernor, seconds_for, steps: int) -> list[int]:
    used = []
    for step in range(steps):
        used.append(governor.threads)
        governor.step_done(seconds_for(step, governor.threads))
    return used


def test_the_governor_keeps_the_faster_thread_count_after_probing_both():
    threads = _Threads()
    governor = ThreadGovernor([2, 1], probe_steps=3, recheck_every=1000, set_threads=threads)
    idle = {2: 0.20, 1: 0.34}  # the idle machine: two threads are faster
    used = _run(governor, lambda step, n: idle[n], 20)
    assert used[:6] == [2, 2, 2, 1, 1, 1]  # the probe: three steps at each count
    assert set(used[6:]) == {2} and governor.choices == [(6, 2)]
    assert threads.set[-1] == 2 == governor.threads

    busy = {2: 0.60, 1: 0.33}  # another job takes a core: two threads slow 3x, one barely
    used = _run(governor, lambda step, n: busy[n], 20)
    # Once the median of the last three steps is slow (the second slow step: 0.60 > 1.5 x 0.20) a probe
    # starts, and now keeps one thread.
    assert used[:2] == [2, 2] and used[2:8] == [2, 2, 2, 1, 1, 1] and set(used[8:]) == {1}
    assert governor.choices[-1] == (28, 1)


def test_the_governor_rechecks_on_schedule_and_returns_to_all_cores_when_the_machine_is_idle_again():
    governor = ThreadGovernor([2, 1], probe_steps=2, recheck_every=10, set_threads=_Threads())
    busy = {2: 0.60, 1: 0.33}
    _run(governor, lambda step, n: busy[n], 8)
    assert governor.threads == 1
    idle = {2: 0.20, 1: 0.34}  # one thread does not get slower when the job ends: only the schedule finds it
    used = _run(governor, lambda step, n: idle[n], 20)
    assert used[:6] == [1] * 6 and used[6:10] == [2, 2, 1, 1] and set(used[10:]) == {2}
    assert [count for _, count in governor.choices] == [1, 2]


def test_the_median_of_a_probe_ignores_one_slow_step():
    governor = ThreadGovernor([2, 1], probe_steps=3, recheck_every=1000, set_threads=_Threads())
    times = iter([5.0, 0.2, 0.2, 0.3, 0.3, 0.3])  # the first step of a run is slow (warm-up)
    _run(governor, lambda step, n: next(times), 6)
    assert governor.threads == 2


def test_thread_governor_only_for_auto_on_a_cpu_with_cores_to_share(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 4)
    assert thread_governor(1) is None and thread_governor(None) is None
    assert thread_governor("auto", "cuda") is None
    assert thread_governor("auto").candidates == [4, 1]
    assert thread_governor("auto", processes=2).candidates == [2, 1]
    assert thread_governor("auto", processes=4) is None  # each process's share is one thread anyway
    assert apply_cpu_threads("auto")["threads"] == "auto"
    with pytest.raises(ValueError, match="got 'two'"):
        apply_cpu_threads("two")
    with pytest.raises(ValueError, match="candidates"):
        ThreadGovernor([])
