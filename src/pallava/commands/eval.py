"""`pallava eval`: score predictions, run VQA evaluation, run zero-shot classification."""

from __future__ import annotations

import argparse
import json
import sys

from pallava.eval.scorers import SCORERS


def _score(args: argparse.Namespace) -> int:
    from pallava.eval.predictions import read_predictions
    from pallava.eval.scorers import score

    records = read_predictions(args.predictions)
    summary = score(records, args.scorer, ci=not args.no_ci, n_resamples=args.n_resamples, seed=args.seed)
    json.dump(summary, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `pallava eval {score,vqa,zeroshot}`."""
    parser = subparsers.add_parser("eval", help="evaluate the assistant: VQA, zero-shot, scoring")
    commands = parser.add_subparsers(dest="eval_command", metavar="SUBCOMMAND", required=True)

    score = commands.add_parser("score", help="score a predictions JSONL file (JSON to stdout)")
    score.add_argument("--predictions", required=True, help="predictions JSONL written by `pallava eval vqa`")
    score.add_argument("--scorer", choices=sorted(SCORERS), default="strict",
                       help="strict (default), paper (PA-LLaVA) or llava-med (legacy, flawed closed set)")
    score.add_argument("--n-resamples", type=int, default=1000, help="bootstrap resamples for the 95%% intervals")
    score.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    score.add_argument("--no-ci", action="store_true", help="skip the bootstrap intervals")
    score.set_defaults(func=_score)
