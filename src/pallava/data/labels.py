"""Class vocabularies: label -> canonical name, synonyms and organ.

The canonical `name` is the answer the assistant learns for open "what is the diagnosis" questions;
synonyms vary the generated captions and let scorers map free text back to a label.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml


@dataclass(frozen=True)
class ClassInfo:
    """One class: its label (as in manifests), canonical name, synonyms and organ."""

    label: str
    name: str
    synonyms: tuple[str, ...] = ()
    organ: str = ""
    malignant: bool | None = None  # None: not a benign/malignant diagnosis (e.g. stroma, debris)

    def all_names(self) -> tuple[str, ...]:
        """The canonical name followed by the synonyms, without repeats."""
        return tuple(dict.fromkeys((self.name, *self.synonyms)))


_BUILTIN: dict[str, dict[str, dict[str, object]]] = {
    "lc25000-lung": {
        "lung_aca": {
            "name": "lung adenocarcinoma",
            "synonyms": [
                "adenocarcinoma of the lung",
                "pulmonary adenocarcinoma",
                "lung adenocarcinoma with glandular differentiation",
                "invasive adenocarcinoma of the lung",
            ],
            "organ": "lung",
            "malignant": True,
        },
        "lung_n": {
            "name": "benign lung tissue",
            "synonyms": [
                "normal lung parenchyma",
                "benign pulmonary tissue",
                "normal lung tissue",
                "non-neoplastic lung tissue",
            ],
            "organ": "lung",
            "malignant": False,
        },
        "lung_scc": {
            "name": "lung squamous cell carcinoma",
            "synonyms": [
                "squamous cell carcinoma of the lung",
                "pulmonary squamous cell carcinoma",
                "keratinizing squamous cell carcinoma of the lung",
                "lung squamous carcinoma",
            ],
            "organ": "lung",
            "malignant": True,
        },
    },
    "lc25000-colon": {
        "colon_aca": {
            "name": "colon adenocarcinoma",
            "synonyms": [
                "adenocarcinoma of the colon",
                "colonic adenocarcinoma",
                "colorectal adenocarcinoma",
                "invasive adenocarcinoma of the colon",
            ],
            "organ": "colon",
            "malignant": True,
        },
        "colon_n": {
            "name": "benign colonic tissue",
            "synonyms": [
                "benign colonic mucosa",
                "normal colonic mucosa",
                "normal colon tissue",
                "non-neoplastic colonic mucosa",
            ],
            "organ": "colon",
            "malignant": False,
        },
    },
    "oscc": {
        "oral_n": {
            "name": "normal oral mucosa",
            "synonyms": [
                "normal oral epithelium",
                "benign oral mucosa",
                "normal squamous mucosa of the oral cavity",
                "non-neoplastic oral mucosa",
            ],
            "organ": "oral cavity",
            "malignant": False,
        },
        "oral_scc": {
            "name": "oral squamous cell carcinoma",
            "synonyms": [
                "squamous cell carcinoma of the oral cavity",
                "oral cavity squamous cell carcinoma",
                "invasive squamous cell carcinoma of the oral mucosa",
                "OSCC",
            ],
            "organ": "oral cavity",
            "malignant": True,
        },
    },
    "nct-crc-he": {
        "ADI": {
            "name": "adipose tissue",
            "synonyms": ["fat", "adipocytes"],
            "organ": "colon",
            "malignant": False,
        },
        "BACK": {"name": "background", "synonyms": ["slide background", "no tissue"], "organ": "colon"},
        "DEB": {"name": "debris", "synonyms": ["necrotic debris", "necrosis"], "organ": "colon"},
        "LYM": {
            "name": "lymphocytes",
            "synonyms": ["lymphocytic infiltrate", "immune cells"],
            "organ": "colon",
        },
        "MUC": {"name": "mucus", "synonyms": ["mucin", "extracellular mucin"], "organ": "colon"},
        "MUS": {
            "name": "smooth muscle",
            "synonyms": ["muscularis", "smooth muscle tissue"],
            "organ": "colon",
        },
        "NORM": {
            "name": "normal colon mucosa",
            "synonyms": ["benign colonic mucosa", "normal colonic mucosa"],
            "organ": "colon",
            "malignant": False,
        },
        "STR": {
            "name": "cancer-associated stroma",
            "synonyms": ["tumour stroma", "desmoplastic stroma"],
            "organ": "colon",
        },
        "TUM": {
            "name": "colorectal adenocarcinoma epithelium",
            "synonyms": ["colorectal adenocarcinoma", "colon cancer epithelium"],
            "organ": "colon",
            "malignant": True,
        },
    },
}


# Built-in maps made of several others (labels must not clash): one vocabulary for multi-organ training.
_COMBINED: dict[str, tuple[str, ...]] = {
    "lung-colon-oral": ("lc25000-lung", "lc25000-colon", "oscc"),
}


def _normalise(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


class LabelMap(Mapping[str, ClassInfo]):
    """An ordered mapping label -> ClassInfo (order = file order = class index)."""

    def __init__(self, classes: Mapping[str, ClassInfo] | list[ClassInfo]) -> None:
        items = list(classes.values()) if isinstance(classes, Mapping) else list(classes)
        if not items:
            raise ValueError("label map: no classes given")
        self._classes: dict[str, ClassInfo] = {}
        for info in items:
            if info.label in self._classes:
                raise ValueError(f"label map: duplicate label '{info.label}'")
            self._classes[info.label] = info
        self._by_text: dict[str, str] = {}
        for info in items:
            for text in info.all_names():
                self._by_text.setdefault(_normalise(text), info.label)
            self._by_text.setdefault(_normalise(info.label), info.label)

    def __getitem__(self, label: str) -> ClassInfo:
        try:
            return self._classes[label]
        except KeyError:
            raise KeyError(f"unknown label '{label}'; known labels: {', '.join(self._classes)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._classes)

    def __len__(self) -> int:
        return len(self._classes)

    def labels(self) -> list[str]:
        """Labels in class-index order."""
        return list(self._classes)

    def names(self) -> list[str]:
        """Canonical names in label order."""
        return [info.name for info in self._classes.values()]

    def label_for(self, text: str) -> str | None:
        """The label whose name, synonym or label equals `text` after normalisation, else None."""
        return self._by_text.get(_normalise(text))

    @classmethod
    def from_dict(cls, data: Mapping[str, object], source: str = "label map") -> LabelMap:
        """Build from `{label: {name, synonyms, organ}}`; errors name the source, label and field."""
        if not isinstance(data, Mapping) or not data:
            raise ValueError(f"{source}: expected a non-empty mapping {{label: {{name, synonyms, organ}}}}")
        classes = []
        for label, entry in data.items():
            if not isinstance(entry, Mapping):
                raise ValueError(f"{source}: label '{label}' must map to an object with 'name'")
            name = entry.get("name")
            if not isinstance(name, str) or not name.strip():
                raise ValueError(f"{source}: label '{label}': field 'name' must be a non-empty string")
            synonyms = entry.get("synonyms") or []
            if not isinstance(synonyms, list) or not all(isinstance(s, str) for s in synonyms):
                raise ValueError(f"{source}: label '{label}': field 'synonyms' must be a list of strings")
            organ = entry.get("organ") or ""
            if not isinstance(organ, str):
                raise ValueError(f"{source}: label '{label}': field 'organ' must be a string")
            malignant = entry.get("malignant")
            if malignant is not None and not isinstance(malignant, bool):
                raise ValueError(
                    f"{source}: label '{label}': field 'malignant' must be true, false or absent"
                )
            classes.append(ClassInfo(str(label), name.strip(), tuple(synonyms), organ, malignant))
        return cls(classes)

    @classmethod
    def from_file(cls, path: str | Path) -> LabelMap:
        """Read a JSON or YAML file `{label: {name, synonyms, organ}}`."""
        path = Path(path)
        text = path.read_text(encoding="utf-8")
        try:
            data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as error:
            raise ValueError(
                f"{path}: not valid {'JSON' if path.suffix.lower() == '.json' else 'YAML'}: {error}"
            ) from None
        return cls.from_dict(data, source=str(path))

    @classmethod
    def builtin(cls, name: str) -> LabelMap:
        """A shipped map: 'lc25000-lung' (3 lung classes), 'lc25000-colon' (2), 'oscc' (2 oral classes),
        'nct-crc-he' (9 colorectal tissue classes) or 'lung-colon-oral' (the first three together)."""
        if name in _COMBINED:
            return cls.merge([cls.builtin(part) for part in _COMBINED[name]])
        if name not in _BUILTIN:
            raise ValueError(
                f"unknown built-in label map '{name}'; available: {', '.join(cls.builtin_names())}"
            )
        return cls.from_dict(_BUILTIN[name], source=f"built-in label map '{name}'")

    @staticmethod
    def builtin_names() -> list[str]:
        """Single-dataset maps first, then the combined ones."""
        return [*_BUILTIN, *_COMBINED]

    @classmethod
    def merge(cls, maps: list[LabelMap]) -> LabelMap:
        """One map holding the classes of several (in order); a label defined differently twice is an
        error."""
        classes: dict[str, ClassInfo] = {}
        for label_map in maps:
            for info in label_map.values():
                if info.label in classes and classes[info.label] != info:
                    raise ValueError(f"label maps disagree on label '{info.label}': cannot merge them")
                classes.setdefault(info.label, info)
        return cls(list(classes.values()))

    @classmethod
    def resolve(cls, spec: str | None, labels: set[str], source: str = "data") -> LabelMap:
        """The label map for data holding `labels`: `spec` is a built-in name or a JSON/YAML file; with no
        spec, the first built-in map covering every label. Labels missing from the map are an error."""
        if spec:
            label_map = cls.from_file(spec) if Path(spec).is_file() else cls.builtin(spec)
        else:
            label_map = next(
                (cls.builtin(name) for name in cls.builtin_names() if labels <= set(cls.builtin(name))), None
            )
            if label_map is None:
                raise ValueError(
                    f"{source}: no built-in label map covers the labels {sorted(labels)}; "
                    "pass a label map (name or JSON/YAML file)"
                )
        missing = sorted(labels - set(label_map))
        if missing:
            raise ValueError(
                f"{source}: labels {missing} are not in the label map '{spec}' "
                f"(known: {', '.join(label_map)})"
            )
        return label_map

    def subset(self, labels: set[str]) -> LabelMap:
        """The classes whose label is in `labels`, in this map's order."""
        return LabelMap([info for info in self.values() if info.label in labels])

    def of_organs(self, labels: set[str]) -> LabelMap:
        """The classes of the organs that `labels` belong to, in this map's order: the task of a dataset of
        one organ, out of a map that spans several. The whole map when a label names no organ."""
        organs = {self[label].organ for label in labels if label in self}
        if not organs or "" in organs:
            return self
        return LabelMap([info for info in self.values() if info.organ in organs])

    def organs(self) -> list[str]:
        """The organs named by the classes, in first-seen order (empty ones left out)."""
        return list(dict.fromkeys(info.organ for info in self.values() if info.organ))

    def to_dict(self) -> dict[str, dict[str, object]]:
        out: dict[str, dict[str, object]] = {}
        for info in self._classes.values():
            out[info.label] = {"name": info.name, "synonyms": list(info.synonyms), "organ": info.organ}
            if info.malignant is not None:
                out[info.label]["malignant"] = info.malignant
        return out
