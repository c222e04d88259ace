"""`pallava chat`, `pallava predict`, and the argument handling of `pallava serve` / `pallava ui`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pallava.cli import main
from pallava.inference import PaLlava

TOKENS = 5


@pytest.fixture(scope="module")
def model_dir(tiny, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("model")
    PaLlava(*tiny).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def assistant(model_dir) -> PaLlava:
    return PaLlava.from_pretrained(model_dir)


def test_chat_one_shot_prints_the_answer(model_dir, assistant, lung_tiles, capsys):
    code = main(
        [
            "chat",
            "--model",
            str(model_dir),
            str(lung_tiles[0]),
            "What",
            "is",
            "shown?",
            "--max-tokens",
            str(TOKENS),
        ]
    )
    assert code == 0
    assert capsys.readouterr().out.strip() == assistant.ask(
        lung_tiles[0], "What is shown?", max_new_tokens=TOKENS
    )


@pytest.mark.slow
def test_interactive_chat_streams_keeps_history_and_resets(model_dir, assistant, lung_tiles):
    script = "What is shown?\nAnd the nuclei?\n\n/help\n/reset\nWhat is shown?\n/quit\nnever asked\n"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pallava.cli",
            "chat",
            "--model",
            str(model_dir),
            str(lung_tiles[0]),
            "--max-tokens",
            str(TOKENS),
        ],
        input=script,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    answers = [part.split("\n")[0].strip() for part in result.stdout.split("assistant> ")[1:]]
    assert len(answers) == 3  # nothing after /quit
    first = assistant.ask(lung_tiles[0], "What is shown?", max_new_tokens=TOKENS)
    follow_up = assistant.generate(
        [
            [
                {"role": "user", "content": "<image>\nWhat is shown?"},
                {"role": "assistant", "content": first},
                {"role": "user", "content": "And the nuclei?"},
            ]
        ],
        [[lung_tiles[0]]],
        max_new_tokens=TOKENS,
    )[0]
    assert answers == [first, follow_up, first]  # the second turn saw the first; /reset forgot it
    assert "(new conversation)" in result.stdout and "/reset starts" in result.stdout


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_predict_is_batched_resumable_and_survives_a_torn_line(
    model_dir, assistant, lung_tiles, shared_data, tmp_path
):
    histo = shared_data / "samples" / "pathology" / "stardist_histo.jpg"
    records = [
        {"id": f"lung-{i}", "image": str(p), "question": "Which tissue?", "label": i}
        for i, p in enumerate(lung_tiles)
    ]
    records += [
        {"id": 7, "image": str(histo), "question": "Describe it."},
        {"id": "text-only", "image": None, "question": "What is a granuloma?"},
    ]
    source, target = tmp_path / "in.jsonl", tmp_path / "out" / "answers.jsonl"
    write_jsonl(source, records)
    args = [
        "predict",
        "--model",
        str(model_dir),
        "--input",
        str(source),
        "--output",
        str(target),
        "--batch-size",
        "2",
        "--max-tokens",
        str(TOKENS),
    ]
    assert main(args) == 0
    full = read_jsonl(target)
    expected = assistant.ask_batch(
        [r["image"] for r in records], [r["question"] for r in records], max_new_tokens=TOKENS
    )
    assert full == [
        {**r, "answer": a} for r, a in zip(records, expected, strict=True)
    ]  # fields kept, order kept

    lines = target.read_text().splitlines(keepends=True)
    target.write_text("".join(lines[:2]) + lines[2][: len(lines[2]) // 2])  # interrupted mid-write
    assert main(args) == 0
    assert read_jsonl(target) == full  # torn line redone, nothing duplicated
    assert main(args) == 0 and read_jsonl(target) == full  # nothing left to do


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (
            ['{"id": 1, "image": null, "question": "a"}', '{"id": 2, "image": null}'],
            "line 2 (id 2): field 'question'",
        ),
        (
            ['{"id": 1, "image": null, "question": "a"}', '{"id": 1, "image": null, "question": "b"}'],
            "duplicate id",
        ),
        (['{"id": "x", "image": "missing.png", "question": "a"}'], "image file not found"),
        (['{"image": null, "question": "a"}'], "line 1: field 'id'"),
        (["not json"], "line 1: not valid JSON"),
    ],
)
def test_predict_names_the_bad_record(model_dir, tmp_path, capsys, lines, message):
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(lines) + "\n")
    code = main(
        ["predict", "--model", str(model_dir), "--input", str(source), "--output", str(tmp_path / "o.jsonl")]
    )
    assert code == 1
    assert message in capsys.readouterr().err


def test_predict_refuses_a_corrupt_output_line(model_dir, tmp_path, capsys):
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(source, [{"id": 1, "image": None, "question": "a"}])
    target.write_text('{"id": 0, "answer": "x"}\ngarbage in the middle\n{"id": 2, "answer": "y"}\n')
    assert main(["predict", "--model", str(model_dir), "--input", str(source), "--output", str(target)]) == 1
    assert "out.jsonl line 2: not a prediction record" in capsys.readouterr().err


def test_serve_and_ui_commands_pass_their_settings(model_dir, tmp_path, monkeypatch, capsys):
    import pallava.serve.app as app
    import pallava.serve.ui as ui

    calls = {}
    monkeypatch.setattr(
        app, "run_server", lambda assistant, settings, host, port: calls.update(serve=(settings, host, port))
    )
    monkeypatch.setattr(
        ui,
        "launch_ui",
        lambda assistant, host, port, examples, max_tokens: calls.update(ui=(examples, max_tokens)),
    )
    monkeypatch.setenv("PALLAVA_API_KEY", "from-env")
    assert (
        main(
            [
                "serve",
                "--model",
                str(model_dir),
                "--port",
                "9123",
                "--allow-local-dir",
                str(tmp_path),
                "--max-images",
                "2",
                "--batch-window-ms",
                "5",
                "--max-tokens",
                "40",
                "--header-timeout",
                "3",
                "--body-timeout",
                "4",
                "--keep-alive",
                "2",
                "--max-queued-pixels",
                "1000",
                "--decode-workers",
                "1",
                "--generation-threads",
                "all",
            ]
        )
        == 0
    )
    settings, host, port = calls["serve"]
    assert (host, port, settings.api_key, settings.allow_local_dir) == (
        "127.0.0.1",
        9123,
        "from-env",
        tmp_path,
    )
    assert (settings.max_images, settings.batch_window_s, settings.default_max_tokens) == (2, 0.005, 40)
    assert settings.model_name == model_dir.name
    assert (settings.header_timeout_s, settings.body_timeout_s, settings.keep_alive_s) == (3, 4, 2)
    assert (settings.max_queued_pixels, settings.decode_workers) == (1000, 1)
    assert settings.generation_threads is None  # all: torch's threads for every step, nothing measured
    assert settings.batching == "continuous"
    assert main(["serve", "--model", str(model_dir), "--batching", "static"]) == 0
    assert calls["serve"][0].batching == "static"
    assert main(["serve", "--model", str(model_dir), "--static-cache"]) == 0
    assert calls["serve"][0].batching == "static"  # a static cache's fixed shapes need static batches
    assert main(["serve", "--model", str(model_dir), "--static-cache", "--batching", "continuous"]) == 1
    assert "--static-cache needs --batching static" in capsys.readouterr().err

    assert main(["serve", "--model", str(model_dir), "--allow-local-dir", str(tmp_path / "nope")]) == 1
    assert "is not a directory" in capsys.readouterr().err
    assert main(["serve", "--model", str(model_dir), "--max-tokens", "0"]) == 1
    assert "default_max_tokens must be at least 1" in capsys.readouterr().err
    assert main(["chat", "--model", str(model_dir), "x.png", "--temperature", "3"]) == 1
    assert "--temperature must be in [0, 2]" in capsys.readouterr().err
    assert main(["chat", "--model", str(model_dir), "x.png", "--temperature", "1e-300"]) == 1
    assert "--temperature must be 0 (greedy) or at least 0.001" in capsys.readouterr().err

    assert main(["ui", "--model", str(model_dir), "--examples", str(tmp_path), "--max-tokens", "9"]) == 0
    assert calls["ui"] == (str(tmp_path), 9)
    assert main(["ui", "--model", str(model_dir), "--examples", str(tmp_path / "nope")]) == 1
    assert "--examples" in capsys.readouterr().err


def test_static_cache_and_compiled_generation_give_the_same_answers(model_dir, lung_tiles, capsys):
    """The GPU latency path (`--static-cache`: a static KV cache, and the language model compiled) on a
    CPU: the same answers as the default dynamic cache; the compiled path is checked with torch's eager
    backend (the same graph capture without generating kernels)."""
    images = [[lung_tiles[0]], [lung_tiles[1]]]
    conversations = [[{"role": "user", "content": "<image>\nWhat is shown?"}]] * 2
    plain = PaLlava.from_pretrained(model_dir).generate(conversations, images, max_new_tokens=8)
    static = PaLlava.from_pretrained(model_dir).speed_up_generation(compile=False)
    assert (
        static.device.type == "cpu"
        and static._generation_options(8, 0.0, 1.0)["cache_implementation"] == "static"
    )
    assert static.generate(conversations, images, max_new_tokens=8) == plain
    compiled = PaLlava.from_pretrained(model_dir).speed_up_generation(compile=True, backend="eager")
    assert hasattr(compiled.model.language_model.forward, "_torchdynamo_orig_callable")
    assert compiled.generate(conversations, images, max_new_tokens=8) == plain
    code = main(
        [
            "chat",
            "--model",
            str(model_dir),
            str(lung_tiles[0]),
            "What is shown?",
            "--max-tokens",
            "8",
            "--static-cache",
        ]
    )
    assert code == 0 and capsys.readouterr().out.strip() == plain[0]
