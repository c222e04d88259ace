"""Feedback while training: the run log (metrics.jsonl, samples.jsonl, TensorBoard), loss-curve plots.

Only the main process writes. On resume, records past the resumed step are dropped so the files
always describe one consistent run.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from pallava.data.io import AppendOnlyJsonl, read_appended  # noqa: E402

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"


read_jsonl = read_appended  # the run logs are append-only JSONL files


class StepLog:
    """The run log of every training app: an append-only JSONL of rows with a `step`.

    Reopened for a run resumed at `resume_step`, it keeps the rows up to that step and drops the rest (they
    are logged again); `resume_step=None` starts an empty log. Only the process given `write=True` writes;
    the others just read `rows`.
    """

    def __init__(self, path: Path, resume_step: int | None, write: bool = True) -> None:
        def keep(row: dict[str, Any]) -> bool:
            return resume_step is not None and row.get("step", 0) <= resume_step

        self._file = AppendOnlyJsonl(path, keep) if write else None
        self.rows: list[dict[str, Any]] = (
            list(self._file.records) if self._file else [row for row in read_appended(path) if keep(row)]
        )

    def record(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if self._file is not None:
            self._file.append(row)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


TENSORBOARD_DIR = "tensorboard"


def flat_hparams(config: dict[str, Any], prefix: str = "") -> dict[str, object]:
    """A recipe as TensorBoard hyper-parameters: nested settings flattened (`augment.stain`), None left
    out."""
    flat: dict[str, object] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flat_hparams(value, f"{prefix}{key}."))
        elif value is not None:
            flat[f"{prefix}{key}"] = value if isinstance(value, int | float | str | bool) else str(value)
    return flat


class RunLog:
    """The run log of every training app, in its output folder:

    - `metrics.jsonl`: a row per optimizer step (`step`, `epoch`, `loss`, `lr` per parameter group, ...) and a
      row per evaluation (`step` and the evaluation's numbers, e.g. `zeroshot_accuracy`);
    - `samples.jsonl` (with `samples=True`): sample answers written during training;
    - `tensorboard/`: the same numbers as scalars `train/<name>`, `lr/<group>` and `eval/<name>`, the recipe
      as hyper-parameters, sample answers as text.

    Resumed at `resume_step` (None: a fresh run), the files keep the rows up to that step. Only the process
    given `write=True` writes; every process can read `rows` (the metrics).
    """

    def __init__(
        self,
        out_dir: Path,
        resume_step: int | None,
        tensorboard: bool,
        hparams: dict[str, Any] | None = None,
        samples: bool = False,
        write: bool = True,
    ) -> None:
        self.metrics_path, self.samples_path = out_dir / METRICS_FILE, out_dir / SAMPLES_FILE
        self._metrics = StepLog(self.metrics_path, resume_step, write)
        self._samples = StepLog(self.samples_path, resume_step, write) if samples else None
        self.writer = None
        if tensorboard and write:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out_dir / TENSORBOARD_DIR), purge_step=(resume_step or 0) + 1)
            if hparams and resume_step is None:
                self.writer.add_hparams(flat_hparams(hparams), {}, run_name="hparams")

    @property
    def rows(self) -> list[dict[str, Any]]:
        return self._metrics.rows

    def step(self, record: dict[str, Any], scalars: bool) -> None:
        """One optimizer step's row; with `scalars`, also to TensorBoard (every `log_every` steps)."""
        self._metrics.record(record)
        if self.writer is None or not scalars:
            return
        step = record["step"]
        for key, value in record.items():
            if key in ("step", "epoch") or value is None:
                continue
            if isinstance(value, dict):  # learning rate per parameter group
                for group, number in value.items():
                    self.writer.add_scalar(f"{key}/{group}", number, step)
            elif isinstance(value, int | float):
                self.writer.add_scalar(f"train/{key}", value, step)

    def evaluation(self, step: int, values: dict[str, float]) -> None:
        """An evaluation during training (e.g. zero-shot accuracy): a row and `eval/<name>` scalars."""
        self._metrics.record({"step": step, **values})
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(f"eval/{key}", value, step)

    def samples(self, step: int, answers: Sequence[dict[str, Any]]) -> None:
        if self._samples is None:
            raise ValueError("this run log was opened without samples.jsonl (samples=False)")
        for answer in answers:
            self._samples.record({"step": step, **answer})
        if self.writer is not None:
            table = "| question | reference | answer |\n|---|---|---|\n" + "".join(
                f"| {a['question']!r} | {a['reference']!r} | {a['answer']!r} |\n" for a in answers
            )
            self.writer.add_text("samples", table, step)

    def close(self) -> None:
        self._metrics.close()
        if self._samples is not None:
            self._samples.close()
        if self.writer is not None:
            self.writer.close()


def plot_loss_curves(runs: Sequence[tuple[str, str | Path]], out_path: str | Path, smooth: int = 10) -> Path:
    """Plot the training loss of one or more runs (label, run dir or metrics.jsonl) into a PNG.

    Runs are drawn one after another on a shared step axis, each with its raw and moving-average loss.
    """
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=120)
    offset = 0
    for label, source in runs:
        source = Path(source)
        # Step rows only: a run log also holds evaluation rows (no loss).
        records = [r for r in read_jsonl(source / METRICS_FILE if source.is_dir() else source) if "loss" in r]
        if not records:
            raise ValueError(f"{source}: no training metrics to plot")
        steps = [offset + r["step"] for r in records]
        losses = [r["loss"] for r in records]
        window = max(1, min(smooth, len(losses)))
        averaged = [
            sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1])
            for i in range(len(losses))
        ]
        line = ax.plot(steps, losses, alpha=0.25, linewidth=0.8)[0]
        ax.plot(steps, averaged, color=line.get_color(), linewidth=1.6, label=f"{label} (mean of {window})")
        offset = steps[-1]
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (token mean)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path)
    plt.close(fig)
    return out_path
