"""The assistant on the tiny preset: scale invariance, tiles, padding, save/load, LoRA, labels, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from peft import PeftModel
from PIL import Image
from transformers import LlamaForCausalLM

from pallava import PaLlavaConfig, PaLlavaForConditionalGeneration, ScaleInvariantConnectorConfig, load_preset
from pallava.inference import PaLlava
from pallava.models.connector import ScaleInvariantConnector
from pallava.models.presets import paper_config, tiny_config, tiny_vision_config
from pallava.models.vision_tower import PallavaVisionModel
from pallava.processing.image import PaLlavaImageProcessor
from pallava.processing.processor import IGNORE_INDEX, MODEL_INPUT_NAMES, PaLlavaProcessor

MODEL_KEYS = (*MODEL_INPUT_NAMES, "labels")


def model_inputs(batch) -> dict:
    return {k: v for k, v in batch.items() if k in MODEL_KEYS}


def tiny_connector(**changes) -> ScaleInvariantConnectorConfig:
    return ScaleInvariantConnectorConfig(**{**tiny_config().connector_config.to_dict(), **changes})


def noise_image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("size", [(224, 224), (1000, 300), (2000, 2000)])
def test_language_model_gets_the_same_number_of_image_tokens_at_any_size(tiny, size):
    model, processor = tiny
    batch = processor(text=[processor.question("What is shown?")], images=[[noise_image(*size, seed=1)]])
    image_tokens = int((batch["input_ids"] == model.config.image_token_id).sum())
    assert image_tokens == model.config.num_image_tokens == 49
    with torch.no_grad():
        embeds = model.get_image_embeddings(batch["pixel_values"], batch["tile_mask"])
    assert embeds.shape == (1, 49, model.config.text_config.hidden_size)


def test_tiles_matter_only_with_tile_cross_attention(tiny):
    _, processor = tiny
    batch = processor(text=[processor.question("Describe.")], images=[[noise_image(448, 224, seed=2)]])
    changed = dict(batch)
    changed["pixel_values"] = batch["pixel_values"].clone()
    changed["pixel_values"][0, 2] = torch.randn_like(changed["pixel_values"][0, 2])  # second tile only
    for cross_attention, should_change in ((True, True), (False, False)):
        model, _ = load_preset(
            "tiny", seed=0, connector_config=tiny_connector(tile_cross_attention=cross_attention)
        )
        model.eval()
        with torch.no_grad():
            before = model(**model_inputs(batch)).logits
            after = model(**model_inputs(changed)).logits
        assert (not torch.allclose(before, after, atol=1e-5)) == should_change


def test_a_tile_that_repeats_the_global_view_is_encoded_once(tiny, lung_tiles):
    model, processor = tiny
    small = Image.open(lung_tiles[0]).convert("RGB")  # 224 px: one tile, letterboxed as the global view is
    wide = small.resize((448, 224))  # two tiles
    crops: list[int] = []
    embeddings = model.vision_tower.embeddings
    hook = embeddings.register_forward_hook(lambda module, args, out: crops.append(len(args[0])))
    try:
        batch = processor.image_processor([small, wide])
        with torch.no_grad():
            features = model.encode_crops(batch["pixel_values"], batch["tile_mask"])
            alone = model.vision_hidden_states(batch["pixel_values"][0, 1:2])[0, 1:]  # the tile by itself
        assert crops[0] == 1 + 3  # the small image's global view; the wide one's global view and 2 tiles
        assert torch.equal(features[0, 1], features[0, 0])
        torch.testing.assert_close(features[0, 1], alone)
        # A stretched global view is not its letterboxed tile: both go through the tower.
        stretched = PaLlavaImageProcessor(global_view="stretch")([small.resize((224, 150))])
        with torch.no_grad():
            model.encode_crops(stretched["pixel_values"], stretched["tile_mask"])
        assert crops[-1] == 2
    finally:
        hook.remove()


def test_empty_padding_tiles_are_not_keys_of_the_cross_attention(tiny):
    # A 224 x 224 image under the paper's grids: tiles 0 and 3 of the 1x4 grid are pure padding.
    model, _ = tiny
    paper = PaLlava(
        model, PaLlavaProcessor(tiny[1].tokenizer, PaLlavaImageProcessor(grid_policy="paper"), 49)
    )
    batch = paper.processor.image_processor([noise_image(224, 224, seed=4)])
    assert batch["tile_mask"].tolist() == [[False, True, True, False]]
    changed = batch["pixel_values"].clone()
    changed[0, 1] = torch.randn_like(changed[0, 1])  # the first tile (empty padding)
    with torch.no_grad():
        before = model.get_image_embeddings(batch["pixel_values"], batch["tile_mask"])
        after = model.get_image_embeddings(changed, batch["tile_mask"])
        attention = model.cross_attention_map(batch["pixel_values"], batch["tile_mask"])  # (1, 4, 49)
    torch.testing.assert_close(before, after)
    assert attention[0, 0].sum() == 0 and attention[0, 3].sum() == 0 and attention[0, 1:3].sum() > 0


def test_paper_connector_has_bert_base_dropout_in_train_mode_only():
    # The authors build the connector from the BERT-base config: hidden and attention dropout 0.1.
    assert paper_config().connector_config.dropout == 0.1
    assert tiny_config().connector_config.dropout == 0.0  # the tiny preset keeps the quickstart deterministic
    torch.manual_seed(0)
    connector = ScaleInvariantConnector(tiny_connector(dropout=0.1))
    tokens, tiles, mask = (
        torch.randn(1, 49, 128),
        torch.randn(1, 2, 49, 128),
        torch.ones(1, 2, dtype=torch.bool),
    )
    connector.train()
    assert not torch.allclose(connector(tokens, tiles, mask), connector(tokens, tiles, mask))
    connector.eval()
    torch.testing.assert_close(connector(tokens, tiles, mask), connector(tokens, tiles, mask))
    # with query_layer_norm (the released layout) the normalised queries are dropped out too, as their
    # BERT embedding module does after its LayerNorm: visible even with no layer at all
    bare = ScaleInvariantConnector(
        tiny_connector(dropout=0.1, num_hidden_layers=0, query_layer_norm=True)
    ).train()
    assert not torch.allclose(bare(tokens, tiles, mask), bare(tokens, tiles, mask))


def test_query_layer_norm_switch_changes_the_connector_output(tiny):
    model, _ = tiny
    config = tiny_connector(query_layer_norm=True)
    normed = type(model.connector)(config)
    normed.load_state_dict(model.connector.state_dict())
    tokens = torch.randn(1, 49, 128) * 3 + 1
    tiles = torch.randn(1, 1, 49, 128)
    mask = torch.ones(1, 1, dtype=torch.bool)
    with torch.no_grad():
        assert not torch.allclose(normed(tokens, tiles, mask), model.connector(tokens, tiles, mask))


def test_padding_invariance_of_logits_and_generation(tiny, lung_tiles):
    model, processor = tiny
    small = Image.open(lung_tiles[0])
    large = noise_image(900, 500, seed=3)
    short_q = processor.question("What is the diagnosis?")
    long_q = processor.question(
        "Look at the whole slide region carefully and tell me which tissue it shows, and why."
    )
    for side in ("left", "right"):
        alone = processor(text=[short_q], images=[[small]], add_generation_prompt=True, padding_side=side)
        batch = processor(
            text=[short_q, long_q], images=[[small], [large]], add_generation_prompt=True, padding_side=side
        )
        assert batch["tile_mask"].shape[1] > alone["tile_mask"].shape[1]  # the neighbour forces tile padding
        with torch.no_grad():
            logits_alone = model(**model_inputs(alone)).logits[0]
            logits_batch = model(**model_inputs(batch)).logits[0]
        keep = batch["attention_mask"][0].bool()
        torch.testing.assert_close(logits_batch[keep], logits_alone, atol=1e-4, rtol=1e-4)
    assistant = PaLlava(model, processor)
    one_by_one = [
        assistant.ask(small, "What is the diagnosis?", max_new_tokens=6),
        assistant.ask(large, "Which tissue is this, and why?", max_new_tokens=6),
    ]
    batched = assistant.ask_batch(
        [small, large], ["What is the diagnosis?", "Which tissue is this, and why?"], max_new_tokens=6
    )
    assert batched == one_by_one


def test_save_load_round_trip_gives_identical_logits(tiny, tmp_path, lung_tiles):
    model, processor = tiny
    PaLlava(model, processor).save_pretrained(tmp_path)
    loaded = PaLlava.from_pretrained(tmp_path)
    assert isinstance(loaded.model.config, PaLlavaConfig) and loaded.model.has_lora
    batch = processor(text=[processor.question("What is shown?")], images=[[lung_tiles[1]]])
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.model(**model_inputs(batch)).logits, model(**model_inputs(batch)).logits
        )
    assert loaded.processor.tokenizer.get_vocab() == processor.tokenizer.get_vocab()


def test_lora_adapter_save_reload_and_merge(tmp_path, lung_tiles):
    model, processor = load_preset("tiny", seed=0)
    model.eval()
    with torch.no_grad():  # LoRA B starts at zero; give it weight so merging is a real test
        for name, param in model.language_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    batch = processor(text=[processor.question("What is shown?")], images=[[lung_tiles[2]]])
    with torch.no_grad():
        reference = model(**model_inputs(batch)).logits
    model.language_model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    reloaded = PeftModel.from_pretrained(LlamaForCausalLM(model.config.text_config), tmp_path / "adapter")
    original_lora = {k: v for k, v in model.language_model.state_dict().items() if "lora_" in k}
    reloaded_lora = {k: v for k, v in reloaded.state_dict().items() if "lora_" in k}
    assert original_lora.keys() == reloaded_lora.keys() and original_lora
    for key in original_lora:
        torch.testing.assert_close(original_lora[key], reloaded_lora[key])
    model.merge_lora()
    assert not model.has_lora and model.config.lora is None
    with torch.no_grad():
        torch.testing.assert_close(model(**model_inputs(batch)).logits, reference, atol=1e-4, rtol=1e-4)


def test_only_answer_tokens_carry_loss_and_one_bos(tiny):
    _, processor = tiny
    conversation = [
        {"from": "human", "value": "<image>\nWhat is the diagnosis?"},
        {"from": "gpt", "value": "lung adenocarcinoma"},
    ]
    ids, labels = processor.encode_conversation(conversation)
    assert ids.count(processor.bos_id) == 1 and ids[0] == processor.bos_id
    supervised = [token for token, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX]
    answer = processor.tokenizer.encode("lung adenocarcinoma", add_special_tokens=False)
    assert supervised == answer + [processor.eot_id]
    assert all(
        label == IGNORE_INDEX
        for token, label in zip(ids, labels, strict=True)
        if token == processor.image_token_id
    )


def test_repeated_text_pieces_are_tokenised_once_with_the_same_ids(tiny, monkeypatch):
    """The processor keeps the ids of each text piece it has tokenised (bounded): a conversation encodes
    to the same ids as through the tokenizer alone, and a repeated piece costs no tokenizer call."""
    import copy

    from pallava.processing import processor as processor_module

    def fresh():  # the session's processor with nothing remembered
        processor = copy.deepcopy(tiny[1])
        processor._pieces.clear()
        processor._headers.clear()
        return processor

    processor = fresh()
    conversations = [
        [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]
        for question in ("What is the diagnosis?", "Is this tissue malignant?")
        for answer in ("lung adenocarcinoma", "no", "benign lung tissue")
    ]
    calls = []
    encode = processor.tokenizer.encode
    monkeypatch.setattr(processor.tokenizer, "encode", lambda *a, **k: calls.append(a[0]) or encode(*a, **k))
    first = [processor.encode_conversation(c) for c in conversations]
    assert sorted(calls) == sorted(set(calls))  # each piece (header words too) tokenised once
    calls.clear()
    assert [processor.encode_conversation(c) for c in conversations] == first and not calls
    for (ids, _), conversation in zip(first, conversations, strict=True):
        answer = encode(conversation[1]["value"], add_special_tokens=False)
        assert ids[-len(answer) - 1 : -1] == answer

    monkeypatch.setattr(processor_module, "PIECE_MEMO_SIZE", 2)
    bounded = fresh()
    assert [bounded.encode_conversation(c) for c in conversations] == first
    assert len(bounded._pieces) == 2


def test_clear_errors(tiny):
    model, processor = tiny
    with pytest.raises(ValueError, match="1 <image> placeholder"):
        processor(text=[processor.question("What?")], images=[[]])
    with pytest.raises(ValueError, match="0 <image> placeholder"):
        processor(text=[processor.question("What?", with_image=False)], images=[[noise_image(32, 32, 0)]])
    with pytest.raises(ValueError, match="cannot decode image"):
        processor(text=[processor.question("What?")], images=[[b"\x00garbage bytes"]])
    with pytest.raises(ValueError, match="over the limit"):
        processor.image_processor.max_pixels = 1000
        try:
            processor(text=[processor.question("What?")], images=[[noise_image(100, 100, 0)]])
        finally:
            processor.image_processor.max_pixels = 16_777_216
    batch = processor(text=[processor.question("What?")], images=[[noise_image(64, 64, 0)]])
    two_images = torch.cat([batch["pixel_values"], batch["pixel_values"]])
    with pytest.raises(ValueError, match="Image features and image tokens do not match"):
        model(
            input_ids=batch["input_ids"],
            pixel_values=two_images,
            tile_mask=torch.ones(2, 1, dtype=torch.bool),
        )


def test_save_and_reload_processor(tiny, tmp_path):
    _, processor = tiny
    processor.save_pretrained(tmp_path)
    reloaded = PaLlavaProcessor.from_pretrained(tmp_path)
    conversation = [{"role": "user", "content": "<image>\nIs this benign?"}]
    assert reloaded.encode_conversation(conversation, True) == processor.encode_conversation(
        conversation, True
    )


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_paper_preset_parameter_counts_on_meta_device():
    model, processor = load_preset("paper", device="meta")
    assert processor is None and next(model.parameters()).device.type == "meta"
    connector = count(model.connector)
    lora = sum(p.numel() for n, p in model.language_model.named_parameters() if "lora_" in n)
    no_cross_config = ScaleInvariantConnectorConfig(
        **{**model.config.connector_config.to_dict(), "tile_cross_attention": False}
    )
    no_cross, _ = load_preset("paper", device="meta", connector_config=no_cross_config)
    print(
        f"\npaper preset: connector {connector / 1e6:.1f}M with cross-attention, "
        f"{count(no_cross.connector) / 1e6:.1f}M without; LoRA {lora / 1e6:.1f}M; "
        f"vision {count(model.vision_tower) / 1e6:.1f}M; total {count(model) / 1e9:.2f}B"
    )
    assert 59e6 < connector < 61e6
    assert 45e6 < count(no_cross.connector) < 47e6
    assert 335e6 < lora < 336e6
    assert 85e6 < count(model.vision_tower) < 88e6


def test_auto_classes_resolve(tmp_path):
    from transformers import AutoConfig, AutoModelForImageTextToText

    model, _ = load_preset("tiny", lora=None)
    model.save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), PaLlavaConfig)
    assert isinstance(AutoModelForImageTextToText.from_pretrained(tmp_path), PaLlavaForConditionalGeneration)


def test_model_folders_never_run_code_they_ship(tiny, tmp_path, plant_folder_code):
    model, processor = tiny
    folder = tmp_path / "assistant"
    PaLlava(model, processor).save_pretrained(folder)
    marker = plant_folder_code(folder)
    refused = ""
    try:
        PaLlava.from_pretrained(folder)
    except ValueError as error:
        refused = str(error)
    assert not marker.exists() and plant_folder_code.asked == []
    assert "custom code" in refused


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"num_image_tokens": 10**9}, r"num_image_tokens must be an integer from 1 to 4,096, got 1000000000"),
        ({"num_image_tokens": "196"}, r"num_image_tokens must be an integer from 1 to 4,096, got '196'"),
        ({"max_length": 0}, r"max_length must be an integer from 1 to 1,048,576, got 0"),
        ({"system_prompt": 3}, r"system_prompt must be a string or null, got 3"),
        ({"temperature": 0.5}, r"unknown field\(s\) \['temperature'\]; expected .*num_image_tokens"),
    ],
)
def test_absurd_processor_config_is_refused_on_load(tiny, tmp_path, settings, message):
    _, processor = tiny
    processor.save_pretrained(tmp_path)
    path = tmp_path / "processor_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **settings}))
    with pytest.raises(ValueError, match=rf"processor_config\.json: {message}"):
        PaLlavaProcessor.from_pretrained(tmp_path)


@pytest.mark.parametrize("feature_layer", [-1, -2])
def test_a_trainable_vision_tower_trains_only_what_reaches_the_language_model(feature_layer):
    # Distributed training refuses a trainable parameter that gets no gradient: the post-LayerNorm, and the
    # layers above the feature layer, never reach the connector.
    model, processor = load_preset("tiny", seed=0, vision_feature_layer=feature_layer)
    model.set_trainable(vision=True)
    batch = processor(text=[processor.question("What is shown?")], images=[[noise_image(500, 224, seed=2)]])
    model(**model_inputs(batch)).logits.float().sum().backward()
    trained = [name for name, param in model.named_parameters() if param.requires_grad]
    without_gradient = [
        name for name, param in model.named_parameters() if param.requires_grad and param.grad is None
    ]
    assert without_gradient == []
    layers = len(model.vision_tower.encoder.layers)
    used = layers + 1 + feature_layer  # the layers below the feature layer's hidden state
    assert any(name.startswith("vision_tower.embeddings.") for name in trained)
    assert any(name.startswith(f"vision_tower.encoder.layers.{used - 1}.") for name in trained)
    assert not any(name.startswith(f"vision_tower.encoder.layers.{used}.") for name in trained)
    assert not any(name.startswith("vision_tower.post_layernorm") for name in trained)


def test_a_trainable_vision_tower_on_a_pretrained_stem_trains_only_its_trainable_backbone_steps(tmp_path):
    # The stem's frozen backbone steps run outside autograd: switched on with the rest of the embeddings they
    # would be trainable parameters without a gradient.
    tower_config = tiny_vision_config()
    tower_config.update({"pretrained_stem": "efficientnet-lite0", "pretrained_stem_trainable": 2})
    PallavaVisionModel(tower_config).save_pretrained(tmp_path / "tower")
    model, processor = load_preset("tiny", seed=0, vision_feature_layer=-1, vision_path=tmp_path / "tower")
    model.set_trainable(vision=True)
    batch = processor(text=[processor.question("What is shown?")], images=[[noise_image(300, 224, seed=3)]])
    model(**model_inputs(batch)).logits.float().sum().backward()
    trunk = "vision_tower.embeddings.patch_embedding.trunk."
    trained = [name for name, param in model.named_parameters() if param.requires_grad]
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
    assert f"{trunk}conv_head.weight" in trained and f"{trunk}blocks.15._expand_conv.weight" in trained
    assert not any(name.startswith((f"{trunk}blocks.14.", f"{trunk}conv_stem.")) for name in trained)


def test_a_nested_override_changes_only_the_fields_it_names():
    # Recipes write `model.overrides: {connector_config: {tile_cross_attention: false}}` or `{lora: {r: 8}}`:
    # the other fields stay the preset's, not the class defaults (the paper's connector width).
    tiny, paper = tiny_config(), paper_config()
    changed = tiny_config(
        connector_config={"tile_cross_attention": False}, vision_config={"patch_size": 16}, lora={"r": 8}
    )
    assert changed.connector_config.tile_cross_attention is False
    assert changed.connector_config.hidden_size == tiny.connector_config.hidden_size == 128
    assert (changed.vision_config.patch_size, changed.vision_config.hidden_size) == (16, 128)
    assert changed.lora == {**tiny.lora, "r": 8}
    shallow = paper_config(connector_config={"num_hidden_layers": 2}, text_config={"num_hidden_layers": 2})
    assert shallow.connector_config.dropout == paper.connector_config.dropout == 0.1
    assert shallow.connector_config.hidden_size == 768
    assert (shallow.text_config.num_hidden_layers, shallow.text_config.hidden_size) == (2, 4096)
    assert tiny_config(lora=None).lora is None  # a value that is not a dict replaces


def test_a_misspelt_model_override_is_an_error_naming_it():
    # transformers configs keep any attribute they are given, so a typo would otherwise change nothing
    with pytest.raises(ValueError, match="connector_config.tile_cross_atention"):
        tiny_config(connector_config={"tile_cross_atention": False})
    with pytest.raises(ValueError, match="vision_feature_layers"):
        tiny_config(vision_feature_layers=-1)
