"""Export a trained model folder for sharing: LoRA merged or kept (plus a peft adapter), and a model card.

The export loads with `PaLlavaForConditionalGeneration.from_pretrained` / `PaLlava.from_pretrained` like
any trained folder. The model card (README.md) lists the base models, the data and recipe of every
training stage (from `training_history.json`) and the evaluation numbers of the given reports.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pallava.inference import PaLlava
from pallava.train.trainer import HISTORY_FILE

ADAPTER_DIR = "llm-lora-adapter"


def _load_report(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--eval-report {path}: file not found")
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"--eval-report {path}: not valid JSON ({error.msg})") from None
    if not isinstance(report, dict) or "task" not in report:
        raise ValueError(f"--eval-report {path}: not a `pallava eval` report (no 'task' field)")
    return report


def _base_models(config, history: list[dict[str, Any]]) -> list[str]:
    first = history[0]["recipe"]["model"] if history else {}
    preset = first.get("preset", "unknown")
    vision = config.vision_config
    text = config.text_config
    connector = config.connector_config
    vision_source = config.vision_model_path or f"random initialisation (preset `{preset}`)"
    text_source = config.text_model_path or f"random initialisation (preset `{preset}`)"
    return [
        f"- Vision tower: CLIP ViT, {vision.image_size} px, patch {vision.patch_size}, width "
        f"{vision.hidden_size}, "
        f"{vision.num_hidden_layers} layers; weights from {vision_source}.",
        f"- Connector: scale-invariant, {connector.num_hidden_layers} layers, width "
        f"{connector.hidden_size}, tile "
        f"cross-attention {'on' if connector.tile_cross_attention else 'off'}, {config.num_image_tokens} "
        "image tokens.",
        f"- Language model: {text.model_type}, width {text.hidden_size}, {text.num_hidden_layers} layers, "
        f"vocabulary {text.vocab_size}; weights from {text_source}.",
    ]


def _stage_lines(entry: dict[str, Any]) -> list[str]:
    recipe = entry["recipe"]
    data, run, optim, trainable = recipe["data"], recipe["train"], recipe["optim"], recipe["trainable"]
    rates = {g: optim.get(f"lr_{g}") or optim["lr"] for g in ("connector", "lora", "llm", "vision")}
    trained = [g for g in ("vision", "connector", "lora", "llm") if trainable.get(g)]
    if trainable.get("llm_modules"):
        trained.append("LLM parts " + ", ".join(trainable["llm_modules"]))
    split = f", split `{data['split']}`" if data.get("split") else ""
    return [
        f"### Stage `{entry['stage']}`",
        f"- Data: `{data['path']}`{split} ({entry['samples']} samples)",
        f"- Trained: {', '.join(trained)}; learning rates "
        + ", ".join(f"{g} {rates[g]:g}" for g in trained if g in rates),
        f"- {entry['steps']} optimizer steps, batch {run['batch_size']} x {entry['processes']} process(es) x "
        f"accumulation {run['grad_accum']}, AdamW betas {tuple(optim['betas'])}, weight decay "
        f"{optim['weight_decay']}, warm-up {optim['warmup_ratio']:.0%} then cosine, gradient clip "
        f"{optim['max_grad_norm']}, precision {entry.get('precision', run['mixed_precision'])}",
        f"- Final training loss (mean of the last steps): {entry['final_loss']:.4f}",
    ]


def _report_lines(report: dict[str, Any], source: str) -> list[str]:
    where = f"`{report.get('data', '?')}`" + (f" split `{report['split']}`" if report.get("split") else "")
    lines = [f"- {report['task']} on {where} (report `{source}`, scorer `{report.get('scorer', '-')}`):"]
    if report["task"] == "vqa":
        for kind in ("closed", "open", "choice"):
            block = report.get(kind)
            if isinstance(block, dict) and "accuracy" in block:
                lines.append(f"  - {kind}: accuracy {block['accuracy']:.4f} (n={block.get('n', '?')})")
    else:
        for key in ("accuracy",):
            if key in report:
                lines.append(f"  - accuracy {report[key]:.4f} (n={report.get('n', '?')})")
        for key in ("micro", "macro"):
            if isinstance(report.get(key), dict) and "f1" in report[key]:
                lines.append(f"  - {key} F1 {report[key]['f1']:.4f}")
    return lines


def model_card(
    assistant: PaLlava, history: list[dict[str, Any]], reports: Sequence[tuple[str, dict]], merged: bool
) -> str:
    """The README.md of an exported model."""
    config = assistant.model.config
    lora = config.lora
    lines = [
        "# PA-LLaVA assistant (pallava)",
        "",
        "A pathology language-vision assistant: vision tower -> scale-invariant connector -> language model.",
        "",
        "## Base models",
        *_base_models(config, history),
    ]
    if merged:
        lines.append("- LoRA: merged into the language model's weights (no peft needed to run).")
    elif lora:
        lines.append(
            f"- LoRA: r={lora.get('r')}, alpha={lora.get('alpha')}, "
            f"on {', '.join(lora.get('target_modules', []))}; "
            f"kept as modules, and also saved as a peft adapter in `{ADAPTER_DIR}/`."
        )
    lines += ["", "## Training data and recipe"]
    if not history:
        lines.append("No training history was found in the model folder.")
    for entry in history:
        lines += _stage_lines(entry) + [""]
    lines += ["## Evaluation"]
    if reports:
        for source, report in reports:
            lines += _report_lines(report, source)
    else:
        lines.append("No evaluation report was given (`pallava export --eval-report REPORT_JSON`).")
    lines += [
        "",
        "## Use",
        "```python",
        "from pallava.inference import PaLlava",
        "",
        'assistant = PaLlava.from_pretrained("THIS_FOLDER")',
        'print(assistant.ask("tile.png", "What is the diagnosis?"))',
        "```",
        "",
    ]
    return "\n".join(lines)


def export_model(
    model_dir: str | Path,
    out_dir: str | Path,
    merge_lora: bool = False,
    eval_reports: Sequence[str | Path] = (),
) -> Path:
    """Write an exported copy of `model_dir` into `out_dir` (which must not exist or be empty)."""
    model_dir, out = Path(model_dir), Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"--out {out} is not empty; choose a new folder")
    reports = [(str(path), _load_report(path)) for path in eval_reports]
    assistant = PaLlava.from_pretrained(model_dir)
    history_path = model_dir / HISTORY_FILE
    history = json.loads(history_path.read_text()) if history_path.is_file() else []
    had_lora = assistant.model.has_lora
    if merge_lora:
        assistant.model.merge_lora()
    assistant.save_pretrained(out)
    if had_lora and not merge_lora:
        assistant.model.language_model.save_pretrained(out / ADAPTER_DIR)
    if history_path.is_file():
        shutil.copy2(history_path, out / HISTORY_FILE)
    (out / "README.md").write_text(
        model_card(assistant, history, reports, merge_lora and had_lora), encoding="utf-8"
    )
    return out
