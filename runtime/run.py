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
from .checkpoint import (
    Checkpointer,
    StopSignals,
    TrainingInterrupted,
    Writer,
    atomic_write,
    warn,
    write_text,
)
from .data import Dataset
from .errors import UserError
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
    checkpoint_every: int = 50  # steps; 0: only at the end (checkpoints need ``out``)
    resume: bool = False  # continue from the latest good checkpoint in ``out``
    max_nonfinite: int = 5  # stop after this many consecutive non-finite losses
    checkpoint_writer: Writer | None = None  # fault injection in tests; None: write_npz
    budget: int | None = None  # bytes; whole-process peak RSS must stay below it


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
    checkpoint: str | None = None
    resumed_from: int | None = None
    budget: int | None = None
    predicted_peak: int | None = None
    guard_shrinks: int = 0

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
        if self.budget is not None:
            ok = "within" if self.peak_rss <= self.budget else "OVER"
            out.append(f"budget {self.budget / mb:.0f} MB: predicted peak "
                       f"{(self.predicted_peak or 0) / mb:.1f} MB, measured {self.peak_rss / mb:.1f}"
                       f" MB ({ok} budget)"
                       + (f"; guard shrank the micro-batch {self.guard_shrinks}x"
                          if self.guard_shrinks else ""))
        if self.mode == "instant" and trainer.bases:
            out.append(format_table(layer_costs(trainer.bundle.layers, trainer.ranks())))
        if self.out:
            out.append(f"trained weights: {self.out}")
        if self.checkpoint:
            out.append(f"checkpoint: {self.checkpoint}" + (f" (resumed from step "
                       f"{self.resumed_from})" if self.resumed_from is not None else ""))
        return out


class _Order:
    """Batch order: a fresh permutation of the data per epoch; its state resumes exactly."""

    def __init__(self, n: int, batch: int, rng: np.random.Generator) -> None:
        self.n, self.batch, self.rng = n, batch, rng
        self.starts = range(0, n - batch + 1 if n >= batch else 1, batch)
        self.perm: np.ndarray | None = None
        self.pos = 0

    def next(self) -> np.ndarray:
        if self.perm is None or self.pos >= len(self.starts):
            self.perm, self.pos = self.rng.permutation(self.n), 0
        s = self.starts[self.pos]
        self.pos += 1
        return self.perm[s:s + self.batch]


def _snapshot(trainer: Trainer, order: _Order, calib_rng: np.random.Generator, tally: dict,
              losses: list[float], times: list[float]) -> tuple[dict, dict]:
    """Trainer state plus the run's data order, RNG states and running statistics."""
    arrays, meta = trainer.state()
    arrays = {**arrays, "run/losses": np.asarray(losses, np.float64),
              "run/times": np.asarray(times, np.float64)}
    if order.perm is not None:
        arrays["run/perm"] = order.perm
    run = {"n": order.n, "batch": order.batch, "pos": order.pos,
           "rng": order.rng.bit_generator.state, "calib_rng": calib_rng.bit_generator.state,
           **tally}
    return arrays, {"trainer": meta, "run": run}


def _restore(trainer: Trainer, order: _Order, calib_rng: np.random.Generator, seed: int,
             arrays: dict, meta: dict) -> tuple[dict, list[float], list[float]]:
    run = meta["run"]
    mine = {"seed": seed, "batch": order.batch, "n": order.n}
    theirs = {"seed": run["seed"], "batch": run["batch"], "n": run["n"]}
    if mine != theirs:
        diff = ", ".join(f"{k} {theirs[k]} (this run: {mine[k]})" for k in mine
                         if mine[k] != theirs[k])
        raise UserError(f"checkpoint was written with {diff}; resume with the same --seed, "
                        "--batch and --data, or drop --resume")
    trainer.load_state(arrays, meta["trainer"])
    order.rng.bit_generator.state = run["rng"]
    calib_rng.bit_generator.state = run["calib_rng"]
    order.perm, order.pos = arrays.get("run/perm"), run["pos"]
    tally = {k: run[k] for k in ("seed", "correct", "count", "acc_before", "nonfinite")}
    return tally, arrays["run/losses"].tolist(), arrays["run/times"].tolist()


def train(trainer: Trainer, data: Dataset, cfg: RunConfig, bundle: Bundle) -> Summary:
    rng = np.random.default_rng(cfg.seed)
    calib_rng = np.random.default_rng(cfg.seed + 1)
    batch = min(cfg.batch, len(data))
    eval_batch = cfg.eval_batch
    plan = guard = None
    if cfg.budget is not None:
        from .budget import BudgetGuard, plan_for_budget, print_plan

        plan = plan_for_budget(trainer, data, batch, cfg.budget)
        print_plan(plan, trainer, log=tqdm.write)
        trainer.bases.clear()  # probes calibrated on one small batch: calibrate for real
        eval_batch = min(eval_batch, plan.micro_batch)
        guard = BudgetGuard(trainer, cfg.budget, log=tqdm.write)
    if cfg.checkpoint_every < 0 or cfg.max_nonfinite < 1:
        raise UserError(f"checkpoint_every must be >= 0 (got {cfg.checkpoint_every}) and "
                        f"max_nonfinite >= 1 (got {cfg.max_nonfinite})")
    ckpt = (Checkpointer(cfg.out / "checkpoints", bundle, writer=cfg.checkpoint_writer)
            if cfg.out is not None else None)
    order = _Order(len(data), batch, rng)
    times: list[float] = []
    losses: list[float] = []
    tally = {"seed": cfg.seed, "correct": 0, "count": 0, "acc_before": None, "nonfinite": 0}
    resumed = ckpt.load() if cfg.resume and ckpt is not None else None
    if resumed is not None:
        tally, losses, times = _restore(trainer, order, calib_rng, cfg.seed, *resumed)
    elif cfg.resume:
        warn(f"no checkpoint in {ckpt.folder if ckpt else '(no output folder)'}; "
             "starting from step 0")
    if resumed is None and data.test is not None:
        _, tally["acc_before"] = trainer.evaluate(data.test, eval_batch)
    idle = current_rss()
    start = trainer.step_count
    saved, last_ckpt = (start, ckpt.loaded) if ckpt is not None and resumed else (None, None)
    bar = tqdm(range(start, cfg.steps), desc=f"train[{trainer.mode}]", disable=not cfg.progress,
               mininterval=0.5, initial=start, total=cfg.steps,
               unit="step", dynamic_ncols=True)
    with StopSignals() as stop:
        for _ in bar:
            if trainer.needs_calibration():
                trainer.calibrate(data, batch, calib_rng)
            x, y = data.take(order.next())
            r = trainer.train_step(x, y)
            if r.finite:
                times.append(r.seconds)
                losses.append(r.loss)
                tally["correct"] += r.correct
                tally["count"] += r.count
                tally["nonfinite"] = 0
            else:
                tally["nonfinite"] += 1
                warn(f"non-finite loss {r.loss} at step {trainer.step_count}; skipped the update")
                if tally["nonfinite"] >= cfg.max_nonfinite:
                    bar.close()
                    raise UserError(f"non-finite loss for {tally['nonfinite']} consecutive steps "
                                    f"(up to step {trainer.step_count}); lower --lr or check the "
                                    "data" + (f"; last good checkpoint {last_ckpt}"
                                              if last_ckpt else ""))
            bar.set_postfix(loss=f"{r.loss:.4f}")
            if guard is not None:
                guard.after_step(batch)
                eval_batch = min(eval_batch, trainer.micro_batch or batch)
            every = cfg.checkpoint_every
            if ckpt is not None and (stop.signum or (every and trainer.step_count % every == 0)):
                last_ckpt = ckpt.save(trainer.step_count,
                                      *_snapshot(trainer, order, calib_rng, tally, losses, times))
                saved = trainer.step_count
            if stop.signum:
                bar.close()
                raise TrainingInterrupted(stop.signum, trainer.step_count, last_ckpt)
        bar.close()
        if ckpt is not None and saved != trainer.step_count:
            last_ckpt = ckpt.save(trainer.step_count,
                                  *_snapshot(trainer, order, calib_rng, tally, losses, times))
    correct, count, acc_before = tally["correct"], tally["count"], tally["acc_before"]
    ce = bundle.loss["kind"] == "cross_entropy"
    k = max(1, min(10, len(losses) // 5))
    s = Summary(
        mode=trainer.mode, steps=cfg.steps, batch=batch, micro_batch=trainer.micro_batch or batch,
        loss_first=float(np.mean(losses[:k])) if losses else float("nan"),
        loss_last=float(np.mean(losses[-k:])) if losses else float("nan"),
        train_acc=(correct / count) if ce and count else None,
        median_step_s=statistics.median(times) if times else 0.0,
        calibrations=trainer.calibrations, calib_s=trainer.calib_seconds, idle_rss=idle,
        ranks={k: list(v) for k, v in trainer.ranks().items()},
        resumed_from=start if resumed is not None else None)
    s.checkpoint = str(last_ckpt) if last_ckpt else None
    s.examples_per_s = batch / s.median_step_s if s.median_step_s else 0.0
    if data.test is not None:
        s.test_loss, s.test_acc = trainer.evaluate(data.test, eval_batch)
        s.test_acc_before = acc_before
    if cfg.out is not None:
        cfg.out.mkdir(parents=True, exist_ok=True)
        trainer.save_params(cfg.out / "params.npz")
        s.out = str(cfg.out / "params.npz")
    s.peak_rss = peak_rss()
    if plan is not None:
        s.budget, s.predicted_peak = cfg.budget, plan.predicted_peak
        s.guard_shrinks = guard.shrinks if guard else 0
        s.micro_batch = trainer.micro_batch or batch
    if cfg.out is not None:
        text = json.dumps(asdict(s), indent=1)
        atomic_write(cfg.out / "summary.json", lambda p: write_text(p, text))
    return s
