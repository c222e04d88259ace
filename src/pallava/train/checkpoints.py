"""Atomic checkpoint folders: written as `ckpt-NNNNNNN.tmp`, sealed by a marker file, then renamed.

A reader only ever sees complete checkpoints: `latest_complete` accepts a folder only when it has its
final name *and* holds the marker, which is written last. A run killed while writing leaves a `.tmp`
folder that is ignored and removed by `clean_partial` on the next start.

`prepare_run` is the one resume rule of every training app (`pallava train`, `pallava plip train`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from pallava.train.config import recipe_differences

if TYPE_CHECKING:
    from accelerate import Accelerator

CHECKPOINT_DIR = "checkpoints"  # under a run's output folder
RECIPE_FILE = "recipe.yaml"  # the resolved recipe a run was started with, beside its checkpoints
PREFIX = "ckpt-"
TMP_SUFFIX = ".tmp"
COMPLETE_MARKER = "COMPLETE"
STATE_FILE = "trainer_state.json"  # the trainers' own progress (step, epoch, ...) beside accelerate's state
_NAME = re.compile(rf"^{PREFIX}(\d+)$")


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:07d}"


def _fsync_dir(path: Path) -> None:
    """Make a rename or a new file in `path` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def list_complete(directory: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint in `directory`, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = _NAME.match(path.name)
        if match and path.is_dir() and (path / COMPLETE_MARKER).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_complete(directory: str | Path) -> Path | None:
    """The newest complete checkpoint, or None; temporary and unmarked folders are never returned."""
    complete = list_complete(directory)
    return complete[-1][1] if complete else None


def clean_partial(directory: str | Path) -> list[Path]:
    """Remove leftovers of interrupted writes (`*.tmp` folders); returns what was removed."""
    directory = Path(directory)
    removed = []
    if directory.is_dir():
        for path in directory.iterdir():
            if path.name.startswith(PREFIX) and path.name.endswith(TMP_SUFFIX):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


def begin(directory: str | Path, step: int) -> Path:
    """Create an empty temporary folder for the checkpoint of `step` and return it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / (checkpoint_name(step) + TMP_SUFFIX)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def commit(tmp: str | Path) -> Path:
    """Seal a temporary checkpoint: flush its files, write the marker, rename it to its final name."""
    tmp = Path(tmp)
    if not tmp.name.endswith(TMP_SUFFIX) or not tmp.is_dir():
        raise ValueError(f"{tmp}: not a temporary checkpoint folder (expected ...{TMP_SUFFIX})")
    for path in tmp.rglob("*"):
        if path.is_file():
            with path.open("rb+") as handle:
                os.fsync(handle.fileno())
    marker = tmp / COMPLETE_MARKER
    with marker.open("w") as handle:
        handle.write("complete\n")
        handle.flush()
        os.fsync(handle.fileno())
    _fsync_dir(tmp)
    final = tmp.with_name(tmp.name[: -len(TMP_SUFFIX)])
    if final.exists():  # the same step saved again after a resume: the new copy wins
        stale = final.with_name(final.name + ".old" + TMP_SUFFIX)
        os.replace(final, stale)
        os.replace(tmp, final)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(final.parent)
    return final


def prune(directory: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` complete checkpoints; returns the deleted paths."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be at least 1, got {keep_last}")
    complete = list_complete(directory)
    doomed = [path for _, path in complete[:-keep_last]]
    for path in doomed:
        # Unseal first so a crash mid-delete never leaves a marked but incomplete folder.
        (path / COMPLETE_MARKER).unlink(missing_ok=True)
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def save_training_state(
    accelerator: Accelerator,
    directory: str | Path,
    step: int,
    state: dict,
    keep_last: int,
    **save_options,
) -> Path:
    """Every process writes its part of accelerate's state into a temporary folder; the main process adds
    `state` (JSON, in `STATE_FILE`), seals the folder and prunes old ones. Collective: call on every
    process."""
    directory = Path(directory)
    tmp = directory / (checkpoint_name(step) + TMP_SUFFIX)
    if accelerator.is_main_process:
        begin(directory, step)
    accelerator.wait_for_everyone()  # the folder exists before anyone writes into it
    accelerator.save_state(str(tmp), **save_options)
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
    accelerator.wait_for_everyone()  # every process has written its shards
    if accelerator.is_main_process:
        commit(tmp)
        prune(directory, keep_last)
    accelerator.wait_for_everyone()
    return directory / checkpoint_name(step)


def prepare_run(
    accelerator: Accelerator,
    out_dir: str | Path,
    resume: bool,
    recipe: dict[str, Any],
    complete_saved: Callable[[dict[str, Any]], dict[str, Any]] = lambda saved: saved,
) -> Path | None:
    """Get a run's output folder ready; returns the checkpoint to continue from (None: from the start).

    With `resume` (the default, `--resume auto`) a re-run continues from the newest complete checkpoint
    and refuses a changed recipe (the saved one completed by `complete_saved`, e.g. with settings added since
    it was written); nothing is deleted. Only an explicit start-over (`--resume never`)
    removes the old checkpoints, so that they cannot be resumed by mistake later. Collective.
    """
    out_dir = Path(out_dir)
    directory, recipe_path = out_dir / CHECKPOINT_DIR, out_dir / RECIPE_FILE
    latest = latest_complete(directory) if resume else None
    if latest is not None and recipe_path.is_file():
        saved = complete_saved(yaml.safe_load(recipe_path.read_text(encoding="utf-8")) or {})
        changed = recipe_differences(saved, recipe)
        if changed:
            raise ValueError(
                f"{out_dir}: cannot resume, the recipe changed in {changed}; "
                "use the same recipe or another --out"
            )
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
        if not resume:
            shutil.rmtree(directory, ignore_errors=True)
        clean_partial(directory)
    accelerator.wait_for_everyone()
    return latest
