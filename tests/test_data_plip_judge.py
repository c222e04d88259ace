"""The PLIP zero-shot image judge in the cleaning pipeline, with a tiny PLIP trained here on real images.

The tiny PLIP sees 10 LC25000 tiles per class, the 9 colorectal tiles and crops of the 5 non-pathology
photographs for 12 steps; the judge must then reject every photograph and keep unseen LC25000 tiles.
"""

import json
import random
from pathlib import Path

import pytest
from PIL import Image

from pallava.data.clean import CleanConfig, clean

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
PHOTO_CAPTIONS = {
    "astronaut": "a photograph of a person",
    "chelsea": "a photograph of a cat",
    "coffee": "a photograph of a cup of coffee",
    "retina": "a fundus photograph of the retina",
    "rocket": "a photograph of a rocket",
}
CLASSES = {
    "lung_aca": "lung adenocarcinoma",
    "lung_n": "benign lung tissue",
    "lung_scc": "lung squamous cell carcinoma",
}


@pytest.fixture(scope="module")
def tiny_plip(tmp_path_factory):
    train_plip = pytest.importorskip("pallava.train.plip")
    if not (SHARED / "samples" / "non-pathology").is_dir():
        pytest.skip("shared data not available")
    root = tmp_path_factory.mktemp("plip")
    rows = []
    for photo in sorted((SHARED / "samples" / "non-pathology").iterdir()):
        image = Image.open(photo).convert("RGB")
        w, h = image.size
        for k, (x, y) in enumerate([(0, 0), (w // 2, 0), (0, h // 2), (w // 2, h // 2), (w // 4, h // 4)]):
            crop = root / f"{photo.stem}{k}.png"
            image.crop((x, y, x + w // 2, y + h // 2)).save(crop)
            rows.append({"image": str(crop), "caption": PHOTO_CAPTIONS[photo.stem]})
    for label, name in CLASSES.items():
        for tile in sorted((SHARED / "lc25000-lung" / "images" / label).glob("*.jpeg"))[:10]:
            rows.append({"image": str(tile), "caption": f"an H&E histopathology image of {name}"})
    for tile in sorted((SHARED / "samples" / "crc").iterdir()):
        rows.append({"image": str(tile), "caption": "an H&E histopathology image of colon tissue"})
    random.Random(0).shuffle(rows)
    (root / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = train_plip.PlipTrainConfig.for_preset(
        "tiny",
        batch_size=16,
        max_steps=12,
        epochs=100,
        lr=1e-3,
        warmup_ratio=0.0,
        seed=0,
        text_init="scratch",
        text_layers=1,
        itm_weight=0.0,
        # The patch projection, which separates photographs from tiles within these 12 steps; the
        # recipe's convolutional stem starts slower (tests/test_vision_tower.py covers it).
        vision={"conv_stem": False},
        augment={"resolution": 0.1},
    )
    train_plip.train_plip(root / "captions.jsonl", root / "model", recipe, split=None)
    return root / "model"


@pytest.mark.slow
def test_plip_judge_rejects_photographs_and_keeps_unseen_tiles(tiny_plip, tmp_path):
    photos = sorted((SHARED / "samples" / "non-pathology").iterdir())
    unseen = [
        t
        for label in CLASSES
        for t in sorted((SHARED / "lc25000-lung" / "images" / label).glob("*.jpeg"))[100:103]
    ]
    caption = (
        "a section of human tissue stained with haematoxylin and eosin, photographed under the microscope "
        "at high power for this case"
    )
    records = [
        {"id": path.stem, "image": str(path), "caption": f"{caption} ({path.stem})"}
        for path in [*photos, *unseen]
    ]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in records))
    judge = {
        "type": "plip",
        "model_dir": str(tiny_plip),
        "threshold": 0.5,
        "pathology_prompts": [f"an H&E histopathology image of {name}" for name in CLASSES.values()],
        "non_pathology_prompts": list(PHOTO_CAPTIONS.values()),
    }
    summary = clean(corpus, tmp_path / "out", CleanConfig(workers=1, image_judge=judge), progress=False)
    rejected = [json.loads(line) for line in (tmp_path / "out" / "rejected.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in rejected) == sorted(p.stem for p in photos)
    assert {r["reason"] for r in rejected} == {"not pathology (PLIP)"}
    assert summary["kept"] == len(unseen)
