"""`slide map` at encoder speed: tissue tiles per second of the whole command (reading, tissue detection,
tiling, encoding, classification, writing) against PLIP's encoder alone on the same tiles.

    python -m benchmarks.slide_map --json-out slides.json [--quick]

Slides: the shared CMU-1 region and a virtual slide of at least 1,000 tissue tiles built from LC25000 lung
tiles (`pallava data build --kind virtual-slides`). Encoders: the tiny PLIP preset on both, the paper's
ViT-B/16 on both (a few tiles per second on a CPU, so one round on the virtual slide; random weights: speed
does not depend on them). "Encoder alone" is `PlipZeroShot.encode_pixels` on the
same tiles, read and normalised beforehand; `map_slide` writes into a fresh folder each time, so nothing
comes from its embedding cache. The two are timed in alternation; efficiency = map tiles/s / encoder tiles/s.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import load_average, median, write_json
from benchmarks.images import SHARED_DATA, WSI

BATCH = 64
VIRTUAL_TILES = 1000


def virtual_slide(folder: Path, tiles: int = VIRTUAL_TILES) -> Path:
    """One virtual slide of at least `tiles` tissue tiles (LC25000 lung train tiles), built in `folder`."""
    from pallava.data.importers.manifest import read_manifest
    from pallava.data.labels import LabelMap
    from pallava.slides.virtual import build_virtual_slides, list_slides

    items = read_manifest(SHARED_DATA / "lc25000-lung" / "manifest.csv", "train")
    lung = LabelMap.builtin("lc25000-lung")
    for attempt in range(8):  # the outline is random around the requested size: grow it until it is enough
        want = round(tiles * (1.1 + 0.1 * attempt))
        built = build_virtual_slides(
            items, lung, 1, folder, seed=attempt, min_tiles=want, max_tiles=want, progress=False
        )
        if built[0]["tissue_tiles"] >= tiles:
            return list_slides(folder)[0]
    raise RuntimeError(f"could not lay out a virtual slide of {tiles} tissue tiles")


def zero_shot(preset: str):
    from pallava.models.plip.presets import build_plip
    from pallava.models.plip.zeroshot import PlipZeroShot

    model, tokenizer = build_plip(preset, text_init="scratch" if preset == "paper" else None)
    return PlipZeroShot(model, tokenizer, "cpu")


def measure(slide_path: Path, preset: str, rounds: int, batch_size: int = BATCH) -> dict:
    """Map tiles/s and encoder-alone tiles/s on one slide with one PLIP preset (medians of `rounds`)."""
    from pallava.data.labels import LabelMap
    from pallava.slides.mapping import TilingOptions, map_slide, prepare_slide
    from pallava.slides.reader import open_slide
    from pallava.slides.tiling import iter_tile_batches

    plip = zero_shot(preset)
    classes = LabelMap.builtin("nct-crc-he")
    options = TilingOptions()
    with open_slide(slide_path) as slide:
        grid = prepare_slide(slide, options).grid
        size = plip.model.image_size
        from pallava.processing.image import normalize_to_tensor

        batches = [
            torch.stack([normalize_to_tensor(image, size) for image in images])
            for _, images in iter_tile_batches(slide, grid.tiles, grid.tile_size, batch_size, progress=None)
        ]
    tiles = len(grid)

    def encoder(count: int | None = None) -> None:
        for pixels in batches[:count]:
            plip.encode_pixels(pixels)

    def mapping() -> None:
        with tempfile.TemporaryDirectory(prefix="pallava-bench-map-") as out, open_slide(slide_path) as slide:
            map_slide(slide, plip, classes, out, f"plip-{preset}", options, batch_size=batch_size)

    with torch.inference_mode():
        encoder(2)  # warm-up (and the allocator's first large blocks)
    times: dict[str, list[float]] = {"map": [], "encoder": []}
    for round_index in range(rounds):
        order = ("map", "encoder") if round_index % 2 == 0 else ("encoder", "map")
        for name in order:
            start = time.perf_counter()
            if name == "map":
                mapping()
            else:
                with torch.inference_mode():
                    encoder()
            times[name].append(time.perf_counter() - start)
    rates = {name: tiles / median(t) for name, t in times.items()}
    return {
        "tiles": tiles,
        "plip": preset,
        "rounds": rounds,
        "threads": torch.get_num_threads(),
        "map_s": round(median(times["map"]), 3),
        "encoder_s": round(median(times["encoder"]), 3),
        "map_tiles_per_s": round(rates["map"], 2),
        "encoder_tiles_per_s": round(rates["encoder"], 2),
        "efficiency": round(rates["map"] / rates["encoder"], 3),
    }


def run(
    quick: bool = False,
    threads: int | None = None,
    virtual_tiles: int = VIRTUAL_TILES,
    presets: tuple[str, ...] | None = None,
    rounds: int | None = None,
) -> dict:
    if threads is not None:
        torch.set_num_threads(threads)
    presets = presets or (("tiny",) if quick else ("tiny", "paper"))
    rounds = rounds or (1 if quick else 2)
    result: dict = {"load_average_start": load_average(), "rounds": rounds, "batch_size": BATCH, "cases": {}}
    with tempfile.TemporaryDirectory(prefix="pallava-bench-virtual-") as folder:
        slides = {"shared slide (CMU-1 region)": SHARED_DATA / WSI}
        started = time.perf_counter()
        slides[f"virtual slide (>= {virtual_tiles} tiles)"] = virtual_slide(Path(folder), virtual_tiles)
        result["virtual_slide_build_s"] = round(time.perf_counter() - started, 1)
        for name, path in slides.items():
            for preset in presets:
                # The paper encoder reads about 4 tiles a second on this CPU: one round of the virtual slide
                # (the map, then the encoder alone) takes about 9 minutes, so that case runs one round.
                large = preset == "paper" and name.startswith("virtual")
                result["cases"][f"{name}, PLIP {preset}"] = measure(path, preset, 1 if large else rounds)
    result["slide_map_efficiency"] = {case: entry["efficiency"] for case, entry in result["cases"].items()}
    result["load_average_end"] = load_average()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json-out", required=True)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--regime", help="ignored (the section has its own shapes)")
    args = parser.parse_args(argv)
    write_json(args.json_out, run(quick=args.quick, threads=args.threads))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
