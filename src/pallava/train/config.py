"""Training recipes: YAML files with shared sections plus per-stage sections, and `key=value` overrides.

A recipe holds the sections below at the top level and, under `stages.align` / `stages.instruct`, the
values that differ per stage. The stage's values are merged over the shared ones, then command-line
overrides (`optim.lr=2e-4`) over both. Unknown keys and ill-typed values raise `ValueError` naming the
file and the key, so a typo never silently drops a setting.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pallava.processing.augment import Augmentation
from pallava.train.threads import check_cpu_threads

STAGES = ("align", "instruct", "slide")
OVERLONG_POLICIES = ("truncate", "drop")


@dataclass
class ModelSection:
    """Where the model comes from: a preset built fresh (stage align) or a saved model dir (`init`)."""

    preset: str = "tiny"
    init: str | None = None  # a model directory (stage instruct: the align output)
    vision_path: str | None = None  # a CLIP vision tower directory (an exported PLIP tower)
    llm_path: str | None = None  # a local causal-LM directory (the paper preset)
    seed: int = 0  # seed of the random initialisation
    overrides: dict = field(default_factory=dict)  # PaLlavaConfig fields, e.g. {lora: {r: 8}}


@dataclass
class DataSection:
    """Training data: LLaVA conversations (JSON/JSONL/Parquet shards) or a labelled manifest CSV."""

    path: str | list[str] | None = None  # several paths (or a YAML dataset list): one mixed training set
    format: str = "auto"  # auto | conversations | manifest
    split: str | None = None  # manifest split to use
    label_map: str | None = (
        None  # built-in name or file (manifests); default: the built-in covering the labels
    )
    image_root: str | None = None  # relative image paths resolve here (default: the data file's folder)
    answer_types: list[str] | None = None  # keep only these VQA answer types (closed, open, choice)
    limit: int | None = None  # a seeded random subset of this many samples
    type_weights: dict | None = None  # answer type -> weight in the `limit` subset (default 1 each)
    seed: int = 0  # seed of generated captions/questions and of the subset
    balance: str | None = (
        None  # several datasets: sqrt (default) | equal | proportional | none (data.datasets)
    )
    weights: dict | None = None  # dataset name -> sampling weight, replacing the balance mode's weight
    balance_labels: bool = False  # repeat each dataset's smaller classes up to its largest (meta.label)
    overlong: str = "truncate"  # samples over the processor's max_length: truncate (as the authors) | drop
    pack_questions: int = 1  # up to this many questions about one image in one row (train/packing.py)


@dataclass
class TrainableSection:
    """What trains; everything else is frozen."""

    vision: bool = False
    connector: bool = True
    lora: bool = True
    llm: bool = False  # all base weights of the language model
    llm_modules: list[str] = field(default_factory=list)  # LLM parameter-name parts to train anyway


@dataclass
class OptimSection:
    """AdamW with one learning rate per module group, linear warm-up then cosine decay."""

    lr: float = 1e-4
    lr_connector: float | None = None
    lr_lora: float | None = None
    lr_llm: float | None = None
    lr_vision: float | None = None
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of each group's peak
    max_grad_norm: float = 1.0


@dataclass
class RunSection:
    """Steps, batches, precision and threads."""

    epochs: int = 1
    max_steps: int | None = None  # stop after this many optimizer steps (overrides epochs)
    batch_size: int = 8  # per process
    grad_accum: int = 1
    mixed_precision: str = (
        "auto"  # auto (bf16 on GPUs that have it, else fp16; fp32 on CPU) | bf16-if-native | no | bf16 | fp16
    )
    gradient_checkpointing: bool = False
    seed: int = 0  # data order
    num_workers: int = 0
    cpu_threads: int | str | None = (
        None  # torch threads per process on CPU: N, auto or None (train/threads.py)
    )
    # How answer tokens are averaged: `token` (every answer token of the global batch counts the same: long
    # answers weigh more) or `sample` (each sample's mean over its own tokens, then the mean over samples:
    # a one-word yes/no counts as much as a sentence).
    loss_average: str = "token"
    # With `loss_average: sample`: a multiple-choice answer's option letter ("..., option C") counts as this
    # many tokens of its answer's mean (1: as any token; train/answer_weights.py says why).
    choice_letter_weight: float = 1.0


@dataclass
class FeatureCacheSection:
    """Frozen vision tower: compute crop features once, reuse them on every epoch (and the next stage)."""

    enabled: bool = False
    dir: str | None = None  # default: $PALLAVA_FEATURE_CACHE or ~/.cache/pallava/vision-features
    batch_size: int = 32
    shard_size: int = 1024
    dtype: str = "auto"  # auto (the tower's output dtype) | float32 | float16 | bfloat16


@dataclass
class CheckpointSection:
    every: int = 500  # optimizer steps between checkpoints (0: none)
    keep_last: int = 2


@dataclass
class LoggingSection:
    every: int = 10  # progress-bar refresh and TensorBoard scalars, in steps
    tensorboard: bool = True
    sample_every: int = 0  # answer the fixed sample questions every N steps (0: only at the end)
    num_samples: int = 4
    max_new_tokens: int = 32


@dataclass
class SlideSection:
    """Stage `slide`: the slide-level assistant trained on virtual slides (`data.path` = their folder)."""

    mpp: float = 0.5  # tiling of the slides (as `pallava slide map`)
    tile_size: int = 224
    min_tissue: float = 0.25
    chunk_tiles: int = 256  # tiles per cross-attention chunk (bounds memory)
    num_frequencies: int = 8  # octaves of the 2D tile-position sinusoids
    questions: list[str] = field(
        default_factory=lambda: ["presence", "diagnosis", "organ", "location", "choice"]
    )
    attention_loss: float = 0.0  # weight of -log(attention mass on tumour tiles) on tumour slides (0: off)
    # A sample is a slide asked every kind of `questions` from one connector pass (the connector over all the
    # tiles is nearly all of a step's cost), rather than one (slide, kind) pair per connector pass.
    every_question: bool = False
    # Weight of each kind's answer tokens in the loss (kinds not named: 1), e.g. {presence: 3}: a one-token
    # "yes"/"no" otherwise counts for less than a five-token class name.
    question_weights: dict[str, float] = field(default_factory=dict)
    plip: str | None = None  # PLIP folder: also embed tiles with PLIP and train the attention-MIL baseline
    mil_epochs: int = 40
    # Slide evidence (`slides/evidence.py`): an attention-MIL over the tiles' own image embeddings, fitted on
    # the slide labels for `evidence_epochs` and frozen; its summary is added to every image token.
    evidence: bool = True
    evidence_epochs: int = 40


@dataclass
class AugmentSection:
    """Augmented views of the training images (stain, magnification, orientation: `processing.augment`).

    Each image gets `views` augmented versions besides the original; each training sample (one question about
    an image) sees one of them, chosen by its id, so the questions about an image spread over its views.
    With the
    feature cache, every view is encoded once like any image.
    """

    views: int = 0  # augmented views per image besides the original (0: off)
    large: float = 0.0  # share of augmented views enlarged 2-3x: a larger image, tiled like one (scale)
    image: dict | None = None  # processing.augment.Augmentation fields (stain, zoom, ...); None: its defaults


@dataclass
class Recipe:
    """A resolved recipe for one stage."""

    stage: str = "align"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    trainable: TrainableSection = field(default_factory=TrainableSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: RunSection = field(default_factory=RunSection)
    feature_cache: FeatureCacheSection = field(default_factory=FeatureCacheSection)
    augment: AugmentSection = field(default_factory=AugmentSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    slide: SlideSection = field(default_factory=SlideSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {', '.join(STAGES)}, got {self.stage!r}")
        if self.data.path is None:
            raise ValueError("no training data: set data.path in the recipe or pass --data PATH")
        if self.stage == "slide" and not self.model.init:
            raise ValueError(
                "stage slide starts from a trained assistant: set model.init (or --init) to its folder"
            )
        if self.stage == "instruct" and not self.model.init:
            raise ValueError(
                "stage instruct starts from a trained model: set model.init (or --init) to the align output"
            )
        if self.data.overlong not in OVERLONG_POLICIES:
            raise ValueError(
                f"data.overlong must be one of {', '.join(OVERLONG_POLICIES)}, got {self.data.overlong!r}"
            )
        if self.augment.views < 0 or not 0 <= self.augment.large <= 1:
            raise ValueError(
                "augment.views must be at least 0 and augment.large in [0, 1], "
                f"got {self.augment.views} and {self.augment.large}"
            )
        Augmentation.from_dict(self.augment.image, source="augment.image")
        if self.data.balance not in (None, "sqrt", "equal", "proportional", "none"):
            raise ValueError(
                f"data.balance must be sqrt, equal, proportional or none, got {self.data.balance!r}"
            )
        if self.data.format not in ("auto", "conversations", "manifest"):
            raise ValueError(f"data.format must be auto, conversations or manifest, got {self.data.format!r}")
        if self.train.mixed_precision not in ("auto", "bf16-if-native", "no", "bf16", "fp16"):
            raise ValueError(
                "train.mixed_precision must be auto, bf16-if-native, no, bf16 or fp16, "
                f"got {self.train.mixed_precision!r}"
            )
        if self.train.loss_average not in ("token", "sample"):
            raise ValueError(f"train.loss_average must be token or sample, got {self.train.loss_average!r}")
        if self.train.choice_letter_weight <= 0:
            raise ValueError(f"train.choice_letter_weight must be > 0, got {self.train.choice_letter_weight}")
        if self.train.choice_letter_weight != 1 and self.train.loss_average != "sample":
            raise ValueError(
                "train.choice_letter_weight weighs tokens within one answer: set train.loss_average: sample"
            )
        if self.data.pack_questions < 1:
            raise ValueError(f"data.pack_questions must be at least 1, got {self.data.pack_questions}")
        for name in ("batch_size", "grad_accum", "epochs"):
            if getattr(self.train, name) < 1:
                raise ValueError(f"train.{name} must be at least 1, got {getattr(self.train, name)}")
        if self.train.max_steps is not None and self.train.max_steps < 1:
            raise ValueError(f"train.max_steps must be at least 1, got {self.train.max_steps}")
        check_cpu_threads(self.train.cpu_threads, "train")
        if self.feature_cache.enabled and self.trainable.vision:
            raise ValueError("feature_cache.enabled needs a frozen vision tower (trainable.vision: false)")
        if self.feature_cache.dtype not in ("auto", "float32", "float16", "bfloat16"):
            raise ValueError(
                "feature_cache.dtype must be auto, float32, float16 or bfloat16, got "
                f"{self.feature_cache.dtype!r}"
            )
        if not 0 <= self.optim.warmup_ratio < 1:
            raise ValueError(f"optim.warmup_ratio must be in [0, 1), got {self.optim.warmup_ratio}")
        if len(self.optim.betas) != 2:
            raise ValueError(f"optim.betas must hold two numbers, got {self.optim.betas}")
        if self.checkpoint.keep_last < 1:
            raise ValueError(f"checkpoint.keep_last must be at least 1, got {self.checkpoint.keep_last}")


def deep_merge(base: dict, update: dict) -> dict:
    """`update` over `base`, nested mappings merged key by key (a model's `overrides` replaced whole)."""
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and key != "overrides":
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


BOOLEAN_WORDS = {"true": True, "false": False, "yes": True, "no": False, "on": True, "off": False}


def _coerce(value: Any, kind: Any, where: str) -> Any:
    """Check `value` against a field's type; accept strings for numbers (YAML reads `2e-4` as text)."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(kind)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _coerce(value, option, where)
            except ValueError as error:
                errors.append(error)
        raise errors[0]
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(kind) or (Any,)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if kind is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping, got {value!r}")
        return value
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in BOOLEAN_WORDS:
            return BOOLEAN_WORDS[value.lower()]
        raise ValueError(f"{where}: expected true or false, got {value!r}")
    if kind in (int, float):
        if isinstance(value, bool):
            raise ValueError(f"{where}: expected a number, got {value!r}")
        try:
            number = (
                kind(value) if not isinstance(value, str) else kind(float(value) if kind is float else value)
            )
        except (TypeError, ValueError):
            raise ValueError(f"{where}: expected {kind.__name__}, got {value!r}") from None
        if kind is int and isinstance(value, float) and value != number:
            raise ValueError(f"{where}: expected an integer, got {value!r}")
        return number
    if kind is str:
        if isinstance(value, bool):  # YAML 1.1 reads an unquoted no / yes / off / on as a boolean
            raise ValueError(
                f"{where}: expected text, got {value!r} (put words such as 'no' in quotes: YAML reads "
                "an unquoted no, yes, off or on as a boolean)"
            )
        if not isinstance(value, str):
            raise ValueError(f"{where}: expected text, got {value!r}")
        return value
    return value


def _build(cls: type, data: dict, where: str) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        prefix = f"{where}: " if where else ""  # top level: the caller names the file
        raise ValueError(f"{prefix}unknown key(s) {unknown}; expected some of {sorted(fields)}")
    values = {}
    for name, value in data.items():
        kind = hints[name]
        key = f"{where}.{name}" if where else name
        if dataclasses.is_dataclass(kind):
            values[name] = _build(kind, value, key)
        else:
            values[name] = _coerce(value, kind, key)
    return cls(**values)


def parse_overrides(pairs: list[str]) -> dict:
    """`["optim.lr=2e-4", "train.epochs=3"]` -> nested dict; values are read as YAML scalars.

    Only true and false become booleans (YAML 1.2): `train.mixed_precision=no` means the word "no", and a
    boolean field takes yes / no / on / off as words (`BOOLEAN_WORDS`).
    """
    result: dict = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override {pair!r} must look like section.key=value")
        node = result
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {pair!r} conflicts with an earlier override of {part}")
        value = yaml.safe_load(text) if text.strip() else None
        if isinstance(value, bool) and text.strip().lower() not in ("true", "false"):
            value = text.strip()
        node[parts[-1]] = value
    return result


# The shipped recipes (`configs/` of a source checkout); the code holds their schema, never their values.
CONFIGS_DIR = Path(__file__).resolve().parents[3] / "configs"


def shipped_recipe(name: str) -> Path:
    """`configs/<name>.yaml`, or a ValueError saying where it was looked for."""
    path = CONFIGS_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"no shipped recipe {name!r}: {path} not found (recipes live in configs/)")
    return path


def read_yaml_mapping(path: str | Path) -> dict:
    """A YAML file whose top level is a mapping (empty file: {}); errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: recipe file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not valid YAML ({error})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    return data


def build_config(cls: type, data: dict, source: str) -> Any:
    """A typed config dataclass from a mapping: unknown keys, missing keys and ill-typed values raise
    ValueError naming `source` and the key (the one loader of the assistant's and PLIP's recipes)."""
    try:
        missing = sorted(
            f.name
            for f in dataclasses.fields(cls)
            if f.name not in data
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        )
        if missing:
            raise ValueError(f"missing key(s) {missing}")
        return _build(cls, data, "")
    except ValueError as error:
        raise ValueError(f"{source}: {error}") from None


def load_recipe(path: str | Path | None, stage: str, overrides: list[str] | dict | None = None) -> Recipe:
    """Read a recipe file for `stage` (shared sections, then `stages.<stage>`, then overrides)."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {', '.join(STAGES)}, got {stage!r}")
    source = str(path) if path is not None else "recipe"
    data = read_yaml_mapping(path) if path is not None else {}
    stages = data.pop("stages", None) or {}
    if not isinstance(stages, dict) or set(stages) - set(STAGES):
        raise ValueError(f"{source}: 'stages' may only hold {', '.join(STAGES)}")
    data = deep_merge(data, stages.get(stage) or {})
    extra = parse_overrides(overrides) if isinstance(overrides, list) else (overrides or {})
    data = deep_merge(data, extra)
    data.pop("stage", None)
    return build_config(Recipe, {**data, "stage": stage}, source)


def with_defaults(saved: dict) -> dict:
    """A saved recipe dict with every key added since it was written set to its default, so that a new
    setting left at its default does not stop an older run from resuming."""
    return deep_merge(Recipe().to_dict(), saved)


def recipe_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two recipe dicts."""
    keys = sorted(set(old) | set(new))
    diffs = []
    for key in keys:
        a, b = old.get(key), new.get(key)
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict) and key != "overrides":
            diffs += recipe_differences(a, b, name + ".")
        elif a != b:
            diffs.append(name)
    return diffs
