"""Builders: generated captions/VQA from labelled images and LLaVA conversations for both stages."""

import string
from collections import Counter

import pytest

from pallava.data.builders import (
    CAPTION_INSTRUCTIONS,
    captions_from_labels,
    stage1_conversations,
    stage2_conversations,
    vqa_from_labels,
)
from pallava.data.importers.manifest import read_manifest
from pallava.data.labels import LabelMap
from pallava.data.records import CaptionPair, LabelledImage, VQAItem
from pallava.eval.choice import extract_option_letter


@pytest.fixture(scope="module")
def dev_items(lung):
    return read_manifest(lung / "manifest.csv", split="dev")


@pytest.fixture(scope="module")
def labels():
    return LabelMap.builtin("lc25000-lung")


def test_captions_use_class_names_and_are_marked_generated(dev_items, labels):
    captions = captions_from_labels(dev_items, labels, seed=3)
    assert len(captions) == len(dev_items) and len({c.id for c in captions}) == len(captions)
    for item, caption in zip(dev_items, captions, strict=True):
        assert caption.image == item.path
        assert any(name in caption.caption for name in labels[item.label].all_names())
        assert caption.meta["generated"] is True and caption.meta["label"] == item.label
        assert len(caption.caption.split()) >= 20  # passes the cleaner's default length filter
    assert len({c.caption for c in captions}) > 20  # several phrasings and synonyms
    assert captions == captions_from_labels(dev_items, labels, seed=3)
    assert captions != captions_from_labels(dev_items, labels, seed=4)


def test_vqa_is_balanced_and_answers_are_correct(dev_items, labels):
    vqa = [v for v in vqa_from_labels(dev_items, labels, seed=0) if v.meta["question"] == "diagnosis"]
    vqa = [v for v in vqa if not v.id.endswith("-named")]  # the class-name list question: tested below
    assert len(vqa) == 5 * len(dev_items)
    closed = [v for v in vqa if v.answer_type == "closed"]
    assert Counter(v.answer for v in closed) == {"yes": len(dev_items), "no": len(dev_items)}
    by_path = {item.path: item.label for item in dev_items}
    positions = Counter()
    for item in vqa:
        label = by_path[item.image]
        assert item.meta["generated"] is True
        if item.answer_type == "open":
            assert item.answer == labels[label].name
        elif item.answer_type == "choice":
            assert sorted(item.options) == sorted(labels.names())
            assert item.options[string.ascii_uppercase.index(item.answer)] == labels[label].name
            positions[item.answer] += 1
        elif item.answer == "yes":
            assert any(n in item.question for n in labels[label].all_names())
        else:
            assert not any(n in item.question for n in labels[label].all_names())
    assert set(positions) == {"A", "B", "C"}  # correct option moves around
    by_id = {v.id: v for v in vqa}
    for first in (v for v in vqa if v.id.endswith("-choice")):
        again = by_id[first.id + "-reordered"]  # the same question, the correct option under another letter
        assert again.question == first.question and sorted(again.options) == sorted(first.options)
        assert again.answer != first.answer
        assert again.options[string.ascii_uppercase.index(again.answer)] == labels[by_path[first.image]].name


def test_vqa_per_record_seeding_ignores_batch_composition(dev_items, labels):
    whole = {v.id: v for v in vqa_from_labels(dev_items, labels, seed=1)}
    part = vqa_from_labels(dev_items[5:9], labels, seed=1)
    assert all(whole[v.id] == v for v in part)


def test_unknown_label_and_single_class_errors(labels):
    with pytest.raises(ValueError, match=r"image x.jpg: field 'label': 'cat'"):
        vqa_from_labels([LabelledImage("x.jpg", "cat")], labels)
    single = LabelMap.from_dict({"a": {"name": "alpha"}})
    with pytest.raises(ValueError, match="at least 2 classes"):
        vqa_from_labels([LabelledImage("x.jpg", "a")], single)


def test_stage1_conversations_vary_instruction_and_image_position():
    captions = [CaptionPair(f"{i}.jpg", f"caption number {i}", f"id{i}") for i in range(400)]
    conversations = stage1_conversations(captions, seed=0)
    assert len(CAPTION_INSTRUCTIONS) >= 20
    instructions, first = Counter(), 0
    for caption, conversation in zip(captions, conversations, strict=True):
        human, gpt = conversation.conversations
        assert human["from"] == "human" and gpt == {"from": "gpt", "value": caption.caption}
        assert human["value"].count("<image>") == 1
        first += human["value"].startswith("<image>\n")
        instructions[human["value"].replace("<image>", "").strip()] += 1
        assert conversation.image == caption.image and conversation.id == caption.id
    assert set(instructions) == set(CAPTION_INSTRUCTIONS)
    assert 150 < first < 250
    assert [c.to_dict() for c in stage1_conversations(captions, seed=0)] == [
        c.to_dict() for c in conversations
    ]


def test_stage2_prompts_per_answer_type():
    items = [
        VQAItem("c", "a.jpg", "Is this benign?", "Yes", "closed"),
        VQAItem("o", "a.jpg", "What organ?", "lung", "open"),
        VQAItem("m", "a.jpg", "Which one?", "B", "choice", ["alpha", "beta", "gamma"]),
    ]
    closed, open_, choice = (c.to_dict()["conversations"] for c in stage2_conversations(items))
    assert closed[0]["value"].startswith("<image>\nIs this benign?") and "yes or no" in closed[0]["value"]
    assert closed[1]["value"] == "yes"
    assert open_ == [{"from": "human", "value": "<image>\nWhat organ?"}, {"from": "gpt", "value": "lung"}]
    assert "Options:\nA. alpha\nB. beta\nC. gamma\n" in choice[0]["value"]
    assert choice[1]["value"] == "beta, option B"  # named first, then the letter copied from the list
    assert extract_option_letter(choice[1]["value"], items[2].options) == "B"
    with pytest.raises(ValueError, match=r"question m: choice answer 'D' is not the letter of one of its 3"):
        stage2_conversations([VQAItem("m", "a.jpg", "Which one?", "D", "choice", ["alpha", "beta", "gamma"])])


@pytest.fixture(scope="module")
def three_organs(shared_data):
    from pallava.data.datasets import parse_data_args, read_labelled

    datasets = parse_data_args([shared_data / name for name in ("lc25000-lung", "lc25000-colon", "oscc")])
    return read_labelled(datasets, "dev")


def test_questions_span_organs_and_malignancy(three_organs):
    label_map = LabelMap.builtin("lung-colon-oral")
    vqa = vqa_from_labels(three_organs, label_map, seed=0)
    by_path = {item.path: label_map[item.label] for item in three_organs}
    kinds = Counter((v.meta["question"], v.answer_type) for v in vqa)
    n = len(three_organs)
    assert kinds == {
        ("diagnosis", "closed"): 2 * n,
        ("diagnosis", "open"): 2 * n,
        ("diagnosis", "choice"): 2 * n,
        ("organ", "open"): n,
        ("organ", "closed"): n,
        ("malignancy", "closed"): n,
        ("malignancy", "open"): n,
    }
    closed = Counter(v.answer for v in vqa if v.answer_type == "closed" and v.meta["question"] != "diagnosis")
    assert abs(closed["yes"] - closed["no"]) < 0.15 * n  # organ and malignancy yes/no roughly balanced
    other_organ_options = 0
    for v in vqa:
        info = by_path[v.image]
        assert v.meta["dataset"] in ("lc25000-lung", "lc25000-colon", "oscc")
        if v.id.endswith("-named"):
            assert v.answer == info.name and info.name in v.question
        elif v.meta["question"] == "organ" and v.answer_type == "open":
            assert v.answer == info.organ
        elif v.meta["question"] == "organ":
            assert (v.answer == "yes") == (info.organ in v.question)
        elif v.meta["question"] == "malignancy" and v.answer_type == "open":
            assert v.answer == ("malignant" if info.malignant else "benign")
        elif v.answer_type == "choice":
            assert len(v.options) == 4 and v.options[string.ascii_uppercase.index(v.answer)] == info.name
            organs = {label_map[label_map.label_for(o)].organ for o in v.options}
            other_organ_options += len(organs) > 1
            trained = stage2_conversations([v])[0].conversations[1]["value"]
            assert trained == f"{info.name}, option {v.answer}"
            assert extract_option_letter(trained, v.options) == v.answer  # the scorer reads what is trained
    assert other_organ_options == 2 * n  # 7 classes: every choice question mixes organs


def test_captions_vary_wording_and_name_the_organ(three_organs):
    label_map = LabelMap.builtin("lung-colon-oral")
    captions = captions_from_labels(three_organs, label_map, seed=0)
    for item, caption in zip(three_organs, captions, strict=True):
        info = label_map[item.label]
        assert info.organ in caption.caption and any(n in caption.caption for n in info.all_names())
        assert caption.meta["dataset"] == item.dataset
    openings = Counter(" ".join(c.caption.split()[:3]) for c in captions)
    assert len(openings) >= 8  # not one template
    assert sum("malignan" in c.caption or "benign" in c.caption for c in captions) > len(captions) // 4


def test_every_caption_names_the_diagnosis_within_plips_30_tokens(three_organs):
    from pallava.models.plip.text_init import load_tokenizer

    tokenizer = load_tokenizer()
    label_map = LabelMap.builtin("lung-colon-oral")
    for caption in captions_from_labels(three_organs, label_map, seed=0):
        ids = tokenizer(caption.caption, truncation=True, max_length=30)["input_ids"]

        def letters(text):
            return "".join(c for c in text.lower() if c.isalnum())

        kept = letters(tokenizer.decode(ids, skip_special_tokens=True))
        names = label_map[caption.meta["label"]].all_names()
        assert any(letters(name) in kept for name in names), caption.caption
