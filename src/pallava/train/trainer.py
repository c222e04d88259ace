"""Two-stage training of the assistant on `accelerate`: one loop for CPU, DDP and DeepSpeed ZeRO-2.

Stage `align` trains on captions, stage `instruct` on questions and answers, starting from the align
output. The loss of an optimizer step is the mean over *all* answer tokens of the global batch (every
process and accumulation step), so 1 process with batch 2B and 2 processes with batch B give the same
numbers. Checkpoints hold only the trainable weights plus optimiser, scheduler, RNG and data position;
a run resumes from the newest complete one and continues the uninterrupted run's loss curve.
"""

from __future__ import annotations

import functools
import json
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DistributedType
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from pallava.data.datasets import counts_by_dataset
from pallava.inference import PaLlava
from pallava.models.modeling_pa_llava import PaLlavaForConditionalGeneration
from pallava.models.presets import load_preset
from pallava.processing.processor import CROP_FEATURES, IGNORE_INDEX, MODEL_INPUT_NAMES, PaLlavaProcessor
from pallava.train import checkpoints
from pallava.train.config import Recipe, with_defaults
from pallava.train.data import (
    Collator,
    Sample,
    assign_views,
    augmented_view,
    drop_overlong,
    epoch_loader,
    global_batch_size,
    load_samples,
    steps_per_epoch,
    view_tag,
)
from pallava.train.feature_cache import DTYPES, FeatureCache, default_cache_dir, image_key, namespace_for
from pallava.train.feedback import METRICS_FILE, RunLog, plot_loss_curves, read_jsonl
from pallava.train.optim import apply_trainable, build_optimizer, build_scheduler, group_learning_rates
from pallava.train.threads import apply_cpu_threads

RECIPE_FILE = checkpoints.RECIPE_FILE
HISTORY_FILE = "training_history.json"
SUMMARY_FILE = "run_summary.json"
TRAINABLE_FILE = "trainable.safetensors"
MODEL_INPUTS = (*MODEL_INPUT_NAMES, CROP_FEATURES)  # cached crop features stand in for pixel_values

StepCallback = Callable[["Trainer", dict[str, Any]], None]


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


def resolve_mixed_precision(setting: str) -> str:
    """`auto`: bf16 on GPUs that support it, else fp16 on GPUs, and fp32 ("no") on CPU."""
    if setting != "auto":
        return setting
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


class Trainer:
    """Runs one stage of a recipe into `out_dir`; `run()` returns the directory of the saved model."""

    def __init__(
        self,
        recipe: Recipe,
        out_dir: str | Path,
        resume: bool = True,
        progress: bool = True,
        callbacks: Sequence[StepCallback] = (),
    ) -> None:
        recipe.validate()
        self.recipe, self.out_dir, self.resume = recipe, Path(out_dir), resume
        self.progress, self.callbacks = progress, list(callbacks)
        self.ckpt_dir = self.out_dir / checkpoints.CHECKPOINT_DIR
        self.global_step = 0
        self.timings: dict[str, float] = {}
        self.overlong: dict[str, Any] = {"policy": recipe.data.overlong}

    # --- setup --------------------------------------------------------------------------------------
    def _accelerator(self) -> Accelerator:
        run = self.recipe.train
        accelerator = Accelerator(
            mixed_precision=resolve_mixed_precision(run.mixed_precision),
            gradient_accumulation_steps=run.grad_accum,
            cpu=not torch.cuda.is_available(),
        )
        if accelerator.distributed_type == DistributedType.DEEPSPEED:
            # Batches come from our own loader, so DeepSpeed cannot infer the micro-batch size.
            ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
            ds_config["train_micro_batch_size_per_gpu"] = run.batch_size
            ds_config["gradient_clipping"] = self.recipe.optim.max_grad_norm
        apply_cpu_threads(run.cpu_threads, accelerator.device)
        return accelerator

    def _check_out_dir(self, accelerator: Accelerator) -> None:
        if (self.out_dir / "config.json").is_file():
            raise ValueError(f"{self.out_dir} already holds a trained model; choose another --out")
        checkpoints.prepare_run(accelerator, self.out_dir, self.resume, self.recipe.to_dict(), with_defaults)

    def _image_keys(self, samples: Sequence[Sample]) -> list[str | None]:
        """Content keys of the samples' images (each file read once); an augmented view's key adds the view
        and a hash of the augmentation settings."""
        memo: dict[str, str] = {}
        keys: list[str | None] = []
        tag = view_tag(self.recipe.augment, self.recipe.data.seed)
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
        return functools.partial(
            augmented_view, sample.image_source, sample.view, self.recipe.augment, self.recipe.data.seed
        )

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

    def _register_state_hooks(self, accelerator: Accelerator) -> None:
        """Checkpoints store the trainable weights only (by unwrapped name), not the frozen model."""

        def save_hook(models, weights, output_dir):
            if accelerator.distributed_type == DistributedType.DEEPSPEED:
                return
            if accelerator.is_main_process:
                model = accelerator.unwrap_model(models[0])
                state = {
                    name: param.detach().cpu().contiguous()
                    for name, param in model.named_parameters()
                    if param.requires_grad
                }
                save_file(state, str(Path(output_dir) / TRAINABLE_FILE))
            weights.clear()

        def load_hook(models, input_dir):
            if not models:  # DeepSpeed restores its engine itself
                return
            model = accelerator.unwrap_model(models[0])
            state = load_file(str(Path(input_dir) / TRAINABLE_FILE))
            expected = {name for name, param in model.named_parameters() if param.requires_grad}
            if set(state) != expected:
                raise ValueError(
                    f"{input_dir}: checkpoint weights do not match the trainable parameters "
                    f"(missing {sorted(expected - set(state))[:5]}, extra "
                    f"{sorted(set(state) - expected)[:5]})"
                )
            model.load_state_dict(state, strict=False)
            models.clear()

        accelerator.register_save_state_pre_hook(save_hook)
        accelerator.register_load_state_pre_hook(load_hook)

    @property
    def _show_progress(self) -> bool:
        return self.progress and self._is_main

    # --- checkpoints --------------------------------------------------------------------------------
    def _save_checkpoint(self, accelerator: Accelerator, steps_per_epoch_: int) -> None:
        extra = (
            {"exclude_frozen_parameters": True}
            if accelerator.distributed_type == DistributedType.DEEPSPEED
            else {}
        )
        state = {
            "global_step": self.global_step,
            "epoch": self.global_step // steps_per_epoch_,
            "step_in_epoch": self.global_step % steps_per_epoch_,
            "data_seed": self.recipe.train.seed,
            "num_processes": accelerator.num_processes,
        }
        checkpoints.save_training_state(
            accelerator, self.ckpt_dir, self.global_step, state, self.recipe.checkpoint.keep_last, **extra
        )

    def _restore(self, accelerator: Accelerator) -> None:
        latest = checkpoints.latest_complete(self.ckpt_dir) if self.resume else None
        if latest is None:
            return
        state = json.loads((latest / checkpoints.STATE_FILE).read_text())
        if state["num_processes"] != accelerator.num_processes:
            raise ValueError(
                f"{latest}: written by {state['num_processes']} process(es), resumed with "
                f"{accelerator.num_processes}; resume with the same number of processes"
            )
        extra = (
            {"load_module_strict": False} if accelerator.distributed_type == DistributedType.DEEPSPEED else {}
        )
        accelerator.load_state(str(latest), **extra)  # DeepSpeed checkpoints exclude the frozen weights
        self.global_step = state["global_step"]
        accelerator.print(f"resumed from {latest} at step {self.global_step}")

    # --- steps --------------------------------------------------------------------------------------
    @staticmethod
    def _token_loss_sum(model, batch: dict[str, Any], device: torch.device) -> torch.Tensor:
        inputs = {k: batch[k].to(device) for k in MODEL_INPUTS if k in batch}
        logits = model(**inputs, use_cache=False).logits[:, :-1].float()
        targets = batch["labels"][:, 1:].to(device)
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            targets.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )

    def _optimizer_step(
        self, accelerator, model, optimizer, scheduler, micro: list[dict[str, Any]]
    ) -> dict[str, Any]:
        """Forward/backward over the accumulation micro-batches, then clip and step."""
        device = accelerator.device
        local_tokens = torch.tensor(float(sum(b["num_label_tokens"] for b in micro)), device=device)
        total_tokens = accelerator.reduce(local_tokens, "sum").clamp(min=1.0)
        # Each process's gradient is averaged over processes and (by accelerate) over accumulation steps;
        # this scale turns the result into the gradient of the global token-mean loss.
        scale = accelerator.num_processes * len(micro) / total_tokens
        loss_sum = torch.zeros((), device=device)
        for batch in micro:
            with accelerator.accumulate(model):
                summed = self._token_loss_sum(model, batch, device)
                accelerator.backward(summed * scale)
                loss_sum += summed.detach()
        grad_norm = None
        if self.recipe.optim.max_grad_norm > 0:
            norm = accelerator.clip_grad_norm_(model.parameters(), self.recipe.optim.max_grad_norm)
            grad_norm = float(norm) if norm is not None else None
        rates = group_learning_rates(optimizer)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss = float(accelerator.reduce(loss_sum, "sum") / total_tokens)
        counts = torch.tensor(
            [
                float(sum(b["num_samples"] for b in micro)),
                float(sum(len(b.get("truncated", ())) for b in micro)),
            ],
            device=device,
        )
        samples, truncated = accelerator.reduce(counts, "sum").tolist()
        return {
            "loss": loss,
            "lr": rates,
            "grad_norm": grad_norm,
            "samples": int(samples),
            "tokens": int(total_tokens),
            "truncated": int(truncated),
        }

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
                f"warning: step {self.global_step}: over-long sample(s) cut to the processor's "
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

    # --- run ----------------------------------------------------------------------------------------
    def run(self) -> Path:
        recipe, run = self.recipe, self.recipe.train
        accelerator = self._accelerator()
        self._is_main = accelerator.is_main_process
        self._check_out_dir(accelerator)
        model, processor = build_model(recipe)
        counts = apply_trainable(model, recipe.trainable)
        if run.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.to(accelerator.device)
        samples = self._fitting_samples(accelerator, load_samples(recipe.data, recipe.stage), processor)
        assign_views(samples, recipe.augment.views, recipe.data.seed)
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

        cache, keys = None, None
        if recipe.feature_cache.enabled:
            cache, keys = self._feature_cache(accelerator, model, processor, samples)
        collator = Collator(processor, samples, cache, keys, augment=(recipe.augment, recipe.data.seed))

        model.train()
        optimizer = build_optimizer(model, recipe.optim)
        scheduler = build_scheduler(optimizer, total_steps, recipe.optim)
        model, optimizer = accelerator.prepare(model, optimizer)
        accelerator.register_for_checkpointing(scheduler)
        self._register_state_hooks(accelerator)
        self._restore(accelerator)

        log = RunLog(self.out_dir, self.global_step, recipe.logging.tensorboard) if self._is_main else None
        fixed = self._fixed_samples(samples, recipe.logging.num_samples, processor)
        bar = tqdm(
            total=total_steps,
            initial=self.global_step,
            desc=f"train {recipe.stage}",
            unit="step",
            disable=not self._show_progress,
            dynamic_ncols=True,
        )
        started, cpu_started = time.perf_counter(), time.process_time()
        first_step = self.global_step
        while self.global_step < total_steps:
            epoch, in_epoch = divmod(self.global_step, per_epoch)
            last = min(per_epoch, in_epoch + total_steps - self.global_step)
            loader = epoch_loader(
                len(samples),
                collator,
                run.seed,
                epoch,
                in_epoch,
                last,
                run.batch_size,
                accelerator.num_processes,
                run.grad_accum,
                accelerator.process_index,
                run.num_workers,
            )
            micro_iter = iter(loader)
            for _ in range(in_epoch, last):
                step_started = time.perf_counter()
                micro = [next(micro_iter) for _ in range(run.grad_accum)]
                result = self._optimizer_step(accelerator, model, optimizer, scheduler, micro)
                self.global_step += 1
                elapsed = time.perf_counter() - step_started
                record = {
                    "step": self.global_step,
                    "epoch": epoch,
                    "loss": result["loss"],
                    "lr": result["lr"],
                    "grad_norm": result["grad_norm"],
                    "samples_per_s": result["samples"] / max(elapsed, 1e-9),
                    "tokens": result["tokens"],
                }
                if result["truncated"]:
                    record["truncated"] = result["truncated"]
                    self._warn_truncated(accelerator, micro)
                logging_step = self.global_step % recipe.logging.every == 0 or self.global_step == total_steps
                if log is not None:
                    log.step(record, scalars=logging_step)
                if logging_step:
                    bar.set_postfix(
                        loss=f"{record['loss']:.4f}",
                        lr=f"{max(record['lr'].values()):.2e}",
                        samples_s=f"{record['samples_per_s']:.1f}",
                    )
                bar.update(1)
                every = recipe.logging.sample_every
                if (
                    log is not None
                    and every
                    and self.global_step % every == 0
                    and self.global_step < total_steps
                ):
                    log.samples(self.global_step, self._sample_answers(accelerator, model, processor, fixed))
                if (
                    recipe.checkpoint.every
                    and self.global_step % recipe.checkpoint.every == 0
                    and self.global_step < total_steps
                ):
                    self._save_checkpoint(accelerator, per_epoch)
                for callback in self.callbacks:
                    callback(self, record)
        bar.close()
        self.timings["train_s"] = time.perf_counter() - started
        self.timings["train_cpu_s"] = (
            time.process_time() - cpu_started
        )  # meaningful on a shared, loaded machine
        self.timings["steps_run"] = self.global_step - first_step
        return self._finish(accelerator, model, processor, fixed, log, len(samples), total_steps)

    def _finish(self, accelerator, model, processor, fixed, log, num_samples: int, total_steps: int) -> Path:
        """Save the final model with its training history, last sample answers and a loss plot."""
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            if fixed:
                log.samples(self.global_step, self._sample_answers(accelerator, model, processor, fixed))
            log.close()
            unwrapped = accelerator.unwrap_model(model)
            PaLlava(unwrapped, processor).save_pretrained(self.out_dir)
            precision = "fp32" if accelerator.mixed_precision == "no" else accelerator.mixed_precision
            self._write_history(num_samples, total_steps, accelerator.num_processes, precision)
            plot_loss_curves([(self.recipe.stage, self.out_dir)], self.out_dir / "loss_curve.png")
        accelerator.wait_for_everyone()
        accelerator.end_training()
        return self.out_dir

    def _write_history(self, num_samples: int, total_steps: int, num_processes: int, precision: str) -> None:
        history = []
        if self.recipe.model.init:
            previous = Path(self.recipe.model.init) / HISTORY_FILE
            if previous.is_file():
                history = json.loads(previous.read_text())
        metrics = read_jsonl(self.out_dir / METRICS_FILE)
        tail = metrics[-20:]
        overlong = {k: v for k, v in self.overlong.items() if k != "warned"}
        if overlong["policy"] == "truncate":  # summed over the whole run, resumed parts included
            overlong["truncated"] = sum(r.get("truncated", 0) for r in metrics)
        entry = {
            "stage": self.recipe.stage,
            "recipe": self.recipe.to_dict(),
            "samples": num_samples,
            "steps": total_steps,
            "processes": num_processes,
            "precision": precision,
            "final_loss": sum(r["loss"] for r in tail) / len(tail),
            "timings_s": {k: round(v, 2) if isinstance(v, float) else v for k, v in self.timings.items()},
            "overlong": overlong,
        }
        history.append(entry)
        (self.out_dir / HISTORY_FILE).write_text(json.dumps(history, indent=2) + "\n")
        summary = {
            **entry,
            "world_batch": global_batch_size(
                self.recipe.train.batch_size, num_processes, self.recipe.train.grad_accum
            ),
        }
        summary.pop("recipe")
        (self.out_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")


def train(
    recipe: Recipe,
    out_dir: str | Path,
    resume: bool = True,
    progress: bool = True,
    callbacks: Sequence[StepCallback] = (),
) -> Path:
    """Run one stage; returns the output directory, which `PaLlava.from_pretrained` loads."""
    return Trainer(recipe, out_dir, resume, progress, callbacks).run()
