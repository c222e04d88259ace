"""The tiny preset's tokenizer: a small byte-level BPE with Llama-3's special tokens, shipped offline.

The shipped `assets/tiny_tokenizer.json` was trained by `train_tiny_tokenizer` on pathology
question/answer text (run `python -m pallava.processing.tokenizer CORPUS.txt` to rebuild it).
Byte-level BPE encodes any text, so the vocabulary only affects how many tokens words take.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

ASSET = Path(__file__).resolve().parent.parent / "assets" / "tiny_tokenizer.json"

BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOT = "<|eot_id|>"
PAD = "<|finetune_right_pad_id|>"
IMAGE = "<image>"
SPECIAL_TOKENS = (BOS, EOS, START_HEADER, END_HEADER, EOT, PAD, IMAGE)


def train_tiny_tokenizer(texts: Iterable[str], vocab_size: int = 4096) -> Tokenizer:
    """Train a byte-level BPE whose first ids are the special tokens."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """The shipped tiny tokenizer, wrapped for transformers (no automatic BOS: the processor adds one)."""
    return PreTrainedTokenizerFast(
        tokenizer_file=str(ASSET),
        bos_token=BOS,
        eos_token=EOT,
        pad_token=PAD,
        additional_special_tokens=[START_HEADER, END_HEADER, EOS, IMAGE],
        padding_side="right",
    )


def _main(argv: list[str]) -> None:
    if len(argv) != 1:
        raise SystemExit("usage: python -m pallava.processing.tokenizer CORPUS.txt")
    lines = Path(argv[0]).read_text().splitlines()
    tokenizer = train_tiny_tokenizer(lines)
    ASSET.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(ASSET))
    print(f"wrote {ASSET} ({tokenizer.get_vocab_size()} tokens)")


if __name__ == "__main__":
    _main(sys.argv[1:])
