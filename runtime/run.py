"""One training run: the output folder, data order, calibration schedule, the budget guard,
metrics, checkpoints, the summary and the saved weights.

Files of a run folder (``--out``)::

    run.json         identity: the bundle's manifest hash, mode, batch, seed, data, class names
    metrics.jsonl    one JSON object per event: plan, step, calibration, eval
    checkpoints/     crash-safe checkpoints (runtime/checkpoint.py)
    params.npz       the trained parameters (written atomically at the end)
    summary.json     the summary printed at the end

A folder holding another run is never reused silently: ``--resume`` continues the same run,
``--overwrite`` removes the old run's files first, anything else is refused before training; so
is a folder holding other files (``--out /``, a home folder): a run goes into a new or empty
folder, or one holding only run files. A resume that fails (a damaged checkpoint, other options)
leaves the folder byte-identical: nothing is written before the checkpoint is restored.

Why one module (~520 lines): the loop, its stop and resume paths and the summary share the
run's state (step, order, tally, last checkpoint); split, each would pass all of it around.
"""

from __future__ import annotations

import contextlib
import os
import signal
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from contract import UserError, atomic_write, json_text, names, write_text
from devices.planner import budget_mb, smaller_micro_batch

from .calibrate import calibration_rng, calibration_samples
from .checkpoint import (
    Checkpointer,
    CheckpointWriteError,
    DamagedCheckpoint,
    StopSignals,
    TrainingInterrupted,
    Writer,
    bundle_sha256,
    meta_dict,
    meta_float,
    meta_int,
    warn,
    warn_kept,
)
from .config import RunConfig
from .console import one_line, progress_stream, say
from .memory import current_rss, peak_rss
from .order import Order, is_permutation
from .run_files import params_step
from .run_folder import RunFolder
from .run_log import Metrics, StepStats, step_logged
from .trainer import ArenaExhausted, IndexBatch, StepAbandoned, Trainer

__all__ = ["FinalWriteError", "Metrics", "Order", "RunFinished", "RunFolder", "ShrinkGuard",
           "StepStats", "Summary", "finished_already", "train"]


@dataclass
class Summary:
    mode: str
    steps: int
    batch: int
    micro_batch: int
    loss_first: float
    loss_last: float
    train_acc: float | None
    loss_window: int = 1  # steps averaged into loss_first and loss_last
    test_loss: float | None = None
    test_acc: float | None = None
    test_acc_before: float | None = None
    median_step_s: float = 0.0
    examples_per_s: float = 0.0
    amortised_step_s: float = 0.0  # (step times + calibration outside steps) / steps
    calibrations: int = 0
    calib_steps: int = 0
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
    output: str = ""
    skipped: int = 0  # steps whose loss or gradient was not finite: no update
    unlabelled: int = 0  # of those, steps whose batch had no labelled position

    def lines(self, trainer: Trainer) -> list[str]:
        mb = 1e6
        out = [f"mode {self.mode}: {_count(self.steps, 'step')}, batch {self.batch} "
               f"(micro-batch {self.micro_batch})"
               + (f"; {self.skipped} of them skipped ({_skipped(self.skipped, self.unlabelled)}"
                  ": no update)" if self.skipped else ""),
               f"loss {self.loss_first:.4f} -> {self.loss_last:.4f} (means of the first and last "
               f"{_count(self.loss_window, 'step')})"
               + (f", train accuracy {self.train_acc:.3f} over all its steps (output "
                  f"'{self.output}')"
                  if self.train_acc is not None else "")]
        if self.test_acc is not None:
            before = (f" (before {self.test_acc_before:.3f})"
                      if self.test_acc_before is not None else "")
            out.append(f"held-out accuracy {self.test_acc:.3f}{before}, loss {self.test_loss:.4f}")
        elif self.test_loss is not None:
            out.append(f"held-out loss {self.test_loss:.4f}")
        k = self.calibrations
        out.append(f"median step {self.median_step_s * 1e3:.1f} ms, "
                   f"{self.examples_per_s:.0f} examples/s"
                   + (f"; {k} calibration{'' if k == 1 else 's'} ({self.calib_s:.2f} s outside "
                      f"the steps, {_count(self.calib_steps, 'step')} collected Grams): amortised "
                      "step "
                      f"{self.amortised_step_s * 1e3:.1f} ms" if self.calibrations else ""))
        out.append(f"peak RSS {self.peak_rss / mb:.1f} MB (idle after load {self.idle_rss / mb:.1f}"
                   f" MB, above idle {(self.peak_rss - self.idle_rss) / mb:.1f} MB)")
        if self.budget is not None:
            ok = "within" if self.peak_rss <= self.budget else "OVER"
            out.append(f"budget {budget_mb(self.budget)} MB: predicted peak "
                       f"{(self.predicted_peak or 0) / mb:.1f} MB, measured {self.peak_rss / mb:.1f}"
                       f" MB ({ok} budget)"
                       + (f"; the arena cap lowered the micro-batch {self.guard_shrinks}x"
                          if self.guard_shrinks else ""))
        if self.mode == "instant" and trainer.bases:
            out.append(trainer.cost_table())
        if self.out:
            out.append(f"trained weights: {one_line(str(self.out))}")  # (a newline in a path
            # split the line: a session 35 probe)
        if self.checkpoint:
            out.append(f"checkpoint: {one_line(str(self.checkpoint))}" + (f" (resumed from step "
                       f"{self.resumed_from})" if self.resumed_from is not None else ""))
        return out


# the ways out of a resume on other data: --overwrite alone would discard the trained weights
# (a session 36 probe took that way out to go on training on new data, and lost them)
_NEW_RUN = ("go on from this run's trained weights as a new run (--init-from OUT --out NEW, "
            "in place of --resume), or start afresh with --overwrite (discards them)")


def data_fingerprint(data) -> str:
    """SHA-256 of the data a run reads, as far as a resume needs to tell: the row count, every
    label (in chunks: no decoding of inputs where a source reads labels alone) and the inputs
    of the first, middle and last rows. Another file of as many rows, the same rows reordered,
    relabelled or edited at those rows, gives another value. Kept on ``data`` where it takes
    an attribute (a resume asks before planning and again in ``train``)."""
    import hashlib

    known = getattr(data, "__dict__", {}).get("_run_fingerprint")  # (its own: not one a
    if isinstance(known, str):  # wrapper's __getattr__ finds on the data it relabels)
        return known
    h = hashlib.sha256()
    n = len(data)
    h.update(str(n).encode())
    labels = getattr(data, "take_labels", None) or (lambda idx: data.take(idx)[1])
    # chunks of about 1 MiB, whatever a row's labels hold (session 33 probe: 65,536 rows of
    # 2,000 multi-label targets, or of a per-pixel mask, read at once and copied took runs to
    # 2-4x their budget); the hash is of the bytes in order, so the chunks do not change it
    row = np.ascontiguousarray(labels(np.arange(min(n, 1)))).nbytes or 1
    step = max(1, min(1 << 16, (1 << 20) // row))
    for a in range(0, n, step):
        h.update(memoryview(np.ascontiguousarray(labels(np.arange(a, min(n, a + step))))))
    if n:
        x, _ = data.take(np.array(sorted({0, n // 2, n - 1}), np.int64))
        for k in sorted(x):
            h.update(k.encode())
            h.update(np.ascontiguousarray(x[k]).tobytes())
    with contextlib.suppress(AttributeError, TypeError):  # (frozen or slotted: computed again)
        object.__setattr__(data, "_run_fingerprint", h.hexdigest())
    return h.hexdigest()


def _snapshot(trainer: Trainer, order: Order, calib_rng: np.random.Generator, tally: dict,
              stats: StepStats) -> tuple[dict, dict]:
    """Trainer state plus the run's data order, RNG states and running statistics."""
    arrays, meta = trainer.state()
    arrays = {**arrays, **stats.arrays()}
    if order.perm is not None:
        arrays["run/perm"] = order.perm
    run = {"n": order.n, "batch": order.batch, "pos": order.pos,
           "rng": order.rng.bit_generator.state, "calib_rng": calib_rng.bit_generator.state,
           "data": order.data_id, "val": order.val_id, "finite_steps": stats.n,
           "time_sum": stats.time_sum,
           **tally}
    return arrays, {"trainer": meta, "run": run}


def _check_same_data(run: dict, seed: int, batch: int, n: int, ids) -> None:
    """Refuse (``UserError``) a checkpoint's ``run`` record written with another seed, batch,
    number of training rows, data or held-out data; ``ids()`` gives this run's fingerprints of
    the two (``data_fingerprint``), asked for only where the record has one to compare.

    Raises:
        DamagedCheckpoint: a field that is not a number."""
    mine = {"seed": seed, "batch": batch, "n": n}
    theirs = {k: meta_int(run, k, "run") for k in mine}
    if mine != theirs:
        said = {"n": "training rows"}  # (a --val-split or a data option left out changes them)
        diff = ", ".join(f"{said.get(k, k)} {theirs[k]} (this run: {mine[k]})" for k in mine
                         if mine[k] != theirs[k])
        raise UserError(f"checkpoint was written with {diff}; resume with the run's own --seed, "
                        "--batch, --data and --val-split (and its --text-column / "
                        f"--label-column), or {_NEW_RUN}")
    if run.get("data") is None and run.get("val") is None:
        return  # (checkpoints written before the fingerprints existed have none)
    data_id, val_id = ids()
    if run.get("data") is not None and run.get("data") != data_id:
        raise UserError("checkpoint was written for other data: --data has as many rows, but "
                        "its labels or inputs differ (another file, reordered, relabelled or "
                        f"edited); resume with the run's own --data, or {_NEW_RUN}")
    if run.get("val") is not None and run.get("val") != val_id:  # (session 41 probe:
        # "held-out accuracy 0.200 (before 0.100)", the two of other rows, or none at all)
        raise UserError("checkpoint was written with other held-out data (--val or "
                        "--val-split: another file, other rows, or none): the run's accuracy "
                        "before training was measured on those; resume with the run's own "
                        f"--val, or {_NEW_RUN}")


def _restore(trainer: Trainer, order: Order, calib_rng: np.random.Generator, seed: int,
             arrays: dict, meta: dict) -> tuple[dict, StepStats]:
    """Restore :func:`_snapshot`'s state; returns (tally, step statistics). Every value is checked
    before anything is restored (the run's here, the trainer's in ``load_state``, which checks
    all of its own before changing any).

    Raises:
        UserError: the checkpoint was written with another seed, batch, data, mode or optimizer.
        DamagedCheckpoint: anything else that cannot be this run's state.
    """
    run = meta_dict(meta, "run", "checkpoint")
    tmeta = meta_dict(meta, "trainer", "checkpoint")
    _check_same_data(run, seed, order.batch, order.n, lambda: (order.data_id, order.val_id))
    steps = meta_int(tmeta, "step_count", "trainer")
    if steps != meta["step"]:
        raise DamagedCheckpoint(f"trainer.step_count {steps} differs from the file's step "
                                f"{meta['step']}")
    pos = meta_int(run, "pos", "run", hi=len(order.starts))
    perm = arrays.get("run/perm")
    if perm is not None and (perm.dtype.kind not in "iu" or perm.shape != (order.n,)
                             or not is_permutation(perm)):
        raise DamagedCheckpoint(f"array 'run/perm' ({perm.dtype} {list(perm.shape)}) is not a "
                                f"permutation of the {order.n} samples")
    for key, gen in (("rng", order.rng), ("calib_rng", calib_rng)):
        try:  # on a scratch generator: a bad state changes nothing
            type(gen.bit_generator)().state = run.get(key)
        except (TypeError, ValueError, KeyError, OverflowError) as exc:
            raise DamagedCheckpoint(f"run.{key} is not a random generator state ({exc})") \
                from None
    tally = {"seed": seed, **{k: meta_int(run, k, "run")
                              for k in ("correct", "count", "nonfinite")},
             "acc_before": meta_float(run, "acc_before", "run", hi=1.0, none_ok=True)}
    stats = StepStats.restore(arrays, run, steps)
    if tally["correct"] > tally["count"]:
        raise DamagedCheckpoint(f"run.correct {tally['correct']} is more than run.count "
                                f"{tally['count']}")
    trainer.load_state(arrays, tmeta)  # checks the trainer's part, then restores it
    calib_rng.bit_generator.state = run["calib_rng"]
    order.rng.bit_generator.state = run["rng"]
    order.perm, order.pos = perm, pos
    return tally, stats


def _nonfinite_param(params: dict[str, np.ndarray]) -> str | None:
    """The first parameter holding NaN or inf, or None. A sum per parameter, as the trainer
    checks gradients: no temporary array, one read of the weights (a sum past float32's range
    counts too: weights near 1e38 have diverged as surely)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return next((k for k, v in params.items() if not np.isfinite(v.sum())), None)


def _check_weights(trainer: Trainer, arrays: dict[str, np.ndarray], last_ckpt: Path | None,
                   bar=None) -> None:
    """Never save non-finite weights (a checkpoint or params.npz): the device-resident path
    checks here only, the host path after every update too."""
    bad = _nonfinite_param({k[len("param/"):]: v for k, v in arrays.items()
                            if k.startswith("param/")})
    if bad is not None:
        if bar is not None:
            bar.close()
        raise _diverged(trainer, f"non-finite parameters ('{bad}' holds NaN or inf) at step "
                        f"{trainer.step_count}: training diverged", last_ckpt)


@contextlib.contextmanager
def _abandoned(stop: StopSignals, trainer: Trainer, bar, metrics, last_ckpt):
    """A step the signal watchdog stopped (``StopSignals``) ends the run as an interruption:
    that step is dropped, the last checkpoint written stands (``last_ckpt()``)."""
    try:
        yield
    except StepAbandoned:
        bar.close()
        metrics.close()
        raise TrainingInterrupted(stop.signum or signal.SIGTERM, trainer.step_count,
                                  last_ckpt(), abandoned=True, grace_s=stop.grace_s) from None


class RunDiverged(CheckpointWriteError):
    """Training diverged: ``what``, the last checkpoint written before it (a resume cannot
    change --lr), the way out. A CheckpointWriteError so that ``train`` (runtime/cli.py), when it
    puts back the run an ``--overwrite`` set aside, says so in place of that checkpoint (gone)."""


def _diverged(trainer: Trainer, what: str, good: Path | None, streak: bool = False,
              before_resume: bool = False, untrained: bool = False) -> RunDiverged:
    """``good``: the last checkpoint written before the non-finite steps began (or None;
    ``before_resume``: they began before this run resumed, its older checkpoints are kept;
    ``untrained``: no update was ever applied, so the learning rate cannot be the cause)."""
    opts = "--lr" + (" or --weight-decay" if trainer.config.optim.weight_decay else "")
    where = (f"the last good checkpoint is {good} (the last with finite weights: its loss "
             "may already be large)" if good else
             "the steps before this resume were non-finite too; its older checkpoints are "
             "kept" if before_resume else
             f"no checkpoint was written before {'them' if streak else 'it'}")
    if untrained and trainer.started_from:  # (session 50 probe: weights of 1e28 were "the
        return RunDiverged(what, where, "no update was applied, so --lr is not the cause: "  # data")
                           f"the weights it started from (--init-from {trainer.started_from}) "
                           + ("or --weight-decay (SGD adds it to the gradient) "
                              if trainer.config.optim.name == "sgd"
                              and trainer.config.optim.weight_decay else "")
                           + "or the data's values are too large for float32 in the loss or its "
                           "gradient; start from other weights (another --init-from, or none) "
                           "or scale the data down, with --overwrite")
    if untrained:  # (session 31 probe: targets of 1e20 were told to lower --lr, 1e-30 included)
        optim = trainer.config.optim
        return RunDiverged(what, where, "no update was applied, so --lr is not the cause: " + (
            "lower --weight-decay (SGD adds it to the gradient) or scale the data's values "
            "(inputs or targets) down" if optim.name == "sgd" and optim.weight_decay else
            "the data's values (inputs or targets) are too large for float32 in the loss or "
            "its gradient; scale them down or check the data") + ", and start again with "
            "--overwrite")
    return RunDiverged(what, where, f"lower {opts}{' (or check the data)' if streak else ''} "
                       "and start again with --overwrite")


def _params_current(out: Path | None, step: int) -> bool:
    """Whether ``out/params.npz`` holds the weights of ``step`` and ``summary.json`` its figures
    (``run_files.params_step``; a finished run resumed for more steps and stopped has older
    ones, which the resume to its new end rewrites; a disk that filled up between the two
    left no summary, which a resume writes: an outside probe's resume said "already finished"
    and the summary never came)."""
    return out is not None and params_step(out) == step


def finished_already(out: Path, steps: int, trainer: Trainer | None = None, data=None,
                     batch: int = 0) -> None:
    """Before planning: raise ``RunFinished`` where ``out``'s newest checkpoint is of step
    ``steps`` and its ``params.npz`` holds its weights, as ``train`` finds once it has loaded
    that checkpoint (session 30 probe: such a resume ran the budget's probes, up to 823 MB of
    the tree, before it said the run had finished). With ``trainer``, a checkpoint of other
    options is refused as ``train`` refuses it (``Trainer.check_same_run``), not called finished
    (a checkpoint it cannot read is left to ``train`` to say so). That check is made on any
    resume, finished or not (session 39: a resume with another --variance was refused only
    after the planning probes, seconds later); with ``data`` (and the run's ``batch``) too a
    checkpoint of another seed, batch or data (``_check_same_data``)."""
    from .checkpoint import _read, bundle_ids, bundle_sha256, newest_checkpoint

    newest = newest_checkpoint(out / "checkpoints")
    if newest is None:
        return
    if trainer is not None:
        try:
            whole = _read(newest[1])[1]
        except Exception:  # noqa: BLE001 - damaged: train says so as it loads it
            return
        ours = bundle_ids(trainer.bundle.path) or (bundle_sha256(trainer.bundle),)
        if whole.get("bundle_sha256") not in ours:
            return  # another bundle's: train says so as it loads it
        meta = whole.get("trainer")
        if isinstance(meta, dict):
            trainer.check_same_run(meta, out)
        run = whole.get("run")
        if data is not None and isinstance(run, dict) and len(data):
            test = getattr(data, "test", None)
            try:  # (session 41: other held-out data was refused only after the probes)
                _check_same_data(run, trainer.config.seed, min(batch, len(data)), len(data),
                                 lambda: (data_fingerprint(data), "" if test is None
                                          else data_fingerprint(test)))
            except DamagedCheckpoint:
                return  # train says so as it loads it
    if newest[0] == steps and _params_current(out, steps):
        raise RunFinished(out, steps)


class RunFinished(Exception):
    """``--resume`` of a run that already finished its ``--steps`` (its ``params.npz`` written):
    nothing to do, and nothing is touched; the command succeeds (a retry loop around a resume
    ends), saying so."""

    def __init__(self, out: Path, steps: int) -> None:
        super().__init__(f"the run in '{out}' already finished its {steps} steps "
                         f"({out / 'params.npz'}); nothing to resume: pass a larger --steps to "
                         "continue it")


class ShrinkGuard:
    """Repeats a step or calibration that ran into the arena's cap at a smaller micro-batch."""

    def __init__(self, trainer: Trainer, log) -> None:
        self.trainer, self.log = trainer, log
        self.shrinks = 0

    def run(self, fn, calibration: bool = False):
        """``fn()``, repeated at a smaller micro-batch (one part more per batch; half without a
        run's batch) while it runs into the arena's cap
        (``calibration``: the calibration micro-batch of dedicated calibration passes)."""
        while True:
            try:
                return fn()
            except ArenaExhausted as exc:
                tr = self.trainer
                calib = calibration
                m = (tr.plan.calib_micro_batch if calib else None) or tr.plan.micro_batch or 0
                if tr.plan.arena_cap is None:  # no budget: the machine itself ran out
                    raise UserError(f"out of memory ({exc}); train with a smaller --batch or "
                                    "--micro-batch, or give a --budget so the run is planned "
                                    "to fit") from None
                if not m or m <= 1:  # (a need that grew as the weights trained: a session
                    # 44 probe's tampered graph, told to raise --budget)
                    grew = (f"; this run's need grew as it trained (its first {tr.step_count} "
                            "step(s) ran at larger micro-batches): its graphs may size tensors "
                            "by the weights' values, so re-export the bundle from its model, "
                            "or raise --budget") if self.shrinks and tr.step_count else \
                        "; raise --budget"
                    raise UserError(f"the budget cannot hold even micro-batch 1 ({exc}){grew}"
                                    ) from None
                # one part more per batch (session 39 probe: a plan validated at 11 of 32
                # reached the cap at its first step and the run went on at 5, where 8 fits)
                batch = tr.train_batch or 0
                less = smaller_micro_batch(batch, m) if batch >= m else m // 2
                tr.use_plan(replace(tr.plan, calib_micro_batch=less) if calib
                            else tr.plan.with_micro_batch(less))
                self.shrinks += 1
                restart = ("; SGD momentum restarts from zero (the interrupted step had "
                           "added to it)" if not calib and tr.fused else "")
                self.log(f"budget: the arena cap was reached at {'calibration ' if calib else ''}"
                         f"micro-batch {m}; repeating at {less}{restart}")


def train(trainer: Trainer, data, cfg: RunConfig, out: Path | None = None,
          writer: Writer | None = None, log=say) -> Summary:
    """Train for ``cfg.steps`` steps (continuing from a checkpoint with ``cfg.resume``).

    Raises:
        UserError: bad options, a folder that holds another run, a checkpoint that cannot be
            resumed, repeated non-finite losses, non-finite weights after an update.
        TrainingInterrupted: SIGINT/SIGTERM (after a checkpoint).
    """
    seed = trainer.config.seed
    bundle = trainer.bundle
    rng = np.random.default_rng(seed)
    calib_rng = calibration_rng(seed)
    batch = min(cfg.batch, len(data))
    if batch < 1:
        raise UserError(f"the training data '{getattr(data, 'name', '?')}' is empty")
    if batch < cfg.batch:
        warn(f"--batch {cfg.batch} is more than the {len(data)} training rows; each step "
             f"takes all {batch}")
    if out is not None:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create --out '{out}': {exc.strerror or exc}; pass another "
                            "--out") from None
    ckpt = (Checkpointer(out / "checkpoints", bundle, writer=writer) if out is not None else None)
    plan = trainer.plan
    guard = ShrinkGuard(trainer, log)
    test = getattr(data, "test", None)
    order = Order(len(data), batch, rng, *(None, None) if out is None else (
        data_fingerprint(data), "" if test is None else data_fingerprint(test)))
    stats = StepStats()
    tally = {"seed": seed, "correct": 0, "count": 0, "acc_before": None, "nonfinite": 0}
    loaded = ckpt.load() if cfg.resume and ckpt is not None else None
    resumed = loaded is not None
    if loaded is not None:
        try:
            tally, stats = _restore(trainer, order, calib_rng, seed, *loaded)
        except DamagedCheckpoint as exc:
            raise ckpt.damaged(exc) from None
    elif cfg.resume:
        warn(f"no checkpoint in {ckpt.folder if ckpt else '(no output folder)'}; "
             "starting from step 0")
    if resumed and trainer.step_count == cfg.steps and _params_current(out, cfg.steps):
        raise RunFinished(out, cfg.steps)  # (it said "resumed", appended to the finished log)
    if resumed and trainer.step_count > cfg.steps:  # it trained nothing and said "resumed"
        raise UserError(f"the run in '{out}' is already at step {trainer.step_count}, past "
                        f"--steps {cfg.steps}: nothing to resume; pass a --steps above "
                        f"{trainer.step_count} to train it further, or evaluate it with "
                        "`instant-runtime eval BUNDLE --weights RUN`")
    # opened only now: a resume that fails above leaves the run folder as it was
    last_ckpt = ckpt.loaded if ckpt is not None and resumed else None
    good_ckpt = None if tally["nonfinite"] else last_ckpt  # written before any non-finite streak
    streak_resumed = bool(resumed and tally["nonfinite"])
    metrics = Metrics(out / "metrics.jsonl" if out is not None else None,
                      resumed_at=trainer.step_count if resumed else None,
                      last_good=lambda: last_ckpt,
                      fresh=cfg.new_log and trainer.step_count == 0,
                      redo_end=bool(resumed) and trainer.step_count >= cfg.steps)
    if out is not None:
        STARTED.append(os.path.realpath(out))  # (cli._interrupted: its steps began)
    metrics.write("plan", budget=plan.budget, predicted_peak=plan.predicted_peak,
                  micro_batch=plan.micro_batch, calib_micro_batch=plan.calib_micro_batch,
                  saved_budget=plan.saved_budget, arena_cap=plan.arena_cap)
    del loaded  # (its arrays are read from the file one at a time: nothing is held)
    if not resumed and test is not None:
        _, tally["acc_before"] = guard.run(lambda: trainer.evaluate(test, cfg.eval_batch))
    idle = current_rss()
    start = trainer.step_count
    saved = start if ckpt is not None and resumed else None
    bar = tqdm(range(start, cfg.steps), desc=f"train[{trainer.mode}]", disable=not cfg.progress,
               mininterval=0.5, initial=start, total=cfg.steps,
               unit="step", dynamic_ncols=True, file=progress_stream())
    lr = trainer.config.optim.lr
    trainer.train_batch = batch
    calib_batch = calibration_samples(trainer.bundle.layers, batch,
                                      trainer.config.instant.calib_samples,
                                      padded=trainer.bundle.manifest.text is not None)
    last_eval: tuple = (None, None, None)  # (step, loss, accuracy) of --eval-every's last
    with StopSignals(cfg.stop_grace) as stop, \
            _abandoned(stop, trainer, bar, metrics, lambda: last_ckpt):
        calib_total = trainer.calib_seconds  # (each calibration event: its own seconds)
        for _ in bar:
            calibrated = None
            if trainer.needs_calibration():
                if trainer.bases:  # inside the next steps (recal graphs)
                    trainer.begin_calibration()
                else:  # the first one: dedicated passes, no optimizer step
                    calibrated = guard.run(lambda: trainer.calibrate(data, calib_batch,
                                                                     calib_rng),
                                           calibration=True)
            b = IndexBatch(data, order.next())
            # an overflowing update is caught below (non-finite weights), not warned about by
            # numpy line by line
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                r = guard.run(lambda b=b: trainer.train_step(b))
            if r.finite and not trainer.resident:  # (resident: checked when saved, below)
                bad = _nonfinite_param(trainer.params)
                if bad is not None:  # no undo: the last checkpoint is the last good state
                    bar.close()
                    raise _diverged(trainer, f"non-finite parameters ('{bad}' holds NaN or inf) "
                                    f"at step {trainer.step_count}: training diverged", good_ckpt,
                                    before_resume=streak_resumed)
            if r.calibrated is not None:
                calibrated = r.calibrated
            if calibrated is not None:
                warn_kept(trainer)
                metrics.write("calibration", step=trainer.step_count, ok=calibrated,
                              seconds=round(trainer.calib_seconds - calib_total, 4),
                              seconds_total=round(trainer.calib_seconds, 4),
                              ranks={k: list(v) for k, v in trainer.ranks().items()})
                calib_total = trainer.calib_seconds
            if r.finite:
                stats.add(r.loss, r.seconds)
                tally["correct"] += r.correct
                tally["count"] += r.count
                tally["nonfinite"] = 0
            elif bundle.classification and not r.count:
                # every label of the batch is IGNORE_LABEL (sentences without a tag): a mean over
                # no label, not a divergence (session 29 probe: five such batches in a row
                # stopped a valid run with "lower --lr")
                tally["unlabelled"] = tally.get("unlabelled", 0) + 1
                if tally["unlabelled"] <= 3:
                    warn(f"step {trainer.step_count}'s batch has no labelled position (every "
                         f"label is {names.IGNORE_LABEL}); skipped the update"
                         + (" (further such steps are counted in the summary)"
                            if tally["unlabelled"] == 3 else ""))
            else:
                tally["nonfinite"] += 1
                warn(f"non-finite loss ({r.loss}) at step {trainer.step_count}; skipped the update"
                     if not np.isfinite(r.loss) else f"non-finite gradient (loss {r.loss:.4f}) at "
                     f"step {trainer.step_count}; skipped the update")
            stride = step_logged(trainer.step_count)
            if stride or not r.finite or trainer.step_count == cfg.steps or stop.signum:
                # (a stop's last step too: a session 43 probe's report of a run stopped after
                # step 16494 counted 16490, the line of one step in 10 past 10,000)
                metrics.write("step", step=trainer.step_count, time=round(time.time(), 4),
                              loss=r.loss, accuracy=(r.correct / r.count
                                                     if bundle.classification and r.count
                                                     else None),
                              lr=lr, step_s=r.seconds, rss=current_rss(), peak_rss=peak_rss(),
                              micro_batch=trainer.plan.micro_batch,
                              **({"logged_every": stride} if stride > 1 else {}),
                              **({"unlabelled": True} if bundle.classification and not r.count
                                 else {}))  # (its null loss is no divergence: report)
            if tally["nonfinite"] >= cfg.max_nonfinite:  # (after its metrics line)
                bar.close()
                raise _diverged(trainer, f"non-finite loss or gradient for {tally['nonfinite']} "
                                f"consecutive steps (up to step {trainer.step_count})", good_ckpt,
                                streak=True, before_resume=streak_resumed and good_ckpt is None,
                                untrained=not stats.n and not start)
            bar.set_postfix(loss=f"{r.loss:.4f}")
            if cfg.eval_every and test is not None and trainer.step_count % cfg.eval_every == 0:
                tl, ta = guard.run(lambda: trainer.evaluate(test, cfg.eval_batch))
                metrics.write("eval", step=trainer.step_count, split="val", loss=tl, accuracy=ta)
                last_eval = (trainer.step_count, tl, ta)
            every = cfg.checkpoint_every
            # none during a non-finite streak (its weights may have diverged: the next periodic
            # one after it), except on a stop (the resume point)
            if ckpt is not None and (stop.signum or (every and trainer.step_count % every == 0
                                                     and not tally["nonfinite"])):
                state = _snapshot(trainer, order, calib_rng, tally, stats)
                _check_weights(trainer, state[0], good_ckpt, bar)
                last_ckpt = ckpt.save(trainer.step_count, *state)
                saved = trainer.step_count
                good_ckpt = good_ckpt if tally["nonfinite"] else last_ckpt
            if stop.signum:
                bar.close()
                metrics.close()
                raise TrainingInterrupted(stop.signum, trainer.step_count, last_ckpt)
        bar.close()
        ran = trainer.step_count - start
        labelled = ran - tally.get("unlabelled", 0)  # (the others had no label to learn from)
        if ran and not stats.n and labelled > 0:
            # fewer than --max-nonfinite steps, none finite: the run trained nothing (a fleet
            # round too: its unchanged weights would be averaged in as if it had trained)
            raise _diverged(trainer, f"every step of this run ({labelled}"
                            + (f" of {ran} with a labelled position" if labelled < ran else "")
                            + ") had a non-finite loss or gradient: no update was applied",
                            good_ckpt, streak=True,
                            before_resume=streak_resumed and good_ckpt is None,
                            untrained=not start)
        if tally["nonfinite"] >= 2:  # (session 43 probe: --lr 1e30, step 1's update made
            # every weight 1e30, steps 2-5 were skipped as NaN, and the run exited 0 with those
            # weights as "trained weights"; one step more and --max-nonfinite ended it in error)
            raise _diverged(trainer, f"the run ended inside {tally['nonfinite']} consecutive "
                            f"steps with a non-finite loss or gradient (up to step "
                            f"{trainer.step_count}): its weights do not train", good_ckpt,
                            streak=True, before_resume=streak_resumed and good_ckpt is None,
                            untrained=not stats.n and not start)
        if ckpt is not None and saved != trainer.step_count:
            state = _snapshot(trainer, order, calib_rng, tally, stats)
            _check_weights(trainer, state[0], good_ckpt)
            last_ckpt = ckpt.save(trainer.step_count, *state)
    if not stats.n and tally.get("unlabelled"):
        raise UserError(f"no batch of the run had a labelled position (every label drawn was "
                        f"{names.IGNORE_LABEL}): nothing was trained; check the data's labels")
    correct, count, acc_before = tally["correct"], tally["count"], tally["acc_before"]
    k = stats.window()  # steps averaged for the first and last loss
    s = Summary(
        mode=trainer.mode, steps=cfg.steps, batch=batch,
        micro_batch=trainer.plan.micro_batch or batch,
        loss_first=float(np.mean(stats.first[:k])) if stats.n else float("nan"),
        loss_last=float(np.mean(list(stats.last)[-k:])) if stats.n else float("nan"),
        loss_window=k,
        train_acc=(correct / count) if bundle.classification and count else None,
        median_step_s=statistics.median(stats.times) if stats.n else 0.0,
        amortised_step_s=((stats.time_sum + trainer.calib_seconds) / stats.n) if stats.n
        else 0.0,
        calibrations=trainer.calibrations, calib_steps=trainer.calib_steps,
        calib_s=trainer.calib_seconds, idle_rss=idle,
        ranks={k: list(v) for k, v in trainer.ranks().items()},
        resumed_from=start if resumed else None, output=bundle.output,
        budget=plan.budget, predicted_peak=plan.predicted_peak, guard_shrinks=guard.shrinks,
        skipped=trainer.step_count - (0 if resumed else start) - stats.n,
        unlabelled=tally.get("unlabelled", 0))
    s.checkpoint = str(last_ckpt) if last_ckpt else None
    s.examples_per_s = batch / s.median_step_s if s.median_step_s else 0.0
    if test is not None:
        s.test_acc_before = acc_before
        if last_eval[0] == trainer.step_count:  # --eval-every's pass was at the last step
            s.test_loss, s.test_acc = last_eval[1:]
        else:
            s.test_loss, s.test_acc = guard.run(lambda: trainer.evaluate(test, cfg.eval_batch))
            kept = metrics.kept_last or {}  # (resumed at the last step, whose --eval-every
            if not (kept.get("kind") == "eval" and kept.get("step") == trainer.step_count):
                metrics.write("eval", step=trainer.step_count, split="val", loss=s.test_loss,
                              accuracy=s.test_acc, final=True)  # line is kept: once)
    if out is not None:
        trainer.sync_to_host()
        _check_weights(trainer, {f"param/{k}": v for k, v in trainer.params.items()}, good_ckpt)
        if ckpt is not None:
            ckpt.check_home(trainer.step_count)
        with _final_write(out / "params.npz", last_ckpt):
            trainer.save_params(out / "params.npz")
        s.out = str(out / "params.npz")
    s.peak_rss = peak_rss()
    s.micro_batch = trainer.plan.micro_batch or batch
    metrics.write("summary", peak_rss=s.peak_rss, budget=s.budget)
    metrics.close()
    if out is not None:
        text = json_text(asdict(s), indent=1)
        with _final_write(out / "summary.json", last_ckpt):
            atomic_write(out / "summary.json", lambda p: write_text(p, text))
        FINISHED.append(os.path.realpath(out))
    return s


# the run folders this process finished (its weights and summary written): a stop signal after
# that is no interruption (``cli._finished_run``; files alone cannot tell a run that finished
# here from an earlier one that an --overwrite, stopped before it moved it, left in place)
FINISHED: list[str] = []
STARTED: list[str] = []  # ... and those whose training loop it began


def _count(n: int, word: str) -> str:
    """``1 step``, ``5 steps``."""
    return f"{n} {word}{'' if n == 1 else 's'}"


def _skipped(skipped: int, unlabelled: int) -> str:
    """Why ``skipped`` steps made no update, ``unlabelled`` of them for want of a label."""
    if unlabelled >= skipped:
        return "no labelled position in the batch"
    if unlabelled:
        return (f"{unlabelled} with no labelled position, {skipped - unlabelled} with a "
                "non-finite loss or gradient")
    return "non-finite loss or gradient"


class FinalWriteError(UserError):
    """The run's last files could not be written; ``checkpoint``, where not None, holds all
    its steps: the run stands (an --overwrite does not put the old run back) and a --resume
    finishes it."""

    def __init__(self, message: str, checkpoint: Path | None) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint


@contextlib.contextmanager
def _final_write(path: Path, last_ckpt: Path | None):
    """A failed write of the run's last files (a full disk, a folder made read-only) names the
    file, not its temporary name, and the checkpoint a ``--resume`` finishes the run from."""
    try:
        yield
    except OSError as exc:
        then = (f"the last checkpoint {last_ckpt} is intact: free space or fix the permissions "
                "and run the same command with --resume to finish" if last_ckpt else
                "free space or fix the permissions and run it again")
        raise FinalWriteError(f"cannot write '{path}' ({exc.strerror or exc}); {then}",
                              last_ckpt) from None


def run_identity(trainer: Trainer, data_spec: str, cfg: RunConfig,
                 class_names: list[str] | None, val_split: float | None = None,
                 rows: int | None = None) -> dict:
    """What ``run.json`` records about a run (checked by --resume; ``val_split`` and ``rows``,
    the rows of --data a split was drawn from, read by ``eval``, which says when it scores rows
    the run trained on)."""
    return {"format": "instant-runtime-run", "bundle": str(trainer.bundle.path),
            "bundle_sha256": bundle_sha256(trainer.bundle), "mode": trainer.mode,
            "batch": cfg.batch, "seed": trainer.config.seed, "data": data_spec,
            "val_split": val_split, "rows": rows, "class_names": class_names,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
