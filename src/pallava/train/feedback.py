"""Feedback while training: per-step metrics (JSONL + TensorBoard), sample answers, loss-curve plots.

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


class RunLog:
    """metrics.jsonl, samples.jsonl and an optional TensorBoard writer for one run directory."""

    def __init__(self, out_dir: Path, resume_step: int, tensorboard: bool) -> None:
        self.metrics_path, self.samples_path = out_dir / METRICS_FILE, out_dir / SAMPLES_FILE
        self._metrics = StepLog(self.metrics_path, resume_step)
        self._samples = StepLog(self.samples_path, resume_step)
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=resume_step + 1)

    def step(self, record: dict[str, Any], scalars: bool) -> None:
        self._metrics.record(record)
        if self.writer is not None and scalars:
            step = record["step"]
            self.writer.add_scalar("train/loss", record["loss"], step)
            self.writer.add_scalar("train/samples_per_s", record["samples_per_s"], step)
            if record.get("grad_norm") is not None:
                self.writer.add_scalar("train/grad_norm", record["grad_norm"], step)
            for group, lr in record["lr"].items():
                self.writer.add_scalar(f"lr/{group}", lr, step)

    def samples(self, step: int, answers: Sequence[dict[str, Any]]) -> None:
        for answer in answers:
            self._samples.record({"step": step, **answer})
        if self.writer is not None:
            table = "| question | reference | answer |\n|---|---|---|\n" + "".join(
                f"| {a['question']!r} | {a['reference']!r} | {a['answer']!r} |\n" for a in answers
            )
            self.writer.add_text("samples", table, step)

    def close(self) -> None:
        self._metrics.close()
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
        records = read_jsonl(source / METRICS_FILE if source.is_dir() else source)
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
