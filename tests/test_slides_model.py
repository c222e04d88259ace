"""The slide model: chunked attention equals the connector's, fixed token count, masking, positions."""

from __future__ import annotations

import pytest
import torch

from pallava.inference import PaLlava
from pallava.slides.evidence import SlideEvidence
from pallava.slides.mil import AttentionMIL
from pallava.slides.model import SlideAssistant, slide_connector


@pytest.fixture(scope="module")
def slide_model(tiny):
    return SlideAssistant(PaLlava(*tiny), chunk_tiles=3)


def features(num_tiles: int, seed: int = 0, width: int = 128, tokens: int = 49):
    generator = torch.Generator().manual_seed(seed)
    return (
        torch.randn(1, tokens, width, generator=generator),
        torch.randn(1, num_tiles, tokens, width, generator=generator),
        torch.rand(1, num_tiles, 2, generator=generator),
    )


def test_chunked_attention_equals_the_connectors_full_attention_with_padded_tiles(tiny):
    model, _ = tiny
    queries, tiles, _ = features(7)
    queries, tiles = queries.repeat(2, 1, 1), tiles.repeat(2, 1, 1, 1)
    keep = torch.ones(2, 7, dtype=torch.bool)
    keep[1, 4:] = False
    with torch.no_grad():
        expected, attentions = model.connector(queries, tiles, keep, return_cross_attentions=True)
        got, masses = slide_connector(model.connector, queries, tiles, keep, chunk=2, need_mass=True)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    per_tile = torch.stack(attentions).mean(dim=(0, 2, 3)).reshape(2, 7, -1).sum(-1)
    torch.testing.assert_close(torch.stack(masses).mean(0), per_tile, atol=1e-6, rtol=1e-5)


def test_image_token_count_does_not_change_from_50_to_1000_tiles(slide_model, tiny):
    _, processor = tiny
    shapes = []
    for count in (50, 1000):
        queries, tiles, positions = features(count)
        with torch.no_grad():
            embeds, mass = slide_model.image_embeddings(queries, tiles, positions, need_mass=True)
        shapes.append(tuple(embeds.shape))
        assert mass.shape == (1, count) and torch.isclose(mass.sum(), torch.tensor(1.0), atol=1e-4)
    assert shapes[0] == shapes[1] == (1, processor.num_image_tokens, 128)


def test_masked_tiles_change_nothing_and_get_no_attention(slide_model):
    queries, tiles, positions = features(6)
    keep = torch.tensor([[True, True, True, False, True, False]])
    noisy = tiles.clone()
    noisy[0, ~keep[0]] = 100.0 * torch.randn_like(noisy[0, ~keep[0]])
    with torch.no_grad():
        clean, mass = slide_model.image_embeddings(queries, tiles, positions, keep, need_mass=True)
        garbage, _ = slide_model.image_embeddings(queries, noisy, positions, keep)
        only_kept, _ = slide_model.image_embeddings(queries, tiles[:, keep[0]], positions[:, keep[0]])
    torch.testing.assert_close(garbage, clean)
    torch.testing.assert_close(only_kept, clean, atol=1e-5, rtol=1e-5)
    assert torch.all(mass[0, ~keep[0]] == 0)


def test_positions_start_neutral_and_matter_once_learned(tiny):
    slide_model = SlideAssistant(PaLlava(*tiny), chunk_tiles=4)
    queries, tiles, positions = features(5)
    with torch.no_grad():
        before, _ = slide_model.image_embeddings(queries, tiles, positions)
        moved, _ = slide_model.image_embeddings(queries, tiles, positions.flip(1))
        assert torch.equal(before, moved)  # zero-initialised: a trained assistant is unchanged at first
        torch.nn.init.normal_(slide_model.position.proj.weight, std=0.5)
        before, _ = slide_model.image_embeddings(queries, tiles, positions)
        moved, _ = slide_model.image_embeddings(queries, tiles, positions.flip(1))
    assert not torch.allclose(before, moved)


def test_saved_slide_model_loads_with_its_position_embedding(tmp_path, tiny):
    slide_model = SlideAssistant(PaLlava(*tiny), chunk_tiles=5, num_frequencies=4)
    torch.nn.init.normal_(slide_model.position.proj.weight)
    slide_model.save_pretrained(tmp_path, {"tiling": {"mpp": 1.0}})
    loaded = SlideAssistant.from_pretrained(tmp_path)
    assert loaded.chunk_tiles == 5 and loaded.tiling == {"mpp": 1.0}
    torch.testing.assert_close(loaded.position.proj.weight, slide_model.position.proj.weight)
    assistant = PaLlava.from_pretrained(tmp_path)
    assert assistant.directory == tmp_path


def test_vision_output_tokens_continue_the_feature_layer_to_the_towers_last_layer(tiny):
    model, _ = tiny
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        tokens = model.vision_output_tokens(model.vision_hidden_states(pixels))
        expected = model.vision_tower(pixel_values=pixels)
    torch.testing.assert_close(tokens[:, 0], expected.pooler_output, atol=1e-5, rtol=1e-5)
    last = model.vision_tower.post_layernorm(expected.last_hidden_state)
    torch.testing.assert_close(tokens, last, atol=1e-5, rtol=1e-5)


def test_padded_bags_pool_like_their_unpadded_tiles():
    torch.manual_seed(0)
    mil = AttentionMIL(16, 3).eval()
    bags = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(4))
    keep = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    with torch.no_grad():
        logits, attention, _ = mil.pool(bags, keep)
        alone_logits, alone_attention = mil(bags[1, :4])
    torch.testing.assert_close(logits[1], alone_logits)
    torch.testing.assert_close(attention[1, :4], alone_attention)
    assert torch.all(attention[1, 4:] == 0)


def test_slide_evidence_starts_neutral_keeps_the_token_count_and_saves(tmp_path, tiny):
    slide_model = SlideAssistant(PaLlava(*tiny), chunk_tiles=4)
    queries, tiles, positions = features(5)
    summaries = [torch.randn(n, 128, generator=torch.Generator().manual_seed(n)) for n in (5, 7, 9)]
    labels = ["lung_n", "lung_aca", "lung_n"]
    width = slide_model.model.config.text_config.hidden_size
    slide_model.evidence = SlideEvidence.fit(summaries, labels, width, epochs=2)
    assert slide_model.evidence.classes == ["lung_aca", "lung_n"]
    with torch.no_grad():
        with pytest.raises(ValueError, match="tile_summaries"):
            slide_model.image_embeddings(queries, tiles, positions)
        plain = SlideAssistant(slide_model.assistant, chunk_tiles=4)
        plain.position.load_state_dict(slide_model.position.state_dict())
        without, _ = plain.image_embeddings(queries, tiles, positions)
        with_evidence, _ = slide_model.image_embeddings(
            queries, tiles, positions, tile_summaries=summaries[0][None]
        )
        # zero-initialised maps: the assistant starts unchanged
        torch.testing.assert_close(with_evidence, without)
        torch.nn.init.normal_(slide_model.evidence.to_tokens.weight, std=0.5)
        shifted, _ = slide_model.image_embeddings(
            queries, tiles, positions, tile_summaries=summaries[0][None]
        )
    assert shifted.shape == without.shape and not torch.allclose(shifted, without)
    slide_model.save_pretrained(tmp_path)
    loaded = SlideAssistant.from_pretrained(tmp_path)
    with torch.no_grad():
        again, _ = loaded.image_embeddings(queries, tiles, positions, tile_summaries=summaries[0][None])
    torch.testing.assert_close(again, shifted)
    assert loaded.evidence.classes == ["lung_aca", "lung_n"]


def test_quadrant_mass_sums_the_attention_of_each_quadrants_tiles_in_the_truths_order():
    from pallava.slides.evidence import quadrant_mass
    from pallava.slides.virtual import QUADRANTS

    positions = torch.tensor([[[0.2, 0.1], [0.8, 0.3], [0.3, 0.9], [0.7, 0.6], [0.9, 0.2]]])  # (x, y)
    attention = torch.tensor([[0.1, 0.2, 0.3, 0.15, 0.25]])
    mass = quadrant_mass(attention, positions)[0]
    expected = {"upper left": 0.1, "upper right": 0.45, "lower left": 0.3, "lower right": 0.15}
    torch.testing.assert_close(mass, torch.tensor([expected[q] for q in QUADRANTS]))
