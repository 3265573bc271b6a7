"""The training loop: forward and backward sessions, micro-batches, calibration, optimizer.

Memory discipline (DESIGN.md §2):
* forward and backward are separate sessions; the forward returns exactly the tensors the
  backward needs, kept as ``OrtValue`` (never copied into numpy) and dropped after the backward;
* trainable parameters are wrapped once as ``OrtValue`` over the numpy arrays the optimizer
  updates in place, so no copy per step;
* frozen weights are external data that onnxruntime memory-maps;
* nodes run in priority order so forward-side compression runs as soon as its input exists.
"""

from __future__ import annotations

import mmap
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .bundle import Bundle
from .calibrate import Basis, basis_from_gram
from .checkpoint import atomic_write, write_npz
from .data import Dataset
from .errors import UserError
from .memory import tune_malloc
from .optim import make_optimizer

__all__ = ["SessionConfig", "StepResult", "Trainer", "make_session"]


@dataclass
class SessionConfig:
    threads: int = 0  # 0: onnxruntime's default
    arena: bool = False
    providers: list[str] = field(default_factory=lambda: ["CPUExecutionProvider"])


class SharedWeights:
    """The bundle's frozen weights, memory-mapped once and handed to every session.

    Without this each session maps ``weights.bin`` on its own, and the pages a session touches
    count again in the process RSS (measured: +48 MB for a second MiniLM session).
    """

    def __init__(self, bundle: Bundle) -> None:
        self.tensors: dict = bundle.manifest.get("weights", {})
        self.by_graph: dict = bundle.manifest.get("graph_weights", {})
        self._map = (np.memmap(bundle.path / "weights.bin", dtype=np.uint8, mode="r")
                     if self.tensors else None)
        self._values: dict[str, ort.OrtValue] = {}
        self.path = bundle.path / "weights.bin"
        self._file: int | None = None

    def lookup(self, table: str, ids: np.ndarray) -> np.ndarray:
        """Rows ``ids`` of the frozen ``table`` (an embedding lookup, ``Gather`` on axis 0),
        read with ``pread``: only those rows enter the process RSS, not the 64 KB around each
        one that a fault on the memory map would bring in.

        Raises:
            UserError: an id outside the table (data tokenised for another vocabulary).
        """
        t = self.tensors[table]
        shape, dtype = t["shape"], np.dtype(t["dtype"])
        row = int(np.prod(shape[1:])) * dtype.itemsize
        uniq, inverse = np.unique(np.asarray(ids).reshape(-1), return_inverse=True)
        if uniq.size and (uniq[0] < -shape[0] or uniq[-1] >= shape[0]):
            bad = uniq[-1] if uniq[-1] >= shape[0] else uniq[0]
            raise UserError(f"token id {int(bad)} is outside the {shape[0]}-row table '{table}'; "
                            "tokenise the data with the model's own vocabulary")
        rows = np.empty((uniq.size, row), np.uint8)
        fd = self._fd()
        for k, i in enumerate(uniq % shape[0]):
            os.preadv(fd, [rows[k]], t["offset"] + int(i) * row)
        return rows.view(dtype).reshape(uniq.size, *shape[1:])[inverse].reshape(
            *np.shape(ids), *shape[1:])

    def __del__(self) -> None:
        if getattr(self, "_file", None) is not None:
            os.close(self._file)

    def _fd(self) -> int:
        if self._file is None:
            self._file = os.open(self.path, os.O_RDONLY)
        return self._file

    def release(self) -> None:
        """Drop the mapped pages from this process's RSS (MADV_DONTNEED on a read-only file
        mapping: the next access faults them back in from the page cache). Called between
        steps, so frozen weights count in the peak only while a pass actually reads them;
        otherwise every embedding row ever gathered would stay resident."""
        mm = getattr(self._map, "_mmap", None)
        if mm is not None and hasattr(mm, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
            mm.madvise(mmap.MADV_DONTNEED)

    def for_graph(self, path) -> dict[str, ort.OrtValue]:
        out = {}
        for name in self.by_graph.get(Path(path).name, []):
            if name not in self._values:
                t = self.tensors[name]
                arr = np.ndarray(t["shape"], dtype=np.dtype(t["dtype"]), buffer=self._map,
                                 offset=t["offset"])
                self._values[name] = ort.OrtValue.ortvalue_from_numpy(arr)
            out[name] = self._values[name]
        return out


def make_session(path, cfg: SessionConfig,
                 shared: SharedWeights | None = None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    if shared is not None:
        for name, value in shared.for_graph(path).items():
            so.add_initializer(name, value)
    so.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    so.enable_cpu_mem_arena = cfg.arena
    so.enable_mem_pattern = False
    # Basic (constant folding, redundant-node removal) only: the extended fusions raised the
    # training peak by 30-55 % on the token-MLP benchmark (vanilla 438 -> 570 MB above idle).
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    # Pre-packed copies of constant (frozen) weights cost ~30 MB per MiniLM session and defeat
    # the memory-mapping of weights.bin.
    so.add_session_config_entry("session.disable_prepacking", "1")
    so.log_severity_level = 3
    if cfg.threads:
        so.intra_op_num_threads = cfg.threads
    so.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(path), so, providers=cfg.providers)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises several types
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"onnxruntime cannot load {path}: {msg}; re-export the bundle") from None


@dataclass
class StepResult:
    loss: float
    correct: int
    count: int
    seconds: float
    finite: bool = True  # False: non-finite loss, the update was skipped


def _ov(a: np.ndarray) -> ort.OrtValue:
    return ort.OrtValue.ortvalue_from_numpy(a)


class Trainer:
    """Trains the bundle's parameters in ``mode`` (``instant`` or ``vanilla``)."""

    def __init__(self, bundle: Bundle, mode: str = "instant", optimizer: str = "adamw",
                 lr: float = 1e-3, weight_decay: float | None = None,
                 micro_batch: int | None = None, session: SessionConfig | None = None,
                 weights=None, energy: float | None = None, oversample: int | None = None,
                 calib_every: int | None = None, calib_batches: int | None = None,
                 calib_micro_batch: int | None = None, max_rank: int | None = None,
                 seed: int = 0) -> None:
        if mode not in ("instant", "vanilla"):
            raise UserError(f"unknown mode '{mode}'; choose instant or vanilla")
        tune_malloc()
        self.bundle = bundle
        self.mode = mode
        self.cfg = session or SessionConfig()
        inst = bundle.manifest["instant"]
        self.energy = inst["energy"] if energy is None else energy
        self.oversample = inst["oversample"] if oversample is None else oversample
        self.calib_every = inst["calib_every"] if calib_every is None else calib_every
        self.calib_batches = inst["calib_batches"] if calib_batches is None else calib_batches
        self.micro_batch = micro_batch
        self.calib_micro_batch = calib_micro_batch
        self.max_rank = max_rank
        self.rank_caps: dict[str, int] = {}  # per-layer caps set by the budget planner
        self.seed = seed
        if mode == "instant" and not bundle.layers:
            self.mode = mode = "vanilla"  # nothing to compress: instant is exact
        self.io = bundle.io(mode)
        self.params = bundle.load_params(weights)
        self._param_ov = {k: _ov(v) for k, v in self.params.items()}
        self.optimizer = make_optimizer(optimizer, self.params, lr, weight_decay)
        self.shared = SharedWeights(bundle)
        self.fwd = make_session(bundle.graph(mode, "forward"), self.cfg, self.shared)
        self.bwd = make_session(bundle.graph(mode, "backward"), self.cfg, self.shared)
        self.bases: dict[str, tuple[Basis, Basis]] = {}
        self._basis_ov: dict[str, ort.OrtValue] = {}
        self.step_count = 0
        self.calibrations = 0
        self.calib_seconds = 0.0
        self._grads: dict[str, np.ndarray] = {}  # accumulated by the backward, see gradients()
        self._grad_ov: dict[str, ort.OrtValue] = {}
        self._grad_names = self.io["grads"]

    # ---------------------------------------------------------------------------- feeding
    def _feeds(self, names: list[str], x: dict[str, np.ndarray], y: np.ndarray,
               extra: dict[str, ort.OrtValue] | None = None) -> dict[str, ort.OrtValue]:
        out: dict[str, ort.OrtValue] = {}
        for n in names:
            if extra is not None and n in extra:
                out[n] = extra[n]
            elif n in self._param_ov:
                out[n] = self._param_ov[n]
            elif n in x:
                out[n] = _ov(x[n])
            elif n in self.bundle.lookups:
                lk = self.bundle.lookups[n]
                out[n] = _ov(self.shared.lookup(lk["table"], x[lk["indices"]]))
            elif n == "labels":
                out[n] = _ov(y)
            elif n in self._basis_ov:
                out[n] = self._basis_ov[n]
            else:
                raise UserError(f"graph input '{n}' has no value (bundle and runtime disagree); "
                                "re-export the bundle")
        return out

    def _chunks(self, n: int, micro: int | None):
        m = n if not micro or micro >= n else micro
        return [(s, min(n, s + m)) for s in range(0, n, m)]

    # ---------------------------------------------------------------------------- training
    def needs_calibration(self) -> bool:
        if self.mode != "instant":
            return False
        return not self.bases or (self.calib_every > 0 and self.step_count > 0
                                  and self.step_count % self.calib_every == 0)

    def gradient_buffers(self) -> dict[str, ort.OrtValue]:
        """One gradient buffer per parameter, allocated at the first step and reused: the
        backward adds each micro-batch's gradient into it in place (output bound to the input)."""
        if not self._grads:
            for p, v in self.params.items():
                self._grads[p] = np.zeros_like(v)
            self._grad_ov = {p: _ov(g) for p, g in self._grads.items()}
        else:
            for g in self._grads.values():
                g.fill(0.0)
        return self._grad_ov

    def gradients(self, x: dict[str, np.ndarray], y: np.ndarray) -> tuple[float, int]:
        """Forward and backward over micro-batches; leaves the batch-mean gradients in
        ``self._grads`` and returns (mean loss, correct predictions). Weights are not touched."""
        n = int(y.shape[0])
        acc = self.gradient_buffers()
        loss_sum = 0.0
        correct = 0
        for s, e in self._chunks(n, self.micro_batch):
            loss, c = self._micro_step({k: v[s:e] for k, v in x.items()}, y[s:e], (e - s) / n,
                                       acc)
            loss_sum += loss * (e - s) / n
            correct += c
        self.shared.release()
        return loss_sum, correct

    def _micro_step(self, x: dict[str, np.ndarray], y: np.ndarray, weight: float,
                    acc: dict[str, ort.OrtValue]) -> tuple[float, int]:
        """One forward + backward; adds ``weight`` × this micro-batch's gradient into ``acc``.

        A function of its own on purpose: every ``OrtValue`` that ``run_with_ort_values``
        returns keeps the whole output vector alive, so one stray reference (a loop variable)
        would keep all saved tensors of this micro-batch resident during the next one.
        """
        io = self.io
        fout = io["forward_outputs"]
        outs = self.fwd.run_with_ort_values(fout, self._feeds(io["forward_inputs"], x, y))
        self.shared.release()  # frozen weights read by the forward leave the RSS again
        extra = dict(zip(fout, outs, strict=True))
        loss = float(extra["loss"].numpy())
        correct = 0
        if "logits" in extra and y.dtype.kind in "iu":
            correct = int((extra["logits"].numpy().argmax(-1) == y).sum())
        extra[io["loss_scale"]] = _ov(np.array(weight, np.float32))
        extra.update((io["grad_acc"][p], acc[p]) for p in self.params)
        binding = self.bwd.io_binding()
        for name, value in self._feeds(io["backward_inputs"], x, y, extra).items():
            binding.bind_ortvalue_input(name, value)
        for p in self.params:
            binding.bind_ortvalue_output(self._grad_names[p], acc[p])
        self.bwd.run_with_iobinding(binding)
        return loss, correct

    def train_step(self, x: dict[str, np.ndarray], y: np.ndarray) -> StepResult:
        t0 = time.perf_counter()
        loss_sum, correct = self.gradients(x, y)
        finite = bool(np.isfinite(loss_sum))
        if finite:  # a non-finite loss skips the update; the caller warns and counts
            self.optimizer.step(self.params, self._grads)
        self.step_count += 1
        return StepResult(loss_sum, correct, int(y.shape[0]), time.perf_counter() - t0, finite)

    # ---------------------------------------------------------------------------- calibration
    def calibrate(self, data: Dataset, batch: int, rng: np.random.Generator) -> None:
        """Accumulate Gram matrices over ``calib_batches`` batches in micro-batches, set bases.

        No optimizer step is taken (as in the paper). The calibration sessions exist only
        during calibration, and each micro-batch runs an exact pass of at most
        ``calib_micro_batch`` samples, so calibration does not raise the peak of a normal step.
        """
        t0 = time.perf_counter()
        io = self.bundle.io("calib")
        cf = make_session(self.bundle.graph("calib", "forward"), self.cfg, self.shared)
        cb = make_session(self.bundle.graph("calib", "backward"), self.cfg, self.shared)
        layers = self.bundle.layers
        gx = {ly["name"]: np.zeros((ly["x_dim"], ly["x_dim"]), np.float64) for ly in layers}
        gg = {ly["name"]: np.zeros((ly["g_dim"], ly["g_dim"]), np.float64) for ly in layers}
        # An exact pass at a quarter of the step's micro-batch stays below a compressed step.
        micro = self.calib_micro_batch or (max(1, (self.micro_batch or batch) // 4))
        samples = 0
        fgram = {v: k for k, v in io["fwd_grams"].items()}
        bgram_names = [io["bwd_grams"][ly["name"]] for ly in layers]
        for _ in range(self.calib_batches):
            idx = rng.choice(len(data), size=min(batch, len(data)), replace=False)
            x, y = data.take(idx)
            for s, e in self._chunks(len(y), micro):
                xc = {k: v[s:e] for k, v in x.items()}
                yc = y[s:e]
                outs = cf.run_with_ort_values(io["forward_outputs"],
                                              self._feeds(io["forward_inputs"], xc, yc))
                saved = dict(zip(io["forward_outputs"], outs, strict=True))
                for name, layer in fgram.items():
                    gx[layer] += saved[name].numpy()
                feeds = self._feeds(io["backward_inputs"], xc, yc, saved)
                del outs, saved
                grams = cb.run_with_ort_values(bgram_names, feeds)
                del feeds
                m = float(e - s)
                for ly, g in zip(layers, grams, strict=True):
                    gg[ly["name"]] += g.numpy() * (m * m)  # undo the 1/m of the mean loss
                del grams
                samples += e - s
        del cf, cb
        self.shared.release()
        for ly in layers:
            name = ly["name"]
            px = basis_from_gram(gx[name] / samples, self.energy, self.oversample)
            qg = basis_from_gram(gg[name] / samples, self.energy, self.oversample)
            cap_x = min(self.rank_caps.get(name, px.rank), self.max_rank or px.rank)
            if px.rank > cap_x:  # the planner caps only what is saved: x̂
                px = basis_from_gram(gx[name] / samples, rank=cap_x)
            if self.max_rank is not None and qg.rank > self.max_rank:
                qg = basis_from_gram(gg[name] / samples, rank=self.max_rank)
            self.set_bases(name, px, qg)
        self.calibrations += 1
        self.calib_seconds += time.perf_counter() - t0

    def set_bases(self, layer: str, p: Basis, q: Basis) -> None:
        ly = next(x for x in self.bundle.layers if x["name"] == layer)
        self.bases[layer] = (p, q)
        self._basis_ov[ly["p_input"]] = _ov(p.matrix)
        self._basis_ov[ly["q_input"]] = _ov(q.matrix)

    def ranks(self) -> dict[str, tuple[int, int]]:
        return {k: (p.rank, q.rank) for k, (p, q) in self.bases.items()}

    # ---------------------------------------------------------------------------- evaluation
    def evaluate(self, data: Dataset, batch: int = 256) -> tuple[float, float | None]:
        """Mean loss and accuracy (classes) on ``data`` with the inference graph."""
        sess = make_session(self.bundle.path / self.bundle.manifest["graphs"]["infer"]["forward"],
                            self.cfg, self.shared)
        names = [i.name for i in sess.get_inputs()]
        out = self.bundle.manifest["output"]
        total = 0.0
        correct = 0
        n = len(data)
        ce = self.bundle.loss["kind"] == "cross_entropy"
        for s in range(0, n, batch):
            idx = np.arange(s, min(n, s + batch))
            x, y = data.take(idx)
            logits = sess.run_with_ort_values([out], self._feeds(names, x, y))[0].numpy()
            if ce:
                z = logits - logits.max(-1, keepdims=True)
                logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
                total += float(-logp[np.arange(len(y)), y].sum())
                correct += int((logits.argmax(-1) == y).sum())
            else:
                total += float(np.square(logits - y).mean(axis=tuple(range(1, y.ndim))).sum())
        del sess
        self.shared.release()
        return total / max(n, 1), (correct / n if ce and n else None)

    # ---------------------------------------------------------------------------- checkpoints
    def state(self) -> tuple[dict[str, np.ndarray], dict]:
        """Everything a resumed run needs from the trainer, as (arrays, JSON-able meta): weights,
        optimizer moments and step, INSTANT bases and ranks, step and calibration counters."""
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
        meta = {"mode": self.mode, "optimizer": type(self.optimizer).__name__,
                "optimizer_t": self.optimizer.t, "step_count": self.step_count,
                "calibrations": self.calibrations, "calib_seconds": self.calib_seconds,
                "bases": bases, "micro_batch": self.micro_batch,
                "calib_micro_batch": self.calib_micro_batch, "rank_caps": self.rank_caps}
        return arrays, meta

    def load_state(self, arrays: dict[str, np.ndarray], meta: dict) -> None:
        """Restore :meth:`state` in place (the sessions' inputs keep pointing at the same arrays).

        Raises:
            UserError: the saved mode, optimizer or parameters differ from this trainer's.
        """
        mine = {"mode": self.mode, "optimizer": type(self.optimizer).__name__}
        for key, want in mine.items():
            if meta.get(key) != want:
                raise UserError(f"checkpoint was trained with {key} '{meta.get(key)}', this run "
                                f"uses '{want}'; resume with the same --{key}")
        for k, v in self.params.items():
            a = arrays.get(f"param/{k}")
            if a is None or a.shape != v.shape:
                raise UserError(f"checkpoint parameter '{k}' is "
                                f"{'missing' if a is None else f'of shape {list(a.shape)}'}; "
                                f"the bundle expects {list(v.shape)}")
            np.copyto(v, a)
        for k, st in self.optimizer.state.items():
            for name, a in st.items():
                np.copyto(a, arrays[f"opt/{k}/{name}"])
        self.optimizer.t = int(meta["optimizer_t"])
        self.bases.clear()
        self._basis_ov.clear()
        for layer, ranks in meta["bases"].items():
            p, q = (Basis(arrays[f"basis/{layer}/{t}"], int(ranks[t][0]), float(ranks[t][1]),
                          arrays[f"basis/{layer}/{t}.spectrum"]) for t in "pq")
            self.set_bases(layer, p, q)
        self.step_count = int(meta["step_count"])
        # A budget guard may have shrunk the micro-batches: keep the smaller of saved and planned.
        for key in ("micro_batch", "calib_micro_batch"):
            saved, now = meta.get(key), getattr(self, key)
            if saved is not None and (now is None or saved < now):
                setattr(self, key, int(saved))
        for name, cap in (meta.get("rank_caps") or {}).items():
            self.rank_caps[name] = min(int(cap), self.rank_caps.get(name, int(cap)))
        self.calibrations = int(meta["calibrations"])
        self.calib_seconds = float(meta["calib_seconds"])

    def save_params(self, path) -> None:
        """The trained parameters as ``.npz``, written atomically (a crash leaves the previous
        file or the new one)."""
        atomic_write(Path(path), lambda p: write_npz(p, self.params))
