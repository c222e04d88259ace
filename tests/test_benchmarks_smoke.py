"""Every benchmark section runs at tiny shapes with minimal repetitions and reports consistent numbers.

Benchmarks are not tests: nothing here asserts a time, only shapes of results, token counts, shared
modules and that ratios are the ratios of the reported medians.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `benchmarks/` lives beside `src/`, not inside the package
    sys.path.insert(0, str(ROOT))

from benchmarks import latency, memory, preprocess, training  # noqa: E402
from benchmarks.images import SIZES, image_cases  # noqa: E402
from benchmarks.report import TARGETS, render, summarise  # noqa: E402
from benchmarks.systems import REGIMES, build_systems, random_init_  # noqa: E402

pytestmark = pytest.mark.slow  # end to end: `make test-fast` skips it, `make test` runs it

TINY = REGIMES["tiny"]


@pytest.fixture(autouse=True)
def one_thread():
    """One thread, as the sections choose on a busy machine; the suite's own setting is restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cases(shared_data):
    return image_cases(shared_data)


@pytest.fixture(scope="module")
def systems():
    return build_systems(TINY)


def test_images_are_real_crops_of_the_stated_sizes(cases):
    assert set(SIZES) <= set(cases)
    for size in SIZES:
        assert cases[size].sizes == [size] and cases[size].source != "synthetic"
    assert len(cases["real mix"].images) == 11


def test_peer_a_shares_our_tower_and_llm_and_only_ours_keeps_tokens_fixed(systems, cases):
    ours, peer, single = systems["pallava"], systems["llava_next_matched"], systems["llava_1_5"]
    assert peer.model.model.vision_tower is ours.model.vision_tower
    assert peer.model.model.language_model is ours.model.base_language_model.model
    assert peer.model.lm_head is ours.model.get_output_embeddings()
    tokens = {key: [] for key in systems}
    for size in SIZES:
        for key, system in systems.items():
            inputs = system.prepare(cases[size].images[0])
            tokens[key].append(int((inputs["input_ids"] == system.image_token_id).sum()))
    assert tokens["pallava"] == [ours.model.config.num_image_tokens] * 3 == tokens["llava_1_5"]
    assert all(n > tokens["pallava"][0] for n in tokens["llava_next_matched"])  # anyres grows with the grid
    assert single.model.model.vision_tower is ours.model.vision_tower


def test_random_init_sets_norms_and_biases_and_skips_shared_parameters(systems):
    norm = systems["pallava"].model.vision_tower.pre_layrnorm
    assert torch.all(norm.weight == 1) and torch.all(norm.bias == 0)
    layers = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.LayerNorm(64), torch.nn.Linear(64, 64))
    kept = layers[2].weight.detach().clone()
    random_init_(layers, seed=3, std=0.02, skip=[layers[2].weight])
    assert torch.all(layers[0].bias == 0) and torch.all(layers[1].weight == 1)
    assert 0.01 < float(layers[0].weight.std()) < 0.03
    assert torch.equal(layers[2].weight, kept)


def test_lm_head_sees_standard_strides_when_logits_are_sliced(systems):
    model = systems["pallava"].model
    strides = []
    handle = model.get_output_embeddings().register_forward_hook(
        lambda m, args, out: strides.append(args[0].stride())
    )
    ids = torch.randint(10, 200, (2, 12))
    with torch.inference_mode():
        last = model(input_ids=ids, logits_to_keep=1).logits
        full = model(input_ids=ids).logits[:, -1:]
    handle.remove()
    width = model.config.text_config.hidden_size
    assert strides[0] == (width, width, 1)
    torch.testing.assert_close(last, full)


def test_vision_features_skip_unused_layers_with_the_same_values(systems):
    model = systems["pallava"].model
    pixels = torch.randn(3, 3, 224, 224)
    with torch.inference_mode():
        full = model.vision_tower(pixels, output_hidden_states=True).hidden_states[
            model.config.vision_feature_layer
        ]
        assert torch.equal(model.vision_hidden_states(pixels), full)


def test_latency_section_reports_ratios_of_its_medians(shared_data):
    result = latency.run(
        "tiny",
        threads=1,
        rounds=1,
        new_tokens=2,
        sizes=("224x224", "1024x768"),
        peak_sizes=(128, 256),
        progress=False,
    )
    assert set(result["ttft_s"]) == {"pallava", "llava_next_matched", "llava_1_5"}
    for size in ("224x224", "1024x768"):
        assert result["image_tokens"]["pallava"][size] == 49
        expected = result["ttft_s"]["llava_next_matched"][size] / result["ttft_s"]["pallava"][size]
        assert result["ttft_speedup"]["llava_next_matched"][size] == pytest.approx(expected, rel=1e-2)
        assert result["forward_gflop"]["pallava"][size] > 0
    assert result["crops"]["pallava"]["1024x768"] > result["crops"]["pallava"]["224x224"]
    gen = result["generation_tokens_per_s"]["pallava"]
    assert result["batch8_over_batch1"]["pallava"] == pytest.approx(gen["8"] / gen["1"], rel=1e-2)
    for clock in ("wall", "cpu"):
        util = result["utilisation"][clock]
        assert util["fraction_of_peak"] == pytest.approx(
            util["achieved_gflops"] / util["matmul_peak_gflops"], rel=2e-2
        )
    assert result["ttft_cpu_s"]["pallava"]["224x224"] > 0
    assert (
        set(result["ttft_breakdown_s"])
        == set(result["ttft_breakdown_gflop"])
        == {"preprocess", "vision", "connector", "prefill"}
    )
    parts = result["ttft_breakdown_gflop"]
    assert parts["preprocess"] == 0 and parts["vision"] > 0 and parts["prefill"] > 0
    # the stages together are the forward pass (the first token's LM head and sampling aside)
    assert sum(parts.values()) == pytest.approx(result["forward_gflop"]["pallava"]["1024x768"], rel=0.1)


def test_attention_flops_count_grouped_query_attention():
    q, k, v = torch.randn(1, 8, 10, 16), torch.randn(1, 2, 12, 16), torch.randn(1, 2, 12, 16)
    expected = 2 * 8 * 10 * 12 * (16 + 16)  # scores and weighted values, every query head
    gqa = latency.count_flops(
        lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    )
    full = latency.count_flops(
        lambda: torch.nn.functional.scaled_dot_product_attention(
            q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1)
        )
    )
    assert gqa == full == expected


def test_preprocess_section_covers_every_case(shared_data):
    result = preprocess.run("tiny", quick=True, threads=1, rounds=1, progress=False)
    assert set(result["images_per_s"]) == {"real mix", *SIZES}
    for case, rates in result["images_per_s"].items():
        assert set(rates) == set(preprocess.PROCESSORS) and all(v > 0 for v in rates.values())
        ratio = rates["pallava"] / rates["llava_next_matched"]
        assert result["speedup_vs_llava_next_matched"][case] == pytest.approx(ratio, rel=1e-2)


def test_memory_section_reads_rss_around_the_build():
    result = memory.run("tiny", "llava_next_matched", threads=1)
    assert 0 < result["rss_before_build_mb"] <= result["peak_rss_mb"]
    assert result["rss_after_build_mb"] <= result["peak_rss_mb"]


def test_memory_peak_is_never_below_a_reading(monkeypatch):
    """The kernel's high-water mark can lag a VmRSS sample by a fraction of a MiB (733.1 <= 733.0 failed)."""
    monkeypatch.setattr(memory, "peak_rss_mb", lambda: 1.0)  # a high-water mark behind every reading
    result = memory.run("tiny", "llava_1_5", threads=1)
    assert max(result["rss_before_build_mb"], result["rss_after_build_mb"]) <= result["peak_rss_mb"]


def test_training_steps_run_from_pixels_and_from_cached_features(shared_data):
    plip = training.plip_step(TINY, batch=2, steps=1, progress=False)
    assistant = training.assistant_steps(TINY, batch=2, steps=1, progress=False)
    assert plip["samples_per_s"] > 0 and plip["preset"] == "tiny"
    assert set(assistant["samples_per_s"]) == {"pixels", "cached"}
    assert assistant["crops_per_image"] == 2  # a 224 px tile: global view + one tile
    ratio = assistant["samples_per_s"]["cached"] / assistant["samples_per_s"]["pixels"]
    assert assistant["cache_speedup"] == pytest.approx(ratio, rel=1e-2)


def test_report_holds_the_promised_keys_and_renders(shared_data):
    lat = latency.run(
        "tiny",
        threads=1,
        rounds=1,
        new_tokens=2,
        sizes=("1024x768",),
        peers=("llava_next_matched",),
        peak_sizes=(128,),
        progress=False,
    )
    results = {
        "command": "python benchmarks/run.py --quick",
        "quick": True,
        "started": "now",
        "duration_s": 1.0,
        "machine": {
            "cpu": "test",
            "logical_cores": 2,
            "torch": torch.__version__,
            "transformers": "x",
            "cuda": None,
        },
        "threads": {"threads": 1, "chosen_by": "--threads"},
        "load_average_end": None,
        "errors": [],
        "regimes": {"tiny": {"latency": lat, "memory": {}}, "paper": {"not_run": "no GPU"}},
        "preprocessing": {
            "tiny": {"cases": {}, "images_per_s": {}, "speedup_vs_llava_next_matched": {"224x224": 2.5}}
        },
    }
    results.update(summarise(results))
    assert results["ttft_speedup_vs_llava_next"]["tiny"] == lat["ttft_speedup"]["llava_next_matched"]
    assert results["batch8_over_batch1_generation"]["tiny"] == lat["batch8_over_batch1"]["pallava"]
    assert results["matmul_utilisation"]["tiny"] == lat["utilisation"]["cpu"]["fraction_of_peak"]
    assert [t["met"] for t in results["targets"]] == [None] * len(TARGETS)  # no paper-proportioned run here
    efficiency = results["ttft_efficiency_vs_flop_ratio"]["tiny"]
    ratios = (
        results["ttft_speedup_vs_llava_next"]["tiny"]["1024x768"],
        results["ttft_flop_ratio_vs_llava_next"],
    )
    assert efficiency == pytest.approx(ratios[0] / ratios[1]["tiny"], rel=1e-2)
    flops = lat["forward_gflop"]
    assert results["ttft_flop_ratio_vs_llava_next"]["tiny"] == pytest.approx(
        flops["llava_next_matched"]["1024x768"] / flops["pallava"]["1024x768"], rel=1e-2
    )
    assert results["ttft_ceiling_vs_llava_next"]["tiny"] == pytest.approx(
        flops["llava_next_matched"]["1024x768"] / lat["ttft_breakdown_gflop"]["prefill"], rel=1e-2
    )
    page = render(results)
    assert "## Targets" in page and "## Regime `tiny`" in page and "Not run: no GPU" in page


def test_a_stored_gpu_run_is_merged_with_its_own_machine(tmp_path, shared_data):
    from benchmarks.run import stored_gpu_result

    assert stored_gpu_result(tmp_path / "missing.json") is None
    lat = latency.run(
        "tiny",
        threads=1,
        rounds=1,
        new_tokens=2,
        sizes=("224x224",),
        peers=("llava_1_5",),
        peak_sizes=(128,),
        progress=False,
    )
    gpu_machine = {
        "cpu": "gpu host",
        "logical_cores": 16,
        "torch": "2.x",
        "transformers": "5.x",
        "cuda": "Some GPU",
    }
    stored = {
        "command": "python benchmarks/run.py --regimes paper",
        "started": "earlier",
        "machine": gpu_machine,
        "regimes": {"paper": {"latency": lat, "memory": {}}},
        "notes": ["a note"],
    }
    (tmp_path / "gpu.json").write_text(__import__("json").dumps(stored))
    merged = stored_gpu_result(tmp_path / "gpu.json")
    assert merged["machine"] == gpu_machine and merged["latency"] == lat and merged["notes"] == ["a note"]
    results = {
        "command": "python benchmarks/run.py",
        "quick": False,
        "started": "now",
        "duration_s": 1.0,
        "machine": {
            "cpu": "test",
            "logical_cores": 2,
            "torch": torch.__version__,
            "transformers": "x",
            "cuda": None,
        },
        "threads": {"threads": 1, "chosen_by": "--threads"},
        "load_average_end": None,
        "errors": [],
        "regimes": {"paper": merged},
        "preprocessing": {},
    }
    results.update(summarise(results))
    page = render(results)
    assert (
        "## Regime `paper`" in page
        and "Measured on another machine: Some GPU" in page
        and "Note: a note" in page
    )


def test_busy_machine_section_times_each_setting_idle_and_next_to_a_busy_process():
    import os

    from benchmarks import busy_machine

    with busy_machine.busy_process() as pid:
        os.kill(pid, 0)  # running while the block runs
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # and gone after it
    # The shipped setting (the ThreadGovernor): 7 steps = its probe (3 at each count), then the kept count.
    result = busy_machine.run(
        steps=7, settings=busy_machine.SETTINGS[:1], plip_batch=2, assistant_batch=2, repeats=1
    )
    entry = result["settings"][busy_machine.SHIPPED]
    assert entry["idle"]["applied"]["threads"] == entry["busy"]["applied"]["threads"] == "auto"
    if (os.cpu_count() or 1) > 1:
        for condition in ("idle", "busy"):
            (choices,) = entry[condition]["governor_choices"]  # one repeat
            assert {trainer: [step for step, _ in made] for trainer, made in choices.items()} == {
                "plip": [6],
                "assistant": [6],
            }
    for trainer in ("plip", "assistant"):
        ratio = entry["busy"][f"{trainer}_step_s"] / entry["idle"][f"{trainer}_step_s"]
        assert entry["slowdown"][trainer] == pytest.approx(ratio, rel=1e-2)
    assert result["busy_machine_slowdown"] == max(entry["slowdown"].values())
    assert result["idle_speed_vs_best"] == {"plip": 1.0, "assistant": 1.0}  # the only setting is the best


def test_slide_map_section_compares_the_command_with_the_encoder_on_the_same_tiles(tmp_path, shared_data):
    from benchmarks import slide_map

    slide = slide_map.virtual_slide(tmp_path, tiles=20)
    result = slide_map.measure(slide, "tiny", rounds=1, batch_size=8)
    assert result["tiles"] >= 20
    assert result["map_tiles_per_s"] == pytest.approx(result["tiles"] / result["map_s"], rel=1e-2)
    ratio = result["map_tiles_per_s"] / result["encoder_tiles_per_s"]
    assert result["efficiency"] == pytest.approx(ratio, rel=1e-2, abs=1e-3)


def test_serve_section_runs_one_client_then_sixteen_without_errors(shared_data):
    from benchmarks import serve_concurrency

    result = serve_concurrency.run(
        "tiny", threads=1, shape={"sequential": 2, "per_client": 1, "max_tokens": 2, "rounds": 2}
    )
    one, many = result["one_at_a_time"], result["concurrent"]
    assert result["errors"] == 0 and (one["requests"], many["requests"]) == (4, 32)  # two rounds pooled
    assert one["rounds"] == many["rounds"] == 2
    assert many["largest_batch"] > 1  # concurrent requests were answered together
    ratio = many["throughput_rps"] / one["throughput_rps"]
    assert result["serve_concurrency_speedup"] == pytest.approx(ratio, rel=1e-2)
    for run in (one, many):  # the worker was at the model for part of each run (the server's clock brackets
        # the client's by a health request's time, hence the margin)
        assert 0 < run["worker"]["model_s"] and 0 < run["worker"]["busy_share"] <= 1.05
    split = result["worker"]  # its two factors multiply to the speed-up
    product = split["model_work_speedup"] * split["busy_share_ratio"]
    assert product == pytest.approx(result["serve_concurrency_speedup"], rel=0.02)
    assert many["latency_p50_s"] <= many["latency_p99_s"]
    resent = result["resent_image"]  # the shipped image feature cache, the same requests
    assert resent["image_cache"] > 0
    assert (resent["one_at_a_time"]["requests"], resent["concurrent"]["requests"]) == (4, 32)
    assert resent["one_at_a_time"]["errors"] == resent["concurrent"]["errors"] == 0
    varied = result["varied_lengths"]  # answers of different lengths, static against continuous batching
    for mode in ("static", "continuous"):
        entry = varied[mode]
        assert entry["errors"] == 0
        assert entry["speedup"] == pytest.approx(
            entry["concurrent_rps"] / entry["one_at_a_time_rps"], rel=1e-2
        )


def test_system_sections_give_their_keys_and_targets_in_their_direction():
    busy = {
        "steps": 2,
        "plip_batch": 2,
        "assistant_batch": 2,
        "cores": 2,
        "competing_process": "x",
        "shipped": "one",
        "settings": {
            "one": {
                "threads": 1,
                "idle": {"plip_step_s": 1.0, "assistant_step_s": 1.0},
                "busy": {"plip_step_s": 1.5, "assistant_step_s": 1.2},
                "slowdown": {"plip": 1.5, "assistant": 1.2},
            }
        },
        "busy_machine_slowdown": 1.5,
        "idle_speed_vs_best": {"plip": 1.0, "assistant": 1.0},
    }
    slides = {"rounds": 1, "batch_size": 8, "cases": {}, "slide_map_efficiency": {"a": 0.9, "b": 0.5}}
    run = {"requests": 4, "throughput_rps": 2.0, "latency_p50_s": 0.1, "latency_p99_s": 0.2}
    serve = {
        "tiny": {
            "clients": 16,
            "max_batch_size": 8,
            "batch_window_ms": 20.0,
            "max_tokens": 4,
            "one_at_a_time": {**run, "mean_batch_size": 1.0, "errors": 0},
            "concurrent": {**run, "throughput_rps": 9.0, "mean_batch_size": 7.5, "errors": 0},
            "serve_concurrency_speedup": 4.5,
            "resent_image": {
                "image_cache": 32,
                "one_at_a_time": {**run, "throughput_rps": 3.0, "mean_batch_size": 1.0, "errors": 0},
                "concurrent": {**run, "throughput_rps": 12.0, "mean_batch_size": 7.9, "errors": 0},
            },
            "varied_lengths": {
                "lengths": [8, 64],
                **{
                    mode: {
                        "one_at_a_time_rps": 2.0,
                        "concurrent_rps": rps,
                        "latency_p50_s": 0.1,
                        "latency_p99_s": 0.3,
                        "errors": 0,
                        "speedup": rps / 2.0,
                    }
                    for mode, rps in (("static", 5.0), ("continuous", 7.0))
                },
            },
        }
    }
    worker = {"model_s": 1.0, "prefill_s": 0.4, "decode_s": 0.5, "rows_per_step": 1.0}
    serve["tiny"]["one_at_a_time"]["worker"] = {**worker, "busy_share": 0.8}
    serve["tiny"]["concurrent"]["worker"] = {**worker, "busy_share": 0.6, "rows_per_step": 7.5}
    serve["tiny"]["worker"] = {
        "model_work_speedup": 6.0,
        "busy_share_ratio": 0.75,
        "prefill_per_request_s": [0.04, 0.02],
        "decode_step_s": [0.002, 0.003],
        "answer_tokens_for_goal": 12,
    }
    results = {
        "command": "python benchmarks/run.py --only busy-machine slide-map serve",
        "quick": True,
        "started": "now",
        "duration_s": 1.0,
        "machine": {"cpu": "t", "logical_cores": 2, "torch": "2", "transformers": "5", "cuda": None},
        "threads": {"threads": 1, "chosen_by": "--threads"},
        "load_average_end": None,
        "errors": [],
        "regimes": {},
        "preprocessing": {},
        "busy_machine": busy,
        "slide_map": slides,
        "serve": serve,
    }
    results.update(summarise(results))
    assert results["busy_machine_slowdown"] == 1.5
    assert results["slide_map_efficiency"] == {"a": 0.9, "b": 0.5}
    assert results["serve_concurrency_speedup"] == {"tiny": 4.5}
    met = {t["target"].split(":")[0]: (t["measured"], t["met"]) for t in results["targets"]}
    assert met["tiny training next to one busy process"] == (1.5, True)  # lower is better
    assert met["`slide map` tiles/s over PLIP encoding alone (worst slide and encoder)"] == (0.5, False)
    assert met["`pallava serve`, 16 concurrent clients over one at a time"] == (4.5, True)
    page = render(results)
    assert "## Training on a busy machine" in page and "| one | 1 | 1.0 | 1.5 | 1.50x |" in page
    assert "## Serving under concurrency" in page and "**4.5x**" in page
    assert "| tiny | 16 clients, image resent | 4 | 12.0 |" in page
    assert "| tiny | 16 clients | 1.0 | 0.6 | 0.4 | 0.5 | 7.5 |  |" in page
    assert "| tiny | 16 over 1 |  | 0.75x |  |  |  | **6.0x** model work |" in page
    assert "tiny: a request's prefill (image and prompt) took 0.04 s alone and 0.02 s each" in page
    assert "answers of about 12 tokens or more would reach 4x" in page
    assert (
        "Answers of 8, 64 tokens in turn" in page
        and "| continuous | 2.0 | 7.0 | 0.1 | 0.3 | 0 | 3.5x |" in page
    )


def test_a_re_measured_section_leaves_the_older_commands_provenance():
    from benchmarks.run import _still_current

    previous = {
        "merged": [
            {"command": "a", "sections": ["busy-machine", "serve"]},
            {"command": "b", "sections": ["slide-map"]},
        ]
    }
    kept = _still_current(previous, ["serve", "slide-map"])
    assert kept == [{"command": "a", "sections": ["busy-machine"]}]
    assert _still_current({}, ["serve"]) == []


def test_the_answer_length_for_the_serving_goal_is_the_shortest_that_reaches_it():
    from benchmarks.serve_concurrency import CLIENTS, answer_tokens_for

    prefill, step = (2.53, 2.64), (0.192, 0.307)  # seconds, as measured at paper-proportioned shapes

    def speedup(tokens: int) -> float:  # CLIENTS answers alone against together, the worker never waiting
        return CLIENTS * (prefill[0] + tokens * step[0]) / (CLIENTS * prefill[1] + tokens * step[1])

    tokens = answer_tokens_for(4.0, prefill, step)
    assert speedup(tokens) >= 4.0 > speedup(tokens - 1)
    assert answer_tokens_for(4.0, prefill, (0.1, 0.5)) is None  # steps of 16 rows cost too much: never
