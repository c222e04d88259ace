"""Stage `slide`: teach a trained assistant to answer about whole slides, on virtual slides with known truth.

Every slide's features are computed once (`slides/features.py`) and cached; a step then costs the
connector over the slides' tiles and the language model over a short answer, so the stage is cheap.
Samples are (slide, question kind) pairs; each epoch draws a new phrasing for every pair. What trains
follows `trainable` (connector and LoRA by default) plus the new tile position embedding, with the
recipe's AdamW groups and warm-up + cosine schedule. With `slide.plip` set, the tiles are also embedded by
PLIP in the same pass and the attention-MIL baseline is trained on the same slides.

The stage is short (minutes), so it has no mid-run checkpoints: a stopped run starts again, reading the
cached features.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch
import yaml
from torch import nn
from tqdm import tqdm

from pallava.inference import PaLlava
from pallava.slides.features import (
    SlideFeatureCache,
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
from pallava.train.config import Recipe
from pallava.train.optim import apply_trainable, build_optimizer, build_scheduler
from pallava.train.threads import apply_cpu_threads

HISTORY = "slide_training.json"


def tiling(recipe: Recipe) -> TilingOptions:
    return TilingOptions(
        mpp=recipe.slide.mpp, tile_size=recipe.slide.tile_size, min_tissue=recipe.slide.min_tissue
    )


def cache_root(recipe: Recipe) -> Path:
    return Path(recipe.feature_cache.dir) if recipe.feature_cache.dir else default_slide_cache_root()


def collate(items: list, processor) -> dict:
    """(features, question, answer) triples -> padded tokens and tiles with a tissue mask."""
    encoded = [
        processor.encode_conversation(
            [{"role": "user", "content": f"<image>\n{q}"}, {"role": "assistant", "content": a}]
        )
        for _, q, a in items
    ]
    batch = processor.pad(encoded)
    longest = max(len(f) for f, _, _ in items)
    first = items[0][0]
    tiles = first.tile_tokens.new_zeros(len(items), longest, *first.tile_tokens.shape[1:])
    positions = torch.zeros(len(items), longest, 2)
    mask = torch.zeros(len(items), longest, dtype=torch.bool)
    for i, (features, _, _) in enumerate(items):
        n = len(features)
        tiles[i, :n], positions[i, :n], mask[i, :n] = features.tile_tokens, features.positions, True
    batch.update(
        global_tokens=torch.stack([f.global_tokens for f, _, _ in items]),
        tile_tokens=tiles,
        positions=positions,
        tile_mask=mask,
    )
    return batch


def _parameter_groups(model, slide: SlideAssistant) -> nn.Module:
    """A module whose parameter names put the position embedding in the connector's optimiser group."""
    holder = nn.Module()
    holder.vision_tower = model.vision_tower
    holder.connector = nn.ModuleList([model.connector, slide.position])
    holder.language_model = model.language_model
    return holder


def train_slide(recipe: Recipe, out_dir: str | Path, progress: bool = True) -> Path:
    """Run stage `slide` into `out_dir`; returns it (a folder `SlideAssistant.from_pretrained` loads)."""
    recipe.validate()
    section, run = recipe.slide, recipe.train
    unknown = set(section.questions) - set(KINDS)
    if unknown or not section.questions:
        raise ValueError(f"slide.questions: unknown {sorted(unknown)}; expected some of {list(KINDS)}")
    out = Path(out_dir)
    if (out / "config.json").is_file():
        raise ValueError(f"{out} already holds a trained model; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False), encoding="utf-8")
    torch.manual_seed(recipe.model.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    apply_cpu_threads(run.cpu_threads, device)
    assistant = PaLlava.from_pretrained(recipe.model.init, device=device)
    model = assistant.model
    if (
        Path(recipe.model.init) / SLIDE_CONFIG
    ).is_file():  # continue a slide model (its position embedding too)
        slide_model = SlideAssistant.from_assistant(assistant, recipe.model.init)
        slide_model.chunk_tiles = section.chunk_tiles
    else:
        slide_model = SlideAssistant(assistant, section.chunk_tiles, section.num_frequencies)
    # The tile-level assistant this line of models started from (retrieve-then-ask asks it).
    origin = slide_model.settings.get("init") or str(Path(recipe.model.init).resolve())
    started = time.perf_counter()

    # Features of every slide, once (cached across runs and shared with evaluation).
    if not isinstance(recipe.data.path, str):
        raise ValueError(
            f"stage slide: data.path must be one folder of virtual slides, got {recipe.data.path!r}"
        )
    slides = list_slides(recipe.data.path)
    options = tiling(recipe)
    plip, plip_id = load_plip(section.plip, device)
    namespace = encoder_namespace(model, assistant.processor, {"dtype": "float16"})
    cache = SlideFeatureCache(cache_root(recipe), namespace)
    truths, features = [], []
    model.eval()
    for path in tqdm(slides, desc="slide features", unit="slide", disable=not progress):
        with open_slide(path) as slide:
            features.append(slide_features(slide, model, assistant.processor, cache, options, plip, plip_id))
        truths.append(load_truth(path))
    feature_seconds = time.perf_counter() - started

    counts = apply_trainable(model, recipe.trainable)
    slide_model.position.requires_grad_(True)
    samples = [(i, kind) for i in range(len(slides)) for kind in section.questions]
    per_epoch = max(1, len(samples) // run.batch_size)
    total_steps = run.max_steps or run.epochs * per_epoch
    holder = _parameter_groups(model, slide_model)
    optimizer = build_optimizer(holder, recipe.optim)
    scheduler = build_scheduler(optimizer, total_steps, recipe.optim)
    trainable = [p for p in holder.parameters() if p.requires_grad]
    print(
        f"slide: {len(slides)} slides, {len(samples)} samples, {total_steps} steps of {run.batch_size}; "
        f"trainable {counts} + position {sum(p.numel() for p in slide_model.position.parameters())}"
    )

    rng = random.Random(run.seed)
    history, order = [], []
    model.train()
    train_started = time.perf_counter()
    bar = tqdm(range(total_steps), desc="train slide", unit="step", disable=not progress)
    for step in bar:
        if len(order) < run.batch_size:
            order += rng.sample(samples, len(samples))
        chosen, order = order[: run.batch_size], order[run.batch_size :]
        items = [(features[i], *training_question(kind, truths[i], rng)) for i, kind in chosen]
        batch = collate(items, assistant.processor)
        need_mass = section.attention_loss > 0
        embeds, mass = slide_model.image_embeddings(
            batch["global_tokens"],
            batch["tile_tokens"],
            batch["positions"],
            batch["tile_mask"],
            need_mass=need_mass,
        )
        summed, tokens = slide_model.loss(batch, embeds)
        loss = summed / max(tokens, 1)
        attention_term = torch.zeros(())
        if need_mass:
            attention_term = attention_loss(mass, [(features[i], truths[i]) for i, _ in chosen])
            loss = loss + section.attention_loss * attention_term
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if recipe.optim.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(trainable, recipe.optim.max_grad_norm)
        optimizer.step()
        scheduler.step()
        history.append(
            {
                "step": step + 1,
                "loss": float(summed.detach()) / max(tokens, 1),
                "attention_loss": float(attention_term.detach()),
            }
        )
        bar.set_postfix(loss=f"{history[-1]['loss']:.3f}")
    train_seconds = time.perf_counter() - train_started
    model.eval()

    extra = {
        "init": origin,
        "tiling": {"mpp": options.mpp, "tile_size": options.tile_size, "min_tissue": options.min_tissue},
        "plip": str(Path(section.plip).resolve()) if section.plip else None,
    }
    slide_model.save_pretrained(out, extra)
    mil_seconds = 0.0
    if plip is not None:
        mil_started = time.perf_counter()
        mil, classes = train_mil(
            [f.plip for f in features], [slide_label(t) for t in truths], section.mil_epochs, seed=run.seed
        )
        save_mil(mil, classes, out, {"plip": extra["plip"]})
        mil_seconds = time.perf_counter() - mil_started
    tail = history[-max(1, len(history) // 10) :]
    summary = {
        "stage": "slide",
        "slides": len(slides),
        "samples": len(samples),
        "steps": total_steps,
        "batch_size": run.batch_size,
        "final_loss": sum(r["loss"] for r in tail) / len(tail),
        "seconds": {
            "features": round(feature_seconds, 2),
            "train": round(train_seconds, 2),
            "attention_mil": round(mil_seconds, 2),
        },
        "history": history,
    }
    (out / HISTORY).write_text(json.dumps(summary, indent=1) + "\n")
    return out


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
