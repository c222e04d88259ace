"""Prompt styles: how evaluation words a question for a model (saved with its processor).

`pallava` is our training prompts ("Answer yes or no.", an options block); `paper` is the authors' evaluation
(the raw question). Kept here, below `data`, so that the processor and the records share one list.
"""

PROMPT_STYLES: tuple[str, ...] = ("pallava", "paper")
