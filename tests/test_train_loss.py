"""The assistant's training loss: computed on the answer positions only, equal to the full-logits loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pallava.models.modeling_pa_llava import PaLlavaForConditionalGeneration
from pallava.models.presets import tiny_config
from pallava.processing.processor import IGNORE_INDEX
from pallava.processing.tokenizer import build_tiny_tokenizer
from pallava.train.answer_weights import LetterWeight
from pallava.train.packing import answers_in
from pallava.train.trainer import AssistantTask


def test_answer_position_logits_give_the_full_logits_loss_and_gradients():
    torch.manual_seed(0)
    model = PaLlavaForConditionalGeneration(tiny_config())
    batch_size, length = 3, 70
    ids = torch.randint(10, 4000, (batch_size, length))
    ids[:, 2 : 2 + model.config.num_image_tokens] = model.config.image_token_id
    labels = torch.full((batch_size, length), IGNORE_INDEX)
    for row, (start, stop) in enumerate(((60, 65), (55, 58), (66, 70))):  # answers end at different places
        labels[row, start:stop] = ids[row, start:stop]
    mask = torch.ones(batch_size, length, dtype=torch.long)
    mask[1, 58:] = 0  # right padding
    images = {
        "pixel_values": torch.randn(batch_size, 2, 3, 224, 224),
        "tile_mask": torch.ones(batch_size, 1).bool(),
    }
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels, **images}

    loss = AssistantTask._token_loss_sum(model, batch, torch.device("cpu"))
    loss.backward()
    sliced = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    logits = model(input_ids=ids, attention_mask=mask, **images).logits[:, :-1].float()
    full = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        labels[:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    full.backward()
    torch.testing.assert_close(loss, full)
    assert sliced
    for name, grad in sliced.items():
        torch.testing.assert_close(grad, model.get_parameter(name).grad, rtol=1e-4, atol=1e-6, msg=name)


def _answer_batch(ids: torch.Tensor, labels: torch.Tensor) -> tuple[dict, dict]:
    """The model's batch for these rows, each with one random 224 px image (its global view and one tile),
    and the image inputs alone."""
    images = {
        "pixel_values": torch.randn(len(ids), 2, 3, 224, 224),
        "tile_mask": torch.ones(len(ids), 1).bool(),
    }
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, **images}, images


def test_sample_average_weighs_each_answer_once_whatever_its_length():
    torch.manual_seed(0)
    model = PaLlavaForConditionalGeneration(tiny_config())
    ids = torch.randint(10, 4000, (3, 70))
    ids[:, 2 : 2 + model.config.num_image_tokens] = model.config.image_token_id
    labels = torch.full((3, 70), IGNORE_INDEX)
    spans = ((60, 70), (55, 57), (66, 68))  # a 10-token answer and two 2-token ones
    for row, (start, stop) in enumerate(spans):
        labels[row, start:stop] = ids[row, start:stop]
    batch, images = _answer_batch(ids, labels)
    with torch.no_grad():
        per_sample = AssistantTask._token_loss_sum(model, batch, torch.device("cpu"), per_sample=True)
        token_sum = AssistantTask._token_loss_sum(model, batch, torch.device("cpu"))
        logits = model(input_ids=ids, **images).logits[:, :-1].float()
    token_losses = F.cross_entropy(
        logits.transpose(1, 2), labels[:, 1:], ignore_index=IGNORE_INDEX, reduction="none"
    )  # (3, 69), 0 where no answer token follows
    means = [token_losses[row, start - 1 : stop - 1].mean() for row, (start, stop) in enumerate(spans)]
    torch.testing.assert_close(per_sample, torch.stack(means).sum())
    torch.testing.assert_close(token_sum, token_losses.sum())


def test_sample_average_divides_by_the_samples_whose_answer_survived():
    """A sample cut before its answer adds nothing to the per-answer loss sum, so it is not counted either."""
    from types import SimpleNamespace

    labels = torch.full((3, 10), IGNORE_INDEX)
    labels[0, 6:9] = 5  # an answer
    labels[2, 8:10] = 7  # another; row 1 lost its answer to truncation
    batch = {
        "labels": labels,
        "num_samples": 3,
        "num_label_tokens": 5,
        "num_answers": answers_in(labels, None),
    }
    for average, expected in (("sample", 2.0), ("token", 5.0)):
        task = SimpleNamespace(recipe=SimpleNamespace(train=SimpleNamespace(loss_average=average)))
        assert AssistantTask.weight(task, batch) == expected


def test_a_choice_answers_letter_can_count_as_several_tokens_of_its_answer():
    """`train.choice_letter_weight`: the letter after " option" weighs w tokens in its answer's mean; the
    other answers, and a letter not after " option", are averaged as before."""
    tokenizer = build_tiny_tokenizer()
    letters = LetterWeight.for_tokenizer(tokenizer, 5.0)
    torch.manual_seed(0)
    model = PaLlavaForConditionalGeneration(tiny_config())
    ids = torch.randint(10, 4000, (2, 70))
    ids[:, 2 : 2 + model.config.num_image_tokens] = model.config.image_token_id
    choice = tokenizer("lung adenocarcinoma, option C", add_special_tokens=False)["input_ids"]
    other = tokenizer("benign lung tissue C", add_special_tokens=False)["input_ids"]  # a "C", not a letter
    labels = torch.full((2, 70), IGNORE_INDEX)
    for row, answer in enumerate((choice, other)):
        ids[row, 70 - len(answer) :] = torch.tensor(answer)
        labels[row, 70 - len(answer) :] = torch.tensor(answer)
    batch, images = _answer_batch(ids, labels)
    with torch.no_grad():
        weighted = AssistantTask._token_loss_sum(model, batch, torch.device("cpu"), True, letters)
        plain = AssistantTask._token_loss_sum(model, batch, torch.device("cpu"), True)
        logits = model(input_ids=ids, **images).logits[:, :-1].float()
    token_losses = F.cross_entropy(
        logits.transpose(1, 2), labels[:, 1:], ignore_index=IGNORE_INDEX, reduction="none"
    )
    # the label at position p is predicted at p - 1: each answer's L tokens are the last L losses of its row
    first, second = token_losses[0, 69 - len(choice) :], token_losses[1, 69 - len(other) :]
    weights = torch.ones(len(choice))
    weights[-1] = 5.0  # " C" after " option"
    expected = (first * weights).sum() / weights.sum() + second.mean()
    torch.testing.assert_close(weighted, expected)
    torch.testing.assert_close(plain, first.mean() + second.mean())
    assert not torch.isclose(weighted, plain)


def test_a_letter_weight_needs_a_tokenizer_that_keeps_option_and_letter_whole():
    class Characters:  # every character its own token: " option" is no single token
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) for c in text]}

        def decode(self, ids):
            return "".join(chr(i) for i in ids)

    with pytest.raises(ValueError, match="choice_letter_weight: this tokenizer does not encode"):
        LetterWeight.for_tokenizer(Characters(), 4.0)
