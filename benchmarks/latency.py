"""Time to first token, image tokens, generation throughput and FLOP utilisation: ours vs the peers.

All systems of a regime live in one process, sharing the LLM (and, at matched shapes, the vision tower),
and are timed in alternation, so their ratios hold even while the machine's load drifts.

* time to first token (TTFT): one image (+ the same question) -> processor -> `generate(max_new_tokens=1)`;
  it covers preprocessing, vision, connector/projector and prefill. Wall-clock and CPU time are both kept:
  on a shared CPU the second measures the work, the first also the scheduler;
* generation tokens/s: decoding only. The prompt's KV cache comes from the TTFT call; batch 8 repeats it
  8 times, so 8 sequences decode together without paying 8 prefills. `min_new_tokens` fixes the length;
* FLOPs: counted by `torch.utils.flop_counter` on the untimed warm-up call; utilisation = our forward's
  FLOP/s over this machine's matmul peak (best square product), the two measured in alternation.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from benchmarks.common import (
    choose_threads,
    clocked,
    current_rss_mb,
    interleaved,
    load_average,
    matmul_peak,
    median,
    peak_rss_mb,
    section_main,
    timed,
)
from benchmarks.images import SIZES, image_cases
from benchmarks.systems import REGIMES, Regime, System, build_systems

HEADLINE = "1024x768"


def _generate_options(new_tokens: int) -> dict:
    return {
        "max_new_tokens": new_tokens,
        "min_new_tokens": new_tokens,
        "do_sample": False,
        "pad_token_id": 0,
        "eos_token_id": None,
    }


def first_token(system: System, image) -> object:
    """Preprocess one image and produce the first answer token; returns the generate output (with its
    cache)."""
    inputs = system.prepare(image)
    return system.model.generate(**inputs, **_generate_options(1), return_dict_in_generate=True)


def decode(system: System, output, batch: int, new_tokens: int) -> Callable[[], object]:
    """A decode-only job: `batch` copies of the prompt cache, `new_tokens` tokens each."""
    cache = copy.deepcopy(output.cache)
    if batch > 1:
        cache.batch_repeat_interleave(batch)
    ids = output.sequences.repeat(batch, 1)
    mask = torch.ones_like(ids)
    return lambda: system.model.generate(
        input_ids=ids, attention_mask=mask, cache=cache, **_generate_options(new_tokens)
    )


def timed_first_token(system: System, image, device: str) -> tuple[float, float, object]:
    """(wall, CPU) seconds of `first_token`, and its output."""
    held: list[object] = []
    wall, cpu = clocked(lambda: held.append(first_token(system, image)), device)
    return wall, cpu, held[0]


def _attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """Forward attention FLOPs, grouped-query attention included (older torch's formula rejects fewer KV
    heads)."""
    batch, heads, queries, dim = query_shape
    keys, value_dim = key_shape[-2], value_shape[-1]
    return 2 * batch * heads * queries * keys * (dim + value_dim)  # scores, then the weighted sum of values


# torch's counter has no formula for the CPU kernel at all: without it attention would count as free there.
_ATTENTION_OPS = (
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
)


def count_flops(fn: Callable[[], object]) -> int:
    mapping = {getattr(torch.ops.aten, name): _attention_flops for name in _ATTENTION_OPS}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    return int(counter.get_total_flops())


def breakdown(system: System, image, rounds: int, device: str) -> tuple[dict[str, float], dict[str, float]]:
    """Where our TTFT goes: preprocessing, vision tower, connector, LLM prefill (median seconds, and
    GFLOP)."""
    model = system.model
    inputs = system.prepare(image)
    features = model.encode_crops(inputs["pixel_values"], inputs["tile_mask"])
    embeds = model.merge_image_embeddings(
        inputs["input_ids"], model.get_image_embeddings(crop_features=features, tile_mask=inputs["tile_mask"])
    )
    jobs = {
        "preprocess": lambda: system.prepare(image),
        "vision": lambda: model.encode_crops(inputs["pixel_values"], inputs["tile_mask"]),
        "connector": lambda: model.get_image_embeddings(
            crop_features=features, tile_mask=inputs["tile_mask"]
        ),
        "prefill": lambda: model.language_model(
            inputs_embeds=embeds, attention_mask=inputs["attention_mask"], logits_to_keep=1
        ),
    }
    gflop = {name: round(count_flops(job) / 1e9, 2) for name, job in jobs.items()}
    return {name: round(median(t), 4) for name, t in interleaved(jobs, rounds, device).items()}, gflop


def lm_head_strides(system: System, prompt_length: int) -> dict[str, float]:
    """Seconds of the LM head on the last position as `logits_to_keep` slices it (odd strides) vs restrided.

    torch's CPU bf16 matmul copies the whole (vocabulary x width) weight for the sliced view; the model's
    restriding hook avoids it.
    """
    head = system.model.get_output_embeddings()
    hidden = torch.randn(
        1, prompt_length, head.weight.shape[1], dtype=head.weight.dtype, device=head.weight.device
    )
    sliced = hidden[:, -1:, :]
    restrided = sliced.clone(memory_format=torch.contiguous_format)
    return {
        "sliced_s": round(timed(lambda: F.linear(sliced, head.weight)), 4),
        "restrided_s": round(timed(lambda: F.linear(restrided, head.weight)), 4),
    }


def utilisation(
    system: System, image, forward_flops: int, rounds: int, regime: Regime, peak_sizes: tuple[int, ...]
) -> dict:
    """Our forward's FLOP/s as a fraction of the matmul peak, per wall-clock and per CPU second."""
    inputs = system.prepare(image)
    forward: dict[str, list[float]] = {"wall": [], "cpu": []}
    peak: dict[str, list[float]] = {"wall": [], "cpu": []}
    for _ in range(rounds):
        wall, cpu = clocked(lambda: system.model(**inputs, logits_to_keep=1), regime.device)
        forward["wall"].append(wall)
        forward["cpu"].append(cpu)
        for clock, rate in zip(
            ("wall", "cpu"), matmul_peak(regime.dtype, peak_sizes, regime.device), strict=True
        ):
            peak[clock].append(rate)
    result = {"forward_gflop": round(forward_flops / 1e9, 2)}
    for clock in ("wall", "cpu"):
        achieved = forward_flops / median(forward[clock])
        result[clock] = {
            "forward_s": round(median(forward[clock]), 4),
            "achieved_gflops": round(achieved / 1e9, 2),
            "matmul_peak_gflops": round(median(peak[clock]) / 1e9, 2),
            "fraction_of_peak": round(achieved / median(peak[clock]), 3),
        }
    return result


def _rotated(keys: list[str], round_index: int) -> list[str]:
    shift = round_index % len(keys)
    return keys[shift:] + keys[:shift]


def _paired_ratio(theirs: list[float], ours: list[float]) -> float:
    """Median over rounds of their time / our time in the same round.

    The two calls of a round run back to back, so a slow spell of a shared machine (seen here: the same call
    taking 1.5 s or 3.5 s minutes apart) lands on both; a ratio of separate medians would mix spells.
    """
    return round(median([t / o for t, o in zip(theirs, ours, strict=False)]), 3)


def _medians(samples: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, float]]:
    return {
        key: {size: round(median(v), 4) for size, v in by_size.items()} for key, by_size in samples.items()
    }


def run(
    regime_name: str,
    quick: bool = False,
    threads: int | None = None,
    rounds: int | None = None,
    new_tokens: int | None = None,
    sizes: tuple[str, ...] | None = None,
    peers: tuple[str, ...] | None = None,
    peak_sizes: tuple[int, ...] | None = None,
    progress: bool = True,
) -> dict:
    """Measure one regime; returns a JSON-ready dict (medians in seconds, rates per second)."""
    regime: Regime = REGIMES[regime_name]
    big, gpu = regime.name != "tiny", regime.device == "cuda"
    # A GPU call takes milliseconds: more rounds for the same confidence, and the native peer is not slow
    # there.
    rounds = rounds or ((5 if gpu else 2 if big else 3) if quick else 20 if gpu else 7 if big else 5)
    new_tokens = new_tokens or (4 if quick else 16)
    sizes = sizes or ((HEADLINE,) if quick and big else SIZES)
    peers = peers if peers is not None else (("llava_next_matched",) if quick and big else regime.peers)
    peak_sizes = peak_sizes or ((4096, 8192) if gpu else (1024, 2048, 4096) if big else (512, 1024, 2048))
    thread_info = choose_threads(threads, regime.dtype)
    cases = image_cases()
    rss_start = current_rss_mb()
    systems = build_systems(regime, peers)
    keys = list(systems)
    # The native peer is by far the slowest: on a CPU outside the tiny regime it gets one timed round.
    runs = {key: (1 if key == "llava_next_native" and big and not gpu else rounds) for key in keys}
    result: dict = {
        "regime": regime.name,
        "description": regime.description,
        "dtype": str(regime.dtype).replace("torch.", ""),
        "device": regime.device,
        "threads": thread_info,
        "rounds": rounds,
        "runs": runs,
        "new_tokens": new_tokens,
        "load_average_start": load_average(),
        "rss_after_build_mb": round(current_rss_mb() - rss_start, 1),
        "systems": {key: systems[key].label for key in keys},
        "images": {size: cases[size].source for size in sizes},
        "parameters_m": {
            key: round(sum(p.numel() for p in systems[key].model.parameters()) / 1e6, 1) for key in keys
        },
    }
    outputs: dict[tuple[str, str], object] = {}
    tokens, crops, flops = ({key: {} for key in keys} for _ in range(3))
    wall = {key: {size: [] for size in sizes} for key in keys}
    cpu = {key: {size: [] for size in sizes} for key in keys}
    bar = tqdm(
        total=len(sizes) * sum(1 + r for r in runs.values()), desc=f"TTFT {regime.name}", disable=not progress
    )
    with torch.inference_mode():
        for size in sizes:
            image = cases[size].images[0]
            for key in keys:  # untimed warm-up, counting FLOPs on the way
                inputs = systems[key].prepare(image)
                tokens[key][size] = int((inputs["input_ids"] == systems[key].image_token_id).sum())
                crops[key][size] = int(
                    inputs["pixel_values"].shape[1] if inputs["pixel_values"].dim() == 5 else 1
                )
                flops[key][size] = count_flops(lambda s=systems[key], im=image: first_token(s, im))
                bar.update()
            for round_index in range(rounds):
                for key in _rotated(keys, round_index):
                    if round_index < runs[key]:
                        seconds, cpu_seconds, outputs[(key, size)] = timed_first_token(
                            systems[key], image, regime.device
                        )
                        wall[key][size].append(seconds)
                        cpu[key][size].append(cpu_seconds)
                        bar.update()
        bar.close()
        headline = HEADLINE if HEADLINE in sizes else sizes[-1]
        image = cases[headline].images[0]
        ours = systems["pallava"]
        result["ttft_breakdown_s"], result["ttft_breakdown_gflop"] = breakdown(
            ours, image, 1 if quick else rounds, regime.device
        )
        result["utilisation"] = {
            "image": headline,
            **utilisation(ours, image, flops["pallava"][headline], rounds, regime, peak_sizes),
        }
        if big and not quick and regime.device == "cpu":
            result["lm_head_strides"] = lm_head_strides(ours, tokens["pallava"][headline] + 30)
        gen: dict[str, dict[str, list[float]]] = {key: {"1": [], "8": []} for key in keys}
        for round_index in tqdm(range(rounds), desc=f"decode {regime.name}", disable=not progress):
            for key in _rotated(keys, round_index):
                for batch in (1, 8) if round_index < runs[key] else ():
                    job = decode(systems[key], outputs[(key, headline)], batch, new_tokens)
                    gen[key][str(batch)].append(batch * new_tokens / timed(job, regime.device))
    ttft, ttft_cpu = _medians(wall), _medians(cpu)
    result.update(
        {
            "image_tokens": tokens,
            "crops": crops,
            "forward_gflop": {k: {s: round(v / 1e9, 2) for s, v in d.items()} for k, d in flops.items()},
            "ttft_s": ttft,
            "ttft_cpu_s": ttft_cpu,
            "ttft_speedup": {
                p: {s: _paired_ratio(wall[p][s], wall["pallava"][s]) for s in sizes} for p in keys[1:]
            },
            "ttft_speedup_cpu": {
                p: {s: _paired_ratio(cpu[p][s], cpu["pallava"][s]) for s in sizes} for p in keys[1:]
            },
            "generation_image": headline,
            "generation_tokens_per_s": {
                k: {b: round(median(v), 3) for b, v in d.items()} for k, d in gen.items()
            },
            "batch8_over_batch1": {k: round(median(d["8"]) / median(d["1"]), 3) for k, d in gen.items()},
            "peak_rss_mb_all_systems": round(peak_rss_mb(), 1),
            "load_average_end": load_average(),
        }
    )
    return result


def main(argv: list[str] | None = None) -> int:
    return section_main(argv, __doc__.splitlines()[0], run)


if __name__ == "__main__":
    raise SystemExit(main())
