"""`pallava plip probe`: a linear probe of PLIP's frozen image features, fitted on one split, scored on
another; the regularisation chosen on the fitting split alone."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pallava.cli import main
from pallava.data.records import LabelledImage
from pallava.train.plip_probe import PROBE_STRENGTHS, few_shots, fit_probe, probe_report


def _blobs(n_per_class: int, separation: float, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """Two classes of 16-dimensional features: Gaussian blobs `separation` apart along every axis."""
    rng = np.random.default_rng(seed)
    features = np.concatenate(
        [rng.normal(0, 1, (n_per_class, 16)), rng.normal(separation, 1, (n_per_class, 16))]
    )
    return features, ["a"] * n_per_class + ["b"] * n_per_class


def test_a_probe_finds_separable_classes_and_not_absent_ones():
    features, labels = _blobs(60, separation=3.0)
    fitted, search = fit_probe(features, labels)
    held_out, truth = _blobs(50, separation=3.0, seed=1)
    assert (fitted.predict(held_out) == np.array(truth)).mean() == 1.0
    assert search["C"] in PROBE_STRENGTHS and search["folds"] == 5 and not search["grouped"]
    # features that say nothing of the label: held-out accuracy stays near chance
    noise, _ = _blobs(60, separation=0.0, seed=2)
    fitted, _ = fit_probe(noise, labels)
    held_out, truth = _blobs(200, separation=0.0, seed=3)
    assert abs((fitted.predict(held_out) == np.array(truth)).mean() - 0.5) < 0.1


def test_cross_validation_keeps_clusters_together_when_it_can():
    features, labels = _blobs(20, separation=3.0)
    clusters = [f"{label}-{i // 4}" for i, label in enumerate(labels)]  # five clusters of each class
    assert fit_probe(features, labels, clusters)[1]["grouped"]
    # one cluster a class cannot be split into folds: ordinary stratified folds instead
    assert not fit_probe(features, labels, labels)[1]["grouped"]
    # one image of a class: nothing to validate on, C is the default
    _, search = fit_probe(features[:21], labels[:21])
    assert search == {"C": 1.0, "folds": 0, "grouped": False, "cv_accuracy": None}
    with pytest.raises(ValueError, match="at least two classes"):
        fit_probe(features[:20], labels[:20])


def test_few_shots_draws_per_class_with_a_seed():
    items = [LabelledImage(f"{label}{i}.png", label) for label in ("x", "y") for i in range(10)]
    items += [LabelledImage("z0.png", "z")]
    picked = few_shots(items, 4, seed=0)
    assert {label: sum(i.label == label for i in picked) for label in "xyz"} == {"x": 4, "y": 4, "z": 1}
    assert few_shots(items, 4, seed=0) == picked and few_shots(items, 4, seed=1) != picked
    assert few_shots(items, None) == items
    with pytest.raises(ValueError, match="--shots"):
        few_shots(items, 0)


def test_a_class_scored_but_never_fitted_is_an_error():
    fit = [LabelledImage("a.png", "a"), LabelledImage("b.png", "b")]
    with pytest.raises(ValueError, match=r"\['c'\]"):
        probe_report(None, fit, [LabelledImage("c.png", "c")])


@pytest.mark.parametrize("features", ["embedding", "tower"])
def test_probe_cli_on_two_real_datasets(tiny_plip_dir, manifest_subset, tmp_path, features):
    lung, oral = manifest_subset("lc25000-lung", 6, 3), manifest_subset("oscc", 6, 3)
    out = tmp_path / "probe"
    args = ["plip", "probe", "--model", str(tiny_plip_dir), "--data", str(lung), "--data", str(oral)]
    assert main([*args, "--shots", "4", "--features", features, "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    names = [lung.parent.name, oral.parent.name]  # a dataset is named by its manifest's folder
    assert sorted(summary) == sorted(names)
    for name, classes in zip(
        names, (["lung_aca", "lung_n", "lung_scc"], ["oral_n", "oral_scc"]), strict=True
    ):
        report = json.loads((out / name / "report.json").read_text())
        assert report["labels"] == classes and report["features"] == features
        assert report["n"] == 3 * len(classes) and report["fit_images"] == 4 * len(classes)
        predictions = (out / name / "predictions.jsonl").read_text().splitlines()
        assert len(predictions) == report["n"]  # every scored image has its row
        low, high = report["accuracy_ci"]
        assert 0 <= low <= report["accuracy"] <= high <= 1
        assert (out / name / "confusion_matrix.png").stat().st_size > 0
    table = (out / "summary.md").read_text()
    assert all(f"| {name} | " in table for name in names)


def test_probe_cli_refuses_an_image_folder(tiny_plip_dir, shared_data, tmp_path, capsys):
    folder = shared_data / "lc25000-lung" / "images"
    args = ["plip", "probe", "--model", str(tiny_plip_dir), "--data", str(folder), "--out", str(tmp_path)]
    code = main(args)
    assert code == 1 and "image folder has no splits" in capsys.readouterr().err


def test_a_probe_fitted_on_one_dataset_scores_another_lab_s_image_folder(
    tiny_plip_dir, manifest_subset, lung_tiles, tmp_path
):
    """`--score-data`: fitted on a manifest's train split, scored on an image folder root/<class>/<image>
    (another lab's images, no splits), every image of it."""
    import shutil

    folder = tmp_path / "other-lab"
    for tile in lung_tiles:  # one real tile of each lung class, laid out as many public datasets ship
        (folder / tile.parent.name).mkdir(parents=True)
        shutil.copy(tile, folder / tile.parent.name / tile.name)
    fit, out = manifest_subset("lc25000-lung", 6, 0), tmp_path / "probe"
    args = ["plip", "probe", "--model", str(tiny_plip_dir), "--data", str(fit), "--out", str(out)]
    assert main([*args, "--score-data", str(folder)]) == 0
    report = json.loads((out / "other-lab" / "report.json").read_text())
    assert report["n"] == 3 and report["split"] is None and report["scored_data"] == str(folder)
    assert report["data"] == str(fit) and report["fit_images"] == 18


def test_score_data_takes_one_dataset_to_fit_on(tiny_plip_dir, manifest_subset, tmp_path, capsys):
    lung, oral = manifest_subset("lc25000-lung", 2, 1), manifest_subset("oscc", 2, 1)
    args = ["plip", "probe", "--model", str(tiny_plip_dir), "--data", str(lung), "--data", str(oral)]
    assert main([*args, "--score-data", str(oral), "--out", str(tmp_path)]) == 1
    assert "give one --data to fit on, not 2" in capsys.readouterr().err
