"""Continuous batching: requests join and leave the running batch between decoding steps, and every greedy
answer is the one `PaLlava.complete` gives the request alone."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from PIL import Image

from pallava.inference import Completion, PaLlava
from pallava.serve.app import ServerSettings
from pallava.serve.continuous import ContinuousBatch
from pallava.serve.engine import (
    BatchingEngine,
    DecodeThreads,
    EngineUnavailable,
    GenerationOptions,
    GenerationTimeout,
    Job,
    JobCancelled,
    pretiled,
)

SMALL = Image.new("RGB", (224, 224), (200, 120, 180))
LARGE = Image.effect_noise((600, 400), 40).convert("RGB")  # more tiles: a longer prompt
WAIT_S = 300  # bounds a broken run only; nothing here is timed


@pytest.fixture(scope="module")
def assistant(tiny) -> PaLlava:
    return PaLlava(*tiny)


def conversation(assistant: PaLlava, question: str, image: Image.Image | None):
    return assistant.processor.question(question, image is not None)


def alone(assistant: PaLlava, question: str, image: Image.Image | None, max_new_tokens: int) -> Completion:
    images = [[image] if image is not None else []]
    return assistant.complete([conversation(assistant, question, image)], images, max_new_tokens)[0]


class Answers:
    """Results delivered by the engine, by name, in the order they were settled."""

    def __init__(self):
        self.results: dict[str, Completion | BaseException] = {}
        self.order: list[str] = []
        self.pieces: dict[str, list[str]] = {}
        self._cond = threading.Condition()

    def job(
        self,
        assistant: PaLlava,
        name: str,
        question: str,
        image: Image.Image | None,
        options: GenerationOptions,
        streaming: bool = False,
        on_piece=None,
    ) -> Job:
        images = [assistant.processor.image_processor.tile(image)] if image is not None else []
        self.pieces[name] = []

        def text(piece: str) -> None:
            self.pieces[name].append(piece)
            if on_piece is not None:
                on_piece(len(self.pieces[name]))

        return Job(
            conversation(assistant, question, image),
            images,
            options,
            600.0,
            lambda result: self._done(name, result),
            on_text=text if streaming else None,
        )

    def _done(self, name: str, result) -> None:
        with self._cond:
            self.results[name] = result
            self.order.append(name)
            self._cond.notify_all()

    def wait(self, *names: str) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: set(names) <= set(self.results), WAIT_S)


def start_together(engine: BatchingEngine, jobs: list[Job]) -> None:
    """Queue `jobs` so that an idle worker starts them as one group (it waits while one is admitted)."""
    engine.window_s = 120.0
    engine.expect()
    for job in jobs[:-1]:
        engine.submit(job)
    engine.unexpect()
    engine.submit(jobs[-1])


def answer_together(assistant, specs: dict, **engine_options):
    """`specs` ({name: (question, image, max_new_tokens)}) started together on a fresh engine, answered;
    the answers and the closed engine."""
    engine = BatchingEngine(assistant, **engine_options)
    engine.start()
    try:
        answers = Answers()
        jobs = [answers.job(assistant, n, q, i, GenerationOptions(t)) for n, (q, i, t) in specs.items()]
        start_together(engine, jobs)
        answers.wait(*specs)
    finally:
        engine.close()
    return answers, engine


@pytest.fixture()
def engine(assistant):
    engine = BatchingEngine(assistant, max_batch_size=8)
    engine.start()
    yield engine
    engine.close()


# --- the running batch ----------------------------------------------------------------------------------
def test_rows_joining_at_different_steps_answer_as_if_alone(assistant):
    """Prompts of different lengths (text only, one tile, several tiles) join a running batch one by one and
    two at once; each row keeps its own positions, and the cache is never longer than its longest row."""
    specs = {
        "a": ("What is shown?", SMALL, 24),
        "b": ("Describe the tissue in detail, every cell you see.", LARGE, 6),  # leaves before "e" joins
        "c": ("Which organ?", None, 16),
        "d": ("Is this malignant? Answer shortly.", SMALL, 20),
        "e": ("Grade?", LARGE, 6),
    }
    expected = {name: alone(assistant, *spec) for name, spec in specs.items()}
    answers = Answers()
    jobs = {
        name: answers.job(assistant, name, question, image, GenerationOptions(tokens))
        for name, (question, image, tokens) in specs.items()
    }
    batch = ContinuousBatch(pretiled(assistant))
    schedule = {0: ["a"], 2: ["b"], 5: ["c", "d"], 9: ["e"]}
    sizes = []
    step = 0
    while step <= max(schedule) or len(batch):
        if step in schedule:
            batch.join([jobs[name] for name in schedule[step]])
        for job, result in batch.finish(time.monotonic()):
            job.on_done(result)
        if len(batch):
            longest = max(row.position for row in batch.rows)
            assert batch.mask.shape[1] == batch.cache.get_seq_length() == longest
            sizes.append(len(batch))
            batch.step()
        step += 1
    assert answers.results == expected
    assert max(sizes) == 4 and batch.cache is None and batch.mask is None
    assert answers.order.index("b") < answers.order.index("a")  # the short answer left first


def test_a_stop_token_ends_its_row_and_the_others_go_on(assistant, monkeypatch):
    """A row ends at its first stop token (`finish_reason` "stop"), as `generate` ends it."""
    question, image = "What is shown?", SMALL
    inputs = assistant._inputs([conversation(assistant, question, image)], [[image]])
    with torch.inference_mode():
        ids = assistant.model.generate(**inputs, **assistant._generation_options(12, 0.0, 1.0))
    new = ids[0, inputs["input_ids"].shape[1] :].tolist()
    stop = new[3]  # a token the model gives this prompt: made a stop token, it ends the answer there
    stops = [*assistant.processor.stop_token_ids, stop]
    monkeypatch.setattr(type(assistant.processor), "stop_token_ids", property(lambda self: stops))
    specs = {"stops": (question, image, 12), "other": ("Which organ?", LARGE, 12)}
    expected = {name: alone(assistant, *spec) for name, spec in specs.items()}
    assert expected["stops"].finish_reason == "stop"
    assert expected["stops"].completion_tokens == new.index(stop) + 1
    answers, _ = answer_together(assistant, specs)
    assert answers.results == expected


def test_a_short_answer_is_settled_while_a_long_one_goes_on(assistant, engine):
    expected = {
        "long": alone(assistant, "Describe it.", SMALL, 40),
        "short": alone(assistant, "Organ?", LARGE, 3),
    }
    answers = Answers()
    seen_at_short: dict = {}
    long_job = answers.job(assistant, "long", "Describe it.", SMALL, GenerationOptions(40))
    short_job = answers.job(assistant, "short", "Organ?", LARGE, GenerationOptions(3))
    deliver = short_job.on_done

    def short_done(result) -> None:  # runs in the worker, as the short answer is settled
        seen_at_short.update(long_settled=long_job.settled, running=engine.stats["running"])
        deliver(result)

    short_job.on_done = short_done
    start_together(engine, [long_job, short_job])
    answers.wait("long", "short")
    assert answers.results == expected
    assert answers.order == ["short", "long"]
    assert seen_at_short == {"long_settled": False, "running": 1}  # the long one was still being generated
    assert (engine.stats["batches"], engine.stats["largest_batch"]) == (1, 2)
    # The worker's accounting: each answer's first token comes from the prefill, every other from a step
    # that served it; the model time holds the prefill and the steps.
    tokens = [answers.results[name].completion_tokens for name in ("long", "short")]
    stats = engine.stats
    assert (stats["decode_steps"], stats["decode_rows"]) == (max(tokens) - 1, sum(tokens) - 2)
    assert 0 < stats["prefill_s"] and 0 < stats["decode_s"]
    assert stats["prefill_s"] + stats["decode_s"] <= stats["model_s"] + 1e-3


def test_a_request_joins_the_running_batch_at_the_next_step(assistant, engine):
    """A request that arrives while another is generated starts at once, beside it, not after it."""
    expected = {
        "first": alone(assistant, "Describe it.", SMALL, 40),
        "later": alone(assistant, "Organ?", None, 5),
    }
    answers = Answers()
    later = answers.job(assistant, "later", "Organ?", None, GenerationOptions(5))

    def arrive(pieces: int) -> None:  # runs in the worker, between two steps of the first answer
        if pieces == 2:
            engine.submit(later)

    first = answers.job(assistant, "first", "Describe it.", SMALL, GenerationOptions(40), True, arrive)
    engine.submit(first)
    answers.wait("first", "later")
    assert answers.results == expected
    assert answers.order == ["later", "first"]  # joined and finished while the first one was generated
    assert (engine.stats["batches"], engine.stats["largest_batch"]) == (2, 2)


def test_a_cancelled_row_and_a_timed_out_row_leave_the_others_intact(assistant, engine):
    specs = {"b": ("What is shown?", SMALL, 16), "c": ("Which organ?", LARGE, 12)}
    expected = {name: alone(assistant, *spec) for name, spec in specs.items()}
    answers = Answers()
    jobs = {n: answers.job(assistant, n, q, i, GenerationOptions(t)) for n, (q, i, t) in specs.items()}

    def leave(pieces: int) -> None:  # the client goes away after its first piece
        if pieces == 1:
            engine.cancel(jobs["cancelled"])

    def run_out(pieces: int) -> None:  # its time runs out after its first piece
        if pieces == 1:
            jobs["late"].timeout_s = 0.0

    for name, react in (("cancelled", leave), ("late", run_out)):
        jobs[name] = answers.job(assistant, name, "Describe it.", SMALL, GenerationOptions(40), True, react)
    before = engine.stats
    start_together(engine, list(jobs.values()))
    answers.wait(*jobs)
    assert {name: answers.results[name] for name in specs} == expected
    assert isinstance(answers.results["cancelled"], JobCancelled)
    assert isinstance(answers.results["late"], GenerationTimeout)
    assert answers.order.index("cancelled") < answers.order.index("c")  # left at once, not at the end
    after = engine.stats
    assert (after["cancelled"] - before["cancelled"], after["completed"] - before["completed"]) == (1, 2)
    assert (after["running"], after["queued"], after["image_pixels_held"]) == (0, 0, 0)


def test_rows_with_different_options_share_the_batch(assistant, engine):
    expected = {
        "greedy": alone(assistant, "What is shown?", SMALL, 20),
        "short": alone(assistant, "Organ?", LARGE, 7),
    }
    answers = Answers()
    jobs = [
        answers.job(assistant, "greedy", "What is shown?", SMALL, GenerationOptions(20)),
        answers.job(
            assistant, "sampled", "Describe it.", SMALL, GenerationOptions(16, temperature=0.8, top_p=0.9)
        ),
        answers.job(assistant, "short", "Organ?", LARGE, GenerationOptions(7)),
    ]
    start_together(engine, jobs)
    answers.wait("greedy", "sampled", "short")
    assert {name: answers.results[name] for name in expected} == expected
    sampled = answers.results["sampled"]
    assert isinstance(sampled, Completion) and sampled.finish_reason in ("stop", "length")
    assert (
        1 <= sampled.completion_tokens <= 16
        and sampled.prompt_tokens == alone(assistant, "Describe it.", SMALL, 1).prompt_tokens
    )
    assert (engine.stats["batches"], engine.stats["largest_batch"]) == (1, 3)


def test_streaming_rows_share_the_batch_and_their_pieces_join_to_the_answer(assistant, engine):
    specs = {
        "s1": ("What is shown?", SMALL, 24),
        "s2": ("Which organ?", LARGE, 16),
        "plain": ("Grade?", None, 20),
    }
    expected = {name: alone(assistant, *spec) for name, spec in specs.items()}
    answers = Answers()
    jobs = [
        answers.job(assistant, name, question, image, GenerationOptions(tokens), streaming=name != "plain")
        for name, (question, image, tokens) in specs.items()
    ]
    start_together(engine, jobs)
    answers.wait(*specs)
    assert answers.results == expected
    for name in ("s1", "s2"):
        assert "".join(answers.pieces[name]) == expected[name].text
        assert len(answers.pieces[name]) >= 2  # streamed, not one blob
    assert answers.pieces["plain"] == []
    assert (engine.stats["batches"], engine.stats["largest_batch"]) == (1, 3)


def test_a_stream_that_cannot_be_delivered_fails_alone(assistant, engine):
    expected = alone(assistant, "Which organ?", LARGE, 12)
    answers = Answers()

    def closed(pieces: int) -> None:  # as `call_soon_threadsafe` on a closed event loop
        raise RuntimeError("Event loop is closed")

    broken = answers.job(assistant, "broken", "Describe it.", SMALL, GenerationOptions(30), True, closed)
    fine = answers.job(assistant, "fine", "Which organ?", LARGE, GenerationOptions(12), True)
    start_together(engine, [broken, fine])
    answers.wait("broken", "fine")
    assert answers.results["fine"] == expected and "".join(answers.pieces["fine"]) == expected.text
    assert isinstance(answers.results["broken"], RuntimeError) and len(answers.pieces["broken"]) == 1
    assert answers.order == ["broken", "fine"]  # it left at once


def test_a_bad_request_fails_alone_and_its_group_is_answered(assistant, engine):
    expected = alone(assistant, "What is shown?", SMALL, 8)
    answers = Answers()
    good = answers.job(assistant, "good", "What is shown?", SMALL, GenerationOptions(8))
    bad = answers.job(assistant, "bad", "What is shown?", SMALL, GenerationOptions(8))
    bad.images = []  # an <image> placeholder without its image
    start_together(engine, [bad, good])
    answers.wait("good", "bad")
    assert answers.results["good"] == expected
    assert isinstance(answers.results["bad"], ValueError) and "placeholder" in str(answers.results["bad"])


def test_a_failed_step_fails_its_rows_and_the_worker_keeps_serving(assistant, engine, monkeypatch):
    step, failures = engine._batch.step, []

    def fails_once() -> None:
        if not failures:
            failures.append(1)
            raise RuntimeError("out of memory")
        step()

    monkeypatch.setattr(engine._batch, "step", fails_once)
    answers = Answers()
    start_together(engine, [answers.job(assistant, n, "Organ?", SMALL, GenerationOptions(8)) for n in "ab"])
    answers.wait("a", "b")
    assert all(isinstance(answers.results[n], RuntimeError) for n in "ab")
    engine.submit(answers.job(assistant, "after", "Organ?", LARGE, GenerationOptions(8)))
    answers.wait("after")
    assert answers.results["after"] == alone(assistant, "Organ?", LARGE, 8)
    assert (engine.stats["running"], engine.stats["image_pixels_held"]) == (0, 0)


def test_close_finishes_the_running_rows_and_fails_the_queued_ones(assistant):
    expected = alone(assistant, "Describe it.", SMALL, 30)
    engine = BatchingEngine(assistant, max_batch_size=1)  # a full batch: the second request must queue
    engine.start()
    answers = Answers()
    running = threading.Event()
    first = answers.job(
        assistant, "running", "Describe it.", SMALL, GenerationOptions(30), True, lambda _: running.set()
    )
    engine.submit(first)
    assert running.wait(WAIT_S)
    engine.submit(answers.job(assistant, "queued", "Organ?", None, GenerationOptions(4)))
    engine.close(timeout=WAIT_S)
    answers.wait("running", "queued")
    assert answers.results["running"] == expected  # drained: answered in full
    assert isinstance(answers.results["queued"], EngineUnavailable)
    assert not engine._thread.is_alive()
    assert (engine.stats["running"], engine.stats["queued"], engine.stats["image_pixels_held"]) == (0, 0, 0)
    with pytest.raises(EngineUnavailable):
        engine.submit(answers.job(assistant, "late", "Organ?", None, GenerationOptions(4)))


# --- the other path and the settings --------------------------------------------------------------------
def test_static_batching_stays_available(assistant):
    specs = {"a": ("What is shown?", SMALL, 10), "b": ("Which organ?", LARGE, 10)}
    expected = {name: alone(assistant, *spec) for name, spec in specs.items()}
    answers, engine = answer_together(assistant, specs, batching="static")
    assert answers.results == expected
    assert (engine.batching, engine.stats["batches"], engine.stats["largest_batch"]) == ("static", 1, 2)
    with pytest.raises(ValueError, match="batching must be one of continuous, static"):
        BatchingEngine(assistant, batching="dynamic")
    with pytest.raises(ValueError, match="server setting batching"):
        ServerSettings(batching="dynamic")
    assert ServerSettings().batching == "continuous"


def test_decode_threads_govern_each_batch_size_of_a_changing_batch():
    """Rows join and leave between steps: each step is timed on its own and counted for its batch size."""
    now, used = [0.0], []
    step_s = {(3, 2): 0.010, (3, 1): 0.004, (1, 2): 0.004, (1, 1): 0.010}  # (batch size, threads) -> s
    threads = DecodeThreads(2, used.append, lambda: now[0])
    for size in [3, 1] * 20:  # alternating sizes, as when a short row joins and leaves again
        threads.step_begins(size)
        now[0] += step_s[(size, used[-1])]
        threads.step_ends()
    threads.done()
    assert sorted(threads.governors) == [1, 3]
    assert threads.governors[3].choices[0][1] == 1 and threads.governors[1].choices[0][1] == 2
    assert used[-1] == 2  # every thread back for the next prefill
