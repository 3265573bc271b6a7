"""The trainer: forward and backward sessions, micro-batches, calibration, optimizer, evaluation.

Built from a bundle, a :class:`runtime.config.TrainConfig` and a :class:`devices.planner.Plan`
(micro-batches, the memory for compressed activations, the arena cap); it never changes either
itself (``use_plan`` is how a caller, e.g. the budget guard, gives it another plan).

Memory discipline (docs/memory.md):
* forward and backward are separate sessions; the forward returns exactly the tensors the
  backward needs, kept as ``OrtValue`` (never copied into numpy) and dropped after the backward;
* trainable parameters are wrapped once as ``OrtValue`` over the numpy arrays the optimizer
  updates in place; the backward adds each micro-batch's gradient into one bound buffer per
  parameter (``grad = grad_acc + ∂L/∂p``, output bound to the input's buffer);
* data enters one micro-batch at a time (``Batch.rows``): no batch-sized copy of the inputs;
* sessions are created on first use, after the process arena is registered (``sessions.py``).

Why one module (~580 lines): training, calibration and evaluation passes share one set of
sessions, bound buffers and feeding rules (``_feeds``), and the checkpoint state must cover all
of them; the parts that stand alone live elsewhere (numpy calibration ``calibrate.py``, ranks
``ranks.py``, optimizers ``optim.py``, the device-resident step ``resident.py``).
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Protocol

import numpy as np
import onnxruntime as ort

from contract import UserError, atomic_write, names, write_npz
from devices.planner import Plan, budget_mb

from .bundle import Bundle
from .calibrate import Basis, DegenerateGram, GramWindow, Spectrum, basis
from .config import TrainConfig
from .memory import budget_given, current_rss
from .optim import fusable, make_optimizer, resident_zeros, state_buffers
from .ranks import (
    basis_groups,
    choose_ranks,
    gx_break_even,
    starts_exact,
    unreached_flop_ratio,
    unreached_saved_ratio,
)
from .sessions import (
    SharedWeights,
    is_out_of_memory,
    make_session,
    ort_message,
    providers_for,
    resolve_device,
    run_options,
    runs_aborted,
    shrink_arena,
)

__all__ = ["ArenaExhausted", "ArrayBatch", "Batch", "IndexBatch", "StepAbandoned", "StepResult",
           "Trainer"]


class ArenaExhausted(MemoryError):
    """onnxruntime could not allocate within the arena's cap (the budget), or at all: the caller
    lowers the micro-batch and repeats the step. Nothing was applied to the weights. A
    ``MemoryError``, so a caller that cannot repeat ends in the CLI's one out-of-memory line."""


class StepAbandoned(Exception):
    """The signal watchdog ended an onnxruntime run (a step that did not finish within
    ``train --stop-grace`` (``StopSignals.grace_s``) of SIGINT/SIGTERM, or a second signal):
    the step in progress is dropped, the last checkpoint stands."""

    def __init__(self, phase: str) -> None:
        super().__init__(f"the {phase} pass was stopped")
        self.phase = phase


class Batch(Protocol):
    def __len__(self) -> int: ...

    def rows(self, start: int, stop: int) -> tuple[dict[str, np.ndarray], np.ndarray]: ...


def _add_scaled(acc: np.ndarray, g: np.ndarray, scale: float) -> None:
    """``acc += g * scale`` a few rows at a time: no temporary the size of a (wide) Gram."""
    step = max(1, (1 << 20) // max(1, acc[0].size))
    for i in range(0, len(acc), step):
        acc[i:i + step] += g[i:i + step] * scale


class ArrayBatch:
    """A batch held as arrays (tests, probes)."""

    def __init__(self, x: dict[str, np.ndarray], y: np.ndarray) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def rows(self, start: int, stop: int):
        return {k: v[start:stop] for k, v in self.x.items()}, self.y[start:stop]


class IndexBatch:
    """Rows ``idx`` of a dataset, read one micro-batch at a time."""

    def __init__(self, data, idx: np.ndarray) -> None:
        self.data, self.idx = data, np.asarray(idx)

    def __len__(self) -> int:
        return int(self.idx.size)

    def rows(self, start: int, stop: int):
        return self.data.take(self.idx[start:stop])


def _labelled(y: np.ndarray, axis: int | None = None):
    """How many labels count (``names.IGNORE_LABEL`` marks a token without one)."""
    return (y != names.IGNORE_LABEL).sum(axis)


def classes_last(logits: np.ndarray, loss) -> np.ndarray:
    """``logits`` with the class axis last (a ``classes_first`` output is [N, classes, ...])."""
    return np.moveaxis(logits, 1, -1) if loss.classes_first else logits


def hits(logits: np.ndarray, y: np.ndarray) -> tuple[int, int]:
    """(correct predictions, labels counted): one label per sample, or per token (pixel) where
    the labels are [N, L] ([N, H, W]) (``names.IGNORE_LABEL`` positions not counted); the
    class axis is the last (:func:`classes_last`)."""
    # a row with a NaN or +inf logit predicts nothing (argmax would call it class 0, and a
    # diverged model scored the data's share of class 0: session 31 probe); its max says so
    # without a mask of the logits' size (a language model's: as large as the logits / 4)
    right = (logits.argmax(-1) == y) & np.isfinite(logits.max(-1))
    if y.ndim < 2:
        return int(right.sum()), int(y.shape[0])
    keep = y != names.IGNORE_LABEL
    return int((right & keep).sum()), int(keep.sum())


def score(logits: np.ndarray, y: np.ndarray, loss) -> tuple[int, int]:
    """(correct, counted) for a classification loss: :func:`hits` for cross-entropy; for
    ``bce`` each output element is a yes/no prediction (logit > 0, or probability >= 0.5 where
    the output is a Sigmoid's) of its target (>= 0.5)."""
    if loss.kind == "bce":
        yes = logits >= 0.5 if loss.probabilities else logits > 0
        return int(((yes == (y >= 0.5)) & np.isfinite(logits)).sum()), int(y.size)
    return hits(classes_last(logits, loss), y)


@dataclass
class StepResult:
    loss: float
    correct: int
    count: int
    seconds: float
    finite: bool = True  # False: non-finite loss, the update was skipped
    mode: str = "vanilla"  # the graphs it ran: vanilla, instant or calib
    calibrated: bool | None = None  # a calibration ended with this step (False: Grams unusable)


# Evaluation without trailing padding rounds each micro-batch's length up to a multiple of this:
# few distinct shapes keep the arena's and the heap's blocks reusable (measured on MiniLM, batch
# 32: exact lengths +7 MB of peak against padded evaluation; see evaluate()).
LENGTH_STEP = 8


def _row_lengths(mask: np.ndarray) -> np.ndarray:
    """Each row's length up to its last unmasked position (at least 1)."""
    nz = mask[:, ::-1] != 0
    return np.where(nz.any(1), mask.shape[1] - nz.argmax(1), 1)


def _run_length(longest: int, seq_len: int) -> int:
    """The token length a micro-batch whose longest row is ``longest`` runs at: rounded up to
    ``LENGTH_STEP``, at most the bundle's length."""
    return min(-(-int(longest) // LENGTH_STEP) * LENGTH_STEP, seq_len)


def _cut_tokens(x: dict[str, np.ndarray], tokens, length: int) -> dict[str, np.ndarray]:
    """``x`` with its token inputs (names in ``tokens``) cut to their first ``length`` columns."""
    return {k: np.ascontiguousarray(v[:, :length]) if k in tokens else v for k, v in x.items()}


def _ov(a: np.ndarray) -> ort.OrtValue:
    return ort.OrtValue.ortvalue_from_numpy(a)


def chunks(n: int, micro: int | None) -> list[tuple[int, int]]:
    """Split n rows into near-equal micro-batches of at most ``micro`` (same shapes every
    step: the arena reuses its blocks)."""
    if n <= 0:
        return []
    if not micro or micro >= n:
        return [(0, n)]
    k = -(-n // micro)
    bounds = [round(i * n / k) for i in range(k + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(k)]


class Trainer:
    """Trains the bundle's parameters in ``config.mode`` (``instant`` or ``vanilla``)."""

    def __init__(self, bundle: Bundle, config: TrainConfig | None = None,
                 plan: Plan | None = None, weights: Path | None = None,
                 evaluating: bool = False, way_out: str | None = None) -> None:
        self.bundle = bundle
        self._evaluating = evaluating  # ``eval``: no optimizer state, no gradient buffers
        self.config = config or TrainConfig()
        mode = self.config.mode
        if mode == "instant" and not bundle.layers:
            mode = "vanilla"  # nothing to compress: instant is exact
        self.mode = mode
        self.plan = plan or Plan()
        self.io = bundle.io(mode)
        device, _ = resolve_device(self.config.session)
        self.device = device
        self._resident = None  # runtime/resident.py, created with the sessions
        self.resident = device != "cpu" or self.config.session.resident
        # One gradient buffer per parameter, allocated now and kept: the backward adds each
        # micro-batch's gradient into it in place (output bound to the input). SGD with
        # momentum needs none: the backward adds into the momentum buffer (optim.SGD).
        self.fused = not self.resident and fusable(self.config.optim)
        self._check_buffers_fit()
        self.params = (bundle.load_params(weights, way_out) if way_out
                       else bundle.load_params(weights))  # (way_out: of an unreadable file)
        self._param_ov = {k: _ov(v) for k, v in self.params.items()}
        # (``eval`` had them, 1.5x its weights written for nothing: session 27 probe)
        self.optimizer = None if evaluating else make_optimizer(self.config.optim, self.params)
        self._make_grads()
        self._grads_freed = False  # (release_written_buffers: while the budget's probes run)
        self.shared = SharedWeights(bundle)
        # a frozen prefix graph (export/prefix.py) runs each micro-batch without its trailing
        # padding when the model takes any length; the budget probes set False (worst case)
        self.trim = True
        # the graphs at shorter lengths (export/lengths.py) are used; a budget that cannot hold
        # their sessions turns this off (runtime/budget.py: plan_for_budget)
        self.shorter = True
        self._sessions: dict[tuple[str, str], ort.InferenceSession] = {}
        self.bases: dict[str, tuple[Basis, Basis]] = {}
        self._basis_ov: dict[str, ort.OrtValue] = {}
        self._cut_bases: dict[int, dict[str, ort.OrtValue]] = {}  # _bases_at, by length
        # evaluation only (``eval``): the sessions are the inference graph's, and a budget plans
        # its passes (runtime/budget.py), not a training step's
        self.eval_only = False
        self.resuming = False  # a run resumed from its checkpoint: its mode is fixed
        self.started_from: str | None = None  # --init-from as given (a divergence names it)
        self.step_count = 0
        self.window: GramWindow | None = None  # an open calibration
        self.calibrations = 0
        # the run's batch (set by run.train and plan): with the plan's micro-batch, what decides
        # whether the default FLOP cap binds (set_ranks), whatever a calibration read
        self.train_batch: int | None = None
        self.whole_batches = False  # (budget._whole_batches: a model that mixes its rows)
        self.rank_rows = 1  # the micro-batch the ranks were chosen for (runtime/ranks.py)
        self.exact_start = False  # whether they started at exact (ranks.starts_exact)
        self.calib_steps = 0
        self.calib_seconds = 0.0
        self.calib_skipped = 0
        self.warnings: list[str] = []

    def _providers(self) -> list[str]:
        return providers_for(self.config.session)

    def _res(self):
        if self._resident is None:
            from .resident import Resident

            self._resident = Resident(self, self.device)
        return self._resident

    def sync_to_host(self) -> None:
        """Bring device-resident weights and optimizer state back into ``params`` (a no-op on
        the host path, where the numpy arrays are the weights)."""
        if self._resident is not None:
            self._resident.to_host()

    # ---------------------------------------------------------------------------- sessions
    def session(self, mode: str, part: str = "forward") -> ort.InferenceSession:
        key = (mode, part)
        if key not in self._sessions:
            sess = make_session(self.bundle, mode, part, self.config.session, self.shared)
            self._check_labels(sess, mode, part)
            self._check_param_shapes(sess, mode, part)
            self._sessions[key] = sess
        return self._sessions[key]

    def _check_labels(self, sess: ort.InferenceSession, mode: str, part: str) -> None:
        """The graph's labels input has the manifest's dtype and rank (a manifest edited to
        another loss would otherwise fail mid-run on a broadcast)."""
        spec = self.bundle.manifest.loss.labels
        got = next((i for i in sess.get_inputs() if i.name == names.LABELS), None)
        if got is None:
            return
        ort_name = {"float32": "float", "float64": "double"}.get(spec.dtype, spec.dtype)
        want = f"tensor({ort_name})"
        if got.type != want or len(got.shape) != len(spec.shape):
            raise UserError(f"{self.bundle.path / self.bundle.graph_file(mode, part)} takes "
                            f"labels {got.type} of rank {len(got.shape)} where the manifest's "
                            f"{self.bundle.manifest.loss.kind} loss says {spec.dtype} of rank "
                            f"{len(spec.shape)}: the bundle was edited or damaged; re-export it")

    def _check_param_shapes(self, sess: ort.InferenceSession, mode: str, part: str) -> None:
        """The trainable tensors have the shapes the graph takes: a manifest and params.npz
        edited together to another shape ([20000, 20000] for a [10, 64] weight) had been read,
        given optimizer buffers and fed to onnxruntime, whose refusal then blamed the data
        (session 28 probe: 7.9 GB before the error)."""
        shapes = {p.name: tuple(p.shape) for p in self.bundle.params}
        for i in sess.get_inputs():
            want = shapes.get(i.name)
            if want is None:
                continue
            if len(i.shape) != len(want) or any(
                    isinstance(d, int) and d != w for d, w in zip(i.shape, want, strict=False)):
                raise UserError(f"{self.bundle.path / self.bundle.graph_file(mode, part)} takes "
                                f"trainable tensor '{i.name[:80]}' of shape "
                                f"{list(i.shape)} where the manifest says {list(want)}: the "
                                "bundle was edited or damaged; re-export it")

    def open_sessions(self) -> None:
        """Create every session the run will use now (so their memory is in the idle RSS)."""
        if self.eval_only:
            self.session(names.INFER, "forward")
            return
        self.session(self.mode, "forward")
        self.session(self.mode, "backward")
        text = self.bundle.manifest.text
        for n in text.lengths if text is not None and self.shorter and not self.resident else []:
            if f"{self.mode}@{n}" in self.bundle.manifest.graphs:
                self.session(f"{self.mode}@{n}", "forward")
                self.session(f"{self.mode}@{n}", "backward")
        if self.mode == "instant":
            for mode in ("calib", "recal"):
                self.session(mode, "forward")
                self.session(mode, "backward")
        if self.bundle.manifest.prefix is not None:
            self.session(names.PREFIX, "forward")
        self.session(names.INFER, "forward")

    def shrink_arena(self, data) -> None:
        """Free the arena's unused regions (after probes or a calibration, whose tensor shapes
        differ from a step's): one inference pass on one sample with shrinkage on."""
        sess = self.session(names.INFER, "forward")
        x, y = data.take(np.arange(1))
        shrink_arena(sess, self._feeds([i.name for i in sess.get_inputs()], x, y),
                     self.bundle.output)
        self.shared.release()

    def use_plan(self, plan: Plan) -> None:
        self.plan = plan

    @property
    def micro_batch(self) -> int | None:
        return self.plan.micro_batch

    # ---------------------------------------------------------------------------- feeding
    def _feeds(self, names_: list[str], x: dict[str, np.ndarray], y: np.ndarray,
               extra: dict[str, ort.OrtValue] | None = None) -> dict[str, ort.OrtValue]:
        out: dict[str, ort.OrtValue] = {}
        lookups = self.bundle.lookups
        for n in names_:
            if extra is not None and n in extra:
                out[n] = extra[n]
            elif n in self._param_ov:
                out[n] = self._param_ov[n]
            elif n in x:
                out[n] = _ov(x[n])
            elif n in lookups:
                out[n] = _ov(self.shared.lookup(lookups[n].table, x[lookups[n].indices]))
            elif n == names.LABELS:
                out[n] = _ov(y)
            elif n in self._basis_ov:
                out[n] = self._basis_ov[n]
            else:
                raise UserError(f"graph input '{n}' has no value (bundle and runtime disagree); "
                                "re-export the bundle")
        return out

    def _masked_prefix(self) -> bool:
        """Whether the prefix's outputs are zeroed at masked positions (a text bundle whose
        model ignores its padding): what the trainable layers see at a padded position is then
        zero, whatever micro-batch the row shares and whatever length the prefix ran at."""
        m = self.bundle.manifest
        return (m.prefix is not None and m.text is not None and m.text.any_length
                and m.text.mask_input is not None)

    def _trims(self) -> bool:
        """Whether the prefix runs each micro-batch cut to its longest row."""
        return self.trim and self._masked_prefix()

    def _shortens(self) -> bool:
        """Whether micro-batches may run the graphs at a shorter length (export/lengths.py):
        a text bundle that has them, trimming on (the budget probes turn it off: worst case),
        and the host path (the device-resident one keeps the trained length)."""
        text = self.bundle.manifest.text
        return (self.trim and self.shorter and text is not None and bool(text.lengths)
                and text.any_length and text.mask_input is not None and not self.resident)

    def _keep(self, x: dict[str, np.ndarray]) -> int | None:
        """This micro-batch's longest row, rounded up to ``LENGTH_STEP`` (what the prefix and
        the graphs at a shorter length run at), or None where it runs untrimmed."""
        text = self.bundle.manifest.text
        if not (self._trims() or self._shortens()) or text.mask_input not in x:
            return None
        mask = x[text.mask_input]
        if mask.ndim != 2 or mask.shape[1] != text.seq_len:
            return None  # prefix_feeds says what is wrong
        return _run_length(_row_lengths(mask).max(), text.seq_len)

    def graphs_at(self, mode: str, x: dict[str, np.ndarray]) -> tuple[str, int | None]:
        """(graph key, token length) for a micro-batch in ``mode``: the shortest of the bundle's
        shorter lengths (export/lengths.py) that holds its longest row, else (mode, None) (the
        trained length; also for the budget probes, which run untrimmed)."""
        if not self._shortens() or mode not in names.TRAINING_MODES:
            return mode, None
        keep = self._keep(x)
        for n in self.bundle.manifest.text.lengths if keep is not None else []:
            if n >= keep and f"{mode}@{n}" in self.bundle.manifest.graphs:
                return f"{mode}@{n}", n
        return mode, None

    def _bases_at(self, length: int) -> dict[str, ort.OrtValue]:
        """The bases fed to the graphs at a shorter ``length``: a token-axis basis keeps its
        first ``length`` columns (the products at the trained length with the positions past
        ``length`` zero, which is what those positions hold); where that many rows would cost
        as much as the exact product (P: rows >= length; Q: rows past the break-even rank of
        runtime/ranks.py at this length) the exact identity instead, as at full rank."""
        got = self._cut_bases.get(length)
        if got is not None:
            return got
        seq = self.bundle.manifest.text.seq_len
        got = {}
        for ly in self.bundle.layers:
            if ly.tokens != seq or ly.name not in self.bases:
                continue
            p, q = self.bases[ly.name]
            short = replace(ly, tokens=length, x_dim=length if ly.x_axis == "token" else ly.x_dim,
                            g_dim=length if ly.g_axis == "token" else ly.g_dim)
            for name, b, axis, exact_at in (
                    (ly.p_input, p, ly.x_axis, length),
                    (ly.q_input, q, ly.g_axis, gx_break_even(short) if ly.gx_exact_at_full
                     else length)):
                if axis != "token":
                    continue
                m = b.matrix
                cut = (np.eye(length, dtype=np.float32) if m.shape[0] >= exact_at
                       else np.ascontiguousarray(m[:, :length]))
                got[name] = _ov(cut)
        self._cut_bases[length] = got
        return got

    def prefix_feeds(self, x: dict[str, np.ndarray], y: np.ndarray,
                     length: int | None = None) -> dict[str, ort.OrtValue]:
        """The frozen prefix's outputs for this micro-batch (empty without a prefix graph). For
        a text model that ignores its padding: run without the trailing padding, padded back to
        the trained length (or ``length``: graphs at a shorter length), and zero at every
        masked position (export/prefix.py checks that the trainable part then gives the uncut
        graph's outputs)."""
        spec = self.bundle.manifest.prefix
        if spec is None:
            return {}
        text = self.bundle.manifest.text
        mask = x.get(text.mask_input) if self._masked_prefix() else None
        if mask is not None and (mask.ndim != 2 or mask.shape[1] != text.seq_len):
            raise UserError(f"input '{text.mask_input}' has shape {list(mask.shape)}; the bundle "
                            f"takes [N, {text.seq_len}]: tokenise the data for this bundle")
        keep = text.seq_len if text is not None else 0
        if mask is not None and self.trim:
            keep = _run_length(_row_lengths(mask).max(), text.seq_len)
            x = _cut_tokens(x, set(text.token_inputs), keep)
        sess = self.session(names.PREFIX, "forward")
        outs = list(spec.outputs)
        extra = self._resident.params if self._resident is not None else None
        try:
            got = sess.run_with_ort_values(
                outs, self._feeds([i.name for i in sess.get_inputs()], x, y, extra),
                run_options())
        except Exception as exc:  # noqa: BLE001
            raise self._run_error(exc, "prefix") from None
        self.shared.release()
        feeds = {}
        for name, value in zip(outs, got, strict=True):
            axis = spec.outputs[name]
            if axis < 0 or mask is None:
                feeds[name] = value
                continue
            a = value.numpy()
            if not (1 <= axis < a.ndim) or a.shape[axis] > text.seq_len \
                    or a.shape[0] != mask.shape[0]:
                raise UserError(f"the bundle's prefix output '{name}' has shape {list(a.shape)}, "
                                f"which has no token axis {axis} of at most {text.seq_len}; the "
                                "manifest does not match its graphs: re-export the bundle")
            size = length or text.seq_len
            if a.shape[axis] > size:
                raise UserError(f"the bundle's prefix output '{name}' is longer than its "
                                f"micro-batch ({a.shape[axis]} > {size}); re-export the bundle")
            shape = list(a.shape)
            shape[axis] = size
            full = np.zeros(shape, a.dtype)
            full[(slice(None),) * axis + (slice(0, a.shape[axis]),)] = a
            del a
            full *= (mask[:, :size] != 0).astype(full.dtype).reshape(
                [mask.shape[0]] + [size if i == axis else 1 for i in range(1, full.ndim)])
            feeds[name] = _ov(full)
        del got
        return feeds

    def _by_length(self, batch: Batch) -> Batch:
        """The batch's rows longest first (the prefix, and the graphs at shorter lengths, then
        run micro-batches of similar lengths); other batches unchanged. The gradient is a sum
        over rows: order-free."""
        if not (self._trims() or self._shortens()) or not isinstance(batch,
                                                                     (ArrayBatch, IndexBatch)):
            return batch
        n = len(batch)
        lengths = self._read_lengths(batch.rows, n, self.plan.micro_batch or n)
        if lengths is None:
            return batch
        order = np.argsort(-lengths, kind="stable")
        if isinstance(batch, IndexBatch):
            return IndexBatch(batch.data, batch.idx[order])
        return ArrayBatch({k: v[order] for k, v in batch.x.items()}, batch.y[order])

    # ---------------------------------------------------------------------------- training
    def needs_calibration(self) -> bool:
        """True when a calibration should start before the next step."""
        if self.mode != "instant" or self.window is not None:
            return False
        every = self.config.instant.calib_every
        return not self.bases or (every > 0 and self.step_count > 0
                                  and self.step_count % every == 0)

    def begin_calibration(self) -> None:
        """Recalibrate inside training: the next ``calib_batches`` steps run the ``recal`` graphs
        (the INSTANT step with the current bases, plus the Grams of the full activations and
        output gradients); after the last one the ranks and bases are set. Before any bases
        exist, use :meth:`calibrate` (dedicated passes)."""
        if not self.bases:
            raise RuntimeError("no bases yet: the first calibration is calibrate()")
        self.window = GramWindow(self.bundle.layers, self.config.instant.calib_batches)

    @property
    def step_mode(self) -> str:
        return "recal" if self.window is not None else self.mode

    def gradients(self, batch: Batch) -> tuple[float, int]:
        """Forward and backward over micro-batches; leaves the batch-mean gradients in the
        gradient buffers and returns (mean loss, correct predictions). Weights are not touched.
        In a calibration window the passes also add their Gram matrices to the window.

        Raises:
            ArenaExhausted: a micro-batch did not fit the arena's cap (buffers are then
                undefined: zero them by calling ``gradients`` again; an open calibration
                window starts again; fused SGD momentum, which the finished micro-batches
                had added to, is zeroed: the weights are untouched).
        """
        n = len(batch)
        batch = self._by_length(batch)
        mode = self.step_mode
        micro = self.plan.micro_batch
        res = self._res() if self.resident else None
        if res is not None:
            res.zero_grads()
        elif self.fused:
            self.optimizer.begin_fused(self.params)  # v = μv + λp; the backward adds g
        else:
            for g in self._grads.values():
                g.fill(0.0)
        loss_sum = 0.0
        correct = count = 0
        step = res.micro_step if res is not None else self._micro_step
        parts = chunks(n, micro)
        if self.whole_batches and len(parts) > 1:
            raise UserError(f"micro-batch {micro} would split the batch of {n}, and this "
                            "model's output for a row depends on the other rows of its batch "
                            f"(the export's note): raise --budget, or pass --batch {micro}")
        shares = self._shares(batch, parts)
        try:
            for (s, e), share in zip(parts, shares, strict=True):
                if share is None:  # no labelled token here: nothing to add
                    continue
                x, y = batch.rows(s, e)
                try:
                    loss, c = step(mode, x, y, share)
                except (ArenaExhausted, UserError):
                    raise
                except Exception as exc:  # noqa: BLE001 - onnxruntime errors of the resident path
                    raise self._run_error(exc, "training") from None
                loss_sum += loss * share
                correct, count = correct + c[0], count + c[1]
        except ArenaExhausted:
            if self.window is not None:
                self.window.reset()
            if res is None and self.fused:  # v = μv + λp + a part of g: not to be repeated
                self.optimizer.reset()
            raise
        finally:
            self.shared.release()
        self.last_count = count  # labels counted: samples, or tokens with a label
        return loss_sum, correct

    @functools.cached_property
    def _per_token(self) -> bool:
        """Labels [N, L]: the loss is a mean over the labelled tokens."""
        spec = self.bundle.manifest.loss
        return spec.kind == "cross_entropy" and len(spec.labels.shape) > 1

    def _shares(self, batch: Batch, parts: list[tuple[int, int]]) -> list[float | None]:
        """Each micro-batch's share of the step's loss, so that the step's gradient is the
        whole batch's whatever the micro-batch: its share of the samples, or, where the loss is
        a mean over labelled tokens (``[N, L]`` labels), its share of those (None: it has none;
        a mean over none is not a number). Per sample, micro-batches of 3 and 5 rows holding
        30 and 10 labelled tokens weighed the first's token mean 3/8 instead of 3/4."""
        n = len(batch)
        by_sample: list[float | None] = [(e - s) / n for s, e in parts]
        if len(parts) < 2 or not self._per_token:
            return by_sample
        if isinstance(batch, ArrayBatch):
            y = batch.y
        elif isinstance(batch, IndexBatch) and hasattr(batch.data, "take_labels"):
            y = batch.data.take_labels(batch.idx)
        else:
            y = np.concatenate([batch.rows(s, e)[1] for s, e in parts])
        labelled = _labelled(np.asarray(y).reshape(n, -1), axis=1)
        total = int(labelled.sum())
        if total == 0:
            return by_sample  # no label at all: the step's loss is not a number either way
        counts = [int(labelled[s:e].sum()) for s, e in parts]
        return [c / total if c else None for c in counts]

    def add_grams(self, weight: float, y: np.ndarray, fwd: dict[str, np.ndarray],
                  bwd: dict[str, np.ndarray]) -> None:
        """Add one calibration micro-batch's Grams (by layer) to the window. The output-gradient
        Grams carry the loss scale ``weight``/``k`` per loss term, k the micro-batch's samples
        (or labelled tokens, ``[N, L]`` labels): (k / weight)² undoes it. A micro-batch with no
        labelled token adds nothing (a mean over none is not a number)."""
        w = self.window
        m = len(y)
        k = int(_labelled(y)) if self._per_token else m
        if k == 0:
            return
        with np.errstate(over="ignore", invalid="ignore"):  # inf Grams: finish_calibration says
            for layer, g in fwd.items():
                w.gx[layer] += g
            scale = (k / weight) ** 2
            for layer, g in bwd.items():
                _add_scaled(w.gg[layer], g, scale)
        w.samples += m

    def _micro_step(self, mode: str, x: dict[str, np.ndarray], y: np.ndarray,
                    weight: float) -> tuple[float, int]:
        """One forward + backward; adds ``weight`` × this micro-batch's gradient into the
        gradient buffers.

        A function of its own on purpose: every ``OrtValue`` that ``run_with_ort_values``
        returns keeps the whole output vector alive, so one stray reference (a loop variable)
        would keep all saved tensors of this micro-batch resident during the next one.
        """
        key, length = self.graphs_at(mode, x)
        io = self.bundle.io(key)
        fout = io.forward_outputs
        fwd, bwd = self.session(key, "forward"), self.session(key, "backward")
        carried = self.prefix_feeds(x, y, length)
        if length is not None:  # graphs at a shorter length: token inputs and bases cut to it
            x = _cut_tokens(x, set(self.bundle.manifest.text.token_inputs), length)
            carried.update(self._bases_at(length))
        try:
            outs = fwd.run_with_ort_values(fout, self._feeds(io.forward_inputs, x, y, carried),
                                           run_options())
        except Exception as exc:  # noqa: BLE001
            raise self._run_error(exc, "forward") from None
        self.shared.release()  # frozen weights read by the forward leave the RSS again
        extra = dict(zip(fout, outs, strict=True))
        del outs
        extra.update(carried)
        del carried
        fgrams = {layer: extra.pop(name).numpy() for layer, name in io.fwd_grams.items()}
        loss = float(extra[names.LOSS].numpy())
        correct = (0, len(y))
        if self.bundle.classification and self.bundle.output in extra:
            correct = score(extra[self.bundle.output].numpy(), y, self.bundle.manifest.loss)
        extra[io.loss_scale] = _ov(np.array(weight, np.float32))
        extra.update((io.grad_acc[p], self._grad_ov[p]) for p in self.params)
        binding = bwd.io_binding()
        for name, value in self._feeds(io.backward_inputs, x, y, extra).items():
            binding.bind_ortvalue_input(name, value)
        del extra
        for p in self.params:
            binding.bind_ortvalue_output(io.grads[p], self._grad_ov[p])
        for name in io.bwd_grams.values():
            binding.bind_output(name, "cpu")
        try:
            bwd.run_with_iobinding(binding, run_options())
        except Exception as exc:  # noqa: BLE001
            raise self._run_error(exc, "backward") from None
        if io.bwd_grams:
            got = binding.get_outputs()[len(self.params):]
            self.add_grams(weight, y, fgrams,
                           {layer: v.numpy() for layer, v in zip(io.bwd_grams, got, strict=True)})
        return loss, correct

    def _run_error(self, exc: Exception, phase: str) -> Exception:
        # (a signal handler's TrainingInterrupted is a BaseException: never seen here; session
        # 27 probe: Ctrl-C in the final evaluation had exited 2 as onnxruntime's failure)
        if runs_aborted():  # the signal watchdog ended the run (checkpoint.StopSignals)
            return StepAbandoned(phase)
        if is_out_of_memory(exc):
            at = (f"micro-batch {self.plan.micro_batch}" if self.plan.micro_batch
                  else "the whole batch")
            return ArenaExhausted(f"{phase} at {at}: {ort_message(exc, 400)[-160:]}")
        if isinstance(exc, UserError):
            return exc
        first = ort_message(exc)
        return UserError(f"onnxruntime failed in the {phase} pass: {first}; check that the data "
                         "matches the bundle's inputs, or re-export the bundle")

    def train_step(self, batch: Batch) -> StepResult:
        """One optimizer step on ``batch`` (a calibration step when a window is open; the
        window's last step also sets the new ranks: ``StepResult.calibrated``)."""
        t0 = time.perf_counter()
        if self.mode == "instant" and not self.bases:
            self.calibrate_on([batch])  # no bases yet: calibrate on this batch first
        calibrating = self.window is not None
        loss_sum, correct = self.gradients(batch)
        if self.resident:
            finite = bool(np.isfinite(loss_sum))
            if finite:
                self._res().optimizer_step()
        else:
            finite = bool(np.isfinite(loss_sum)) and all(
                np.isfinite(g.sum()) for g in self._grads.values())
            if self.fused:
                if finite:
                    self.optimizer.finish_fused(self.params)
                else:  # the momentum holds the non-finite gradient now: start it afresh
                    self.optimizer.reset()
            elif finite:  # a non-finite loss skips the update; the caller warns and counts
                self.optimizer.step(self.params, self._grads)
        self.step_count += 1
        calibrated = None
        if calibrating:
            self.window.done += 1
            self.calib_steps += 1  # a training step: its time counts as a step's
            if self.window.complete:
                calibrated = self.finish_calibration()
        return StepResult(loss_sum, correct, self.last_count, time.perf_counter() - t0, finite,
                          "recal" if calibrating else self.mode, calibrated)

    # ---------------------------------------------------------------------------- calibration
    def finish_calibration(self) -> bool:
        """Choose ranks from the window's Grams (``runtime/ranks.py``) and set the bases.

        Returns False (bases unchanged, one warning kept in ``warnings``) when the Grams are
        not finite, e.g. after a divergence.

        Raises:
            UserError: non-finite Grams at the first calibration (no bases to keep).
        """
        t0 = time.perf_counter()
        w, self.window = self.window, None
        try:
            spectra = w.spectra({ly.name: g[0].name for g in basis_groups(self.bundle.layers)
                                 .values() for ly in g})
        except DegenerateGram:
            self.calib_skipped += 1
            msg = (f"calibration at step {self.step_count} saw non-finite activations or "
                   "gradients; kept the previous bases" if self.bases else
                   "calibration saw non-finite activations or gradients (diverged or extreme "
                   "inputs); lower --lr or check the data" if self.step_count else
                   "calibration saw non-finite activations or gradients before any update: the "
                   + (f"weights it started from (--init-from {self.started_from}) or the "
                      "data's values are too large for INSTANT's float32 statistics (Gram "
                      "matrices); start from other weights (another --init-from, or none) or "
                      "scale the inputs down" if self.started_from else
                      "data's values are too large for INSTANT's float32 statistics (Gram "
                      "matrices); scale the inputs (or targets) down, or pass --mode vanilla"))
            self.warnings.append(msg)
            if not self.bases:
                raise UserError(msg) from None
            return False
        per_step = max(1, w.samples // w.steps)  # the batch; the plan may cut it smaller
        # the rank rule is the batch's, whatever micro-batch a budget leaves (session 50 probe:
        # a CNN's layers counted as small below micro-batch 50 of 100 and kept exact ranks
        # under 92-95 MB, capped ranks (ratio 0.287) from 98 MB: more budget, lower ranks)
        self.set_ranks(spectra, min(self.plan.micro_batch or per_step, per_step),
                       cap_rows=self.train_batch or self.plan.micro_batch or per_step)
        self.calibrations += 1
        self.calib_seconds += w.seconds + time.perf_counter() - t0
        return True

    def calibrate(self, data, batch: int, rng: np.random.Generator) -> bool:
        """A calibration in dedicated passes (the first one, before any bases exist; also for
        tools and probes): ``calib_batches`` random batches through the ``calib`` graphs (exact
        backward without parameter gradients: no optimizer step, and no activation is saved for
        a weight gradient) in calibration micro-batches, then ranks and bases.

        Returns False (bases unchanged, a warning kept) when the Grams are not finite.

        Raises:
            ArenaExhausted: a calibration micro-batch did not fit the arena's cap.
            UserError: non-finite Grams at the first calibration.
        """
        batches = []
        for _ in range(self.config.instant.calib_batches):
            idx = rng.choice(len(data), size=min(batch, len(data)), replace=False)
            batches.append(IndexBatch(data, idx))
        return self.calibrate_on(batches)

    def calibrate_on(self, batches: list[Batch]) -> bool:
        """:meth:`calibrate` on these batches."""
        t0 = time.perf_counter()
        io = self.bundle.io("calib")
        cf, cb = self.session("calib", "forward"), self.session("calib", "backward")
        self.window = GramWindow(self.bundle.layers, len(batches))
        micro = self.plan.calib_micro_batch or self.plan.micro_batch
        try:
            for b in batches:
                b = self._by_length(b)
                for s, e in chunks(len(b), micro):
                    self._calib_micro(cf, cb, io, *b.rows(s, e))
                self.window.done += 1
        except BaseException:
            self.window = None
            raise
        finally:
            self.shared.release()
        self.window.seconds = time.perf_counter() - t0
        return self.finish_calibration()

    def _calib_micro(self, cf, cb, io, x: dict[str, np.ndarray], y: np.ndarray) -> None:
        params = self._resident.params if self._resident is not None else {}
        carried = self.prefix_feeds(x, y)
        try:
            outs = cf.run_with_ort_values(io.forward_outputs,
                                          self._feeds(io.forward_inputs, x, y,
                                                      {**params, **carried}), run_options())
        except Exception as exc:  # noqa: BLE001
            raise self._run_error(exc, "calibration forward") from None
        self.shared.release()
        saved = dict(zip(io.forward_outputs, outs, strict=True))
        del outs
        saved.update(carried)
        del carried
        fgrams = {layer: saved.pop(name).numpy() for layer, name in io.fwd_grams.items()}
        feeds = self._feeds(io.backward_inputs, x, y, {**params, **saved})
        del saved
        try:
            grams = cb.run_with_ort_values(list(io.bwd_grams.values()), feeds, run_options())
        except Exception as exc:  # noqa: BLE001
            raise self._run_error(exc, "calibration backward") from None
        del feeds
        # the calib backward's seed is 1: the output gradients carry 1/k (weight 1), k the
        # samples or labelled tokens the loss averages over
        self.add_grams(1.0, y, fgrams, {ly: g.numpy() for ly, g in
                                        zip(io.bwd_grams, grams, strict=True)})

    def set_ranks(self, spectra: dict[str, tuple[Spectrum, Spectrum]], rows: int = 1,
                  cap_rows: int | None = None) -> None:
        """Choose ranks from the spectra under the plan's budget, for micro-batches of ``rows``
        samples (the channel-axis products that run once per micro-batch), and set the bases.
        ``cap_rows``: the training batch, which decides whether the default FLOP cap binds
        (ranks.choose_ranks; a first calibration may read fewer samples than a step)."""
        self.rank_rows = rows
        self.exact_start = starts_exact(self.bundle.layers, self.config.instant, cap_rows or rows)
        ranks = choose_ranks(self.bundle.layers, spectra, self.config.instant,
                             self.plan.saved_budget, rows, cap_rows=cap_rows)
        if not self.calibrations:  # (once: the first calibration)
            for low in (unreached_saved_ratio(self.bundle.layers, ranks,
                                              self.config.instant.saved_ratio),
                        unreached_flop_ratio(self.bundle.layers, ranks, self.config.instant,
                                             rows)):
                if low:
                    self.warnings.append(low)
        for ly in self.bundle.layers:
            sx, sg = spectra[ly.name]
            rx, ry = ranks[ly.name]
            self.set_bases(ly.name, basis(sx, rx), basis(sg, ry))

    def set_bases(self, layer: str, p: Basis, q: Basis) -> None:
        ly = next(x for x in self.bundle.layers if x.name == layer)
        self.bases[layer] = (p, q)
        self._cut_bases.clear()
        self._basis_ov[ly.p_input] = _ov(p.matrix)
        self._basis_ov[ly.q_input] = _ov(q.matrix)

    def ranks(self) -> dict[str, tuple[int, int]]:
        return {k: (p.rank, q.rank) for k, (p, q) in self.bases.items()}

    def cost_table(self) -> str:
        """The per-layer ranks, FLOPs and saved bytes at the current ranks (runtime/accounting)."""
        from .accounting import format_table, layer_costs

        kept = {k: (p.kept_variance, q.kept_variance) for k, (p, q) in self.bases.items()}
        table = format_table(layer_costs(self.bundle.layers, self.ranks(), self.rank_rows, kept))
        if not self.exact_start:
            return table
        mflop = (f"{self.config.instant.flop_cap_min / 1e6:.0f} MFLOP a batch"
                 + (f" of {self.train_batch}" if self.train_batch else ""))
        if any(p.rank < ly.x_dim or q.rank < ly.g_dim  # (session 38 probe: "start at exact"
               for ly in self.bundle.layers for p, q in [self.bases[ly.name]]):  # at ranks of 1)
            table += (f"\nranks started at exact (these layers' exact backward is below "
                      f"{mflop}); those below it were lowered by a --budget's memory, "
                      "--saved-ratio or --max-rank, or the calibration data had no more "
                      "directions")
        else:
            table += ("\nranks start at exact: these layers' exact backward is small (below "
                      f"{mflop}), so compressing them saves little, and from scratch it cost "
                      "accuracy; a --budget's memory or --saved-ratio lowers them, --variance "
                      "0.99 compresses by the variance rule")
        return table

    # ---------------------------------------------------------------------------- evaluation
    def evaluate(self, data, batch: int | None = None,
                 trim: bool = True) -> tuple[float, float | None]:
        """Mean loss and accuracy (classes) on ``data`` with the inference graph, reading the
        bundle's declared output (the same one training accuracy reads).

        A text bundle whose inference graph takes any length (``TextSpec.any_length``) is run in
        micro-batches of similar lengths, longest first, each without its trailing padding
        (``trim``; False: padded to the full length, as the budget probes measure it)."""
        sess = self.session(names.INFER, "forward")
        inputs = [i.name for i in sess.get_inputs()]
        out = self.bundle.output
        total = 0.0
        correct = counted = 0
        n = len(data)
        micro = batch or self.plan.eval_micro_batch or 256
        if self.plan.eval_micro_batch:
            micro = min(micro, self.plan.eval_micro_batch)
        spec = self.bundle.manifest.loss
        ce = spec.kind == "cross_entropy"
        text = self.bundle.manifest.text
        lengths = self._lengths(data, micro) if trim and text and text.any_length else None
        order = np.argsort(-lengths, kind="stable") if lengths is not None else None
        tokens = set(text.token_inputs) if text else set()
        try:
            for s in range(0, n, micro):
                idx = order[s:s + micro] if order is not None else np.arange(s, min(n, s + micro))
                x, y = data.take(idx)
                if lengths is not None:
                    x = _cut_tokens(x, tokens, _run_length(lengths[idx].max(), text.seq_len))
                extra = self._resident.params if self._resident is not None else None
                try:
                    logits = sess.run_with_ort_values(
                        [out], self._feeds(inputs, x, y, extra), run_options())[0].numpy()
                except Exception as exc:  # noqa: BLE001
                    raise self._run_error(exc, "evaluation") from None
                if logits.ndim == 0 or logits.shape[0] != len(y):  # (session 50 probe: an
                    raise UserError(  # IndexError traceback, a sequence-first model's bundle)
                        f"the bundle's output '{out}' has "
                        f"{logits.shape[0] if logits.ndim else 'no'} rows for {len(y)} rows of "
                        "data: the model does not give one row per input row (axis 0 of its "
                        "inputs and outputs is the batch); export a batch-first model again")
                logits = logits.astype(np.float64, copy=False)
                if spec.kind == "bce" and spec.probabilities:  # a Sigmoid's output p
                    with np.errstate(divide="ignore"):  # log 0: clamped at -100, as torch
                        terms = -(y * np.maximum(np.log(logits), -100.0)
                                  + (1 - y) * np.maximum(np.log1p(-logits), -100.0))
                    total += float(terms.reshape(len(y), -1).mean(1).sum())
                    c, k = score(logits, y, spec)
                    correct, counted = correct + c, counted + k
                elif spec.kind == "bce":  # softplus(z) - z·y, per sample the mean of its terms
                    terms = np.logaddexp(0.0, logits) - logits * y
                    total += float(terms.reshape(len(y), -1).mean(1).sum())
                    c, k = score(logits, y, spec)
                    correct, counted = correct + c, counted + k
                elif ce:
                    logits = classes_last(logits, spec)
                    if spec.probabilities:  # a Softmax's output p: log p, clamped as torch's
                        with np.errstate(divide="ignore"):  # binary one (log 0 -> -100)
                            logp = np.maximum(np.log(logits), -100.0)
                    else:
                        z = logits - logits.max(-1, keepdims=True)
                        logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
                    keep = y != names.IGNORE_LABEL if y.ndim > 1 else np.ones(y.shape, bool)
                    picked = np.take_along_axis(logp, np.where(keep, y, 0)[..., None], -1)[..., 0]
                    total += float(-(picked * keep).sum())
                    c, k = hits(logits, y)
                    correct, counted = correct + c, counted + k
                else:
                    total += float(np.square(logits - y).mean(axis=tuple(range(1, y.ndim))).sum())
        finally:
            self.shared.release()
        accuracy = correct / counted if counted else None  # counted: classification only
        return total / max(counted if ce else n, 1), accuracy  # ce: per label, else per sample

    def _lengths(self, data, micro: int) -> np.ndarray | None:
        """Each row's length up to its last unmasked token (at least 1), read ``micro`` rows at a
        time; None without an attention mask."""
        n = len(data)
        return self._read_lengths(lambda s, e: data.take(np.arange(s, e)), n, micro)

    def _read_lengths(self, rows, n: int, micro: int) -> np.ndarray | None:
        """Row lengths from the mask of ``rows(start, stop)`` read ``micro`` rows at a time."""
        mask_name = self.bundle.manifest.text.mask_input
        out = np.ones(n, np.int64)
        for s in range(0, n, micro):
            x, _ = rows(s, min(n, s + micro))
            mask = x.get(mask_name)
            if mask is None or mask.ndim != 2:
                return None
            out[s:s + len(mask)] = _row_lengths(mask)
        return out

    # ---------------------------------------------------------------------------- checkpoints
    def state(self) -> tuple[dict[str, np.ndarray], dict]:
        """Everything a resumed run needs from the trainer, as (arrays, JSON-able meta): weights,
        optimizer moments and step, INSTANT bases and ranks, step and calibration counters, and
        the micro-batches in use (a guard may have lowered them)."""
        self.sync_to_host()
        arrays = {f"param/{k}": v for k, v in self.params.items()}
        for k, st in self.optimizer.state.items():
            for name, a in st.items():
                arrays[f"opt/{k}/{name}"] = a
        bases = {}
        for layer, pair in self.bases.items():
            for tag, b in zip("pq", pair, strict=True):
                arrays[f"basis/{layer}/{tag}"] = b.matrix
                arrays[f"basis/{layer}/{tag}.spectrum"] = b.spectrum
            bases[layer] = {tag: [b.rank, b.retained] for tag, b in zip("pq", pair, strict=True)}
        meta = {"mode": self.mode, "optimizer": self.config.optim.name,
                "optimizer_t": self.optimizer.t, "step_count": self.step_count,
                "calibrations": self.calibrations, "calib_seconds": self.calib_seconds,
                "calib_steps": self.calib_steps, "bases": bases,
                "micro_batch": self.plan.micro_batch,
                "calib_micro_batch": self.plan.calib_micro_batch, "window": None,
                "settings": self.settings(), "rank_rows": self.rank_rows,
                "exact_when_small": self.config.instant.exact_when_small,
                "exact_start": self.exact_start}
        if self.window is not None:  # a checkpoint inside a calibration keeps its Grams
            warrays, meta["window"] = self.window.state()
            arrays.update(warrays)
        return arrays, meta

    def release_written_buffers(self) -> bool:
        """Before the budget's probes fork: free the buffers a probe writes (the gradient
        buffers, which are SGD's momentum where fused, and its scratch) while they hold zeros.
        A fork shares this process's pages until the child writes one; the kernel then copies
        it, and the process tree held those buffers twice: 265 MB under --budget 256MB on the
        demo (each process within it; session 28, PSS summed over the tree from outside). Each
        probe makes its own (:meth:`renew_written_buffers`, counted in its RSS), as this process
        does after the plan. Returns whether they were freed (not after a step: they stay)."""
        if self._evaluating or self._grads_freed:
            return self._grads_freed
        if self.fused and not self.optimizer.release_fused() \
                or not self.fused and any(g.any() for g in self._grads.values()):
            return False
        self._grads, self._grad_ov = {}, {}
        self._grads_freed = True
        return True

    def renew_written_buffers(self) -> None:
        """Make the buffers :meth:`release_written_buffers` freed (zeros, pages written)."""
        if not self._grads_freed:
            return
        if self.fused:
            self.optimizer.renew_fused()
        self._make_grads()
        self._grads_freed = False

    def _make_grads(self) -> None:
        """The gradient buffers and their OrtValues: none for ``eval``, SGD's momentum where
        the backward adds into it (fused), else zeros written now (optim.resident_zeros)."""
        if self._evaluating:
            self._grads = {}
        elif self.fused:
            self._grads = {p: self.optimizer.state[p]["v"] for p in self.params}
        else:
            self._grads = {p: resident_zeros(v) for p, v in self.params.items()}
        self._grad_ov = {p: _ov(g) for p, g in self._grads.items()}

    def _check_buffers_fit(self) -> None:
        """Under a budget (memory.budget_given), refuse before allocating the buffers every
        trainable tensor gets for the whole run (AdamW's two moments and a gradient buffer,
        SGD's momentum, which the gradient adds into) where they alone take the process past
        the budget: a 61 MB embedding table under --budget 300MB reached 372 MB before the
        plan's refusal (session-20 probe). A lower bound: sessions and activations come on top.

        Raises:
            UserError: the budget cannot hold them."""
        budget = budget_given()
        if budget is None:
            return
        o = self.config.optim
        per_tensor = 0 if self._evaluating else state_buffers(o) + (0 if self.fused else 1)
        sizes = [4 * math.prod(int(d) for d in p.shape) for p in self.bundle.params]
        size = sum(sizes)
        scratch = 0 if self._evaluating else max(sizes, default=0)  # the optimizer's
        now = current_rss()
        # checked before the tensors are read (float32 from the manifest's shapes), so that
        # reading them cannot pass the budget either; + the optimizer's scratch (the largest
        # tensor): a probe's 79 MB model under --budget 400MB reached 414 MB before the
        # plan's refusal, where this check had counted 375 (session 27)
        need = now + (1 + per_tensor) * size + scratch
        # a process already past the budget (the interpreter alone) is the plan's to refuse:
        # its way out accounts for the sessions too
        if now <= budget < need:
            from .memory import device_given

            device = device_given()  # (session 34 probe: a way out past the profile's RAM)
            if device is not None and need > device[1]:
                raise UserError(f"this bundle does not fit profile '{device[0]}': its trainable "
                                f"tensors, {size / 1e6:.0f} MB, take the process to "
                                f"{need / 1e6:.0f} MB before any step, more than its "
                                f"{device[1] / 1e6:.0f} MB of RAM; export with fewer trainable "
                                "tensors (--trainable)" + (", or train with --optimizer sgd "
                                                          "(one buffer a tensor)"
                                                          if o.name == "adamw" else ""))
            beyond = device is not None and 2 * need > device[1]  # (session 43 probe: the
            # guess was cut to the device's RAM without a word, then refused there)
            raise UserError(f"budget {budget_mb(budget)} MB is below the minimum for this bundle "
                            f"(its trainable tensors, {size / 1e6:.0f} MB, "
                            + (f"and their {per_tensor} buffer(s) each " if per_tensor else "")
                            + f"take the process to {need / 1e6:.0f} MB before any "
                            f"{'pass' if self._evaluating else 'step'}); raise --budget well above "
                            + (f"it, e.g. to {2 * need / 1e6:.0f}MB, or" if not beyond else
                               f"it (twice it, {2 * need / 1e6:.0f} MB, a generous guess, is more "
                               f"than the {device[1] / 1e6:.0f} MB of RAM of profile "
                               f"'{device[0]}': it may not fit that device), or")
                            + " export with fewer trainable tensors (--trainable)"
                            + (", or train with --optimizer sgd (one buffer a tensor)"
                               if o.name == "adamw" else ""))

    def settings(self) -> dict:
        """The options a resume must repeat to continue the same run (CLI flag: value)."""
        o = self.config.optim
        out = {"--lr": o.lr, "--weight-decay": o.decay}  # the value used, given or default
        if self.mode == "instant":  # every InstantConfig field is a flag of the same name
            out.update({"--" + f.name.replace("_", "-"): getattr(self.config.instant, f.name)
                        for f in fields(self.config.instant)
                        if f.name not in ("flop_cap_min", "exact_when_small")})  # no flags:
            # set by --flop-ratio's and --variance's use (the latter: checkpoint meta
            # "exact_when_small", which checkpoints before session 37 lack)
        return out

    def load_state(self, arrays: dict[str, np.ndarray], meta: dict) -> None:
        """Restore :meth:`state` in place (the sessions' inputs keep pointing at the same arrays).
        A smaller saved micro-batch (a guard lowered it) replaces the plan's.

        Everything is checked before anything changes: a checkpoint is untrusted input (a copy
        from elsewhere, a tampered or truncated-then-rewritten file), and a half-restored trainer
        would train on a mix of two states.

        Raises:
            UserError: the saved mode or optimizer differ from this trainer's.
            DamagedCheckpoint: a missing or malformed value, an array of another shape or dtype
                (parameters, optimizer moments, bases, Grams), NaN or inf in any of them, a
                negative AdamW second moment, a count out of range.
        """
        self.check_same_run(meta)
        # (a piece at a time: a resume held two AdamW moments of a 51 MB table at once)
        self._load_checked(arrays, meta)

    def check_same_run(self, meta: dict, run: Path | None = None) -> None:
        """Raise ``UserError`` where a checkpoint's mode, optimizer or recorded options differ
        from this run's (``finished_already`` asks before it says a run has finished: session
        34 probe, a finished run "resumed" with another --mode was told to pass a larger
        --steps, which was then refused)."""
        new_run = ("train on from its weights with the new ones as a new run: --init-from "
                   f"{run or 'RUN_FOLDER'} with another --out (--overwrite in place of --resume "
                   "starts afresh)")  # (session 46 probe: --mode/--optimizer named no way on)
        mine = {"mode": self.mode, "optimizer": self.config.optim.name}
        for key, want in mine.items():
            got = meta.get(key)
            if key == "optimizer" and isinstance(got, str):
                got = got.lower()
            if got != want:
                raise UserError(f"checkpoint was trained with {key} '{meta.get(key)}', this run "
                                f"uses '{want}'; resume with the same --{key}, or {new_run}")
        theirs = meta.get("settings")  # (absent in checkpoints written before it existed)
        if isinstance(theirs, dict):
            if theirs.get("--weight-decay", 0.0) is None:  # written as given (None: the default
                # of the optimizer, which is this run's: checked above)
                theirs = {**theirs, "--weight-decay": replace(self.config.optim,
                                                              weight_decay=None).decay}
            def said(v) -> str:  # (None: the option was left to its default)
                return "its default" if v is None else str(v)

            diff = [f"{k} {said(theirs[k])} (this run: {said(v)})"
                    for k, v in self.settings().items() if k in theirs and theirs[k] != v]
            ews = meta.get("exact_when_small")  # (absent before session 37)
            if self.mode == "instant" and isinstance(ews, bool) \
                    and ews != self.config.instant.exact_when_small:
                diff.append("--variance left out (this run gives it)" if ews else
                            f"--variance {theirs.get('--variance')} (this run: left out)")
            if diff:
                raise UserError(f"checkpoint was trained with {', '.join(diff[:4])}; resume "
                                f"with the same options to continue the same run, or {new_run}")

    def _load_checked(self, arrays: dict[str, np.ndarray], meta: dict) -> None:
        """``load_state`` past the options' check: every array checked, then restored."""
        from .checkpoint import (
            DamagedCheckpoint,
            check_array,
            describe,
            meta_array,
            meta_float,
            meta_int,
            restore_array,
        )

        for k, v in self.params.items():
            check_array(arrays, f"param/{k}", v.shape, v.dtype)
        for k, st in self.optimizer.state.items():
            for name, a in st.items():
                second = self.config.optim.name == "adamw" and name == "v"
                check_array(arrays, f"opt/{k}/{name}", a.shape, a.dtype,
                            "AdamW's second moment" if second else "")
        steps = meta_int(meta, "step_count", "trainer")
        t = meta_int(meta, "optimizer_t", "trainer", hi=steps)  # one update per step at most
        calibrations = meta_int(meta, "calibrations", "trainer")
        calib_seconds = meta_float(meta, "calib_seconds", "trainer", hi=1e9)
        calib_steps = meta_int(meta, "calib_steps", "trainer", default=0)
        # the micro-batch the saved ranks were chosen for (the FLOP table prices them there);
        # checkpoints written before it was saved: the micro-batch they ran
        rank_rows = meta_int(meta, "rank_rows", "trainer", lo=1, none_ok=True, default=None)
        saved = meta_int(meta, "micro_batch", "trainer", lo=1, none_ok=True, default=None)
        saved_c = meta_int(meta, "calib_micro_batch", "trainer", lo=1, none_ok=True,
                           default=None)
        layers = {ly.name: ly for ly in self.bundle.layers}
        bases = meta.get("bases")
        if not isinstance(bases, dict) or (bases and (set(bases) != set(layers)
                                                      or self.mode != "instant")):
            want = "{}" if self.mode != "instant" else f"{{}} or one entry per layer {sorted(layers)}"
            raise DamagedCheckpoint(f"trainer.bases is {describe(bases)}, expected {want}")
        restored = {}
        for layer, ranks in bases.items():
            ly = layers[layer]
            pair = []
            for tag, dim in (("p", ly.x_dim), ("q", ly.g_dim)):
                entry = ranks.get(tag) if isinstance(ranks, dict) else None
                if not (isinstance(entry, list) and len(entry) == 2):
                    raise DamagedCheckpoint(f"trainer.bases.{layer}.{tag} is {describe(entry)}, "
                                            "expected [rank, retained]")
                where = f"trainer.bases.{layer}.{tag}"
                rank = meta_int({"rank": entry[0]}, "rank", where, lo=1, hi=dim)
                kept = meta_float({"retained": entry[1]}, "retained", where, hi=1.0 + 1e-6)
                m = meta_array(arrays, f"basis/{layer}/{tag}", (rank, dim), np.float32)
                sp = meta_array(arrays, f"basis/{layer}/{tag}.spectrum", (dim,), np.float32)
                pair.append(Basis(m, rank, kept, sp))
            restored[layer] = pair
        window = meta.get("window")
        if window is not None:
            if not isinstance(window, dict) or not bases:
                raise DamagedCheckpoint(f"trainer.window is {describe(window)}, expected null "
                                        "or an open calibration's state (with bases)")
            for k in ("steps", "samples", "done"):
                meta_int(window, k, "trainer.window", lo=1 if k == "steps" else 0)
            meta_float(window, "seconds", "trainer.window")
            for ly in self.bundle.layers:
                meta_array(arrays, f"gram/{ly.name}/x", (ly.x_dim, ly.x_dim), np.float64)
                meta_array(arrays, f"gram/{ly.name}/g", (ly.g_dim, ly.g_dim), np.float64)
        # -- restore (nothing below can fail on the checked values)
        for k, v in self.params.items():
            restore_array(arrays, f"param/{k}", v)
        for k, st in self.optimizer.state.items():
            for name, a in st.items():
                restore_array(arrays, f"opt/{k}/{name}", a)
        self.optimizer.t = t
        self.bases.clear()
        self._basis_ov.clear()
        for layer, (p, q) in restored.items():
            self.set_bases(layer, p, q)
        self.step_count = steps
        now = self.plan.micro_batch
        if saved is not None and (now is None or saved < now):
            self.plan = self.plan.with_micro_batch(saved)
        now_c = self.plan.calib_micro_batch
        if saved_c is not None and (now_c is None or saved_c < now_c):
            self.plan = replace(self.plan, calib_micro_batch=saved_c)
        self.rank_rows = rank_rows or saved or self.plan.micro_batch or 1
        self.exact_start = meta.get("exact_start") is True  # what chose the saved ranks
        self.calibrations = calibrations
        self.calib_seconds = calib_seconds
        self.calib_steps = calib_steps
        self.window = None
        if window is not None:
            self.begin_calibration()
            self.window.load_state(arrays, window)
        if self._resident is not None:
            self._resident.from_host()

    def save_params(self, path) -> None:
        """The trained parameters as ``.npz``, written atomically (a crash leaves the previous
        file or the new one)."""
        self.sync_to_host()
        atomic_write(Path(path), lambda p: write_npz(p, self.params))
