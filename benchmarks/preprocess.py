"""Preprocessing throughput (images/s): our image processor vs transformers' LLaVA-NeXT image processor.

Every processor gets the same decoded RGB images, one call per image (as a server sees them), and returns
torch tensors. Ours tiles with the regime's grid policy; LLaVA-NeXT's (PIL backend) is measured at our tile
size with its grid scaled to it (peer a) and at its native 336 px (peer b). Rounds alternate processors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from PIL import Image
from tqdm import tqdm

from benchmarks.common import choose_threads, interleaved, median, section_main
from benchmarks.images import image_cases
from benchmarks.systems import REGIMES, peer_config, peer_processor
from pallava.models.presets import make_processor
from pallava.processing.tokenizer import IMAGE, build_tiny_tokenizer

PROCESSORS = ("pallava", "llava_next_matched", "llava_next_native")


def processors(regime_name: str) -> dict[str, Callable[[Image.Image], object]]:
    """One-image preprocessing functions: ours and LLaVA-NeXT's at matched and native tile sizes."""
    tokenizer = build_tiny_tokenizer()
    config = REGIMES[regime_name].config(tokenizer.convert_tokens_to_ids(IMAGE))
    ours = make_processor(config, tokenizer).image_processor
    functions: dict[str, Callable[[Image.Image], object]] = {"pallava": lambda image: ours([image])}
    for key in PROCESSORS[1:]:
        theirs = peer_processor(key, peer_config(key, config), tokenizer).image_processor
        functions[key] = lambda image, p=theirs: p(images=[image], return_tensors="pt")
    return functions


def throughput(
    functions: dict[str, Callable[[Image.Image], object]],
    images: Sequence[Image.Image],
    rounds: int,
    repeat: int,
) -> dict[str, float]:
    """Median images/s of each function over `rounds` alternating rounds of `repeat` passes over `images`."""

    def job(fn: Callable[[Image.Image], object]) -> Callable[[], None]:
        def work() -> None:
            for _ in range(repeat):
                for image in images:
                    fn(image)

        return work

    for fn in functions.values():  # warm-up
        fn(images[0])
    times = interleaved({key: job(fn) for key, fn in functions.items()}, rounds)
    return {key: len(images) * repeat / median(t) for key, t in times.items()}


def run(
    regime_name: str,
    quick: bool = False,
    threads: int | None = None,
    rounds: int | None = None,
    progress: bool = True,
) -> dict:
    """images/s per case and processor, and our speed-up over LLaVA-NeXT's processor (matched and native)."""
    rounds = rounds or (3 if quick else 5)
    thread_info = choose_threads(threads, REGIMES[regime_name].dtype)
    functions = processors(regime_name)
    cases = image_cases()
    rates: dict[str, dict[str, float]] = {}
    for name, case in tqdm(cases.items(), desc=f"preprocess {regime_name}", disable=not progress):
        repeat = max(1, 8 // len(case.images)) if not quick else 1
        rates[name] = throughput(functions, case.images, rounds, repeat)
    return {
        "regime": regime_name,
        "threads": thread_info,
        "rounds": rounds,
        "cases": {
            name: {"images": len(c.images), "sizes": c.sizes, "source": c.source} for name, c in cases.items()
        },
        "images_per_s": {case: {k: round(v, 2) for k, v in r.items()} for case, r in rates.items()},
        "speedup_vs_llava_next_matched": {
            case: round(r["pallava"] / r["llava_next_matched"], 3) for case, r in rates.items()
        },
        "speedup_vs_llava_next_native": {
            case: round(r["pallava"] / r["llava_next_native"], 3) for case, r in rates.items()
        },
    }


def main(argv: list[str] | None = None) -> int:
    return section_main(argv, __doc__.splitlines()[0], run)


if __name__ == "__main__":
    raise SystemExit(main())
