"""The OpenAI-compatible judge against a real local HTTP endpoint, and SIGKILL-safe resume of the cleaner.

The endpoint is a small threaded server started by the test. It answers chat completions deterministically in
varied styles (markdown, "Answer: yes", reasoning blocks, Chinese, unclear), and has routes that are slow
(timeouts), flaky (500 once per question, for retries), down (always 500) or delayed (for the kill test).
"""

import base64
import hashlib
import io
import json
import multiprocessing
import os
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image, ImageStat

from pallava.data.clean import CleanConfig, JudgeStopped, clean
from pallava.data.clean.llm_judge import OpenAIJudge, parse_yes_no

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
PROMPT = "Caption: {text}\nIs this human pathology? Answer yes or no."


def _answer_text(prompt: str) -> str:
    text = prompt.split("Caption: ", 1)[-1].split("\n", 1)[0]
    if "UNCLEAR" in text:
        return "I cannot tell from a caption alone."
    if "THINK" in text:
        return "<think>no mouse here, so not no</think>\nYes"
    if "CHINESE" in text:
        return "是的"
    if any(word in text for word in ("mouse", "rat ", "dog")):
        return "No."
    return "Answer: **yes**"


def _answer_image(url: str) -> str:
    image = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")
    red, green, blue = ImageStat.Stat(image).mean
    # a stand-in for a VLM: H&E is pink/purple (blue and red above green)
    return (
        "Yes, this is an H&E section." if blue - green > 20 and red - green > 5 else "**No** - a photograph."
    )


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 (http.server API)
        route, _, rest = self.path.partition("/v1/")
        if rest != "chat/completions":
            return self._send(404, {"error": "not found"})
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        content = body["messages"][-1]["content"]
        key = hashlib.sha1(json.dumps(content).encode()).hexdigest()
        server = self.server
        with server.lock:
            server.requests.append(route)
            server.seen[key] = server.seen.get(key, 0) + 1
            first = server.seen[key] == 1
        if route == "/down" or (route == "/flaky" and first):
            return self._send(500, {"error": "overloaded"})
        if route == "/slow":
            time.sleep(1.0)
        if route == "/delay":
            time.sleep(0.04)
        if route == "/garbage":
            return self._send(200, "not json")
        if isinstance(content, list):
            answer = _answer_image(next(p["image_url"]["url"] for p in content if p["type"] == "image_url"))
        else:
            answer = _answer_text(content)
        self._send(200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": answer}}]})

    def _send(self, status, payload):
        data = (payload if isinstance(payload, str) else json.dumps(payload)).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
            pass

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def endpoint():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    server.lock, server.requests, server.seen = threading.Lock(), [], {}
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def images():
    if not (SHARED / "samples").is_dir():
        pytest.skip("shared data not available")
    he = sorted((SHARED / "lc25000-lung" / "images" / "lung_scc").glob("*.jpeg"))[:4]
    return he + [SHARED / "samples" / "pathology" / "stardist_histo.jpg"], sorted(
        (SHARED / "samples" / "non-pathology").iterdir()
    )


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("Yes", True),
        ("no.", False),
        ("**Yes**, it is.", True),
        ("Answer: no", False),
        ("The answer is yes.", True),
        ("<think>yes? no?</think> No", False),
        ("是", True),
        ("不是", False),
        ("否", False),
        ('"yes"', True),
        ("Maybe", None),
        ("", None),
        ("It shows no tumour; yes it is pathology", None),
    ],
)
def test_parse_yes_no(answer, expected):
    assert parse_yes_no(answer) is expected


def test_text_judge_parses_styles_and_caches(endpoint, tmp_path):
    server, url = endpoint
    judge = OpenAIJudge(
        f"{url}/v1", "qwen2-7b", kind="text", cache=tmp_path / "cache.sqlite", concurrency=4, prompt=PROMPT
    )
    texts = [
        "human colon adenocarcinoma",
        "mouse liver",
        "UNCLEAR caption",
        "THINK about this",
        "CHINESE caption",
    ]
    verdicts = judge.judge_texts(texts)
    assert [v.ok for v in verdicts] == [True, False, False, True, True]
    assert (
        verdicts[1].reason == "not human pathology (judge)" and verdicts[2].reason == "unclear judge answer"
    )
    assert not any(v.error for v in verdicts) and judge.requests == 5
    again = OpenAIJudge(f"{url}/v1", "qwen2-7b", kind="text", cache=tmp_path / "cache.sqlite", prompt=PROMPT)
    assert again.judge_texts(texts) == verdicts and again.requests == 0  # served from the content-hash cache
    other_model = OpenAIJudge(
        f"{url}/v1", "glm-4v-9b", kind="text", cache=tmp_path / "cache.sqlite", prompt=PROMPT
    )
    other_model.judge_texts(texts[:1])
    assert other_model.requests == 1  # the cache key includes the model


def test_retries_timeouts_and_errors(endpoint):
    server, url = endpoint
    flaky = OpenAIJudge(f"{url}/flaky/v1", "m", kind="text", retries=2, backoff=0.01, concurrency=2)
    assert [v.ok for v in flaky.judge_texts(["human skin one", "human skin two"])] == [True, True]
    assert flaky.requests == 4  # one 500 each, then success
    slow = OpenAIJudge(f"{url}/slow/v1", "m", kind="text", timeout=0.2, retries=1, backoff=0.01)
    (verdict,) = slow.judge_texts(["human skin"])
    assert verdict.error and "ReadTimeout" in verdict.detail and slow.requests == 2
    down = OpenAIJudge(f"{url}/down/v1", "m", kind="text", retries=1, backoff=0.01)
    (verdict,) = down.judge_texts(["human skin"])
    assert verdict.error and "HTTP 500" in verdict.detail
    garbage = OpenAIJudge(f"{url}/garbage/v1", "m", kind="text", retries=0)
    assert "malformed response" in garbage.judge_texts(["x"])[0].detail
    missing = OpenAIJudge(f"{url}/nothing", "m", kind="text", retries=3)
    assert "HTTP 404" in missing.judge_texts(["x"])[0].detail and missing.requests == 1  # 4xx is not retried


def _corpus(path, images, n_copies=1):
    he, other = images
    records = []
    for copy in range(n_copies):
        for i, image in enumerate([*he, *other]):
            caption = (
                f"copy {copy} image {i}: a section of human tissue, stained with haematoxylin and eosin, "
                "photographed under the microscope at high power on a routine day"
            )
            records.append({"id": f"r{copy}-{i}", "image": str(image), "caption": caption})
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path, records


def test_image_judge_rejects_non_pathology_over_http(endpoint, images, tmp_path):
    server, url = endpoint
    corpus, records = _corpus(tmp_path / "c.jsonl", images)
    config = CleanConfig(
        workers=1,
        image_judge={
            "type": "openai",
            "base_url": f"{url}/v1",
            "model": "glm-4v-9b",
            "cache": str(tmp_path / "cache.sqlite"),
        },
    )
    summary = clean(corpus, tmp_path / "out", config, progress=False)
    rejected = [json.loads(x) for x in (tmp_path / "out" / "rejected.jsonl").read_text().splitlines()]
    assert {Path(r["record"]["image"]).name for r in rejected} == {p.name for p in images[1]}
    assert {r["reason"] for r in rejected} == {"not pathology (judge)"}
    assert summary["kept"] == len(images[0])


def test_judge_errors_lose_nothing(endpoint, images, tmp_path):
    server, url = endpoint
    corpus, records = _corpus(tmp_path / "c.jsonl", images)
    judge = {
        "type": "openai",
        "base_url": f"{url}/down/v1",
        "model": "qwen2-7b",
        "retries": 0,
        "prompt": PROMPT,
    }
    # policy reject: failures are recorded with their reason
    summary = clean(
        corpus,
        tmp_path / "rej",
        CleanConfig(workers=1, text_judge=judge, on_judge_error="reject"),
        progress=False,
    )
    assert summary["by_stage"]["text"] == len(records) and summary["by_reason"][0]["reason"] == "judge error"
    # policy stop: the run stops at the first failure; a re-run against a working endpoint finishes the job
    with pytest.raises(JudgeStopped, match="line 1: record r0-0: judge failed"):
        clean(corpus, tmp_path / "stop", CleanConfig(workers=1, text_judge=judge), progress=False)
    judge["base_url"] = f"{url}/v1"
    summary = clean(corpus, tmp_path / "stop", CleanConfig(workers=1, text_judge=judge), progress=False)
    assert summary["kept"] == len(records) and summary["resumed_from"] == 0


def _run_clean(corpus, out, config):
    clean(corpus, out, config, progress=False)


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_gives_identical_files(endpoint, images, tmp_path):
    server, url = endpoint
    corpus, records = _corpus(tmp_path / "c.jsonl", images, n_copies=4)
    judge = {
        "type": "openai",
        "base_url": f"{url}/delay/v1",
        "model": "qwen2-7b",
        "concurrency": 1,
        "prompt": PROMPT,
        "cache": str(tmp_path / "cache.sqlite"),
    }
    config = CleanConfig(workers=2, chunk_size=2, text_judge=judge, duplicate_mode="image", max_hamming=2)
    killed = tmp_path / "killed"
    process = multiprocessing.get_context("fork").Process(target=_run_clean, args=(corpus, killed, config))
    process.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done = sum(
            len((killed / n).read_bytes().splitlines())
            for n in ("kept.jsonl", "rejected.jsonl")
            if (killed / n).exists()
        )
        if done >= 8:
            break
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.join()
    assert process.exitcode == -signal.SIGKILL
    written = sum(len((killed / n).read_bytes().splitlines()) for n in ("kept.jsonl", "rejected.jsonl"))
    assert 8 <= written < len(records)  # killed mid-run
    summary = clean(corpus, killed, config, progress=False)
    assert summary["resumed_from"] == written
    ids = [
        json.loads(x)["id"]
        for n in ("kept.jsonl", "rejected.jsonl")
        for x in (killed / n).read_text().splitlines()
    ]
    assert sorted(ids) == sorted(r["id"] for r in records)  # every input exactly once
    clean(corpus, tmp_path / "reference", config, progress=False)
    for name in ("kept.jsonl", "rejected.jsonl", "report.md"):
        assert (killed / name).read_bytes() == (tmp_path / "reference" / name).read_bytes()
    assert summary["by_stage"]["duplicate"] == len(records) - len(images[0]) - len(images[1])
