"""Training throughput (samples/s) of one optimiser step: PLIP pre-training, and the assistant's step with
pixel inputs vs with the frozen-vision feature cache.

The PLIP step is `PlipPretrainer` (ITC + ITM; at paper shapes with momentum encoders and queues) with
AdamW and gradient clipping; its vision tower trains, so no feature cache applies. The assistant step
is the two-stage trainer's: batches from `pallava.train.data.Collator` (which decodes and tiles the
images, or reads their cached crop features), token-mean cross-entropy over the answers, backward,
clipping, AdamW on the connector + LoRA (the paper's recipe). Pixel and cached steps alternate.
"""

from __future__ import annotations

import csv
import io
import tempfile
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from benchmarks.common import choose_threads, median, section_main, timed
from benchmarks.images import SHARED_DATA
from benchmarks.systems import REGIMES, Regime, build_fast, random_init_
from pallava.models.modeling_pa_llava import PaLlavaForConditionalGeneration
from pallava.models.presets import make_processor
from pallava.processing.image import normalize_to_tensor
from pallava.processing.loading import load_image
from pallava.processing.processor import CROP_FEATURES, IGNORE_INDEX, MODEL_INPUT_NAMES
from pallava.processing.tokenizer import IMAGE, build_tiny_tokenizer
from pallava.train.data import Collator, Sample
from pallava.train.feature_cache import FeatureCache, image_key, namespace_for

StepHook = Callable[[float], None]  # gets one training step's seconds

CAPTIONS = {
    "lung_aca": "Lung adenocarcinoma.",
    "lung_n": "Benign lung tissue.",
    "lung_scc": "Lung squamous cell carcinoma.",
}
LORA = {
    "tiny": {"r": 16, "alpha": 32, "dropout": 0.0},
    "paper-proportioned": {"r": 128, "alpha": 256, "dropout": 0.05},
    "paper": {"r": 128, "alpha": 256, "dropout": 0.05},
}
PLIP_PRESET = {"tiny": "tiny", "paper-proportioned": "paper", "paper": "paper"}
MODEL_INPUTS = (*MODEL_INPUT_NAMES, CROP_FEATURES)


def training_samples(count: int) -> list[Sample]:
    """`count` captioned LC25000 training tiles (encoded bytes), or noise PNGs without the shared data."""
    manifest = SHARED_DATA / "lc25000-lung" / "manifest.csv"
    if manifest.is_file():
        with manifest.open(newline="") as handle:
            rows = [row for row in csv.DictReader(handle) if row["split"] == "train"]
        rows = rows[:: max(1, len(rows) // count)][:count]  # spread over the classes
        items = [((manifest.parent / row["path"]).read_bytes(), CAPTIONS[row["label"]]) for row in rows]
    else:
        rng = np.random.default_rng(0)
        items = []
        for i in range(count):
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)).save(buffer, "PNG")
            items.append((buffer.getvalue(), list(CAPTIONS.values())[i % 3]))
    if len(items) < count:
        raise ValueError(f"{manifest}: need {count} training images, found {len(items)}")
    return [
        Sample(
            id=f"bench-{i}",
            image_bytes=data,
            conversation=[
                {"from": "human", "value": f"{IMAGE}\nDescribe the image."},
                {"from": "gpt", "value": text},
            ],
        )
        for i, (data, text) in enumerate(items)
    ]


def plip_step(
    regime: Regime, batch: int, steps: int, progress: bool, after_step: StepHook | None = None
) -> dict:
    """samples/s of PLIP pre-training steps on real tiles (decoded once, as the recipe's image cache does).

    `after_step` gets each step's seconds (a `ThreadGovernor`'s `step_done`, as the training loop calls it).
    """
    from pallava.models.plip import build_plip
    from pallava.models.plip.pretraining import PlipPretrainer

    preset = PLIP_PRESET[regime.name]
    model, tokenizer = build_plip(preset)
    # Weights and momentum queues in the regime's dtype throughout, like the assistant step here (the recipe's
    # fp32 weights under bf16 autocast do the same matrix work in bf16).
    trainer = PlipPretrainer(model).to(regime.device, regime.dtype).train()
    params = [p for p in trainer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)  # fused, as the trainers build it
    samples = training_samples(batch * (steps + 1))
    size = model.config.vision_config.image_size
    pixels = torch.stack([normalize_to_tensor(load_image(s.image_bytes), size) for s in samples])
    pixels = pixels.to(regime.device, regime.dtype)
    captions = [s.conversation[1]["value"] for s in samples]
    tokens = tokenizer(
        captions, padding=True, truncation=True, max_length=model.config.max_text_length, return_tensors="pt"
    ).to(regime.device)

    def step(index: int) -> None:
        part = slice(index * batch, (index + 1) * batch)
        keys = torch.arange(part.start, part.stop, device=regime.device)
        out = trainer(
            pixels[part],
            tokens["input_ids"][part],
            tokens["attention_mask"][part],
            torch.stack([keys, keys + 1_000_000], dim=1),
        )
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(0)  # warm-up
    times = []
    for i in tqdm(range(1, steps + 1), desc=f"PLIP {preset}", disable=not progress):
        times.append(timed(lambda i=i: step(i), regime.device))
        if after_step is not None:
            after_step(times[-1])
    return {
        "preset": preset,
        "batch": batch,
        "steps": steps,
        "dtype": str(regime.dtype).replace("torch.", ""),
        "step_s": round(median(times), 4),
        "mean_step_s": round(sum(times) / len(times), 4),
        "samples_per_s": round(batch / median(times), 3),
    }


def assistant_model(regime: Regime) -> tuple[PaLlavaForConditionalGeneration, object]:
    tokenizer = build_tiny_tokenizer()
    config = regime.config(tokenizer.convert_tokens_to_ids(IMAGE))
    config.lora = {
        **LORA[regime.name],
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    }
    model = build_fast(lambda: PaLlavaForConditionalGeneration(config), regime.dtype, regime.device)
    model.base_language_model.tie_weights()
    random_init_(model, seed=0)
    model.set_trainable()  # connector + LoRA
    return model.train(), make_processor(config, tokenizer)


def assistant_steps(
    regime: Regime,
    batch: int,
    steps: int,
    progress: bool,
    variants: tuple[str, ...] = ("pixels", "cached"),
    after_step: StepHook | None = None,
) -> dict:
    """samples/s of the assistant's step from pixels and from cached crop features, alternating (or only
    the `variants` named); `after_step` gets each step's seconds, as in `plip_step`."""
    model, processor = assistant_model(regime)
    samples = training_samples(batch * (steps + 1))
    keys = [image_key(s.image_bytes) for s in samples]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)  # fused, as the trainers build it
    dtype_name = str(regime.dtype).replace("torch.", "")
    with tempfile.TemporaryDirectory(prefix="pallava-bench-cache-") as root:
        namespace = namespace_for(
            model.vision_tower, model.config.vision_feature_layer, processor.image_processor, dtype_name
        )
        cache = FeatureCache(root, namespace)
        model.eval()
        sources = {key: sample.image_bytes for key, sample in zip(keys, samples, strict=True)}
        cache.build(
            model.encode_crops,
            processor.image_processor,
            sources,
            dtype=regime.dtype,
            progress=False,
            device=regime.device,
        )
        model.train()
        collators = {
            "pixels": Collator(processor, samples),
            "cached": Collator(processor, samples, cache, keys),
        }

        def step(variant: str, index: int) -> None:
            data = collators[variant](range(index * batch, (index + 1) * batch))
            inputs = {k: data[k].to(regime.device) for k in MODEL_INPUTS if k in data}
            logits = model(**inputs, use_cache=False).logits[:, :-1].float()
            targets = data["labels"][:, 1:].to(regime.device)
            loss = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX
            )
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        for variant in variants:  # warm-up
            step(variant, 0)
        times: dict[str, list[float]] = {variant: [] for variant in variants}
        for index in tqdm(range(1, steps + 1), desc=f"assistant {regime.name}", disable=not progress):
            for variant in variants if index % 2 else reversed(variants):
                times[variant].append(timed(lambda v=variant, i=index: step(v, i), regime.device))
                if after_step is not None:
                    after_step(times[variant][-1])
    rates = {variant: batch / median(t) for variant, t in times.items()}
    crops = processor.image_processor.tile(samples[0].image_bytes).pixel_values.shape[0]
    result = {
        "batch": batch,
        "steps": steps,
        "lora": LORA[regime.name],
        "crops_per_image": int(crops),
        "trainable_m": round(sum(p.numel() for p in params) / 1e6, 2),
        "step_s": {variant: round(median(t), 4) for variant, t in times.items()},
        "mean_step_s": {variant: round(sum(t) / len(t), 4) for variant, t in times.items()},
        "samples_per_s": {variant: round(rate, 3) for variant, rate in rates.items()},
    }
    if {"pixels", "cached"} <= set(rates):
        result["cache_speedup"] = round(rates["cached"] / rates["pixels"], 3)
    return result


def run(regime_name: str, quick: bool = False, threads: int | None = None, progress: bool = True) -> dict:
    regime = REGIMES[regime_name]
    thread_info = choose_threads(threads, regime.dtype)
    big = regime.name != "tiny"
    if regime.device == "cuda":  # the paper's per-GPU assistant batch (6); a PLIP batch that fills a GPU
        steps, plip_batch, assistant_batch = (2 if quick else 6), 64, 6
    else:
        steps = 2 if quick or big else 4
        plip_batch, assistant_batch = (8, 2) if big else (8, 4) if quick else (16, 8)
    return {
        "regime": regime.name,
        "dtype": str(regime.dtype).replace("torch.", ""),
        "threads": thread_info,
        "plip": plip_step(regime, batch=plip_batch, steps=steps, progress=progress),
        "assistant": assistant_steps(regime, batch=assistant_batch, steps=steps, progress=progress),
    }


def main(argv: list[str] | None = None) -> int:
    return section_main(argv, __doc__.splitlines()[0], run)


if __name__ == "__main__":
    raise SystemExit(main())
