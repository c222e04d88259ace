"""The single `pallava` command: each sub-command group lives in `pallava.commands.<name>`."""

from __future__ import annotations

import argparse
import importlib
import sys

# Sub-command groups, in the order `pallava --help` lists them. Each module defines
# `register(subparsers)` which adds its parsers and sets `func` on them.
COMMAND_MODULES = (
    "quickstart",
    "data",
    "plip",
    "train",
    "eval",
    "serve",
    "slide",
    "convert",
    "info",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pallava",
        description="Pathology language-vision assistant: data, PLIP, training, evaluation, serving, slides.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        module_name = f"pallava.commands.{name}"
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name == module_name:  # group not built yet; anything else missing is a real error
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        result = args.func(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"pallava {args.command}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            f"\npallava {args.command}: interrupted (resumable commands continue where they stopped)",
            file=sys.stderr,
        )
        return 130
    return int(result or 0)


if __name__ == "__main__":
    raise SystemExit(main())
