"""PLIP data: manifests and caption JSONL become samples with match keys; captions, augmentation, errors."""

import json
import random

import numpy as np
import pytest
import torch

from pallava.data.labels import LabelMap
from pallava.models.plip import build_plip
from pallava.models.plip.prompts import CAPTION_TEMPLATES, ZEROSHOT_TEMPLATES, caption_for, class_prompts
from pallava.models.plip.text_init import load_tokenizer
from pallava.models.plip.zeroshot import recall_at_k
from pallava.processing.augment import Augmentation, augment
from pallava.train.plip_data import PlipCollator, PlipDataset, read_plip_data
from pallava.train.plip_eval import classification_metrics


def test_manifest_samples_share_text_keys_within_a_class(lung):
    samples, label_map = read_plip_data(lung / "manifest.csv", "dev")
    assert label_map.labels() == ["lung_aca", "lung_n", "lung_scc"]  # picked automatically: the built-in map
    assert len(samples) == 120
    by_label: dict[str, set[int]] = {}
    for sample in samples:
        by_label.setdefault(sample.label, set()).add(sample.text_key)
    assert all(len(keys) == 1 for keys in by_label.values())
    assert len({next(iter(k)) for k in by_label.values()}) == 3
    assert len({s.image_key for s in samples}) == 120


def test_caption_jsonl_keys_identical_captions_alike(tmp_path, lung):
    image = next((lung / "images" / "lung_n").iterdir())
    lines = [
        {"image": str(image), "caption": "Benign  lung tissue."},
        {"image": str(image), "caption": "benign lung tissue."},
        {"image": str(image), "caption": "Alveoli with thin septa.", "split": "dev"},
        {
            "image": str(image),
            "caption": "Normal lung parenchyma.",
            "meta": {"label": "lung_n", "split": "train"},
        },
        {"image": str(image), "caption": "Benign pulmonary tissue.", "meta": {"label": "lung_n"}},
    ]
    path = tmp_path / "captions.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    samples, label_map = read_plip_data(path, split="train")
    assert len(samples) == 4  # the dev record is filtered out
    # captions generated from labels (meta.label) bring the label map covering them, saved with the model
    assert label_map.labels() == ["lung_aca", "lung_n", "lung_scc"]
    assert samples[0].text_key == samples[1].text_key
    assert samples[2].text_key == samples[3].text_key != samples[0].text_key  # generated from one label
    assert samples[0].caption == "Benign  lung tissue."
    unlabelled = tmp_path / "real.jsonl"
    unlabelled.write_text("".join(json.dumps(line) + "\n" for line in lines[:2]))
    assert read_plip_data(unlabelled, split=None)[1] is None  # a real corpus has no classes


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"image": "x.png"}\n', "line 1: field 'caption'"),
        ("not json\n", "line 1: not valid JSON"),
        ('{"image": "missing.png", "caption": "a"}\n', "line 1: field 'image': file not found"),
        ("[1]\n", "line 1: expected a JSON object"),
    ],
)
def test_bad_caption_records_name_the_line_and_field(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        read_plip_data(path, None)


def test_labels_outside_the_label_map_are_rejected(tmp_path, lung):
    manifest = tmp_path / "m.csv"
    image = next((lung / "images" / "lung_n").iterdir())
    manifest.write_text(f"path,label\n{image},mystery\n")
    with pytest.raises(ValueError, match="no built-in label map covers"):
        read_plip_data(manifest, None)
    with pytest.raises(ValueError, match=r"\['mystery'\] are not in the label map"):
        read_plip_data(manifest, None, label_map="lc25000-lung")


def test_captions_vary_with_epoch_and_name_the_class(lung):
    samples, label_map = read_plip_data(lung / "manifest.csv", "dev")
    dataset = PlipDataset(samples[:4], 224, label_map, seed=0)
    first = [dataset[i]["caption"] for i in range(4)]
    assert first == [dataset[i]["caption"] for i in range(4)]  # reproducible
    dataset.set_epoch(1)
    assert first != [dataset[i]["caption"] for i in range(4)]
    names = label_map[samples[0].label].all_names()
    assert any(name in first[0] for name in names)
    item = dataset[0]
    assert item["pixel_values"].shape == (3, 224, 224)
    assert item["match_keys"].tolist() == [samples[0].image_key, samples[0].text_key]


def test_cached_images_are_the_decoded_ones_in_sample_order_and_shared_by_repeats(lung):
    """`cache_images` decodes each image once: every sample, a repeat of an image by dataset
    balancing too, gets that image's pixels, in the samples' order."""
    samples, label_map = read_plip_data(lung / "manifest.csv", "dev")
    repeated = [samples[0], *samples[:12], samples[5]]  # repeats at both ends
    dataset = PlipDataset(repeated, 224, label_map, train=False)
    expected = [dataset[i]["pixel_values"] for i in range(len(repeated))]
    dataset.cache_images(progress=False)
    for i, pixels in enumerate(expected):
        assert torch.equal(dataset[i]["pixel_values"], pixels), i
    assert dataset._cache[0] is dataset._cache[1] and dataset._cache[6] is dataset._cache[-1]
    assert len({id(array) for array in dataset._cache}) == 12


def test_collator_pads_and_truncates(lung):
    samples, label_map = read_plip_data(lung / "manifest.csv", "dev")
    dataset = PlipDataset(samples[:3], 224, label_map, train=False)
    batch = PlipCollator(load_tokenizer(), 30)([dataset[i] for i in range(3)])
    assert batch["pixel_values"].shape == (3, 3, 224, 224)
    assert batch["input_ids"].shape == batch["attention_mask"].shape and batch["input_ids"].shape[1] <= 30
    assert batch["match_keys"].shape == (3, 2)


@pytest.mark.parametrize(("trainable", "channels"), [(0, 1280), (2, 192)])
def test_collator_with_a_backbone_hands_over_its_maps_of_the_images(lung, trainable, channels):
    """`backbone_in_loader`: the loader worker's batch carries the maps of the backbone's frozen steps (all of
    them, or those below `pretrained_stem_trainable`)."""
    samples, label_map = read_plip_data(lung / "manifest.csv", "dev")
    dataset = PlipDataset(samples[:3], 224, label_map, train=False)
    items = [dataset[i] for i in range(3)]
    vision = {
        "conv_stem": False,
        "pretrained_stem": "efficientnet-lite0",
        "pretrained_stem_trainable": trainable,
    }
    model, _ = build_plip("tiny", vision=vision)
    stem = model.vision_model.embeddings.patch_embedding
    batch = PlipCollator(load_tokenizer(), 30, backbone=stem)(items)
    plain = PlipCollator(load_tokenizer(), 30)(items)
    assert batch["pixel_values"].shape == (3, channels, 7, 7)
    torch.testing.assert_close(batch["pixel_values"], stem.frozen_maps(plain["pixel_values"]), rtol=0, atol=0)
    if not trainable:
        torch.testing.assert_close(
            batch["pixel_values"], stem.features(plain["pixel_values"]), rtol=0, atol=0
        )
    assert torch.equal(batch["input_ids"], plain["input_ids"])


def test_augment_keeps_shape_range_and_content():
    rng = random.Random(0)
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    out = augment(image, rng, Augmentation(zoom=0.0, stain=0.0))
    assert out.shape == image.shape and out.min() >= 0 and out.max() <= 255
    # A rotation/flip with jitter: the sorted intensities move only a little.
    assert np.abs(np.sort(out.ravel()) - np.sort(image.astype(np.float32).ravel())).mean() < 20


def test_prompts_cover_every_class_name():
    label_map = LabelMap.builtin("lc25000-lung")
    prompts = class_prompts(label_map)
    assert len(prompts) == 3
    assert all(
        len(p) == len(ZEROSHOT_TEMPLATES) * len(info.all_names())
        for p, info in zip(prompts, label_map.values(), strict=True)
    )
    assert "an H&E image of lung adenocarcinoma." in prompts[0]
    rng = random.Random(0)
    captions = {caption_for(label_map["lung_n"], rng) for _ in range(200)}
    assert len(captions) > 30
    assert len(CAPTION_TEMPLATES) >= 10


def test_classification_metrics_and_recall():
    report = classification_metrics(["a", "a", "b", "c"], ["a", "b", "b", "c"], ["a", "b", "c"])
    assert report["accuracy"] == 0.75 and report["n"] == 4
    assert report["confusion_matrix"] == [[1, 1, 0], [0, 1, 0], [0, 0, 1]]
    assert report["per_class"]["a"]["recall"] == 0.5
    similarity = np.array([[0.9, 0.1, 0.0], [0.2, 0.1, 0.8], [0.0, 0.5, 0.4]])
    recall = recall_at_k(similarity, np.eye(3, dtype=bool), ks=(1, 2))
    assert recall == {"R@1": pytest.approx(1 / 3), "R@2": pytest.approx(2 / 3)}
