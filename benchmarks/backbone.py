"""What a generic ImageNet backbone holds against a trained PLIP, on the shared dev splits at 1x, 2x and 4x.

    python benchmarks/backbone.py --plip runs/quickstart/plip --corpus runs/quickstart/corpus/clean/kept.jsonl

Three rows per magnification (lung / colon / oral mucosa):

- `PLIP probe`: `pallava plip probe`'s linear probe on the PLIP's image embedding (fitted on each train
  split);
- `backbone probe`: the same probe on the frozen backbone's pooled last feature map;
- `backbone zero-shot`: the frozen backbone with a two-layer projection trained into the PLIP's *frozen*
  text space on the corpus's captions (CLIP loss, same-class pairs positive, datasets sampled equally), then
  PLIP's zero-shot prompts: the zero-shot a PLIP built on that backbone could reach without training its
  image layers. Its training sees each image once, unaugmented.

The higher powers are `benchmarks/magnification.py`'s views (the centre of each dev image enlarged); the
probes are fitted at 1x. Results: `benchmarks/results/backbone.json`; readings in `docs/plip.md`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/backbone.py`: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.common import ROOT, SHIFT_DATASETS, command_line, load_average, machine_info  # noqa: E402
from benchmarks.magnification import magnified_views  # noqa: E402

ZOOMS = (1.0, 2.0, 4.0)
RESULTS = ROOT / "benchmarks" / "results" / "backbone.json"


def load_backbone():
    """PLIP's frozen ImageNet stem (EfficientNet-Lite0, `models/pretrained_stem.py`), ImageNet weights."""
    from pallava.models.presets import tiny_vision_config
    from pallava.models.pretrained_stem import PretrainedStem, load_imagenet_weights

    stem = PretrainedStem("efficientnet-lite0", tiny_vision_config())
    load_imagenet_weights(stem)
    return stem.eval()


@torch.no_grad()
def backbone_features(backbone, images, batch_size: int = 64) -> torch.Tensor:
    """(N, 1280) pooled last feature maps of PIL images (224 px, CLIP-normalised as the tower gets them)."""
    from pallava.processing.image import CLIP_MEAN, CLIP_STD

    mean, std = np.array(CLIP_MEAN, np.float32), np.array(CLIP_STD, np.float32)
    chunks = []
    for start in range(0, len(images), batch_size):
        batch = np.stack(
            [
                np.asarray(image.convert("RGB").resize((224, 224)), np.float32)
                for image in images[start : start + batch_size]
            ]
        )
        pixels = torch.from_numpy((batch / 255.0 - mean) / std).permute(0, 3, 1, 2).float()
        chunks.append(backbone.features(pixels).mean(dim=(2, 3)))  # in bf16 where the CPU computes it
    return torch.cat(chunks)


def align_to_text(
    features: torch.Tensor,
    text_embeds: torch.Tensor,
    classes: list[str],
    groups: list[str],
    temperature: float,
    steps: int = 1500,
    seed: int = 0,
):
    """A two-layer projection of standardised `features` into the frozen text space: CLIP loss against each
    sample's own text embedding, every pair of the same class a positive, groups (datasets) drawn equally.
    Returns `project(features) -> normalised embeddings`."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    mean, std = features.mean(0), features.std(0) + 1e-6
    head = torch.nn.Sequential(
        torch.nn.Linear(features.shape[1], 512),
        torch.nn.GELU(),
        torch.nn.Dropout(0.1),
        torch.nn.Linear(512, text_embeds.shape[1]),
    )
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=0.05)
    class_ids = torch.tensor([sorted(set(classes)).index(c) for c in classes])
    weights = torch.tensor([1.0 / groups.count(g) for g in groups])
    for _ in range(steps):
        batch = torch.multinomial(weights, 128, replacement=True, generator=generator)
        images = F.normalize(head((features[batch] - mean) / std), dim=1)
        positives = (class_ids[batch, None] == class_ids[None, batch]).float()
        targets = positives / positives.sum(1, keepdim=True)
        logits = images @ text_embeds[batch].t() / temperature
        loss = (
            -(targets * F.log_softmax(logits, 1)).sum(1).mean()
            - (targets * F.log_softmax(logits.t(), 1)).sum(1).mean()
        )
        optimizer.zero_grad()
        (loss / 2).backward()
        optimizer.step()
    head.eval()
    return lambda x: F.normalize(head((x - mean) / std), dim=1).detach()


def run(plip_dir: Path, corpus: Path) -> dict:
    from pallava.data.importers.manifest import read_manifest
    from pallava.data.labels import LabelMap
    from pallava.models.plip import PlipZeroShot
    from pallava.models.plip.zeroshot import zeroshot_predictions
    from pallava.processing.loading import load_image
    from pallava.train.plip_probe import cluster_groups, fit_probe

    torch.set_num_threads(min(2, torch.get_num_threads()))
    backbone, zs = load_backbone(), PlipZeroShot.from_pretrained(plip_dir)
    records = [json.loads(line) for line in corpus.read_text(encoding="utf-8").splitlines() if line.strip()]
    started = time.perf_counter()
    corpus_features = backbone_features(backbone, [load_image(r["image"]) for r in records])
    encode_s = time.perf_counter() - started
    project = align_to_text(
        corpus_features,
        zs.encode_texts([r["caption"] for r in records]),
        [r["meta"]["label"] for r in records],
        [r["meta"].get("dataset", "") for r in records],
        zs.model.temperature().item(),
    )
    rows: dict[str, dict[str, dict[str, float]]] = {}
    for dataset in SHIFT_DATASETS:
        manifest = ROOT.parent / "shared" / "data" / dataset / "manifest.csv"
        fit, scored = read_manifest(manifest, "train"), read_manifest(manifest, "dev")
        label_map = LabelMap.resolve(None, {item.label for item in scored})
        fit_images = [load_image(item.path) for item in fit]
        fit_labels, groups = [item.label for item in fit], cluster_groups(fit)  # folds as `plip probe`'s
        plip_probe = fit_probe(zs.encode_images(fit_images).numpy(), fit_labels, groups)[0]
        backbone_probe = fit_probe(backbone_features(backbone, fit_images).numpy(), fit_labels, groups)[0]
        for zoom in ZOOMS:
            views, truth = magnified_views(scored, zoom)
            backbone_views = backbone_features(backbone, views)  # read by its probe and its zero-shot
            predictions = {
                "PLIP probe": plip_probe.predict(zs.encode_images(views).numpy()),
                "backbone probe": backbone_probe.predict(backbone_views.numpy()),
                "backbone zero-shot": zeroshot_predictions(zs, project(backbone_views), label_map)[0],
            }
            for name, predicted in predictions.items():
                rows.setdefault(name, {}).setdefault(dataset, {})[f"x{zoom:g}"] = _accuracy(predicted, truth)
    return {"rows": rows, "corpus_images": len(records), "backbone_encode_s": round(encode_s, 1)}


def _accuracy(predicted, truth) -> float:
    return round(float(np.mean([p == t for p, t in zip(predicted, truth, strict=True)])), 4)


def table(rows: dict) -> str:
    lines = ["| features | " + " | ".join(f"x{z:g}" for z in ZOOMS) + " |", "|---|" + "---|" * len(ZOOMS)]
    for name, by_dataset in rows.items():
        cells = [" / ".join(f"{by_dataset[d][f'x{z:g}']:.3f}" for d in SHIFT_DATASETS) for z in ZOOMS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--plip", type=Path, required=True, help="a trained PLIP folder (its text tower and prompts)"
    )
    parser.add_argument("--corpus", type=Path, required=True, help="caption JSONL the projection learns from")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    started, load = time.perf_counter(), load_average()
    result = run(args.plip, args.corpus)
    result.update(
        command=command_line("backbone.py", sys.argv[1:] if argv is None else argv),
        seconds=round(time.perf_counter() - started, 1),
        load_average_at_start=load,
        machine=machine_info(),
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2), encoding="utf-8")
    print(table(result["rows"]))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
