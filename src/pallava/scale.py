"""Ray, imported only when a command asks for `--engine ray` (it is the optional extra `pallava[ray]`)."""

from __future__ import annotations

import argparse
from types import ModuleType
from typing import Any

ENGINES = ("local", "ray")


def import_ray() -> ModuleType:
    """The `ray` module, or a ValueError that says how to install it."""
    try:
        import ray
    except ImportError:
        raise ValueError(
            "--engine ray needs Ray, which is not installed: pip install 'pallava[ray]' (or ray==2.60.0)"
        ) from None
    return ray


def connect(address: str | None = None) -> ModuleType:
    """Join the Ray cluster at `address` (`auto`: the one `ray start` runs here), or start a local one.

    A Ray session that is already open in this process (a notebook, a test) is reused as it is.
    """
    ray = import_ray()
    if not ray.is_initialized():
        # The dashboard costs a process and a port; a batch job has no use for it.
        try:
            ray.init(
                address=address, include_dashboard=False if address is None else None, log_to_driver=False
            )
        except ConnectionError as error:
            raise ValueError(
                f"--ray-address {address}: cannot join a Ray cluster there ({error}); "
                "start one with `ray start --head`"
            ) from None
    return ray


def cluster_resources(ray: ModuleType) -> dict[str, Any]:
    """CPU and GPU counts of the whole cluster (what worker pools are sized against)."""
    resources = ray.cluster_resources()
    return {"CPU": float(resources.get("CPU", 0.0)), "GPU": float(resources.get("GPU", 0.0))}


def add_engine_arguments(parser: argparse.ArgumentParser, local: str) -> None:
    """`--engine local|ray` and `--ray-address`; `local` says what the local engine does."""
    parser.add_argument(
        "--engine",
        choices=ENGINES,
        default="local",
        help=f"{local} (local), or on a Ray cluster (ray; needs pallava[ray])",
    )
    parser.add_argument(
        "--ray-address",
        help="Ray cluster to join (auto: the one `ray start` runs here); default: start a local Ray instance",
    )
