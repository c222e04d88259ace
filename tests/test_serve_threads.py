"""The server's generation steps choose their CPU thread count by measuring (`DecodeThreads`)."""

from __future__ import annotations

import threading

import pytest
import torch
from PIL import Image

from pallava.inference import PaLlava
from pallava.serve.app import ServerSettings
from pallava.serve.engine import BatchingEngine, DecodeThreads, GenerationOptions, Job


class FakeClock:
    """Step times by thread count: each step "takes" the time of the count set for it."""

    def __init__(self, step_s: dict[int, float]):
        self.now, self.step_s, self.threads = 0.0, step_s, None

    def set_threads(self, count: int) -> None:
        self.threads = count

    def __call__(self) -> float:
        return self.now

    def run_step(self, threads: DecodeThreads) -> None:
        self.now += self.step_s[self.threads]
        threads.step()


def generate(threads: DecodeThreads, clock: FakeClock, batch_size: int, tokens: int) -> list[int]:
    """One batch as the engine drives it: prefill, then a step per token; the counts its steps ran with."""
    threads.prefill(batch_size)
    assert clock.threads == threads.threads  # the prompt and the images get every thread
    clock.now += 1.0  # prefill: long, and not counted as a step
    threads.step()  # the first token ends the prefill
    used = []
    for _ in range(tokens):
        used.append(clock.threads)
        clock.run_step(threads)
    threads.done()
    assert clock.threads == threads.threads
    return used


def test_one_thread_is_kept_for_the_steps_where_it_is_faster():
    clock = FakeClock({2: 0.010, 1: 0.004})
    threads = DecodeThreads(2, clock.set_threads, clock)
    used = generate(threads, clock, batch_size=8, tokens=20)
    assert used[:6] == [2, 2, 2, 1, 1, 1]  # the probe: three steps at each count
    assert set(used[6:]) == {1}
    assert threads.governors[8].choices == [(6, 1)]


def test_all_threads_are_kept_where_they_are_faster_and_each_batch_size_is_measured_apart():
    clock = FakeClock({2: 0.004, 1: 0.010})
    threads = DecodeThreads(2, clock.set_threads, clock)
    assert set(generate(threads, clock, batch_size=8, tokens=20)[6:]) == {2}
    clock.step_s = {2: 0.010, 1: 0.004}  # another batch size, another winner
    assert set(generate(threads, clock, batch_size=1, tokens=20)[6:]) == {1}
    assert sorted(threads.governors) == [1, 8]
    assert threads.governors[8].choices == [(6, 2)]  # batch 8 keeps what it measured
    assert set(generate(threads, clock, batch_size=8, tokens=5)) == {2}


def test_a_single_thread_is_never_governed():
    clock = FakeClock({1: 0.01})
    threads = DecodeThreads(1, clock.set_threads, clock)
    assert generate(threads, clock, batch_size=4, tokens=5) == [1] * 5
    assert threads.governors == {}
    with pytest.raises(ValueError, match="at least 1"):
        DecodeThreads(0)


@pytest.fixture()
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


IMAGE = Image.new("RGB", (224, 224), (200, 120, 180))


def answer_batch(engine: BatchingEngine, assistant: PaLlava, questions: list[str]) -> tuple[list[str], set]:
    """Answers of one batch, and the worker's torch thread counts when it delivered them."""
    image = assistant.processor.image_processor.tile(IMAGE)
    done = threading.Event()
    answers: dict[int, str] = {}
    worker_threads = set()

    def finish(index: int, result) -> None:
        worker_threads.add(torch.get_num_threads())  # called in the worker, after the batch
        answers[index] = result if isinstance(result, BaseException) else result.text
        if len(answers) == len(questions):
            done.set()

    engine.window_s = 5.0
    engine.expect()  # more are on their way until the last is queued: one batch
    for index, question in enumerate(questions):
        conversation = assistant.processor.question(question, True)
        job = Job(conversation, [image], GenerationOptions(12), 120.0, lambda r, i=index: finish(i, r))
        if index == len(questions) - 1:
            engine.unexpect()
        engine.submit(job)
    assert done.wait(120)
    return [answers[i] for i in range(len(questions))], worker_threads


@pytest.mark.parametrize("batching", ["continuous", "static"])
@pytest.mark.parametrize("setting", ["auto", None])
def test_the_engine_answers_the_same_and_gives_threads_back(tiny, two_threads, setting, batching):
    assistant = PaLlava(*tiny)
    questions = ["What is shown?", "Is this malignant?", "Which organ?"]
    ask = assistant.processor.question
    alone = [assistant.generate([ask(q, True)], [[IMAGE]], max_new_tokens=12)[0] for q in questions]
    engine = BatchingEngine(assistant, max_batch_size=8, generation_threads=setting, batching=batching)
    engine.start()
    try:
        answers, worker_threads = answer_batch(engine, assistant, questions)
    finally:
        engine.close()
    assert answers == alone
    assert worker_threads == {2}  # every thread back for the next prefill
    if setting is None:
        assert engine.decode_threads is None
    else:
        assert list(engine.decode_threads.governors) == [len(questions)]  # the rows finish together
    with pytest.raises(ValueError, match="generation_threads"):
        BatchingEngine(assistant, generation_threads="fast")
    with pytest.raises(ValueError, match="server setting generation_threads"):
        ServerSettings(generation_threads="fast")
