"""Export: the folder loads with from_pretrained and gives identical logits; merged and unmerged agree."""

from __future__ import annotations

import json

import pytest
import torch

from pallava import PaLlavaForConditionalGeneration, load_preset
from pallava.inference import PaLlava
from pallava.processing.processor import MODEL_INPUT_NAMES
from pallava.train.export import ADAPTER_DIR, export_model


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """A tiny model whose LoRA is not a no-op (B matrices are zero at initialisation)."""
    model, processor = load_preset("tiny", seed=3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)
    directory = tmp_path_factory.mktemp("export") / "model"
    PaLlava(model, processor).save_pretrained(directory)
    return directory, model.eval(), processor


def _logits(model, processor, images) -> torch.Tensor:
    conversation = [
        {"from": "human", "value": "<image>\nWhat is the diagnosis?"},
        {"from": "gpt", "value": "tissue"},
    ]
    batch = processor(text=[conversation] * len(images), images=[[image] for image in images])
    with torch.no_grad():
        return model(**{k: batch[k] for k in MODEL_INPUT_NAMES}).logits


def test_unmerged_export_reloads_with_identical_logits(saved_model, tmp_path, lung_tiles):
    source, model, processor = saved_model
    out = export_model(source, tmp_path / "unmerged")
    reloaded = PaLlavaForConditionalGeneration.from_pretrained(out).eval()
    assert reloaded.has_lora and reloaded.config.lora == model.config.lora
    assert torch.equal(_logits(reloaded, processor, lung_tiles), _logits(model, processor, lung_tiles))
    adapter = json.loads((out / ADAPTER_DIR / "adapter_config.json").read_text())
    assert (
        adapter["r"] == model.config.lora["r"] and (out / ADAPTER_DIR / "adapter_model.safetensors").is_file()
    )
    card = (out / "README.md").read_text()
    assert f"LoRA: r={model.config.lora['r']}" in card and "No evaluation report" in card


def test_merged_export_agrees_with_the_adapter_and_needs_no_peft(saved_model, tmp_path, lung_tiles):
    source, model, processor = saved_model
    merged = PaLlavaForConditionalGeneration.from_pretrained(
        export_model(source, tmp_path / "merged", merge_lora=True)
    )
    unmerged = PaLlavaForConditionalGeneration.from_pretrained(export_model(source, tmp_path / "unmerged"))
    assert not merged.has_lora and merged.config.lora is None
    assert not any("lora_" in name for name in merged.state_dict())
    expected = _logits(unmerged.eval(), processor, lung_tiles)
    torch.testing.assert_close(_logits(merged.eval(), processor, lung_tiles), expected, rtol=1e-4, atol=1e-4)
    # The LoRA really mattered: without it the logits differ.
    with model.language_model.disable_adapter():
        base = _logits(model, processor, lung_tiles)
    assert not torch.allclose(base, expected, atol=1e-3)
    assert (
        PaLlava.from_pretrained(tmp_path / "merged").ask(lung_tiles[0], "What is shown?", max_new_tokens=2)
        is not None
    )


def test_export_errors(saved_model, tmp_path):
    source, _, _ = saved_model
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        export_model(source, tmp_path / "busy")
    with pytest.raises(ValueError, match="file not found"):
        export_model(source, tmp_path / "out", eval_reports=[tmp_path / "missing.json"])
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="no 'task' field"):
        export_model(source, tmp_path / "out", eval_reports=[tmp_path / "bad.json"])
