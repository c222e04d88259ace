"""The one training loop of every training app: PLIP pre-training and the assistant's stages.

A task (`train.plip.PlipTask`, `train.trainer.AssistantTask`, `train.slide.SlideTask`) supplies the model
and its optimiser, the micro-batches of each step and the loss of one micro-batch; the loop owns the rest:
accelerate (processes, mixed precision, DeepSpeed), gradient accumulation, clipping, the warm-up + cosine
schedule, checkpoints and resume (`train.checkpoints`), the progress bar, the run log (`metrics.jsonl`)
and TensorBoard (`train.feedback.RunLog`).

The loss of an optimizer step is a weighted mean over the global batch (every process and accumulation
micro-batch): a task returns a micro-batch's loss summed over its units (the assistant: answer tokens) and
their count, so 1 process with batch 2B and 2 processes with batch B give the same step. A task whose loss
is already a mean returns weight 1.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from pallava.cpu import cpu_computes_bf16
from pallava.train import checkpoints
from pallava.train.feedback import RunLog
from pallava.train.optim import build_scheduler, group_learning_rates
from pallava.train.threads import apply_cpu_threads, thread_governor

TRAINABLE_FILE = (
    "trainable.safetensors"  # checkpoints of tasks with a large frozen part: trained weights only
)

StepCallback = Callable[["TrainingLoop", dict[str, Any]], None]


@dataclass
class LoopSettings:
    """What the loop takes from a recipe (each task maps its recipe onto these)."""

    name: str  # progress-bar label
    recipe: dict[str, Any]  # saved as recipe.yaml (a resume refuses a changed one) and as TensorBoard hparams
    batch_size: int  # per process and micro-batch (DeepSpeed needs it)
    grad_accum: int = 1
    max_grad_norm: float = 1.0  # 0: no clipping
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of each group's peak
    mixed_precision: str = "no"  # auto | bf16-if-native | no | bf16 | fp16 (resolve_mixed_precision)
    cpu_threads: int | str | None = None  # torch threads on a CPU: N, auto or None (train/threads.py)
    save_every: int = 0  # optimizer steps between checkpoints (0: none)
    save_at_end: bool = False  # also a checkpoint of the last step
    keep_last: int = 2
    log_every: int = 10  # TensorBoard scalars and progress-bar numbers
    eval_every: int = 0  # steps between the task's evaluations (besides the one at the end)
    eval_at_start: bool = False  # also evaluate before the first step of a fresh run
    tensorboard: bool = True
    samples_log: bool = False  # the task writes sample answers (samples.jsonl)
    trainable_only_checkpoints: bool = False  # checkpoints hold the trainable weights, not the frozen model
    find_unused_parameters: bool = False  # DDP: some parameters get no gradient
    complete_saved: Callable[[dict[str, Any]], dict[str, Any]] = lambda saved: saved
    postfix: Sequence[str] = ()  # record keys shown on the progress bar besides loss and lr


@dataclass
class Plan:
    """What a task's `setup` hands the loop."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int  # each recipe rounds its warm-up share its own way


@dataclass
class MicroLoss:
    """One micro-batch: `loss` summed over the batch's `Task.weight` units. `sums` are averaged like the
    loss (summed, then divided by the total weight); `counts` are summed over micro-batches and processes."""

    loss: torch.Tensor
    samples: int = 0  # counted: the step's row gets samples_per_s
    sums: dict[str, torch.Tensor | float] = field(default_factory=dict)
    counts: dict[str, float] = field(default_factory=dict)


class Task:
    """What a training app plugs into the loop; the defaults suit a task without evaluations."""

    settings: LoopSettings

    def setup(self, loop: TrainingLoop) -> Plan:
        """Build the model, data and optimiser (the output folder is ready, nothing restored yet)."""
        raise NotImplementedError

    def prepare(self, accelerator: Accelerator, model, optimizer) -> tuple[Any, Any]:
        return accelerator.prepare(model, optimizer)

    def batches(self, epoch: int, start: int, stop: int) -> Iterable[Any]:
        """This process's micro-batches for steps [start, stop) of `epoch` (`grad_accum` per step)."""
        raise NotImplementedError

    def weight(self, batch: Any) -> float:
        """The units a micro-batch's loss is summed over (known before its forward); 1 for a mean loss."""
        return 1.0

    def loss(self, model, batch: Any, step: int) -> MicroLoss:
        """The loss of one micro-batch at optimizer step `step` (0-based, before the update)."""
        raise NotImplementedError

    def after_step(self, model, record: dict[str, Any], micro: list[Any]) -> None:
        """Add to (or trim) a step's record before it is logged."""

    def evaluate(self, loop: TrainingLoop, model, final: bool) -> None:
        """Feedback on the main process every `eval_every` steps and at the end (`loop.log`)."""

    def finish(self, loop: TrainingLoop, model) -> Any:
        """Save the trained model (every process calls it); its return value is the loop's."""
        raise NotImplementedError


def resolve_mixed_precision(setting: str) -> str:
    """The precision accelerate runs: the setting itself, or for

    - `auto`: bf16 on GPUs that support it, else fp16 on GPUs, and fp32 ("no") on CPU;
    - `bf16-if-native`: bf16 where the hardware computes it (a GPU with bf16, a CPU with AVX512-BF16 or
      AMX), else fp32. On a CPU without those instructions bf16 is emulated and slower than fp32.
    """
    if setting == "auto":
        if torch.cuda.is_available():
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "no"
    if setting == "bf16-if-native":
        if torch.cuda.is_available():
            return "bf16" if torch.cuda.is_bf16_supported() else "no"
        return "bf16" if cpu_computes_bf16() else "no"
    return setting


class TrainingLoop:
    """Runs a task into `out_dir`; `run()` returns what the task's `finish` returns."""

    def __init__(
        self,
        task: Task,
        out_dir: str | Path,
        resume: bool = True,
        progress: bool = True,
        callbacks: Sequence[StepCallback] = (),
    ) -> None:
        self.task, self.settings = task, task.settings
        self.out_dir, self.resume, self.progress = Path(out_dir), resume, progress
        self.callbacks = list(callbacks)
        self.ckpt_dir = self.out_dir / checkpoints.CHECKPOINT_DIR
        self.global_step = 0
        self.resumed = False
        self.timings: dict[str, float] = {}

    @property
    def show_progress(self) -> bool:
        return self.progress and self.accelerator.is_main_process

    # --- setup --------------------------------------------------------------------------------------
    def _accelerator(self) -> Accelerator:
        s = self.settings
        precision = resolve_mixed_precision(s.mixed_precision)
        if AcceleratorState._shared_state and AcceleratorState().mixed_precision != precision:
            # accelerate keeps one state per process and refuses another precision; one Python process may
            # run several loops (the quickstart: a bf16 PLIP, then fp32 stages). The distributed state
            # (PartialState: process group, ranks) is kept, only the precision is set afresh.
            AcceleratorState._reset_state(reset_partial_state=False)
        accelerator = Accelerator(
            mixed_precision=precision,
            gradient_accumulation_steps=s.grad_accum,
            cpu=not torch.cuda.is_available(),  # several processes without GPUs: gloo on the CPU
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=s.find_unused_parameters)],
        )
        if accelerator.distributed_type == DistributedType.DEEPSPEED:
            # Batches come from the task, so DeepSpeed cannot infer the micro-batch size.
            ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
            ds_config["train_micro_batch_size_per_gpu"] = s.batch_size
            ds_config["gradient_clipping"] = s.max_grad_norm
        apply_cpu_threads(s.cpu_threads, accelerator.device)
        self.governor = thread_governor(s.cpu_threads, accelerator.device, accelerator.num_processes)
        return accelerator

    def _register_trainable_only_hooks(self, accelerator: Accelerator) -> None:
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

    # --- checkpoints --------------------------------------------------------------------------------
    def _deepspeed(self) -> bool:
        return self.accelerator.distributed_type == DistributedType.DEEPSPEED

    def _save_checkpoint(self, steps_per_epoch: int) -> None:
        extra = {"exclude_frozen_parameters": True} if self._deepspeed() else {}
        state = {
            "step": self.global_step,
            "epoch": self.global_step // steps_per_epoch,
            "step_in_epoch": self.global_step % steps_per_epoch,
            "num_processes": self.accelerator.num_processes,
        }
        checkpoints.save_training_state(
            self.accelerator, self.ckpt_dir, self.global_step, state, self.settings.keep_last, **extra
        )

    def _restore(self, latest: Path | None) -> None:
        if latest is None:
            return
        accelerator = self.accelerator
        state = json.loads((latest / checkpoints.STATE_FILE).read_text(encoding="utf-8"))
        processes = state.get("num_processes", accelerator.num_processes)
        if processes != accelerator.num_processes:
            raise ValueError(
                f"{latest}: written by {processes} process(es), resumed with "
                f"{accelerator.num_processes}; resume with the same number of processes"
            )
        extra = {"load_module_strict": False} if self._deepspeed() else {}
        accelerator.load_state(str(latest), **extra)  # DeepSpeed checkpoints exclude the frozen weights
        self.global_step = state.get("step", state.get("global_step"))  # older checkpoints: global_step
        self.resumed = True
        accelerator.print(f"resumed from {latest} at step {self.global_step}")

    # --- one optimizer step -------------------------------------------------------------------------
    def _optimizer_step(self, model, optimizer, scheduler, micro: list[Any]) -> dict[str, Any]:
        """Forward/backward over the accumulation micro-batches, then clip and step."""
        accelerator, device = self.accelerator, self.accelerator.device
        # Each process's gradient is averaged over processes and (by accelerate) over accumulation steps;
        # this scale turns the result into the gradient of the global weighted-mean loss.
        local = torch.tensor(float(sum(self.task.weight(batch) for batch in micro)), device=device)
        total = accelerator.reduce(local, "sum").clamp(min=1.0)
        scale = accelerator.num_processes * len(micro) / total
        parts: list[MicroLoss] = []
        loss_sum = torch.zeros((), device=device)
        for batch in micro:
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    part = self.task.loss(model, batch, self.global_step)
                accelerator.backward(part.loss * scale)
            loss_sum += part.loss.detach().float()
            parts.append(part)
        grad_norm = None
        if self.settings.max_grad_norm > 0:
            norm = accelerator.clip_grad_norm_(model.parameters(), self.settings.max_grad_norm)
            grad_norm = float(norm) if norm is not None else None
        rates = group_learning_rates(optimizer)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return self._reduce(parts, loss_sum, total, rates, grad_norm)

    def _reduce(self, parts, loss_sum, total, rates, grad_norm) -> dict[str, Any]:
        """Sum the micro-batches' numbers over processes (one collective): a weighted mean for the loss and
        `sums`, totals for `counts` and samples. Float64 keeps the task's numbers as they were computed;
        the loss is divided in float32, as the step's own arithmetic."""
        sum_keys, count_keys = list(parts[0].sums), list(parts[0].counts)

        def total_of(values) -> torch.Tensor:
            return torch.as_tensor(sum(values), dtype=torch.float64).detach().cpu()

        local = torch.stack(
            [loss_sum.detach().double().cpu()]
            + [total_of(p.sums[k] for p in parts) for k in sum_keys]
            + [total_of(p.samples for p in parts)]
            + [total_of(p.counts[k] for p in parts) for k in count_keys]
        ).to(self.accelerator.device)
        reduced = self.accelerator.reduce(local, "sum")
        loss = float(reduced[0].float() / total)
        means = (reduced[1 : 1 + len(sum_keys)] / total.double()).tolist()
        samples, *counted = reduced[1 + len(sum_keys) :].tolist()
        record: dict[str, Any] = {"loss": loss, **dict(zip(sum_keys, means, strict=True))}
        record.update({k: int(v) for k, v in zip(count_keys, counted, strict=True)})
        record.update(lr=rates, grad_norm=grad_norm, samples=int(samples))
        return record

    # --- run ----------------------------------------------------------------------------------------
    def run(self) -> Any:
        s, task = self.settings, self.task
        self.accelerator = accelerator = self._accelerator()
        main = accelerator.is_main_process
        latest = checkpoints.prepare_run(accelerator, self.out_dir, self.resume, s.recipe, s.complete_saved)
        plan = task.setup(self)
        scheduler = build_scheduler(plan.optimizer, plan.total_steps, plan.warmup_steps, s.min_lr_ratio)
        model, optimizer = task.prepare(accelerator, plan.model, plan.optimizer)
        # Not prepared: accelerate would step it once per process; the schedule is in optimizer steps.
        accelerator.register_for_checkpointing(scheduler)
        if s.trainable_only_checkpoints:
            self._register_trainable_only_hooks(accelerator)
        self._restore(latest)
        self.total_steps, total, per_epoch = plan.total_steps, plan.total_steps, plan.steps_per_epoch
        self.log = RunLog(
            self.out_dir,
            self.global_step if self.resumed else None,
            s.tensorboard,
            s.recipe,
            samples=s.samples_log,
            write=main,
        )
        if main and s.eval_at_start and not self.resumed:
            task.evaluate(self, model, final=False)
        model.train()
        bar = tqdm(
            total=total,
            initial=self.global_step,
            desc=s.name,
            unit="step",
            disable=not self.show_progress,
            dynamic_ncols=True,
        )
        started, cpu_started, first_step = time.perf_counter(), time.process_time(), self.global_step
        while self.global_step < total:
            epoch, start = divmod(self.global_step, per_epoch)
            stop = min(per_epoch, start + total - self.global_step)
            micro_iter = iter(task.batches(epoch, start, stop))
            for _ in range(start, stop):
                step_started = time.perf_counter()
                micro = [next(micro_iter) for _ in range(s.grad_accum)]
                result = self._optimizer_step(model, optimizer, scheduler, micro)
                self.global_step += 1
                samples = result.pop("samples")
                record = {"step": self.global_step, "epoch": epoch, **result}
                seconds = time.perf_counter() - step_started
                if samples:  # a timing: only for tasks that count samples (PLIP's rows stay reproducible)
                    record["samples_per_s"] = samples / max(seconds, 1e-9)
                if self.governor is not None:  # cpu_threads: auto
                    record["threads"] = self.governor.threads
                    self.governor.step_done(seconds)
                task.after_step(model, record, micro)
                self._log_step(record, bar)
                if (
                    main
                    and s.eval_every
                    and self.global_step % s.eval_every == 0
                    and self.global_step < total
                ):
                    task.evaluate(self, model, final=False)
                if self._checkpoint_due():
                    self._save_checkpoint(per_epoch)
                for callback in self.callbacks:
                    callback(self, record)
            if stop == per_epoch:
                for _ in micro_iter:  # let the epoch's loader finish (accelerate closes its epoch there)
                    pass
        bar.close()
        self.timings["train_s"] = time.perf_counter() - started
        self.timings["train_cpu_s"] = time.process_time() - cpu_started  # meaningful on a loaded machine
        self.timings["steps_run"] = self.global_step - first_step
        accelerator.wait_for_everyone()
        if main:
            task.evaluate(self, model, final=True)
        self.log.close()
        result = task.finish(self, model)
        accelerator.wait_for_everyone()
        accelerator.end_training()
        return result

    def _checkpoint_due(self) -> bool:
        every, step = self.settings.save_every, self.global_step
        if step == self.total_steps:
            return self.settings.save_at_end
        return bool(every) and step % every == 0

    def _log_step(self, record: dict[str, Any], bar: tqdm) -> None:
        logging_step = self.global_step % self.settings.log_every == 0 or self.global_step == self.total_steps
        self.log.step(record, scalars=logging_step)
        if logging_step:
            shown = {"loss": f"{record['loss']:.4f}", "lr": f"{max(record['lr'].values()):.2e}"}
            shown.update({key: f"{record[key]:.3f}" for key in self.settings.postfix if key in record})
            bar.set_postfix(shown)
        bar.update(1)
