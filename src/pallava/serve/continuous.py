"""Continuous (iteration-level) batching: one running batch whose rows, each a job's answer, join and leave
between decoding steps.

Jobs that arrive together are prefilled together (their prompts left-padded to each other, their images
merged as `generate` merges them), then their KV cache is stacked under the running one: whichever is shorter
is left-padded to the other's length, and the attention mask marks every row's padding. Each row keeps its
own position id (the count of its real tokens), so its next token is computed from exactly what it would
see alone and a greedy answer is the one `PaLlava.complete` gives. A row leaves as soon as it is finished,
cancelled or out of time; the cache columns that are padding in every remaining row are then cut off, so
the cache is as long as the longest live row, never the batch's history.

The KV cache is transformers' `DynamicCache`, rebuilt from its layers' tensors when rows join or leave (the
only times its shape changes other than by a token).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from pallava.inference import Completion, PaLlava
from pallava.serve.decode_threads import DecodeThreads
from pallava.serve.jobs import Job, JobCancelled, TextPieces

# `generate` samples from the 50 likeliest tokens unless the model's generation config says otherwise
# (transformers' default `top_k`; 0 turns it off): rows sample the same way.
DEFAULT_TOP_K = 50


@dataclass(eq=False)
class Row:
    """One job's answer in the running batch."""

    job: Job
    prompt_tokens: int  # real (unpadded) prompt tokens, images included
    position: int  # position id of its next input token: its real tokens so far
    warpers: LogitsProcessorList | None  # None: greedy
    text: TextPieces | None  # a streaming job's pieces
    tokens: list[int] = field(default_factory=list)
    error: Exception | None = None  # its pieces could not be delivered: it alone fails

    def finish_reason(self, stops: frozenset[int]) -> str | None:
        if self.tokens[-1] in stops:
            return "stop"
        if len(self.tokens) >= self.job.options.max_new_tokens:
            return "length"
        return None


def _left_pad(tensor: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """Zeros before `tensor` along `dim` (counted from the end) up to `length`."""
    missing = length - tensor.shape[dim]
    if missing == 0:
        return tensor
    return F.pad(tensor, (0, 0) * (-dim - 1) + (missing, 0))


class ContinuousBatch:
    """The rows being generated together and their KV cache (B, heads, L, head_dim) with its mask (B, L).

    `join` prefills new jobs and adds them as rows (each with its first token), `step` generates one token
    for every row, `finish` takes out the rows that are done with what their jobs are settled with. Not
    thread-safe: the engine's worker thread is its only user.
    """

    def __init__(self, assistant: PaLlava, threads: DecodeThreads | None = None):
        self.assistant, self.model, self.threads = assistant, assistant.model, threads
        self.processor = assistant.processor
        self.stops = frozenset(self.processor.stop_token_ids)
        top_k = getattr(self.model.generation_config, "top_k", None)
        self.top_k = DEFAULT_TOP_K if top_k is None else top_k
        if any(DynamicCache(config=self.model.config.text_config).is_sliding):
            raise ValueError(
                "continuous batching needs a language model with full attention in every layer (this one "
                "has sliding-window layers); use batching='static'"
            )
        self.rows: list[Row] = []
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def jobs(self) -> list[Job]:
        return [row.job for row in self.rows]

    def clear(self) -> list[Job]:
        """Drop every row (after a failed step); their jobs."""
        jobs = self.jobs
        self.rows, self.cache, self.mask = [], None, None
        return jobs

    # --- rows join ----------------------------------------------------------------------------------
    def _warpers(self, job: Job) -> LogitsProcessorList | None:
        options = job.options
        if options.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {options.max_new_tokens}")
        if options.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {options.temperature}")
        if options.temperature == 0:
            return None
        warpers = LogitsProcessorList()
        if options.temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(options.temperature))
        if self.top_k:
            warpers.append(TopKLogitsWarper(self.top_k))
        if options.top_p < 1.0:
            warpers.append(TopPLogitsWarper(options.top_p))
        return warpers

    @torch.inference_mode()
    def join(self, jobs: Sequence[Job]) -> None:
        """Prefill `jobs` together and add them as rows. Raises what the prefill raises, and then leaves the
        running rows as they were."""
        warpers = [self._warpers(job) for job in jobs]
        # The very inputs `PaLlava.complete` builds, so that an answer is the one it gives alone.
        inputs = self.assistant._inputs([job.conversation for job in jobs], [job.images for job in jobs])
        if self.threads is not None:
            self.threads.done()  # the prompt and the vision tower get every thread
        cache = DynamicCache()
        logits = self.model(**inputs, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        mask = inputs["attention_mask"]
        rows = []
        for job, warper, length in zip(jobs, warpers, mask.sum(-1).tolist(), strict=True):
            text = None
            if job.streaming:
                text = TextPieces(job.on_text, self.processor.tokenizer, skip_prompt=False)
            rows.append(Row(job, int(length), int(length), warper, text))
        self._choose(rows, logits)
        self._stack(rows, cache, mask)

    def _stack(self, rows: list[Row], cache: DynamicCache, mask: torch.Tensor) -> None:
        if not self.rows:
            self.rows, self.cache, self.mask = rows, cache, mask
            return
        length = max(self.mask.shape[1], mask.shape[1])
        layers = [
            (
                torch.cat([_left_pad(keys, length, -2), _left_pad(new_keys, length, -2)]),
                torch.cat([_left_pad(values, length, -2), _left_pad(new_values, length, -2)]),
            )
            for (keys, values, *_), (new_keys, new_values, *_) in zip(self.cache, cache, strict=True)
        ]
        self.cache = DynamicCache(layers)
        self.mask = torch.cat([_left_pad(self.mask, length, -1), _left_pad(mask, length, -1)])
        self.rows = [*self.rows, *rows]

    # --- one token for every row --------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> None:
        device = self.mask.device
        tokens = torch.tensor([[row.tokens[-1]] for row in self.rows], device=device)  # (B, 1)
        positions = torch.tensor([[row.position] for row in self.rows], device=device)  # (B, 1)
        self.mask = F.pad(self.mask, (0, 1), value=1)  # (B, L + 1)
        if self.threads is not None:
            self.threads.step_begins(len(self.rows))
        output = self.model(
            input_ids=tokens,
            attention_mask=self.mask,
            position_ids=positions,
            cache=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        for row in self.rows:
            row.position += 1
        self._choose(self.rows, output.logits[:, -1])
        if self.threads is not None:
            self.threads.step_ends()

    def _choose(self, rows: list[Row], logits: torch.Tensor) -> None:
        """Each row's next token from its (V,) logits: the likeliest, or sampled with the row's warpers."""
        scores = logits.float()  # as `generate` chooses
        chosen = scores.argmax(-1)
        for index, row in enumerate(rows):
            if row.warpers is not None:
                history = torch.tensor([row.tokens], dtype=torch.long, device=scores.device)
                warped = row.warpers(history, scores[index : index + 1])
                chosen[index] = torch.multinomial(torch.softmax(warped, dim=-1), 1)[0, 0]
        for row, token in zip(rows, chosen.tolist(), strict=True):
            row.tokens.append(token)
            if row.text is not None and row.error is None:
                try:
                    row.text.put(torch.tensor([token]))
                except Exception as error:  # e.g. its client's event loop is gone: not the other rows' fault
                    row.error = error

    # --- rows leave ---------------------------------------------------------------------------------
    def finish(self, now: float) -> list[tuple[Job, Completion | BaseException]]:
        """Take out the rows that are done (answered, their client gone, out of time); each job with what it
        is settled with."""
        done: list[tuple[Row, Completion | BaseException]] = []
        for row in self.rows:
            if row.job.cancelled:
                done.append((row, JobCancelled("the client disconnected")))
            elif row.error is not None:
                done.append((row, row.error))
            elif reason := row.finish_reason(self.stops):
                done.append((row, self._completion(row, reason)))
            elif now >= row.job.deadline:
                done.append((row, row.job.timed_out()))
        self._leave(row for row, _ in done)
        return [(row.job, result) for row, result in done]

    def _completion(self, row: Row, reason: str) -> Completion | Exception:
        if row.text is not None:
            try:
                row.text.end()
            except Exception as error:
                return error
        text = self.processor.decode(row.tokens)
        return Completion(text, row.prompt_tokens, len(row.tokens), reason)

    def _leave(self, rows: Iterable[Row]) -> None:
        gone = set(map(id, rows))
        keep = [index for index, row in enumerate(self.rows) if id(row) not in gone]
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.clear()
            return
        index = torch.tensor(keep, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        start = int(mask.any(0).int().argmax())  # the first column a remaining row uses
        self.mask = mask[:, start:]
        self.cache = DynamicCache(
            [
                (keys.index_select(0, index)[:, :, start:], values.index_select(0, index)[:, :, start:])
                for keys, values, *_ in self.cache
            ]
        )
        self.rows = [self.rows[i] for i in keep]
