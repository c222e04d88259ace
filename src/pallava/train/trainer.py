"""The assistant's stages `align` and `instruct` as a task of the one training loop (`train.loop`).

Stage `align` trains on captions, stage `instruct` on questions and answers, starting from the align
output. A micro-batch's loss is summed over its answer tokens, so the step's loss is the mean over *all*
answer tokens of the global batch (every process and accumulation step): 1 process with batch 2B and 2
processes with batch B give the same numbers. Checkpoints hold only the trainable weights plus optimiser,
scheduler, RNG and data position; a run resumes from the newest complete one and continues the
uninterrupted run's loss curve.
"""

from __future__ import annotations

import functools
import json
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from pallava.data.datasets import counts_by_dataset
from pallava.inference import PaLlava
from pallava.models.modeling_pa_llava import PaLlavaForConditionalGeneration
from pallava.models.presets import load_preset
from pallava.processing.processor import CROP_FEATURES, IGNORE_INDEX, MODEL_INPUT_NAMES, PaLlavaProcessor
from pallava.train import checkpoints
from pallava.train.answer_weights import LetterWeight, per_answer_mean_sum
from pallava.train.config import Recipe, with_defaults
from pallava.train.data import (
    Collator,
    Sample,
    ViewMaker,
    assign_views,
    drop_overlong,
    epoch_loader,
    global_batch_size,
    load_samples,
    steps_per_epoch,
)
from pallava.train.feature_cache import DTYPES, FeatureCache, default_cache_dir, image_key, namespace_for
from pallava.train.feedback import plot_loss_curves
from pallava.train.loop import (
    LoopSettings,
    MicroLoss,
    Plan,
    StepCallback,
    Task,
    TrainingLoop,
)
from pallava.train.optim import apply_trainable, assistant_warmup_steps, build_optimizer
from pallava.train.packing import answer_groups, pack_questions

RECIPE_FILE = checkpoints.RECIPE_FILE
HISTORY_FILE = "training_history.json"
SUMMARY_FILE = "run_summary.json"
# cached crop features stand in for pixel_values; packed rows (train/packing.py) bring their positions
MODEL_INPUTS = (*MODEL_INPUT_NAMES, CROP_FEATURES, "position_ids")

__all__ = ["AssistantTask", "build_model", "train"]


def build_model(recipe: Recipe) -> tuple[PaLlavaForConditionalGeneration, PaLlavaProcessor]:
    """The starting model: a saved model directory (`model.init`) or a preset built from scratch."""
    section = recipe.model
    if section.init:
        if section.vision_path or section.llm_path or section.overrides:
            raise ValueError(
                "model.init loads a saved model; model.vision_path/llm_path/overrides apply to presets only"
            )
        init = Path(section.init)
        if not (init / "config.json").is_file():
            raise ValueError(
                f"model.init: {init} is not a model directory (no config.json); "
                "stage instruct starts from the output directory of stage align"
            )
        model = PaLlavaForConditionalGeneration.from_pretrained(init, trust_remote_code=False)
        return model, PaLlavaProcessor.from_pretrained(init)
    return load_preset(
        section.preset,
        vision_path=section.vision_path,
        llm_path=section.llm_path,
        seed=section.seed,
        **section.overrides,
    )


class AssistantTask(Task):
    """Stage align or instruct of a recipe: the model, its samples and the token-summed answer loss."""

    def __init__(self, recipe: Recipe) -> None:
        recipe.validate()
        self.recipe = recipe
        run, log = recipe.train, recipe.logging
        self.settings = LoopSettings(
            name=f"train {recipe.stage}",
            recipe=recipe.to_dict(),
            batch_size=run.batch_size,
            grad_accum=run.grad_accum,
            max_grad_norm=recipe.optim.max_grad_norm,
            min_lr_ratio=recipe.optim.min_lr_ratio,
            mixed_precision=run.mixed_precision,
            cpu_threads=run.cpu_threads,
            save_every=recipe.checkpoint.every,
            keep_last=recipe.checkpoint.keep_last,
            log_every=log.every,
            eval_every=log.sample_every,
            tensorboard=log.tensorboard,
            samples_log=True,
            trainable_only_checkpoints=True,  # the frozen model is rebuilt from the recipe on resume
            complete_saved=with_defaults,
            postfix=("samples_per_s",),
        )
        self.timings: dict[str, float] = {}
        self.overlong: dict[str, Any] = {"policy": recipe.data.overlong}

    def _image_keys(self, samples: Sequence[Sample]) -> list[str | None]:
        """Content keys of the samples' images (each file read once); an augmented view's key adds the view
        and a hash of the augmentation settings."""
        memo: dict[str, str] = {}
        keys: list[str | None] = []
        tag = self.views.tag
        for sample in tqdm(samples, desc="hashing images", unit="sample", disable=not self._show_progress):
            if sample.image_source is None:
                keys.append(None)
                continue
            if sample.image_bytes is None:
                if sample.image not in memo:
                    memo[sample.image] = image_key(sample.read_image_bytes())
                key = memo[sample.image]
            else:
                key = image_key(sample.image_bytes)
            keys.append(f"{key}-aug{tag}-v{sample.view}" if sample.view else key)
        return keys

    def _source(self, sample: Sample):
        """The image (or, for an augmented view, a function making it when the cache encodes it)."""
        if not sample.view:
            return sample.image_source
        return functools.partial(self.views.view, sample.image_source, sample.view, sample.dataset)

    def _feature_cache(self, accelerator, model, processor, samples) -> tuple[FeatureCache, list[str | None]]:
        """Encode every image not yet cached (each process a share), then share the index."""
        section = self.recipe.feature_cache
        started, cpu_started = time.perf_counter(), time.process_time()
        keys = self._image_keys(samples)
        namespace = namespace_for(
            model.vision_tower, model.config.vision_feature_layer, processor.image_processor, section.dtype
        )
        cache = FeatureCache(section.dir or default_cache_dir(), namespace, section.shard_size)
        sources = {
            key: self._source(sample) for key, sample in zip(keys, samples, strict=True) if key is not None
        }
        todo = cache.missing(list(sources))
        accelerator.wait_for_everyone()  # every process splits the same to-do list before anyone writes
        mine = {key: sources[key] for key in todo[accelerator.process_index :: accelerator.num_processes]}
        model.eval()
        encoded = cache.build(
            model.encode_crops,
            processor.image_processor,
            mine,
            DTYPES.get(section.dtype),
            section.batch_size,
            writer=f"r{accelerator.process_index}",
            progress=self._show_progress,
            autocast=accelerator.autocast,
            device=accelerator.device,
        )
        model.train()
        accelerator.wait_for_everyone()
        cache.refresh()
        self.timings["feature_cache_s"] = time.perf_counter() - started
        self.timings["feature_cache_cpu_s"] = time.process_time() - cpu_started
        self.timings["feature_cache_new_images"] = len(todo)
        self.timings["feature_cache_images"] = len(sources)
        accelerator.print(
            f"feature cache {cache.directory}: {len(sources) - len(todo)} of {len(sources)} images "
            f"cached, {len(todo)} encoded ({encoded} here)"
        )
        return cache, keys

    @property
    def _show_progress(self) -> bool:
        return self.loop.show_progress

    @staticmethod
    def _token_loss_sum(
        model,
        batch: dict[str, Any],
        device: torch.device,
        per_sample: bool = False,
        letters: LetterWeight | None = None,
    ) -> torch.Tensor:
        """Summed cross-entropy of the answer tokens; with `per_sample`, the sum over answers (a sample's, or
        one segment of a packed row) of each answer's mean over its own tokens, a choice answer's letter
        counting as `letters.weight` tokens where given. Logits are computed only where a label follows
        (`logits_to_keep` as a boolean mask): the prompt and image positions, most of a sequence, never reach
        the vocabulary projection."""
        inputs = {k: batch[k].to(device) for k in MODEL_INPUTS if k in batch}
        labels = batch["labels"].to(device)
        predicts = torch.zeros_like(labels, dtype=torch.bool)
        predicts[:, :-1] = labels[:, 1:] != IGNORE_INDEX  # position p predicts token p + 1
        logits = model(**inputs, use_cache=False, logits_to_keep=predicts).logits.float()
        targets = labels[:, 1:][predicts[:, :-1]]
        losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets, reduction="none")
        if not per_sample:
            return losses.sum()
        if not losses.numel():
            return losses.sum()
        # the answer of each kept position (its row, or its row and segment in a pack), row-major as `losses`
        segments = batch.get("segment_ids")
        answers = answer_groups(predicts[:, :-1], None if segments is None else segments.to(device))
        _, answers = answers.unique(return_inverse=True)
        weights = None if letters is None else letters.weights(targets, answers)
        return per_answer_mean_sum(losses, answers, weights)

    # --- over-long samples --------------------------------------------------------------------------
    def _fitting_samples(
        self, accelerator, samples: list[Sample], processor: PaLlavaProcessor
    ) -> list[Sample]:
        """With `data.overlong: drop`, the samples over `max_length` are left out before the first step
        (counted and named in the log and the run summary); with `truncate` the collator cuts them."""
        if self.recipe.data.overlong != "drop":
            return samples
        kept, dropped = drop_overlong(samples, processor)
        self.overlong.update(dropped=len(dropped), dropped_ids=dropped[:20])
        if dropped:
            accelerator.print(
                f"warning: data.overlong=drop: left out {len(dropped)} of {len(samples)} samples over "
                f"{processor.max_length} tokens: {', '.join(dropped[:5])}"
                + (f" and {len(dropped) - 5} more" if len(dropped) > 5 else "")
            )
        if not kept:
            raise ValueError(
                f"data.path: every sample is over {processor.max_length} tokens (data.overlong=drop)"
            )
        return kept

    def _warn_truncated(self, accelerator, micro: list[dict[str, Any]]) -> None:
        """Say it once; every step's count is in metrics.jsonl (`truncated`) and the total in the summary."""
        if not self.overlong.get("warned"):
            ids = [i for batch in micro for i in batch.get("truncated", ())]
            accelerator.print(
                f"warning: step {self.loop.global_step}: over-long sample(s) cut to the processor's "
                f"max_length (data.overlong=truncate){': ' + ', '.join(ids[:5]) if ids else ''}; "
                "counted per step as 'truncated' in metrics.jsonl"
            )
            self.overlong["warned"] = True

    def _sample_answers(
        self, accelerator, model, processor, samples: Sequence[Sample]
    ) -> list[dict[str, Any]]:
        """Greedy answers to the first question of a few fixed samples (main process only)."""
        assistant = PaLlava(accelerator.unwrap_model(model), processor)
        answers = []
        with accelerator.autocast():
            for sample in samples:
                question = sample.conversation[0]["value"]
                images = [[sample.image_source]] if sample.image_source is not None else [[]]
                answer = assistant.generate(
                    [sample.conversation[:1]], images, max_new_tokens=self.recipe.logging.max_new_tokens
                )[0]
                answers.append(
                    {
                        "id": sample.id,
                        "question": question,
                        "reference": sample.conversation[1]["value"],
                        "answer": answer,
                    }
                )
        model.train()
        return answers

    @staticmethod
    def _fixed_samples(samples: Sequence[Sample], count: int, processor: PaLlavaProcessor) -> list[Sample]:
        """`count` samples drawn once with a fixed seed (preferring ones with images), in dataset order;
        a draw whose question alone is over `max_length` is skipped (asking it would fail)."""
        pool = [s for s in samples if s.image_source is not None] or list(samples)
        picks = sorted(random.Random(0).sample(range(len(pool)), min(count, len(pool))))
        fits = [pool[i] for i in picks]
        return [
            s
            for s in fits
            if len(processor.encode_conversation(s.conversation[:1], True)[0]) <= processor.max_length
        ]

    # --- the task -----------------------------------------------------------------------------------
    def setup(self, loop: TrainingLoop) -> Plan:
        recipe, run, accelerator = self.recipe, self.recipe.train, loop.accelerator
        self.loop = loop
        model, processor = build_model(recipe)
        counts = apply_trainable(model, recipe.trainable)
        if run.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.to(accelerator.device)
        samples = self._fitting_samples(accelerator, load_samples(recipe.data, recipe.stage), processor)
        assign_views(samples, recipe.augment.views, recipe.data.seed)
        self.views = ViewMaker.for_samples(recipe.augment, recipe.data.seed, samples)
        if self.views.stains is not None:
            accelerator.print(self.views.stains.summary())
        self.fixed = self._fixed_samples(samples, recipe.logging.num_samples, processor)
        questions, per_pack = len(samples), recipe.data.pack_questions
        samples = pack_questions(samples, per_pack, processor, recipe.data.seed)
        if per_pack > 1:
            accelerator.print(
                f"{questions} questions in {len(samples)} rows (up to {per_pack} about one image a row)"
            )
        per_epoch = steps_per_epoch(len(samples), run.batch_size, accelerator.num_processes, run.grad_accum)
        total_steps = run.max_steps or run.epochs * per_epoch
        accelerator.print(
            f"{recipe.stage}: {len(samples)} samples, {per_epoch} steps/epoch, {total_steps} steps, "
            f"global batch {global_batch_size(run.batch_size, accelerator.num_processes, run.grad_accum)}, "
            f"trainable {counts}"
        )
        by_dataset = counts_by_dataset([sample.dataset for sample in samples])
        if len(by_dataset) > 1:
            accelerator.print(f"samples per dataset (after balancing): {by_dataset}")
        if recipe.data.balance_labels:
            by_class = counts_by_dataset([f"{s.dataset or ''}:{s.label}" for s in samples if s.label])
            accelerator.print(f"samples per dataset:class (classes balanced): {by_class}")

        cache, keys = None, None
        if recipe.feature_cache.enabled:
            cache, keys = self._feature_cache(accelerator, model, processor, samples)
        self.collator = Collator(processor, samples, cache, keys, views=self.views, packed=per_pack > 1)
        self.processor, self.num_samples = processor, len(samples)
        self.letters = None
        if run.choice_letter_weight != 1:
            self.letters = LetterWeight.for_tokenizer(processor.tokenizer, run.choice_letter_weight)
        model.train()
        optimizer = build_optimizer(model, recipe.optim)
        return Plan(
            model, optimizer, per_epoch, total_steps, assistant_warmup_steps(recipe.optim, total_steps)
        )

    def batches(self, epoch: int, start: int, stop: int):
        run, accelerator = self.recipe.train, self.loop.accelerator
        return epoch_loader(
            self.num_samples,
            self.collator,
            run.seed,
            epoch,
            start,
            stop,
            run.batch_size,
            accelerator.num_processes,
            run.grad_accum,
            accelerator.process_index,
            run.num_workers,
        )

    def weight(self, batch: dict[str, Any]) -> float:
        if self.recipe.train.loss_average == "sample":  # the answers that survived truncation
            return float(batch["num_answers"])
        return float(batch["num_label_tokens"])

    def loss(self, model, batch: dict[str, Any], step: int) -> MicroLoss:
        per_sample = self.recipe.train.loss_average == "sample"
        return MicroLoss(
            self._token_loss_sum(model, batch, self.loop.accelerator.device, per_sample, self.letters),
            samples=batch["num_samples"],
            counts={"tokens": batch["num_label_tokens"], "truncated": len(batch.get("truncated", ()))},
        )

    def after_step(self, model, record: dict[str, Any], micro: list[dict[str, Any]]) -> None:
        if record["truncated"]:
            self._warn_truncated(self.loop.accelerator, micro)
        else:
            del record["truncated"]  # counted only on the steps that cut something

    def evaluate(self, loop: TrainingLoop, model, final: bool) -> None:
        if not final or self.fixed:
            loop.log.samples(
                loop.global_step, self._sample_answers(loop.accelerator, model, self.processor, self.fixed)
            )

    def finish(self, loop: TrainingLoop, model) -> Path:
        """Save the final model with its training history and a loss plot."""
        accelerator, out_dir = loop.accelerator, loop.out_dir
        if accelerator.is_main_process:
            unwrapped = accelerator.unwrap_model(model)
            PaLlava(unwrapped, self.processor).save_pretrained(out_dir)
            precision = "fp32" if accelerator.mixed_precision == "no" else accelerator.mixed_precision
            self._write_history(loop, precision)
            plot_loss_curves([(self.recipe.stage, out_dir)], out_dir / "loss_curve.png")
        return out_dir

    def _write_history(self, loop: TrainingLoop, precision: str) -> None:
        history = []
        if self.recipe.model.init:
            previous = Path(self.recipe.model.init) / HISTORY_FILE
            if previous.is_file():
                history = json.loads(previous.read_text())
        metrics = [r for r in loop.log.rows if "loss" in r]
        tail = metrics[-20:]
        overlong = {k: v for k, v in self.overlong.items() if k != "warned"}
        if overlong["policy"] == "truncate":  # summed over the whole run, resumed parts included
            overlong["truncated"] = sum(r.get("truncated", 0) for r in metrics)
        timings = {**self.timings, **loop.timings}
        num_processes = loop.accelerator.num_processes
        entry = {
            "stage": self.recipe.stage,
            "recipe": self.recipe.to_dict(),
            "samples": self.num_samples,
            "steps": loop.total_steps,
            "processes": num_processes,
            "precision": precision,
            "final_loss": sum(r["loss"] for r in tail) / len(tail),
            "timings_s": {k: round(v, 2) if isinstance(v, float) else v for k, v in timings.items()},
            "overlong": overlong,
        }
        history.append(entry)
        (loop.out_dir / HISTORY_FILE).write_text(json.dumps(history, indent=2) + "\n")
        summary = {
            **entry,
            "world_batch": global_batch_size(
                self.recipe.train.batch_size, num_processes, self.recipe.train.grad_accum
            ),
        }
        summary.pop("recipe")
        (loop.out_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")


def train(
    recipe: Recipe,
    out_dir: str | Path,
    resume: bool = True,
    progress: bool = True,
    callbacks: Sequence[StepCallback] = (),
) -> Path:
    """Run stage align or instruct on the training loop; returns the output directory, which
    `PaLlava.from_pretrained` loads. `callbacks(loop, record)` run after every step."""
    task = AssistantTask(recipe)
    if (Path(out_dir) / "config.json").is_file():
        raise ValueError(f"{out_dir} already holds a trained model; choose another --out")
    return TrainingLoop(task, out_dir, resume, progress, callbacks).run()
