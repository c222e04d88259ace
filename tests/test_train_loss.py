"""The assistant's training loss: computed on the answer positions only, equal to the full-logits loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pallava.models.modeling_pa_llava import PaLlavaForConditionalGeneration
from pallava.models.presets import tiny_config
from pallava.processing.processor import IGNORE_INDEX
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
