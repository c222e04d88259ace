"""Attention as two matrix products for bf16 inference on a CPU: same results as the fused kernel, used only
where it is meant to be, and chosen for the assistant's vision tower and connector."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPVisionModel

import pallava.models.attention as attention
import pallava.models.connector as connector_module
from pallava import PaLlavaForConditionalGeneration
from pallava.models.attention import MATMUL_ON_CPU_BF16, MAX_TRAINING_KEYS, matmul_attention, prefers_matmul
from pallava.models.connector import ScaleInvariantConnector
from pallava.models.plip.presets import build_plip
from pallava.models.presets import tiny_config, tiny_vision_config


def qkv(dtype=torch.float32, queries=5, keys=9):
    generator = torch.Generator().manual_seed(0)
    shapes = [(2, 4, queries, 16), (2, 4, keys, 16), (2, 4, keys, 16)]
    return [torch.randn(*shape, generator=generator).to(dtype) for shape in shapes]


@pytest.fixture
def matmul_calls(monkeypatch):
    """How often the two-product path ran (the real function, counted)."""
    calls = []
    real = attention.matmul_attention

    def counted(*args, **kwargs):
        calls.append(args[0].dtype)
        return real(*args, **kwargs)

    monkeypatch.setattr(attention, "matmul_attention", counted)
    monkeypatch.setattr(connector_module, "matmul_attention", counted)
    return calls


def test_matmul_attention_equals_the_fused_kernel_with_and_without_a_mask():
    q, k, v = qkv()
    mask = torch.ones(2, 1, 1, 9, dtype=torch.bool)
    mask[0, ..., 6:] = False  # the first sample's last keys are padding
    for key_mask in (None, mask):
        output, weights = matmul_attention(q, k, v, key_mask, scale=0.3)
        torch.testing.assert_close(
            output, F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, scale=0.3)
        )
        torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 5))
    assert bool((weights[0, ..., 6:] == 0).all())  # masked keys get no weight


def test_bf16_result_stays_within_bf16_rounding_of_fp32():
    q, k, v = qkv(queries=64, keys=300)
    reference = F.scaled_dot_product_attention(q, k, v)
    output, _ = matmul_attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert output.dtype == torch.bfloat16
    torch.testing.assert_close(output.float(), reference, atol=2e-2, rtol=2e-2)


def test_two_products_for_bf16_on_cpu_and_with_gradients_only_up_to_the_key_bound():
    q = torch.zeros(1, 1, 2, 4)
    with torch.no_grad():
        assert prefers_matmul(q.bfloat16(), keys=4096)
        assert not prefers_matmul(q, keys=2)  # fp32: the fused kernel is as fast
        assert not prefers_matmul(q.bfloat16(), keys=2, dropout=0.1)  # dropout: the fused kernel's
    assert prefers_matmul(q.bfloat16(), keys=MAX_TRAINING_KEYS)  # training: faster on short sequences
    assert not prefers_matmul(q.bfloat16(), keys=MAX_TRAINING_KEYS + 1)  # the weights would cost memory


def test_vision_tower_in_bf16_matches_sdpa_and_takes_two_products_in_inference_and_training(matmul_calls):
    torch.manual_seed(0)
    tower = CLIPVisionModel(tiny_vision_config()).eval()
    pixels = torch.randn(3, 3, 224, 224)
    with torch.no_grad():
        reference = tower(pixels).last_hidden_state  # fp32, SDPA
        tower.set_attn_implementation(MATMUL_ON_CPU_BF16)
        assert tower(pixels).last_hidden_state.equal(reference)  # fp32 falls back to the fused kernel
        assert matmul_calls == []
        output = tower.bfloat16()(pixels.bfloat16()).last_hidden_state
    assert len(matmul_calls) == tower.config.num_hidden_layers
    torch.testing.assert_close(output.float(), reference, atol=0.1, rtol=0.05)

    def gradients(attention: str) -> list[torch.Tensor]:
        tower.zero_grad()
        tower.set_attn_implementation(attention)
        tower(pixels.bfloat16()).last_hidden_state.float().square().mean().backward()
        return [p.grad.float().clone() for p in tower.parameters() if p.grad is not None]

    tower.train()
    fused = gradients("sdpa")
    assert len(matmul_calls) == tower.config.num_hidden_layers
    products = gradients(MATMUL_ON_CPU_BF16)  # training on 50 tokens: two products as well
    assert len(matmul_calls) == 2 * tower.config.num_hidden_layers
    assert len(products) == len(fused)
    for ours, theirs in zip(products, fused, strict=True):
        torch.testing.assert_close(ours, theirs, atol=2e-3, rtol=0.1)


def test_connector_in_bf16_keeps_padded_tiles_out(matmul_calls):
    torch.manual_seed(0)
    connector = ScaleInvariantConnector(tiny_config().connector_config).eval()
    width = connector.config.hidden_size
    tokens, tiles = torch.randn(2, 49, width), torch.randn(2, 3, 49, width)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    with torch.no_grad():
        reference = connector(tokens, tiles, mask)
        output = connector.bfloat16()(tokens.bfloat16(), tiles.bfloat16(), mask)
        changed_padding = tiles.clone()
        changed_padding[0, 2] = 100.0
        padded = connector(tokens.bfloat16(), changed_padding.bfloat16(), mask)
    assert matmul_calls and set(matmul_calls) == {torch.bfloat16}
    torch.testing.assert_close(output.float(), reference, atol=0.1, rtol=0.05)
    assert padded.equal(output)  # what a padded tile holds never reaches the output


def test_the_assistant_chooses_it_for_the_vision_tower_unless_told_otherwise(tmp_path):
    model = PaLlavaForConditionalGeneration(tiny_config(lora=None))
    assert model.vision_tower.config._attn_implementation == MATMUL_ON_CPU_BF16
    assert model.language_model.config._attn_implementation == "sdpa"  # causal: the fused kernel's
    model.save_pretrained(tmp_path)
    assert "pallava_matmul" not in (tmp_path / "config.json").read_text()  # a runtime choice, never saved
    eager = PaLlavaForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="eager")
    assert eager.vision_tower.config._attn_implementation == "eager"


def test_plip_chooses_it_for_its_vision_tower():
    model, _ = build_plip("tiny", text_init="scratch")
    assert model.vision_model.config._attn_implementation == MATMUL_ON_CPU_BF16
