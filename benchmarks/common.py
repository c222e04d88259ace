"""Shared measuring tools: medians of interleaved repeats, thread choice, matmul peak, memory, machine
facts."""

from __future__ import annotations

import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def sync(device: torch.device | str = "cpu") -> None:
    """Wait for queued GPU work so that wall-clock timings are complete (no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: torch.device | str = "cpu") -> float:
    """Wall-clock seconds one call of `fn` takes."""
    return clocked(fn, device)[0]


def clocked(fn: Callable[[], object], device: torch.device | str = "cpu") -> tuple[float, float]:
    """(wall-clock, CPU) seconds of one call of `fn`.

    CPU time counts only the time this process ran, so on a shared machine it measures the work done,
    not how much of the machine the scheduler handed out.
    """
    sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def interleaved(
    jobs: Mapping[str, Callable[[], object]], rounds: int, device: torch.device | str = "cpu"
) -> dict[str, list[float]]:
    """Time every job once per round, rotating the order each round.

    On a shared machine the load drifts; alternating the jobs gives each the same mix of quiet and busy
    moments, so their ratio is fair even when absolute times are not.
    """
    names = list(jobs)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(timed(jobs[name], device))
    return times


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MiB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if sys.platform != "darwin" else peak / 2**20  # Linux reports KiB, macOS bytes


def current_rss_mb() -> float:
    """Resident memory of this process now (MiB), from /proc where available."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return peak_rss_mb()


def _mixed_workload(dtype: torch.dtype) -> Callable[[], None]:
    """A small stand-in for a transformer block: mid-sized matmuls, layer norms and an activation."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(196, 768, generator=generator).to(dtype)
    w1 = (torch.randn(768, 3072, generator=generator) * 0.02).to(dtype)
    w2 = (torch.randn(3072, 768, generator=generator) * 0.02).to(dtype)

    def work() -> None:
        with torch.inference_mode():
            h = x
            for _ in range(8):
                h = torch.nn.functional.layer_norm(torch.nn.functional.gelu(h @ w1) @ w2 + h, (768,))

    return work


def choose_threads(requested: int | None, dtype: torch.dtype, rounds: int = 3) -> dict:
    """Set torch's thread count: `requested`, or the faster of 1 and all cores on a probe workload.

    On a busy machine one thread can beat several: every parallel region waits for its slowest thread,
    and a thread that the OS has descheduled stalls them all.
    """
    cores = os.cpu_count() or 1
    if requested is not None:
        torch.set_num_threads(requested)
        return {"threads": requested, "chosen_by": "--threads"}
    candidates = sorted({1, cores})
    work = _mixed_workload(dtype)
    probe: dict[int, list[float]] = {n: [] for n in candidates}
    for _ in range(rounds):
        for n in candidates:
            torch.set_num_threads(n)
            work()  # warm-up at this setting
            probe[n].append(timed(work))
    best = min(candidates, key=lambda n: median(probe[n]))
    torch.set_num_threads(best)
    return {
        "threads": best,
        "chosen_by": "probe",
        "probe_s": {str(n): round(median(t), 4) for n, t in probe.items()},
    }


def matmul_flops_per_s(n: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> tuple[float, float]:
    """Achieved (per wall-clock second, per CPU second) FLOP/s of one (n x n) @ (n x n) product, after a
    warm-up."""
    generator = torch.Generator().manual_seed(n)
    a = torch.randn(n, n, generator=generator).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=generator).to(device=device, dtype=dtype)
    with torch.inference_mode():
        a @ b
        wall, cpu = clocked(lambda: a @ b, device)
    return 2 * n**3 / wall, 2 * n**3 / max(cpu, 1e-9)


def matmul_peak(
    dtype: torch.dtype, sizes: tuple[int, ...] = (1024, 2048, 4096), device: torch.device | str = "cpu"
) -> tuple[float, float]:
    """This machine's measured matmul peak: the best (wall, CPU) FLOP/s over a few square sizes."""
    rates = [matmul_flops_per_s(n, dtype, device) for n in sizes]
    return max(r[0] for r in rates), max(r[1] for r in rates)


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def machine_info() -> dict:
    """What the numbers were measured on."""
    import transformers

    info = {
        "cpu": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    if hasattr(os, "getloadavg"):
        info["load_average_1m"] = round(os.getloadavg()[0], 2)
    return info


def command_line(script: str, args: Sequence[str]) -> str:
    """How a benchmark was invoked, quoted so that it can be pasted back into a shell."""
    return " ".join(["python", f"benchmarks/{script}", *map(shlex.quote, args)])


def load_average() -> float | None:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def run_worker(module: str, args: list[str], timeout: float | None = None) -> dict:
    """Run `python -m benchmarks.<module> ARGS --json-out FILE` in a fresh process and return its JSON.

    A fresh process per model keeps each peak-memory reading to that model alone.
    """
    out = ROOT / "benchmarks" / "results" / f"{module}-{os.getpid()}-{time.time_ns()}.json.tmp"
    out.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", f"benchmarks.{module}", *args, "--json-out", str(out)]
    try:
        code = subprocess.run(command, cwd=ROOT, timeout=timeout).returncode  # its progress and errors show
        if code != 0 or not out.is_file():
            raise RuntimeError(
                f"benchmark worker `{' '.join(command[1:])}` failed with exit code {code} (see above)"
            )
        return json.loads(out.read_text())
    finally:
        out.unlink(missing_ok=True)


def write_json(path: str | Path, data: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def section_main(argv: list[str] | None, description: str, run: Callable[..., dict]) -> int:
    """Command line of a benchmark section: `--regime R [--quick] [--threads N] --json-out FILE`."""
    import argparse

    from benchmarks.systems import REGIMES

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--regime", choices=sorted(REGIMES), required=True)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--json-out", required=True)
    args = parser.parse_args(argv)
    write_json(args.json_out, run(args.regime, quick=args.quick, threads=args.threads))
    return 0


SHIFT_DATASETS = ("lc25000-lung", "lc25000-colon", "oscc")


def datasets_cell(values: Sequence[float]) -> str:
    """A table cell: the mean over the datasets, then each dataset's value (lung / colon / oral)."""
    return f"{sum(values) / len(values):.3f} ({' / '.join(f'{v:.2f}' for v in values)})"


Shifts = Mapping[str, Callable[[list], tuple[list, list]]]  # name -> dev items -> (images, their labels)


def shifts_table(
    first: str, columns: Sequence[str], reference: str, mean_label: str, entries: Mapping[str, dict]
) -> list[str]:
    """Markdown lines of a table of {name: {dataset: {column: accuracy}}}: a `datasets_cell` per column,
    then the mean over every dataset and column but `reference` (the unshifted view). A column that a row's
    results predate shows `-` and is left out of that row's mean."""
    import numpy as np

    lines = [
        f"| {first} | " + " | ".join(columns) + f" | {mean_label} |",
        "|---|" + "---|" * (len(columns) + 1),
    ]
    for name, scores in entries.items():
        measured = [c for c in columns if all(c in scores[d] for d in SHIFT_DATASETS)]
        cells = [
            datasets_cell([scores[d][column] for d in SHIFT_DATASETS]) if column in measured else "-"
            for column in columns
        ]
        shifted = np.mean([scores[d][c] for d in SHIFT_DATASETS for c in measured if c != reference])
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {shifted:.3f} |")
    return lines


def _accuracy_under_shifts(classify: Callable[[list, object], list[str]], shifts: Shifts) -> dict:
    """{dataset: {shift: accuracy}} of `classify(images, label_map) -> labels` on each shared dataset's dev
    split under each shift, over the dataset's own classes."""
    import numpy as np

    from pallava.data.importers.manifest import read_manifest
    from pallava.data.labels import LabelMap

    scores: dict[str, dict[str, float]] = {}
    for dataset in SHIFT_DATASETS:
        items = read_manifest(ROOT.parent / "shared" / "data" / dataset / "manifest.csv", "dev")
        label_map = LabelMap.resolve(None, {item.label for item in items})
        for name, shifted in shifts.items():
            images, truth = shifted(items)
            predicted = classify(images, label_map)
            accuracy = float(np.mean([p == t for p, t in zip(predicted, truth, strict=True)]))
            scores.setdefault(dataset, {})[name] = round(accuracy, 4)
    return scores


def zeroshot_under_shifts(
    model: Path, shifts: Shifts, stain_normalize: str | None = None, head: str = "contrastive"
) -> dict:
    """A trained PLIP's zero-shot accuracy under each shift (prompt ensembles of each class's names, by its
    contrastive or matching head), the images stain-normalised first if asked (`--stain-normalize`)."""
    from pallava.models.plip import PlipZeroShot
    from pallava.models.plip.zeroshot import classify_images
    from pallava.processing.stain_norm import resolve_stain_normalize

    zs = PlipZeroShot.from_pretrained(model)
    zs.stain_normalize = resolve_stain_normalize(stain_normalize, zs.stain_normalize)
    return _accuracy_under_shifts(
        lambda images, label_map: classify_images(zs, images, label_map, head=head)[0], shifts
    )


def assistant_under_shifts(
    model: Path,
    shifts: Shifts,
    batch_size: int = 16,
    stain_normalize: str | None = None,
    class_answers: str = "likelihood",
) -> dict:
    """A trained assistant's class answers under each shift to the evaluation suite's class-choice question:
    the class name it is likeliest to answer (`likelihood`, the suite's default), or its generated answer
    mapped to a label by the label map's names and synonyms (`generated`; anything else counts as wrong)."""
    from pallava.eval.runner import CLASS_ANSWERS, UNMAPPED, likeliest_names, zeroshot_question
    from pallava.inference import PaLlava

    if class_answers not in CLASS_ANSWERS:
        raise ValueError(f"class_answers must be one of {', '.join(CLASS_ANSWERS)}, got {class_answers!r}")
    assistant = PaLlava.from_pretrained(model, stain_normalize=stain_normalize)

    def classify(images: list, label_map) -> list[str]:
        question = zeroshot_question(label_map)
        if class_answers == "likelihood":
            answers, _ = likeliest_names(assistant, images, question, label_map)
        else:
            answers = assistant.ask_batch(
                images, [question] * len(images), batch_size=batch_size, max_new_tokens=24
            )
        return [label_map.label_for(answer) or UNMAPPED for answer in answers]

    return _accuracy_under_shifts(classify, shifts)
