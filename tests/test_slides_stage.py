"""Stage slide end to end on tiny virtual slides: train, ask (API, CLI, HTTP), evaluate with the baselines."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
import torch

from pallava.cli import main
from pallava.data.importers.manifest import read_manifest
from pallava.data.labels import LabelMap
from pallava.inference import PaLlava
from pallava.serve.app import BackgroundServer, ServerSettings, create_app
from pallava.slides.evaluate import METRICS, evaluate_slides
from pallava.slides.mil import slide_label
from pallava.slides.questions import score, training_question
from pallava.slides.virtual import build_virtual_slides, list_slides, load_truth
from pallava.train.config import load_recipe
from pallava.train.slide import train_slide

REPO_CONFIG = "configs/slide-tiny.yaml"


@pytest.fixture(scope="module")
def run(tmp_path_factory, lung, tiny):
    """Four small slides, a random tiny assistant and PLIP, and a 3-step slide stage."""
    from pallava.models.plip import build_plip

    root = tmp_path_factory.mktemp("slide-stage")
    items = read_manifest(lung / "manifest.csv", "dev")
    build_virtual_slides(
        items,
        LabelMap.builtin("lc25000-lung"),
        4,
        root / "slides",
        seed=2,
        min_tiles=10,
        max_tiles=20,
        progress=False,
    )
    PaLlava(*tiny).save_pretrained(root / "assistant")
    plip, tokenizer = build_plip("tiny", text_init="scratch", text_layers=1, seed=0)
    plip.save_pretrained(root / "plip")
    tokenizer.save_pretrained(root / "plip")
    recipe = load_recipe(
        REPO_CONFIG,
        "slide",
        [
            f"data.path={root / 'slides'}",
            f"model.init={root / 'assistant'}",
            f"slide.plip={root / 'plip'}",
            f"feature_cache.dir={root / 'cache'}",
            "train.max_steps=3",
            "train.batch_size=4",
            "slide.mil_epochs=2",
            "slide.evidence_epochs=2",
            "slide.attention_loss=0.5",
            "slide.chunk_tiles=4",
        ],
    )
    out = train_slide(recipe, root / "slide-model", progress=False)
    return root, out


def test_stage_trains_the_position_embedding_and_saves_model_baseline_and_history(run):
    root, out = run
    history = json.loads((out / "slide_training.json").read_text())
    assert history["steps"] == 3 and len(history["history"]) == 3
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["attention_loss"]) for r in history["history"])
    for name in (
        "config.json",
        "slide_position.safetensors",
        "slide_config.json",
        "slide_evidence.safetensors",
        "attention-mil.safetensors",
        "attention-mil.json",
        "recipe.yaml",
    ):
        assert (out / name).is_file(), name
    from safetensors.torch import load_file

    assert load_file(str(out / "slide_position.safetensors"))["proj.weight"].abs().sum() > 0  # it learned
    evidence = load_file(str(out / "slide_evidence.safetensors"))
    assert evidence["to_tokens.weight"].abs().sum() > 0  # the language model learned to read the evidence
    assert evidence["classes_to_tokens.weight"].abs().sum() > 0  # its class probabilities
    assert evidence["quadrants_to_tokens.weight"].abs().sum() > 0  # and where its attention lies
    classes = json.loads((out / "slide_config.json").read_text())["evidence"]["classes"]
    truths = [load_truth(p) for p in list_slides(root / "slides")]
    assert classes == sorted({slide_label(t) for t in truths})
    cached = list((root / "cache").rglob("*.safetensors"))
    assert len(cached) == 2 * len(list_slides(root / "slides"))  # assistant features + PLIP per slide


def test_ask_slide_answers_and_writes_one_heat_value_per_tissue_tile(run, tmp_path):
    root, out = run
    slide = list_slides(root / "slides")[0]
    result = PaLlava.from_pretrained(out).ask_slide(
        slide, "Is there carcinoma on this slide?", tmp_path, max_new_tokens=4
    )
    assert len(result.answers) == 1 and isinstance(result.answers[0], str)
    assert result.attention.shape == (len(result.features.grid.tiles),)
    assert np.isclose(result.attention.sum(), 1.0, atol=1e-4)
    geojson = json.loads((tmp_path / "attention.geojson").read_text())
    assert len(geojson["features"]) == len(result.features.grid.tiles)
    assert (tmp_path / "attention.png").stat().st_size > 0


def test_cli_asks_the_whole_slide_without_a_region(run, tmp_path, capsys):
    root, out = run
    slide = list_slides(root / "slides")[1]
    code = main(
        [
            "slide",
            "ask",
            "--slide",
            str(slide),
            "--model",
            str(out),
            "--out",
            str(tmp_path),
            "--max-new-tokens",
            "4",
            "Where on the slide is the tumour?",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "tissue tiles)" in printed and "attention.png" in printed
    assert json.loads((tmp_path / "answers.json").read_text())["questions"] == [
        "Where on the slide is the tumour?"
    ]


def test_eval_report_has_every_metric_for_the_model_and_both_baselines(run, tmp_path):
    root, out = run
    report = evaluate_slides(
        out,
        root / "slides",
        tmp_path,
        cache_dir=root / "cache",
        n_resamples=50,
        max_new_tokens=4,
        progress=False,
    )
    assert set(report["methods"]) == {"slide_model", "attention_mil", "retrieve_then_ask"}
    for metrics in report["methods"].values():
        assert set(metrics) == set(METRICS)
        assert metrics["tumour_present"]["n"] == 4 and metrics["tumour_present"]["ci95"] is not None
    assert len(report["scaling"]) == 4 and all(
        r["seconds"] > 0 and r["peak_rss_mib"] > 0 for r in report["scaling"]
    )
    for name in ("report.md", "report.json", "scaling.png", "predictions.jsonl"):
        assert (tmp_path / name).is_file()
    assert len((tmp_path / "predictions.jsonl").read_text().splitlines()) == 4


def test_http_route_answers_a_local_slide_and_refuses_oversized_uploads(run):
    root, out = run
    slide = list_slides(root / "slides")[0]
    settings = ServerSettings(
        allow_local_dir=root / "slides", default_max_tokens=4, max_slide_bytes=slide.stat().st_size + 1
    )
    with BackgroundServer(create_app(PaLlava.from_pretrained(out), settings)) as server:
        reply = httpx.post(
            f"{server.url}/v1/slides/ask",
            json={"slide": slide.name, "question": "Is there carcinoma?"},
            timeout=120,
        )
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert isinstance(body["answer"], str) and len(body["attention"]["features"]) == body["tissue_tiles"]
        escape = httpx.post(
            f"{server.url}/v1/slides/ask", json={"slide": "../x.tiff", "question": "?"}, timeout=60
        )
        assert escape.status_code == 400
        big = httpx.post(
            f"{server.url}/v1/slides/ask/upload",
            params={"question": "Is there carcinoma?"},
            content=b"\0" * (slide.stat().st_size + 2),
            timeout=60,
        )
        assert big.status_code == 413
        junk = httpx.post(
            f"{server.url}/v1/slides/ask/upload",
            params={"question": "Is there carcinoma?"},
            content=b"not a slide",
            timeout=60,
        )
        assert junk.status_code == 400 and "slide" in junk.json()["error"]["message"]


def test_questions_are_scored_against_the_truth(run):
    root, _ = run
    truth = next(load_truth(p) for p in list_slides(root / "slides") if load_truth(p)["tumour_present"])
    name = truth["tumour_class"]
    assert score("presence", "Yes.", truth) and not score("presence", "no", truth)
    assert score("diagnosis", name.upper(), truth) and not score("diagnosis", truth["benign_class"], truth)
    assert score("location", " and ".join(truth["location"]), truth)
    assert not score("location", "somewhere", truth)
    question, answer = training_question("choice", truth, __import__("random").Random(0))
    letter = answer.split(":")[0]
    assert f"{letter}: {name}" in question and answer.endswith(name)
    torch.manual_seed(0)


def _recipe(root, *overrides: str):
    """The repository's slide recipe on the fixture's slides, assistant and feature cache."""
    return load_recipe(
        REPO_CONFIG,
        "slide",
        [
            f"data.path={root / 'slides'}",
            f"model.init={root / 'assistant'}",
            f"feature_cache.dir={root / 'cache'}",
            "slide.chunk_tiles=4",
            *overrides,
        ],
    )


def test_a_stopped_slide_stage_resumes_and_logs_the_uninterrupted_losses(run, tmp_path, monkeypatch):
    """Stage slide on the training loop: a run stopped after its step-2 checkpoint continues from it and
    replays the seeded question stream, so steps 3-4 are the uninterrupted run's."""
    from pallava.train import checkpoints
    from pallava.train.feedback import read_jsonl

    root, _ = run
    recipe = _recipe(
        root, "train.max_steps=4", "train.batch_size=4", "checkpoint.every=2", "logging.tensorboard=false"
    )
    reference = train_slide(recipe, tmp_path / "reference", progress=False)

    class Stopped(Exception):
        pass

    save = checkpoints.save_training_state

    def save_then_stop(accelerator, directory, step, *args, **kwargs):
        path = save(accelerator, directory, step, *args, **kwargs)
        if step == 2:
            raise Stopped
        return path

    monkeypatch.setattr(checkpoints, "save_training_state", save_then_stop)
    with pytest.raises(Stopped):
        train_slide(recipe, tmp_path / "stopped", progress=False)
    monkeypatch.setattr(checkpoints, "save_training_state", save)
    resumed = train_slide(recipe, tmp_path / "stopped", progress=False)
    want, got = read_jsonl(reference / "metrics.jsonl"), read_jsonl(resumed / "metrics.jsonl")
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    for a, b in zip(want, got, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), b["step"]
        assert b["lr"] == pytest.approx(a["lr"])


def test_every_question_asks_each_slide_every_kind_from_one_connector_pass(run):
    """With slide.every_question a step's samples are slides: each is asked every kind, its tiles enter the
    batch once, and the loss equals the one with a separate connector pass per question."""
    from types import SimpleNamespace

    from pallava.train.slide import SlideTask, attention_loss, collate

    root, _ = run
    recipe = _recipe(root, "train.batch_size=2", "slide.every_question=true", "slide.attention_loss=0.5")
    task = SlideTask(recipe, progress=False)
    loop = SimpleNamespace(
        accelerator=SimpleNamespace(device=torch.device("cpu"), print=lambda *a: None, num_processes=1),
        show_progress=False,
    )
    plan = task.setup(loop)
    assert plan.steps_per_epoch == len(list_slides(root / "slides")) // 2
    (slides, pairs), tensors = next(task.batches(0, 0, 1))
    kinds = recipe.slide.questions
    assert len(slides) == 2 and pairs == [(i, kind) for i in slides for kind in kinds]
    assert tensors["tile_tokens"].shape[0] == 2 and tensors["input_ids"].shape[0] == 2 * len(kinds)
    assert tensors["owner"].tolist() == [row for row in range(2) for _ in kinds]

    task.assistant.model.eval()  # no dropout: both ways must give the same number
    grouped = task.loss(None, ((slides, pairs), tensors), 0).loss
    _, questions = next(task._questions())  # the same seeded stream: the step's questions
    texts = [(row, question, answer) for row, (_, question, answer) in enumerate(questions)]
    separate = collate([task.features[i] for i, _ in pairs], texts, task.assistant.processor)
    embeds, mass = task.slide_model.batch_embeddings(separate, need_mass=True)
    weights = recipe.slide.question_weights  # the recipe's, applied per question in both
    summed, tokens = task.slide_model.loss(
        separate, embeds, torch.tensor([float(weights.get(kind, 1.0)) for _, kind in pairs])
    )
    expected = summed / tokens + 0.5 * attention_loss(
        mass[:: len(kinds)], [(task.features[i], task.truths[i]) for i in slides]
    )
    assert torch.allclose(grouped, expected, atol=1e-5)


def test_question_weights_count_each_answers_tokens_that_many_times(run):
    """Weights 1 give the plain token sum; a weight of 0 drops a sequence; a weight of 2 counts it twice."""
    from pallava.slides.model import SlideAssistant
    from pallava.train.slide import collate

    root, out = run
    slide_model = SlideAssistant.from_pretrained(out)
    slide_model.model.eval()
    from pallava.slides.features import SlideFeatureCache, encoder_namespace, slide_features
    from pallava.slides.mapping import TilingOptions
    from pallava.slides.reader import open_slide

    cache = SlideFeatureCache(
        root / "cache",
        encoder_namespace(slide_model.model, slide_model.assistant.processor, {"dtype": "float16"}),
    )
    with open_slide(list_slides(root / "slides")[0]) as slide:
        features = slide_features(
            slide, slide_model.model, slide_model.assistant.processor, cache, TilingOptions()
        )
    texts = [(0, "Is there carcinoma on this slide?", "yes"), (0, "Which organ is this tissue from?", "lung")]
    batch = collate([features], texts, slide_model.assistant.processor)
    with torch.no_grad():
        embeds, _ = slide_model.batch_embeddings(batch)
        embeds = embeds[batch["owner"]]
        plain = slide_model.loss(batch, embeds)
        ones = slide_model.loss(batch, embeds, torch.tensor([1.0, 1.0]))
        first = slide_model.loss(batch, embeds, torch.tensor([1.0, 0.0]))
        doubled = slide_model.loss(batch, embeds, torch.tensor([2.0, 0.0]))
        alone = slide_model.loss(collate([features], texts[:1], slide_model.assistant.processor), embeds[:1])
    assert torch.allclose(ones[0], plain[0], atol=1e-4) and ones[1] == plain[1]
    assert torch.allclose(first[0], alone[0], atol=1e-4) and first[1] == alone[1]
    assert torch.allclose(doubled[0], 2 * alone[0], atol=1e-4) and doubled[1] == 2 * alone[1]


def test_sample_average_weighs_each_answer_by_its_kind_not_by_its_length(run):
    """With train.loss_average=sample each answer's weight is its kind's weight over its token count, so the
    loss is the kind-weighted mean of the answers' own mean losses."""
    from types import SimpleNamespace

    from pallava.train.slide import SlideTask

    root, _ = run
    recipe = _recipe(root, "train.batch_size=2", "slide.every_question=true", "train.loss_average=sample")
    task = SlideTask(recipe, progress=False)
    loop = SimpleNamespace(
        accelerator=SimpleNamespace(device=torch.device("cpu"), print=lambda *a: None, num_processes=1),
        show_progress=False,
    )
    task.setup(loop)
    (slides, pairs), tensors = next(task.batches(0, 0, 1))
    tokens = (tensors["labels"][:, 1:] != -100).sum(dim=1)
    assert len(set(tokens.tolist())) > 1  # answers of different lengths
    kinds = torch.tensor([float(recipe.slide.question_weights.get(kind, 1.0)) for _, kind in pairs])
    weights = task._answer_weights(pairs, tensors)
    torch.testing.assert_close(weights * tokens, kinds)
    task.assistant.model.eval()
    with torch.no_grad():
        embeds, _ = task.slide_model.batch_embeddings(tensors)
        embeds = embeds[tensors["owner"]]
        summed, counted = task.slide_model.loss(tensors, embeds, weights)
        means = torch.stack(
            [
                task.slide_model.loss(tensors, embeds, (torch.arange(len(pairs)) == i).float())[0] / tokens[i]
                for i in range(len(pairs))
            ]
        )
    torch.testing.assert_close(summed / counted, (kinds * means).sum() / kinds.sum())


def test_plip_embeddings_reuse_the_assistants_tower_when_it_holds_plips_weights(run, monkeypatch):
    """With PLIP's own tower in the assistant (the quickstart's setup) the tiles go through it once: the PLIP
    embeddings from its last layer, pooled as PLIP pools ([CLS] or the patch mean), equal PLIP's own
    encoding. Another tower, or another size, is not used."""
    from pallava.models.plip.zeroshot import PlipZeroShot
    from pallava.slides.features import slide_features
    from pallava.slides.mapping import TilingOptions
    from pallava.slides.reader import open_slide

    root, _ = run
    assistant = PaLlava.from_pretrained(root / "assistant")
    model, processor = assistant.model.eval(), assistant.processor
    size = processor.image_processor.tile_size
    with torch.no_grad():  # the fixture's random towers share a seed: make this one another tower
        next(model.vision_tower.parameters()).add_(0.01)
    plip = PlipZeroShot.from_pretrained(root / "plip")
    assert not plip.shares_tower(model.vision_tower, size)

    model.vision_tower.load_state_dict(plip.model.vision_model.state_dict())
    plip = PlipZeroShot.from_pretrained(root / "plip")
    assert plip.shares_tower(model.vision_tower, size)
    assert not plip.shares_tower(model.vision_tower, size + 32)

    def features(zero_shot):
        with open_slide(list_slides(root / "slides")[0]) as slide:
            return slide_features(slide, model, processor, None, TilingOptions(), zero_shot, "plip")

    by_pooling, encoded = {}, []
    for pooling in ("cls", "mean"):
        plip.model.config.image_pooling = pooling
        monkeypatch.setattr(plip, "encode_pixels", lambda pixels: encoded.append(pixels) or None)
        shared = features(plip)
        assert not encoded  # one pass through the tower
        monkeypatch.undo()
        monkeypatch.setattr(plip, "shares_tower", lambda tower, image_size: False)
        separate = features(plip)
        monkeypatch.undo()
        assert shared.plip.shape == separate.plip.shape == (len(shared), plip.model.config.embed_dim)
        assert torch.allclose(shared.plip, separate.plip, atol=1e-5)
        by_pooling[pooling] = shared.plip
    assert not torch.allclose(by_pooling["cls"], by_pooling["mean"], atol=1e-3)


def test_a_tower_trained_on_normalised_images_reads_slide_tiles_normalised(run, monkeypatch):
    """The tiles and the global view go through the tower's recorded stain normalisation (here set on the
    processor), and the features are cached under another name than the plain ones."""
    import pallava.slides.features as features_module
    from pallava.processing.stain_norm import stain_normalize
    from pallava.slides.features import SlideFeatureCache, slide_features
    from pallava.slides.mapping import TilingOptions
    from pallava.slides.reader import open_slide

    root, _ = run
    assistant = PaLlava.from_pretrained(root / "assistant")
    model, processor = assistant.model.eval(), assistant.processor
    processor.image_processor.stain_normalize = None
    cache = SlideFeatureCache(root / "stain-cache", "namespace")
    normalised = []

    def counting(image, method):
        normalised.append(method)
        return stain_normalize(image, method)

    monkeypatch.setattr(features_module, "stain_normalize", counting)
    with open_slide(list_slides(root / "slides")[0]) as slide:
        plain = slide_features(slide, model, processor, cache, TilingOptions())
        assert set(normalised) == {None}
        normalised.clear()
        processor.image_processor.stain_normalize = "macenko"
        stained = slide_features(slide, model, processor, cache, TilingOptions())
    assert normalised.count("macenko") == len(stained) + 1  # every tile and the global view
    assert len(list((root / "stain-cache").rglob("*.safetensors"))) == 2  # two cache entries
    assert not torch.equal(plain.tile_tokens, stained.tile_tokens)
    assert not torch.equal(plain.global_tokens, stained.global_tokens)


def test_a_tile_memo_encodes_each_distinct_tile_once_and_changes_no_feature(run, monkeypatch):
    """Virtual slides repeat their source tiles: with a memo the tower sees each distinct tile once, across
    slides, and every slide's features equal those computed without it."""
    from pallava.models.plip.zeroshot import PlipZeroShot
    from pallava.slides.features import TileMemo, slide_features
    from pallava.slides.mapping import TilingOptions
    from pallava.slides.reader import open_slide

    root, _ = run
    assistant = PaLlava.from_pretrained(root / "assistant")
    model, processor = assistant.model.eval(), assistant.processor
    plip = PlipZeroShot.from_pretrained(root / "plip")
    encode = model.vision_hidden_states
    rows = []
    monkeypatch.setattr(model, "vision_hidden_states", lambda x: rows.append(len(x)) or encode(x))

    def every_slide(memo):
        found = []
        for path in list_slides(root / "slides"):
            with open_slide(path) as slide:
                options = TilingOptions()
                found.append(slide_features(slide, model, processor, None, options, plip, "p", memo=memo))
        return found

    plain = every_slide(None)
    tiles, slides = sum(len(f) for f in plain), len(plain)
    assert sum(rows) == tiles + slides  # every tile and each slide's global view
    rows.clear()
    memo = TileMemo()
    remembered = every_slide(memo)
    assert len(memo) + memo.hits == tiles and memo.hits > 0  # the fixture's slides share dev tiles
    assert sum(rows) == len(memo) + slides
    for a, b in zip(plain, remembered, strict=True):
        assert torch.allclose(a.tile_tokens.float(), b.tile_tokens.float(), atol=2e-3)
        assert torch.allclose(a.tile_summaries.float(), b.tile_summaries.float(), atol=2e-3)
        assert torch.allclose(a.plip, b.plip, atol=1e-4)
        assert torch.equal(a.global_tokens, b.global_tokens)
