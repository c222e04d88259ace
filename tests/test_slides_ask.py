"""`slide ask` on the real Aperio sample with the tiny random assistant: regions, retrieval, crops, errors."""

import json
from pathlib import Path

import numpy as np
import openslide
import pytest
from PIL import Image

from pallava.cli import main
from pallava.slides.ask import Region, ask_regions, parse_region, read_region_for_assistant, retrieve_regions
from pallava.slides.cache import EmbeddingCache
from pallava.slides.mapping import TilingOptions, embed_grid, prepare_slide
from pallava.slides.reader import open_slide

QUESTION = "What tissue is shown?"


@pytest.fixture(scope="module")
def assistant(tiny):
    from pallava.inference import PaLlava

    model, processor = tiny
    return PaLlava(model, processor)


def test_ask_about_a_region_answers_on_the_exact_crop(svs, assistant, tmp_path):
    region = parse_region("900, 1500, 300, 200")
    with open_slide(svs) as slide:
        (answer,) = ask_regions(slide, assistant, [region], QUESTION, tmp_path, max_new_tokens=4)
    expected = openslide.OpenSlide(str(svs)).read_region((900, 1500), 0, (300, 200)).convert("RGB")
    with Image.open(answer.crop) as crop:
        assert crop.size == (300, 200) == answer.crop_size
        assert np.array_equal(np.asarray(crop.convert("RGB")), np.asarray(expected))
    assert isinstance(answer.answer, str)
    assert answer.answer == assistant.ask(
        expected, QUESTION, max_new_tokens=4
    )  # greedy: same pixels, same answer
    record = json.loads((tmp_path / "answers.json").read_text())
    assert record["question"] == QUESTION
    assert record["regions"] == [
        {
            "x": 900,
            "y": 1500,
            "w": 300,
            "h": 200,
            "score": None,
            "crop": str(answer.crop),
            "crop_size": [300, 200],
            "answer": answer.answer,
        },
    ]


def test_large_regions_are_read_shrunk_and_bad_regions_rejected(svs, assistant, tmp_path):
    with open_slide(svs) as slide:
        whole = read_region_for_assistant(slide, Region(0, 0, 2220, 2967), max_side=512)
        assert whole.size == (383, 512)
        for text, message in (
            ("1,2,3", "four integers"),
            ("a,b,c,d", "four integers"),
            ("0,0,0,5", "positive"),
        ):
            with pytest.raises(ValueError, match=message):
                parse_region(text)
        with pytest.raises(ValueError, match=r"outside cmu_small_region\.svs \(2220 x 2967 px at level 0\)"):
            ask_regions(slide, assistant, [Region(2100, 0, 200, 100)], QUESTION, tmp_path)
        with pytest.raises(ValueError, match="question must not be empty"):
            ask_regions(slide, assistant, [Region(0, 0, 10, 10)], " ", tmp_path)
    assert not list(tmp_path.iterdir())  # nothing is written for a rejected request


def test_query_retrieves_the_most_similar_tissue_tiles(svs, tmp_path):
    from pallava.models.plip import PlipZeroShot, build_plip

    model, tokenizer = build_plip("tiny", text_init="scratch", text_layers=1, seed=0)
    plip = PlipZeroShot(model, tokenizer)
    with open_slide(svs) as slide:
        grid = prepare_slide(slide, TilingOptions(mpp=2.0, thumbnail_side=512)).grid
        vectors = embed_grid(slide, grid, plip, EmbeddingCache(tmp_path, {"test": 1}), batch_size=16)
    regions = retrieve_regions(grid, vectors, plip, "keratinising squamous epithelium", top_k=3)
    similarity = vectors @ plip.encode_texts(["keratinising squamous epithelium"])[0].numpy()
    assert [r.score for r in regions] == pytest.approx(sorted(similarity, reverse=True)[:3], abs=1e-5)
    assert all(a.score >= b.score for a, b in zip(regions, regions[1:], strict=False))
    boxes = {tile.box for tile in grid.tiles}
    assert all((r.x, r.y, r.w, r.h) in boxes for r in regions if r.x + r.w < 2220 and r.y + r.h < 2967)
    everything = retrieve_regions(grid, vectors, plip, "x", top_k=100)
    assert len(everything) == len(grid)
    # Edge tiles run past the slide; the regions handed to the assistant are clipped to it.
    assert any(t.x + t.w > 2220 or t.y + t.h > 2967 for t in grid.tiles)
    assert all(r.x + r.w <= 2220 and r.y + r.h <= 2967 for r in everything)
    assert {(r.x, r.y) for r in everything} == {(t.x, t.y) for t in grid.tiles}
    with pytest.raises(ValueError, match="--top-k must be at least 1"):
        retrieve_regions(grid, vectors, plip, "x", top_k=0)


@pytest.mark.slow
def test_ask_command_with_a_region(svs, assistant, tmp_path, capsys):
    model_dir = tmp_path / "assistant"
    assistant.save_pretrained(model_dir)
    out = tmp_path / "answers"
    argv = [
        "slide",
        "ask",
        "--slide",
        str(svs),
        "--model",
        str(model_dir),
        "--region",
        "1000,1000,448,448",
        "--out",
        str(out),
        "--max-new-tokens",
        "4",
        QUESTION,
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    record = json.loads((out / "answers.json").read_text())
    (answer,) = record["regions"]
    assert f"region x=1000 y=1000 w=448 h=448: {answer['answer']}" in printed
    assert Path(answer["crop"]).is_file()

    query = ["slide", "ask", "--slide", str(svs), "--model", str(model_dir), "--query", "tumour", QUESTION]
    assert main(query) == 1
    assert "--query needs --plip" in capsys.readouterr().err
