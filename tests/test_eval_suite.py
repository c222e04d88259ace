"""`pallava eval suite`: typed suite files, one summary row per benchmark, resumable runs, and images
larger than 224 px (real tiles stitched together, a region of the real whole-slide image) through the
normal tiling path of the tiny assistant."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from PIL import Image

from pallava import load_preset
from pallava.cli import main
from pallava.eval.suite import run_suite
from pallava.eval.suite_config import load_suite
from pallava.inference import PaLlava
from pallava.models.plip import PlipZeroShot, build_plip

PROJECT = Path(__file__).resolve().parents[1]
COLUMNS = ("plip_zeroshot", "plip_matching", "closed", "open", "choice", "classification")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init tiny assistant saved as a model folder."""
    model, processor = load_preset("tiny", seed=0)
    directory = tmp_path_factory.mktemp("assistant")
    PaLlava(model, processor).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def plip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init tiny PLIP (one text layer) saved as a model folder."""
    model, tokenizer = build_plip("tiny", text_init="scratch", text_layers=1, seed=0)
    directory = tmp_path_factory.mktemp("plip")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def large_images(lung: Path, svs: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """`stitched`: 2 x 2 real lung adenocarcinoma tiles as one 448 px image; `slide`: a 600 x 450 region of
    the shared whole-slide image read through the slide reader."""
    from pallava.slides.reader import open_slide

    folder = tmp_path_factory.mktemp("large")
    tiles = sorted((lung / "images" / "lung_aca").iterdir())[:4]
    stitched = Image.new("RGB", (448, 448))
    for index, tile in enumerate(tiles):
        with Image.open(tile) as image:
            stitched.paste(image.convert("RGB").resize((224, 224)), ((index % 2) * 224, (index // 2) * 224))
    stitched.save(folder / "stitched.png")
    with open_slide(svs) as slide:
        slide.read_region_scaled(600, 900, 1200, 900, (600, 450)).save(folder / "slide.png")
    return {"stitched": folder / "stitched.png", "slide": folder / "slide.png"}


def test_images_larger_than_a_tile_are_tiled_and_answered(
    model_dir: Path, large_images: dict[str, Path]
) -> None:
    assistant = PaLlava.from_pretrained(model_dir)
    processor = assistant.processor.image_processor
    stitched = processor.tile(large_images["stitched"])
    assert stitched.grid == (2, 2) and stitched.pixel_values.shape == (5, 3, 224, 224)
    slide = processor.tile(large_images["slide"])
    assert slide.original_size == (600, 450) and slide.num_tiles > 1
    assert slide.pixel_values.shape == (1 + slide.num_tiles, 3, 224, 224)
    answers = assistant.ask_batch(
        [large_images["stitched"], large_images["slide"]], ["What tissue is shown?"] * 2, max_new_tokens=4
    )
    assert all(isinstance(answer, str) and answer.strip() for answer in answers)


@pytest.fixture()
def suite_file(tmp_path: Path, lung: Path, large_images: dict[str, Path]) -> Path:
    """Two small benchmarks, with paths relative to the suite file's folder: a labelled manifest (two real
    dev tiles and the stitched 448 px image) and a VQA JSONL on the two large images."""
    data = tmp_path / "suite" / "data"
    images = data / "images"
    images.mkdir(parents=True)
    with (lung / "manifest.csv").open(newline="") as handle:
        dev = [row for row in csv.DictReader(handle) if row["split"] == "dev"]
    rows = [
        {"path": str((lung / dev[i]["path"]).resolve()), "label": dev[i]["label"], "split": "dev"}
        for i in (0, 60)
    ]
    rows.append({"path": str(large_images["stitched"]), "label": "lung_aca", "split": "dev"})
    with (data / "lung.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "label", "split"])
        writer.writeheader()
        writer.writerows(rows)
    for name, path in large_images.items():
        (images / f"{name}.png").write_bytes(path.read_bytes())
    questions = [
        {
            "id": "s-closed",
            "image": "stitched.png",
            "question": "Is this adenocarcinoma?",
            "answer": "yes",
            "answer_type": "closed",
        },
        {
            "id": "s-open",
            "image": "stitched.png",
            "question": "What is the diagnosis?",
            "answer": "lung adenocarcinoma",
            "answer_type": "open",
        },
        {
            "id": "w-choice",
            "image": "slide.png",
            "question": "Which stain is this?",
            "answer": "A",
            "answer_type": "choice",
            "options": ["H&E", "IHC"],
        },
        {
            "id": "w-closed",
            "image": "slide.png",
            "question": "Is this tissue?",
            "answer": "yes",
            "answer_type": "closed",
        },
    ]
    (data / "large.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    suite = tmp_path / "suite" / "suite.yaml"
    suite.write_text(
        "settings: {max_new_tokens: 4, class_max_new_tokens: 4, n_resamples: 50, batch_size: 4}\n"
        "benchmarks:\n"
        "  - {name: lung, manifest: data/lung.csv, split: dev, label_map: lc25000-lung}\n"
        "  - {name: large, vqa: data/large.jsonl, image_root: data/images}\n"
    )
    return suite


def _no_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("a finished benchmark loaded a model")

    monkeypatch.setattr(PaLlava, "from_pretrained", refuse)
    monkeypatch.setattr(PlipZeroShot, "from_pretrained", refuse)


def test_suite_writes_one_summary_row_per_dataset_and_skips_finished_benchmarks(
    suite_file: Path,
    model_dir: Path,
    plip_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # relative paths in the suite resolve against its folder, not here
    out = tmp_path / "out"
    args = [
        "eval",
        "suite",
        "--model",
        str(model_dir),
        "--plip",
        str(plip_dir),
        "--suite",
        str(suite_file),
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    lung, large = summary["benchmarks"]
    assert [lung["name"], large["name"]] == ["lung", "large"] and lung["n"] == 3 and large["n"] == 4
    for key in COLUMNS:  # a labelled manifest fills every column, each with its 95% interval
        value = lung[key]["macro_f1" if key == "classification" else "accuracy"]
        low, high = lung[key]["macro_f1_ci" if key == "classification" else "accuracy_ci"]
        assert 0.0 <= low <= value <= high <= 1.0
    assert lung["plip_zeroshot"]["n"] == lung["plip_matching"]["n"] == lung["classification"]["n"] == 3
    # the manifest's questions are the ones the data builders generate for the three images
    assert lung["n_questions"] == sum(lung[k]["n"] for k in ("closed", "open", "choice")) >= 3 * 4
    assert {k: large[k]["n"] for k in ("closed", "open", "choice")} == {"closed": 2, "open": 1, "choice": 1}
    assert not {"plip_zeroshot", "plip_matching", "classification"} & set(large)

    table = [line for line in (out / "summary.md").read_text().splitlines() if line.startswith("| ")]
    assert table[0].split(" | ")[3:] == [
        "PLIP zero-shot acc. %",
        "PLIP ITM zero-shot acc. %",
        "closed acc. %",
        "open acc. %",
        "MC acc. %",
        "class macro F1 % |",
    ]
    assert [line.split(" | ")[0] for line in table[1:]] == ["| lung", "| large"]
    lung_cells = table[1].split(" | ")[3:]
    assert len(lung_cells) == 6 and all("[" in cell for cell in lung_cells)
    assert table[2].split(" | ")[3] == "-" and table[2].rstrip(" |").endswith("-")
    assert (out / "summary.png").read_bytes()[:4] == b"\x89PNG"
    for report in ("lung/plip-zeroshot", "lung/plip-matching", "lung/vqa", "lung/zeroshot", "large/vqa"):
        assert (out / report / "report.md").is_file() and (out / report / "report.json").is_file()

    # larger-than-224 images went through tiling and got answers
    large_predictions = [json.loads(line) for line in (out / "large" / "vqa" / "predictions.jsonl").open()]
    assert {tuple(p["image_size"]) for p in large_predictions} == {(448, 448), (600, 450)}
    assert all(p["tiles"] > 1 and p["prediction"].strip() for p in large_predictions)
    lung_predictions = [json.loads(line) for line in (out / "lung" / "vqa" / "predictions.jsonl").open()]
    assert len(lung_predictions) == lung["n_questions"]
    assert {p["tiles"] for p in lung_predictions} == {1, 4}

    # run again: every benchmark is skipped and no model is loaded; the summary is the same
    before = {p: p.read_bytes() for p in out.rglob("predictions.jsonl")}
    capsys.readouterr()
    with monkeypatch.context() as patch:
        _no_loading(patch)
        assert main(args) == 0
    assert capsys.readouterr().out.count("already complete, skipped") == 2
    assert json.loads((out / "summary.json").read_text())["benchmarks"] == summary["benchmarks"]
    assert {p: p.read_bytes() for p in out.rglob("predictions.jsonl")} == before

    # a benchmark killed after its predictions (no marker) resumes without generating again
    (out / ".suite" / "large.json").unlink()
    with monkeypatch.context() as patch:
        _no_loading(patch)
        again = run_suite(model_dir, suite_file, out, plip_dir=plip_dir, progress=False)
    assert again["benchmarks"][1]["closed"] == large["closed"] and (out / ".suite" / "large.json").is_file()

    # another headline scorer re-scores the saved answers: the assistant is not loaded again
    suite_file.write_text(suite_file.read_text().replace("n_resamples: 50", "n_resamples: 50, scorer: paper"))
    with monkeypatch.context() as patch:
        patch.setattr(PaLlava, "from_pretrained", lambda *a, **k: pytest.fail("the assistant was loaded"))
        rescored = run_suite(model_dir, suite_file, out, plip_dir=plip_dir, progress=False)
    assert rescored["scorer"] == "paper"
    assert json.loads((out / "large" / "vqa" / "report.json").read_text())["scorer"] == "paper"
    assert {p: p.read_bytes() for p in out.rglob("predictions.jsonl") if "plip" not in str(p)} == {
        p: b for p, b in before.items() if "plip" not in str(p)
    }

    # the same folder with another sample size is refused rather than mixed
    (out / ".suite" / "lung.json").unlink()
    assert main([*args, "--limit", "2"]) == 1
    assert "holds results of another run of benchmark 'lung' (changed: limit)" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("benchmark: []\n", "unknown key(s) ['benchmark']; expected some of ['benchmarks', 'settings']"),
        ("benchmarks: []\n", "'benchmarks' must be a non-empty list"),
        (
            "benchmarks:\n  - {name: lung, manifest: lung.csv, labelmap: oscc}\n",
            "benchmarks[0] (lung): unknown key(s) ['labelmap']",
        ),
        (
            "benchmarks:\n  - {name: lung, manifest: lung.csv, format: jsonl}\n",
            "benchmarks[0] (lung): unknown key(s) ['format']",
        ),
        (
            "benchmarks:\n  - {name: lung, manifest: lung.csv, vqa: lung.csv}\n",
            "benchmarks[0] (lung): give exactly one of manifest, vqa, zeroshot",
        ),
        ("benchmarks:\n  - {manifest: lung.csv}\n", "benchmarks[0].name: expected non-empty text"),
        (
            "benchmarks:\n  - {name: a/b, manifest: lung.csv}\n",
            "benchmarks[0].name: 'a/b' must be a folder name",
        ),
        (
            "benchmarks:\n  - {name: lung, manifest: gone.csv}\n",
            "benchmarks[0] (lung).manifest: not found: {root}/gone.csv (relative paths resolve against the "
            "suite "
            "file's folder {root})",
        ),
        (
            "benchmarks:\n  - {name: lung, manifest: lung.csv, limit: 0}\n",
            "benchmarks[0] (lung).limit: expected a whole number of at least 1, got 0",
        ),
        (
            "benchmarks:\n  - {name: lung, manifest: lung.csv, label_map: lungs}\n",
            "benchmarks[0] (lung).label_map: 'lungs' is neither a built-in label map",
        ),
        (
            "benchmarks:\n  - {name: lung, vqa: lung.csv, format: csv}\n",
            "benchmarks[0] (lung).format: expected one of",
        ),
        (
            "benchmarks:\n  - {name: a, manifest: lung.csv}\n  - {name: a, zeroshot: lung.csv}\n",
            "benchmark names must be unique (they name the report folders); repeated: ['a']",
        ),
        (
            "settings: {scorer: exact}\nbenchmarks:\n  - {name: a, manifest: lung.csv}\n",
            "settings.scorer: expected one of ['llava-med', 'paper', 'strict'], got 'exact'",
        ),
        (
            "settings: {class_answers: best}\nbenchmarks:\n  - {name: a, manifest: lung.csv}\n",
            "settings.class_answers: expected one of ['generated', 'likelihood'], got 'best'",
        ),
        (
            "settings: {batch_size: 2, beams: 4}\nbenchmarks:\n  - {name: a, manifest: lung.csv}\n",
            "settings: unknown key(s) ['beams']",
        ),
        ("benchmarks: [name: a\n", "not valid YAML"),
    ],
)
def test_a_wrong_suite_file_gets_an_error_naming_the_field(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "lung.csv").write_text("path,label\n")
    suite = tmp_path / "suite.yaml"
    suite.write_text(text)
    with pytest.raises(ValueError) as error:
        load_suite(suite)
    assert str(error.value).startswith(str(suite)) and message.format(root=tmp_path.resolve()) in str(
        error.value
    )


def test_the_cli_reports_a_wrong_suite_before_loading_any_model(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    suite = tmp_path / "suite.yaml"
    suite.write_text("benchmarks:\n  - {name: lung, manifest: lung.csv, splt: dev}\n")
    (tmp_path / "lung.csv").write_text("path,label\n")
    assert (
        main(
            [
                "eval",
                "suite",
                "--model",
                str(tmp_path / "none"),
                "--suite",
                str(suite),
                "--out",
                str(tmp_path / "out"),
            ]
        )
        == 1
    )
    assert "pallava eval: error: " in (err := capsys.readouterr().err) and "unknown key(s) ['splt']" in err
    assert not (tmp_path / "out").exists()


def test_the_shipped_dev_suite_names_the_three_shared_dev_splits(
    shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # resolution does not depend on the working directory
    suite = load_suite(PROJECT / "configs" / "suite-dev.yaml")
    assert [(b.name, b.kind, b.split, b.label_map) for b in suite.benchmarks] == [
        ("lung", "manifest", "dev", "lc25000-lung"),
        ("colon", "manifest", "dev", "lc25000-colon"),
        ("oral", "manifest", "dev", "oscc"),
    ]
    assert [b.data for b in suite.benchmarks] == [
        (shared_data / name / "manifest.csv").resolve() for name in ("lc25000-lung", "lc25000-colon", "oscc")
    ]


def test_every_image_is_checked_before_a_model_loads_and_max_pixels_raises_the_limit(
    tmp_path: Path,
    lung: Path,
    model_dir: Path,
    plip_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    """A dataset with an image over the pixel limit fails at once, naming it, with no model loaded and no
    answer written; `--max-pixels` lets the same suite run, PLIP included."""
    with (lung / "manifest.csv").open(newline="") as handle:
        dev = [row for row in csv.DictReader(handle) if row["split"] == "dev"][:2]
    large = tmp_path / "large.png"
    with Image.open(lung / dev[0]["path"]) as tile:
        tile.convert("RGB").resize((300, 300)).save(large)
    rows = [f"{(lung / row['path']).resolve()},{row['label']}" for row in dev] + [f"{large},lung_aca"]
    (tmp_path / "data.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    suite = tmp_path / "suite.yaml"
    suite.write_text(
        "settings: {max_new_tokens: 2, class_max_new_tokens: 2, n_resamples: 20}\n"
        "benchmarks:\n  - {name: lung, manifest: data.csv, label_map: lc25000-lung}\n"
    )
    command = ["eval", "suite", "--model", str(model_dir), "--plip", str(plip_dir), "--suite", str(suite)]
    command += ["--out", str(tmp_path / "out"), "--no-progress"]
    with monkeypatch.context() as patched:
        _no_loading(patched)
        assert main([*command, "--max-pixels", "60000"]) == 1
    error = capsys.readouterr().err
    assert (
        f"1 of 3 image(s) cannot be read: {large}: 300x300 = 90,000 pixels, over the limit of 60,000" in error
    )
    assert not list((tmp_path / "out").rglob("predictions.jsonl"))
    assert main([*command, "--max-pixels", "0"]) == 1
    assert "--max-pixels must be an integer from 1" in capsys.readouterr().err
    assert main([*command, "--max-pixels", "90000"]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["benchmarks"][0]["n"] == 3 and summary["benchmarks"][0]["plip_zeroshot"]["n"] == 3


def test_a_pixel_limit_override_reaches_the_loaded_assistant(model_dir: Path) -> None:
    from pallava.eval.suite import LazyAssistant

    assert LazyAssistant(model_dir).max_pixels == 16_777_216  # the folder's, read without the weights
    lazy = LazyAssistant(model_dir, max_pixels=5_000)
    assert lazy.max_pixels == 5_000 and lazy.assistant is None
    assert lazy._loaded().processor.image_processor.max_pixels == 5_000
    with pytest.raises(ValueError, match="over the limit of 5,000"):
        lazy.tile_grid(Image.new("RGB", (100, 100)))
    with pytest.raises(ValueError, match="max_pixels must be null \\(no limit\\) or an integer"):
        lazy.assistant.max_pixels = -1


def test_a_benchmark_may_be_an_image_folder_of_class_subfolders(
    tmp_path: Path, lung: Path, model_dir: Path, plip_dir: Path
) -> None:
    """Datasets shipped as root/<class>/<image> run without a manifest; the class is the folder's name."""
    with (lung / "manifest.csv").open(newline="") as handle:
        dev = [row for row in csv.DictReader(handle) if row["split"] == "dev"]
    for row in (dev[0], dev[1], dev[-1]):
        folder = tmp_path / "data" / row["label"]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / Path(row["path"]).name).write_bytes((lung / row["path"]).read_bytes())
    suite = tmp_path / "suite.yaml"
    suite.write_text(
        "settings: {max_new_tokens: 2, class_max_new_tokens: 2, n_resamples: 20}\n"
        "benchmarks:\n  - {name: folder, manifest: data, label_map: lc25000-lung}\n"
    )
    row = run_suite(model_dir, suite, tmp_path / "out", plip_dir=plip_dir, progress=False)["benchmarks"][0]
    assert row["n"] == 3 and row["plip_zeroshot"]["n"] == 3 and row["classification"]["n"] == 3
    labels = {
        json.loads(line)["label"] for line in (tmp_path / "out/folder/plip-zeroshot/predictions.jsonl").open()
    }
    assert labels == {dev[0]["label"], dev[-1]["label"]}
