"""What the quickstart runs: its data, sizes and settings."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[3]
SHARED_DATA = PACKAGE_ROOT.parent / "shared" / "data"
# Three organs: lung and colon (LC25000) and oral mucosa (OSCC, 100x), each with its own train/dev split.
DEFAULT_DATA = (SHARED_DATA / "lc25000-lung", SHARED_DATA / "lc25000-colon", SHARED_DATA / "oscc")
DEFAULT_SAMPLES = PACKAGE_ROOT.parent / "shared" / "data" / "samples"
CONFIGS = PACKAGE_ROOT / "configs"

# Stage 2 trains on a seeded sample of the generated questions (9 per image, 41,220 for the three train
# splits), and the balancing of datasets then repeats the small ones in it. On weaker towers more questions
# answered better (36,000 against 24,000: closed 0.935 / 0.911 / 0.792 against 0.906 / 0.852 / 0.756 on
# average; docs/training.md). On PLIP's tower with its trainable backbone steps 28,800 answer as well in
# 14% less time: over three paired draws closed 0.972 / 1.000 / 0.952 and open 0.962 / 1.000 / 0.938
# against 0.974 / 1.000 / 0.947 and 0.967 / 1.000 / 0.936, multiple choice 0.966 / 0.993 / 0.924 against
# 0.887 / 0.969 / 0.853, stage 2's steps 167 s against 194 s (docs/quickstart.md, "Stage 2 on fewer
# questions").
STAGE2_QUESTIONS = 28_800

# The slide step: virtual slides from the train tiles (stage slide) and from the dev tiles (evaluation), small
# so that building, features, the stage and the evaluation stay within about 3 minutes of the demo. Many
# small training slides rather than few large ones (the cost follows the tiles; more slides, less to
# memorise), balanced per organ between tumour and none (no "this organ: yes" shortcut).
SLIDES = {"train": (150, 25, 75), "dev": (30, 50, 150)}  # split -> (slides, fewest tiles, most tiles)
SMOKE_SLIDES = {"train": (3, 8, 12), "dev": (3, 8, 12)}

# Stage align's global batch (configs/assistant-tiny.yaml), split over its data-parallel processes. Stage
# instruct trains in this one process at its recipe's 6 rows a step (runner.DATA_PARALLEL_STAGES says why).
ASSISTANT_BATCH = 16

# The evaluation suite's batch of questions: the tiny assistant's generation costs per decoding step more
# than per question, so 32 a batch answered the demo's suite in 57 s against 99 s at the default 8, every
# prediction the same (docs/quickstart.md). The default stays 8 for the paper's model.
SUITE_BATCH = 32


def per_process(global_batch: int, processes: int) -> int:
    """A global batch's share of one process: the nearest whole number, at least 1."""
    return max(1, round(global_batch / processes))


@dataclass
class QuickstartSettings:
    """What to run. `smoke` shrinks every step (a handful of images, a few steps) on the same code path."""

    data: list[Path] = field(default_factory=lambda: list(DEFAULT_DATA))
    out: Path = Path("runs/quickstart")
    samples: Path = DEFAULT_SAMPLES
    labels: str | None = None  # default: each dataset's built-in map, merged
    smoke: bool = False
    seed: int = 0
    progress: bool = True
    processes: int = 1  # data-parallel training processes (gloo on CPU); 1, 2 or 4
    plip_args: list[str] = field(default_factory=list)
    train_overrides: list[str] = field(default_factory=list)
    slides: bool = True  # the whole-slide step (virtual slides, stage slide, slide evaluation)

    def model_settings(self) -> dict:
        """What the run's data and models depend on (not how fast or how visibly they are made)."""
        return {
            "data": [str(path.resolve()) for path in self.data],
            "samples": str(self.samples.resolve()),
            "labels": self.labels,
            "smoke": self.smoke,
            "seed": self.seed,
            "plip_args": list(self.plip_args),
            "train_overrides": list(self.train_overrides),
        }


@dataclass
class StepResult:
    name: str
    seconds: float
    metrics: dict
    skipped: bool
