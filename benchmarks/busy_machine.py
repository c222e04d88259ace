"""Training on a busy machine: a fixed number of tiny PLIP and assistant steps, idle and next to one busy
process, for each thread setting; slowdown = busy time / idle time of the same steps.

    python -m benchmarks.busy_machine --json-out busy.json [--quick]

Each (setting, condition) runs in a fresh process, because OpenMP reads its wait policy when torch loads.
The competing process is a pure-Python busy loop pinned to no core, started before the worker and killed
after it. Step times are means over the fixed steps (the time those steps take), so the `auto` setting
pays for its governor's probes at the slower thread count.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

from benchmarks.common import load_average, median, run_worker, write_json

BUSY_LOOP = "while True: pass"


SPINNING = (("OMP_WAIT_POLICY", None), ("GOMP_SPINCOUNT", "300000"))  # what training commands get


@dataclass(frozen=True)
class Setting:
    """Torch threads (None: all cores; "auto": the ThreadGovernor) and extra environment of a process."""

    name: str
    threads: int | str | None
    env: tuple[tuple[str, str | None], ...] = ()  # None: removed from the environment


SETTINGS = (
    # The shipped training setting: `cpu_threads: auto` in the tiny recipes, and OpenMP's spinning wait
    # that `pallava train` / `pallava plip train` get (GNU libgomp's default: spin 300,000 times, then sleep).
    Setting("auto: governor, spinning wait (shipped)", "auto", SPINNING),
    Setting("1 thread", 1),
    Setting("all cores, passive wait", None),
    Setting("all cores, spinning wait", None, SPINNING),
)
SHIPPED = SETTINGS[0].name


@contextlib.contextmanager
def busy_process() -> Iterator[int]:
    """One competing process spinning in pure Python for as long as the block runs; yields its pid."""
    process = subprocess.Popen([sys.executable, "-c", BUSY_LOOP])
    try:
        yield process.pid
    finally:
        process.kill()
        process.wait()


@contextlib.contextmanager
def environment(extra: dict[str, str | None]) -> Iterator[None]:
    """Set (or, for None, remove) variables for the block: the worker processes inherit them."""
    saved = {name: os.environ.get(name) for name in extra}
    for name, value in extra.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def measure_steps(threads: int | str | None, steps: int, plip_batch: int, assistant_batch: int) -> dict:
    """In this process: the trainers' thread helpers, then mean seconds of tiny PLIP and assistant steps
    (with `auto`, each trainer has its own governor, fed every step's time as the training loop does)."""
    import torch

    from benchmarks.systems import REGIMES
    from benchmarks.training import assistant_steps, plip_step
    from pallava.train.threads import apply_cpu_threads, thread_governor

    threads = threads or os.cpu_count() or 1
    applied = apply_cpu_threads(threads, "cpu")
    governors = {}

    def hook(trainer: str):  # a fresh governor for each trainer, created (and probing) as it starts
        governor = governors[trainer] = thread_governor(threads, "cpu")
        return governor.step_done if governor is not None else None

    torch.manual_seed(0)
    tiny = REGIMES["tiny"]
    plip = plip_step(tiny, batch=plip_batch, steps=steps, progress=False, after_step=hook("plip"))
    assistant = assistant_steps(
        tiny,
        batch=assistant_batch,
        steps=steps,
        progress=False,
        variants=("pixels",),
        after_step=hook("assistant"),
    )
    return {
        "applied": applied,
        "plip_step_s": plip["mean_step_s"],
        "assistant_step_s": assistant["mean_step_s"]["pixels"],
        "governor_choices": {
            trainer: governor.choices for trainer, governor in governors.items() if governor is not None
        },
    }


def run(
    quick: bool = False,
    steps: int | None = None,
    settings: tuple[Setting, ...] = SETTINGS,
    plip_batch: int = 16,
    assistant_batch: int = 4,
    repeats: int | None = None,
) -> dict:
    """Every setting idle and busy, each run in its own process, `repeats` times; the slowdown per trainer.

    The idle and busy runs of a setting follow each other, in alternating order over the repeats, so a
    drift in the machine's other load lands on both; the medians over the repeats are compared.
    """
    steps = steps or (12 if quick else 40)
    repeats = repeats or (1 if quick else 2)
    result: dict = {
        "steps": steps,
        "repeats": repeats,
        "plip_batch": plip_batch,
        "assistant_batch": assistant_batch,
        "cores": os.cpu_count(),
        "competing_process": f"python -c {BUSY_LOOP!r}",
        "load_average_start": load_average(),
        "settings": {},
        "shipped": SHIPPED,
    }
    runs = {setting.name: {"idle": [], "busy": []} for setting in settings}
    for repeat in range(repeats):
        for setting in settings:
            args = ["--worker", "--steps", str(steps), "--plip-batch", str(plip_batch)]
            args += ["--assistant-batch", str(assistant_batch)]
            args += ["--threads", str(setting.threads)] if setting.threads else []
            with environment(dict(setting.env)):
                for condition in ("idle", "busy") if repeat % 2 == 0 else ("busy", "idle"):
                    print(
                        f"   {setting.name}: {condition} ({repeat + 1}/{repeats})",
                        file=sys.stderr,
                        flush=True,
                    )
                    with busy_process() if condition == "busy" else contextlib.nullcontext():
                        runs[setting.name][condition].append(run_worker("busy_machine", args))
    for setting in settings:
        entry: dict = {"threads": setting.threads or os.cpu_count(), "env": dict(setting.env)}
        for condition, measured in runs[setting.name].items():
            entry[condition] = {
                "applied": measured[0]["applied"],
                "governor_choices": [m["governor_choices"] for m in measured],
                **{
                    key: round(median([m[key] for m in measured]), 4)
                    for key in ("plip_step_s", "assistant_step_s")
                },
            }
        entry["slowdown"] = {
            trainer: round(entry["busy"][f"{trainer}_step_s"] / entry["idle"][f"{trainer}_step_s"], 3)
            for trainer in ("plip", "assistant")
        }
        result["settings"][setting.name] = entry
    result.update(summary(result))
    result["load_average_end"] = load_average()
    return result


def summary(result: dict) -> dict:
    """The shipped setting's worst slowdown, and its idle speed against the fastest setting's when idle."""
    measured = result["settings"]
    out: dict = {}
    if result["shipped"] in measured:
        shipped = measured[result["shipped"]]
        out["busy_machine_slowdown"] = max(shipped["slowdown"].values())
        out["idle_speed_vs_best"] = {
            trainer: round(
                min(entry["idle"][f"{trainer}_step_s"] for entry in measured.values())
                / shipped["idle"][f"{trainer}_step_s"],
                3,
            )
            for trainer in ("plip", "assistant")
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json-out", required=True)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--worker", action="store_true", help="(internal) time the steps in this process")
    parser.add_argument("--threads", type=lambda text: text if text == "auto" else int(text))
    parser.add_argument("--steps", type=int)
    parser.add_argument("--plip-batch", type=int, default=16)
    parser.add_argument("--assistant-batch", type=int, default=4)
    args = parser.parse_args(argv)
    if args.worker:
        data = measure_steps(args.threads, args.steps or 8, args.plip_batch, args.assistant_batch)
    else:
        data = run(quick=args.quick, steps=args.steps)
    write_json(args.json_out, data)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
