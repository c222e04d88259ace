"""The server's image feature cache: a resent image skips the vision tower, and answers do not change."""

from __future__ import annotations

import io
import threading

import pytest
import torch
from PIL import Image

from pallava.inference import PaLlava
from pallava.models.image_features import ImageFeatureCache, pixel_key
from pallava.serve.app import ServerSettings
from pallava.serve.engine import BatchingEngine, GenerationOptions, Job

SMALL = Image.new("RGB", (224, 224), (200, 120, 180))
OTHER = Image.new("RGB", (224, 224), (90, 40, 160))
LARGE = Image.effect_noise((600, 400), 40).convert("RGB")  # several tiles


def tiled(processor, image: Image.Image):
    result = processor.image_processor.tile(image)
    result.key = pixel_key(image)
    return result


def counting_encoder(model, monkeypatch) -> list[int]:
    """Record how many images each call of the vision tower's `encode_crops` takes."""
    calls: list[int] = []
    original = model.encode_crops

    def encode(pixel_values, tile_mask):
        calls.append(pixel_values.shape[0])
        return original(pixel_values, tile_mask)

    monkeypatch.setattr(model, "encode_crops", encode)
    return calls


def test_pixel_key_follows_the_pixels_not_the_encoding():
    png = io.BytesIO()
    SMALL.save(png, format="PNG")
    assert pixel_key(Image.open(io.BytesIO(png.getvalue())).convert("RGB")) == pixel_key(SMALL)
    assert pixel_key(OTHER) != pixel_key(SMALL)
    assert pixel_key(SMALL.resize((112, 112))) != pixel_key(SMALL)


def test_cached_features_equal_the_towers_and_only_unseen_images_are_encoded(tiny, monkeypatch):
    model, processor = tiny
    cache = ImageFeatureCache(model, max_images=8)
    first = [tiled(processor, image) for image in (SMALL, LARGE, SMALL)]
    stacked = processor.image_processor.stack(first)
    with torch.inference_mode():
        expected = model.encode_crops(stacked["pixel_values"], stacked["tile_mask"])
    calls = counting_encoder(model, monkeypatch)
    torch.testing.assert_close(cache.crop_features(first, stacked), expected, rtol=0, atol=0)
    assert calls == [2] and len(cache) == 2  # each image once, SMALL's second row read from the first
    # A later batch (the next chat turn) with one seen and one new image: only the new one is encoded.
    second = [tiled(processor, image) for image in (LARGE, OTHER)]
    stacked = processor.image_processor.stack(second)
    features = cache.crop_features(second, stacked)
    assert calls == [2, 1] and (cache.hits, cache.misses) == (2, 3)
    with torch.inference_mode():
        torch.testing.assert_close(
            features, model.encode_crops(stacked["pixel_values"], stacked["tile_mask"]), rtol=0, atol=0
        )


def test_the_least_recently_used_image_leaves_first(tiny, monkeypatch):
    model, processor = tiny
    cache = ImageFeatureCache(model, max_images=2)
    calls = counting_encoder(model, monkeypatch)
    for image in (SMALL, OTHER, SMALL, LARGE, SMALL, OTHER):  # LARGE pushes OTHER out, SMALL was used last
        batch = [tiled(processor, image)]
        cache.crop_features(batch, processor.image_processor.stack(batch))
    assert len(cache) == 2 and calls == [1, 1, 1, 1]  # SMALL, OTHER, LARGE, then OTHER again
    unkeyed = [processor.image_processor.tile(SMALL)]  # no key (not from the server): always encoded
    cache.crop_features(unkeyed, processor.image_processor.stack(unkeyed))
    assert calls[-1] == 1 and len(cache) == 2
    with pytest.raises(ValueError, match="at least 1 image"):
        ImageFeatureCache(model, max_images=0)


def ask_in_turns(
    engine: BatchingEngine, assistant: PaLlava, turns: list[tuple[Image.Image, str]]
) -> list[str]:
    """Each (image, question) as its own request, one after the other, as a chat's turns arrive."""
    answers = []
    for image, question in turns:
        done, box = threading.Event(), {}
        job = Job(
            assistant.processor.question(question, True),
            [tiled(assistant.processor, image)],
            GenerationOptions(10),
            120.0,
            lambda result, box=box, done=done: (box.update(result=result), done.set()),
        )
        engine.submit(job)
        assert done.wait(120)
        answers.append(box["result"].text)
    return answers


def test_the_engine_answers_resent_images_the_same_from_the_cache(tiny, monkeypatch):
    assistant = PaLlava(*tiny)
    turns = [(LARGE, "What is shown?"), (LARGE, "Is this malignant?"), (SMALL, "Which organ?")]
    turns.append((LARGE, "And the grade?"))
    alone = [
        assistant.generate([assistant.processor.question(q, True)], [[i]], max_new_tokens=10)[0]
        for i, q in turns
    ]
    calls = counting_encoder(assistant.model, monkeypatch)
    engine = BatchingEngine(assistant, image_cache=4)
    engine.start()
    try:
        assert ask_in_turns(engine, assistant, turns) == alone
    finally:
        engine.close()
    assert calls == [1, 1]  # LARGE once, SMALL once
    stats = engine.stats
    assert (stats["image_cache_hits"], stats["image_cache_misses"]) == (2, 2)
    with pytest.raises(ValueError, match="image_cache"):
        BatchingEngine(assistant, image_cache=-1)
    with pytest.raises(ValueError, match="server setting image_cache"):
        ServerSettings(image_cache=-1)


def test_a_remembering_assistant_encodes_each_image_once_and_answers_the_same(tiny, monkeypatch):
    """`PaLlava.remember_images` (the evaluation's assistant): questions about an image already seen skip the
    vision tower; the features it gives are the tower's, so the answers do not change."""
    model, processor = tiny
    images = [SMALL, LARGE, SMALL, OTHER, LARGE, SMALL]
    questions = ["What is shown?", "Is there tumour?", "Which organ is this?"] * 2
    expected = PaLlava(model, processor).ask_batch(images, questions, batch_size=2, max_new_tokens=6)
    plain = processor.image_processor([LARGE, SMALL])
    with torch.inference_mode():
        fresh = model.encode_crops(plain["pixel_values"], model.tiles_to_encode(plain["tile_mask"]))
    answers = ["lung", "colon adenocarcinoma"]
    once = PaLlava(model, processor).answer_log_likelihoods(OTHER, "Which organ?", answers)
    remembering = PaLlava(model, processor).remember_images(max_images=8)
    calls = counting_encoder(model, monkeypatch)
    assert remembering.ask_batch(images, questions, batch_size=2, max_new_tokens=6) == expected
    # SMALL padded to LARGE's tiles is another row of crops than SMALL alone: 2 + 2 encoded, the last 2 known
    assert calls == [2, 2] and remembering.image_memory.hits == 2
    inputs = remembering._inputs([processor.question("Which organ?", True)] * 2, [[LARGE], [SMALL]])
    torch.testing.assert_close(inputs["crop_features"], fresh, rtol=1e-5, atol=1e-5)
    assert calls == [2, 2]  # that batch too came from memory
    assert remembering.answer_log_likelihoods(OTHER, "Which organ?", answers) == pytest.approx(once, abs=1e-5)
    assert calls == [2, 2]  # OTHER was seen alone before
