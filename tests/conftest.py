"""Shared fixtures: the real data folder beside the repository, and the tiny model."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} not present")
    return SHARED_DATA


@pytest.fixture(scope="session")
def lung(shared_data) -> Path:
    """The LC25000 lung folder: tiles by class and `manifest.csv` with the train/dev split."""
    return shared_data / "lc25000-lung"


@pytest.fixture(scope="session")
def manifest_subset(shared_data, tmp_path_factory):
    """`manifest_subset(dataset, train, dev)`: a manifest of the first `train` train and `dev` dev images of
    each class of a real shared dataset's manifest, with absolute paths (a small, class-balanced set of real
    tiles)."""

    def make(dataset: str, train: int, dev: int = 0) -> Path:
        root = shared_data / dataset
        keep, counts = [], {}
        for row in csv.DictReader((root / "manifest.csv").open()):
            key = (row["split"], row["label"])
            if counts.get(key, 0) < {"train": train, "dev": dev}.get(row["split"], 0):
                counts[key] = counts.get(key, 0) + 1
                keep.append({**row, "path": str(root / row["path"])})
        path = tmp_path_factory.mktemp(dataset) / "manifest.csv"
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["path", "label", "cluster", "split"])
            writer.writeheader()
            writer.writerows(keep)
        return path

    return make


@pytest.fixture(scope="session")
def lung_subset(manifest_subset):
    """`lung_subset(train, dev)`: `manifest_subset` of the lung dataset."""
    return lambda train, dev=0: manifest_subset("lc25000-lung", train, dev)


@pytest.fixture(scope="session")
def svs(shared_data) -> Path:
    """The real whole-slide image (a region of CMU-1, Aperio SVS)."""
    return shared_data / "samples" / "wsi" / "cmu_small_region.svs"


@pytest.fixture(scope="session")
def lung_tiles(shared_data) -> list[Path]:
    """A few real LC25000 lung tiles, one class after another."""
    root = shared_data / "lc25000-lung" / "images"
    return [sorted((root / label).iterdir())[0] for label in ("lung_aca", "lung_n", "lung_scc")]


@pytest.fixture(scope="session")
def tiny():
    """A random-init tiny (model, processor) pair in eval mode."""
    from pallava import load_preset

    model, processor = load_preset("tiny", seed=0)
    return model.eval(), processor


@pytest.fixture(scope="session")
def tiny_plip_dir(tmp_path_factory) -> Path:
    """A random-init tiny PLIP (1 text layer) saved as a model folder, for commands that load one by path."""
    from pallava.models.plip import build_plip

    model, tokenizer = build_plip("tiny", text_init="scratch", text_layers=1, seed=0)
    folder = tmp_path_factory.mktemp("tiny-plip")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def plant_folder_code(tmp_path, monkeypatch):
    """Make a model folder ask transformers to run a module it ships (`auto_map`), and answer "y" to the
    question transformers puts on a terminal. Returns `plant(folder) -> marker`; the marker exists only if
    the folder's code ran. `asked` (an attribute of `plant`) lists the questions transformers asked."""
    import json
    import sys

    asked: list[str] = []
    monkeypatch.setattr("builtins.input", lambda prompt="": asked.append(prompt) or "y")
    # where transformers would copy the folder's module before importing it: kept inside the test's tmp_path
    monkeypatch.setattr("transformers.dynamic_module_utils.HF_MODULES_CACHE", str(tmp_path / "hf-modules"))
    monkeypatch.setattr("sys.path", list(sys.path))

    def plant(folder: Path) -> Path:
        marker = folder / "FOLDER_CODE_RAN"
        (folder / "folder_code.py").write_text(
            f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
            "from transformers import PreTrainedConfig, PreTrainedModel, PreTrainedTokenizerFast\n"
            "class Tok(PreTrainedTokenizerFast): pass\n"
            "class Cfg(PreTrainedConfig): model_type = 'folder_code'\n"
            "class Model(PreTrainedModel): config_class = Cfg\n"
        )
        tokenizer_config = folder / "tokenizer_config.json"
        if tokenizer_config.is_file():  # no known tokenizer class: only the folder's code would do
            data = json.loads(tokenizer_config.read_text())
            data.pop("tokenizer_class", None)
            data["auto_map"] = {"AutoTokenizer": ["folder_code.Tok", "folder_code.Tok"]}
            tokenizer_config.write_text(json.dumps(data))
        return marker

    plant.asked = asked
    return plant
