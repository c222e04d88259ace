"""Stage `slide`: teach a trained assistant to answer about whole slides, on virtual slides with known truth.

Every slide's features are computed once (`slides/features.py`) and cached; a step then costs the
connector over the slides' tiles and the language model over a short answer, so the stage is cheap.
Samples are (slide, question kind) pairs; each epoch draws a new phrasing for every pair. What trains
follows `trainable` (connector and LoRA by default) plus the new tile position embedding, with the
recipe's AdamW groups and warm-up + cosine schedule. With `slide.plip` set, the tiles are also embedded by
PLIP in the same pass and the attention-MIL baseline is trained on the same slides.

The stage is a task of the one training loop (`train.loop`): checkpoints every `checkpoint.every` steps
(trainable weights only), `--resume auto` continues a stopped run, and the run log is `metrics.jsonl` as for
the other stages; `slide_training.json` sums the run up.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from pallava.inference import PaLlava
from pallava.slides.evidence import SlideEvidence
from pallava.slides.features import (
    SlideFeatureCache,
    TileMemo,
    default_slide_cache_root,
    encoder_namespace,
    load_plip,
    slide_features,
    tile_truth,
)
from pallava.slides.mapping import TilingOptions
from pallava.slides.mil import save_mil, slide_label, train_mil
from pallava.slides.model import SLIDE_CONFIG, SlideAssistant
from pallava.slides.questions import KINDS, training_question
from pallava.slides.reader import open_slide
from pallava.slides.virtual import list_slides, load_truth
from pallava.train.config import Recipe, with_defaults
from pallava.train.loop import LoopSettings, MicroLoss, Plan, Task, TrainingLoop
from pallava.train.optim import apply_trainable, assistant_warmup_steps, build_optimizer
from pallava.train.threads import encoding_threads

HISTORY = "slide_training.json"


def tiling(recipe: Recipe) -> TilingOptions:
    return TilingOptions(
        mpp=recipe.slide.mpp, tile_size=recipe.slide.tile_size, min_tissue=recipe.slide.min_tissue
    )


def cache_root(recipe: Recipe) -> Path:
    return Path(recipe.feature_cache.dir) if recipe.feature_cache.dir else default_slide_cache_root()


def collate(slides: list, texts: list[tuple[int, str, str]], processor) -> dict:
    """Each distinct slide's tiles once (padded, with a tissue mask) and the (owner, question, answer) texts
    as padded tokens; `owner` maps every text to its slide's row, so the connector runs once per slide."""
    encoded = [
        processor.encode_conversation(
            [{"role": "user", "content": f"<image>\n{q}"}, {"role": "assistant", "content": a}]
        )
        for _, q, a in texts
    ]
    batch = processor.pad(encoded)
    longest = max(len(f) for f in slides)
    first = slides[0]
    tiles = first.tile_tokens.new_zeros(len(slides), longest, *first.tile_tokens.shape[1:])
    summaries = first.tile_summaries.new_zeros(len(slides), longest, first.tile_summaries.shape[1])
    positions = torch.zeros(len(slides), longest, 2)
    mask = torch.zeros(len(slides), longest, dtype=torch.bool)
    for i, features in enumerate(slides):
        n = len(features)
        tiles[i, :n], positions[i, :n], mask[i, :n] = features.tile_tokens, features.positions, True
        summaries[i, :n] = features.tile_summaries
    batch.update(
        global_tokens=torch.stack([f.global_tokens for f in slides]),
        tile_tokens=tiles,
        tile_summaries=summaries,
        positions=positions,
        tile_mask=mask,
        owner=torch.tensor([owner for owner, _, _ in texts]),
    )
    return batch


def _parameter_groups(model, slide: SlideAssistant) -> nn.Module:
    """A module whose parameter names put the position embedding in the connector's optimiser group."""
    holder = nn.Module()
    holder.vision_tower = model.vision_tower
    holder.connector = nn.ModuleList(
        [model.connector, slide.position, *([slide.evidence] if slide.evidence is not None else [])]
    )
    holder.language_model = model.language_model
    return holder


class SlideTask(Task):
    """Stage slide: the connector (with the tile position embedding) and LoRA over cached slide features."""

    def __init__(self, recipe: Recipe, progress: bool) -> None:
        recipe.validate()
        section, run = recipe.slide, recipe.train
        unknown = (set(section.questions) | set(section.question_weights)) - set(KINDS)
        if unknown or not section.questions:
            raise ValueError(
                f"slide.questions / slide.question_weights: unknown {sorted(unknown)}; "
                f"expected some of {list(KINDS)}"
            )
        if not isinstance(recipe.data.path, str):
            raise ValueError(
                f"stage slide: data.path must be one folder of virtual slides, got {recipe.data.path!r}"
            )
        self.recipe, self.progress = recipe, progress
        self.settings = LoopSettings(
            name="train slide",
            recipe=recipe.to_dict(),
            batch_size=run.batch_size,
            max_grad_norm=recipe.optim.max_grad_norm,
            min_lr_ratio=recipe.optim.min_lr_ratio,
            mixed_precision="no",  # features are cached in float16 and the steps are short: fp32 steps
            cpu_threads=run.cpu_threads,
            save_every=recipe.checkpoint.every,
            keep_last=recipe.checkpoint.keep_last,
            log_every=recipe.logging.every,
            tensorboard=recipe.logging.tensorboard,
            trainable_only_checkpoints=True,
            complete_saved=with_defaults,
            postfix=("attention_loss",),
        )
        self.stream: Iterator[tuple[list, list]] | None = None

    def setup(self, loop: TrainingLoop) -> Plan:
        recipe, section, run = self.recipe, self.recipe.slide, self.recipe.train
        self.loop, device = loop, loop.accelerator.device
        torch.manual_seed(recipe.model.seed)
        assistant = PaLlava.from_pretrained(recipe.model.init, device=str(device))
        model = assistant.model
        if (Path(recipe.model.init) / SLIDE_CONFIG).is_file():  # continue a slide model (its position too)
            slide_model = SlideAssistant.from_assistant(assistant, recipe.model.init)
            slide_model.chunk_tiles = section.chunk_tiles
        else:
            slide_model = SlideAssistant(assistant, section.chunk_tiles, section.num_frequencies)
        self.assistant, self.slide_model = assistant, slide_model
        # The tile-level assistant this line of models started from (retrieve-then-ask asks it).
        self.origin = slide_model.settings.get("init") or str(Path(recipe.model.init).resolve())
        started = time.perf_counter()

        # Features of every slide, once (cached across runs and shared with evaluation).
        slides = list_slides(recipe.data.path)
        self.options = tiling(recipe)
        self.plip, plip_id = load_plip(section.plip, str(device))
        namespace = encoder_namespace(model, assistant.processor, {"dtype": "float16"})
        cache = SlideFeatureCache(cache_root(recipe), namespace)
        self.truths, self.features = [], []
        model.eval()
        memo = TileMemo()  # virtual slides repeat their source tiles: each distinct tile is encoded once
        with encoding_threads(device, loop.accelerator.num_processes):  # large matrices: every core
            for path in tqdm(slides, desc="slide features", unit="slide", disable=not loop.show_progress):
                with open_slide(path) as slide:
                    found = slide_features(
                        slide, model, assistant.processor, cache, self.options, self.plip, plip_id, memo=memo
                    )
                self.features.append(found)
                self.truths.append(load_truth(path))
        self.feature_seconds = time.perf_counter() - started
        self.tiles = {"encoded": len(memo), "repeated": memo.hits}  # both 0 when every slide was cached

        if section.evidence and slide_model.evidence is None:  # fit the slide evidence's MIL, then freeze it
            slide_model.evidence = SlideEvidence.fit(
                [f.tile_summaries for f in self.features],
                [slide_label(t) for t in self.truths],
                model.config.text_config.hidden_size,
                section.evidence_epochs,
                seed=run.seed,
            ).to(device)
        counts = apply_trainable(model, recipe.trainable)
        slide_model.position.requires_grad_(True)  # the evidence's maps train too; its MIL is frozen
        self.samples = (
            list(range(len(slides)))
            if section.every_question
            else [(i, kind) for i in range(len(slides)) for kind in section.questions]
        )
        per_epoch = max(1, len(self.samples) // run.batch_size)
        total_steps = run.max_steps or run.epochs * per_epoch
        self.per_epoch = per_epoch
        holder = _parameter_groups(model, slide_model)
        optimizer = build_optimizer(holder, recipe.optim)
        loop.accelerator.print(
            f"slide: {len(slides)} slides, {len(self.samples)} samples, {total_steps} steps of "
            f"{run.batch_size}; trainable {counts} + position "
            f"{sum(p.numel() for p in slide_model.position.parameters())}"
        )
        return Plan(
            holder, optimizer, per_epoch, total_steps, assistant_warmup_steps(recipe.optim, total_steps)
        )

    def _questions(self) -> Iterator[tuple[list, list]]:
        """Every step's (slide, kind) pairs and their questions: the samples in a new random order each pass,
        a new phrasing each time (one seeded stream, so a resumed run replays it to its step). With
        `slide.every_question` a sample is a slide and each of its slides is asked every kind."""
        run, kinds = self.recipe.train, self.recipe.slide.questions
        rng = random.Random(run.seed)
        order: list = []
        while True:
            if len(order) < run.batch_size:
                order += rng.sample(self.samples, len(self.samples))
            chosen, order = order[: run.batch_size], order[run.batch_size :]
            pairs = (
                [(i, kind) for i in chosen for kind in kinds] if self.recipe.slide.every_question else chosen
            )
            yield pairs, [(i, *training_question(kind, self.truths[i], rng)) for i, kind in pairs]

    def batches(self, epoch: int, start: int, stop: int):
        if self.stream is None:
            self.stream = self._questions()
            for _ in range(epoch * self.per_epoch + start):  # a resumed run: skip what was trained
                next(self.stream)
        for _ in range(start, stop):
            pairs, questions = next(self.stream)
            slides = list(dict.fromkeys(i for i, _, _ in questions))  # each slide's connector pass once
            texts = [(slides.index(i), question, answer) for i, question, answer in questions]
            tensors = collate([self.features[i] for i in slides], texts, self.assistant.processor)
            yield (slides, pairs), tensors

    def _answer_weights(self, pairs: list, tensors: dict[str, Any]) -> torch.Tensor | None:
        """Per answer: its kind's `slide.question_weights`, and with `train.loss_average: sample` divided by
        its token count, so that each answer's mean (not each token) is weighted."""
        weights = self.recipe.slide.question_weights
        per_sample = self.recipe.train.loss_average == "sample"
        if not weights and not per_sample:
            return None
        kinds = torch.tensor([float(weights.get(kind, 1.0)) for _, kind in pairs])
        if per_sample:
            kinds = kinds / (tensors["labels"][:, 1:] != -100).sum(dim=1).clamp(min=1)
        return kinds

    def loss(self, model, batch: tuple[tuple[list, list], dict[str, Any]], step: int) -> MicroLoss:
        (slides, pairs), tensors = batch
        need_mass = self.recipe.slide.attention_loss > 0
        embeds, mass = self.slide_model.batch_embeddings(tensors, need_mass)
        summed, tokens = self.slide_model.loss(
            tensors, embeds[tensors["owner"].to(embeds.device)], self._answer_weights(pairs, tensors)
        )
        loss = summed / max(tokens, 1)
        attention_term = torch.zeros(())
        if need_mass:
            attention_term = attention_loss(mass, [(self.features[i], self.truths[i]) for i in slides])
            loss = loss + self.recipe.slide.attention_loss * attention_term
        answer_loss = float(summed.detach()) / max(tokens, 1)
        return MicroLoss(
            loss,
            samples=len(pairs),
            sums={"answer_loss": answer_loss, "attention_loss": attention_term.detach()},
        )

    def finish(self, loop: TrainingLoop, model) -> Path:
        """The slide model, the attention-MIL baseline (with `slide.plip`) and `slide_training.json`."""
        out, run = loop.out_dir, self.recipe.train
        if not loop.accelerator.is_main_process:
            return out
        model.eval()
        extra = {
            "init": self.origin,
            "tiling": {
                "mpp": self.options.mpp,
                "tile_size": self.options.tile_size,
                "min_tissue": self.options.min_tissue,
            },
            "plip": str(Path(self.recipe.slide.plip).resolve()) if self.recipe.slide.plip else None,
        }
        self.slide_model.save_pretrained(out, extra)
        mil_seconds = 0.0
        if self.plip is not None:
            mil_started = time.perf_counter()
            labels = [slide_label(t) for t in self.truths]
            mil, classes = train_mil(
                [f.plip for f in self.features], labels, self.recipe.slide.mil_epochs, seed=run.seed
            )
            save_mil(mil, classes, out, {"plip": extra["plip"]})
            mil_seconds = time.perf_counter() - mil_started
        history = [
            {"step": r["step"], "loss": r["answer_loss"], "attention_loss": r["attention_loss"]}
            for r in loop.log.rows
        ]
        tail = history[-max(1, len(history) // 10) :]
        summary = {
            "stage": "slide",
            "slides": len(self.features),
            "samples": len(self.samples),
            "steps": loop.total_steps,
            "batch_size": run.batch_size,
            "final_loss": sum(r["loss"] for r in tail) / len(tail),
            "seconds": {
                "features": round(self.feature_seconds, 2),
                "train": round(loop.timings["train_s"], 2),
                "attention_mil": round(mil_seconds, 2),
            },
            "tiles": self.tiles,
            "history": history,
        }
        (out / HISTORY).write_text(json.dumps(summary, indent=1) + "\n")
        return out


def train_slide(recipe: Recipe, out_dir: str | Path, progress: bool = True, resume: bool = True) -> Path:
    """Run stage `slide` into `out_dir`; returns it (a folder `SlideAssistant.from_pretrained` loads)."""
    task = SlideTask(recipe, progress)
    if (Path(out_dir) / "config.json").is_file():
        raise ValueError(f"{out_dir} already holds a trained model; choose another --out")
    return TrainingLoop(task, out_dir, resume, progress).run()


def attention_loss(mass: torch.Tensor, slides: list) -> torch.Tensor:
    """Mean over the batch's tumour slides of -log(attention mass on its tumour tiles)."""
    terms = []
    for row, (features, truth) in enumerate(slides):
        if truth["tumour_present"]:
            tumour = torch.from_numpy(tile_truth(features, truth)).bool()
            if tumour.any():
                terms.append(
                    -torch.log(mass[row, : len(features)][tumour.to(mass.device)].sum().clamp(min=1e-6))
                )
    return torch.stack(terms).mean() if terms else mass.new_zeros(())
