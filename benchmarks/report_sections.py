"""The report's pages beside the first-token comparison: preprocessing and training throughput, training on a
busy machine, `slide map` at encoder speed, and `pallava serve` under concurrency (each rendered only when
its section ran)."""

from __future__ import annotations

from benchmarks.markdown import table, times


def _load(entry: dict) -> str:
    start, end = entry.get("load_average_start"), entry.get("load_average_end")
    return f"load average {start} at the start, {end} at the end"


def busy_machine_section(busy: dict) -> list[str]:
    rows = [
        [
            name,
            entry["threads"],
            entry["idle"]["plip_step_s"],
            entry["busy"]["plip_step_s"],
            f"{entry['slowdown']['plip']:.2f}x",
            entry["idle"]["assistant_step_s"],
            entry["busy"]["assistant_step_s"],
            f"{entry['slowdown']['assistant']:.2f}x",
        ]
        for name, entry in busy["settings"].items()
    ]
    speed = busy.get("idle_speed_vs_best", {})
    return [
        "## Training on a busy machine",
        "",
        f"{busy['steps']} optimiser steps of tiny PLIP (batch {busy['plip_batch']}) and of the tiny "
        f"assistant (batch {busy['assistant_batch']}) on {busy['cores']} cores, each setting in a fresh "
        f"process, idle and next to one competing process (`{busy['competing_process']}`); mean "
        f"seconds per step (the `auto` setting's governor probes included), the median over "
        f"{busy.get('repeats', 1)} such process(es) ({_load(busy)}):",
        "",
        table(
            [
                "setting",
                "threads",
                "PLIP idle s",
                "PLIP busy s",
                "PLIP slowdown",
                "assistant idle s",
                "assistant busy s",
                "assistant slowdown",
            ],
            rows,
        ),
        "",
        f"Shipped (`cpu_threads: auto` in `configs/plip-tiny.yaml` and `configs/assistant-tiny.yaml`, "
        f"spinning OpenMP threads in training commands): worst slowdown "
        f"**{busy.get('busy_machine_slowdown')}x**; its idle speed is "
        + ", ".join(f"{100 * v:.0f}% ({k})" for k, v in speed.items())
        + " of the fastest setting's idle speed. The governor's choices after its first probe: "
        + _choices(busy)
        + ". Overrides: see docs/training.md (threads on a shared CPU).",
        "",
    ]


def _choices(busy: dict) -> str:
    """What the shipped setting's governor kept, idle and busy (e.g. "idle 2 threads, busy 1 thread")."""
    shipped = busy["settings"].get(busy.get("shipped"), {})
    parts = []
    for condition in ("idle", "busy"):
        kept = {
            count
            for repeat in shipped.get(condition, {}).get("governor_choices", [])
            for made in repeat.values()
            for _, count in made[:1]
        }
        if kept:
            parts.append(f"{condition} {' or '.join(map(str, sorted(kept)))} thread(s)")
    return ", ".join(parts) or "none recorded"


def slide_map_section(slides: dict) -> list[str]:
    rows = [
        [
            case,
            entry["tiles"],
            entry["map_tiles_per_s"],
            entry["encoder_tiles_per_s"],
            f"**{entry['efficiency']:.2f}**",
        ]
        for case, entry in slides["cases"].items()
    ]
    single = [case for case, entry in slides["cases"].items() if entry.get("rounds", slides["rounds"]) == 1]
    fewer = f"; one round for {', '.join(single)}" if single and slides["rounds"] > 1 else ""
    return [
        "## Slide mapping at encoder speed",
        "",
        "`slide map` (open, thumbnail, tissue detection, tiling, reading, encoding, zero-shot classes, "
        "GeoJSON and PNG pictures, fresh output folder each time) against PLIP's encoder alone on the same "
        f"tiles, read and normalised beforehand; tissue tiles per second, medians of {slides['rounds']} "
        f"alternating rounds{fewer}, batch {slides['batch_size']} "
        f"({_load(slides)}):",
        "",
        table(["slide, encoder", "tiles", "map tiles/s", "encoder alone tiles/s", "map / encoder"], rows),
        "",
        "With the tiny encoder, reading and normalising a tile costs about as much CPU as encoding it, "
        "and both run on the same two cores, so no overlap brings the command near the encoder alone "
        '(measured breakdown: docs/slides.md, "Mapping speed with the tiny encoder"); with the paper\'s '
        "ViT-B/16 the encoding is the work, and the ratio shows how much of the rest hides behind it (tile "
        "reading runs in threads beside the encoder).",
        "",
    ]


def serve_section(serve: dict) -> list[str]:
    rows = []
    for regime, entry in serve.items():
        if "concurrent" not in entry:
            continue
        runs = [("1 client", entry["one_at_a_time"]), (f"{entry['clients']} clients", entry["concurrent"])]
        resent = entry.get("resent_image")
        if resent:  # the same image again, answered from the image feature cache (a chat's later turns)
            runs += [("1 client, image resent", resent["one_at_a_time"])]
            runs += [(f"{entry['clients']} clients, image resent", resent["concurrent"])]
        for index, (label, run) in enumerate(runs):
            rows.append(
                [
                    regime,
                    label,
                    run["requests"],
                    run["throughput_rps"],
                    run["latency_p50_s"],
                    run["latency_p99_s"],
                    run["mean_batch_size"],
                    run["errors"],
                    f"**{entry.get('serve_concurrency_speedup')}x**" if index == 1 else "",
                ]
            )
    if not rows:
        return []
    first = next(iter(serve.values()))
    return [
        "## Serving under concurrency",
        "",
        "`pallava serve`'s app with the batching shipped when it ran "
        f"({first.get('batching', 'static')}, up to {first['max_batch_size']} requests within "
        f"{first['batch_window_ms']:g} ms) on random weights; the clients in their own process, each "
        "request one real 500x300 image and a question, a fixed answer length (tiny "
        f"{serve.get('tiny', {}).get('max_tokens')}, paper-proportioned "
        f"{serve.get('paper-proportioned', {}).get('max_tokens')} tokens); one client and 16 in turn, "
        f"{_rounds(serve)} rounds of each pooled. The speed-up (16 clients over "
        "1) is measured with the image feature cache off, so every request pays for its image as one "
        "with a new image does; the `image resent` rows use the shipped cache, as a chat's later turns "
        "(which send the image again) meet it:",
        "",
        table(
            [
                "regime",
                "clients",
                "requests",
                "requests/s",
                "p50 s",
                "p99 s",
                "mean batch",
                "errors",
                "speed-up",
            ],
            rows,
        ),
        "",
        *_worker_lines(serve),
        *_varied_lengths_lines(serve.get("tiny", {}).get("varied_lengths")),
    ]


def _rounds(serve: dict) -> str:
    return ", ".join(f"{regime} {entry.get('rounds', 1)}" for regime, entry in serve.items())


def _worker_lines(serve: dict) -> list[str]:
    """Where the speed-up goes: the generation worker's model time and its busy share of the wall time."""
    rows, notes = [], []
    for regime, entry in serve.items():
        split = entry.get("worker")
        if not split:
            continue
        for label, run in (("1 client", entry["one_at_a_time"]), ("16 clients", entry["concurrent"])):
            worker = run["worker"]
            rows.append(
                [regime, label, round(worker["model_s"], 2), round(worker["busy_share"], 2)]
                + [worker["prefill_s"], worker["decode_s"], worker["rows_per_step"], ""]
            )
        rows.append(
            [regime, "16 over 1", "", f"{split['busy_share_ratio']}x", "", "", ""]
            + [f"**{split['model_work_speedup']}x** model work"]
        )
        if "answer_tokens_for_goal" in split:
            notes.append(_answer_length_note(regime, entry, split))
    if not rows:
        return []
    return [
        "Where it goes (headline runs): the generation worker's seconds at the model (prefill of joining "
        "requests, and decoding steps with their mean rows), and its share of the run's wall time; the rest "
        "it waited for requests, whose HTTP, JSON and image work, and the clients' own, share the same "
        "cores. "
        "The speed-up is the product of the two ratios in the last row: requests per second of model time, "
        "and busy share:",
        "",
        table(
            ["regime", "clients", "model s", "busy share", "prefill s", "decode s", "rows per step"]
            + ["16 over 1"],
            rows,
        ),
        "",
        *[line for note in notes for line in (note, "")],
    ]


def _answer_length_note(regime: str, entry: dict, split: dict) -> str:
    """What the measured prefill and step times allow: the answer length a never-waiting worker needs for
    the 4x goal."""
    (prefill_one, prefill_many), (step_one, step_many) = (
        split["prefill_per_request_s"],
        split["decode_step_s"],
    )
    tokens = split["answer_tokens_for_goal"]
    reach = (
        f"answers of about {tokens} tokens or more would reach 4x"
        if tokens is not None
        else "no answer length reaches 4x"
    )
    return (
        f"{regime}: a request's prefill (image and prompt) took {prefill_one} s alone and {prefill_many} s "
        f"each when joining together; a decoding step {step_one} s for one row and {step_many} s for "
        f"{entry['concurrent']['worker']['rows_per_step']} rows. With these times {reach} even if the worker "
        f"never waited (this run: {entry['max_tokens']})."
    )


def _varied_lengths_lines(varied: dict | None) -> list[str]:
    """Static against continuous batching when answers differ in length (tiny regime)."""
    if not varied:
        return []
    rows = [
        [
            mode,
            varied[mode]["one_at_a_time_rps"],
            varied[mode]["concurrent_rps"],
            varied[mode]["latency_p50_s"],
            varied[mode]["latency_p99_s"],
            varied[mode]["errors"],
            f"{varied[mode]['speedup']}x",
        ]
        for mode in ("static", "continuous")
        if mode in varied
    ]
    lengths = ", ".join(map(str, varied["lengths"]))
    return [
        f"Answers of {lengths} tokens in turn (tiny), with each `--batching` mode:",
        "",
        table(
            ["batching", "1 client req/s", "16 clients req/s", "p50 s", "p99 s", "errors", "speed-up"], rows
        ),
        "",
    ]


def preprocessing_section(results: dict) -> list[str]:
    out = [
        "## Preprocessing throughput",
        "",
        "images/s, one image per call, decoded images in memory; ours vs transformers' "
        "`LlavaNextImageProcessorPil` (the torchvision one needs torchvision) at our tile size (a) and "
        "at 336 px (b):",
        "",
    ]
    for regime, prep in results["preprocessing"].items():
        rows = [
            [
                case,
                info["images"],
                ", ".join(info["sizes"]),
                prep["images_per_s"][case]["pallava"],
                prep["images_per_s"][case]["llava_next_matched"],
                prep["images_per_s"][case]["llava_next_native"],
                times(prep["speedup_vs_llava_next_matched"][case]),
                times(prep["speedup_vs_llava_next_native"][case]),
            ]
            for case, info in prep["cases"].items()
        ]
        out += [
            f"Tiling of the `{regime}` regime:",
            "",
            table(
                ["images", "count", "sizes", "ours", "LLaVA-NeXT (a)", "LLaVA-NeXT (b)", "vs (a)", "vs (b)"],
                rows,
            ),
            "",
        ]
    return out


def training_section(results: dict) -> list[str]:
    training = {
        name: entry["training"]
        for name, entry in results["regimes"].items()
        if "plip" in entry.get("training", {})
    }
    if not training:
        return []
    rows = [
        [
            name
            + (
                f" ({results['regimes'][name]['machine']['cuda']})"
                if "machine" in results["regimes"][name]
                else ""
            ),
            t["dtype"],
            f"{t['plip']['samples_per_s']} (batch {t['plip']['batch']}, {t['plip']['preset']})",
            f"{t['assistant']['samples_per_s']['pixels']} (batch {t['assistant']['batch']})",
            t["assistant"]["samples_per_s"]["cached"],
            times(t["assistant"]["cache_speedup"]),
        ]
        for name, t in training.items()
    ]
    return [
        "## Training throughput",
        "",
        "samples/s of one optimiser step (medians); the assistant step alternates pixel inputs and "
        "cached "
        "frozen-vision features (`pallava.train.feature_cache`), batches built by the trainer's "
        "collator:",
        "",
        table(
            [
                "regime",
                "dtype",
                "PLIP step",
                "assistant, pixels",
                "assistant, cached features",
                "cache speed-up",
            ],
            rows,
        ),
        "",
    ]


def render_systems_sections(results: dict) -> list[str]:
    out: list[str] = []
    if "settings" in results.get("busy_machine", {}):
        out += busy_machine_section(results["busy_machine"])
    if "cases" in results.get("slide_map", {}):
        out += slide_map_section(results["slide_map"])
    if results.get("serve"):
        out += serve_section(results["serve"])
    return out
