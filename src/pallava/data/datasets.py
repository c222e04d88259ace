"""Several datasets as one training set: dataset lists, per-record provenance and balanced sampling.

A dataset is a labelled manifest (or any record file) with a name; every record read from it carries that
name (`LabelledImage.dataset`, `meta.dataset` in generated records), so a mixed training set can always be
split back by origin. Balancing repeats the smaller datasets so that a 295-image set is not drowned by a
3,000-image one: no dataset is ever sub-sampled, each is repeated by a factor >= 1 so that the datasets'
shares follow their weights.

Dataset lists on the command line: repeat `--data PATH`, or pass a YAML file::

    balance: sqrt                # sqrt (default) | equal | proportional | none
    datasets:
      - path: ../shared/data/lc25000-lung/manifest.csv   # relative to this file
        name: lung               # default: the manifest's folder name (or the file's stem)
        label_map: lc25000-lung  # default: the built-in map covering its labels
      - path: ../shared/data/oscc
        weight: 2.0              # optional: replaces the balance mode's weight for this dataset
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from pallava.data.labels import LabelMap
from pallava.data.records import LabelledImage

BALANCE_MODES = ("sqrt", "equal", "proportional", "none")
DATASET_LIST_SUFFIXES = (".yaml", ".yml")
_SPEC_KEYS = {"path", "name", "weight", "label_map"}


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset of a training set: where it is, its name (provenance), sampling weight and label map."""

    path: str
    name: str
    weight: float | None = None
    label_map: str | None = None


@dataclass(frozen=True)
class DatasetList:
    """The datasets of a training set and how to balance them."""

    datasets: tuple[DatasetSpec, ...]
    balance: str = "sqrt"

    @property
    def weights(self) -> dict[str, float]:
        return {spec.name: spec.weight for spec in self.datasets if spec.weight is not None}


def dataset_name(path: str | Path) -> str:
    """A folder holding `manifest.csv` (or the manifest itself) is named after the folder; else the file
    stem."""
    path = Path(path)
    if path.is_dir() or path.name == "manifest.csv":
        return (path if path.is_dir() else path.parent).resolve().name
    return path.stem


def _data_file(path: Path) -> Path:
    """A folder stands for its `manifest.csv` when it has one."""
    return path / "manifest.csv" if path.is_dir() and (path / "manifest.csv").is_file() else path


def read_dataset_list(path: str | Path) -> DatasetList:
    """Read a YAML dataset list; paths resolve against the file's folder. Errors name the file and field."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as error:
        raise ValueError(f"{path}: cannot read the dataset list ({error})") from None
    if not isinstance(data, dict) or not isinstance(data.get("datasets"), list) or not data["datasets"]:
        raise ValueError(f"{path}: expected a mapping with a non-empty list 'datasets' (each with a 'path')")
    unknown = sorted(set(data) - {"datasets", "balance"})
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown}; expected 'datasets' and optionally 'balance'")
    balance = data.get("balance", "sqrt")
    if balance not in BALANCE_MODES:
        raise ValueError(
            f"{path}: field 'balance' must be one of {', '.join(BALANCE_MODES)}, got {balance!r}"
        )
    specs = []
    for index, entry in enumerate(data["datasets"]):
        where = f"{path}: datasets[{index}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            raise ValueError(f"{where}: expected a mapping with a string 'path'")
        unknown = sorted(set(entry) - _SPEC_KEYS)
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; expected some of {sorted(_SPEC_KEYS)}")
        weight = entry.get("weight")
        if weight is not None and (
            isinstance(weight, bool) or not isinstance(weight, int | float) or weight <= 0
        ):
            raise ValueError(f"{where}: field 'weight' must be a positive number, got {weight!r}")
        target = _data_file((path.parent / entry["path"]).resolve())
        if not target.exists():
            raise ValueError(f"{where}: field 'path': {target} not found")
        name = entry.get("name") or dataset_name(path.parent / entry["path"])
        specs.append(
            DatasetSpec(
                str(target), str(name), None if weight is None else float(weight), entry.get("label_map")
            )
        )
    return DatasetList(_unique(specs, str(path)), balance)


def parse_data_args(values: Sequence[str | Path], balance: str | None = None) -> DatasetList:
    """Datasets from repeated `--data` values: data files, folders holding manifest.csv, or YAML lists."""
    if not values:
        raise ValueError("no data given: pass --data PATH (repeat it for several datasets)")
    specs: list[DatasetSpec] = []
    modes = []
    for value in values:
        path = Path(value)
        if path.suffix.lower() in DATASET_LIST_SUFFIXES:
            listed = read_dataset_list(path)
            specs += listed.datasets
            modes.append(listed.balance)
            continue
        target = _data_file(path)
        if not target.exists():
            raise ValueError(f"--data {value}: not found")
        specs.append(DatasetSpec(str(target), dataset_name(path)))
    chosen = balance or (modes[0] if modes else "sqrt")
    if chosen not in BALANCE_MODES:
        raise ValueError(f"balance must be one of {', '.join(BALANCE_MODES)}, got {chosen!r}")
    return DatasetList(_unique(specs, "--data"), chosen)


def _unique(specs: list[DatasetSpec], source: str) -> tuple[DatasetSpec, ...]:
    names = Counter(spec.name for spec in specs)
    clashes = sorted(name for name, count in names.items() if count > 1)
    if clashes:
        raise ValueError(
            f"{source}: several datasets are named {clashes}: give each a distinct 'name' in a YAML list"
        )
    return tuple(specs)


def read_labelled(datasets: DatasetList, split: str | None) -> list[LabelledImage]:
    """Every dataset's labelled images (of `split`), each tagged with its dataset's name."""
    from pallava.data.importers.manifest import holds_labelled_images, read_labelled_images

    items: list[LabelledImage] = []
    for spec in datasets.datasets:
        if not holds_labelled_images(spec.path):
            raise ValueError(
                f"dataset '{spec.name}': {spec.path} is not a labelled manifest (.csv) or image folder"
            )
        for item in read_labelled_images(spec.path, split):
            item.dataset = spec.name
            items.append(item)
    return items


def merged_label_map(
    datasets: DatasetList, items: Sequence[LabelledImage], spec: str | None = None
) -> LabelMap:
    """One label map for labelled images of several datasets: `spec` if given, else each dataset's own map
    (its `label_map` or the built-in map covering its labels), merged."""
    if spec:
        return LabelMap.resolve(spec, {item.label for item in items})
    maps = []
    for dataset in datasets.datasets:
        labels = {item.label for item in items if item.dataset == dataset.name}
        if labels:
            maps.append(LabelMap.resolve(dataset.label_map, labels, source=f"dataset '{dataset.name}'"))
    return LabelMap.merge(maps)


def repeat_factors(
    sizes: Mapping[str, int], balance: str = "sqrt", weights: Mapping[str, float] | None = None
) -> dict[str, float]:
    """How often each dataset is repeated per epoch (>= 1) so that shares follow the weights.

    A dataset's weight is `weights[name]` if given, else sqrt(size) (`sqrt`, the usual temperature-style
    compromise), 1 (`equal`) or its size (`proportional`, = no balancing, as does `none`).
    """
    if balance not in BALANCE_MODES:
        raise ValueError(f"balance must be one of {', '.join(BALANCE_MODES)}, got {balance!r}")
    weights = dict(weights or {})
    unknown = sorted(set(weights) - set(sizes))
    if unknown:
        raise ValueError(f"weights name unknown datasets {unknown}; datasets: {sorted(sizes)}")
    base = {"sqrt": math.sqrt, "equal": lambda n: 1.0, "proportional": float, "none": float}[balance]
    share = {name: weights.get(name, base(size)) for name, size in sizes.items() if size > 0}
    if balance == "none" and not weights:
        return {name: 1.0 for name in sizes}
    scale = max(sizes[name] / w for name, w in share.items())
    # scale * w / size >= 1 for every dataset, = 1 for the one that sets the scale; max() keeps rounding
    # (0.9999999999999998) from bringing that one under 1
    return {name: (max(1.0, scale * share[name] / sizes[name]) if name in share else 1.0) for name in sizes}


def balanced_indices(
    groups: Sequence[Hashable], factors: Mapping[Hashable, float], seed: int = 0
) -> list[int]:
    """Indices of the samples with each group repeated by its factor: whole copies plus a seeded subset
    for the fraction. The result is in index order (training shuffles it per epoch)."""
    by_group: dict[Hashable, list[int]] = {}
    for index, group in enumerate(groups):
        by_group.setdefault(group, []).append(index)
    chosen: list[int] = []
    for group, indices in by_group.items():
        factor = factors.get(group, 1.0)
        if factor < 1:
            raise ValueError(f"repeat factor of '{group}' must be at least 1, got {factor}")
        whole, fraction = int(factor), factor - int(factor)
        chosen += indices * whole
        extra = round(fraction * len(indices))
        if extra:
            chosen += random.Random(f"{seed}:{group}").sample(indices, extra)
    return sorted(chosen)


def balance(
    groups: Sequence[str | None],
    balance_mode: str = "sqrt",
    weights: Mapping[str, float] | None = None,
    seed: int = 0,
) -> list[int]:
    """Balanced sample indices for samples tagged with their dataset (None = an unnamed dataset)."""
    names = ["" if group is None else group for group in groups]
    sizes = Counter(names)
    if len(sizes) < 2 or balance_mode == "none":
        return list(range(len(names)))
    weights = {("" if k is None else k): v for k, v in (weights or {}).items()}
    return balanced_indices(names, repeat_factors(sizes, balance_mode, weights), seed)


def balance_labels(groups: Sequence[tuple[str | None, str | None]], seed: int = 0) -> list[int]:
    """Sample indices with every class of a dataset repeated up to its dataset's largest class.

    `groups` holds each sample's (dataset, label). A small class (oral mucosa: 73 normal images against 222
    carcinomas) otherwise teaches a language model its prior, not the tissue. Samples without a label keep
    their count.
    """
    largest: Counter = Counter()
    sizes = Counter(groups)
    for (dataset, label), size in sizes.items():
        if label is not None:
            largest[dataset] = max(largest[dataset], size)
    factors = {
        group: (largest[group[0]] / size if group[1] is not None else 1.0) for group, size in sizes.items()
    }
    return balanced_indices(groups, factors, seed)


def counts_by_dataset(groups: Sequence[str | None]) -> dict[str, int]:
    """How many samples come from each dataset (for run logs and tests)."""
    return dict(sorted(Counter("" if g is None else g for g in groups).items()))
