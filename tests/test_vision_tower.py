"""The vision tower's convolutional stem: built when the config asks, saved and loaded by every path pallava
uses, and frozen statistics while its weights are frozen."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPVisionModel

from pallava import load_preset
from pallava.convert.plip import load_vision_tower
from pallava.inference import PaLlava
from pallava.models.plip import build_plip
from pallava.models.presets import tiny_vision_config
from pallava.models.vision_tower import (
    ConvStem,
    PallavaVisionModel,
    ResidualBlock,
    StemBatchNorm,
    build_vision_tower,
)


def stem_config(**fields):
    config = tiny_vision_config()
    config.conv_stem = True
    for key, value in fields.items():
        setattr(config, key, value)
    return config


def pixels(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 224, 224, generator=torch.Generator().manual_seed(seed))


def test_the_stem_replaces_the_patch_projection_and_keeps_the_token_grid():
    plain = PallavaVisionModel(tiny_vision_config()).eval()
    stem = PallavaVisionModel(stem_config()).eval()
    assert isinstance(plain.embeddings.patch_embedding, torch.nn.Conv2d)
    assert isinstance(stem.embeddings.patch_embedding, ConvStem)
    with torch.no_grad():
        assert (
            stem(pixels(2)).last_hidden_state.shape
            == plain(pixels(2)).last_hidden_state.shape
            == (2, 50, 128)
        )
    convs = [m for m in stem.embeddings.patch_embedding.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.stride for c in convs] == [(2, 2)] * 5 + [(1, 1)]  # 224 / 2^5 = 7: the patch-32 grid
    assert [c.out_channels for c in convs] == [16, 32, 64, 128, 128, 128]
    with pytest.raises(ValueError, match="power-of-two patch_size"):
        PallavaVisionModel(stem_config(patch_size=28))


def test_residual_blocks_deepen_the_stem_and_start_as_the_identity():
    tower = PallavaVisionModel(stem_config(conv_stem_blocks=2)).eval()
    stem = tower.embeddings.patch_embedding
    blocks = [m for m in stem.modules() if isinstance(m, ResidualBlock)]
    assert len(blocks) == 8  # two after each stride-2 convolution but the 112 x 112 one
    with torch.no_grad():
        assert tower(pixels(2)).last_hidden_state.shape == (2, 50, 128)
        for block in blocks:  # a block's input has passed a ReLU: non-negative
            features = torch.rand(2, block.first.in_channels, 14, 14)
            torch.testing.assert_close(block(features), features, rtol=0, atol=0)
    blocks[0].second_norm.weight.data.fill_(1.0)  # once trained, a block changes what it is given
    with torch.no_grad():
        features = torch.rand(2, blocks[0].first.in_channels, 14, 14)
        assert not torch.equal(blocks[0](features), features)


@pytest.mark.parametrize("blocks", [0, 1])
def test_a_saved_stem_tower_loads_identically_by_every_loader(tmp_path, blocks):
    tower = PallavaVisionModel(stem_config(conv_stem_blocks=blocks)).eval()
    with torch.no_grad():  # give the running statistics values a fresh model would not have
        for module in tower.modules():
            if isinstance(module, StemBatchNorm):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    tower.save_pretrained(tmp_path / "tower")
    state = tower.state_dict()
    assert all(value.is_floating_point() for value in state.values())  # no integer batch counter
    for loaded in (
        PallavaVisionModel.from_pretrained(tmp_path / "tower"),
        load_vision_tower(tmp_path / "tower"),
    ):
        assert loaded.config.conv_stem is True
        assert loaded.config.conv_stem_blocks == blocks
        for key, value in loaded.state_dict().items():
            torch.testing.assert_close(value, state[key], rtol=0, atol=0, msg=key)
        with torch.no_grad():
            torch.testing.assert_close(
                loaded.eval()(pixels(2)).pooler_output, tower(pixels(2)).pooler_output, rtol=0, atol=0
            )


def test_frozen_stem_statistics_do_not_move_in_train_mode():
    tower = PallavaVisionModel(stem_config())
    norms = [m for m in tower.modules() if isinstance(m, StemBatchNorm)]
    before = [n.running_mean.clone() for n in norms]
    tower.requires_grad_(False).train()
    with torch.no_grad():
        trained_mode = tower(pixels(4)).pooler_output
        evaluated = tower.eval()(pixels(4)).pooler_output
    torch.testing.assert_close(trained_mode, evaluated, rtol=0, atol=0)
    assert all(torch.equal(n.running_mean, b) for n, b in zip(norms, before, strict=True))
    tower.requires_grad_(True).train()  # a training stem normalises by the batch and updates its statistics
    tower(pixels(4)).pooler_output.sum().backward()
    assert not torch.equal(norms[0].running_mean, before[0])
    assert norms[0].weight.grad is not None


def test_plip_recipes_and_the_assistant_carry_the_stem(tmp_path):
    plip, _ = build_plip("tiny", text_init="scratch", text_layers=1, vision={"conv_stem": True})
    assert isinstance(plip.vision_model.embeddings.patch_embedding, ConvStem)
    with pytest.raises(ValueError, match="unknown field"):
        build_plip("tiny", text_init="scratch", text_layers=1, vision={"conv_stm": True})
    plip.vision_model.save_pretrained(tmp_path / "vision")
    assistant, processor = load_preset("tiny", vision_path=tmp_path / "vision")
    assert assistant.config.vision_config.conv_stem is True
    assert isinstance(assistant.vision_tower.embeddings.patch_embedding, ConvStem)
    saved = dict(plip.vision_model.state_dict())
    for key, value in assistant.vision_tower.state_dict().items():
        torch.testing.assert_close(value, saved[key], rtol=0, atol=0, msg=key)
    PaLlava(assistant, processor).save_pretrained(tmp_path / "assistant")  # and a saved assistant keeps it
    reloaded = PaLlava.from_pretrained(tmp_path / "assistant").model
    assert isinstance(reloaded.vision_tower.embeddings.patch_embedding, ConvStem)
    for key, value in reloaded.vision_tower.state_dict().items():
        torch.testing.assert_close(value, saved[key], rtol=0, atol=0, msg=key)


def test_a_tower_without_the_stem_starts_where_transformers_own_does():
    """Random init included: every tiny model without the stem keeps the weights it always drew."""
    torch.manual_seed(0)
    ours = build_vision_tower(tiny_vision_config())
    torch.manual_seed(0)
    theirs = CLIPVisionModel(tiny_vision_config())
    assert type(ours) is CLIPVisionModel
    for key, value in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, rtol=0, atol=0, msg=key)
    assert isinstance(build_vision_tower(stem_config()), PallavaVisionModel)
