"""Weights of answer tokens: the option letter of a multiple-choice answer may count as several tokens.

Stage 2 trains a choice answer as the option's name, then its letter ("lung adenocarcinoma, option C",
`data.builders.choice_answer`). The name is what the open questions teach as well; the letter is the only
token that needs the option list (the copy of the letter in front of the named option), and with each
answer's loss the mean over its tokens it is one token of about seven. `train.choice_letter_weight` makes
it count as that many tokens of its answer's mean.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from pallava.data.builders import CHOICE_ANSWER

LETTERS = string.ascii_uppercase[:8]  # the most options a generated question has is 4; 8 leaves room


@dataclass(frozen=True)
class LetterWeight:
    """Where choice answers' letters are among the label tokens, and what they weigh."""

    option_id: int  # the token before the letter: " option"
    letter_ids: torch.Tensor  # (len(LETTERS),) one token per letter
    weight: float

    @classmethod
    def for_tokenizer(cls, tokenizer: PreTrainedTokenizerBase, weight: float) -> LetterWeight:
        """The ids of the word before the letter (" option") and of each letter, as the tokenizer encodes a
        choice answer (`data.builders.CHOICE_ANSWER`)."""
        word = CHOICE_ANSWER.partition("{letter}")[0].split()[-1]
        encoded = [
            list(
                tokenizer(
                    CHOICE_ANSWER.format(option="lung adenocarcinoma", letter=letter),
                    add_special_tokens=False,
                )["input_ids"]
            )
            for letter in LETTERS
        ]

        def says(token: int, text: str) -> bool:
            return tokenizer.decode([token]).strip() == text

        words = {ids[-2] for ids in encoded if len(ids) >= 2}
        whole = len(words) == 1 and says(next(iter(words)), word)
        if not whole or not all(says(ids[-1], letter) for ids, letter in zip(encoded, LETTERS, strict=True)):
            raise ValueError(
                f"train.choice_letter_weight: this tokenizer does not encode a choice answer's '{word} X' "
                f"as one token for '{word}' and one for each letter; leave the weight at 1"
            )
        return cls(words.pop(), torch.tensor([ids[-1] for ids in encoded]), float(weight))

    def weights(self, targets: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
        """(K,) float weights of K label tokens (`targets`, row-major) whose answers are `answers` (K,): the
        letter right after " option" in the same answer weighs `weight`, every other token 1."""
        letter = torch.isin(targets, self.letter_ids.to(targets.device))
        after_option = torch.zeros_like(letter)
        after_option[1:] = (targets[:-1] == self.option_id) & (answers[1:] == answers[:-1])
        ones = torch.ones(targets.shape, dtype=torch.float32, device=targets.device)
        return torch.where(letter & after_option, ones * self.weight, ones)


def per_answer_mean_sum(
    losses: torch.Tensor, answers: torch.Tensor, weights: torch.Tensor | None
) -> torch.Tensor:
    """The sum over answers of each answer's (weighted) mean token loss. `answers` (K,) numbers each token's
    answer 0..A-1."""
    count = int(answers.max()) + 1
    if weights is None:
        weights = torch.ones_like(losses)
    summed = torch.zeros(count, device=losses.device).index_add(0, answers, losses * weights)
    total = torch.zeros(count, device=losses.device).index_add(0, answers, weights)
    return (summed / total).sum()
