"""`pallava plip ...`: pre-train PLIP, zero-shot classification, retrieval, vision-tower export and
conversion."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pallava.commands import add_max_pixels_argument, add_stain_normalize_argument
from pallava.commands.train import add_run_arguments
from pallava.models.plip.prompts import ZEROSHOT_HEADS
from pallava.processing.stain_norm import resolve_stain_normalize
from pallava.train.plip_probe import PROBE_FEATURES


def _train(args: argparse.Namespace) -> int:
    from pallava.train.config import parse_overrides
    from pallava.train.plip import train_plip
    from pallava.train.plip_config import PlipTrainConfig

    overrides = {
        "preset": args.preset,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "text_init": args.text_init,
        "vision_init": args.vision_init,
        "seed": args.seed,
        "max_steps": args.max_steps,
        "save_every": args.save_every,
        "eval_every": args.eval_every,
        "num_workers": args.num_workers,
        "mixed_precision": args.mixed_precision,
        "balance": args.balance,
        **parse_overrides(list(args.overrides)),  # key=value, last: as `pallava train`
    }
    if args.config:
        recipe = PlipTrainConfig.from_yaml(args.config, **overrides)
    else:
        recipe = PlipTrainConfig.for_preset(overrides.pop("preset") or "tiny", **overrides)
    summary = train_plip(
        args.data,
        args.out,
        recipe,
        split=args.split if args.split is not None else _default_split(args.data, "train"),
        label_map=args.label_map,
        eval_data=args.eval_data,
        eval_split=args.eval_split,
        resume=args.resume == "auto",
        show_progress=not args.no_progress,
    )
    if summary:
        print(json.dumps(summary, indent=2))
    return 0


def _zeroshot(args: argparse.Namespace) -> int:
    from pallava.eval.runner import check_images
    from pallava.models.plip import PlipZeroShot
    from pallava.models.plip.prompts import ZEROSHOT_TEMPLATES
    from pallava.processing.image import check_max_pixels
    from pallava.train.plip_data import read_plip_data
    from pallava.train.plip_eval import write_zeroshot_report, zeroshot_report

    split = args.split if args.split is not None else _default_split(args.data, "dev")
    samples, label_map = read_plip_data(args.data, split, args.label_map or _saved_label_map(args.model))
    if label_map is None:
        raise ValueError(f"{args.data}: zero-shot classification needs a labelled manifest (.csv)")
    if not args.label_map:  # the model's map may span several organs: the task is the data's organs'
        label_map = label_map.of_organs({sample.label for sample in samples})
    templates = _read_templates(args.templates) if args.templates else ZEROSHOT_TEMPLATES
    zs = PlipZeroShot.from_pretrained(args.model)
    zs.stain_normalize = resolve_stain_normalize(args.stain_normalize, zs.stain_normalize)
    if args.max_pixels is not None:
        zs.max_pixels = check_max_pixels(args.max_pixels, "--max-pixels")
    check_images([sample.image for sample in samples], zs.max_pixels)
    report, rows = zeroshot_report(zs, samples, label_map, templates, args.batch_size, args.head)
    report.update(model=str(args.model), data=str(args.data), split=split)
    path = write_zeroshot_report(report, rows, Path(args.out))
    print(f"accuracy {report['accuracy']:.4f}  macro F1 {report['macro_f1']:.4f}  n={report['n']}  -> {path}")
    return 0


def _probe(args: argparse.Namespace) -> int:
    from pallava.data.datasets import parse_data_args
    from pallava.data.importers.manifest import is_image_folder, read_labelled_images
    from pallava.eval.runner import check_images
    from pallava.models.plip import PlipZeroShot
    from pallava.processing.image import check_max_pixels
    from pallava.train.plip_eval import write_classification_report
    from pallava.train.plip_probe import few_shots, probe_report, probe_summary

    zs = PlipZeroShot.from_pretrained(args.model)
    zs.stain_normalize = resolve_stain_normalize(args.stain_normalize, zs.stain_normalize)
    if args.max_pixels is not None:
        zs.max_pixels = check_max_pixels(args.max_pixels, "--max-pixels")
    out = Path(args.out)
    reports = {}
    specs = parse_data_args(args.data).datasets
    other = None  # another dataset (another lab, scanner, magnification) with the same classes
    if args.score_data:
        if len(specs) != 1:
            raise ValueError(
                f"--score-data scores one fitted probe: give one --data to fit on, not {len(specs)}"
            )
        other = parse_data_args([args.score_data]).datasets[0]
    for spec in specs:
        if is_image_folder(Path(spec.path)):
            raise ValueError(
                f"{spec.path}: a linear probe needs a manifest with a {args.fit_split!r} split "
                f"to fit on and a {args.split!r} split to score (an image folder has no splits)"
            )
        fit_items = few_shots(read_labelled_images(spec.path, args.fit_split), args.shots, args.seed)
        scored = other or spec
        scored_split = None if is_image_folder(Path(scored.path)) else args.split
        eval_items = read_labelled_images(scored.path, scored_split)
        check_images([item.path for item in [*fit_items, *eval_items]], zs.max_pixels)
        report, rows = probe_report(zs, fit_items, eval_items, args.features, args.seed, args.batch_size)
        report.update(
            model=str(args.model),
            data=str(spec.path),
            fit_split=args.fit_split,
            scored_data=str(scored.path),
            split=scored_split,
            shots=args.shots,
        )
        write_classification_report(report, rows, out / scored.name, f"PLIP linear probe ({args.features})")
        reports[scored.name] = report
        print(
            f"{scored.name}: accuracy {report['accuracy']:.4f}  macro F1 {report['macro_f1']:.4f}  "
            f"n={report['n']}  fitted on {report['fit_images']}  C={report['search']['C']:g}"
        )
    (out / "summary.json").write_text(json.dumps(reports, indent=2), encoding="utf-8")
    (out / "summary.md").write_text(
        f"# PLIP linear probe\n\n- model: `{args.model}`\n\n{probe_summary(reports)}", encoding="utf-8"
    )
    print(f"summary: {out / 'summary.md'}")
    return 0


def _default_split(data: str | list[str], split: str) -> str | None:
    """`split`, except when every dataset is an image folder (root/<class>/<image>), which has no splits:
    all of it."""
    from pallava.data.importers.manifest import is_image_folder

    paths = data if isinstance(data, list) else [data]
    return None if all(is_image_folder(path) for path in paths) else split


def _saved_label_map(model_dir: str) -> str | None:
    """The label map saved beside a model trained on a labelled manifest, if any."""
    path = Path(model_dir) / "label_map.json"
    return str(path) if path.is_file() else None


def _read_templates(path: str) -> tuple[str, ...]:
    """One template per line, each with a `{name}` slot (and optionally `{organ}`)."""
    templates = tuple(
        line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()
    )
    bad = [t for t in templates if "{name}" not in t]
    if not templates or bad:
        raise ValueError(f"{path}: every template line needs a {{name}} slot (bad: {bad[:3]})")
    return templates


def _retrieve(args: argparse.Namespace) -> int:
    from pallava.models.plip import PlipZeroShot
    from pallava.train.plip_data import read_plip_data
    from pallava.train.plip_eval import retrieval_report

    samples, label_map = read_plip_data(args.data, args.split, args.label_map or _saved_label_map(args.model))
    report = retrieval_report(
        PlipZeroShot.from_pretrained(args.model), samples, label_map, batch_size=args.batch_size
    )
    report.update(model=str(args.model), data=str(args.data), split=args.split)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    print(json.dumps({k: report[k] for k in ("n", "image_to_text", "text_to_image")}))
    return 0


def _export(args: argparse.Namespace) -> int:
    from pallava.models.plip import export_vision_tower

    print(f"vision tower written to {export_vision_tower(args.model, args.out)}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from pallava.convert.plip import convert_plip_checkpoint

    print(f"CLIP vision model written to {convert_plip_checkpoint(args.checkpoint, args.out)}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `pallava plip` and its sub-commands."""
    plip = subparsers.add_parser(
        "plip", help="PLIP image-text encoder: train, zero-shot, linear probe, retrieval, export"
    )
    commands = plip.add_subparsers(dest="plip_command", metavar="SUBCOMMAND", required=True)

    train = commands.add_parser("train", help="pre-train PLIP (ITC + ITM) on captions or a labelled manifest")
    add_run_arguments(
        train,
        config_help="recipe YAML, read over its preset's configs/plip-<preset>.yaml (default: that file)",
        data_help="caption JSONL ({image, caption}), manifest CSV (path,label,...) or a YAML dataset list "
        "(several are balanced, see docs/data.md)",
        out_help="output folder (model, checkpoints/, run log, tensorboard/)",
        data_required=True,
    )
    train.add_argument(
        "--split", help="split to train on (default: train; every image when the data are image folders)"
    )
    train.add_argument(
        "--preset", choices=("tiny", "paper"), help="model preset (default: the recipe's, tiny)"
    )
    train.add_argument("--label-map", help="built-in label map name or JSON/YAML file (default: auto)")
    train.add_argument("--epochs", type=float)
    train.add_argument("--batch-size", type=int, help="per-process batch size")
    train.add_argument("--lr", type=float)
    train.add_argument("--text-init", help="'minilm', 'scratch' or a local BERT checkpoint folder")
    train.add_argument("--vision-init", help="local CLIP checkpoint folder or the authors' PLIP state dict")
    train.add_argument("--save-every", type=int, help="steps between checkpoints (default: each epoch)")
    train.add_argument("--eval-every", type=int, help="steps between zero-shot evaluations")
    train.add_argument(
        "--balance",
        choices=("sqrt", "equal", "proportional", "none"),
        help="how several datasets are balanced (default: sqrt; see docs/data.md)",
    )
    train.add_argument("--eval-data", help="labelled manifest for zero-shot accuracy during training")
    train.add_argument("--eval-split", default="dev")
    train.add_argument("--num-workers", type=int)
    train.add_argument("--mixed-precision", choices=("no", "bf16"))
    train.set_defaults(func=_train)

    zeroshot = commands.add_parser("zeroshot", help="prompt-ensemble zero-shot classification report")
    zeroshot.add_argument("--model", required=True, help="PLIP model folder")
    zeroshot.add_argument(
        "--data",
        required=True,
        help="labelled manifest CSV (or a folder holding manifest.csv), or an image folder "
        "root/<class>/<image>",
    )
    zeroshot.add_argument(
        "--split", help="default: dev (every image of an image folder, which has no splits)"
    )
    zeroshot.add_argument("--out", required=True, help="report folder (report.json, confusion_matrix.png)")
    zeroshot.add_argument(
        "--label-map",
        help="built-in label map name or file (default: the model's own, restricted to the organs of the "
        "data's classes, as in the paper's protocol; else the built-in map covering the labels)",
    )
    zeroshot.add_argument("--templates", help="text file, one prompt template per line with {name}")
    zeroshot.add_argument("--batch-size", type=int, default=64)
    zeroshot.add_argument(
        "--head",
        choices=ZEROSHOT_HEADS,
        default="contrastive",
        help="contrastive: image embedding against the prompts' embeddings (default); matching: the "
        "image-text matching head's verdict on each prompt (slower, often more accurate: docs/plip.md)",
    )
    add_stain_normalize_argument(zeroshot)
    add_max_pixels_argument(zeroshot)
    zeroshot.set_defaults(func=_zeroshot)

    probe = commands.add_parser(
        "probe", help="linear probe of the frozen image features: fit on one split, score another"
    )
    probe.add_argument("--model", required=True, help="PLIP model folder")
    probe.add_argument(
        "--data",
        required=True,
        action="append",
        help="labelled manifest CSV (or a folder holding manifest.csv); repeat for several datasets, each "
        "probed on its own (or a YAML dataset list)",
    )
    probe.add_argument("--out", required=True, help="report folder: one folder per dataset, summary.md")
    probe.add_argument(
        "--fit-split", default="train", help="the split the probe is fitted on (default: train)"
    )
    probe.add_argument("--split", default="dev", help="the split it is scored on (default: dev)")
    probe.add_argument(
        "--score-data",
        help="score the probe fitted on the one --data on another dataset of the same classes instead (a "
        "manifest, scored on --split, or an image folder root/<class>/<image>, scored whole): another lab, "
        "scanner or magnification",
    )
    probe.add_argument(
        "--shots",
        type=int,
        help="fit on this many images of each class (seeded), a few-shot probe; default: all",
    )
    probe.add_argument(
        "--features",
        choices=PROBE_FEATURES,
        default="embedding",
        help="embedding: PLIP's image embedding (default); tower: the mean of the vision tower's last-layer "
        "patch tokens, what the assistant reads",
    )
    probe.add_argument("--seed", type=int, default=0, help="shots, cross-validation folds, bootstrap")
    probe.add_argument("--batch-size", type=int, default=64)
    add_stain_normalize_argument(probe)
    add_max_pixels_argument(probe)
    probe.set_defaults(func=_probe)

    retrieve = commands.add_parser("retrieve", help="image<->text Recall@1/5/10")
    retrieve.add_argument("--model", required=True)
    retrieve.add_argument("--data", required=True, help="caption JSONL or labelled manifest CSV")
    retrieve.add_argument("--split", default=None)
    retrieve.add_argument("--out", required=True)
    retrieve.add_argument("--label-map")
    retrieve.add_argument("--batch-size", type=int, default=64)
    retrieve.set_defaults(func=_retrieve)

    export = commands.add_parser("export-vision", help="write the vision tower as a CLIPVisionModel folder")
    export.add_argument("--model", required=True)
    export.add_argument("--out", required=True)
    export.set_defaults(func=_export)

    convert = commands.add_parser(
        "convert", help="convert the authors' PLIP state dict to a CLIPVisionModel folder"
    )
    convert.add_argument(
        "--checkpoint", required=True, help="plip_80w_196token.bin (config.json beside it) or a CLIP folder"
    )
    convert.add_argument("--out", required=True)
    convert.set_defaults(func=_convert)
