"""Feedback while training: per-step metrics (JSONL + TensorBoard), sample answers, loss-curve plots.

Only the main process writes. On resume, records past the resumed step are dropped so the files
always describe one consistent run.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def truncate_after(path: Path, step: int) -> None:
    """Keep only records with `step` <= `step` (everything logged after the resumed checkpoint goes)."""
    if path.is_file():
        kept = [r for r in read_jsonl(path) if r.get("step", 0) <= step]
        path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")


class RunLog:
    """metrics.jsonl, samples.jsonl and an optional TensorBoard writer for one run directory."""

    def __init__(self, out_dir: Path, resume_step: int, tensorboard: bool) -> None:
        self.metrics_path, self.samples_path = out_dir / METRICS_FILE, out_dir / SAMPLES_FILE
        truncate_after(self.metrics_path, resume_step)
        truncate_after(self.samples_path, resume_step)
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=resume_step + 1)

    def step(self, record: dict[str, Any], scalars: bool) -> None:
        with self.metrics_path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.writer is not None and scalars:
            step = record["step"]
            self.writer.add_scalar("train/loss", record["loss"], step)
            self.writer.add_scalar("train/samples_per_s", record["samples_per_s"], step)
            if record.get("grad_norm") is not None:
                self.writer.add_scalar("train/grad_norm", record["grad_norm"], step)
            for group, lr in record["lr"].items():
                self.writer.add_scalar(f"lr/{group}", lr, step)

    def samples(self, step: int, answers: Sequence[dict[str, Any]]) -> None:
        with self.samples_path.open("a", encoding="utf-8") as handle:
            for answer in answers:
                handle.write(json.dumps({"step": step, **answer}) + "\n")
        if self.writer is not None:
            table = "| question | reference | answer |\n|---|---|---|\n" + "".join(
                f"| {a['question']!r} | {a['reference']!r} | {a['answer']!r} |\n" for a in answers
            )
            self.writer.add_text("samples", table, step)

    def close(self) -> None:
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
