"""PLIP pre-training as a task of the one training loop (`train.loop`): ITC + ITM on caption pairs or a
labelled manifest.

Works alone or under `accelerate launch` (features are gathered across processes for ITC). Output folder:
a loadable PLIP model (config, weights, tokenizer), `vision_tower/` (a CLIPVisionModel folder for the
assistant), `checkpoints/ckpt-N` (full state, sealed by a marker, last k kept) and the run log of every
training app: `metrics.jsonl` (a row per step, plus the zero-shot probes), `tensorboard/`,
`loss_curve.png`, `run_summary.json` and `recipe.yaml`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import torch
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from pallava.convert.plip import load_vision_tower
from pallava.data.datasets import balance, counts_by_dataset
from pallava.data.labels import LabelMap
from pallava.models.plip.modeling_plip import PlipModel
from pallava.models.plip.presets import PLIP_PRESETS, build_plip
from pallava.models.plip.pretraining import PlipPretrainer
from pallava.models.plip.zeroshot import PlipZeroShot, zeroshot_predictions
from pallava.models.pretrained_stem import PretrainedStem
from pallava.processing.augment import Augmentation
from pallava.processing.stain_mix import StainBank
from pallava.train.loop import LoopSettings, MicroLoss, Plan, Task, TrainingLoop
from pallava.train.optim import adamw
from pallava.train.plip_config import PlipTrainConfig
from pallava.train.plip_data import PlipCollator, PlipDataset, read_plip_data
from pallava.train.plip_eval import plot_training_curve

__all__ = ["PlipTask", "PlipTrainConfig", "train_plip"]

SUMMARY_FILE = "run_summary.json"  # the same name as the assistant's
CURVE_FILE = "loss_curve.png"


def _optimizer(pretrainer: PlipPretrainer, recipe: PlipTrainConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases, norms, embeddings and the temperature; own rates for a pre-trained
    text tower and for the trainable steps of a pre-trained backbone stem."""
    rates = {
        "text": recipe.text_lr if recipe.text_lr is not None else recipe.lr,
        "backbone": recipe.backbone_lr if recipe.backbone_lr is not None else recipe.lr,
    }

    def group_of(name: str) -> str:
        if name.startswith("text_model."):
            return "text"
        return "backbone" if ".patch_embedding.trunk." in name else "model"

    return adamw(
        pretrainer.model,
        group_of=group_of,
        lr_of=lambda group: rates.get(group, recipe.lr),
        weight_decay=recipe.weight_decay,
        decays=lambda name, param: not (param.ndim < 2 or "embedding" in name or name == "temp"),
    )


def _write_model(
    model: PlipModel, tokenizer: PreTrainedTokenizerBase, labels: LabelMap | None, out: Path
) -> None:
    """The loadable PLIP folder, plus `vision_tower/`: the vision tower alone, for the assistant."""
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    model.vision_model.save_pretrained(out / "vision_tower")
    if labels is not None:
        (out / "label_map.json").write_text(json.dumps(labels.to_dict(), indent=2), encoding="utf-8")


def _loader_backbone(model: PlipModel, recipe: PlipTrainConfig, accelerator) -> PretrainedStem | None:
    """The vision tower's backbone stem, whose frozen steps the loader workers run (`backbone_in_loader`),
    or None.

    Only where it pays: a CPU run with loader workers. There the frozen steps (half of a step's time in the
    tiny recipe) run on the worker's core while the steps train the layers above them (the backbone's own
    trainable last steps too, `pretrained_stem_trainable`) on the other; a GPU computes them faster than a
    worker could.
    """
    stem = getattr(model.vision_model.embeddings, "patch_embedding", None)
    if not recipe.backbone_in_loader or not isinstance(stem, PretrainedStem):
        return None
    if recipe.num_workers < 1 or accelerator.device.type != "cpu":
        return None
    return stem


class _ZeroShotProbe:
    """Zero-shot accuracy on a fixed labelled split during training (images decoded once)."""

    def __init__(
        self,
        data: str | Path,
        split: str,
        label_map: str | None,
        image_size: int,
        stain_normalize: str | None = None,
    ):
        samples, self.label_map = read_plip_data(data, split, label_map)
        if self.label_map is None:
            raise ValueError(f"{data}: zero-shot evaluation needs a labelled manifest (.csv)")
        dataset = PlipDataset(
            samples, image_size, self.label_map, train=False, stain_normalize=stain_normalize
        )
        self.pixels = torch.stack([dataset[i]["pixel_values"] for i in range(len(dataset))])
        self.truth = [s.label for s in samples]

    def accuracy(self, zs: PlipZeroShot) -> float:
        predicted, _ = zeroshot_predictions(zs, zs.encode_pixels(self.pixels), self.label_map)
        return sum(p == t for p, t in zip(predicted, self.truth, strict=True)) / len(self.truth)


class PlipTask(Task):
    """PLIP pre-training: the pretrainer (ITC + ITM, optional momentum encoders) on balanced, augmented
    samples; a zero-shot probe on a labelled split before, during (`eval_every`) and after training."""

    def __init__(
        self,
        data: str | Path | list,
        recipe: PlipTrainConfig,
        split: str | None,
        label_map: str | None,
        eval_data: str | Path | None,
        eval_split: str | None,
        show_progress: bool,
    ) -> None:
        if recipe.preset not in PLIP_PRESETS:
            raise ValueError(
                f"unknown PLIP preset {recipe.preset!r}; choose one of {', '.join(PLIP_PRESETS)}"
            )
        recipe.validate("PLIP recipe")
        self.recipe, self.data, self.split, self.label_map = recipe, data, split, label_map
        self.eval_data, self.eval_split, self.show_progress = eval_data, eval_split, show_progress
        self.settings = LoopSettings(
            name="PLIP training",
            recipe=dataclasses.asdict(recipe),
            batch_size=recipe.batch_size,
            max_grad_norm=recipe.grad_clip,
            mixed_precision=recipe.mixed_precision,
            cpu_threads=recipe.cpu_threads,
            save_every=recipe.save_every,  # 0 (once per epoch) is resolved in setup
            save_at_end=True,
            keep_last=recipe.keep_checkpoints,
            log_every=recipe.log_every,
            eval_every=recipe.eval_every,
            eval_at_start=True,
            # With ITM off, its head and the cross-attention get no gradient.
            find_unused_parameters=recipe.itm_weight == 0,
            postfix=("loss_itc", "loss_itm"),
        )
        self.started = time.time()

    def setup(self, loop: TrainingLoop) -> Plan:
        recipe, accelerator = self.recipe, loop.accelerator
        self.loop = loop
        set_seed(recipe.seed)
        main = accelerator.is_main_process
        samples, self.labels = read_plip_data(self.data, self.split, self.label_map)
        model, self.tokenizer = build_plip(
            recipe.preset,
            recipe.text_init,
            load_vision_tower(recipe.vision_init) if recipe.vision_init else None,
            recipe.text_layers,
            recipe.seed,
            recipe.vision,
            **recipe.model_overrides(),
        )
        # recorded with the tower, so zero-shot, `slide map` and the assistant built on it normalise too
        model.config.vision_config.stain_normalize = recipe.stain_normalize
        if recipe.freeze_text_embeddings:
            model.text_model.embeddings.word_embeddings.requires_grad_(False)
        samples = [
            samples[i]
            for i in balance([s.dataset for s in samples], recipe.balance or "sqrt", seed=recipe.seed)
        ]
        by_dataset = counts_by_dataset([s.dataset for s in samples])
        if len(by_dataset) > 1:
            accelerator.print(f"PLIP samples per dataset (after balancing): {by_dataset}")
        augmentation = Augmentation.from_dict(recipe.augment, source="PLIP recipe 'augment'")
        stains = None
        if augmentation.stain_mix:
            stains = StainBank.estimate([(s.dataset, s.image) for s in samples], seed=recipe.seed)
            accelerator.print(stains.summary())
        self.dataset = PlipDataset(
            samples,
            model.image_size,
            self.labels,
            train=True,
            seed=recipe.seed,
            augmentation=augmentation,
            stains=stains,
            stain_normalize=recipe.stain_normalize,
        )
        if recipe.cache_images:
            self.dataset.cache_images(progress=main and self.show_progress)
        if len(self.dataset) < recipe.batch_size * accelerator.num_processes:
            raise ValueError(
                f"{self.data}: {len(self.dataset)} samples, fewer than one global batch "
                f"({recipe.batch_size} x {accelerator.num_processes} processes)"
            )
        self.loader = DataLoader(
            self.dataset,
            batch_size=recipe.batch_size,
            shuffle=True,
            drop_last=True,
            num_workers=recipe.num_workers,
            collate_fn=PlipCollator(
                self.tokenizer, model.config.max_text_length, _loader_backbone(model, recipe, accelerator)
            ),
        )
        pretrainer = PlipPretrainer(model)
        optimizer = _optimizer(pretrainer, recipe)
        self.steps_per_epoch = len(self.loader) // accelerator.num_processes
        total_steps = max(1, math.ceil(recipe.epochs * self.steps_per_epoch))
        if recipe.max_steps is not None:
            total_steps = min(total_steps, recipe.max_steps)
        self.settings.save_every = recipe.save_every or self.steps_per_epoch
        self.probe = None
        if self.eval_data is not None and main:
            self.probe = _ZeroShotProbe(
                self.eval_data, self.eval_split, self.label_map, model.image_size, recipe.stain_normalize
            )
        self.generator = (
            torch.Generator()
        )  # ITM negatives: re-seeded every step, so a resumed run draws the same
        self.alpha = model.config.alpha
        # PLIP's recipes round the warm-up share to the nearest step (the assistant's round up).
        return Plan(
            pretrainer, optimizer, self.steps_per_epoch, total_steps, round(recipe.warmup_ratio * total_steps)
        )

    def prepare(self, accelerator, model, optimizer):
        model, optimizer, self.loader = accelerator.prepare(model, optimizer, self.loader)
        return model, optimizer

    def batches(self, epoch: int, start: int, stop: int):
        self.dataset.set_epoch(epoch)
        self.loader.set_epoch(epoch)
        return self.loop.accelerator.skip_first_batches(self.loader, start) if start else self.loader

    def loss(self, model, batch, step: int) -> MicroLoss:
        accelerator = self.loop.accelerator
        self.generator.manual_seed(
            (self.recipe.seed * 1_000_003 + step) * accelerator.num_processes + accelerator.process_index
        )
        # The soft-target weight ramps up over the first epoch (ALBEF), while the momentum model is poor.
        alpha = self.alpha * min(1.0, step / self.steps_per_epoch)
        output = model(**batch, alpha=alpha, generator=self.generator)
        return MicroLoss(
            output.loss,
            sums={
                "loss_itc": output.loss_itc,
                "loss_itm": output.loss_itm,
                "itm_accuracy": output.itm_accuracy,
            },
        )

    def after_step(self, model, record, micro) -> None:
        record["temperature"] = self.loop.accelerator.unwrap_model(model).model.temperature().item()

    def evaluate(self, loop: TrainingLoop, model, final: bool) -> None:
        if self.probe is None:
            return
        online = loop.accelerator.unwrap_model(model).model
        accuracy = self.probe.accuracy(PlipZeroShot(online, self.tokenizer, loop.accelerator.device))
        online.train()
        loop.log.evaluation(loop.global_step, {"zeroshot_accuracy": accuracy})

    def finish(self, loop: TrainingLoop, model) -> dict[str, object]:
        """The model folder, the training curve and the summary (main process); returns the summary."""
        accelerator, out = loop.accelerator, loop.out_dir
        if not accelerator.is_main_process:
            return {}
        _write_model(accelerator.unwrap_model(model).model, self.tokenizer, self.labels, out)
        rows = loop.log.rows
        plot_training_curve(rows, out / CURVE_FILE)
        last = next((r for r in reversed(rows) if "loss" in r), {})
        accuracies = [r["zeroshot_accuracy"] for r in rows if "zeroshot_accuracy" in r]
        summary = {
            "steps": loop.global_step,
            "samples": len(self.dataset),
            "processes": accelerator.num_processes,
            "global_batch": self.recipe.batch_size * accelerator.num_processes,
            "wall_seconds": round(time.time() - self.started, 1),
            "final_loss": last.get("loss"),
            "zeroshot_accuracy": accuracies[-1] if accuracies else None,
        }
        (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2), encoding="utf-8")
        return summary


def train_plip(
    data: str | Path | list,
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
    task = PlipTask(data, recipe, split, label_map, eval_data, eval_split, show_progress)
    return TrainingLoop(task, out, resume, show_progress).run()
