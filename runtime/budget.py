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
from .memory import current_rss, peak_rss, reset_peak
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
    return max(0, peak_rss() - before)


def measure_model(trainer: Trainer, data: Dataset, batch: int) -> MemoryModel:
    """Fit the memory model from probes at micro-batches 2 and up to 32 (never above ``batch``)."""
    m1, m2 = min(2, batch), min(32, batch)
    static = sum(p.nbytes for p in trainer.params.values())  # the gradients of one step
    static += sum(a.nbytes for st in trainer.optimizer.state.values() for a in st.values())
    for st in trainer.optimizer.state.values():  # make the lazily-mapped zeros resident now
        for a in st.values():
            a.fill(0.0)
    rng = np.random.default_rng(12345)
    calib = {}
    if trainer.mode == "instant":
        saved_batches, saved_micro = trainer.calib_batches, trainer.calib_micro_batch
        trainer.calib_batches = 1
        for m in sorted({m1, m2}):
            trainer.calib_micro_batch = m
            calib[m] = _probe(trainer, lambda m=m: trainer.calibrate(data, m, rng))
        trainer.calib_batches, trainer.calib_micro_batch = saved_batches, saved_micro
        trainer.calibrations = 0
    idle = current_rss()
    steps = {}
    idx = rng.choice(len(data), size=m2, replace=False)
    x, y = data.take(idx)
    for m in sorted({m1, m2}):
        xm = {k: v[:m] for k, v in x.items()}
        steps[m] = _probe(trainer, lambda xm=xm, m=m: trainer.gradients(xm, y[:m]))
    saved = sum(s.x_bytes_per_rank * s.default_rank for s in layer_specs(trainer))
    slope = (steps[m2] - steps[m1]) / (m2 - m1) if m2 > m1 else steps[m1] / m1
    slope = max(slope, 0.0)
    fixed = max(0, int(steps[m1] - slope * m1))
    cslope = cfixed = 0.0
    if calib:
        cslope = max(0.0, (calib[m2] - calib[m1]) / (m2 - m1)) if m2 > m1 else calib[m1] / m1
        cfixed = max(0, int(calib[m1] - cslope * m1))
    return MemoryModel(idle=idle, static=static, fixed=fixed,
                       per_sample_other=max(0.0, slope - saved),
                       calib_fixed=int(cfixed), calib_per_sample=cslope)


def plan_for_budget(trainer: Trainer, data: Dataset, batch: int, budget: int) -> Plan:
    """Measure, plan and apply the plan to ``trainer`` (micro-batches and rank caps).

    Raises:
        UserError: the budget is below the minimum for this bundle (states the minimum).
    """
    model = measure_model(trainer, data, batch)
    try:
        plan = make_plan(model, budget, batch, layer_specs(trainer))
    except BudgetError as exc:
        raise UserError(str(exc)) from None
    trainer.micro_batch = plan.micro_batch
    trainer.calib_micro_batch = plan.calib_micro_batch
    trainer.rank_caps = dict(plan.ranks)
    return plan


class BudgetGuard:
    """After each step: if the measured peak nears the budget, halve the micro-batch."""

    def __init__(self, trainer: Trainer, budget: int, log=print) -> None:
        self.trainer, self.budget, self.log = trainer, budget, log
        self.shrinks = 0

    def after_step(self, batch: int) -> None:
        peak = peak_rss()
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
