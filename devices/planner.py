"""Memory model and budget planner: a pure pass, no onnxruntime, no I/O.

The whole-process peak of a training run at micro-batch ``m`` (calibration at ``mc``)::

    peak = base                  RSS with sessions loaded, weights/gradients/optimizer allocated
         + frozen                frozen weights a forward pass maps in (from the manifest)
         + max(m·data,           numpy inputs of one micro-batch (data source, lookups)
               mc·data + grams)  ... or of a calibration micro-batch plus its Gram matrices
         + arena                 onnxruntime's arena: max(step(m, s), calib(mc)), held, capped
         + margin                Python and allocator slack

with ``step(m, s) = arena_fixed + m·(arena_per_sample + s)`` where ``s`` is the compressed
activations' bytes per sample at the chosen ranks (docs/method.md), and ``calib(mc) =
calib_fixed + mc·calib_per_sample`` (an exact pass). ``base`` and the arena lines are measured
(``runtime/budget.py``, in forked probe processes); ``frozen``, ``data`` and ``grams`` are
computed. The plan caps the arena at what the budget leaves: onnxruntime then fails an
allocation past the cap instead of growing the process (the runtime halves the micro-batch and
repeats the step), so the bound holds even where the model is wrong.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

__all__ = ["BudgetError", "MemoryModel", "Plan", "balanced", "budget_mb", "larger_micro_batch",
           "make_plan",
           "plan_at", "smaller_micro_batch"]


class BudgetError(ValueError):
    """The budget cannot hold even the smallest setting; the message states the minimum
    (``need``, bytes) and ``why`` what micro-batch 1 takes."""

    def __init__(self, msg: str, need: int | None = None, why: str = "") -> None:
        super().__init__(msg)
        self.need, self.why = need, why


@dataclass(frozen=True)
class MemoryModel:
    base: int
    frozen: int
    data_per_sample: int
    arena_fixed: int
    arena_per_sample: float  # compressed activations excluded (instant); all of it (vanilla)
    calib_fixed: int = 0
    calib_per_sample: float = 0.0
    grams: int = 0  # calibration's Gram accumulators and eigendecomposition workspace
    margin: int = 0
    data_fixed: int = 0  # the data's bytes besides its rows: batch order, decoding one image
    saved_min: int = 0  # bytes per sample of compressed activations at rank 1 everywhere
    saved_want: int = 0  # ... at the rank policy's own ranks, memory aside (planning target)
    saved_max: int = 0  # ... at full rank everywhere (0: unknown); never planned above it
    # The arena holds blocks in regions; freed blocks of one region cannot serve a request
    # larger than what is contiguous there. Planned needs get this much slack.
    slack: float = 0.10
    slack_bytes: int = 1 << 20

    def arena_step(self, m: int, saved: float) -> int:
        need = self.arena_fixed + m * (self.arena_per_sample + saved)
        return int(need * (1 + self.slack) + self.slack_bytes)

    def saved_within(self, cap: int, m: int) -> int:
        """Bytes per sample of compressed activations that an arena ``cap`` leaves at
        micro-batch ``m`` (never above full rank, when that is known)."""
        usable = (cap - self.slack_bytes) / (1 + self.slack)
        saved = int((usable - self.arena_fixed) / m - self.arena_per_sample)
        return min(saved, self.saved_max) if self.saved_max else saved

    def arena_calib(self, mc: int) -> int:
        if not mc:
            return 0
        return int((self.calib_fixed + mc * self.calib_per_sample) * (1 + self.slack)
                   + self.slack_bytes)

    def numpy_peak(self, m: int, mc: int) -> int:
        return int(max(m * self.data_per_sample, mc * self.data_per_sample + self.grams)
                   + self.data_fixed)

    def cap_for(self, budget: int, m: int, mc: int) -> int:
        """The arena cap that budget leaves at micro-batches (m, mc)."""
        return int(budget - self.base - self.frozen - self.numpy_peak(m, mc) - self.margin)

    def peak(self, m: int, mc: int, saved: float) -> int:
        return int(self.base + self.frozen + self.numpy_peak(m, mc) + self.margin
                   + max(self.arena_step(m, saved), self.arena_calib(mc)))


@dataclass(frozen=True)
class Plan:
    """How a run uses memory: micro-batches, the per-sample budget of compressed activations
    (ranks are chosen under it at every calibration) and the arena cap. ``None`` = unlimited."""

    micro_batch: int | None = None
    calib_micro_batch: int | None = None
    eval_micro_batch: int | None = None
    saved_budget: int | None = None  # bytes per sample of compressed activations
    arena_cap: int | None = None
    budget: int | None = None
    predicted_peak: int | None = None
    breakdown: dict[str, int] = field(default_factory=dict)
    model: MemoryModel | None = None

    def with_micro_batch(self, m: int) -> Plan:
        """The same plan at micro-batch ``m`` (calibration and evaluation no larger); the
        compressed-activation budget per sample grows as ``m`` shrinks (same arena)."""
        m = max(1, m)
        mc = min(self.calib_micro_batch or m, m)
        saved = self.saved_budget
        if self.model is not None and self.arena_cap is not None and saved is not None:
            saved = max(saved, self.model.saved_within(self.arena_cap, m))
        return replace(self, micro_batch=m, calib_micro_batch=mc,
                       eval_micro_batch=min(self.eval_micro_batch or m, m), saved_budget=saved)


def budget_mb(n: int | float) -> str:
    """A budget in MB as given: whole where it is (256), else to 10 kB (85.9, 8589.93 for 8GiB;
    session 43 probe:
    "budget 86 MB is below the minimum" of --budget 85.9MB, where 86MB trained)."""
    return f"{n / 1e6:.2f}".rstrip("0").rstrip(".")


def _largest(fits, lo: int, hi: int) -> int | None:
    """Largest m in [lo, hi] with fits(m) true, assuming fits is monotone (true then false)."""
    if hi < lo or not fits(lo):
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def balanced(batch: int, m: int) -> int:
    """The micro-batch a batch of ``batch`` really runs at when split at most ``m`` per part:
    as many parts as ``m`` needs, all near-equal (runtime.trainer.chunks). 13 of 32 runs as
    11, 11, 10, so its plan is the plan at 11 (a larger arena cap, more saved bytes per
    sample)."""
    m = max(1, min(m, batch))
    parts = -(-batch // m)
    return -(-batch // parts)


def smaller_micro_batch(batch: int, m: int) -> int:
    """The next micro-batch to try after ``m`` did not fit at its real size: one more part per
    batch, and at least 20 % smaller (a step's peak grows about linearly in the micro-batch).
    A fixed 0.7 × m skipped settings: 11 of 32 (3 parts) fell to 7 (5 parts), past 8 (4
    parts), which costs fewer onnxruntime calls per step and fits where 7 does."""
    parts = -(-batch // max(1, m))
    return balanced(batch, max(1, min(-(-batch // (parts + 1)), int(m * 0.8))))


def _calib_for(model: MemoryModel, budget: int, m: int, instant: bool) -> int:
    """The largest calibration micro-batch that fits next to micro-batch ``m`` (0: none)."""
    if not instant:
        return 0
    return _largest(lambda c: model.arena_calib(c) <= model.cap_for(budget, m, c), 1, m) or 0


def larger_micro_batch(batch: int, m: int) -> int:
    """The next micro-batch to try above ``m`` when ``m`` fitted at its real size with room to
    spare: about twice as many samples per part (balanced), at most the batch."""
    return balanced(batch, min(batch, 2 * max(1, m)))


def make_plan(model: MemoryModel, budget: int, batch: int, instant: bool) -> Plan:
    """The largest micro-batch (≤ batch) at which the rank policy's own ranks (memory aside:
    ``saved_want``) still fit, the largest calibration micro-batch that fits next to it, and the
    arena cap the budget leaves. Ranks come first, the micro-batch from what they leave: a
    larger budget never buys a larger micro-batch at lower ranks.

    Raises:
        BudgetError: not even micro-batch 1 at rank 1 fits; the message states the minimum.
    """
    def fits(m: int, saved: int) -> bool:
        mc = _calib_for(model, budget, m, instant)
        if instant and mc == 0:
            return False
        return model.arena_step(m, saved) <= model.cap_for(budget, m, mc)

    m = _largest(lambda k: fits(k, model.saved_want), 1, batch)
    if m is None:
        m = 1 if fits(1, model.saved_min) else None
    if m is None:
        need = model.peak(1, 1 if instant else 0, model.saved_min)
        why = (f"at micro-batch 1: runtime, sessions and weights {model.base / 1e6:.0f} MB, "
               f"frozen weights read {model.frozen / 1e6:.0f} MB, onnxruntime working memory "
               f"{max(model.arena_step(1, model.saved_min), model.arena_calib(1)) / 1e6:.0f} MB")
        raise BudgetError(
            f"budget {budget_mb(budget)} MB is below the minimum {need / 1e6 + 1:.0f} MB for this "
            f"bundle ({why}); raise --budget to at least {need / 1e6 + 1:.0f}MB",
            need=int(need), why=why)
    return plan_at(model, budget, balanced(batch, m), instant)  # fits: it is no larger


def plan_at(model: MemoryModel, budget: int, m: int, instant: bool,
            saved_floor: int = 0, calib_floor: int = 0) -> Plan:
    """The plan at micro-batch ``m``: the largest calibration micro-batch that fits next to it
    (no fewer than ``calib_floor``, at most ``m``; 1 where none does), the arena cap the budget
    leaves and the compressed-activation bytes per sample that cap leaves, no fewer than
    ``saved_floor`` (the floors: a plan above what the model says fits, for a probe at its real
    size to decide: ``runtime.budget``)."""
    mc = max(_calib_for(model, budget, m, instant), min(calib_floor, m), 1) if instant else 0
    cap = model.cap_for(budget, m, mc)
    saved = None
    if instant:
        saved = max(model.saved_within(cap, m), saved_floor)
        saved = min(saved, model.saved_max) if model.saved_max else saved
    # expected at the policy's ranks; the arena cap bounds every other case
    want = min(saved, model.saved_want) if saved is not None else 0
    peak = model.peak(m, mc, want)
    breakdown = {
        "runtime, sessions, weights, gradients, optimizer (measured)": model.base,
        "frozen weights read by a forward pass": model.frozen,
        f"inputs of a micro-batch (x{m}) / calibration Grams"
        + (" / batch order, largest read" if model.data_fixed >= 1 << 20 else ""):
            model.numpy_peak(m, mc),
        # what the arena is expected to hold (the lines sum to the predicted peak), and the
        # cap the rest of the budget leaves it (session 39: a budget far above the need showed
        # a 63409 MB "arena" beside a 593 MB predicted peak)
        f"onnxruntime arena (step x{m}" + (f", calibration x{mc}" if instant else "")
        + f"; cap {cap / 1e6:.1f} MB)":
            max(model.arena_step(m, want), model.arena_calib(mc)),
        "margin": model.margin,
    }
    return Plan(micro_batch=m, calib_micro_batch=mc or None, eval_micro_batch=m,
                saved_budget=saved, arena_cap=cap, budget=budget, predicted_peak=peak,
                breakdown=breakdown, model=model)
