"""The Ray engine of `slide map --cohort`: a pool of actors, each holding the PLIP model once.

Pool size: one actor per GPU when the cluster has GPUs (each actor reserves one and runs PLIP there),
else one per `CPUS_PER_WORKER` CPUs; never more actors than slides. A worker that dies mid-slide (node
lost, process killed) is restarted and the slide is retried up to `RETRIES` times; it resumes from the
embeddings its previous attempt flushed, so the retry costs only the unflushed tiles. A slide whose
worker keeps dying is reported as failed and the cohort goes on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import Any

from pallava.scale import cluster_resources, connect
from pallava.slides.cohort import CohortSettings, CohortSlide, SlideMapper, failure_row

CPUS_PER_WORKER = 1  # PLIP inference uses one core well; tile reading runs in the actor's threads
RETRIES = 3


def pool_size(
    resources: dict[str, float], slides: int, workers: int | None = None
) -> tuple[int, dict[str, float]]:
    """How many actors and what each reserves: GPUs when present, else CPUs."""
    if resources["GPU"] >= 1:
        count, per_actor = int(resources["GPU"]), {"num_cpus": CPUS_PER_WORKER, "num_gpus": 1}
    else:
        count, per_actor = (
            max(1, int(resources["CPU"] // CPUS_PER_WORKER)),
            {"num_cpus": CPUS_PER_WORKER, "num_gpus": 0},
        )
    return max(1, min(workers or count, slides)), per_actor


def map_on_ray(
    slides: Sequence[CohortSlide],
    model_dir: str,
    out_dir: str,
    settings: CohortSettings,
    address: str | None = None,
    workers: int | None = None,
    load_model: Callable[[str, str], Any] | None = None,
) -> Iterator[dict[str, Any]]:
    """Map `slides` on the Ray cluster at `address`; yields one cohort row per slide as it finishes."""
    ray = connect(address)
    count, per_actor = pool_size(cluster_resources(ray), len(slides), workers)
    if per_actor["num_gpus"] and settings.device == "cpu":
        settings = replace(settings, device="cuda")
    actor_class = ray.remote(max_restarts=-1, max_task_retries=RETRIES, **per_actor)(SlideMapper)
    actors = [actor_class.remote(model_dir, settings, out_dir, load_model) for _ in range(count)]
    queue = list(reversed(slides))
    running: dict[Any, tuple[Any, CohortSlide]] = {}
    try:
        while queue or running:
            idle = [a for a in actors if all(a is not busy for busy, _ in running.values())]
            for actor in idle[: len(queue)]:
                slide = queue.pop()
                running[actor.map.remote(slide)] = (actor, slide)
            (done,), _ = ray.wait(list(running), num_returns=1)
            _, slide = running.pop(done)
            try:
                yield ray.get(done)
            except ray.exceptions.RayActorError as error:  # its worker died RETRIES + 1 times
                yield failure_row(slide, RuntimeError(f"worker died mapping this slide: {error}"))
            except ray.exceptions.RayTaskError as error:  # the model failed to load, or a bug
                yield failure_row(slide, error.as_instanceof_cause())
    finally:
        for actor in actors:
            ray.kill(actor)
