"""`pallava eval slides`: the slide model and two baselines on virtual slides with known truth.

Per slide, the slide model answers the four evaluation questions (presence, diagnosis, organ, location)
from one connector pass, and its cross-attention is the heat map. With PLIP (and the attention-MIL saved
by the slide stage) the same slides also go through
  - attention-MIL over the cached PLIP tile embeddings (class -> presence, type, organ; attention = heat map);
  - retrieve-then-ask: the top-k tiles PLIP finds for "carcinoma", each asked "What is the diagnosis?" by the
    tile-level assistant the slide model started from (similarity = heat map).
Metrics: tumour-present, tumour-type (tumour slides), organ and location (tumour slides) accuracy; pointing
game (the heat map's peak tile is tumour; tumour slides) and tile-level AUROC of the heat map against the
per-tile truth (tumour slides), each with a 95% bootstrap interval over slides. Seconds and peak memory
(resident set size while answering) are recorded per slide against its tissue tiles; slides run from the
fewest tiles to the most, so each peak reflects its own slide and not a bigger one before it.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import psutil
import torch
from sklearn.metrics import roc_auc_score
from tqdm import tqdm

from pallava.data.labels import LabelMap
from pallava.eval.metrics import bootstrap_ci
from pallava.slides.ask import Region, read_region_for_assistant
from pallava.slides.features import (
    SlideFeatureCache,
    TileMemo,
    default_slide_cache_root,
    encoder_namespace,
    load_plip,
    slide_features,
    tile_truth,
)
from pallava.slides.mil import load_mil
from pallava.slides.model import SlideAssistant
from pallava.slides.questions import EVAL_QUESTIONS, reference, score
from pallava.slides.reader import open_slide
from pallava.slides.virtual import QUADRANTS, is_benign, list_slides, load_truth, quadrant_of, tissue_centre
from pallava.slides.whole import tiling_of, write_attention

METRICS = ("tumour_present", "tumour_type", "organ", "location", "pointing_game", "tile_auroc")
RETRIEVAL_QUERY = "an H&E image of carcinoma."


class PeakMemory:
    """Peak resident set size of this process while the block runs (sampled every 5 ms)."""

    def __enter__(self) -> PeakMemory:
        self._process, self.peak, self._stop = psutil.Process(), 0, threading.Event()
        self.peak = self._process.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)


def tile_quadrant(features, index: int, truth: dict) -> str:
    """Quadrant of a grid tile relative to the centre of the slide's tissue."""
    tissue = np.zeros((truth["grid"]["rows"], truth["grid"]["cols"]), bool)
    for t in truth["tiles"]:
        tissue[t["row"], t["col"]] = True
    tile, side = features.grid.tiles[index], truth["tile_size"]
    return QUADRANTS[
        quadrant_of((tile.y + tile.h / 2) / side, (tile.x + tile.w / 2) / side, tissue_centre(tissue))
    ]


def localisation(heat: np.ndarray, truth_tiles: np.ndarray) -> dict:
    """Pointing game hit and tile AUROC of one heat map (None when undefined: no tumour, or only tumour)."""
    if not truth_tiles.any():
        return {"pointing_game": None, "tile_auroc": None}
    auroc = float(roc_auc_score(truth_tiles, heat)) if not truth_tiles.all() else None
    return {"pointing_game": bool(truth_tiles[int(np.argmax(heat))]), "tile_auroc": auroc}


def _label_answers(label: str | None, label_map: LabelMap, truth: dict) -> dict:
    """Correctness of a predicted slide label (baselines): presence, type, organ."""
    present = label is not None and not is_benign(label_map[label])
    record = {
        "tumour_present": present == truth["tumour_present"],
        "organ": label is not None and label_map[label].organ == truth["organ"],
    }
    if truth["tumour_present"]:
        record["tumour_type"] = label == truth["tumour_label"]
    return record


def _slide_model_record(slide_model, slide, features, truth, tumour_tiles, max_new_tokens) -> dict:
    with PeakMemory() as memory:
        started = time.perf_counter()
        with torch.inference_mode():
            embeds, mass = slide_model.features_embeddings(features)
            answers = {
                kind: slide_model.answer(embeds, q, max_new_tokens) for kind, q in EVAL_QUESTIONS.items()
            }
        seconds = time.perf_counter() - started
    heat = mass[0].float().cpu().numpy()
    record = {
        "answers": answers,
        "references": {k: reference(k, truth) for k in EVAL_QUESTIONS},
        "tumour_present": score("presence", answers["presence"], truth),
        "organ": score("organ", answers["organ"], truth),
        "seconds": seconds,
        "peak_rss": memory.peak,
    }
    if truth["tumour_present"]:
        record["tumour_type"] = score("diagnosis", answers["diagnosis"], truth)
        record["location"] = score("location", answers["location"], truth)
    record.update(localisation(heat, tumour_tiles))
    return record, heat


def _mil_record(mil, features, truth, tumour_tiles, label_map) -> dict:
    model, classes, _ = mil
    with torch.no_grad():
        logits, attention = model(features.plip.float())
    label = classes[int(logits.argmax())]
    record = {"label": label, **_label_answers(label if label in label_map else None, label_map, truth)}
    heat = attention.numpy()
    if truth["tumour_present"]:
        record["location"] = [tile_quadrant(features, int(np.argmax(heat)), truth)] == truth["location"]
    return record | localisation(heat, tumour_tiles)


def _retrieval_record(assistant, plip_query, slide, features, truth, tumour_tiles, label_map, top_k) -> dict:
    similarity = (features.plip.float() @ plip_query).numpy()
    top = np.argsort(-similarity, kind="stable")[:top_k]
    crops = [
        read_region_for_assistant(slide, Region(*features.grid.clipped_box(features.grid.tiles[i])))
        for i in top
    ]
    answers = assistant.ask_batch(crops, ["What is the diagnosis?"] * len(crops), max_new_tokens=24)
    labels = [label_map.label_for(a) for a in answers]
    tumours = [lab for lab in labels if lab is not None and not is_benign(label_map[lab])]
    mapped = [lab for lab in labels if lab is not None]
    label = Counter(tumours).most_common(1)[0][0] if tumours else (mapped[0] if mapped else None)
    record = {"answers": answers, "label": label, **_label_answers(label, label_map, truth)}
    if truth["tumour_present"]:
        record["location"] = (
            bool(tumours) and [tile_quadrant(features, int(top[0]), truth)] == truth["location"]
        )
    return record | localisation(similarity, tumour_tiles)


def summarise(records: list[dict], n_resamples: int, seed: int) -> dict:
    """Each metric's mean over the slides where it is defined, with n and a 95% bootstrap interval."""
    summary = {}
    for metric in METRICS:
        values = [float(r[metric]) for r in records if r.get(metric) is not None]
        summary[metric] = {
            "value": float(np.mean(values)) if values else None,
            "n": len(values),
            "ci95": bootstrap_ci(values, n_resamples, seed),
        }
    return summary


def evaluate_slides(
    model_dir: str | Path,
    slides_dir: str | Path,
    out: str | Path,
    plip_dir: str | None = None,
    cache_dir: str | Path | None = None,
    limit: int | None = None,
    n_resamples: int = 1000,
    seed: int = 0,
    max_new_tokens: int = 32,
    top_k: int = 3,
    heatmaps: int = 4,
    progress: bool = True,
) -> dict:
    """Evaluate; writes report.json/.md, predictions.jsonl, scaling.png and a few heat maps into `out`."""
    from pallava.inference import PaLlava

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    slide_model = SlideAssistant.from_pretrained(model_dir)
    if not slide_model.settings:
        raise ValueError(
            f"{model_dir}: not a slide model (no slide_config.json); "
            "train one with `pallava train --stage slide`"
        )
    paths = list_slides(slides_dir)
    truths = {p: load_truth(p) for p in paths}
    paths = sorted(paths, key=lambda p: (truths[p]["tissue_tiles"], p.name))[: limit or None]
    plip_dir = plip_dir or slide_model.settings.get("plip")
    plip, plip_id = load_plip(plip_dir)
    mil = load_mil(model_dir) if plip is not None else None
    init = slide_model.settings.get("init")
    assistant = PaLlava.from_pretrained(init) if plip is not None and init and Path(init).is_dir() else None
    query = plip.encode_texts([RETRIEVAL_QUERY])[0] if plip is not None else None
    root = Path(cache_dir) if cache_dir else default_slide_cache_root()
    cache = SlideFeatureCache(
        root, encoder_namespace(slide_model.model, slide_model.assistant.processor, {"dtype": "float16"})
    )
    options = tiling_of(slide_model)
    records = {"slide_model": [], "attention_mil": [], "retrieve_then_ask": []}
    rows, drawn, memo = [], 0, TileMemo()
    for path in tqdm(paths, desc="slides", unit="slide", disable=not progress):
        truth = truths[path]
        label_map = LabelMap.from_dict(truth["label_map"])
        with open_slide(path) as slide:
            started = time.perf_counter()
            features = slide_features(
                slide,
                slide_model.model,
                slide_model.assistant.processor,
                cache,
                options,
                plip,
                plip_id,
                memo=memo,
            )
            feature_seconds = time.perf_counter() - started
            tumour_tiles = tile_truth(features, truth)
            record, heat = _slide_model_record(
                slide_model, slide, features, truth, tumour_tiles, max_new_tokens
            )
            records["slide_model"].append(record)
            if truth["tumour_present"] and drawn < heatmaps:
                write_attention(
                    slide,
                    features,
                    heat,
                    out / "heatmaps" / path.stem,
                    f"{path.stem}: {truth['tumour_class']}",
                )
                drawn += 1
            if mil is not None:
                records["attention_mil"].append(_mil_record(mil, features, truth, tumour_tiles, label_map))
            if assistant is not None:
                records["retrieve_then_ask"].append(
                    _retrieval_record(
                        assistant, query, slide, features, truth, tumour_tiles, label_map, top_k
                    )
                )
        rows.append(
            {
                "slide": path.name,
                "tissue_tiles": len(features),
                "feature_seconds": feature_seconds,
                **{name: recs[-1] for name, recs in records.items() if recs},
            }
        )
    with (out / "predictions.jsonl").open("w") as handle:
        for row in rows:
            handle.write(json.dumps(row, default=_jsonable) + "\n")
    report = {
        "model": str(model_dir),
        "slides": str(slides_dir),
        "n_slides": len(paths),
        "tumour_slides": sum(truths[p]["tumour_present"] for p in paths),
        "questions": EVAL_QUESTIONS,
        "methods": {name: summarise(recs, n_resamples, seed) for name, recs in records.items() if recs},
        "scaling": [
            {
                "tissue_tiles": r["tissue_tiles"],
                "seconds": r["slide_model"]["seconds"],
                "peak_rss_mib": r["slide_model"]["peak_rss"] / 2**20,
                "feature_seconds": r["feature_seconds"],
            }
            for r in rows
        ],
    }
    from pallava.slides.report import write_slide_report

    write_slide_report(report, out)
    return report


def _jsonable(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
