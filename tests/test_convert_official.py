"""Converting the authors' release: synthetic checkpoints with their exact key names at tiny sizes."""

from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from pallava.cli import main
from pallava.convert import convert_official
from pallava.inference import PaLlava
from pallava.models.presets import tiny_config
from pallava.processing.tokenizer import build_tiny_tokenizer

# Tiny sizes: ViT width 128 / patch 32 / 4 layers / 4 heads; connector 2 layers, FFN 256; Llama width 128.
WIDTH, VIT_LAYERS, VIT_HEADS, PATCH, POSITIONS = 128, 4, 4, 32, 50
CONNECTOR_LAYERS, CONNECTOR_FFN, RANK = 2, 256, 8
LORA_SHAPES = {  # (in, out) of each LoRA-wrapped projection of the tiny Llama (4 heads, 2 kv heads of 32)
    "self_attn.q_proj": (128, 128), "self_attn.k_proj": (128, 64), "self_attn.v_proj": (128, 64),
    "self_attn.o_proj": (128, 128), "mlp.gate_proj": (128, 256), "mlp.up_proj": (128, 256),
    "mlp.down_proj": (256, 128),
}  # fmt: skip


def _random(generator, *shape):
    return torch.randn(*shape, generator=generator) * 0.05


def _linear(state, name, fan_in, fan_out, generator):
    state[f"{name}.weight"] = _random(generator, fan_out, fan_in)
    state[f"{name}.bias"] = _random(generator, fan_out)


def _layer_norm(state, name, width, generator):
    state[f"{name}.weight"] = 1 + _random(generator, width)
    state[f"{name}.bias"] = _random(generator, width)


def their_plip_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """`plip_80w_196token.bin` at tiny size, with their key names (misspelt layernorms, position_ids)."""
    g, s, p = torch.Generator().manual_seed(seed), {}, "vision_model."
    s[p + "embeddings.class_embedding"] = _random(g, WIDTH)
    s[p + "embeddings.patch_embedding.weight"] = _random(g, WIDTH, 3, PATCH, PATCH)
    s[p + "embeddings.position_embedding.weight"] = _random(g, POSITIONS, WIDTH)
    s[p + "embeddings.position_ids"] = torch.arange(POSITIONS)[None]
    _layer_norm(s, p + "pre_layrnorm", WIDTH, g)
    for i in range(VIT_LAYERS):
        layer = f"{p}encoder.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            _linear(s, layer + "self_attn." + name, WIDTH, WIDTH, g)
        _layer_norm(s, layer + "layer_norm1", WIDTH, g)
        _linear(s, layer + "mlp.fc1", WIDTH, 4 * WIDTH, g)
        _linear(s, layer + "mlp.fc2", 4 * WIDTH, WIDTH, g)
        _layer_norm(s, layer + "layer_norm2", WIDTH, g)
    _layer_norm(s, p + "post_layrnorm", WIDTH, g)
    return s


def their_stage_checkpoint(cross_attention: bool, seed: int = 1) -> dict[str, torch.Tensor]:
    """A stage-2 `.pth` at tiny size: connector under `projector.model.`, LoRA under `llm.`."""
    g, s = torch.Generator().manual_seed(seed), {}
    s["projector.model.bert.embeddings.position_ids"] = torch.arange(512)[None]
    for i in range(CONNECTOR_LAYERS):
        layer = f"projector.model.bert.encoder.layer.{i}."
        for block in ("attention", "crossattention") if cross_attention else ("attention",):
            for name in ("query", "key", "value"):
                _linear(s, f"{layer}{block}.self.{name}", WIDTH, WIDTH, g)
            _linear(s, f"{layer}{block}.output.dense", WIDTH, WIDTH, g)
            _layer_norm(s, f"{layer}{block}.output.LayerNorm", WIDTH, g)
        _linear(s, layer + "intermediate_query.dense", WIDTH, CONNECTOR_FFN, g)
        _linear(s, layer + "output_query.dense", CONNECTOR_FFN, WIDTH, g)
        _layer_norm(s, layer + "output_query.LayerNorm", WIDTH, g)
    _layer_norm(s, "projector.model.norm", WIDTH, g)
    _linear(s, "projector.model.mlp.model.0", WIDTH, 128, g)
    for i in range(2):
        for module, (fan_in, fan_out) in LORA_SHAPES.items():
            name = f"llm.base_model.model.model.layers.{i}.{module}"
            s[f"{name}.lora_A.default.weight"] = _random(g, RANK, fan_in)
            s[f"{name}.lora_B.default.weight"] = _random(g, fan_out, RANK)
    return s


def expected_target(key: str) -> str:
    """Where each of their tensors must land, written out independently of the converter."""
    if key.startswith("vision_model."):
        return "vision_tower." + key.removeprefix("vision_model.").replace("post_layrnorm", "post_layernorm")
    key = key.replace("projector.model.bert.encoder.layer.", "connector.layers.")
    key = key.replace("intermediate_query.", "intermediate.").replace("output_query.", "output.")
    key = key.replace("projector.model.norm.", "connector.norm.").replace(
        "projector.model.mlp.model.0.", "connector.projection."
    )
    return key.replace("llm.", "language_model.", 1)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """Folders as a user has them after downloading: PLIP, two stage checkpoints, a base LLM."""
    root = tmp_path_factory.mktemp("release")
    plip = root / "plip"
    plip.mkdir()
    config = {"model_type": "clip_vision_model", "architectures": ["VisionModel"], "hidden_size": WIDTH,
              "intermediate_size": 4 * WIDTH, "num_hidden_layers": VIT_LAYERS, "num_attention_heads": VIT_HEADS,
              "image_size": 224, "patch_size": PATCH, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
              "projection_dim": 512, "intermediate_transformer_output": [4, 6, 8]}  # fmt: skip
    (plip / "config.json").write_text(json.dumps(config))
    torch.save(their_plip_state(), plip / "plip_80w_196token.bin")
    for cross in (False, True):
        torch.save(their_stage_checkpoint(cross), root / f"stage2-cross{int(cross)}.pth")
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_config().text_config).save_pretrained(root / "llm")
    build_tiny_tokenizer().save_pretrained(root / "llm")
    return root


def convert_cli(release, checkpoint, out, *extra) -> int:
    return main(["convert", "official", "--plip", str(release / "plip"), "--checkpoint", str(checkpoint),
                 "--llm", str(release / "llm"), "--out", str(out), "--connector-heads", "4", "--dtype", "float32",
                 "--no-progress", *extra])  # fmt: skip


@pytest.fixture(scope="module")
def converted(release):
    """{cross_attention: loaded PaLlava} converted through the CLI."""
    assistants = {}
    for cross in (False, True):
        out = release / f"out-cross{int(cross)}"
        assert convert_cli(release, release / f"stage2-cross{int(cross)}.pth", out) == 0
        assistants[cross] = PaLlava.from_pretrained(out)
    return assistants


@pytest.mark.parametrize("cross_attention", [False, True])
def test_every_source_tensor_lands_bit_identical_at_its_place(release, converted, cross_attention):
    assistant = converted[cross_attention]
    params = assistant.model.state_dict()
    sources = their_plip_state() | their_stage_checkpoint(cross_attention)
    copied = [key for key in sources if not key.endswith("position_ids")]
    for key in copied:
        assert torch.equal(params[expected_target(key)], sources[key]), key
    # Nothing else in the vision tower / connector / LoRA: every parameter there came from a source tensor.
    ours = {k for k in params if k.startswith(("vision_tower.", "connector.")) or ".lora_" in k}
    assert ours == {expected_target(key) for key in copied}
    config = assistant.model.config
    assert config.connector_config.tile_cross_attention is cross_attention
    assert config.lora["r"] == RANK and config.lora["alpha"] == 2 * RANK
    assert sorted(config.lora["target_modules"]) == sorted(m.split(".")[1] for m in LORA_SHAPES)
    report = json.loads((release / f"out-cross{int(cross_attention)}" / "conversion.json").read_text())
    assert sorted(report["ignored"]) == ["checkpoint:projector.model.bert.embeddings.position_ids",
                                         "plip:vision_model.embeddings.position_ids"]  # fmt: skip
    assert report["unmapped"] == report["unfilled"] == []


def test_base_llm_weights_are_the_given_llm(release, converted):
    base = load_file(release / "llm" / "model.safetensors")
    params = converted[False].model.state_dict()
    for key, value in base.items():
        ours = re.sub(r"(_proj)\.weight$", r"\1.base_layer.weight", key) if "layers." in key else key
        assert torch.equal(params["language_model.base_model.model." + ours], value), key


def reference_vision_features(state: dict[str, torch.Tensor], pixels: torch.Tensor) -> torch.Tensor:
    """A ViT forward written from their tensors: second-to-last layer, CLS dropped. (N, 3, S, S) -> (N, P, D)."""
    p = "vision_model."

    def norm(x, name, eps=1e-5):
        return F.layer_norm(x, x.shape[-1:], state[name + ".weight"], state[name + ".bias"], eps)

    def linear(x, name):
        return F.linear(x, state[name + ".weight"], state[name + ".bias"])

    patches = (
        F.conv2d(pixels, state[p + "embeddings.patch_embedding.weight"], stride=PATCH)
        .flatten(2)
        .transpose(1, 2)
    )
    cls = state[p + "embeddings.class_embedding"].expand(pixels.shape[0], 1, -1)
    x = norm(
        torch.cat([cls, patches], 1) + state[p + "embeddings.position_embedding.weight"], p + "pre_layrnorm"
    )
    batch, length, width = x.shape
    for i in range(VIT_LAYERS - 1):  # hidden state -2 = the output of layer L-1
        layer = f"{p}encoder.layers.{i}."
        h = norm(x, layer + "layer_norm1")
        q, k, v = (linear(h, layer + f"self_attn.{n}").view(batch, length, VIT_HEADS, -1).transpose(1, 2)
                   for n in ("q_proj", "k_proj", "v_proj"))  # fmt: skip
        weights = (q @ k.transpose(-1, -2) / (width // VIT_HEADS) ** 0.5).softmax(-1)
        x = x + linear(
            (weights @ v).transpose(1, 2).reshape(batch, length, width), layer + "self_attn.out_proj"
        )
        h = linear(norm(x, layer + "layer_norm2"), layer + "mlp.fc1")
        x = x + linear(h * torch.sigmoid(1.702 * h), layer + "mlp.fc2")  # quick_gelu
    return x[:, 1:]


def test_vision_features_equal_a_vit_computed_from_the_source_tensors(converted, lung_tiles):
    assistant = converted[False]
    batch = assistant.processor.image_processor([lung_tiles[0]])
    with torch.no_grad():
        features = assistant.model.encode_crops(batch["pixel_values"], batch["tile_mask"])  # (1, 1+T, P, D)
        real = torch.cat([torch.ones(1, 1, dtype=torch.bool), batch["tile_mask"]], 1)[0]
        reference = reference_vision_features(their_plip_state(), batch["pixel_values"][0, real])
    assert features.shape[-2:] == (49, WIDTH) and int(real.sum()) >= 5  # global view + the paper's 4-8 tiles
    torch.testing.assert_close(features[0, real], reference, atol=1e-4, rtol=1e-4)


def test_unmapped_and_unfilled_tensors_fail_loudly_naming_them(release, tmp_path, capsys):
    state = their_stage_checkpoint(False)
    state["projector.model.bert.encoder.layer.0.intermediate.dense.weight"] = torch.zeros(
        CONNECTOR_FFN, WIDTH
    )
    del state["projector.model.bert.encoder.layer.1.output_query.LayerNorm.bias"]
    broken = tmp_path / "broken.pth"
    torch.save(state, broken)
    assert convert_cli(release, broken, tmp_path / "strict") == 1
    error = capsys.readouterr().err
    assert "projector.model.bert.encoder.layer.0.intermediate.dense.weight" in error
    assert "connector.layers.1.output.LayerNorm.bias" in error and "--allow-missing" in error
    assert not (tmp_path / "strict").exists()

    report = convert_official(release / "plip", broken, release / "llm", tmp_path / "lenient", allow_missing=True,
                              connector_heads=4, dtype=torch.float32, progress=False)  # fmt: skip
    assert report.unmapped == ["checkpoint:projector.model.bert.encoder.layer.0.intermediate.dense.weight"]
    assert report.unfilled == ["connector.layers.1.output.LayerNorm.bias"]
    assert "NOT filled" in report.summary() and (tmp_path / "lenient" / "config.json").is_file()


def test_shape_mismatch_and_wrong_inputs_are_errors(release, tmp_path):
    state = their_stage_checkpoint(False)
    state["llm.base_model.model.model.layers.0.mlp.up_proj.lora_B.default.weight"] = torch.zeros(255, RANK)
    bad = tmp_path / "bad.pth"
    torch.save(state, bad)
    with pytest.raises(ValueError, match=r"up_proj\.lora_B\.default\.weight \(255, 8\) -> .* \(256, 8\)"):
        convert_official(
            release / "plip", bad, release / "llm", tmp_path / "a", connector_heads=4, progress=False
        )
    with pytest.raises(ValueError, match="no connector tensors"):
        convert_official(release / "plip", release / "plip" / "plip_80w_196token.bin", release / "llm",
                         tmp_path / "b", connector_heads=4, progress=False)  # fmt: skip
    with pytest.raises(ValueError, match="model_type 'llama' is not a CLIP vision config"):
        convert_official(release / "llm", bad, release / "llm", tmp_path / "c", progress=False)
    with pytest.raises(ValueError, match=r"not a multiple of 12 heads \(--connector-heads\)"):
        convert_official(release / "plip", bad, release / "llm", tmp_path / "d", progress=False)
