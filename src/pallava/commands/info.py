"""`pallava info`: versions, presets and what a model directory holds."""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path


def run(args: argparse.Namespace) -> int:
    import torch
    import transformers

    import pallava

    print(
        f"pallava {pallava.__version__}  torch {torch.__version__}  transformers {transformers.__version__}"
    )
    print(
        f"python {platform.python_version()}  threads {torch.get_num_threads()}  cuda "
        f"{torch.cuda.is_available()}"
    )
    if args.model:
        config_path = Path(args.model) / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{args.model} has no config.json")
        config = pallava.PaLlavaConfig.from_pretrained(args.model, trust_remote_code=False)
        summary = {
            "image_tokens": config.num_image_tokens,
            "tile_size": config.tile_size,
            "grid_policy": config.grid_policy,
            "max_tiles": config.max_tiles,
            "tile_cross_attention": config.connector_config.tile_cross_attention,
            "lora": config.lora,
            "llm_hidden_size": config.text_config.hidden_size,
            # what the vision tower was trained on: every image is normalised so before it is read
            "stain_normalize": getattr(config.vision_config, "stain_normalize", None),
        }
        print(json.dumps(summary, indent=2))
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("info", help="versions, and the settings of a model directory")
    parser.add_argument("--model", help="a pallava model directory to describe")
    parser.set_defaults(func=run)
