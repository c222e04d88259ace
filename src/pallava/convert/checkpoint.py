"""Safe reading of foreign checkpoints: a state-dict file, a safetensors file, or a DeepSpeed folder.

Every pickle goes through `torch.load(..., weights_only=True)`. Training frameworks store objects of
their own beside the weights (mmengine's message hub, numpy scalars, scheduler states); torch refuses
those under `weights_only`. Rather than trust them, each such class or function is replaced by an
inert placeholder that only records its arguments: nothing named in the file runs, and the tensors load.
A file that cannot be read (empty, cut short, damaged, still compressed) is a one-line ValueError naming it.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

DEEPSPEED_STATES = "mp_rank_00_model_states.pt"
STATE_KEYS = ("module", "state_dict", "model")  # where wrappers (DeepSpeed, mmengine, plain) keep the weights
# Leading bytes of archives people download weights in: a checkpoint must be unpacked before conversion.
PACKED = (
    (b"\x1f\x8b", "gzip-compressed"),
    (b"BZh", "bzip2-compressed"),
    (b"\xfd7zXZ\x00", "xz-compressed"),
    (b"\x28\xb5\x2f\xfd", "zstd-compressed"),
    (b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive"),
    (b"Rar!", "a RAR archive"),
)


def first_line(error: BaseException | str) -> str:
    """The first non-empty line of an error message (library errors run to paragraphs)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def _check_file(path: Path) -> None:
    """Refuse an empty file or a still-packed archive before a loader gives a confusing error."""
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: empty file (0 bytes); expected a checkpoint")
    with path.open("rb") as handle:
        head = handle.read(512)
    for magic, what in PACKED:
        if head.startswith(magic):
            raise ValueError(f"{path}: {what}; decompress or unpack it first and pass the checkpoint inside")
    if head[257:262] == b"ustar":
        raise ValueError(f"{path}: a tar archive; unpack it first (tar -xf) and pass the checkpoint inside")


def _unpickling_failure(path: Path, error: Exception) -> ValueError:
    text = str(error)
    reason = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\n|$)", text, re.S)  # torch's paragraph hides it
    reason = first_line(reason.group(1) if reason else text)
    if "Unsupported global" in reason:
        return ValueError(f"{path}: cannot be read safely (weights_only): {reason}")
    return ValueError(f"{path}: not a readable PyTorch checkpoint (corrupt, or another format: {reason})")


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
    _check_file(path)
    is_zip = zipfile.is_zipfile(path)
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
        except pickle.UnpicklingError as error:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(path) if is_zip else []
            if not names:
                raise _unpickling_failure(path, error) from None
        with torch.serialization.safe_globals(_placeholders(names)):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as error:
        raise _unpickling_failure(path, error) from None
    except (RuntimeError, EOFError, OSError) as error:  # a zip cut short or damaged, a pickle cut short
        reason = first_line(error)
        raise ValueError(
            f"{path}: not a readable PyTorch checkpoint (truncated or corrupt: {reason})"
        ) from None


def deepspeed_states_file(folder: Path) -> Path:
    """The model-states file of a DeepSpeed checkpoint folder: `<folder>/mp_rank_00_model_states.pt`
    (the folder is the tag, as xtuner saves `iter_N.pth/`) or `<folder>/<tag>/...` with `tag` read from
    `<folder>/latest`."""
    if (folder / DEEPSPEED_STATES).is_file():
        tag_folder = folder
    elif (folder / "latest").is_file():
        tag = (folder / "latest").read_text(encoding="utf-8", errors="backslashreplace").strip()
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
        _check_file(source)
        try:
            return load_file(source)
        except (SafetensorError, OSError) as error:
            reason = first_line(error)
            raise ValueError(
                f"{source}: not a readable safetensors file (truncated or corrupt: {reason})"
            ) from None
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


def check_weights(tensors: Mapping[str, torch.Tensor], source: str) -> None:
    """Refuse tensors that cannot be weights: integer or boolean dtypes, NaN or infinite values (names
    them)."""

    def some(names: list[str]) -> str:
        return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")

    not_float = [
        f"{key} ({tensor.dtype})" for key, tensor in tensors.items() if not tensor.is_floating_point()
    ]
    if not_float:
        raise ValueError(
            f"{source}: {len(not_float)} tensor(s) where weights belong are not floating point: "
            f"{some(not_float)}"
        )
    non_finite = [key for key, tensor in tensors.items() if not bool(torch.isfinite(tensor).all())]
    if non_finite:
        raise ValueError(
            f"{source}: {len(non_finite)} tensor(s) hold NaN or infinite values: {some(non_finite)}"
        )
