"""The authors' released PA-LLaVA (PLIP folder + stage-1/stage-2 checkpoint + base LLM) -> a pallava model
folder.

Their tensors are checked against our model before the base LLM is loaded: every source tensor must have
a place of the same shape, and every vision, connector and LoRA parameter must be filled, unless
`allow_missing` is set (then the lists are reported). Copies are verified bit for bit (after the cast to
`dtype`), and the folder loads with `PaLlava.from_pretrained`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TypeVar

import torch
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, CLIPVisionConfig, CLIPVisionModel

from pallava.convert.checkpoint import check_weights, first_line, read_state_dict
from pallava.convert.keys import (
    CONNECTOR_LAYER,
    KeyPlan,
    plan_checkpoint,
    plan_plip,
    strip_wrappers,
    summarize_keys,
)
from pallava.data.io import read_json_object
from pallava.inference import PaLlava
from pallava.models.configuration_pa_llava import (
    PAPER_CONNECTOR_DROPOUT,
    PaLlavaConfig,
    ScaleInvariantConnectorConfig,
)
from pallava.models.modeling_pa_llava import PaLlavaForConditionalGeneration
from pallava.models.presets import make_processor
from pallava.processing.tokenizer import IMAGE

PLIP_WEIGHTS = "plip_80w_196token.bin"
WEIGHT_SUFFIXES = (".bin", ".pth", ".pt", ".safetensors")
REPORT_FILE = "conversion.json"
# Their connector is a bert-base-uncased encoder cut to a few layers: 12 heads, exact GELU, eps 1e-12.
BERT_BASE = {"hidden_act": "gelu", "layer_norm_eps": 1e-12}
CONNECTOR_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "output_size",
    "tile_cross_attention",
    "hidden_act",
    "layer_norm_eps",
)
LORA_DROPOUT = 0.05  # their training value; inactive at inference
# The depth is not stored in the weights: a checkpoint missing its last layers would look like a shallower
# one.
RELEASE_CONNECTOR_LAYERS = 6
T = TypeVar("T")


@dataclass
class ConversionReport:
    """What a conversion did; written to `<out>/conversion.json`. Source keys are `plip:` / `checkpoint:`
    prefixed."""

    out_dir: str
    plip_weights: str
    checkpoint: str
    llm: str
    dtype: str
    tile_cross_attention: bool
    connector: dict
    lora: dict | None
    mapped: dict[str, str] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)
    unmapped: list[str] = field(default_factory=list)
    unfilled: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = {"vision": "vision_tower.", "connector": "connector.", "LoRA": "language_model."}
        counts = ", ".join(
            f"{name} {sum(t.startswith(prefix) for t in self.mapped.values())}"
            for name, prefix in parts.items()
        )
        lora = (
            "none"
            if not self.lora
            else f"r={self.lora['r']} alpha={self.lora['alpha']} on {self.lora['target_modules']}"
        )
        lines = [
            f"wrote {self.out_dir}: {len(self.mapped)} tensors copied ({counts})",
            f"tile_cross_attention={self.tile_cross_attention}; connector "
            f"{self.connector['num_hidden_layers']} layers, "
            f"width {self.connector['hidden_size']}; LoRA {lora}; dtype {self.dtype}",
        ]
        if self.ignored:
            lines.append("ignored index buffers:" + summarize_keys(self.ignored))
        if self.unmapped:
            lines.append("NOT converted (no place in the model):" + summarize_keys(self.unmapped))
        if self.unfilled:
            lines.append("NOT filled (left at their initial values):" + summarize_keys(self.unfilled))
        return "\n".join(lines)


def plip_files(plip_dir: Path) -> tuple[CLIPVisionConfig, Path]:
    """The vision config and the weights file of a released PLIP folder (`config.json` + one weights file)."""
    if not plip_dir.is_dir() or not (plip_dir / "config.json").is_file():
        raise ValueError(f"{plip_dir}: expected the PLIP folder holding config.json and {PLIP_WEIGHTS}")
    config_file = plip_dir / "config.json"
    data = read_json_object(config_file)
    if data.get("model_type") not in (None, "clip", "clip_vision_model"):
        raise ValueError(f"{config_file}: model_type {data.get('model_type')!r} is not a CLIP vision config")
    try:
        config = CLIPVisionConfig.from_pretrained(plip_dir, trust_remote_code=False)
    except Exception as error:  # transformers raises several types for bad configs
        raise ValueError(f"{config_file}: not a CLIP vision config ({first_line(error)})") from None
    if (plip_dir / PLIP_WEIGHTS).is_file():
        return config, plip_dir / PLIP_WEIGHTS
    weights = sorted(p.name for p in plip_dir.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    if len(weights) != 1:
        raise ValueError(
            f"{plip_dir}: expected one weights file ({PLIP_WEIGHTS} or one *.bin/.pth/.safetensors), "
            f"found {weights or 'none'}"
        )
    return config, plip_dir / weights[0]


def connector_layers_in(state: dict[str, torch.Tensor]) -> list[int]:
    """The connector layer indices a checkpoint holds tensors for."""
    return sorted({int(m.group(1)) for key in state if (m := CONNECTOR_LAYER.match(key))})


def connector_config_from(
    state: dict[str, torch.Tensor],
    source: str,
    num_attention_heads: int,
    num_hidden_layers: int = RELEASE_CONNECTOR_LAYERS,
) -> ScaleInvariantConnectorConfig:
    """Size our connector from their tensors (depth given, as it is not stored); cross-attention exactly when
    their checkpoint has it."""
    if num_attention_heads < 1 or num_hidden_layers < 1:
        raise ValueError(
            "--connector-heads and --connector-layers must be at least 1, "
            f"got {num_attention_heads} and {num_hidden_layers}"
        )
    if not connector_layers_in(state):
        raise ValueError(
            f"{source}: no connector tensors (projector.model.bert.encoder.layer.*): "
            "is this a PA-LLaVA stage-1/stage-2 checkpoint?"
        )

    def shape(key: str) -> torch.Size:
        if key not in state:
            raise ValueError(f"{source}: missing {key}, needed to size the connector")
        return state[key].shape

    layer0 = "projector.model.bert.encoder.layer.0."
    width = shape(layer0 + "attention.self.query.weight")[1]
    if width % num_attention_heads:
        raise ValueError(
            f"connector width {width} is not a multiple of {num_attention_heads} heads (--connector-heads)"
        )
    return ScaleInvariantConnectorConfig(
        hidden_size=width,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        intermediate_size=shape(layer0 + "intermediate_query.dense.weight")[0],
        tile_cross_attention=any(".crossattention." in key for key in state if CONNECTOR_LAYER.match(key)),
        output_size=shape("projector.model.mlp.model.0.weight")[0],
        dropout=PAPER_CONNECTOR_DROPOUT,  # their BERT-base config's; inactive at inference
        query_layer_norm=True,  # their BERT embedding LayerNorm, affine parameters removed, still applied
        **BERT_BASE,
    )


def lora_settings_from(plan: KeyPlan, state: dict[str, torch.Tensor], alpha: float | None) -> dict | None:
    """LoRA rank and target modules read off the lora_A matrices; alpha defaults to 2 x rank (theirs:
    128/256)."""
    a_keys = [key for key in plan.mapping if ".lora_A." in key]
    if not a_keys:
        return None
    ranks = sorted({state[key].shape[0] for key in a_keys})
    if len(ranks) != 1:
        raise ValueError(
            f"LoRA ranks differ between modules ({ranks}); one rank for all modules is supported"
        )
    modules = sorted({re.search(r"\.([^.]+)\.lora_A\.", key).group(1) for key in a_keys})
    return {
        "r": ranks[0],
        "alpha": alpha if alpha is not None else 2 * ranks[0],
        "dropout": LORA_DROPOUT,
        "target_modules": modules,
    }


def _image_token_id(tokenizer) -> int:
    if tokenizer.convert_tokens_to_ids(IMAGE) in (None, tokenizer.unk_token_id):
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE]})
    return tokenizer.convert_tokens_to_ids(IMAGE)


def _check_plan(
    sources: dict[str, tuple[dict[str, torch.Tensor], KeyPlan, str]],
    targets: dict[str, torch.Size],
    allow_missing: bool,
    notes: Sequence[str] = (),
) -> tuple[dict[str, str], dict[str, torch.Tensor], list[str], list[str]]:
    """Validate every mapping against the model's names, shapes and value types; `notes` explain a failure.

    Returns (source name -> target, target -> tensor, unmapped source names, unfilled targets); source
    names are `label:key`."""
    mapped, tensors, unmapped, by_target, mismatched = {}, {}, [], {}, []
    messages = []
    for label, (state, plan, path) in sources.items():
        check_weights({key: state[key] for key in plan.mapping}, path)  # always: no NaN, no integer weights
        bad = list(plan.unmapped)
        for key, target in plan.mapping.items():
            if target not in targets:
                bad.append(key)
            elif state[key].shape != targets[target]:
                hint = (
                    " (empty: a ZeRO-3 shard? consolidate it with DeepSpeed's zero_to_fp32.py)"
                    if not state[key].numel()
                    else ""
                )
                mismatched.append(
                    f"{label}:{key} {tuple(state[key].shape)} -> {target} {tuple(targets[target])}{hint}"
                )
            elif target in by_target:
                raise ValueError(f"{label}:{key} and {by_target[target]} both map to {target}")
            else:
                by_target[target] = f"{label}:{key}"
                mapped[f"{label}:{key}"] = target
                tensors[target] = state[key]
        if bad:
            messages.append(f"{path}: {len(bad)} tensors have no place in the model:" + summarize_keys(bad))
            unmapped += [f"{label}:{key}" for key in bad]
    if mismatched:
        raise ValueError("shapes differ between the source and the model:\n  " + "\n  ".join(mismatched))
    needed = [k for k in targets if k.startswith(("vision_tower.", "connector.")) or ".lora_" in k]
    unfilled = sorted(k for k in needed if k not in by_target)
    if unfilled:
        messages.append(
            f"{len(unfilled)} model parameters are filled by no source tensor:" + summarize_keys(unfilled)
        )
    if messages and not allow_missing:
        raise ValueError(
            "\n".join([*messages, *notes]) + "\nPass --allow-missing (allow_missing=True) to convert anyway."
        )
    return mapped, tensors, unmapped, unfilled


def _copy_exactly(model: PaLlavaForConditionalGeneration, tensors: dict[str, torch.Tensor]) -> None:
    """Copy tensors into the model's parameters by name and check each copy bit for bit (after the dtype
    cast)."""
    params = model.state_dict()  # detached views sharing the parameters' storage
    with torch.no_grad():
        for target, tensor in tensors.items():
            params[target].copy_(tensor)
            if not torch.equal(params[target], tensor.to(params[target].dtype)):
                raise RuntimeError(f"the copy into {target} is not exact")


def _from_llm_folder(llm_dir: Path, what: str, load: Callable[[], T]) -> T:
    try:
        return load()
    except Exception as error:  # transformers raises OSError, ValueError, JSON and safetensors errors, ...
        raise ValueError(f"{llm_dir}: cannot load the base LLM's {what} ({first_line(error)})") from None


def convert_official(
    plip_dir: str | Path,
    checkpoint: str | Path,
    llm_dir: str | Path,
    out_dir: str | Path,
    *,
    allow_missing: bool = False,
    connector_heads: int = 12,
    connector_layers: int = RELEASE_CONNECTOR_LAYERS,
    lora_alpha: float | None = None,
    dtype: torch.dtype = torch.bfloat16,
    progress: bool = True,
) -> ConversionReport:
    """Convert the released PLIP + stage checkpoint onto the base LLM in `llm_dir`; write a model folder.

    Strict by default: an unmapped source tensor or an unfilled vision/connector/LoRA parameter is a
    ValueError listing the names; so is a connector layer missing from (or extra in) the checkpoint, which
    is built `connector_layers` deep. NaN, infinite or integer weights and unreadable files are always
    errors. Runs in `dtype` (the release was trained in bfloat16).
    """
    plip_dir, checkpoint, llm_dir, out = Path(plip_dir), Path(checkpoint), Path(llm_dir), Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out}: output folder is not empty; choose a new or empty folder")
    if not (llm_dir / "config.json").is_file():
        raise ValueError(f"{llm_dir}: not a Hugging Face model folder (no config.json)")
    vision_config, plip_file = plip_files(plip_dir)
    with tqdm(total=5, desc="convert", unit="step", disable=not progress) as bar:
        bar.set_postfix_str("reading PLIP")
        plip_state = read_state_dict(plip_file)
        bar.update()
        bar.set_postfix_str("reading checkpoint")
        ckpt_state = {strip_wrappers(key): value for key, value in read_state_dict(checkpoint).items()}
        bar.update()

        plip_plan, ckpt_plan = plan_plip(plip_state), plan_checkpoint(ckpt_state)
        tokenizer = _from_llm_folder(
            llm_dir, "tokenizer", lambda: AutoTokenizer.from_pretrained(llm_dir, trust_remote_code=False)
        )
        text_config = _from_llm_folder(
            llm_dir, "config", lambda: AutoConfig.from_pretrained(llm_dir, trust_remote_code=False)
        )
        config = PaLlavaConfig(
            vision_config=vision_config,
            connector_config=connector_config_from(
                ckpt_state, str(checkpoint), connector_heads, connector_layers
            ),
            text_config=text_config,
            image_token_id=_image_token_id(tokenizer),
            grid_policy="paper",
            lora=lora_settings_from(ckpt_plan, ckpt_state, lora_alpha),
            text_model_path=str(llm_dir),
        )
        with torch.device("meta"):  # names and shapes only: fail before loading gigabytes of LLM
            targets = {k: v.shape for k, v in PaLlavaForConditionalGeneration(config).state_dict().items()}
        sources = {
            "plip": (plip_state, plip_plan, str(plip_file)),
            "checkpoint": (ckpt_state, ckpt_plan, str(checkpoint)),
        }
        found = connector_layers_in(ckpt_state)
        notes = (
            []
            if found == list(range(connector_layers))
            else [
                f"{checkpoint} holds connector layers {found}; the model is built with {connector_layers} "
                f"(--connector-layers; the release has {RELEASE_CONNECTOR_LAYERS})"
            ]
        )
        mapped, tensors, unmapped, unfilled = _check_plan(sources, targets, allow_missing, notes)

        bar.set_postfix_str("loading the LLM")
        language_model = _from_llm_folder(
            llm_dir,
            "weights",
            lambda: AutoModelForCausalLM.from_pretrained(llm_dir, dtype=dtype, trust_remote_code=False),
        )
        config.text_config = language_model.config
        model = PaLlavaForConditionalGeneration(
            config, vision_tower=CLIPVisionModel(vision_config), language_model=language_model
        ).to(dtype)
        bar.update()
        bar.set_postfix_str("copying")
        _copy_exactly(model, tensors)
        bar.update()
        bar.set_postfix_str("saving")
        processor = make_processor(config, tokenizer)
        processor.image_processor.global_view = "stretch"  # their weights saw stretched global views
        processor.image_processor.padding = "black"  # and tile canvases padded with black
        processor.prompt_style = "paper"  # and raw questions: `pallava eval` asks them that way by default
        PaLlava(model, processor).save_pretrained(out)
        report = ConversionReport(
            out_dir=str(out),
            plip_weights=str(plip_file),
            checkpoint=str(checkpoint),
            llm=str(llm_dir),
            dtype=str(dtype).removeprefix("torch."),
            tile_cross_attention=config.connector_config.tile_cross_attention,
            connector={name: getattr(config.connector_config, name) for name in CONNECTOR_FIELDS},
            lora=config.lora,
            mapped=mapped,
            ignored=[f"plip:{k}" for k in plip_plan.ignored] + [f"checkpoint:{k}" for k in ckpt_plan.ignored],
            unmapped=unmapped,
            unfilled=unfilled,
        )
        (out / REPORT_FILE).write_text(json.dumps(asdict(report), indent=2) + "\n", encoding="utf-8")
        bar.update()
    return report
