"""Keep a training run inside a memory budget: measure, plan, then watch every step.

1. ``measure_model`` fits the planner's memory model (devices/planner.py) on this machine: the idle
   RSS, then two probe steps and two probe calibrations at small micro-batches, each measured as
   the process's peak RSS (VmHWM, reset between probes). Probe steps compute gradients but never
   apply them.
2. ``devices.planner.make_plan`` picks the micro-batch, the calibration micro-batch and the ranks,
   or refuses with the minimum feasible budget before anything trains.
3. ``BudgetGuard`` checks the measured peak after every step; when it nears the budget it halves
   the micro-batch for the next steps (gradient accumulation keeps the effective batch).
"""

from __future__ import annotations

import numpy as np

from devices.planner import BudgetError, LayerSpec, MemoryModel, Plan, make_plan

from .data import Dataset
from .errors import UserError
from .memory import current_rss, reset_peak, window_peak
from .trainer import Trainer

__all__ = ["BudgetGuard", "layer_specs", "measure_model", "plan_for_budget", "print_plan"]

GUARD = 0.97  # shrink when the measured peak passes this fraction of the budget


def layer_specs(trainer: Trainer) -> list[LayerSpec]:
    specs = []
    for ly in trainer.bundle.layers:
        per_rank = 4 * (ly["cx"] if ly["x_axis"] == "token" else ly["tokens"])
        p = trainer.bases.get(ly["name"], (None, None))[0]
        spectrum = tuple(float(v) for v in p.spectrum) if p is not None else ()
        specs.append(LayerSpec(ly["name"], per_rank, spectrum,
                               p.rank if p is not None else ly["x_dim"]))
    return specs


def _probe(trainer: Trainer, fn) -> int:
    before = current_rss()
    reset_peak()
    fn()
    return max(0, window_peak() - before)


def measure_model(trainer: Trainer, data: Dataset, batch: int) -> MemoryModel:
    """Fit the memory model from small probes, each measured as the process's peak RSS.

    Calibration probes run an exact pass over 1 and 4 samples. Step probes run two micro-batches
    of 2 and of up to 8 samples, so gradient accumulation is part of what is measured; one
    unmeasured warm-up step comes first. Probes stay small so planning itself fits the budget.
    """
    rng = np.random.default_rng(12345)
    # The optimizer state (allocated and touched when the trainer is built) and the gradient
    # buffers (allocated once, kept for the whole run) are part of every later RSS: allocated
    # before any probe, they are in the measured idle and reported apart as ``static``.
    trainer.gradient_buffers()
    static = sum(a.nbytes for st in trainer.optimizer.state.values() for a in st.values())
    static += sum(g.nbytes for g in trainer._grads.values())
    calib = {}
    c1, c2 = 1, max(1, min(4, batch))
    if trainer.mode == "instant":
        for m in sorted({c1, c2}):
            calib[m] = _calib_probe(trainer, data, m, rng)
    m1, m2 = min(2, max(1, batch // 2)), max(1, min(8, batch // 2))
    _step_probe(trainer, data, m1, rng)  # warm-up, unmeasured
    idle = current_rss()
    steps = {m: _step_probe(trainer, data, m, rng) for m in sorted({m1, m2})}
    return _fit(trainer, idle, static, steps, calib)


def _calib_probe(trainer: Trainer, data: Dataset, m: int, rng: np.random.Generator) -> int:
    """Peak RSS above the current RSS of one calibration over one batch of ``m`` samples."""
    saved = trainer.calib_batches, trainer.calib_micro_batch, trainer.calibrations
    trainer.calib_batches, trainer.calib_micro_batch = 1, m
    try:
        return _probe(trainer, lambda: trainer.calibrate(data, m, rng))
    finally:
        trainer.calib_batches, trainer.calib_micro_batch, trainer.calibrations = saved


def _step_probe(trainer: Trainer, data: Dataset, m: int, rng: np.random.Generator) -> int:
    """Peak RSS above the current RSS of one gradient pass over two micro-batches of ``m``."""
    idx = rng.choice(len(data), size=min(len(data), 2 * m), replace=False)
    x, y = data.take(idx)
    saved_micro, trainer.micro_batch = trainer.micro_batch, m
    try:
        return _probe(trainer, lambda: trainer.gradients(x, y))
    finally:
        trainer.micro_batch = saved_micro


def _fit(trainer: Trainer, idle: int, static: int, steps: dict[int, int],
         calib: dict[int, int]) -> MemoryModel:
    """Lines through the smallest and the largest step probe (and the calibration probes)."""
    fixed, slope = _line(steps)
    cfixed, cslope = _line(calib) if calib else (0, 0.0)
    return MemoryModel(idle=idle - static, static=static, fixed=fixed,
                       per_sample_other=max(0.0, slope - _saved_now(trainer)),
                       calib_fixed=cfixed, calib_per_sample=cslope)


def plan_for_budget(trainer: Trainer, data: Dataset, batch: int, budget: int) -> Plan:
    """Measure, plan and apply the plan to ``trainer`` (micro-batches and rank caps).

    Raises:
        UserError: the budget is below the minimum for this bundle (states the minimum).
    """
    model = measure_model(trainer, data, batch)
    try:
        plan = make_plan(model, budget, batch, layer_specs(trainer))
        # Small probes under-estimate the slope (small tensors, fixed costs): probe again at
        # half the planned micro-batch, refit through it and plan again.
        # The same for calibration (an exact pass: more per sample than a step).
        half = plan.micro_batch // 2
        half_c = plan.calib_micro_batch // 2 if trainer.mode == "instant" else 0
        if half > 8 or half_c > 4:
            rng = np.random.default_rng(7)
            steps = calib = None
            if half > 8:
                steps = {2: int(model.fixed + 2 * (model.per_sample_other + _saved_now(trainer))),
                         half: _step_probe(trainer, data, half, rng)}
            if half_c > 4:
                calib = {4: int(model.calib_fixed + 4 * model.calib_per_sample),
                         half_c: _calib_probe(trainer, data, half_c, rng)}
            model = _refit(model, trainer, steps, calib)
            plan = make_plan(model, budget, batch, layer_specs(trainer))
    except BudgetError as exc:
        raise UserError(str(exc)) from None
    trainer.micro_batch = plan.micro_batch
    trainer.calib_micro_batch = plan.calib_micro_batch
    trainer.rank_caps = dict(plan.ranks)
    return plan


def _saved_now(trainer: Trainer) -> int:
    return sum(s.x_bytes_per_rank * s.default_rank for s in layer_specs(trainer))


def _line(points: dict[int, int]) -> tuple[int, float]:
    """(intercept, slope) of the line through the smallest and the largest probe {m: peak}."""
    m1, m2 = min(points), max(points)
    if m1 == m2:  # one probe: all of it per sample
        return 0, points[m1] / m1
    slope = max(0.0, (points[m2] - points[m1]) / (m2 - m1))
    return max(0, int(points[m1] - slope * m1)), slope


def _refit(model: MemoryModel, trainer: Trainer, steps: dict[int, int] | None,
           calib: dict[int, int] | None) -> MemoryModel:
    fixed, per_sample = model.fixed, model.per_sample_other
    if steps:
        fixed, slope = _line(steps)
        per_sample = max(0.0, slope - _saved_now(trainer))
    cfixed, cslope = _line(calib) if calib else (model.calib_fixed, model.calib_per_sample)
    return MemoryModel(idle=model.idle, static=model.static, fixed=fixed,
                       per_sample_other=per_sample, calib_fixed=cfixed, calib_per_sample=cslope)


class BudgetGuard:
    """After each step: if the measured peak nears the budget, halve the micro-batch."""

    def __init__(self, trainer: Trainer, budget: int, log=print) -> None:
        self.trainer, self.budget, self.log = trainer, budget, log
        self.shrinks = 0

    def after_step(self, batch: int) -> None:
        """Check this step's peak (the high-water mark is reset after each check, so one early
        spike does not shrink every later step)."""
        peak = window_peak()
        reset_peak()
        if peak <= GUARD * self.budget:
            return
        tr = self.trainer
        m = tr.micro_batch or batch
        if m > 1:
            tr.micro_batch = max(1, m // 2)
            tr.calib_micro_batch = max(1, min(tr.calib_micro_batch or m, tr.micro_batch))
            self.shrinks += 1
            self.log(f"budget guard: peak {peak / 1e6:.1f} MB is within "
                     f"{(1 - GUARD) * 100:.0f}% of the {self.budget / 1e6:.0f} MB budget; "
                     f"micro-batch {m} -> {tr.micro_batch}")


def print_plan(plan: Plan, trainer: Trainer, log=print) -> None:
    """The per-layer table (rank, saved bytes, backward FLOPs) and the memory breakdown."""
    from .accounting import format_table, layer_costs

    mb = 1e6
    log(f"plan for budget {plan.budget / mb:.0f} MB: micro-batch {plan.micro_batch}, "
        f"calibration micro-batch {plan.calib_micro_batch}; predicted peak "
        f"{plan.predicted_peak / mb:.1f} MB (calibration {plan.predicted_calib_peak / mb:.1f} MB)")
    for k, v in plan.breakdown.items():
        log(f"  {k:<52} {v / mb:8.1f} MB")
    if trainer.bundle.layers:
        ranks = {}
        for name, r in plan.ranks.items():
            q = trainer.bases.get(name, (None, None))[1]
            ranks[name] = (r, q.rank if q is not None else r)
        log(format_table(layer_costs(trainer.bundle.layers, ranks)))
