"""Safe reading of foreign checkpoints: a state-dict file, a safetensors file, or a DeepSpeed folder.

Every pickle goes through `torch.load(..., weights_only=True)`. Training frameworks store objects of
their own beside the weights (mmengine's message hub, numpy scalars, scheduler states); torch refuses
those under `weights_only`. Rather than trust them, each such class or function is replaced by an
inert placeholder that only records its arguments: nothing named in the file runs, and the tensors load.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch
from safetensors.torch import load_file

DEEPSPEED_STATES = "mp_rank_00_model_states.pt"
STATE_KEYS = ("module", "state_dict", "model")  # where wrappers (DeepSpeed, mmengine, plain) keep the weights


class OpaqueObject:
    """Stands in for a class or function a checkpoint names; holds what the pickle passed, executes
    nothing."""

    def __new__(cls, *args, **kwargs):
        instance = object.__new__(cls)
        instance.args, instance.state = args, None
        return instance

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state) -> None:
        self.state = state


def _placeholders(names: list[str]) -> list[tuple[type, str]]:
    return [
        (type(name.rsplit(".", 1)[-1], (OpaqueObject,), {"qualified_name": name}), name) for name in names
    ]


def safe_torch_load(path: Path) -> object:
    """`torch.load(weights_only=True)` of `path`, with inert placeholders for non-tensor objects it names."""
    is_zip = zipfile.is_zipfile(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as error:
        if not is_zip:
            raise ValueError(f"{path}: cannot be read safely (weights_only): {error}") from error
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        if not names:
            raise ValueError(f"{path}: cannot be read safely (weights_only): {error}") from error
        with torch.serialization.safe_globals(_placeholders(names)):
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except pickle.UnpicklingError as second:
                raise ValueError(f"{path}: cannot be read safely (weights_only): {second}") from second


def deepspeed_states_file(folder: Path) -> Path:
    """The model-states file of a DeepSpeed checkpoint folder: `<folder>/mp_rank_00_model_states.pt`
    (the folder is the tag, as xtuner saves `iter_N.pth/`) or `<folder>/<tag>/...` with `tag` read from
    `<folder>/latest`."""
    if (folder / DEEPSPEED_STATES).is_file():
        tag_folder = folder
    elif (folder / "latest").is_file():
        tag = (folder / "latest").read_text(encoding="utf-8").strip()
        tag_folder = folder / tag
        if not (tag_folder / DEEPSPEED_STATES).is_file():
            raise ValueError(
                f"{folder / 'latest'} names tag {tag!r}, but {tag_folder / DEEPSPEED_STATES} is missing"
            )
    else:
        raise ValueError(
            f"{folder}: not a DeepSpeed checkpoint folder (no {DEEPSPEED_STATES} and no 'latest' file "
            "naming a tag)"
        )
    if (tag_folder / "mp_rank_01_model_states.pt").exists():
        raise ValueError(
            f"{tag_folder}: model-parallel checkpoints (several mp_rank_* files) are not supported"
        )
    return tag_folder / DEEPSPEED_STATES


def _tensor_dict(obj: object) -> dict[str, torch.Tensor] | None:
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return dict(obj)
    return None


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint, by name. Accepts a `.safetensors` file, a `torch.save` file holding a state
    dict (bare or under `module` / `state_dict` / `model`), or a DeepSpeed checkpoint folder."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"checkpoint not found: {path}")
    source = deepspeed_states_file(path) if path.is_dir() else path
    if source.suffix == ".safetensors":
        return load_file(source)
    loaded = safe_torch_load(source)
    state = _tensor_dict(loaded)
    if state is None and isinstance(loaded, dict):
        for key in STATE_KEYS:
            state = _tensor_dict(loaded.get(key))
            if state is not None:
                break
    if state is None:
        found = sorted(map(str, loaded)) if isinstance(loaded, dict) else type(loaded).__name__
        raise ValueError(
            f"{source}: expected a state dict of tensors (bare or under one of {', '.join(STATE_KEYS)}), "
            f"found {found}"
        )
    return state
