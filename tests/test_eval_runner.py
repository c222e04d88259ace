"""Runner orchestration (resume, batching order, option orders, zero-shot mapping) and reports.

A stand-in assistant with the `PaLlava` interface is used here ONLY to test orchestration;
model behaviour is tested on the real tiny model in test_eval_tiny_model.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pallava.data.labels import LabelMap
from pallava.data.records import LabelledImage, VQAItem
from pallava.eval.metrics import precision_recall_f1
from pallava.eval.predictions import PredictionWriter, read_predictions
from pallava.eval.report import vqa_report, write_report, zeroshot_report
from pallava.eval.runner import UNMAPPED, run_vqa, run_zeroshot, with_option_orders, zeroshot_question
from pallava.eval.tasks import detect_format, load_vqa_items, prompt_of


class ScriptedAssistant:
    """Answers from a function of (image, question) and records every batch it is given."""

    def __init__(self, answer=lambda image, question: "yes") -> None:
        self.answer = answer
        self.calls: list[list[str]] = []

    def ask_batch(self, images, questions, batch_size=8, **options):
        assert len(images) <= batch_size and options["max_new_tokens"] > 0
        self.calls.append(list(questions))
        return [self.answer(image, question) for image, question in zip(images, questions, strict=True)]

    def tile_grid(self, image):
        return (2, 3) if "stardist" in str(image) else (1, 1)


@pytest.fixture(scope="module")
def items(shared_data: Path) -> list[VQAItem]:
    return load_vqa_items(shared_data / "lc25000-lung" / "manifest.csv", split="dev")[:10]


def test_manifest_questions_come_from_the_data_builders(items: list[VQAItem], shared_data: Path) -> None:
    assert detect_format(shared_data / "lc25000-lung" / "manifest.csv") == "manifest"
    assert detect_format(shared_data / "pathvqa-text" / "pvqa_test.json") == "pathvqa-text"
    kinds = [item.answer_type for item in items]
    assert kinds[:4] == ["closed", "closed", "open", "choice"]
    assert prompt_of(items[0]).endswith("Answer yes or no.")
    assert "Options:\nA. " in prompt_of(items[3])


def test_paper_prompt_style_asks_the_raw_question_and_pmc_vqa_choices(
    items: list[VQAItem], tmp_path: Path
) -> None:
    closed, open_, choice = items[0], items[2], items[3]
    assert prompt_of(closed, "paper") == closed.question.strip()  # no "Answer yes or no."
    assert prompt_of(open_, "paper") == open_.question.strip()
    lines = prompt_of(choice, "paper").split("\n")
    assert (
        lines[0] == choice.question.strip()
        and "Options:" not in lines
        and len(lines) == 1 + len(choice.options)
    )
    assert lines[1:] == [f"{letter}:{option}" for letter, option in zip("ABCD", choice.options, strict=False)]
    verbatim = VQAItem("v", "x.png", "Is it?", "yes", "closed", meta={"prompt": "<prompt as written>"})
    assert prompt_of(verbatim, "paper") == prompt_of(verbatim) == "<prompt as written>"
    with pytest.raises(ValueError, match="unknown prompt style 'llava'"):
        prompt_of(closed, "llava")

    assistant = ScriptedAssistant()
    records = run_vqa(
        assistant, items[:4], tmp_path / "p.jsonl", batch_size=4, progress=False, prompt_style="paper"
    )
    assert assistant.calls == [[prompt_of(item, "paper") for item in items[:4]]]
    assert {r["prompt_style"] for r in records} == {"paper"}
    assert (
        run_vqa(assistant, items[:5], tmp_path / "p.jsonl", progress=False)[4]["prompt_style"] == "paper"
    )  # resumed
    with pytest.raises(ValueError, match="holds answers to paper-style prompts"):
        run_vqa(assistant, items, tmp_path / "p.jsonl", progress=False, prompt_style="pallava")


def test_vqa_refuses_text_only_pathvqa_with_a_clear_error(shared_data: Path) -> None:
    with pytest.raises(ValueError, match="no images.*pallava eval score"):
        load_vqa_items(shared_data / "pathvqa-text" / "pvqa_test.json")


def test_run_vqa_batches_in_order_and_writes_every_field(items: list[VQAItem], tmp_path: Path) -> None:
    assistant = ScriptedAssistant(lambda image, question: question.split()[0])
    records = run_vqa(assistant, items, tmp_path / "p.jsonl", batch_size=4, progress=False)
    assert [len(call) for call in assistant.calls] == [4, 4, 2]
    assert [q for call in assistant.calls for q in call] == [prompt_of(i) for i in items]
    assert [r["id"] for r in records] == [i.id for i in items]
    assert records == read_predictions(tmp_path / "p.jsonl")
    first = records[0]
    assert set(first) >= {
        "id",
        "question",
        "prediction",
        "reference",
        "answer_type",
        "options",
        "image",
        "tiles",
    }
    assert first["image_size"] == [224, 224] and first["tiles"] == 1


def test_run_vqa_resumes_after_a_torn_line(items: list[VQAItem], tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    run_vqa(ScriptedAssistant(), items[:6], path, batch_size=4, progress=False)
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:5]) + lines[5][:20])  # killed while writing record 6
    assert len(read_predictions(path)) == 5
    assistant = ScriptedAssistant(lambda image, question: "no")
    records = run_vqa(assistant, items, path, batch_size=4, progress=False)
    assert sum(len(call) for call in assistant.calls) == len(items) - 5
    assert [r["id"] for r in records] == [i.id for i in items]
    assert [r["prediction"] for r in records] == ["yes"] * 5 + ["no"] * (len(items) - 5)
    assert len(path.read_text().splitlines()) == len(items)
    again = ScriptedAssistant()
    assert run_vqa(again, items, path, progress=False) == records and again.calls == []


def test_run_vqa_refuses_a_predictions_file_of_another_dataset(items: list[VQAItem], tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    run_vqa(ScriptedAssistant(), items[:3], path, progress=False)
    with pytest.raises(ValueError, match="another run"):
        run_vqa(ScriptedAssistant(), items[3:6], path, progress=False)


def test_unreadable_images_fail_before_any_answer_all_named_in_one_error(
    items: list[VQAItem], tmp_path: Path
) -> None:
    """Missing, undecodable and oversized images are all found from their headers before the first
    question is asked, so a bad image late in a dataset costs no answers."""
    real = Path(items[0].image)
    (tmp_path / "broken.png").write_bytes(real.read_bytes()[:40])  # a cut-off file: no header to read
    Image.new("RGB", (300, 200)).save(tmp_path / "large.png")
    bad = [tmp_path / "gone.png", tmp_path / "broken.png", tmp_path / "large.png"]
    asked = [VQAItem(f"q{i}", str(path), "Is it?", "yes", "closed") for i, path in enumerate(bad)]
    assistant = ScriptedAssistant()
    with pytest.raises(ValueError) as error:
        run_vqa(assistant, [items[0], *asked], tmp_path / "p.jsonl", progress=False, max_pixels=55_000)
    message = str(error.value)
    assert message.startswith("3 of 4 image(s) cannot be read: ")
    assert f"{bad[0]}: file not found" in message and f"{bad[1]}: cannot decode" in message
    assert f"{bad[2]}: 300x200 = 60,000 pixels, over the limit of 55,000" in message
    assert "--max-pixels" in message and "pallava data clean" in message
    assert assistant.calls == [] and not (tmp_path / "p.jsonl").exists()
    # within the limit, the same large image is answered like any other
    records = run_vqa(
        assistant, [items[0], asked[2]], tmp_path / "p.jsonl", progress=False, max_pixels=60_000
    )
    assert [r["image"] for r in records] == [items[0].image, str(bad[2])]
    labelled = [LabelledImage(str(bad[1]), "lung_n")]
    with pytest.raises(ValueError, match="1 of 1 image\\(s\\) cannot be read: .*broken.png: cannot decode"):
        run_zeroshot(
            assistant, labelled, LabelMap.builtin("lc25000-lung"), tmp_path / "z.jsonl", progress=False
        )


def test_option_orders_follow_content_or_position(items: list[VQAItem], tmp_path: Path) -> None:
    choice = [i for i in items if i.answer_type == "choice"]
    expanded = with_option_orders(choice, 3, seed=0)
    assert len(expanded) == 3 * len(choice)
    assert expanded[1].id == f"{choice[0].id}~p1" and expanded[1].meta["base_id"] == choice[0].id

    def by_content(image: str, question: str) -> str:  # always names the true class's option text
        item = next(i for i in expanded if prompt_of(i) == question and i.image == image)
        return item.options["ABC".index(item.answer)]

    records = run_vqa(ScriptedAssistant(by_content), expanded, tmp_path / "c.jsonl", progress=False)
    report = vqa_report(records, n_resamples=50)
    assert report["choice"]["n"] == len(choice) and report["choice"]["accuracy"] == 1.0
    assert report["choice_orders"]["consistency"] == 1.0
    positional = run_vqa(ScriptedAssistant(lambda i, q: "A"), expanded, tmp_path / "a.jsonl", progress=False)
    assert vqa_report(positional, n_resamples=50)["choice_orders"]["consistency"] == 0.0


def test_vqa_report_files_and_required_fields(
    items: list[VQAItem], tmp_path: Path, shared_data: Path
) -> None:
    odd = VQAItem(
        "big", str(shared_data / "samples" / "pathology" / "stardist_histo.jpg"), "Is it?", "no", "closed"
    )
    answers = {"closed": "Yes.", "open": "lung adenocarcinoma", "choice": "B"}
    by_prompt = {prompt_of(i): answers[i.answer_type] for i in items}
    assistant = ScriptedAssistant(lambda image, question: by_prompt.get(question, "no"))
    records = run_vqa(assistant, items + [odd], tmp_path / "predictions.jsonl", progress=False)
    report = vqa_report(records, n_resamples=100)
    for kind in ("closed", "open", "choice"):
        assert report[kind]["n"] == sum(i.answer_type == kind for i in items) + (kind == "closed")
        low, high = report[kind]["accuracy_ci"]
        assert low <= report[kind]["accuracy"] <= high
    assert "recall" in report["open"] and set(report["scorers"]) == {"paper", "llava-med"}
    assert [row["group"] for row in report["by_tiles"]] == [1, 6]
    assert [row["n"] for row in report["by_image_size"]] == [len(items), 1]
    assert np.asarray(report["closed_confusion"]["matrix"]).sum() == report["closed"]["n"]
    paths = write_report(report, tmp_path, "VQA")
    saved = json.loads(paths["json"].read_text())
    assert saved["closed"]["accuracy"] == report["closed"]["accuracy"]
    for name in saved["plots"]:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = paths["markdown"].read_text()
    assert (
        "| strict | closed |" in markdown and "(legacy)" in markdown and "accuracy_by_tiles.png" in markdown
    )


def test_zeroshot_maps_answers_exactly_and_counts_unmapped(shared_data: Path, tmp_path: Path) -> None:
    label_map = LabelMap.builtin("lc25000-lung")
    rows = [
        line.split(",")
        for line in (shared_data / "lc25000-lung" / "manifest.csv").read_text().splitlines()[1:]
    ]
    images = [
        LabelledImage(str(shared_data / "lc25000-lung" / r[0]), r[1], r[2], r[3])
        for r in rows
        if r[3] == "dev"
    ][::8]
    spoken = {
        "lung_aca": "Pulmonary adenocarcinoma.",
        "lung_n": "Benign lung tissue",
        "lung_scc": "I cannot tell",
    }
    assistant = ScriptedAssistant(
        lambda image, question: spoken[next(i.label for i in images if i.path == image)]
    )
    records = run_zeroshot(assistant, images, label_map, tmp_path / "z.jsonl", batch_size=4, progress=False)
    assert assistant.calls[0][0] == zeroshot_question(label_map)
    assert all(name in zeroshot_question(label_map) for name in label_map.names())
    expected = {"lung_aca": "lung_aca", "lung_n": "lung_n", "lung_scc": UNMAPPED}
    assert [r["predicted_label"] for r in records] == [expected[i.label] for i in images]
    report = zeroshot_report(
        [r["reference"] for r in records],
        [r["predicted_label"] for r in records],
        label_map.labels(),
        n_resamples=200,
    )
    scc = sum(i.label == "lung_scc" for i in images)
    assert report["n"] == len(images) and report["n_unmapped"] == scc
    assert report["accuracy"] == pytest.approx(1 - scc / len(images))
    reference = precision_recall_f1(
        [i.label for i in images], [expected[i.label] for i in images], label_map.labels()
    )
    assert report["macro"]["f1"] == pytest.approx(reference["macro"]["f1"])
    low, high = report["macro"]["f1_ci"]
    assert low <= report["macro"]["f1"] <= high
    matrix = np.asarray(report["confusion"]["matrix"])
    assert matrix.sum() == len(images) and matrix[2, 3] == scc
    paths = write_report(report, tmp_path / "report", "zero-shot")
    assert (tmp_path / "report" / "confusion.png").is_file() and "| lung_scc |" in paths[
        "markdown"
    ].read_text()


def test_prediction_writer_repairs_a_missing_final_newline(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text(
        '{"id": "a", "question": "q", "prediction": "p", "reference": "r", "answer_type": "open"}'
    )
    with PredictionWriter(path) as writer:
        assert writer.done == {"a"}
        writer.write({"id": "b", "question": "q", "prediction": "p", "reference": "r", "answer_type": "open"})
    assert [r["id"] for r in read_predictions(path)] == ["a", "b"]
    path.write_text('{"id": "a"}\nnot json\n{"id": "b"}\n')
    with pytest.raises(ValueError, match="p.jsonl:2: not valid JSON"):
        read_predictions(path)


def test_every_input_format_becomes_vqa_items(shared_data: Path, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    tile = (
        shared_data
        / "samples"
        / "crc"
        / sorted(p.name for p in (shared_data / "samples" / "crc").iterdir())[0]
    )
    table = pa.table(
        {
            "image": [{"bytes": tile.read_bytes(), "path": "a.jpg"}] * 2,
            "question": ["Is this adipose tissue?", "What tissue is this?"],
            "answer": ["Yes", "fat"],
        }
    )
    pq.write_table(table, tmp_path / "pathvqa.parquet")
    items = load_vqa_items(tmp_path / "pathvqa.parquet", image_dir=tmp_path / "images")
    assert [(i.answer_type, i.answer) for i in items] == [("closed", "yes"), ("open", "fat")]
    assert Path(items[0].image).read_bytes() == tile.read_bytes()

    csv_text = (
        "Figure_path,Question,Choice A,Choice B,Choice C,Choice D,Answer,split\n"
        f"{tile.name},Which tissue?,A:Fat,B:Bone,C:Skin,D:Lung,B:Bone,test\n"
    )
    (tmp_path / "pmc.csv").write_text(csv_text)
    [choice] = load_vqa_items(tmp_path / "pmc.csv", image_root=tile.parent, split="test")
    assert (choice.answer_type, choice.answer, choice.options) == (
        "choice",
        "B",
        ["Fat", "Bone", "Skin", "Lung"],
    )
    assert choice.image == str(tile)

    conversation = {
        "id": "c1",
        "image": tile.name,
        "conversations": [
            {"from": "human", "value": "<image>\nIs this fat?\nAnswer yes or no."},
            {"from": "gpt", "value": "Yes"},
        ],
    }
    (tmp_path / "conv.jsonl").write_text(
        json.dumps(conversation) + "\n" + json.dumps(choice.to_dict()) + "\n"
    )
    first, second = load_vqa_items(tmp_path / "conv.jsonl", image_root=tile.parent)
    assert (first.answer_type, prompt_of(first)) == ("closed", "Is this fat?\nAnswer yes or no.")
    assert second.options == choice.options and prompt_of(second).startswith("Which tissue?\nOptions:")
    (tmp_path / "dup.jsonl").write_text(json.dumps(conversation) + "\n" + json.dumps(conversation) + "\n")
    with pytest.raises(ValueError, match="1 question id\\(s\\) repeat"):
        load_vqa_items(tmp_path / "dup.jsonl")
