"""The robustness and magnification benchmarks: their shifted views of the shared dev images keep labels
and change pixels the stated way, their pages render, and the assistant is asked each dataset's own classes.

Benchmarks are not tests: nothing here asserts an accuracy or a time.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `benchmarks/` lives beside `src/`, not inside the package
    sys.path.insert(0, str(ROOT))

pytestmark = pytest.mark.slow  # end to end: `make test-fast` skips it, `make test` runs it


def test_robustness_shifts_change_images_the_stated_way(shared_data):
    from benchmarks import robustness

    from pallava.data.importers.manifest import read_manifest

    items = read_manifest(shared_data / "oscc" / "manifest.csv", "dev")[:10]
    original, labels = robustness.shifted_sets(items, "original")
    for shift in ("stain-a", "stain-b", "zoom-in-2x", "low-res", "nct-stain"):
        images, truth = robustness.shifted_sets(items, shift)
        assert truth == labels and [i.size for i in images] == [i.size for i in original]
        change = np.mean(
            [
                np.abs(np.asarray(a, float) - np.asarray(b, float)).mean()
                for a, b in zip(images, original, strict=True)
            ]
        )
        assert change > 3, shift
    # a restain keeps where the dark (nuclei) and light pixels are
    a = np.asarray(original[0], float).mean(2)
    b = np.asarray(robustness.restain(np.asarray(original[0]), "stain-a"), float).mean(2)
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.9
    # the other lab's real tiles carry about 2.6 times the oral set's haematoxylin: darker, same layout
    other_lab, _ = robustness.shifted_sets(items, "nct-stain")
    grey = [np.asarray(image, float).mean(2) for image in (original[0], other_lab[0])]
    assert grey[1].mean() < grey[0].mean() - 10
    assert np.corrcoef(grey[0].ravel(), grey[1].ravel())[0, 1] > 0.9
    mosaics, truth = robustness.shifted_sets(items, "zoom-out-2x")
    per_class = {label: labels.count(label) for label in set(labels)}
    assert len(mosaics) == sum(max(0, n - 3) for n in per_class.values()) and set(truth) <= set(labels)
    results = {
        "command": "x",
        "epochs": 1,
        "seed": 0,
        "machine": "m",
        "load_average": 1.0,
        "seconds": 1.0,
        "variants": {"none": {d: {s: 0.5 for s in robustness.SHIFTS} for d in robustness.DATASETS}},
    }
    table = robustness.render(results)
    assert "| none | 0.500 (0.50 / 0.50 / 0.50)" in table and "mean of the shifts" in table
    assert "## The trained models" not in table and "## Reading" not in table
    half = results["variants"]["none"]
    demo = {"about": "run", "command": "y", "load_average": 1.0, "seconds": 2.0, "rows": {"assistant": half}}
    table = robustness.render({**results, "reading": ["- a note"], "demo": {**demo, "reading": ["- seen"]}})
    assert "## Reading (from the run above)\n- a note" in table
    assert "## The trained models under the same shifts" in table and "| assistant | 0.500" in table
    assert table.rstrip().endswith("- seen")
    # several scored runs: one heading, a section each; a run trained on normalised images says so
    normalised = {**demo, "about": "run 2", "trained_normalisation": "macenko", "rows": {"PLIP": half}}
    table = robustness.render({**results, "demos": [demo, normalised]})
    assert table.count("## The trained models under the same shifts") == 1
    assert "quickstart run (run)" in table and "quickstart run (run 2)" in table
    assert "trained on macenko-normalised images" in table and "| PLIP | 0.500" in table
    assert robustness.demo_sections({"demo": demo}) == [demo]  # results stored before several could be
    # a row measured before the nct-stain shift existed: a dash there, its mean over the shifts it has
    older = {d: {s: (1.0 if s == "original" else 0.25) for s in robustness.SHIFTS[:-1]} for d in half}
    table = robustness.render({**results, "variants": {"none": older}})
    assert "| none | 1.000 (1.00 / 1.00 / 1.00) |" in table and "| - | 0.250 |" in table


def test_magnification_views_zoom_in_and_out_keeping_labels(shared_data):
    from benchmarks import magnification

    from pallava.data.importers.manifest import read_manifest

    items = read_manifest(shared_data / "oscc" / "manifest.csv", "dev")[:24]
    original, labels = magnification.magnified_views(items, 1.0)

    zoomed_in, truth_in = magnification.magnified_views(items, 4.0)
    zoomed_out, truth_out = magnification.magnified_views(items, 1 / 2)
    assert truth_in == truth_out == labels
    assert {i.size for i in zoomed_in + zoomed_out} == {(224, 224)}
    # x4: the centre quarter of the side enlarged; x1/2: the image itself is the mosaic's top-left quarter
    centre = original[0].crop((84, 84, 140, 140)).resize((224, 224), Image.BICUBIC)
    assert np.array_equal(np.asarray(zoomed_in[0]), np.asarray(centre))
    corner = np.asarray(zoomed_out[0].crop((0, 0, 112, 112)), float)
    assert np.abs(corner - np.asarray(original[0].resize((112, 112)), float)).mean() < 8
    assert np.abs(corner - np.asarray(original[1].resize((112, 112)), float)).mean() > 8
    assert np.array_equal(  # a fixed view: the same mosaics every time
        np.asarray(zoomed_out[0]), np.asarray(magnification.magnified_views(items, 1 / 2)[0][0])
    )
    with pytest.raises(ValueError, match="too few dev images"):
        magnification.magnified_views(items[:3], 1 / 3)
    scores = {
        d: {magnification.zoom_label(z): 0.5 for z in magnification.ZOOMS} for d in magnification.DATASETS
    }
    results = {"command": "x", "machine": "m", "load_average": 1.0, "seconds": 1.0}
    table = magnification.render({**results, "models": {"m": {"about": "a run", "scores": scores}}})
    assert "| m | 0.500 (0.50 / 0.50 / 0.50)" in table and "mean off x1" in table
    assert "## The assistant" not in table
    asked = {"about": "a demo", "scores": scores, "command": "y", "load_average": 1.0, "seconds": 2.0}
    table = magnification.render({**results, "models": {}, "assistants": {"a": asked}})
    assert "## The assistant" in table and "| a | 0.500 (0.50 / 0.50 / 0.50)" in table


def test_the_assistant_is_asked_each_datasets_own_classes_under_each_shift(tiny, tmp_path, monkeypatch):
    from benchmarks import common

    from pallava.inference import PaLlava
    from pallava.processing.loading import load_image

    model, processor = tiny
    PaLlava(model, processor).save_pretrained(tmp_path / "assistant")
    questions = []
    real_ask = PaLlava.ask_batch

    def ask_batch(self, images, asked, **options):
        questions.extend(asked)
        return real_ask(self, images, asked, **options)

    monkeypatch.setattr(PaLlava, "ask_batch", ask_batch)
    first_two = {"two": lambda items: ([load_image(i.path) for i in items[:2]], [i.label for i in items[:2]])}
    scores = common.assistant_under_shifts(
        tmp_path / "assistant", first_two, batch_size=2, class_answers="generated"
    )
    assert set(scores) == set(common.SHIFT_DATASETS) and all(0 <= s["two"] <= 1 for s in scores.values())
    assert len(questions) == 6 and "oral squamous cell carcinoma" in questions[-1]
    assert "lung" not in questions[-1]  # each dataset's own classes only

    # The default, as the suite: the likeliest of the dataset's own class names, so every answer maps.
    candidates = []
    real_scores = PaLlava.answer_log_likelihoods

    def answer_log_likelihoods(self, image, question, answers):
        candidates.append(tuple(answers))
        return real_scores(self, image, question, answers)

    monkeypatch.setattr(PaLlava, "answer_log_likelihoods", answer_log_likelihoods)
    scores = common.assistant_under_shifts(tmp_path / "assistant", first_two)
    assert len(questions) == 6 and len(candidates) == 6  # no generation; one scoring per image
    assert candidates[-1] == ("normal oral mucosa", "oral squamous cell carcinoma")  # the oral set's own
    for dataset, score in scores.items():
        assert score["two"] in (0.0, 0.5, 1.0), dataset  # two images, each answered with a class
    with pytest.raises(ValueError, match="class_answers must be one of"):
        common.assistant_under_shifts(tmp_path / "assistant", first_two, class_answers="sampled")


def test_re_rendering_the_robustness_page_keeps_its_hand_written_sections(tmp_path):
    import json

    from benchmarks import robustness

    results = json.loads((robustness.RESULTS).read_text())
    docs = tmp_path / "robustness.md"
    robustness.write_docs(results, docs)
    assert robustness.HAND_WRITTEN not in docs.read_text()  # nothing hand-written yet: nothing added
    docs.write_text(docs.read_text() + f"\n{robustness.HAND_WRITTEN}\n\n## Measured by hand\n\n0.5\n")
    robustness.write_docs(results, docs)
    robustness.write_docs(results, docs)
    text = docs.read_text()
    assert text.startswith(robustness.render(results)) and text.count("## Measured by hand") == 1
    assert text.endswith("## Measured by hand\n\n0.5\n")
