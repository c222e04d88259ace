"""Running the quickstart's steps: the project's own commands (in this process, or data-parallel under
`accelerate launch`), each step skipped on a re-run once its marker and outputs exist."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from pallava.cli import main as pallava_main
from pallava.files import changed_keys
from pallava.quickstart.settings import QuickstartSettings, StepResult
from pallava.train.launch import accelerate_command


class StepRunner:
    def __init__(self, settings: QuickstartSettings):
        self.s = settings
        self.out = settings.out.resolve()
        self.markers = self.out / ".quickstart"
        self.results: list[StepResult] = []

    # --- plumbing ----------------------------------------------------------------------------------
    def check_same_settings(self) -> None:
        """Refuse to continue a folder whose finished steps were made with other settings: skipping them
        would hand back models of another seed, data or recipe (say, a PLIP trained without the stain
        normalisation asked for now). Folders written before the record existed are taken as they are."""
        record = self.markers / "settings.json"
        settings = self.s.model_settings()
        if record.is_file():
            before = json.loads(record.read_text())
            changed = changed_keys(before, settings)
            if changed:
                raise RuntimeError(
                    f"{self.out} holds a quickstart run made with other settings (changed: "
                    f"{', '.join(changed)}); choose another --out or delete {self.out}"
                )
            return
        self.markers.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps(settings, indent=2))

    def run_command(self, *argv: str) -> None:
        args = [str(a) for a in argv]
        if (
            not self.s.progress
            and (args[0] in ("data", "train", "eval") or args[:2] == ["plip", "train"])
            and "--no-progress" not in args
        ):
            args.append("--no-progress")
        if self.s.processes > 1 and _data_parallel(args):
            self.launch(args)
            return
        print(f"\n$ pallava {shlex.join(args)}", flush=True)
        code = pallava_main(args)
        if code:
            raise RuntimeError(f"`pallava {shlex.join(args)}` failed with exit code {code}")

    def launch(self, args: list[str]) -> None:
        command = accelerate_command(args, self.s.processes)
        shown = shlex.join(["accelerate", "launch", *command[3:]])  # the same, as a user types it
        print(f"\n$ {shown}", flush=True)
        # One thread per process: the processes already fill the cores, and idle threads would spin.
        env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
        code = subprocess.run(command, env=env).returncode
        if code:
            raise RuntimeError(f"`{shown}` failed with exit code {code}")

    def step(self, name: str, outputs: list[Path], body: Callable[[], dict]) -> dict:
        marker = self.markers / f"{name}.json"
        if marker.is_file() and all(p.exists() for p in outputs):
            recorded = json.loads(marker.read_text())
            print(f"\n== {name}: already complete, skipped ({marker})")
            self.results.append(StepResult(name, recorded["seconds"], recorded["metrics"], skipped=True))
            return recorded["metrics"]
        print(f"\n== {name}", flush=True)
        start = time.perf_counter()
        metrics = body()
        seconds = time.perf_counter() - start
        missing = [str(p) for p in outputs if not p.exists()]
        if missing:
            raise RuntimeError(f"step {name} finished without its outputs: {missing}")
        self.markers.mkdir(parents=True, exist_ok=True)
        temporary = marker.with_suffix(".tmp")
        temporary.write_text(json.dumps({"seconds": seconds, "metrics": metrics}, indent=2))
        temporary.replace(marker)
        self.results.append(StepResult(name, seconds, metrics, skipped=False))
        return metrics


# Training commands that run data-parallel: stage align, whose small matrices do not pay for several threads.
# PLIP uses threads instead, and so does stage instruct: its steps read cached features only, and two
# processes exchange gradients and wait for each other at every step (300 steps: 28.8 s in one process
# against 32.5 s in two once, level once; the demo's stage 2 185-248 s against 259-324 s, docs/quickstart.md).
# Its feature cache, half of it made by stage align already, is slower in one process. The slide stage's
# batches are whole slides of different sizes: one process.
DATA_PARALLEL_STAGES = ("align",)


def _data_parallel(args: list[str]) -> bool:
    stage = args[args.index("--stage") + 1] if args[0] == "train" and "--stage" in args else None
    return stage in DATA_PARALLEL_STAGES
