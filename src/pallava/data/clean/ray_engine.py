"""The Ray engine of `pallava data clean`: decoding and judging as Ray Data operators over the input.

The input JSONL is cut into byte ranges of `chunk_size` records (the driver reads it once, without parsing).
Then, as one streaming Ray Data pipeline, in the configured stage order:

  ranges --map: read + parse + decode images (tasks)--> --map: image judge (actor pool)-->
         --map: text judge (actor pool)--> driver

A stage without a model (`length`, a judge of type `none`) runs inside the operator before it. Each judge
is a pool of actors that build the judge once (PLIP weights, an HTTP client and its answer cache). The
driver receives the chunks in input order and runs the pipeline's own duplicate stage and writer on them,
so the outputs, and every exactly-once and resume guarantee, are the local engine's. A worker that dies is
restarted and its chunk recomputed (Ray Data retries tasks and actor calls); nothing reaches the outputs
twice because only the driver writes them. Input, images and the output folder must be on storage every
node sees.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

from pallava.data.clean.config import STAGES, CleanConfig
from pallava.data.clean.judges import SCORER_LOADERS
from pallava.data.clean.pipeline import _Cleaner, _Entry, _parse_line, clean
from pallava.scale import cluster_resources, connect, import_ray

# CPUs each judge actor reserves: PLIP and the stain judge compute, the others wait on I/O or are trivial.
JUDGE_CPUS = {"plip": 1.0, "stain": 1.0, "openai": 0.25, "lexicon": 0.5}


def input_ranges(path: Path, first_line: int, chunk_size: int) -> list[dict[str, int]]:
    """Byte ranges of `chunk_size` non-empty lines each, from line `first_line` on."""
    ranges, count, start, first, offset = [], 0, 0, 0, 0
    with path.open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            if number >= first_line and line.strip():
                if count == 0:
                    start, first = offset, number
                count += 1
            offset += len(line)
            if count == chunk_size:
                ranges.append({"start": start, "end": offset, "first_line": first})
                count = 0
    if count:
        ranges.append({"start": start, "end": offset, "first_line": first})
    return ranges


def _stage_config(config: CleanConfig, middle: Sequence[str] = ()) -> CleanConfig:
    """The config with only the given middle stages: a worker builds just the judges it runs."""
    return replace(config, stages=[STAGES[0], *middle, STAGES[-1]], workers=1)


class _Decode:
    """Ray Data task: read one byte range of the input, parse its records, decode their images, then run
    the model-free stages that follow in the configured order (`length`)."""

    def __init__(self, input_path: str, config: CleanConfig, stages: Sequence[str] = ()) -> None:
        self.input_path, self.config = input_path, _stage_config(config, stages)

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        with open(self.input_path, "rb") as handle:
            handle.seek(row["start"])
            lines = handle.read(row["end"] - row["start"]).split(b"\n")
        chunk = [
            _parse_line(row["first_line"] + i, line.rstrip(b"\r"))
            for i, line in enumerate(lines)
            if line.strip()
        ]
        cleaner = _Cleaner(Path(self.input_path), self.config)
        cleaner.decode(chunk)
        cleaner.judge(chunk)
        return {"entries": pickle.dumps(chunk)}


class _Judge:
    """Ray Data actor: a judge stage (`image` or `text`), its judge built once per actor, and the model-free
    stages that follow it."""

    def __init__(
        self,
        input_path: str,
        config: CleanConfig,
        stages: Sequence[str],
        factory: Callable[[], Any] | None = None,
        loaders: dict[str, Callable[[Path, str], Any]] | None = None,
    ) -> None:
        # The driver's model loaders (e.g. PLIP's, registered by pallava.models.plip): a worker process has
        # not imported the package that registers them.
        SCORER_LOADERS.update(loaders or {})
        self.cleaner = _Cleaner(Path(input_path), _stage_config(config, stages))
        if factory is not None:
            setattr(self.cleaner, f"{stages[0]}_judge", factory())

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        chunk: list[_Entry] = pickle.loads(row["entries"])
        self.cleaner.judge(chunk)
        return {"entries": pickle.dumps(chunk)}


def operator_stages(
    config: CleanConfig, judges: dict[str, Callable[[], Any]] | None = None
) -> list[list[str]]:
    """The middle stages grouped into operators: decoding first, then one per judge with a model; a stage
    without a model (`length`, or a judge of type `none`) joins the operator before it (a new process per
    trivial stage would cost more than the stage)."""
    groups: list[list[str]] = [[]]
    for stage in config.stages[1:-1]:
        spec = {"image": config.image_judge, "text": config.text_judge}.get(stage, {"type": "none"})
        if (judges or {}).get(stage) is not None or spec["type"] != "none":
            groups.append([stage])
        else:
            groups[-1].append(stage)
    return groups


def clean_on_ray(
    input_path: str | Path,
    out_dir: str | Path,
    config: CleanConfig | None = None,
    progress: bool = True,
    address: str | None = None,
    judges: dict[str, Callable[[], Any]] | None = None,
) -> dict[str, Any]:
    """`clean` with the decoding and judging on the Ray cluster at `address` (default: a local instance)."""
    import_ray()  # before any work: a clear error when Ray is not installed
    return clean(input_path, out_dir, config, progress, judges, engine=partial(ray_chunks, address=address))


def ray_chunks(
    input_path: Path,
    pending: Iterator[_Entry],
    done: set[str],
    config: CleanConfig,
    progress: bool = True,
    judges: dict[str, Callable[[], Any]] | None = None,
    address: str | None = None,
) -> Iterator[list[_Entry]]:
    """The pending records, decoded and judged on Ray, as chunks in input order (what `clean` writes).

    `judges` maps a stage (`image`, `text`) to a function that builds its judge in the worker, instead of
    the config's `type` (a custom judge; the config's decision settings still guard resuming).
    """
    first = next(pending, None)
    if first is None:
        return
    connect(address)
    import ray.data  # binds `ray` too

    resources = cluster_resources(ray)
    # A dataset takes the context's settings when it is created, so set them first and restore them after.
    context = ray.data.DataContext.get_current()
    saved = (context.execution_options.preserve_order, context.enable_progress_bars)
    context.execution_options.preserve_order = True  # chunks reach the writer in input order
    context.enable_progress_bars = progress
    try:
        for row in _pipeline(ray, input_path, first.line, config, resources, judges).iter_rows():
            # entries travel pickled between our own workers and this driver;
            # `done` guards a resume whose finished records are not a prefix of the input
            chunk = [entry for entry in pickle.loads(row["entries"]) if entry.id not in done]
            if chunk:
                yield chunk
    finally:
        context.execution_options.preserve_order, context.enable_progress_bars = saved


def judge_resources(
    spec: dict[str, Any], resources: dict[str, float]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """How one judge's actor pool is placed: (Ray Data `map` arguments, the judge spec its actors build).

    A PLIP judge takes one GPU per actor when the cluster has GPUs (up to one actor per GPU; unless its
    spec says `device: cpu`); otherwise
    each actor reserves `JUDGE_CPUS[type]` CPUs, and a pool uses at most half the cluster's CPUs, so that
    decoding keeps the rest.
    """
    if (
        spec["type"] == "plip"
        and resources["GPU"] >= 1
        and str(spec.get("device", "cuda")).startswith("cuda")
    ):
        placement = {"num_cpus": 1, "num_gpus": 1, "concurrency": (1, int(resources["GPU"]))}
        return placement, {**spec, "device": spec.get("device", "cuda")}
    per_actor = JUDGE_CPUS.get(spec["type"], 1.0)
    return {"num_cpus": per_actor, "concurrency": (1, max(1, int(resources["CPU"] / 2 / per_actor)))}, spec


def _pipeline(
    ray: Any,
    input_path: Path,
    first_line: int,
    config: CleanConfig,
    resources: dict[str, float],
    judges: dict[str, Callable[[], Any]] | None,
) -> Any:
    """The Ray Data plan: decode tasks, then one actor pool per judge, in the configured stage order."""
    decode, *judged = operator_stages(config, judges)
    dataset = ray.data.from_items(input_ranges(input_path, first_line, config.chunk_size))
    dataset = dataset.map(_Decode(str(input_path), config, decode), num_cpus=1)
    for stages in judged:
        field = "image_judge" if stages[0] == "image" else "text_judge"
        placement, spec = judge_resources(getattr(config, field), resources)
        stage_config = replace(config, **{field: spec})
        dataset = dataset.map(
            _Judge,
            fn_constructor_args=(
                str(input_path),
                stage_config,
                stages,
                (judges or {}).get(stages[0]),
                dict(SCORER_LOADERS),
            ),
            **placement,
        )
    return dataset
