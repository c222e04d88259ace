"""Converting the authors' release: synthetic checkpoints with their exact key names, at tiny and paper
sizes."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from pallava.cli import main
from pallava.convert import convert_official, plan_checkpoint, plan_plip
from pallava.convert.official import connector_config_from, lora_settings_from
from pallava.eval.tasks import model_prompt_style
from pallava.inference import PaLlava
from pallava.models.modeling_pa_llava import PaLlavaForConditionalGeneration
from pallava.models.presets import paper_config, tiny_config
from pallava.processing.tokenizer import build_tiny_tokenizer


@dataclass(frozen=True)
class Sizes:
    """Shapes of a release: ViT, connector, LLM. `meta` builds shape-only tensors (for paper sizes)."""

    width: int = 128
    vit_layers: int = 4
    vit_heads: int = 4
    patch: int = 32
    connector_layers: int = 2
    connector_ffn: int = 256
    llm_width: int = 128
    llm_layers: int = 2
    rank: int = 8
    lora_shapes: tuple = (  # (in, out) of each LoRA-wrapped projection of the tiny Llama (2 kv heads of 32)
        ("self_attn.q_proj", 128, 128),
        ("self_attn.k_proj", 128, 64),
        ("self_attn.v_proj", 128, 64),
        ("self_attn.o_proj", 128, 128),
        ("mlp.gate_proj", 128, 256),
        ("mlp.up_proj", 128, 256),
        ("mlp.down_proj", 256, 128),
    )
    meta: bool = False

    @property
    def positions(self) -> int:
        return (224 // self.patch) ** 2 + 1


TINY = Sizes()
PAPER = Sizes(  # ViT-B/16 PLIP, 6-layer connector, Llama-3-8B with LoRA r=128
    width=768,
    vit_layers=12,
    vit_heads=12,
    patch=16,
    connector_layers=6,
    connector_ffn=3072,
    llm_width=4096,
    llm_layers=32,
    rank=128,
    meta=True,
    lora_shapes=(
        ("self_attn.q_proj", 4096, 4096),
        ("self_attn.k_proj", 4096, 1024),
        ("self_attn.v_proj", 4096, 1024),
        ("self_attn.o_proj", 4096, 4096),
        ("mlp.gate_proj", 4096, 14336),
        ("mlp.up_proj", 4096, 14336),
        ("mlp.down_proj", 14336, 4096),
    ),
)


class Filler:
    """Random tensors from a seed, or shape-only meta tensors."""

    def __init__(self, seed: int, meta: bool):
        self.generator, self.meta = torch.Generator().manual_seed(seed), meta

    def __call__(self, *shape: int, offset: float = 0.0) -> torch.Tensor:
        if self.meta:
            return torch.empty(*shape, device="meta")
        return offset + torch.randn(*shape, generator=self.generator) * 0.05

    def linear(self, state: dict, name: str, fan_in: int, fan_out: int) -> None:
        state[f"{name}.weight"], state[f"{name}.bias"] = self(fan_out, fan_in), self(fan_out)

    def layer_norm(self, state: dict, name: str, width: int) -> None:
        state[f"{name}.weight"], state[f"{name}.bias"] = self(width, offset=1.0), self(width)


def their_plip_state(sizes: Sizes = TINY, seed: int = 0) -> dict[str, torch.Tensor]:
    """`plip_80w_196token.bin` with their key names (misspelt layernorms, position_ids)."""
    fill, s, p, width = Filler(seed, sizes.meta), {}, "vision_model.", sizes.width
    s[p + "embeddings.class_embedding"] = fill(width)
    s[p + "embeddings.patch_embedding.weight"] = fill(width, 3, sizes.patch, sizes.patch)
    s[p + "embeddings.position_embedding.weight"] = fill(sizes.positions, width)
    s[p + "embeddings.position_ids"] = torch.arange(sizes.positions)[None]
    fill.layer_norm(s, p + "pre_layrnorm", width)
    for i in range(sizes.vit_layers):
        layer = f"{p}encoder.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            fill.linear(s, layer + "self_attn." + name, width, width)
        fill.layer_norm(s, layer + "layer_norm1", width)
        fill.linear(s, layer + "mlp.fc1", width, 4 * width)
        fill.linear(s, layer + "mlp.fc2", 4 * width, width)
        fill.layer_norm(s, layer + "layer_norm2", width)
    fill.layer_norm(s, p + "post_layrnorm", width)
    return s


def their_stage_checkpoint(
    cross_attention: bool, sizes: Sizes = TINY, seed: int = 1
) -> dict[str, torch.Tensor]:
    """A stage-2 `.pth`: connector under `projector.model.`, LoRA under `llm.`."""
    fill, s, width = Filler(seed, sizes.meta), {}, sizes.width
    s["projector.model.bert.embeddings.position_ids"] = torch.arange(512)[None]
    for i in range(sizes.connector_layers):
        layer = f"projector.model.bert.encoder.layer.{i}."
        for block in ("attention", "crossattention") if cross_attention else ("attention",):
            for name in ("query", "key", "value"):
                fill.linear(s, f"{layer}{block}.self.{name}", width, width)
            fill.linear(s, f"{layer}{block}.output.dense", width, width)
            fill.layer_norm(s, f"{layer}{block}.output.LayerNorm", width)
        fill.linear(s, layer + "intermediate_query.dense", width, sizes.connector_ffn)
        fill.linear(s, layer + "output_query.dense", sizes.connector_ffn, width)
        fill.layer_norm(s, layer + "output_query.LayerNorm", width)
    fill.layer_norm(s, "projector.model.norm", width)
    fill.linear(s, "projector.model.mlp.model.0", width, sizes.llm_width)
    for i in range(sizes.llm_layers):
        for module, fan_in, fan_out in sizes.lora_shapes:
            name = f"llm.base_model.model.model.layers.{i}.{module}"
            s[f"{name}.lora_A.default.weight"] = fill(sizes.rank, fan_in)
            s[f"{name}.lora_B.default.weight"] = fill(fan_out, sizes.rank)
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
    config = {
        "model_type": "clip_vision_model",
        "architectures": ["VisionModel"],
        "hidden_size": TINY.width,
        "intermediate_size": 4 * TINY.width,
        "num_hidden_layers": TINY.vit_layers,
        "num_attention_heads": TINY.vit_heads,
        "image_size": 224,
        "patch_size": TINY.patch,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": 512,
        "intermediate_transformer_output": [4, 6, 8],
    }
    (plip / "config.json").write_text(json.dumps(config))
    torch.save(their_plip_state(), plip / "plip_80w_196token.bin")
    for cross in (False, True):
        torch.save(their_stage_checkpoint(cross), root / f"stage2-cross{int(cross)}.pth")
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_config().text_config).save_pretrained(root / "llm")
    build_tiny_tokenizer().save_pretrained(root / "llm")
    return root


def convert_cli(release, checkpoint, out, *extra) -> int:
    return main(
        [
            "convert",
            "official",
            "--plip",
            str(release / "plip"),
            "--checkpoint",
            str(checkpoint),
            "--llm",
            str(release / "llm"),
            "--out",
            str(out),
            "--connector-heads",
            "4",
            "--connector-layers",
            "2",
            "--dtype",
            "float32",
            "--no-progress",
            *extra,
        ]
    )


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
    assert config.lora["r"] == TINY.rank and config.lora["alpha"] == 2 * TINY.rank
    assert sorted(config.lora["target_modules"]) == sorted(m.split(".")[1] for m, _, _ in TINY.lora_shapes)
    report = json.loads((release / f"out-cross{int(cross_attention)}" / "conversion.json").read_text())
    assert sorted(report["ignored"]) == [
        "checkpoint:projector.model.bert.embeddings.position_ids",
        "plip:vision_model.embeddings.position_ids",
    ]
    assert report["unmapped"] == report["unfilled"] == []


def test_base_llm_weights_are_the_given_llm(release, converted):
    base = load_file(release / "llm" / "model.safetensors")
    params = converted[False].model.state_dict()
    for key, value in base.items():
        ours = re.sub(r"(_proj)\.weight$", r"\1.base_layer.weight", key) if "layers." in key else key
        assert torch.equal(params["language_model.base_model.model." + ours], value), key


def reference_vision_features(state: dict[str, torch.Tensor], pixels: torch.Tensor) -> torch.Tensor:
    """A ViT forward written from their tensors: second-to-last layer, CLS dropped. (N, 3, S, S) -> (N, P,
    D)."""
    p = "vision_model."

    def norm(x, name, eps=1e-5):
        return F.layer_norm(x, x.shape[-1:], state[name + ".weight"], state[name + ".bias"], eps)

    def linear(x, name):
        return F.linear(x, state[name + ".weight"], state[name + ".bias"])

    patches = (
        F.conv2d(pixels, state[p + "embeddings.patch_embedding.weight"], stride=TINY.patch)
        .flatten(2)
        .transpose(1, 2)
    )
    cls = state[p + "embeddings.class_embedding"].expand(pixels.shape[0], 1, -1)
    x = norm(
        torch.cat([cls, patches], 1) + state[p + "embeddings.position_embedding.weight"], p + "pre_layrnorm"
    )
    batch, length, width = x.shape
    for i in range(TINY.vit_layers - 1):  # hidden state -2 = the output of layer L-1
        layer = f"{p}encoder.layers.{i}."
        h = norm(x, layer + "layer_norm1")
        q, k, v = (
            linear(h, layer + f"self_attn.{n}").view(batch, length, TINY.vit_heads, -1).transpose(1, 2)
            for n in ("q_proj", "k_proj", "v_proj")
        )
        weights = (q @ k.transpose(-1, -2) / (width // TINY.vit_heads) ** 0.5).softmax(-1)
        x = x + linear(
            (weights @ v).transpose(1, 2).reshape(batch, length, width), layer + "self_attn.out_proj"
        )
        h = linear(norm(x, layer + "layer_norm2"), layer + "mlp.fc1")
        x = x + linear(h * torch.sigmoid(1.702 * h), layer + "mlp.fc2")  # quick_gelu
    return x[:, 1:]


def test_vision_features_equal_a_vit_computed_from_the_source_tensors(converted, lung_tiles):
    assistant = converted[True]  # with cross-attention every tile goes through the tower
    batch = assistant.processor.image_processor([lung_tiles[0]])
    with torch.no_grad():
        features = assistant.model.encode_crops(batch["pixel_values"], batch["tile_mask"])  # (1, 1+T, P, D)
        real = torch.cat([torch.ones(1, 1, dtype=torch.bool), batch["tile_mask"]], 1)[0]
        reference = reference_vision_features(their_plip_state(), batch["pixel_values"][0, real])
    # a 224 px tile on the paper's 1x4 grid: the global view + the 2 tiles that hold pixels (2 are padding)
    assert features.shape[-2:] == (49, TINY.width) and real.tolist() == [True, False, True, True, False]
    torch.testing.assert_close(features[0, real], reference, atol=1e-4, rtol=1e-4)


def test_unmapped_and_unfilled_tensors_fail_loudly_naming_them(release, tmp_path, capsys):
    state = their_stage_checkpoint(False)
    state["projector.model.bert.encoder.layer.0.intermediate.dense.weight"] = torch.zeros(
        TINY.connector_ffn, TINY.width
    )
    del state["projector.model.bert.encoder.layer.1.output_query.LayerNorm.bias"]
    broken = tmp_path / "broken.pth"
    torch.save(state, broken)
    assert convert_cli(release, broken, tmp_path / "strict") == 1
    error = capsys.readouterr().err
    assert "projector.model.bert.encoder.layer.0.intermediate.dense.weight" in error
    assert "connector.layers.1.output.LayerNorm.bias" in error and "--allow-missing" in error
    assert not (tmp_path / "strict").exists()

    report = convert_official(
        release / "plip",
        broken,
        release / "llm",
        tmp_path / "lenient",
        allow_missing=True,
        connector_heads=4,
        connector_layers=2,
        dtype=torch.float32,
        progress=False,
    )
    assert report.unmapped == ["checkpoint:projector.model.bert.encoder.layer.0.intermediate.dense.weight"]
    assert report.unfilled == ["connector.layers.1.output.LayerNorm.bias"]
    assert "NOT filled" in report.summary() and (tmp_path / "lenient" / "config.json").is_file()


def test_shape_mismatch_and_wrong_inputs_are_errors(release, tmp_path):
    state = their_stage_checkpoint(False)
    state["llm.base_model.model.model.layers.0.mlp.up_proj.lora_B.default.weight"] = torch.zeros(
        255, TINY.rank
    )
    bad = tmp_path / "bad.pth"
    torch.save(state, bad)
    with pytest.raises(ValueError, match=r"up_proj\.lora_B\.default\.weight \(255, 8\) -> .* \(256, 8\)"):
        convert_official(
            release / "plip",
            bad,
            release / "llm",
            tmp_path / "a",
            connector_heads=4,
            connector_layers=2,
            progress=False,
        )
    with pytest.raises(ValueError, match="no connector tensors"):
        convert_official(
            release / "plip",
            release / "plip" / "plip_80w_196token.bin",
            release / "llm",
            tmp_path / "b",
            connector_heads=4,
            progress=False,
        )
    with pytest.raises(ValueError, match="model_type 'llama' is not a CLIP vision config"):
        convert_official(release / "llm", bad, release / "llm", tmp_path / "c", progress=False)
    with pytest.raises(ValueError, match=r"not a multiple of 12 heads \(--connector-heads\)"):
        convert_official(release / "plip", bad, release / "llm", tmp_path / "d", progress=False)


def test_paper_sized_release_fills_the_paper_model_exactly():
    """Their full layout at paper shapes (meta tensors): sizes are read off the tensors, and the mapped
    tensors cover the paper model's vision tower, connector and LoRA exactly, shape for shape."""
    plip, stage = their_plip_state(PAPER), their_stage_checkpoint(False, PAPER)
    connector = connector_config_from(stage, "stage2.pth", num_attention_heads=12)
    assert (connector.hidden_size, connector.num_hidden_layers, connector.intermediate_size) == (768, 6, 3072)
    assert (connector.output_size, connector.tile_cross_attention) == (4096, False)
    plans = plan_plip(plip), plan_checkpoint(stage)
    lora = lora_settings_from(plans[1], stage, alpha=None)
    assert (lora["r"], lora["alpha"], len(lora["target_modules"])) == (128, 256, 7)
    config = paper_config(connector_config=connector, lora=lora)
    with torch.device("meta"):
        targets = PaLlavaForConditionalGeneration(config).state_dict()
    ours = {
        k: v.shape
        for k, v in targets.items()
        if k.startswith(("vision_tower.", "connector.")) or ".lora_" in k
    }
    sources = plip | stage
    mapped = {target: sources[key].shape for plan in plans for key, target in plan.mapping.items()}
    assert [plan.unmapped for plan in plans] == [[], []]
    assert mapped == ours
    counts = [
        sum(t.startswith(part) for t in mapped) for part in ("vision_tower.", "connector.", "language_model.")
    ]
    assert counts == [199, 100, 448]


def test_converted_folder_reproduces_their_preprocessing_and_connector_input(converted, release):
    for assistant in converted.values():
        assert assistant.model.config.connector_config.query_layer_norm is True
        assert (
            assistant.model.config.connector_config.dropout == 0.1
        )  # their BERT-base config's, train mode only
        assert assistant.processor.image_processor.global_view == "stretch"
        assert assistant.processor.image_processor.padding == "black"
        assert assistant.processor.prompt_style == "paper"  # their evaluation asked raw questions
    assert model_prompt_style(release / "out-cross0") == "paper"  # what `pallava eval vqa` reads by default


def last_error_line(capsys) -> str:
    """The CLI's error line, after any progress output; a traceback would have failed the call instead."""
    return capsys.readouterr().err.rstrip().splitlines()[-1]


def test_a_missing_or_extra_connector_layer_fails_the_strict_check(release, tmp_path, capsys):
    state = their_stage_checkpoint(False)
    last_layer = "projector.model.bert.encoder.layer.1."
    torch.save({k: v for k, v in state.items() if not k.startswith(last_layer)}, tmp_path / "one-layer.pth")
    assert convert_cli(release, tmp_path / "one-layer.pth", tmp_path / "a") == 1
    error = capsys.readouterr().err
    assert "connector.layers.1.attention.self.query.weight" in error and "--connector-layers" in error
    assert "holds connector layers [0]" in error and not (tmp_path / "a").exists()
    # the same file read as the release's 6 layers, and a 2-layer model given a 3-layer checkpoint
    assert (
        main(
            [
                "convert",
                "official",
                "--plip",
                str(release / "plip"),
                "--checkpoint",
                str(tmp_path / "one-layer.pth"),
                "--llm",
                str(release / "llm"),
                "--out",
                str(tmp_path / "b"),
                "--connector-heads",
                "4",
            ]
        )
        == 1
    )
    assert "connector.layers.{1,2,3,4,5}.attention.self.query.weight" in capsys.readouterr().err
    extra = their_stage_checkpoint(False) | {
        k.replace("layer.1.", "layer.2."): v for k, v in state.items() if k.startswith(last_layer)
    }
    torch.save(extra, tmp_path / "three-layers.pth")
    assert convert_cli(release, tmp_path / "three-layers.pth", tmp_path / "c") == 1
    assert "projector.model.bert.encoder.layer.2.attention.self.query.weight" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        (
            torch.full((TINY.width,), float("nan")),
            "1 tensor(s) hold NaN or infinite values: projector.model.norm.weight",
        ),
        (
            torch.full((TINY.width,), float("inf")),
            "1 tensor(s) hold NaN or infinite values: projector.model.norm.weight",
        ),
        (
            torch.ones(TINY.width, dtype=torch.int64),
            "not floating point: projector.model.norm.weight (torch.int64)",
        ),
    ],
)
def test_non_finite_and_integer_weights_are_refused(release, tmp_path, capsys, tensor, message):
    state = their_stage_checkpoint(False) | {"projector.model.norm.weight": tensor}
    torch.save(state, tmp_path / "bad.pth")
    assert convert_cli(release, tmp_path / "bad.pth", tmp_path / "out") == 1
    line = last_error_line(capsys)
    assert line.startswith(f"pallava convert: error: {tmp_path / 'bad.pth'}: ") and message in line, line
    assert not (tmp_path / "out").exists()


def test_unreadable_inputs_give_one_line_errors(release, tmp_path, capsys):
    import gzip
    import shutil

    checkpoint = release / "stage2-cross0.pth"
    (tmp_path / "stage2.pth.gz").write_bytes(gzip.compress(checkpoint.read_bytes()))
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "truncated.pth").write_bytes(checkpoint.read_bytes()[:5000])
    for source, message in [
        (tmp_path / "stage2.pth.gz", "gzip-compressed; decompress"),
        (tmp_path / "empty.pth", "empty file (0 bytes)"),
        (tmp_path / "truncated.pth", "not a readable PyTorch checkpoint (truncated or corrupt"),
    ]:
        assert convert_cli(release, source, tmp_path / "out") == 1
        line = last_error_line(capsys)
        assert line.startswith(f"pallava convert: error: {source}: ") and message in line, line

    copy = tmp_path / "copy"
    shutil.copytree(release, copy, ignore=shutil.ignore_patterns("out-*"))
    broken = {
        copy / "plip" / "plip_80w_196token.bin": b"\x1f\x8b" + b"\0" * 64,
        copy / "plip" / "config.json": b"{not json",
        copy / "llm" / "config.json": b"[]",
        copy / "llm" / "model.safetensors": (release / "llm" / "model.safetensors").read_bytes()[:4000],
    }
    expected = [
        "gzip-compressed",
        "config.json: not valid JSON",
        "cannot load the base LLM's",
        "cannot load the base LLM's weights",
    ]
    for (path, content), message in zip(broken.items(), expected, strict=True):
        original = path.read_bytes()
        path.write_bytes(content)
        assert convert_cli(copy, checkpoint, tmp_path / "out") == 1, path
        line = last_error_line(capsys)
        assert line.startswith("pallava convert: error: ") and message in line, line
        path.write_bytes(original)
    assert not (tmp_path / "out").exists()


def test_llm_folders_never_run_code_they_ship(release, tmp_path, plant_folder_code, capsys):
    import shutil

    llm = tmp_path / "llm"
    shutil.copytree(release / "llm", llm)
    marker = plant_folder_code(llm)
    config = json.loads((llm / "config.json").read_text())
    config |= {
        "model_type": "folder_code",
        "auto_map": {"AutoConfig": "folder_code.Cfg", "AutoModelForCausalLM": "folder_code.Model"},
    }
    (llm / "config.json").write_text(json.dumps(config))
    assert (
        main(
            [
                "convert",
                "official",
                "--plip",
                str(release / "plip"),
                "--checkpoint",
                str(release / "stage2-cross0.pth"),
                "--llm",
                str(llm),
                "--out",
                str(tmp_path / "out"),
                "--connector-heads",
                "4",
                "--connector-layers",
                "2",
            ]
        )
        == 1
    )
    assert not marker.exists() and plant_folder_code.asked == []
    assert "custom code" in last_error_line(capsys)
