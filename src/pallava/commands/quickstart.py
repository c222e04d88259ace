"""`pallava quickstart`: the whole pipeline end to end on real labelled tiles (what `make demo` runs)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pallava.processing.stain_norm import STAIN_NORMALIZERS


def run(args: argparse.Namespace) -> int:
    from pallava.quickstart import DEFAULT_DATA, DEFAULT_SAMPLES, Quickstart, QuickstartSettings
    from pallava.train.launch import default_processes

    processes = default_processes() if args.processes == "auto" else int(args.processes)
    try:
        check_recipe_overrides(args.plip_set, args.train_set)
    except ValueError as error:
        print(f"pallava quickstart: {error}", file=sys.stderr)
        return 2
    plip_args = list(args.plip_set)
    if args.stain_normalize:  # recorded in PLIP's tower: the assistant trained on it and every evaluation too
        plip_args.append(f"stain_normalize={args.stain_normalize}")

    settings = QuickstartSettings(
        data=[Path(path) for path in args.data] if args.data else list(DEFAULT_DATA),
        out=Path(args.out),
        samples=Path(args.samples) if args.samples else DEFAULT_SAMPLES,
        labels=args.labels,
        smoke=args.smoke,
        seed=args.seed,
        progress=not args.no_progress,
        slides=not args.no_slides,
        processes=1 if args.smoke else processes,
        plip_args=plip_args,
        train_overrides=list(args.train_set),
    )
    try:
        Quickstart(settings).run()
    except RuntimeError as error:  # a step's command failed; it printed its own error above
        print(f"pallava quickstart: stopped: {error}", file=sys.stderr)
        return 1
    return 0


def check_recipe_overrides(plip_set: list[str], train_set: list[str]) -> None:
    """Reads the demo's recipes with the overrides before any step runs, so that a misspelt key or an
    ill-typed value stops the run at once (`ValueError` naming the recipe and the key), not minutes in."""
    from pallava.quickstart.settings import CONFIGS
    from pallava.train.config import deep_merge, load_recipe, parse_overrides
    from pallava.train.plip_config import PlipTrainConfig

    if plip_set:
        PlipTrainConfig.from_yaml(CONFIGS / "plip-tiny.yaml", **parse_overrides(plip_set))
    if train_set:
        for stage in ("align", "instruct"):
            given: dict = {"data": {"path": "the run's data"}}  # the run sets these; validate() asks for them
            if stage == "instruct":
                given["model"] = {"init": "stage align's model"}
            load_recipe(
                CONFIGS / "assistant-tiny.yaml", stage, deep_merge(given, parse_overrides(train_set))
            ).validate()


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "quickstart",
        help="end to end on real tiles: corpus, PLIP, assistant (2 stages), evaluation, an answer, "
        "whole slides",
        description="Build a corpus from labelled manifests, pre-train PLIP, train the assistant in two "
        "stages, evaluate on each dataset's dev split, answer an example question, then train and evaluate "
        "the slide stage on virtual slides (train tiles for training, dev tiles for evaluation). Completed "
        "steps are skipped on re-runs.",
    )
    parser.add_argument(
        "--data",
        action="append",
        help="folder with manifest.csv (path,label,cluster,split), the CSV itself or a YAML dataset "
        "list; repeat for several datasets (default: ../shared/data/{lc25000-lung,lc25000-colon,oscc})",
    )
    parser.add_argument("--out", default="runs/quickstart", help="output folder (default: runs/quickstart)")
    parser.add_argument(
        "--samples", help="folder with non-pathology/ images mixed into the corpus for the cleaning demo"
    )
    parser.add_argument(
        "--labels",
        help="built-in label map name or JSON/YAML label file (default: each dataset's built-in map, merged)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--smoke", action="store_true", help="a few images and steps per stage (tests, first look)"
    )
    parser.add_argument(
        "--no-slides",
        action="store_true",
        help="skip the whole-slide step (virtual slides, stage slide, slide evaluation)",
    )
    parser.add_argument(
        "--processes",
        choices=["auto", "1", "2", "4"],
        default="auto",
        help="data-parallel processes of stage align, one thread each (default auto: one per core, up to "
        "4; PLIP and stage instruct use threads); 1 on a machine that is busy with other work",
    )
    parser.add_argument(
        "--stain-normalize",
        choices=STAIN_NORMALIZERS,
        help="train PLIP on stain-normalised images (recorded in the model: the assistant trained on its "
        "tower and every evaluation normalise too). Off by default: it reads another lab's stain better and "
        "the training labs' own images worse (docs/robustness.md). A folder made without it is refused",
    )
    parser.add_argument(
        "--plip-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="change a field of PLIP's recipe (configs/plip-tiny.yaml), e.g. augment.grayscale=0.2 for a "
        "target lab whose colours differ (docs/plip.md); repeat for several",
    )
    parser.add_argument(
        "--train-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="change a field of the assistant's recipe (configs/assistant-tiny.yaml) for both stages, e.g. "
        "optim.lr=1e-3; repeat for several. Both are recorded: a folder made with others is refused",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.set_defaults(func=run)
