"""The standard transformers entry points on a saved tiny model: AutoProcessor, the chat template,
AutoModelForImageTextToText, `model.generate(**inputs)` and the image-text-to-text pipeline."""

from __future__ import annotations

import inspect
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, ProcessorMixin, pipeline

from pallava import PaLlavaForConditionalGeneration, load_preset
from pallava.inference import PaLlava
from pallava.processing.processor import CHAT_TEMPLATE, MODEL_INPUT_NAMES, PaLlavaProcessor

QUESTION = "What tissue is shown?"
MAX_NEW_TOKENS = 6


def noise_image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def messages(image=None) -> list[dict]:
    image_part = {"type": "image", "image": image} if image is not None else {"type": "image"}
    return [{"role": "user", "content": [image_part, {"type": "text", "text": QUESTION}]}]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A saved tiny model folder and our own wrapper's answer for one image."""
    model, processor = load_preset("tiny", seed=5)
    directory = tmp_path_factory.mktemp("auto") / "model"
    assistant = PaLlava(model, processor)
    assistant.save_pretrained(directory)
    image = noise_image(400, 300, seed=1)
    return directory, image, assistant.ask(image, QUESTION, max_new_tokens=MAX_NEW_TOKENS)


def test_auto_processor_is_a_processor_mixin_with_the_saved_chat_template(saved):
    directory, _, _ = saved
    processor = AutoProcessor.from_pretrained(directory)
    assert isinstance(processor, PaLlavaProcessor) and isinstance(processor, ProcessorMixin)
    assert (directory / "chat_template.jinja").read_text() == CHAT_TEMPLATE == processor.chat_template
    assert processor.model_input_names == list(MODEL_INPUT_NAMES)


def test_every_model_input_name_is_a_forward_argument(tiny):
    model, _ = tiny
    assert set(MODEL_INPUT_NAMES) <= set(inspect.signature(model.forward).parameters)


@pytest.mark.parametrize("system_prompt", [None, "You are a pathologist."])
def test_rendered_prompt_encodes_like_the_conversation(tiny, system_prompt):
    """processor(text=apply_chat_template(...)) gives the ids training and PaLlava use, answers included."""
    _, processor = tiny
    processor.system_prompt = system_prompt
    try:
        conversation = [
            {"role": "user", "content": "<image>\nWhat is the diagnosis?  "},
            {"role": "assistant", "content": " lung adenocarcinoma"},
            {"role": "user", "content": [{"type": "text", "text": "And the grade?"}]},
        ]
        image = noise_image(64, 48, seed=2)
        expected = processor(text=[conversation], images=[[image]], add_generation_prompt=True)
        prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
        assert prompt.count("<|begin_of_text|>") == 1 and (system_prompt is None or system_prompt in prompt)
        got = processor(images=image, text=prompt, return_tensors="pt")
    finally:
        processor.system_prompt = None
    assert got["input_ids"].tolist() == expected["input_ids"].tolist()
    assert torch.equal(got["pixel_values"], expected["pixel_values"])
    assert torch.equal(got["tile_mask"], expected["tile_mask"])
    assert "labels" not in got and sorted(got) == sorted(MODEL_INPUT_NAMES)


def test_prompt_and_image_count_mismatch_is_a_clear_error(tiny):
    _, processor = tiny
    with pytest.raises(ValueError, match="1 <image> placeholder"):
        processor(images=[noise_image(32, 32, 0), noise_image(32, 32, 1)], text="<image>\nWhat?")
    with pytest.raises(ValueError, match="neither an image nor a text part"):
        processor.encode_conversation([{"role": "user", "content": [{"type": "video"}]}])


def test_auto_model_generate_answers_like_pallava(saved):
    directory, image, answer = saved
    processor = AutoProcessor.from_pretrained(directory)
    model = AutoModelForImageTextToText.from_pretrained(directory).eval()
    assert isinstance(model, PaLlavaForConditionalGeneration)
    inputs = processor.apply_chat_template(
        messages(image), add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    assert processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True) == answer


def test_image_text_to_text_pipeline_answers_like_pallava(saved):
    directory, image, answer = saved
    answerer = pipeline("image-text-to-text", model=str(directory))
    result = answerer(text=messages(image), max_new_tokens=MAX_NEW_TOKENS, return_full_text=False)
    assert result[0]["generated_text"].strip() == answer


@pytest.mark.slow
def test_import_pallava_alone_registers_the_auto_classes(saved):
    directory, _, _ = saved
    code = (
        "import sys, pallava\n"
        "from transformers import AutoConfig, AutoProcessor\n"
        f"config = AutoConfig.from_pretrained({str(directory)!r})\n"
        f"processor = AutoProcessor.from_pretrained({str(directory)!r})\n"
        "print(type(config).__name__, type(processor).__name__)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["PaLlavaConfig", "PaLlavaProcessor"]


def test_folder_saved_before_the_chat_template_still_loads(saved, tmp_path):
    """Older folders have no chat_template.jinja and a processor_config.json of settings only."""
    directory, _, _ = saved
    for path in directory.iterdir():
        if path.name != "chat_template.jinja":
            (tmp_path / path.name).write_bytes(path.read_bytes())
    (tmp_path / "processor_config.json").write_text(
        '{"num_image_tokens": 49, "system_prompt": null, "max_length": 2048}'
    )
    processor = PaLlavaProcessor.from_pretrained(tmp_path)
    assert processor.chat_template == CHAT_TEMPLATE and processor.num_image_tokens == 49
