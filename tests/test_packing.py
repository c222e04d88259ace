"""Questions packed by image: the same answers' losses and gradients as separate samples, in fewer rows."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from pallava.processing.processor import IGNORE_INDEX
from pallava.train.config import DataSection, Recipe
from pallava.train.data import Collator, Sample
from pallava.train.packing import PAD_SEGMENT, answers_in, pack_questions
from pallava.train.trainer import AssistantTask

QUESTIONS = (
    ("Is this malignant?\nAnswer yes or no.", "yes"),
    ("What is the diagnosis?", "lung adenocarcinoma"),
    ("Which organ is this tissue from?", "lung"),
    (
        "What is the diagnosis?\nOptions:\nA. benign lung tissue\nB. lung adenocarcinoma",
        "lung adenocarcinoma, option B",
    ),
    ("Describe the tissue.", "glands lined by atypical columnar cells invading the stroma"),
)


def _question(sample_id: str, image: str, question: str, answer: str, view: int = 0) -> Sample:
    conversation = [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]
    return Sample(id=sample_id, conversation=conversation, image=image, view=view, dataset="lung")


@pytest.fixture
def samples(shared_data) -> list[Sample]:
    """Five questions about one image, two about another, and one without an image, interleaved."""
    first = str(next((shared_data / "lc25000-lung" / "images" / "lung_aca").glob("*.jpeg")))
    second = str(next((shared_data / "lc25000-lung" / "images" / "lung_n").glob("*.jpeg")))
    out = [_question(f"a{i}", first, q, a) for i, (q, a) in enumerate(QUESTIONS)]
    out.insert(2, _question("b0", second, "Is this malignant?\nAnswer yes or no.", "no"))
    out.insert(4, _question("b1", second, "Which organ is this tissue from?", "lung"))
    text_only = [{"from": "human", "value": "What is H&E?"}, {"from": "gpt", "value": "a stain"}]
    out.append(Sample(id="t0", conversation=text_only))
    return out


def test_packs_group_one_image_and_view_evenly_and_lose_no_question(samples, tiny):
    _, processor = tiny
    samples = [*samples, dataclasses.replace(samples[0], id="a0-view", view=1)]
    packed = pack_questions(samples, 4, processor, seed=0)
    members = [m.id for unit in packed for m in (unit.pack.members if unit.pack else [unit])]
    assert sorted(members) == sorted(s.id for s in samples)  # every question once
    sizes = sorted(len(unit.pack.members) for unit in packed if unit.pack)
    assert sizes == [2, 2, 3]  # five questions about the first image make 3 + 2, not 4 + 1
    for unit in packed:
        group = unit.pack.members if unit.pack else [unit]
        assert len({(m.image, m.view) for m in group}) == 1 and (unit.image, unit.view) == (
            group[0].image,
            group[0].view,
        )
    assert [unit.id for unit in packed if not unit.pack] == ["t0", "a0-view"]  # no image; a view alone
    assert [u.id for u in pack_questions(samples, 4, processor, seed=0)] == [u.id for u in packed]
    assert [u.id for u in pack_questions(samples, 4, processor, seed=1)] != [u.id for u in packed]
    assert pack_questions(samples, 1, processor, seed=0) == samples
    with pytest.raises(ValueError, match="pack_questions must be at least 1"):
        pack_questions(samples, 0, processor, seed=0)


def test_a_pack_stays_within_max_length(samples, tiny):
    _, processor = tiny
    lengths = [len(processor.encode_conversation(s.conversation)[0]) for s in samples[:2]]
    limited = copy.copy(processor)  # the fixture's processor is shared
    limited.max_length = max(lengths) + 10  # room for one question after the prefix, not two
    packed = pack_questions(samples, 4, limited, seed=0)
    assert all(unit.pack is None for unit in packed) and len(packed) == len(samples)


def test_packed_rows_give_each_answer_the_loss_and_gradient_of_its_own_sample(samples, tiny):
    model, processor = tiny
    packed = pack_questions(samples, 4, processor, seed=0)
    assert len(packed) < len(samples)
    plain_batch = Collator(processor, samples)(range(len(samples)))
    packed_batch = Collator(processor, packed, packed=True)(range(len(packed)))
    assert packed_batch["num_samples"] == plain_batch["num_samples"] == len(samples)
    assert packed_batch["num_answers"] == plain_batch["num_answers"] == len(samples)
    assert packed_batch["num_label_tokens"] == plain_batch["num_label_tokens"]
    assert packed_batch["crop_features" if "crop_features" in packed_batch else "pixel_values"].shape[
        0
    ] == len([u for u in packed if u.image_source is not None])
    losses, grads = {}, {}
    for name, batch in (("plain", plain_batch), ("packed", packed_batch)):
        model.zero_grad()
        for per_sample in (False, True):
            loss = AssistantTask._token_loss_sum(model, batch, torch.device("cpu"), per_sample)
            losses[name, per_sample] = loss.detach()
        loss.backward()  # the per-answer mean, as stage 2 trains
        grads[name] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    for per_sample in (False, True):
        torch.testing.assert_close(
            losses["packed", per_sample], losses["plain", per_sample], rtol=1e-4, atol=1e-5
        )
    assert grads["plain"].keys() == grads["packed"].keys() and grads["plain"]
    for name, grad in grads["plain"].items():
        torch.testing.assert_close(grads["packed"][name], grad, rtol=1e-3, atol=1e-5, msg=name)
    model.zero_grad()


def test_a_segment_sees_the_prefix_and_itself_only(samples, tiny):
    _, processor = tiny
    packed = pack_questions(samples, 4, processor, seed=0)
    row = next(i for i, unit in enumerate(packed) if unit.pack and len(unit.pack.members) == 3)
    batch = Collator(processor, packed, packed=True)([row])
    segments, mask, positions = (
        batch["segment_ids"][0],
        batch["attention_mask"][0, 0],
        batch["position_ids"][0],
    )
    prefix = int((segments == 0).sum())
    assert set(segments[prefix:].tolist()) == {1, 2, 3}
    for query in range(len(segments)):
        seen = mask[query].nonzero()[:, 0]
        assert bool((seen <= query).all())  # nothing later
        assert set(segments[seen].tolist()) <= {0, int(segments[query])}  # no other question
    for number in (1, 2, 3):  # each segment's positions continue the prefix, as its sample's alone would
        assert positions[segments == number].tolist() == list(
            range(prefix, prefix + int((segments == number).sum()))
        )
    member = packed[row].pack.members[0]
    ids, labels = processor.encode_conversation(member.conversation)
    rebuilt = torch.cat([batch["input_ids"][0][:prefix], batch["input_ids"][0][segments == 1]])
    assert rebuilt.tolist() == ids  # prefix + first segment is the first question's own encoding
    assert batch["labels"][0][segments == 1].tolist() == labels[prefix:]


def test_padding_sees_only_itself_and_counts_no_answer():
    labels = torch.full((2, 6), IGNORE_INDEX)
    labels[0, 3:5] = 4
    labels[1, 2] = 9
    segments = torch.tensor([[0, 0, 1, 1, 2, PAD_SEGMENT], [0, 1, 1, 2, 2, 2]])
    labels[1, 4:6] = 7
    assert answers_in(labels, segments) == 4  # (0, 1), (0, 2), (1, 1), (1, 2)
    assert answers_in(labels, None) == 2


def test_recipe_refuses_a_pack_size_below_one():
    with pytest.raises(ValueError, match="data.pack_questions must be at least 1"):
        Recipe(data=DataSection(path="x.jsonl", pack_questions=0)).validate()
