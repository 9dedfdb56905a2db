"""What a training run reports: per-step records, ``OUT/log.jsonl``, TensorBoard, a progress bar, the loss curve."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .loss import STREAMS

log = logging.getLogger(__name__)

LOG_FILE = "log.jsonl"


@dataclass
class StepRecord:
    """What one optimizer step reports (mean losses over the step's micro-batches and the ranks)."""

    step: int
    loss: float
    parts: dict[str, float]
    lr: float
    tokens: int
    tokens_per_s: float
    epoch: int = 0
    batch_index: int = 0
    val_loss: float | None = None  # set on evaluation steps
    val_parts: dict[str, float] | None = None

    def as_json(self) -> dict[str, Any]:
        """The step's line in ``log.jsonl``."""
        row = {"step": self.step, "loss": self.loss, **{f"loss_{k}": v for k, v in self.parts.items()},
               "lr": self.lr, "tokens": self.tokens, "tokens_per_s": self.tokens_per_s,
               "epoch": self.epoch, "batch_index": self.batch_index}
        if self.val_loss is not None:
            row["val_loss"] = self.val_loss
            row.update({f"val_loss_{k}": v for k, v in (self.val_parts or {}).items()})
        return row


class RunLogs:
    """Rank 0's outputs of a run from ``step`` on: JSONL lines, TensorBoard scalars and a tqdm bar.

    A JSONL line is written every ``log_every`` steps, at step ``steps`` and on evaluation steps;
    lines past ``step`` left by an interrupted run are dropped first.
    """

    def __init__(self, output_dir: Path, step: int, steps: int, log_every: int, progress: bool) -> None:
        self.path = output_dir / LOG_FILE
        self.steps = steps
        self.log_every = log_every
        truncate_log(self.path, step)
        self.writer = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(output_dir / "tensorboard"), purge_step=step or None)
        except ImportError:  # pragma: no cover - tensorboard is optional
            log.warning("tensorboard is not installed; no TensorBoard logs")
        self.bar = None
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=steps, initial=step, desc="train", dynamic_ncols=True)

    def write(self, record: StepRecord) -> None:
        """Report one step."""
        if record.step % self.log_every == 0 or record.step == self.steps or record.val_loss is not None:
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(record.as_json()) + "\n")
        if self.writer is not None:
            self.writer.add_scalar("loss/total", record.loss, record.step)
            for k, v in record.parts.items():
                self.writer.add_scalar(f"loss/{k}", v, record.step)
            self.writer.add_scalar("lr", record.lr, record.step)
            self.writer.add_scalar("tokens_per_s", record.tokens_per_s, record.step)
            if record.val_loss is not None:
                self.writer.add_scalar("val/loss", record.val_loss, record.step)
                for k, v in (record.val_parts or {}).items():
                    self.writer.add_scalar(f"val/loss_{k}", v, record.step)
        if self.bar is not None:
            self.bar.update(1)
            postfix = {"loss": f"{record.loss:.4f}", "lr": f"{record.lr:.2e}"}
            if record.val_loss is not None:
                postfix["val"] = f"{record.val_loss:.4f}"
            self.bar.set_postfix(postfix)

    def close(self) -> None:
        """Close the bar and flush TensorBoard."""
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


def truncate_log(path: Path, step: int) -> None:
    """On resume, drop log lines past the checkpoint's step (they are trained again)."""
    if not path.is_file():
        return
    if step == 0:
        path.unlink()
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def plot_losses(log_path: Path, png: Path) -> Path | None:
    """The loss curve (total and per stream) from the JSONL log, with the Agg backend."""
    if not log_path.is_file():
        return None
    rows = [json.loads(line) for line in log_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in rows]
    ax.plot(steps, [r["loss"] for r in rows], label="total", linewidth=2)
    for k in STREAMS:
        values = [r.get(f"loss_{k}", 0.0) for r in rows]
        if any(values):
            ax.plot(steps, values, label=k, linewidth=0.8)
    validated = [r for r in rows if "val_loss" in r]
    if validated:
        ax.plot([r["step"] for r in validated], [r["val_loss"] for r in validated], "o--", label="validation",
                color="black", linewidth=1.2, markersize=4)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log" if all(r["loss"] > 0 and r.get("val_loss", 1) > 0 for r in rows) else "linear")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png
