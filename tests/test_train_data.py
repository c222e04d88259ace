"""Training data: every input form becomes the same samples; global batches do not depend on the layout."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from pallava.data.shards import write_shards
from pallava.train.config import DataSection, Recipe
from pallava.train.data import (
    Collator,
    Sample,
    drop_overlong,
    epoch_order,
    load_samples,
    micro_batches,
    steps_per_epoch,
)
from pallava.train.feature_cache import FeatureCache, image_key, namespace_for


def test_global_batches_are_the_same_for_any_process_count_and_accumulation():
    order = epoch_order(40, seed=3, epoch=1)
    assert sorted(order) == list(range(40)) and order != epoch_order(40, seed=3, epoch=2)
    assert order == epoch_order(40, seed=3, epoch=1)
    for step in range(steps_per_epoch(40, 4, 2, 2)):
        one = micro_batches(order, step, batch_size=8, world_size=1, grad_accum=2, rank=0)
        two = [micro_batches(order, step, batch_size=4, world_size=2, grad_accum=2, rank=r) for r in (0, 1)]
        plain = micro_batches(order, step, batch_size=16, world_size=1, grad_accum=1, rank=0)
        flat = sorted(i for rank in two for micro in rank for i in micro)
        assert flat == sorted(i for micro in one for i in micro) == sorted(plain[0])
    with pytest.raises(ValueError, match="fewer than one global batch of 16"):
        steps_per_epoch(10, 4, 2, 2)


def test_manifest_stages_and_answer_type_filter(shared_data):
    manifest = str(shared_data / "lc25000-lung" / "manifest.csv")
    captions = load_samples(DataSection(path=manifest, split="dev"), "align")
    assert len(captions) == 120 and all(s.conversation[1]["from"] == "gpt" for s in captions)
    questions = load_samples(DataSection(path=manifest, split="dev", answer_types=["open"]), "instruct")
    # per image: the diagnosis, the diagnosis among listed names, benign or malignant
    assert len(questions) == 360 and {s.answer_type for s in questions} == {"open"}
    subset = load_samples(DataSection(path=manifest, split="dev", limit=7, seed=1), "instruct")
    assert len(subset) == 7
    with pytest.raises(ValueError, match="unknown \\['essay'\\]"):
        load_samples(DataSection(path=manifest, split="dev", answer_types=["essay"]), "instruct")


def test_answer_type_filter_applies_to_conversation_files(shared_data, tmp_path):
    """`data.answer_types` keeps the same questions whether they come from a manifest or from the
    conversation file built from it (it was ignored for conversation files)."""
    from pallava.data.builders import stage2_conversations, vqa_from_labels
    from pallava.data.importers.manifest import read_manifest
    from pallava.data.labels import LabelMap

    manifest = shared_data / "lc25000-lung" / "manifest.csv"
    items = read_manifest(manifest, "dev")[:6]
    vqa = vqa_from_labels(items, LabelMap.builtin("lc25000-lung"))
    path = tmp_path / "stage2.jsonl"
    path.write_text("".join(json.dumps(c.to_dict()) + "\n" for c in stage2_conversations(vqa)))
    every = load_samples(DataSection(path=str(path)), "instruct")
    assert {s.answer_type for s in every} == {"closed", "open", "choice"}
    kept = load_samples(DataSection(path=str(path), answer_types=["closed", "choice"]), "instruct")
    assert {s.answer_type for s in kept} == {"closed", "choice"}
    assert len(kept) == sum(1 for item in vqa if item.answer_type in ("closed", "choice"))


def test_jsonl_and_shards_with_embedded_images_give_the_same_batches(tiny, tmp_path, lung_tiles):
    model, processor = tiny
    records = []
    for index, tile in enumerate(lung_tiles):
        (tmp_path / tile.name).write_bytes(tile.read_bytes())
        records.append(
            {
                "id": f"r{index}",
                "image": tile.name,
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat is shown?"},
                    {"from": "gpt", "value": f"answer {index}"},
                ],
            }
        )
    records.append(
        {
            "id": "text",
            "image": None,
            "conversations": [{"from": "human", "value": "Hello?"}, {"from": "gpt", "value": "Hello."}],
        }
    )
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    write_shards(records, tmp_path / "shards", embed_images=True, image_root=tmp_path, progress=False)

    from_jsonl = load_samples(DataSection(path=str(jsonl)), "instruct")
    from_shards = load_samples(DataSection(path=str(tmp_path / "shards")), "instruct")
    assert [s.id for s in from_shards] == [s.id for s in from_jsonl] == ["r0", "r1", "r2", "text"]
    assert from_jsonl[0].image == str(tmp_path / lung_tiles[0].name)  # relative paths: the file's folder
    assert from_shards[0].image_bytes == lung_tiles[0].read_bytes()

    indices = [0, 3, 2]  # a text-only conversation between two with images
    pixels = Collator(processor, from_shards)(indices)
    assert pixels["pixel_values"].shape[0] == 2 and pixels["num_samples"] == 3
    keys = [image_key(s.read_image_bytes()) if s.image_source is not None else None for s in from_jsonl]
    assert keys[:3] == [image_key(s.image_bytes) for s in from_shards[:3]]
    cache = FeatureCache(
        tmp_path / "cache", namespace_for(model.vision_tower, -2, processor.image_processor, "auto")
    )
    cache.build(
        model.encode_crops,
        processor.image_processor,
        {k: s.image_source for k, s in zip(keys, from_jsonl, strict=True) if k},
        progress=False,
    )
    cached = Collator(processor, from_jsonl, cache, keys)(indices)
    for name in ("input_ids", "attention_mask", "labels", "tile_mask"):
        assert torch.equal(cached[name], pixels[name]), name
    assert cached["num_label_tokens"] == pixels["num_label_tokens"] > 0
    with torch.no_grad():
        direct = model.encode_crops(pixels["pixel_values"], pixels["tile_mask"])
    torch.testing.assert_close(cached["crop_features"], direct, rtol=1e-5, atol=1e-5)


def test_bad_records_are_named(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps(
            {
                "id": "x1",
                "image": "a.png",
                "conversations": [
                    {"from": "human", "value": "no placeholder"},
                    {"from": "gpt", "value": "y"},
                ],
            }
        )
        + "\n"
    )
    with pytest.raises(ValueError, match="bad.jsonl: line 1"):
        load_samples(DataSection(path=str(bad)), "align")
    with pytest.raises(ValueError, match="not found"):
        load_samples(DataSection(path=str(tmp_path / "missing.jsonl")), "align")


def _conversation(question: str, answer: str) -> list[dict[str, str]]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def test_an_overlong_sample_is_truncated_like_the_authors_not_an_error(tiny, tmp_path, lung_tiles):
    model, processor = tiny
    image_id = processor.image_token_id
    samples = [
        Sample("short", _conversation("<image>\nWhat is shown?", "tissue"), image=str(lung_tiles[0])),
        Sample(
            "long", _conversation("<image>\nDescribe.", " ".join(["tissue"] * 3000)), image=str(lung_tiles[1])
        ),
    ]
    full_ids, full_labels = processor.encode_conversation(samples[1].conversation)
    assert len(full_ids) > processor.max_length
    keys = [image_key(s.read_image_bytes()) for s in samples]
    cache = FeatureCache(tmp_path, namespace_for(model.vision_tower, -2, processor.image_processor, "auto"))
    cache.build(
        model.encode_crops,
        processor.image_processor,
        {k: s.image for k, s in zip(keys, samples, strict=True)},
        progress=False,
    )
    for batch in (Collator(processor, samples)([0, 1]), Collator(processor, samples, cache, keys)([0, 1])):
        assert batch["truncated"] == ["long"] and batch["num_samples"] == 2
        assert batch["input_ids"].shape[1] == processor.max_length
        # The image leads the text: the authors' cut, ids[:max_length], with the answer's labels cut alike.
        assert batch["input_ids"][1].tolist() == full_ids[: processor.max_length]
        assert batch["labels"][1].tolist() == full_labels[: processor.max_length]
        assert batch["input_ids"][1].tolist().count(image_id) == model.config.num_image_tokens
        short_ids, _ = processor.encode_conversation(samples[0].conversation)
        assert batch["input_ids"][0, : len(short_ids)].tolist() == short_ids  # the short sample is untouched


def test_truncation_keeps_an_image_that_follows_a_long_text_whole(tiny):
    _, processor = tiny
    conversation = _conversation(" ".join(["stroma"] * 3000) + "\n<image>", "tissue")
    ids, labels = processor.encode_conversation(conversation)
    cut_ids, cut_labels = processor.truncate(ids, labels)
    assert len(cut_ids) == len(cut_labels) == processor.max_length
    assert cut_ids.count(processor.image_token_id) == ids.count(processor.image_token_id) == 49
    text = [t for t in ids if t != processor.image_token_id]
    assert [t for t in cut_ids if t != processor.image_token_id] == text[: processor.max_length - 49]
    assert processor.truncate(ids[:10], labels[:10]) == (ids[:10], labels[:10])


def test_drop_policy_names_the_overlong_samples(tiny):
    _, processor = tiny
    samples = [
        Sample("a", _conversation("Hello?", "Hello.")),
        Sample("b", _conversation("Hi?", "x " * 3000)),
        Sample("c", _conversation("Why?", "Because.")),
    ]
    kept, dropped = drop_overlong(samples, processor)
    assert [s.id for s in kept] == ["a", "c"] and dropped == ["b"]
    with pytest.raises(ValueError, match="data.overlong must be one of truncate, drop"):
        Recipe(data=DataSection(path="x.jsonl", overlong="skip")).validate()


def test_several_manifests_keep_provenance_and_balance_an_epoch(shared_data):
    """Three datasets as one training set: every sample names its dataset, the small ones are repeated."""
    manifests = [
        str(shared_data / name / "manifest.csv") for name in ("lc25000-lung", "lc25000-colon", "oscc")
    ]
    section = DataSection(path=manifests, split="train", answer_types=["open"])
    samples = load_samples(section, "instruct")
    counts = Counter(s.dataset for s in samples)
    # 4 open questions per image (diagnosis, diagnosis among names, organ, malignancy); sqrt balancing: lung
    # (3,000 images) is kept once, colon (1,285) and oscc (295) are repeated so that shares follow sqrt(size).
    assert counts["lc25000-lung"] == 4 * 3000
    assert counts["lc25000-colon"] == pytest.approx(4 * (3000 * 1285) ** 0.5, abs=4)
    assert counts["oscc"] == pytest.approx(4 * (3000 * 295) ** 0.5, abs=4)
    answers = {s.conversation[1]["value"] for s in samples if s.dataset == "oscc"}
    assert answers == {
        "normal oral mucosa",
        "oral squamous cell carcinoma",
        "oral cavity",
        "benign",
        "malignant",
    }
    # over an epoch (one shuffled pass over the balanced list) the shares are as planned
    order = epoch_order(len(samples), seed=0, epoch=0)[: len(samples) // 2]
    half = Counter(samples[i].dataset for i in order)
    assert half["oscc"] / len(order) == pytest.approx(counts["oscc"] / len(samples), abs=0.02)
    unbalanced = load_samples(
        DataSection(path=manifests, split="train", answer_types=["open"], balance="none"), "instruct"
    )
    assert Counter(s.dataset for s in unbalanced)["oscc"] == 4 * 295


def test_balance_labels_evens_the_classes_of_each_dataset(shared_data):
    manifests = [str(shared_data / name / "manifest.csv") for name in ("lc25000-lung", "oscc")]
    section = DataSection(path=manifests, split="train", answer_types=["open"], balance="none")
    plain = Counter((s.dataset, s.label) for s in load_samples(section, "instruct"))
    assert plain[("oscc", "oral_n")] == 4 * 73 and plain[("oscc", "oral_scc")] == 4 * 222
    section.balance_labels = True
    even = Counter((s.dataset, s.label) for s in load_samples(section, "instruct"))
    assert even[("oscc", "oral_n")] == even[("oscc", "oral_scc")] == 4 * 222
    lung = {k for k in plain if k[0] == "lc25000-lung"}
    assert len(lung) == 3 and {even[k] for k in lung} == {max(plain[k] for k in lung)}


def test_augmented_views_spread_over_samples_and_are_encoded_once(tiny, tmp_path, lung_tiles):
    """Each question sees one version of its image; enlarged views go through the tiling path."""
    from pallava.train.config import AugmentSection
    from pallava.train.data import Sample, ViewMaker, assign_views

    model, processor = tiny
    samples = [
        Sample(
            f"q{i}",
            [{"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": "tissue"}],
            image=str(lung_tiles[i % 2]),
        )
        for i in range(60)
    ]
    assign_views(samples, views=2, seed=0)
    assert Counter(s.view for s in samples).keys() == {0, 1, 2}
    assert min(Counter(s.view for s in samples).values()) >= 10
    again = [Sample(s.id, s.conversation, image=s.image) for s in samples]
    assign_views(again, views=2, seed=0)
    assert [s.view for s in again] == [s.view for s in samples]  # a function of the sample's id

    views = ViewMaker(AugmentSection(views=2, large=1.0, image={"zoom": 0.0}), seed=0)
    view = views.view(lung_tiles[0], 1)
    assert view.size[0] >= 448 and view.size == view.size[::-1]  # enlarged 2-3x
    assert views.view(lung_tiles[0], 1).tobytes() == view.tobytes()  # reproducible
    assert views.view(lung_tiles[0], 2).tobytes() != view.tobytes()
    grid = processor.image_processor([view])["grids"][0]
    assert int(grid[0]) * int(grid[1]) > 1  # a larger image is cut into several tiles

    viewed = next(i for i, s in enumerate(samples) if s.view)
    original = next(i for i, s in enumerate(samples) if not s.view and s.image == samples[viewed].image)
    batch = Collator(processor, samples, views=views)([original, viewed])
    assert batch["tile_mask"][0].sum() == 1 and batch["tile_mask"][1].sum() > 1

    # the feature cache encodes a view from a function, once
    cache = FeatureCache(
        tmp_path / "cache", namespace_for(model.vision_tower, -2, processor.image_processor, "auto")
    )
    encoded = cache.build(
        model.encode_crops,
        processor.image_processor,
        {"v1": lambda: views.view(lung_tiles[0], 1)},
        progress=False,
    )
    assert encoded == 1 and cache.get("v1")[1] == tuple(int(v) for v in grid)
    assert (
        cache.build(model.encode_crops, processor.image_processor, {"v1": lambda: 1 / 0}, progress=False) == 0
    )


def test_type_weights_shape_the_limited_subset():
    from pallava.train.data import subset_indices

    kinds = ["open"] * 600 + ["closed"] * 300 + ["choice"] * 100
    uniform = subset_indices(kinds, 200, seed=3)
    assert uniform == subset_indices(kinds, 200, seed=3) and len(set(uniform)) == 200
    weighted = subset_indices(kinds, 200, seed=3, type_weights={"open": 0.25})
    assert len(set(weighted)) == 200 and weighted == sorted(weighted)
    share = {k: sum(kinds[i] == k for i in weighted) / 200 for k in ("open", "closed", "choice")}
    # open questions weigh a quarter: far fewer of them than their 60% share of the pool
    assert share["open"] < 0.45 and share["closed"] > 0.35 and share["choice"] > 0.1
    with pytest.raises(ValueError, match="unknown \\['essay'\\]"):
        subset_indices(kinds, 10, 0, {"essay": 2})
    with pytest.raises(ValueError, match="positive"):
        subset_indices(kinds, 10, 0, {"open": 0})
    with pytest.raises(ValueError, match="set data.limit"):
        load_samples(DataSection(path="x.jsonl", type_weights={"open": 1}), "instruct")
