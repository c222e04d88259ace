"""The OpenAI-compatible server against the tiny model, driven by the official `openai` client."""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path

import httpx
import pytest
from openai import OpenAI
from PIL import Image

from pallava.inference import PaLlava
from pallava.serve.app import BackgroundServer, ServerSettings, create_app
from pallava.serve.images import to_data_url

API_KEY = "test-key"
MAX_TOKENS = 6
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def assistant(tiny) -> PaLlava:
    return PaLlava(*tiny)


@pytest.fixture(scope="module")
def samples(shared_data) -> Path:
    return shared_data / "samples"


@pytest.fixture(scope="module")
def server(assistant, samples):
    settings = ServerSettings(
        model_name="pallava-tiny",
        api_key=API_KEY,
        allow_local_dir=samples,
        default_max_tokens=MAX_TOKENS,
        max_tokens_limit=32,
        batch_window_s=0.25,
        max_batch_size=8,
        timeout_s=120,
    )
    with BackgroundServer(create_app(assistant, settings)) as running:
        yield running


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def image_message(question: str, url: str) -> list[dict]:
    return [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": question},
            ],
        }
    ]


def test_models_and_health(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == ["pallava-tiny"]
    assert client.models.retrieve("pallava-tiny").id == "pallava-tiny"
    health = httpx.get(f"{server.url}/health").json()  # no key needed for health
    assert health["status"] == "ok" and health["model"] == "pallava-tiny"


def test_openai_client_answer_equals_the_python_api(client, assistant, lung_tiles):
    question = "What tissue is this?"
    reply = client.chat.completions.create(
        model="pallava-tiny",
        messages=image_message(question, to_data_url(lung_tiles[0])),
        max_tokens=MAX_TOKENS,
    )
    expected = assistant.complete(
        [assistant.processor.question(question)], [[lung_tiles[0]]], max_new_tokens=MAX_TOKENS
    )[0]
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == expected.text
    assert choice.finish_reason == expected.finish_reason
    assert reply.usage.prompt_tokens == expected.prompt_tokens
    assert reply.usage.completion_tokens == expected.completion_tokens <= MAX_TOKENS
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


@pytest.mark.parametrize("question", ["Describe the image.", "hello"])
def test_streaming_yields_the_same_answer_in_pieces(client, lung_tiles, question):
    messages = image_message(question, to_data_url(lung_tiles[1]))
    if question == "hello":  # text only: the tiny model's answer to it starts with a space the answer strips
        messages = [{"role": "user", "content": question}]
    plain = client.chat.completions.create(model="x", messages=messages, max_tokens=MAX_TOKENS)
    chunks = list(
        client.chat.completions.create(
            model="x",
            messages=messages,
            max_tokens=MAX_TOKENS,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert deltas[0].role == "assistant"
    text = "".join(d.content or "" for d in deltas)
    assert text == plain.choices[0].message.content  # the same text, not only once stripped
    assert sum(1 for d in deltas if d.content) >= 2  # really streamed, not one blob
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [plain.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_concurrent_requests_are_batched_and_answer_as_if_alone(client, server, lung_tiles, samples):
    images = [*lung_tiles, samples / "pathology" / "stardist_histo.jpg"]  # different sizes and tile grids
    questions = ["What is shown?", "Is this tissue malignant?", "Name the organ.", "Describe the cells."]
    requests = [image_message(q, to_data_url(p)) for q, p in zip(questions, images, strict=True)]

    def ask(messages) -> str:
        return client.chat.completions.create(model="x", messages=messages).choices[0].message.content

    sequential = [ask(m) for m in requests]
    before = httpx.get(f"{server.url}/health").json()
    concurrent: list[str | None] = [None] * len(requests)
    start = threading.Barrier(len(requests))

    def worker(i: int) -> None:
        start.wait()
        concurrent[i] = ask(requests[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = httpx.get(f"{server.url}/health").json()
    assert concurrent == sequential
    assert after["completed"] - before["completed"] == len(requests)
    assert after["batches"] - before["batches"] < len(requests)  # grouped, not served one at a time
    assert after["largest_batch"] > 1


def test_multi_turn_with_system_prompt_and_an_allowed_local_path(client, assistant, samples):
    relative = "pathology/skimage_ihc.png"
    messages = [
        {"role": "system", "content": "You are a careful pathologist."},
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": relative}},
                {"type": "text", "text": "What stain is used?"},
            ],
        },
        {"role": "assistant", "content": "An immunohistochemical stain."},
        {"role": "user", "content": "Which structures are brown?"},
    ]
    reply = client.chat.completions.create(model="x", messages=messages, max_tokens=MAX_TOKENS)
    conversation = [
        {"role": "system", "content": "You are a careful pathologist."},
        {"role": "user", "content": "<image>\nWhat stain is used?"},
        {"role": "assistant", "content": "An immunohistochemical stain."},
        {"role": "user", "content": "Which structures are brown?"},
    ]
    image = Image.open(samples / relative)
    assert (
        reply.choices[0].message.content
        == assistant.generate([conversation], [[image]], max_new_tokens=MAX_TOKENS)[0]
    )


def test_load_script_reports_latency_throughput_and_errors(server):
    spec = importlib.util.spec_from_file_location("load_server", REPO / "benchmarks" / "load_server.py")
    load_server = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(load_server)
    report = load_server.run_load(server.url, clients=3, requests=2, max_tokens=2, api_key=API_KEY)
    assert report["requests"] == 6 and report["errors"] == 0
    assert 0 < report["latency_p50_s"] <= report["latency_p95_s"]
    assert report["throughput_rps"] > 0


def test_an_image_sent_again_is_answered_from_the_feature_cache(client, server, samples):
    # A chat client sends the image with every turn; the server encodes it once.
    messages = image_message("What stain is used?", "pathology/stardist_histo.jpg")
    first = client.chat.completions.create(model="x", messages=messages, max_tokens=MAX_TOKENS)
    before = httpx.get(f"{server.url}/health").json()
    messages += [{"role": "assistant", "content": first.choices[0].message.content}]
    messages += [{"role": "user", "content": "Is it malignant?"}]
    client.chat.completions.create(model="x", messages=messages, max_tokens=MAX_TOKENS)
    after = httpx.get(f"{server.url}/health").json()
    assert after["image_cache_hits"] == before["image_cache_hits"] + 1
    assert after["image_cache_misses"] == before["image_cache_misses"]
