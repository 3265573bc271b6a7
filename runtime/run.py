"""One training run: data order, calibration schedule, progress bar, summary, saved weights."""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .accounting import format_table, layer_costs
from .bundle import Bundle
from .data import Dataset
from .memory import current_rss, peak_rss
from .trainer import Trainer

__all__ = ["RunConfig", "Summary", "train"]


@dataclass
class RunConfig:
    steps: int = 100
    batch: int = 32
    seed: int = 0
    out: Path | None = None
    progress: bool = True
    eval_batch: int = 64


@dataclass
class Summary:
    mode: str
    steps: int
    batch: int
    micro_batch: int
    loss_first: float
    loss_last: float
    train_acc: float | None
    test_loss: float | None = None
    test_acc: float | None = None
    test_acc_before: float | None = None
    median_step_s: float = 0.0
    examples_per_s: float = 0.0
    calibrations: int = 0
    calib_s: float = 0.0
    idle_rss: int = 0
    peak_rss: int = 0
    ranks: dict = field(default_factory=dict)
    out: str | None = None

    def lines(self, trainer: Trainer) -> list[str]:
        mb = 1e6
        out = [f"mode {self.mode}: {self.steps} steps, batch {self.batch} "
               f"(micro-batch {self.micro_batch})",
               f"loss {self.loss_first:.4f} -> {self.loss_last:.4f}"
               + (f", train accuracy {self.train_acc:.3f}" if self.train_acc is not None else "")]
        if self.test_acc is not None:
            before = (f" (before {self.test_acc_before:.3f})"
                      if self.test_acc_before is not None else "")
            out.append(f"held-out accuracy {self.test_acc:.3f}{before}, loss {self.test_loss:.4f}")
        elif self.test_loss is not None:
            out.append(f"held-out loss {self.test_loss:.4f}")
        out.append(f"median step {self.median_step_s * 1e3:.1f} ms, "
                   f"{self.examples_per_s:.0f} examples/s"
                   + (f"; {self.calibrations} calibrations, {self.calib_s:.2f} s"
                      if self.calibrations else ""))
        out.append(f"peak RSS {self.peak_rss / mb:.1f} MB (idle after load {self.idle_rss / mb:.1f}"
                   f" MB, above idle {(self.peak_rss - self.idle_rss) / mb:.1f} MB)")
        if self.mode == "instant" and trainer.bases:
            out.append(format_table(layer_costs(trainer.bundle.layers, trainer.ranks())))
        if self.out:
            out.append(f"trained weights: {self.out}")
        return out


def _batches(n: int, batch: int, rng: np.random.Generator):
    while True:
        perm = rng.permutation(n)
        for s in range(0, n - batch + 1 if n >= batch else 1, batch):
            yield perm[s:s + batch]


def train(trainer: Trainer, data: Dataset, cfg: RunConfig, bundle: Bundle) -> Summary:
    rng = np.random.default_rng(cfg.seed)
    calib_rng = np.random.default_rng(cfg.seed + 1)
    batch = min(cfg.batch, len(data))
    acc_before = None
    if data.test is not None:
        _, acc_before = trainer.evaluate(data.test, cfg.eval_batch)
    idle = current_rss()
    order = _batches(len(data), batch, rng)
    times: list[float] = []
    losses: list[float] = []
    correct = count = 0
    bar = tqdm(range(cfg.steps), desc=f"train[{trainer.mode}]", disable=not cfg.progress,
               mininterval=0.5,
               unit="step", dynamic_ncols=True)
    for _ in bar:
        if trainer.needs_calibration():
            trainer.calibrate(data, batch, calib_rng)
        x, y = data.take(next(order))
        r = trainer.train_step(x, y)
        times.append(r.seconds)
        losses.append(r.loss)
        correct += r.correct
        count += r.count
        bar.set_postfix(loss=f"{r.loss:.4f}")
    bar.close()
    ce = bundle.loss["kind"] == "cross_entropy"
    k = max(1, min(10, len(losses) // 5))
    s = Summary(
        mode=trainer.mode, steps=cfg.steps, batch=batch, micro_batch=trainer.micro_batch or batch,
        loss_first=float(np.mean(losses[:k])) if losses else float("nan"),
        loss_last=float(np.mean(losses[-k:])) if losses else float("nan"),
        train_acc=(correct / count) if ce and count else None,
        median_step_s=statistics.median(times) if times else 0.0,
        calibrations=trainer.calibrations, calib_s=trainer.calib_seconds, idle_rss=idle,
        ranks={k: list(v) for k, v in trainer.ranks().items()})
    s.examples_per_s = batch / s.median_step_s if s.median_step_s else 0.0
    if data.test is not None:
        s.test_loss, s.test_acc = trainer.evaluate(data.test, cfg.eval_batch)
        s.test_acc_before = acc_before
    if cfg.out is not None:
        cfg.out.mkdir(parents=True, exist_ok=True)
        trainer.save_params(cfg.out / "params.npz")
        s.out = str(cfg.out / "params.npz")
    s.peak_rss = peak_rss()
    if cfg.out is not None:
        (cfg.out / "summary.json").write_text(json.dumps(asdict(s), indent=1))
    return s
