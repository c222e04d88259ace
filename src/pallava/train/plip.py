"""PLIP pre-training app: accelerate-based loop with checkpoints, resume, TensorBoard and a training curve.

Works alone or under `accelerate launch` (features are gathered across processes for ITC). Output folder:
a loadable PLIP model (config, weights, tokenizer), `vision_tower/` (a CLIPVisionModel folder for the
assistant), `checkpoints/ckpt-N` (full state, sealed by a marker, last k kept), `logs/` (TensorBoard),
`train_log.jsonl`,
`training_curve.png` and `training_summary.json`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import torch
from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase, get_cosine_schedule_with_warmup

from pallava.convert.plip import load_vision_tower
from pallava.data.datasets import balance, counts_by_dataset
from pallava.data.labels import LabelMap
from pallava.models.plip.modeling_plip import PlipModel
from pallava.models.plip.presets import PLIP_PRESETS, build_plip
from pallava.models.plip.pretraining import PlipPretrainer
from pallava.models.plip.zeroshot import PlipZeroShot, zeroshot_predictions
from pallava.processing.augment import Augmentation
from pallava.train import checkpoints
from pallava.train.feedback import StepLog
from pallava.train.optim import adamw
from pallava.train.plip_config import PlipTrainConfig
from pallava.train.plip_data import PlipCollator, PlipDataset, read_plip_data
from pallava.train.plip_eval import plot_training_curve
from pallava.train.threads import apply_cpu_threads


def _optimizer(pretrainer: PlipPretrainer, recipe: PlipTrainConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases, norms, embeddings and the temperature; own lr for a pre-trained
    text tower."""
    text_lr = recipe.text_lr if recipe.text_lr is not None else recipe.lr
    return adamw(
        pretrainer.model,
        group_of=lambda name: "text" if name.startswith("text_model.") else "model",
        lr_of=lambda group: text_lr if group == "text" else recipe.lr,
        weight_decay=recipe.weight_decay,
        decays=lambda name, param: not (param.ndim < 2 or "embedding" in name or name == "temp"),
    )


def _hparams(config: dict, prefix: str = "") -> dict[str, object]:
    """The recipe as TensorBoard hyper-parameters: nested settings flattened (`augment.stain`), None left
    out."""
    flat: dict[str, object] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_hparams(value, f"{prefix}{key}."))
        elif value is not None:
            flat[f"{prefix}{key}"] = value if isinstance(value, int | float | str | bool) else str(value)
    return flat


def _write_model(
    model: PlipModel, tokenizer: PreTrainedTokenizerBase, labels: LabelMap | None, out: Path
) -> None:
    """The loadable PLIP folder, plus `vision_tower/`: the vision tower alone, for the assistant."""
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    model.vision_model.save_pretrained(out / "vision_tower")
    if labels is not None:
        (out / "label_map.json").write_text(json.dumps(labels.to_dict(), indent=2), encoding="utf-8")


class _ZeroShotProbe:
    """Zero-shot accuracy on a fixed labelled split during training (images decoded once)."""

    def __init__(self, data: str | Path, split: str, label_map: str | None, image_size: int):
        samples, self.label_map = read_plip_data(data, split, label_map)
        if self.label_map is None:
            raise ValueError(f"{data}: zero-shot evaluation needs a labelled manifest (.csv)")
        dataset = PlipDataset(samples, image_size, self.label_map, train=False)
        self.pixels = torch.stack([dataset[i]["pixel_values"] for i in range(len(dataset))])
        self.truth = [s.label for s in samples]

    def accuracy(self, zs: PlipZeroShot) -> float:
        predicted, _ = zeroshot_predictions(zs, zs.encode_pixels(self.pixels), self.label_map)
        return sum(p == t for p, t in zip(predicted, self.truth, strict=True)) / len(self.truth)


def train_plip(
    data: str | Path,
    out: str | Path,
    recipe: PlipTrainConfig,
    split: str | None = "train",
    label_map: str | None = None,
    eval_data: str | Path | None = None,
    eval_split: str | None = None,
    resume: bool = True,
    show_progress: bool = True,
) -> dict[str, object]:
    """Pre-train PLIP on caption pairs or a labelled manifest; returns the training summary.

    `resume` (default): continue from the newest complete checkpoint in `out` (see
    `checkpoints.prepare_run`); False starts over, removing the old checkpoints.
    """
    if recipe.preset not in PLIP_PRESETS:
        raise ValueError(f"unknown PLIP preset {recipe.preset!r}; choose one of {', '.join(PLIP_PRESETS)}")
    recipe.validate("PLIP recipe")
    out = Path(out)
    started = time.time()
    accelerator = Accelerator(
        mixed_precision=recipe.mixed_precision,
        cpu=not torch.cuda.is_available(),  # several processes without GPUs: gloo on the CPU
        log_with="tensorboard",
        project_dir=str(out),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        # With ITM off, its head and the cross-attention get no gradient.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=recipe.itm_weight == 0)],
    )
    apply_cpu_threads(recipe.cpu_threads, accelerator.device)
    set_seed(recipe.seed)
    main = accelerator.is_main_process
    samples, labels = read_plip_data(data, split, label_map)
    model, tokenizer = build_plip(
        recipe.preset,
        recipe.text_init,
        load_vision_tower(recipe.vision_init) if recipe.vision_init else None,
        recipe.text_layers,
        recipe.seed,
        **recipe.model_overrides(),
    )
    if recipe.freeze_text_embeddings:
        model.text_model.embeddings.word_embeddings.requires_grad_(False)
    samples = [
        samples[i] for i in balance([s.dataset for s in samples], recipe.balance or "sqrt", seed=recipe.seed)
    ]
    by_dataset = counts_by_dataset([s.dataset for s in samples])
    if len(by_dataset) > 1:
        accelerator.print(f"PLIP samples per dataset (after balancing): {by_dataset}")
    augmentation = Augmentation.from_dict(recipe.augment, source="PLIP recipe 'augment'")
    dataset = PlipDataset(
        samples, model.image_size, labels, train=True, seed=recipe.seed, augmentation=augmentation
    )
    if recipe.cache_images:
        dataset.cache_images(progress=main and show_progress)
    if len(dataset) < recipe.batch_size * accelerator.num_processes:
        raise ValueError(
            f"{data}: {len(dataset)} samples, fewer than one global batch ({recipe.batch_size} x "
            f"{accelerator.num_processes} processes)"
        )
    loader = DataLoader(
        dataset,
        batch_size=recipe.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=recipe.num_workers,
        collate_fn=PlipCollator(tokenizer, model.config.max_text_length),
    )
    pretrainer = PlipPretrainer(model)
    optimizer = _optimizer(pretrainer, recipe)
    steps_per_epoch = len(loader) // accelerator.num_processes
    total_steps = max(1, math.ceil(recipe.epochs * steps_per_epoch))
    if recipe.max_steps is not None:
        total_steps = min(total_steps, recipe.max_steps)
    scheduler = get_cosine_schedule_with_warmup(
        optimizer, round(recipe.warmup_ratio * total_steps), total_steps
    )
    pretrainer, optimizer, loader = accelerator.prepare(pretrainer, optimizer, loader)
    # Not prepared: accelerate would step it once per process; the schedule is already in per-process steps.
    accelerator.register_for_checkpointing(scheduler)
    probe = None
    if eval_data is not None and main:
        probe = _ZeroShotProbe(eval_data, eval_split, label_map, model.image_size)

    step = 0
    checkpoint_dir = out / checkpoints.CHECKPOINT_DIR
    checkpoint = checkpoints.prepare_run(accelerator, out, resume, dataclasses.asdict(recipe))
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        step = json.loads((checkpoint / checkpoints.STATE_FILE).read_text(encoding="utf-8"))["step"]
        accelerator.print(f"resumed from {checkpoint} at step {step}")
    accelerator.init_trackers("logs", config=_hparams(dataclasses.asdict(recipe)))
    log = StepLog(out / "train_log.jsonl", step if checkpoint is not None else None, write=main)
    save_every = recipe.save_every or steps_per_epoch
    generator = torch.Generator()  # ITM negatives; re-seeded every step so that a resumed run draws the same
    alpha = model.config.alpha

    def evaluate(at_step: int) -> None:
        if probe is None:
            return
        online = accelerator.unwrap_model(pretrainer).model
        accuracy = probe.accuracy(PlipZeroShot(online, tokenizer, accelerator.device))
        online.train()
        log.record({"step": at_step, "zeroshot_accuracy": accuracy})
        accelerator.log({"eval/zeroshot_accuracy": accuracy}, step=at_step)

    if step == 0 and main:
        evaluate(0)
    progress = tqdm(
        total=total_steps, initial=step, desc="PLIP training", disable=not main or not show_progress
    )
    pretrainer.train()
    while step < total_steps:
        epoch = step // steps_per_epoch
        dataset.set_epoch(epoch)
        loader.set_epoch(epoch)
        batches = (
            accelerator.skip_first_batches(loader, step % steps_per_epoch)
            if step % steps_per_epoch
            else loader
        )
        for batch in batches:
            # Soft-target weight ramps up over the first epoch (ALBEF), while the momentum model is still
            # poor.
            generator.manual_seed(
                (recipe.seed * 1_000_003 + step) * accelerator.num_processes + accelerator.process_index
            )
            with accelerator.autocast():
                output = pretrainer(
                    **batch, alpha=alpha * min(1.0, step / steps_per_epoch), generator=generator
                )
            accelerator.backward(output.loss)
            if recipe.grad_clip:
                accelerator.clip_grad_norm_(pretrainer.parameters(), recipe.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            step += 1
            values = (
                torch.stack([output.loss, output.loss_itc, output.loss_itm, output.itm_accuracy])
                .detach()
                .float()
            )
            loss, loss_itc, loss_itm, itm_acc = accelerator.reduce(values, reduction="mean").tolist()
            temperature = accelerator.unwrap_model(pretrainer).model.temperature().item()
            row = {
                "step": step,
                "epoch": epoch,
                "loss": loss,
                "loss_itc": loss_itc,
                "loss_itm": loss_itm,
                "itm_accuracy": itm_acc,
                "temperature": temperature,
                "lr": scheduler.get_last_lr()[0],
            }
            if step % recipe.log_every == 0 or step == total_steps:
                log.record(row)
                accelerator.log(
                    {f"train/{k}": v for k, v in row.items() if k not in ("step", "epoch")}, step=step
                )
            progress.update(1)
            progress.set_postfix(loss=f"{loss:.3f}", itc=f"{loss_itc:.3f}", itm=f"{loss_itm:.3f}")
            if main and recipe.eval_every and step % recipe.eval_every == 0 and step < total_steps:
                evaluate(step)
            if step % save_every == 0 or step == total_steps:
                checkpoints.save_training_state(
                    accelerator, checkpoint_dir, step, {"step": step, "epoch": epoch}, recipe.keep_checkpoints
                )
            if step >= total_steps:
                break
    progress.close()
    if main:
        evaluate(step)
    log.close()
    summary: dict[str, object] = {}
    if main:
        _write_model(accelerator.unwrap_model(pretrainer).model, tokenizer, labels, out)
        plot_training_curve(log.rows, out / "training_curve.png")
        last = next((r for r in reversed(log.rows) if "loss" in r), {})
        accuracies = [r["zeroshot_accuracy"] for r in log.rows if "zeroshot_accuracy" in r]
        summary = {
            "steps": step,
            "samples": len(dataset),
            "processes": accelerator.num_processes,
            "global_batch": recipe.batch_size * accelerator.num_processes,
            "wall_seconds": round(time.time() - started, 1),
            "final_loss": last.get("loss"),
            "zeroshot_accuracy": accuracies[-1] if accuracies else None,
        }
        (out / "training_summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary
