"""The evaluation suite file: a typed YAML list of benchmarks, checked before any model is loaded.

```yaml
settings:                      # optional; these are the defaults
  scorer: strict               # headline VQA scorer (all are reported)
  batch_size: 8
  max_new_tokens: 32           # VQA answers
  class_max_new_tokens: 24     # class-name answers (zero-shot classification)
  class_answers: likelihood    # the class name the assistant is likeliest to answer; or generated
  plip_batch_size: 64
  plip_matching: true          # PLIP zero-shot by its matching (ITM) head too, beside the contrastive one
  limit: null                  # per benchmark: images (manifest, zeroshot) or questions (vqa)
  seed: 0
  n_resamples: 1000
benchmarks:
  - name: lung                 # folder name under OUT: letters, digits, '.', '_', '-'
    manifest: ../data/lung/manifest.csv   # or `vqa: FILE` or `zeroshot: MANIFEST` (exactly one)
    split: dev
    label_map: lc25000-lung    # built-in name or a JSON/YAML file
```

Relative paths (data, `image_root`, label-map files) resolve against the folder that holds the suite
file, never the working directory, so a suite runs the same from anywhere.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pallava.data.labels import LabelMap
from pallava.eval.runner import CLASS_ANSWERS
from pallava.eval.scorers import SCORERS
from pallava.eval.tasks import VQA_FORMATS

KINDS = ("manifest", "vqa", "zeroshot")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# Fields each kind accepts besides `name` and its data key.
_KIND_FIELDS = {
    "manifest": ("split", "label_map", "question_label_map", "limit"),
    "zeroshot": ("split", "label_map", "limit"),
    "vqa": ("split", "label_map", "limit", "format", "image_root"),
}


@dataclass(frozen=True)
class Benchmark:
    """One benchmark of a suite, with paths already resolved.

    `manifest`: a labelled manifest, evaluated by PLIP zero-shot (when a PLIP model is given), the
    assistant's closed/open/choice questions generated from the labels, and the assistant's zero-shot
    classification. `vqa`: any file `pallava eval vqa` reads. `zeroshot`: a labelled manifest, zero-shot
    classification only (PLIP and assistant).
    """

    name: str
    kind: str
    data: Path
    split: str | None = None
    label_map: str | None = None
    # manifests: the classes and organs generated questions draw from (default: label_map). A model trained
    # on several organs is asked "Is this colon adenocarcinoma?" about lung tissue too.
    question_label_map: str | None = None
    limit: int | None = None
    format: str | None = None
    image_root: Path | None = None

    def definition(self) -> dict[str, Any]:
        """JSON-ready fields (paths as text): what the predictions depend on."""
        fields = dataclasses.asdict(self)
        return {key: str(value) if isinstance(value, Path) else value for key, value in fields.items()}


@dataclass(frozen=True)
class SuiteSettings:
    """Run settings shared by every benchmark."""

    scorer: str = "strict"
    batch_size: int = 8
    max_new_tokens: int = 32
    class_max_new_tokens: int = 24
    class_answers: str = "likelihood"  # runner.CLASS_ANSWERS
    plip_batch_size: int = 64
    plip_matching: bool = True  # also classify by PLIP's image-text matching head (a column of its own)
    limit: int | None = None
    seed: int = 0
    n_resamples: int = 1000


@dataclass(frozen=True)
class Suite:
    benchmarks: tuple[Benchmark, ...]
    settings: SuiteSettings = field(default_factory=SuiteSettings)
    source: str = "suite"


def _check_keys(data: Mapping[str, Any], allowed: tuple[str, ...], where: str) -> None:
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; expected some of {sorted(allowed)}")


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: expected non-empty text, got {value!r}")
    return value.strip()


def _positive_int(value: Any, where: str, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where}: expected a whole number of at least 1, got {value!r}")
    return value


def _path(value: Any, base: Path, where: str) -> Path:
    path = Path(_text(value, where)).expanduser()
    resolved = path if path.is_absolute() else (base / path).resolve()
    if not resolved.exists():
        raise ValueError(
            f"{where}: not found: {resolved} (relative paths resolve against the suite file's folder {base})"
        )
    return resolved


def _label_map(value: Any, base: Path, where: str) -> str:
    spec = _text(value, where)
    if spec in LabelMap.builtin_names():
        return spec
    if Path(spec).suffix.lower() not in (".json", ".yaml", ".yml"):
        raise ValueError(
            f"{where}: {spec!r} is neither a built-in label map "
            f"({', '.join(LabelMap.builtin_names())}) nor a .json/.yaml file"
        )
    return str(_path(spec, base, where))


def _settings(data: Any, where: str) -> SuiteSettings:
    if data is None:
        return SuiteSettings()
    if not isinstance(data, Mapping):
        raise ValueError(f"{where}: expected a mapping of settings, got {type(data).__name__}")
    names = tuple(f.name for f in dataclasses.fields(SuiteSettings))
    _check_keys(data, names, where)
    choices = {"scorer": sorted(SCORERS), "class_answers": list(CLASS_ANSWERS)}
    values: dict[str, Any] = {}
    for key, value in data.items():
        here = f"{where}.{key}"
        if key in choices:
            if value not in choices[key]:
                raise ValueError(f"{here}: expected one of {choices[key]}, got {value!r}")
            values[key] = value
        elif key == "plip_matching":
            if not isinstance(value, bool):
                raise ValueError(f"{here}: expected true or false, got {value!r}")
            values[key] = value
        elif key == "seed":
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{here}: expected a whole number, got {value!r}")
            values[key] = value
        else:
            values[key] = _positive_int(value, here, optional=key == "limit")
    return SuiteSettings(**values)


def _benchmark(data: Any, base: Path, where: str) -> Benchmark:
    if not isinstance(data, Mapping):
        raise ValueError(
            f"{where}: expected a mapping with 'name' and one of {', '.join(KINDS)}, "
            f"got {type(data).__name__}"
        )
    name = _text(data.get("name"), f"{where}.name")
    if not _NAME.match(name):
        raise ValueError(f"{where}.name: {name!r} must be a folder name: letters, digits, '.', '_' or '-'")
    where = f"{where} ({name})"
    kinds = [kind for kind in KINDS if kind in data]
    if len(kinds) != 1:
        raise ValueError(
            f"{where}: give exactly one of {', '.join(KINDS)} (the data to evaluate), got {kinds or 'none'}"
        )
    kind = kinds[0]
    _check_keys(data, ("name", kind, *_KIND_FIELDS[kind]), where)
    values: dict[str, Any] = {"name": name, "kind": kind, "data": _path(data[kind], base, f"{where}.{kind}")}
    if data.get("split") is not None:
        values["split"] = _text(data["split"], f"{where}.split")
    for key in ("label_map", "question_label_map"):
        if data.get(key) is not None:
            values[key] = _label_map(data[key], base, f"{where}.{key}")
    values["limit"] = _positive_int(data.get("limit"), f"{where}.limit", optional=True)
    if data.get("format") is not None:
        if data["format"] not in VQA_FORMATS:
            raise ValueError(
                f"{where}.format: expected one of {', '.join(VQA_FORMATS)}, got {data['format']!r}"
            )
        values["format"] = data["format"]
    if data.get("image_root") is not None:
        values["image_root"] = _path(data["image_root"], base, f"{where}.image_root")
    return Benchmark(**values)


def suite_from_dict(data: Any, base_dir: str | Path, source: str = "suite") -> Suite:
    """A checked `Suite` from parsed YAML; relative paths resolve against `base_dir`.

    Every error is a ValueError naming `source` and the field, e.g. `suite.yaml: benchmarks[1] (colon).split`.
    """
    if not isinstance(data, Mapping):
        raise ValueError(f"{source}: expected a mapping with 'benchmarks' (and optionally 'settings')")
    _check_keys(data, ("benchmarks", "settings"), source)
    listed = data.get("benchmarks")
    if not isinstance(listed, list) or not listed:
        raise ValueError(f"{source}: 'benchmarks' must be a non-empty list")
    base = Path(base_dir).resolve()
    benchmarks = tuple(
        _benchmark(entry, base, f"{source}: benchmarks[{i}]") for i, entry in enumerate(listed)
    )
    names = [b.name for b in benchmarks]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(
            f"{source}: benchmark names must be unique (they name the report folders); repeated: {repeated}"
        )
    return Suite(benchmarks, _settings(data.get("settings"), f"{source}: settings"), source)


def load_suite(path: str | Path) -> Suite:
    """Read and check a suite YAML file (see the module docstring for its fields)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: suite file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not valid YAML: {error}") from None
    return suite_from_dict(data, path.parent, str(path))
