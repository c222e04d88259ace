"""PLIP model: text-tower init parity, ITM uses the image, save/load, vision export into the assistant,
converter."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import BertModel, CLIPVisionModel

from pallava import cpu
from pallava.convert.plip import convert_plip_checkpoint, load_vision_tower
from pallava.models.plip import PlipConfig, PlipZeroShot, build_plip, export_vision_tower, plip_config
from pallava.models.plip.pretraining import PlipPretrainer
from pallava.models.plip.text_init import load_tokenizer, minilm_dir
from pallava.models.presets import load_preset, tiny_vision_config


@pytest.fixture(scope="module")
def crc_images():
    folder = Path(__file__).resolve().parents[2] / "shared" / "data" / "samples" / "crc"
    if not folder.is_dir():
        pytest.skip("shared data not found")
    return [Image.open(p).convert("RGB") for p in sorted(folder.glob("*"))[:3]]


@pytest.fixture(scope="module")
def plip():
    model, tokenizer = build_plip("tiny", text_layers=1, seed=0)
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def saved(plip, tmp_path_factory):
    model, tokenizer = plip
    path = tmp_path_factory.mktemp("plip")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _pixels(n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 224, 224, generator=torch.Generator().manual_seed(seed))


def test_text_tower_from_minilm_reproduces_bert_hidden_states():
    model, tokenizer = build_plip("tiny", text_layers=6, text_pooling="cls", seed=0)  # all of MiniLM-L6
    bert = BertModel.from_pretrained(str(minilm_dir())).eval()
    tokens = tokenizer(
        ["an H&E image of lung adenocarcinoma.", "benign lung tissue"], padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        expected = bert(**tokens).last_hidden_state
        got = model.eval().text_states(tokens["input_ids"], tokens["attention_mask"])
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert model.config.text_config.encoder_hidden_size == model.config.vision_config.hidden_size == 128


def test_features_are_normalised_and_shaped(plip):
    model, tokenizer = plip
    tokens = tokenizer(["a", "lung squamous cell carcinoma"], padding=True, return_tensors="pt")
    with torch.no_grad():
        images = model.get_image_features(_pixels())
        texts = model.get_text_features(tokens["input_ids"], tokens["attention_mask"])
        logits = model(_pixels(), tokens["input_ids"], tokens["attention_mask"])
    assert images.shape == texts.shape == (2, model.config.embed_dim)
    torch.testing.assert_close(images.norm(dim=1), torch.ones(2))
    torch.testing.assert_close(logits, images @ texts.t() / model.config.temp_init)


def test_itm_cross_attends_to_the_image(plip):
    model, tokenizer = plip
    tokens = tokenizer(["benign lung tissue"] * 2, return_tensors="pt")
    with torch.no_grad():
        image_tokens = model.image_tokens(_pixels(2, seed=1))
        logits = model.itm_logits(image_tokens, tokens["input_ids"], tokens["attention_mask"])
    assert logits.shape == (2, 2)
    assert not torch.allclose(logits[0], logits[1])  # same text, different images
    with pytest.raises(ValueError, match="pairs must align"):
        model.itm_logits(image_tokens[:1], tokens["input_ids"], tokens["attention_mask"])


def test_matching_scores_are_each_classs_mean_match_log_odds_in_any_batching(plip, monkeypatch):
    """`match_scores` pairs every image with every prompt of a class (however the pairs are batched) and
    averages the ITM head's match-minus-no-match logits; `classify_images` by the matching head labels each
    image with the class of the highest score. In fp32 here (a CPU without native bf16)."""
    from pallava.data.labels import LabelMap
    from pallava.models.plip.prompts import class_prompts
    from pallava.models.plip.zeroshot import classify_images, classify_tokens

    monkeypatch.setattr(cpu, "this_cpu_computes_bf16", lambda: False)
    model, tokenizer = plip
    zs = PlipZeroShot(model, tokenizer)
    pixels = _pixels(3, seed=2)
    classes = [["benign lung tissue", "normal lung"], ["lung adenocarcinoma", "an H&E image of a gland", "x"]]
    with torch.no_grad():
        tokens = model.image_tokens(pixels)
        expected = torch.empty(3, 2)
        for image in range(3):
            for column, texts in enumerate(classes):
                for_text = tokenizer(texts, padding=True, return_tensors="pt")
                logits = model.itm_logits(
                    tokens[image : image + 1].expand(len(texts), -1, -1),
                    for_text["input_ids"],
                    for_text["attention_mask"],
                )
                expected[image, column] = (logits[:, 1] - logits[:, 0]).mean()
    for max_pairs in (1, 4, 1000):  # one image per batch, two, all
        torch.testing.assert_close(
            zs.match_scores(tokens, classes, max_pairs), expected, atol=1e-4, rtol=1e-4
        )
    with pytest.raises(ValueError, match="at least one prompt"):
        zs.match_scores(tokens, [["a"], []])

    label_map = LabelMap.builtin("lc25000-lung")
    images = [Image.fromarray((p.permute(1, 2, 0).clamp(-1, 1) * 100 + 128).byte().numpy()) for p in pixels]
    labels, proba = classify_images(zs, images, label_map, head="matching")
    scores = zs.match_scores(zs.encode_image_tokens(images), class_prompts(label_map))
    assert labels == [label_map.labels()[i] for i in scores.argmax(dim=1)]
    assert proba.shape == (3, 3) and np.allclose(proba.sum(axis=1), 1.0)
    with pytest.raises(ValueError, match="unknown zero-shot head 'itc'"):
        classify_images(zs, images, label_map, head="itc")
    # both heads from one pass through the tower give what each gets from the images
    tokens = zs.encode_image_tokens(images)
    for head in ("contrastive", "matching"):
        direct_labels, direct = classify_images(zs, images, label_map, head=head)
        shared_labels, shared = classify_tokens(zs, tokens, label_map, head=head)
        assert shared_labels == direct_labels and np.allclose(shared, direct, atol=1e-5)


def test_matching_scores_run_in_bf16_where_the_cpu_computes_it_close_to_fp32(plip, monkeypatch):
    """On a CPU with native bf16 the matching head runs under bf16 autocast (as PLIP trains there); its
    scores stay within bf16's rounding of fp32's. A caller's own autocast is left as it is."""

    model, tokenizer = plip
    zs = PlipZeroShot(model, tokenizer)
    classes = [["benign lung tissue", "normal lung"], ["lung adenocarcinoma", "an H&E image of a gland"]]
    with torch.no_grad():
        tokens = model.image_tokens(_pixels(4, seed=3))
    seen = []
    itm_logits = model.itm_logits

    def recording(*args, **kwargs):
        seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return itm_logits(*args, **kwargs)

    monkeypatch.setattr(model, "itm_logits", recording)
    monkeypatch.setattr(cpu, "this_cpu_computes_bf16", lambda: False)
    fp32 = zs.match_scores(tokens, classes)
    assert seen and set(seen) == {None}
    seen.clear()
    monkeypatch.setattr(cpu, "this_cpu_computes_bf16", lambda: True)
    bf16 = zs.match_scores(tokens, classes)
    assert seen and set(seen) == {torch.bfloat16}
    spread = float(fp32.abs().max())
    torch.testing.assert_close(bf16, fp32, atol=0.03 * spread + 1e-3, rtol=0)
    seen.clear()
    with torch.autocast("cpu", torch.float16):  # the caller's choice stands
        zs.match_scores(tokens, classes)
    assert set(seen) == {torch.float16}


def test_save_load_round_trip_gives_identical_features(plip, saved, crc_images):
    model, tokenizer = plip
    zs = PlipZeroShot.from_pretrained(saved)
    assert isinstance(zs.model.config, PlipConfig)
    assert zs.model.config.text_config.num_hidden_layers == 1
    texts = ["an H&E image of lung adenocarcinoma.", "normal lung"]
    tokens = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected_texts = model.get_text_features(tokens["input_ids"], tokens["attention_mask"])
    torch.testing.assert_close(zs.encode_texts(texts), expected_texts, rtol=0, atol=0)
    expected = PlipZeroShot(model, tokenizer).encode_images(crc_images)
    torch.testing.assert_close(zs.encode_images(crc_images), expected, rtol=0, atol=0)
    torch.testing.assert_close(
        zs.encode_images(crc_images, batch_size=2), expected
    )  # batching changes nothing
    proba = zs.predict_proba(crc_images, [["adipose tissue", "fat"], ["debris"], ["lymphocytes"]])
    assert proba.shape == (3, 3)
    assert proba.sum(axis=1) == pytest.approx([1.0, 1.0, 1.0], abs=1e-5)


def test_exported_vision_tower_loads_into_the_assistant_with_identical_features(plip, saved, tmp_path):
    model, _ = plip
    out = export_vision_tower(saved, tmp_path / "vision")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    tower = CLIPVisionModel.from_pretrained(out).eval()
    pixels = _pixels(2, seed=2)
    with torch.no_grad():
        expected = model.vision_model(pixels, output_hidden_states=True)
        got = tower(pixels, output_hidden_states=True)
        for mine, theirs in zip(expected.hidden_states, got.hidden_states, strict=True):
            torch.testing.assert_close(theirs, mine, rtol=0, atol=0)
        assistant, _ = load_preset("tiny", vision_path=out)
        crops = assistant.eval().encode_crops(pixels[:, None], torch.zeros(2, 0, dtype=torch.bool))
    layer = assistant.config.vision_feature_layer
    torch.testing.assert_close(crops[:, 0], expected.hidden_states[layer][:, 1:], rtol=0, atol=0)


def test_converter_maps_the_authors_key_layout(tmp_path):
    source = CLIPVisionModel(tiny_vision_config()).eval()
    released = {}
    for key, value in source.state_dict().items():  # the released file's layout
        released["vision_model." + key.replace("post_layernorm", "post_layrnorm")] = value.clone()
    released["vision_model.embeddings.position_ids"] = torch.arange(50).unsqueeze(0)
    folder = tmp_path / "plip"
    folder.mkdir()
    torch.save(released, folder / "plip_80w_196token.bin")
    tiny_vision_config().save_pretrained(folder)
    out = convert_plip_checkpoint(folder / "plip_80w_196token.bin", tmp_path / "converted")
    converted = CLIPVisionModel.from_pretrained(out).eval()
    pixels = _pixels(1, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(
            converted(pixels).pooler_output, source(pixels).pooler_output, rtol=0, atol=0
        )
    del released["vision_model.post_layrnorm.weight"]
    torch.save(released, folder / "plip_80w_196token.bin")
    with pytest.raises(ValueError, match="post_layernorm.weight"):
        load_vision_tower(folder / "plip_80w_196token.bin")


def test_plip_convert_refuses_unreadable_and_invalid_weights_in_one_line(tmp_path, capsys):
    import gzip

    from pallava.cli import main

    released = {
        "vision_model." + k: v.clone() for k, v in CLIPVisionModel(tiny_vision_config()).state_dict().items()
    }
    folder = tmp_path / "plip"
    folder.mkdir()
    tiny_vision_config().save_pretrained(folder)
    weights = folder / "plip_80w_196token.bin"
    nan = released | {
        "vision_model.post_layernorm.bias": torch.full_like(
            released["vision_model.post_layernorm.bias"], float("nan")
        )
    }
    integer = released | {
        "vision_model.pre_layrnorm.weight": torch.ones_like(
            released["vision_model.pre_layrnorm.weight"], dtype=torch.int32
        )
    }
    cases = {
        "hold NaN or infinite values: post_layernorm.bias": lambda: torch.save(nan, weights),
        "not floating point: pre_layrnorm.weight (torch.int32)": lambda: torch.save(integer, weights),
        "gzip-compressed; decompress": lambda: weights.write_bytes(gzip.compress(weights.read_bytes())),
        "config.json: not valid JSON": lambda: (folder / "config.json").write_text("{"),
    }
    for message, damage in cases.items():
        damage()
        assert main(["plip", "convert", "--checkpoint", str(weights), "--out", str(tmp_path / "out")]) == 1
        line = capsys.readouterr().err.rstrip().splitlines()[-1]
        assert line.startswith("pallava plip: error: ") and message in line, line
    assert not (tmp_path / "out").exists()


def test_vision_init_from_a_clip_folder(tmp_path):
    source = CLIPVisionModel(tiny_vision_config())
    source.save_pretrained(tmp_path / "clip")
    model, _ = build_plip("tiny", text_init="scratch", vision_init=tmp_path / "clip", text_layers=1)
    for key, value in source.state_dict().items():
        torch.testing.assert_close(model.vision_model.state_dict()[key], value, rtol=0, atol=0)


def test_momentum_pretrainer_clamps_temperature_and_fills_the_queue():
    model, tokenizer = build_plip("tiny", text_layers=1, use_momentum=True, queue_size=8, itm_max_pairs=2)
    pretrainer = PlipPretrainer(model)
    assert not any(p.requires_grad for p in pretrainer.momentum_model.parameters())
    with torch.no_grad():
        model.temp.fill_(3.0)
    tokens = tokenizer(
        ["benign lung tissue", "lung adenocarcinoma", "benign lung"], padding=True, return_tensors="pt"
    )
    keys = torch.tensor([[1, 10], [2, 20], [3, 10]])
    output = pretrainer(_pixels(3), tokens["input_ids"], tokens["attention_mask"], keys)
    output.loss.backward()
    assert model.temp.item() == pytest.approx(model.config.temp_max)
    assert torch.isfinite(output.loss) and output.loss_itm > 0
    assert model.vision_model.embeddings.patch_embedding.weight.grad is not None
    assert int(pretrainer.queue_ptr) == 3
    assert pretrainer.key_queue[:3].tolist() == keys.tolist()
    torch.testing.assert_close(pretrainer.image_queue[:3].norm(dim=1), torch.ones(3))


def test_tokenizer_caps_text_at_30_tokens():
    tokenizer = load_tokenizer()
    ids = tokenizer(["word " * 100], truncation=True, return_tensors="pt")["input_ids"]
    assert ids.shape[1] == 30


def test_config_round_trips_through_json(tmp_path):
    plip_config("paper").save_pretrained(tmp_path)
    loaded = PlipConfig.from_pretrained(tmp_path)
    assert loaded.text_config.is_decoder and loaded.text_config.encoder_hidden_size == 768
    assert (loaded.vision_config.patch_size, loaded.text_config.num_hidden_layers) == (16, 12)
    assert (loaded.embed_dim, loaded.temp_init, loaded.max_text_length) == (256, 0.07, 30)
    assert (loaded.use_momentum, loaded.momentum, loaded.queue_size) == (True, 0.995, 57600)
    with pytest.raises(ValueError, match="temp_init"):
        PlipConfig(temp_init=0.9)


def test_momentum_pretrainer_trains_under_bf16_autocast_with_fp32_queues():
    # accelerate's bf16 mixed precision runs the step under autocast: bf16 momentum features, fp32 queues
    model, tokenizer = build_plip("tiny", text_layers=1, use_momentum=True, queue_size=8, itm_max_pairs=2)
    pretrainer = PlipPretrainer(model)
    tokens = tokenizer(["benign lung tissue", "lung adenocarcinoma"], padding=True, return_tensors="pt")
    keys = torch.tensor([[1, 10], [2, 20]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = pretrainer(_pixels(2), tokens["input_ids"], tokens["attention_mask"], keys)
    output.loss.backward()
    assert torch.isfinite(output.loss)
    assert pretrainer.image_queue.dtype == torch.float32 and int(pretrainer.queue_ptr) == 2
    torch.testing.assert_close(pretrainer.image_queue[:2].norm(dim=1), torch.ones(2), atol=1e-2, rtol=0)


def test_vision_shape_of_a_from_scratch_tower(tmp_path):
    model, _ = build_plip("tiny", text_init="scratch", text_layers=1, vision={"patch_size": 16})
    assert model.config.vision_config.patch_size == 16
    states = model.vision_model(pixel_values=_pixels(1)).last_hidden_state
    assert states.shape == (1, 197, 128)  # 14 x 14 patches + CLS
    model.save_pretrained(tmp_path)
    assert PlipConfig.from_pretrained(tmp_path).vision_config.patch_size == 16
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['patch'\]"):
        plip_config("tiny", vision={"patch": 16})
    with pytest.raises(ValueError, match="multiple of patch_size"):
        plip_config("tiny", vision={"patch_size": 48})
    CLIPVisionModel(tiny_vision_config()).save_pretrained(tmp_path / "clip")
    with pytest.raises(ValueError, match="from-scratch tower"):
        build_plip("tiny", text_init="scratch", vision_init=tmp_path / "clip", vision={"patch_size": 16})
