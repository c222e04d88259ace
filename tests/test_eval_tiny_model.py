"""The evaluation path on the real tiny assistant, and the `pallava eval` command end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from pallava import load_preset
from pallava.cli import main
from pallava.eval.runner import run_vqa
from pallava.eval.tasks import load_vqa_items
from pallava.inference import PaLlava


@pytest.fixture(scope="module")
def assistant() -> PaLlava:
    """The tiny preset with its weights scaled up: a random model at init scale gives the same
    answer to every input, which would make a batched-vs-single comparison vacuous."""
    model, processor = load_preset("tiny", seed=0)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.mul_(4.0)
    return PaLlava(model, processor)


@pytest.fixture(scope="module")
def model_dir(assistant: PaLlava, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tiny-model")
    assistant.save_pretrained(directory)
    return directory


def test_batched_evaluation_equals_one_by_one(assistant: PaLlava, shared_data: Path, tmp_path: Path) -> None:
    items = load_vqa_items(shared_data / "lc25000-lung" / "manifest.csv", split="dev")[::9][:4]
    # a 500x300 image gets a different tile grid, so batches mix padded prompts and padded tiles
    odd = load_vqa_items(shared_data / "lc25000-lung" / "manifest.csv", split="dev")[0]
    odd.id, odd.image = "stardist", str(shared_data / "samples" / "pathology" / "stardist_histo.jpg")
    items = [items[0], odd, *items[1:]]
    batched = run_vqa(
        assistant, items, tmp_path / "batched.jsonl", batch_size=3, max_new_tokens=5, progress=False
    )
    single = run_vqa(
        assistant, items, tmp_path / "single.jsonl", batch_size=1, max_new_tokens=5, progress=False
    )
    assert [r["prediction"] for r in batched] == [r["prediction"] for r in single]
    assert len({r["prediction"] for r in batched}) > 1  # the answers depend on the input
    assert {r["tiles"] for r in batched} == {
        1,
        assistant.tile_grid(odd.image)[0] * assistant.tile_grid(odd.image)[1],
    }
    assert max(r["tiles"] for r in batched) > 1


@pytest.mark.slow
def test_eval_commands_end_to_end(
    model_dir: Path, shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    manifest = shared_data / "lc25000-lung" / "manifest.csv"
    out = tmp_path / "vqa"
    args = [
        "eval",
        "vqa",
        "--model",
        str(model_dir),
        "--data",
        str(manifest),
        "--split",
        "dev",
        "--limit",
        "8",  # a seeded sample of the generated questions that holds closed and choice ones
        "--out",
        str(out),
        "--max-new-tokens",
        "3",
        "--n-resamples",
        "50",
        "--no-progress",
        "--option-orders",
        "2",
    ]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    predictions = (out / "predictions.jsonl").read_text().splitlines()
    assert report["n"] == 8 and len(predictions) == 8 + report.get("choice", {}).get("n", 0)
    assert all(0.0 <= report[k]["accuracy"] <= 1.0 for k in ("closed", "overall"))
    assert (out / "report.md").is_file() and (out / "accuracy_by_type.png").is_file()
    # resumed with nothing left to answer: the model is never loaded (its path may be gone)
    rerun = [*args[:3], str(tmp_path / "gone"), *args[4:], "--scorer", "paper"]
    assert main(rerun) == 0
    assert (out / "predictions.jsonl").read_text().splitlines() == predictions
    assert json.loads((out / "report.json").read_text())["scorer"] == "paper"
    capsys.readouterr()

    assert (
        main(
            [
                "eval",
                "score",
                "--predictions",
                str(out / "predictions.jsonl"),
                "--scorer",
                "llava-med",
                "--n-resamples",
                "50",
            ]
        )
        == 0
    )
    scored = json.loads(capsys.readouterr().out)
    assert scored["scorer"] == "llava-med" and scored["legacy"] is True and scored["n"] == 8

    zero = tmp_path / "zeroshot"
    assert (
        main(
            [
                "eval",
                "zeroshot",
                "--model",
                str(model_dir),
                "--data",
                str(manifest),
                "--split",
                "dev",
                "--limit",
                "3",
                "--out",
                str(zero),
                "--max-new-tokens",
                "3",
                "--n-resamples",
                "50",
                "--no-progress",
            ]
        )
        == 0
    )
    zreport = json.loads((zero / "report.json").read_text())
    assert zreport["n"] == 3 and sum(map(sum, zreport["confusion"]["matrix"])) == 3
    assert (zero / "confusion.png").is_file()
    capsys.readouterr()
    assert (
        main(["eval", "score", "--predictions", str(zero / "predictions.jsonl"), "--n-resamples", "50"]) == 0
    )
    rescored = json.loads(capsys.readouterr().out)
    assert rescored["task"] == "zeroshot" and rescored["accuracy"] == zreport["accuracy"]


def test_eval_asks_in_the_model_folders_prompt_style(
    assistant: PaLlava, shared_data: Path, tmp_path: Path
) -> None:
    model_dir = tmp_path / "converted-like"
    assistant.processor.prompt_style = "paper"  # as `pallava convert official` saves a release
    try:
        assistant.save_pretrained(model_dir)
    finally:
        assistant.processor.prompt_style = "pallava"
    manifest = shared_data / "lc25000-lung" / "manifest.csv"
    base = [
        "eval",
        "vqa",
        "--model",
        str(model_dir),
        "--data",
        str(manifest),
        "--split",
        "dev",
        "--limit",
        "2",
        "--max-new-tokens",
        "2",
        "--n-resamples",
        "20",
        "--no-progress",
    ]
    assert main([*base, "--out", str(tmp_path / "default")]) == 0
    assert main([*base, "--out", str(tmp_path / "ours"), "--prompt-style", "pallava"]) == 0
    for out, style in (("default", "paper"), ("ours", "pallava")):
        records = [
            json.loads(line) for line in (tmp_path / out / "predictions.jsonl").read_text().splitlines()
        ]
        assert {r["prompt_style"] for r in records} == {style}
        assert json.loads((tmp_path / out / "report.json").read_text())["prompt_style"] == style


def test_eval_command_errors_name_the_problem(
    shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    code = main(
        [
            "eval",
            "vqa",
            "--model",
            str(tmp_path),
            "--data",
            str(shared_data / "pathvqa-text" / "pvqa_test.json"),
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert code == 1 and "no images" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "1", "question": "q", "prediction": "p", "answer_type": "open"}\n')
    assert main(["eval", "score", "--predictions", str(bad)]) == 1
    assert "missing field(s) ['reference']" in capsys.readouterr().err


def test_answer_log_likelihoods_equal_a_forward_pass_per_answer(assistant: PaLlava, lung_tiles) -> None:
    """Each answer's score is the summed log-probability of its tokens and the end of turn, as one
    full forward pass over (image, question, answer) gives it; the image is tiled and encoded once for all,
    a larger image (several tiles) too."""
    answers = ["lung adenocarcinoma", "benign lung tissue", "no"]
    question = "Which of the following best describes this image?"
    tiles = [Image.open(path).convert("RGB") for path in lung_tiles[:2]]
    larger = Image.new("RGB", (448, 448))
    for index, offset in enumerate([(0, 0), (224, 0), (0, 224), (224, 224)]):
        larger.paste(tiles[index % 2], offset)
    processor, model = assistant.processor, assistant.model
    assert int(processor.image_processor([larger])["tile_mask"].sum()) > 1
    for image in (lung_tiles[0], larger):
        scores = assistant.answer_log_likelihoods(image, question, answers)
        for answer, score in zip(answers, scores, strict=True):
            turns = [*processor.question(question), {"role": "assistant", "content": answer}]
            batch = processor(text=[turns], images=[[image]])
            labels = batch.pop("labels")
            with torch.no_grad():
                logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
            logprobs = torch.log_softmax(logits[0, :-1].float(), dim=-1)
            targets = labels[0, 1:]
            kept = targets != -100
            assert int(kept.sum()) == len(processor.tokenizer(answer, add_special_tokens=False).input_ids) + 1
            expected = logprobs[kept].gather(-1, targets[kept].unsqueeze(-1)).sum()
            assert score == pytest.approx(float(expected), abs=1e-4) and score < 0
    scores = assistant.answer_log_likelihoods(lung_tiles[0], question, answers)
    with pytest.raises(ValueError, match="over the limit"):
        assistant.answer_log_likelihoods(lung_tiles[0], question, ["carcinoma " * processor.max_length])
    # the order of the candidates does not change any score; a question without an image is scored too
    assert assistant.answer_log_likelihoods(lung_tiles[0], question, answers[::-1]) == pytest.approx(
        scores[::-1]
    )
    assert len(assistant.answer_log_likelihoods(None, "Is the sky blue?", ["yes", "no"])) == 2
    with pytest.raises(ValueError, match="at least one candidate"):
        assistant.answer_log_likelihoods(lung_tiles[0], question, [])


def test_zeroshot_by_likelihood_always_names_a_class(
    model_dir: Path, shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    manifest = shared_data / "lc25000-lung" / "manifest.csv"
    out = tmp_path / "zs"
    args = ["eval", "zeroshot", "--model", str(model_dir), "--data", str(manifest), "--split", "dev"]
    args += ["--limit", "6", "--out", str(out), "--class-answers", "likelihood", "--n-resamples", "50"]
    assert main([*args, "--no-progress"]) == 0
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    names = ["lung adenocarcinoma", "benign lung tissue", "lung squamous cell carcinoma"]
    assert len(records) == 6
    for record in records:
        assert record["predicted_label"] in ("lung_aca", "lung_n", "lung_scc")  # never unmapped
        assert sorted(record["log_likelihoods"]) == sorted(names)
        assert record["prediction"] == max(record["log_likelihoods"], key=record["log_likelihoods"].get)
    report = json.loads((out / "report.json").read_text())
    assert report["n_unmapped"] == 0 and "likeliest" in report["generation"]["decoding"]
    # resuming into the same folder with the other way of answering would mix the two: refused
    capsys.readouterr()
    other = [*args[: args.index("--class-answers")], "--class-answers", "generated", "--no-progress"]
    assert main(other) == 1
    assert "taken as likelihood; rerun with that --class-answers" in capsys.readouterr().err
