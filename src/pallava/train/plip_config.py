"""PLIP pre-training recipes: the typed schema of `configs/plip-*.yaml`, read by the same loader as the
assistant's recipes (`train.config.build_config`: unknown, missing and ill-typed keys name the file).

A recipe file may set only what differs from its preset's shipped recipe (`configs/plip-<preset>.yaml`):
it is read over that file. The values live in `configs/` only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pallava.processing.augment import Augmentation
from pallava.processing.stain_norm import check_stain_normalize
from pallava.train.config import build_config, deep_merge, read_yaml_mapping, shipped_recipe
from pallava.train.threads import check_cpu_threads

MODEL_FIELDS = (
    "use_momentum",
    "momentum",
    "queue_size",
    "itm_weight",
    "itm_max_pairs",
    "image_pooling",
    "text_pooling",
)


@dataclass
class PlipTrainConfig:
    """A PLIP training recipe (see configs/plip-tiny.yaml for what each field does)."""

    preset: str
    epochs: float
    batch_size: int  # per process
    lr: float
    text_lr: float | None  # learning rate of a pre-trained text tower; None = lr
    backbone_lr: float | None  # of a pre-trained stem's trainable steps (vision.pretrained_stem_trainable)
    weight_decay: float
    warmup_ratio: float
    grad_clip: float
    text_init: str | None  # 'minilm', 'scratch' or a BERT folder; None = the preset's default
    text_layers: int | None  # keep only the first layers of the text tower
    vision_init: str | None  # CLIP folder or the authors' PLIP state dict
    vision: dict | None  # a from-scratch tower's shape: CLIPVisionConfig fields over the preset's
    freeze_text_embeddings: bool
    use_momentum: bool | None  # None = the preset's setting (so for the model fields below)
    momentum: float | None
    queue_size: int | None
    itm_weight: float | None
    itm_max_pairs: int | None
    image_pooling: str | None
    text_pooling: str | None
    mixed_precision: str  # 'no', 'bf16' or 'bf16-if-native' (train.loop.resolve_mixed_precision)
    num_workers: int
    backbone_in_loader: bool  # a frozen backbone stem runs in the loader workers (CPU training only)
    cpu_threads: int | str | None  # torch threads per process on a CPU: N, auto or None (train/threads.py)
    cache_images: bool
    augment: dict | None  # processing.augment.Augmentation fields (stain, zoom, ...); None = defaults
    stain_normalize: str | None  # e.g. macenko: train on normalised images, recorded so inference does too
    balance: str | None  # several datasets: sqrt (default) | equal | proportional | none
    seed: int
    max_steps: int | None
    save_every: int  # steps between checkpoints; 0 = once per epoch
    keep_checkpoints: int
    eval_every: int  # steps between zero-shot evaluations on the eval split; 0 = at the end only
    log_every: int

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides) -> PlipTrainConfig:
        """Read a recipe over its preset's shipped one; non-None `overrides` (the CLI flags) win."""
        data = read_yaml_mapping(path)
        given = {k: v for k, v in overrides.items() if v is not None}
        preset = given.get("preset", data.get("preset", "tiny"))
        base = read_yaml_mapping(shipped_recipe(f"plip-{preset}")) if isinstance(preset, str) else {}
        # Mappings merge key by key: `vision.patch_size=16` keeps the shipped recipe's other vision fields.
        config = build_config(cls, deep_merge(deep_merge(base, data), given), str(path))
        config.validate(str(path))
        return config

    @classmethod
    def for_preset(cls, preset: str, **overrides) -> PlipTrainConfig:
        """The shipped recipe of a preset, `configs/plip-<preset>.yaml`, with overrides applied."""
        return cls.from_yaml(shipped_recipe(f"plip-{preset}"), **overrides)

    def validate(self, source: str) -> None:
        if self.mixed_precision not in ("no", "bf16", "bf16-if-native"):
            raise ValueError(
                f"{source}: mixed_precision must be 'no', 'bf16' or 'bf16-if-native', "
                f"got {self.mixed_precision!r}"
            )
        check_cpu_threads(self.cpu_threads, source)
        check_stain_normalize(self.stain_normalize, f"{source}: stain_normalize")
        Augmentation.from_dict(self.augment, source=f"{source} 'augment'")  # as the assistant's augment.image
        if self.stain_normalize and (self.augment or {}).get("stain_mix"):
            raise ValueError(
                f"{source}: augment.stain_mix re-stains views with each dataset's own stain, but with "
                f"stain_normalize every image has the reference stain: turn one of them off"
            )
        if self.keep_checkpoints < 1:
            raise ValueError(f"{source}: keep_checkpoints must be at least 1, got {self.keep_checkpoints}")

    def model_overrides(self) -> dict[str, object]:
        return {name: getattr(self, name) for name in MODEL_FIELDS if getattr(self, name) is not None}
