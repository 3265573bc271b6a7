"""The fleet's one door into the training runtime (the only fleet module that calls it).

Everything ``runtime.fleet`` needs from the trainer goes through this file: ``open_bundle``,
``load_data``, ``Trainer`` built from a ``TrainConfig`` and a ``Plan`` (its ``params`` dict of
trainable numpy arrays, updated in place), ``budget.plan_for_budget`` (measured once, before any
session exists, with Flower already imported so its memory is part of what is measured, and a
reserve for a round's message buffers), ``run.train`` (INSTANT calibration, the arena cap's
guard, checkpoints). ``client.py``, ``server.py`` and ``cli.py`` only use what is defined here.
No Flower and no torch in this module. Why one module (~585 lines): it is that one door; split,
the fleet would call the runtime from two places.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..run_log import logged_first_loss

__all__ = ["Local", "RoundResult", "UserError", "check_client_options", "class_names",
           "current_rss", "model_signature", "names_from_json", "open_local", "parse_partition",
           "release_memory", "resolve_budget", "save_run", "user_errors"]


def user_errors() -> tuple[type[BaseException], ...]:
    """The exception types whose message the CLI prints as one ``error:`` line (exit 2)."""
    from devices import ProfileError

    return (UserError, ProfileError)


def resolve_budget(budget: str | None, profile: str | None,
                   threads: int = 0) -> tuple[int | None, int]:
    """``--budget`` / ``--profile`` as in ``instant-runtime train``: (budget bytes or None, threads).

    Raises:
        UserError, ProfileError: bad size, unknown profile, budget above the profile's RAM.
    """
    from devices import parse_size, resolve_profile

    from ..config import check_budget, profile_threads
    from ..memory import set_budget

    prof = resolve_profile(profile) if profile else None
    value = parse_size(budget, "--budget") if budget else (prof.default_budget if prof else None)
    check_budget(value, budget, prof)
    set_budget(value, (prof.name, prof.ram) if prof is not None else None,  # (the tokenising
               from_profile=not budget and prof is not None)  # child is held to it too)
    return value, threads or profile_threads(prof)


def check_client_options(*, steps: int, batch: int, micro_batch: int | None,
                         checkpoint_every: int, max_nonfinite: int, optimizer: str, lr: float,
                         weight_decay: float | None) -> None:
    """The client's training options checked as ``train`` checks them (integers in range,
    finite numbers), before anything is loaded: a bad one would otherwise surface only in the
    first round, after the client joined the fleet.

    Raises:
        UserError: naming the option and what it accepts.
    """
    from ..config import OptimConfig, RunConfig

    OptimConfig(name=optimizer, lr=lr, weight_decay=weight_decay)
    RunConfig(steps=steps, batch=batch, micro_batch=micro_batch,
              checkpoint_every=checkpoint_every, max_nonfinite=max_nonfinite)


def parse_partition(text: str | None) -> tuple[int, int] | None:
    """``"I/N"`` -> (I, N): this device keeps every N-th training example, starting at I."""
    if text is None:
        return None
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise UserError(f"bad --partition '{text}': expected I/N, e.g. 0/3") from None
    if not 0 <= i < n:  # (session 39 probe: "need 0 <= I < N", no N >= 1 and no example)
        raise UserError(f"bad --partition '{text}': I/N is part I of N parts, numbered from 0 "
                        f"(N at least 1), e.g. {max(n - 1, 0)}/{max(n, 1)}")
    return i, n


def model_signature(bundle, before_45: bool = False) -> str:
    """What two devices must share to average their weights: the trainable tensors (names,
    shapes), the inputs, the loss, the inference graph, the frozen weights and the tokenizer (by
    checksum), an image model's pixel size and normalisation. ``before_45``: without the last
    two, as run folders written before session 45 recorded it (their resume is not refused).
    INSTANT settings and initial weights may differ between bundles with the same signature."""
    from contract.schema import dump

    m = bundle.manifest
    infer = m.graphs["infer"].forward
    frozen = m.files.get("weights.bin")
    ident = {
        "params": [[p.name, list(p.shape)] for p in m.params],
        "inputs": dump(m.inputs), "output": m.output, "loss": dump(m.loss),
        "infer": m.files[infer].sha256,
        "frozen": frozen.sha256 if frozen is not None else None,
    }
    # (a session 45 probe: a client whose bundle had another tokenizer, ids in another order,
    # joined: the fleet's held-out accuracy fell from 0.883 to 0.380 without a word)
    if m.text is not None and not before_45:
        ident["tokenizer"] = m.files[m.text.tokenizer].sha256
    if m.image is not None and not before_45:
        ident["image"] = [m.image.channels, m.image.height, m.image.width, m.image.mean,
                          m.image.std]
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def _refuse_other_classes(data, names: list[str] | None) -> None:
    """Refuse a device whose rows name classes the bundle's ``export --classes`` lack (a session
    45 probe: 109 of a client's 200 rows, 'durian', were skipped as bad rows, and it joined).

    Raises:
        UserError: naming the rows, an example and the ways out.
    """
    problems = getattr(data, "problems", None)
    n = problems.counts.get("unknown label", 0) if problems is not None else 0
    if not n or not names:
        return
    seen = ", ".join(problems.examples.get("unknown label", [])[:2])
    shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
    raise UserError(f"{data.name}: {n:,} row{'s' if n != 1 else ''} hold labels that are not "
                    f"among the fleet's classes (the bundle's: {shown}), e.g. {seen}; remove "
                    "those rows, or give every device a bundle exported with --classes naming "
                    "them too")


@dataclass
class RoundResult:
    """One round of local training: what goes back to the server, and what the device prints."""

    num_examples: int
    metrics: dict[str, float | int | str]
    lines: list[str] = field(default_factory=list)


class Local:
    """A bundle, this device's data and a trainer; see :func:`open_local`."""

    def __init__(self, bundle_path: str | Path, data_spec: str | None, *,
                 budget: int | None = None, threads: int = 0, mode: str | None = None,
                 optimizer: str = "adamw", lr: float = 1e-3, weight_decay: float | None = None,
                 seed: int = 0, out: str | Path | None = None, checkpoint_every: int = 0,
                 partition: tuple[int, int] | None = None, progress: bool = False,
                 max_nonfinite: int = 5, micro_batch: int | None = None,
                 data_options: dict | None = None, instant: dict | None = None) -> None:
        from ..bundle import open_bundle
        from ..config import InstantConfig, OptimConfig, SessionConfig, TrainConfig
        from ..data import load_data, relabelled
        from ..trainer import Trainer

        self.bundle = open_bundle(bundle_path)
        self.signature = model_signature(self.bundle)
        self.names = [p.name for p in self.bundle.params]
        self.data = load_data(data_spec, self.bundle, seed=seed,
                              **(data_options or {})) if data_spec else None
        if self.data is not None and partition is not None:
            self.data = _shard(self.data, *partition)
        if self.data is not None:  # an exported label map numbers every device's classes
            self.data = relabelled(self.data, self.bundle.manifest.class_names,
                                   "the bundle's classes (export --classes)")
            _refuse_other_classes(self.data, self.bundle.manifest.class_names)
        self.budget, self.seed, self.progress = budget, seed, progress
        self.checkpoint_every, self.max_nonfinite = checkpoint_every, max_nonfinite
        self.micro_batch = micro_batch
        self.out = Path(out) if out is not None else None
        if mode == "instant" and not self.bundle.layers:  # (the default trains it exactly)
            raise UserError(f"--mode instant: bundle '{self.bundle.path}' has no INSTANT layer; "
                            "pass --mode vanilla or leave --mode out")
        cfg = TrainConfig(mode=mode or "instant", optim=OptimConfig(name=optimizer, lr=lr,
                                                       weight_decay=weight_decay),
                          instant=InstantConfig.from_bundle(self.bundle.manifest.instant.settings,
                                                            **(instant or {})),
                          session=SessionConfig(threads=threads), seed=seed)
        self.trainer = Trainer(self.bundle, cfg)
        self.rounds = 0
        self.round_numbers: set[int] = set()  # (a server started again asks for some again)
        self.data_record = _data_record(data_spec, data_options or {}, seed, self.data) \
            if partition is None else {}  # (eval's note on rows a client trained on)
        self.classes = self.own_classes() if self.data is not None else None  # (the fleet's,
        # once agree_classes numbered this device's labels by them)
        self.plan_lines: list[str] = []
        self._lock: int | None = None
        self._ready = False

    def own_classes(self) -> list[str] | None:
        """This device's class names (None: numbered labels, or no data)."""
        from ..data import ids_only

        names = getattr(self.data, "class_names", None)
        return None if ids_only(names) else list(names)

    def agree_classes(self, fleet: list[str] | None) -> str | None:
        """Number this device's labels as the fleet's class names ``fleet`` do (a CSV numbers
        its labels in sorted order, a built-in or another device's data otherwise: averaged
        unmatched, a fleet trained fresh reviews as rotten). Returns a line to say where the
        labels were renumbered.

        Raises:
            UserError: a class of this device's data that the fleet does not have.
        """
        from ..data import ids_only, relabelled

        before = self.data
        if not fleet or before is None:
            return None
        if not ids_only(fleet):
            self.classes = list(fleet)
        self.data = relabelled(before, list(fleet), "the fleet's classes")
        if self.data is before and self.own_classes() is None and not ids_only(fleet):
            # numbered labels are read in the fleet's order: said, as the fleet's names are
            # known (session 27 probe: a numbered client joined a named fleet without a word)
            return ("note: this device's labels are numbers, read as the fleet's classes in "
                    "its order (" + ", ".join(f"{i} {c}" for i, c in enumerate(fleet[:8]))
                    + (", ..." if len(fleet) > 8 else "") + "); name them in the data if they "
                    "are numbered otherwise")
        if self.data is before:  # (the same names, or numbered labels that follow the fleet's)
            return None
        return ("this device's labels are numbered as the fleet's classes ("
                + ", ".join(f"{c} {i}" for i, c in enumerate(fleet[:8]))
                + (", ..." if len(fleet) > 8 else "") + ")")

    def prepare(self, batch: int, reserve: int = 0) -> None:
        """Plan the memory (once: before any onnxruntime session exists, after Flower is
        imported, with ``reserve`` bytes kept free for a round's message buffers), register the
        arena with the plan's cap, and open the sessions.

        Raises:
            UserError: the budget cannot hold this client (the message states the minimum).
        """
        from ..budget import run_plan

        if self._ready:
            return
        tr = self.trainer
        if self.budget is not None and self.data is None:
            raise UserError("a budget needs this device's data to plan (--data)")
        plan = run_plan(tr, self.data, batch, self.budget, self.micro_batch,
                        log=self.plan_lines.append, reserve=reserve)
        tr.use_plan(plan)
        tr.open_sessions()
        self._ready = True

    # ------------------------------------------------------------------------------ weights
    def get_trainable(self) -> dict[str, np.ndarray]:
        """The trainable tensors in bundle order (the trainer's own arrays: no copy)."""
        return {k: self.trainer.params[k] for k in self.names}

    def set_trainable(self, values: dict[str, np.ndarray]) -> None:
        """Copy ``values`` into the trainer's arrays in place (names, shapes, types and values
        checked).

        Raises:
            UserError: a tensor is missing, extra, of another shape, not of real numbers, or
                holds NaN or inf.
        """
        self.check_trainable(values)
        for k, v in values.items():
            np.copyto(self.trainer.params[k], v, casting="unsafe")

    def set_one(self, name: str, value: np.ndarray) -> None:
        """One tensor, for callers that stream tensors in one at a time (lower peak).

        Raises:
            UserError: as :meth:`set_trainable`, naming this tensor.
        """
        why = self.problem(name, value)
        if why is not None:
            raise UserError(f"{why}; use the same bundle on the server and on every client")
        np.copyto(self.trainer.params[name], value, casting="unsafe")

    def problem(self, name: str, value) -> str | None:
        """What makes ``value`` unfit to be tensor ``name`` (None: it fits): another shape, a
        type that is not real numbers (complex, text, records), NaN or inf (a diverged or
        poisoned update would spread to every device)."""
        why = self.form_problem(name, getattr(value, "shape", ()), getattr(value, "dtype", None))
        if why is None and not np.isfinite(value).all():
            return f"tensor '{name}' holds NaN or inf values"
        return why

    def form_problem(self, name: str, shape, dtype) -> str | None:
        """:meth:`problem` from a tensor's shape and type alone (what a ``.npy`` header
        declares, read before the data)."""
        p = self.trainer.params.get(name)
        if p is None or tuple(shape) != p.shape:
            return (f"tensor '{name}' has shape {list(shape)}, this bundle expects "
                    f"{None if p is None else list(p.shape)}")
        if dtype is None or dtype.kind not in "fiub" or dtype.fields is not None:
            return f"tensor '{name}' is of type {dtype}, not real numbers"
        return None

    def check_trainable(self, values: dict[str, np.ndarray]) -> None:
        """Raises ``UserError`` unless ``values`` are this bundle's trainable tensors, in its
        order, each fit (:meth:`problem`)."""
        if list(values) != self.names:
            raise UserError(f"got {len(values)} tensors, this bundle trains {len(self.names)} "
                            f"({', '.join(self.names[:4])}{', ...' if len(self.names) > 4 else ''})"
                            "; use the same bundle on the server and on every client")
        for k, v in values.items():
            why = self.problem(k, v)
            if why is not None:
                raise UserError(f"{why}; use the same bundle on the server and every client")

    # ------------------------------------------------------------------------------ training
    def train_local(self, steps: int, batch: int, server_round: int) -> RoundResult:
        """``steps`` optimizer steps from the current (just received) weights with
        ``run.train``: under the budget (planned and guarded, every round), INSTANT bases
        recalibrated on the received weights, checkpoints in ``out``. The optimizer starts each
        round from zero state (FedAvg's local training); the step counter runs on across rounds.
        """
        from ..config import RunConfig
        from ..run import RunDiverged, train

        if self.data is None:
            raise UserError("this device has no training data (--data)")
        self.prepare(batch)
        tr = self.trainer
        _reset_optimizer(tr.optimizer)
        tr.bases.clear()  # calibrate on the received global weights, not the last local ones
        tr.window = None
        tr.config = dataclasses.replace(tr.config, seed=self.seed + 7919 * server_round)
        cfg = RunConfig(steps=tr.step_count + steps, batch=batch, progress=self.progress,
                        budget=self.budget,
                        checkpoint_every=self.checkpoint_every if self.out else 0,
                        max_nonfinite=self.max_nonfinite)
        start_rss = current_rss()
        train_only = _TrainOnly(self.data)  # held-out evaluation: evaluate()
        earlier = self._summary()
        captured = io.StringIO()
        with contextlib.redirect_stdout(captured):
            try:
                s = train(tr, train_only, cfg, self.out,
                          log=lambda line: captured.write(line + "\n"))
            except RunDiverged as exc:  # (train's way out, --overwrite, is not a client's)
                raise UserError(f"{exc.what} in round {server_round}, trained from the "
                                "server's weights; lower --lr (or check this device's data) "
                                "and start the client again") from None
        self._record_run(earlier)
        self.rounds += 1
        self.round_numbers.add(server_round)
        metrics: dict[str, float | int | str] = {
            "loss_first": s.loss_first, "loss_last": s.loss_last, "steps": steps,
            "micro_batch": s.micro_batch, "peak_rss": s.peak_rss,
            "median_step_s": s.median_step_s, "calibrations": s.calibrations,
            "rss_at_start": start_rss,
        }
        if s.train_acc is not None:
            metrics["train_accuracy"] = s.train_acc
        if s.predicted_peak is not None:
            metrics["predicted_peak"] = s.predicted_peak
        lines = self.plan_lines + captured.getvalue().splitlines()
        self.plan_lines = []
        return RoundResult(len(self.data), metrics, lines)

    def evaluate(self, data_spec: str | None = None) -> tuple[float, float | None, int]:
        """(loss, accuracy or None, examples) of the current weights on the held-out split of
        ``data_spec`` (default: this device's data), or on all of it when it has no split."""
        if data_spec is not None:
            from ..data import load_data

            data = load_data(data_spec, self.bundle)
        elif self.data is not None:
            data = self.data
        else:
            raise UserError("no data to evaluate on (--data)")
        self.prepare(64)
        target = data.test if getattr(data, "test", None) is not None else data
        self.evaluated_held_out = target is not data
        batch = self.trainer.micro_batch or 64
        loss, acc = self.trainer.evaluate(target, batch)
        return loss, acc, len(target)

    def _summary(self) -> dict:
        from ..run_files import json_object

        return json_object(self.out / "summary.json") if self.out is not None else {}

    def _record_run(self, earlier: dict) -> None:
        """What a round's ``train`` left out of the client's summary.json: the fleet's class names
        (an outside probe's ``eval`` of a client's weights read the device's own order, 0.006
        where the server's scored 0.883), and the run's first loss (not its round's)."""
        summary = self._summary()
        if not summary:
            return
        if self.classes:
            summary["class_names"] = self.classes
        summary.update(self.data_record)
        summary["bundle"] = str(self.bundle.path)  # (eval finds it from any folder)
        if earlier.get("loss_window") == summary.get("loss_window") \
                and earlier.get("loss_first") is not None:
            summary["loss_first"] = earlier["loss_first"]
        elif not earlier and (first := logged_first_loss(  # (started again into its folder:
                self.out / "metrics.jsonl", summary.get("loss_window") or 0)) is not None:
            summary["loss_first"] = first  # its earlier process's steps are in the log)
        save_run(self.out, None, summary)

    def record_evaluation(self, server_round: int, loss: float, acc: float | None,
                          examples: int) -> None:
        """Keep an evaluation of the global weights in ``out``: an "eval" event in
        ``metrics.jsonl`` and ``global_evaluation`` in ``summary.json`` (session 29 probe: the
        client printed its evaluations, its folder kept none of them and its summary's
        ``test_acc`` stayed null). ``test_acc`` stays that of the folder's own ``params.npz``,
        which are this device's weights after its round, not the global ones."""
        from ..run_files import json_object
        from ..run_log import Metrics

        if self.out is None:
            return
        entry = {"round": server_round, "loss": float(loss),
                 "accuracy": None if acc is None else float(acc), "examples": int(examples),
                 "held_out": bool(getattr(self, "evaluated_held_out", True))}
        log = Metrics(self.out / "metrics.jsonl", way_out=lambda: "free space, or pass another "
                      "--out, and start the client again")
        try:
            log.write("eval", step=self.trainer.step_count, split="global", **entry)
        finally:
            log.close()
        summary = json_object(self.out / "summary.json")
        if summary:
            save_run(self.out, None, {**summary, "global_evaluation": entry})

    # ------------------------------------------------------------------------------ output
    def claim_out(self) -> None:
        """Lock ``out`` for this process (two clients writing one checkpoint folder would mix
        their checkpoints). The lock is released when the process ends, however it ends.

        Raises:
            UserError: another live process holds it.
        """
        if self.out is None:
            return
        from ..run_folder import hold_folder

        self._lock = hold_folder(self.out, f"output folder {self.out} is in use by another fleet "
                                 "process of this machine (a client or a server); give each its "
                                 "own --out DIR", ".fleet-lock")


def open_local(bundle_path: str | Path, data_spec: str | None = None,
               budget: int | None = None, **kwargs) -> Local:
    """Open a bundle with this device's data (``data_spec``: built-in name or ``.npz``) and a
    trainer. ``kwargs``: threads, mode, optimizer, lr, weight_decay, seed, out,
    checkpoint_every, partition, progress, max_nonfinite, micro_batch, instant (overrides of
    the bundle's INSTANT settings: ``runtime.cli.instant_overrides``).

    Raises:
        UserError: bad bundle, data that does not fit it, bad option.
    """
    return Local(bundle_path, data_spec, budget=budget, **kwargs)


def names_from_json(text) -> list[str] | None:
    """A class-name list sent as JSON text (None: none, or not a list of names)."""
    try:
        return class_names(json.loads(text) if isinstance(text, str) and text else None)
    except (ValueError, RecursionError):
        return None


def class_names(value) -> list[str] | None:
    """``value`` where it is a non-empty list of names (None otherwise)."""
    ok = isinstance(value, list) and value and all(isinstance(n, str) for n in value)
    return value if ok else None


def save_run(out_dir: str | Path, params: dict[str, np.ndarray] | None,
             summary: dict | None = None, way_out: str = "pass another --out") -> Path:
    """Write ``params`` (unless None) as ``OUT/params.npz`` (and ``summary`` as
    ``OUT/summary.json``), each
    atomically: a run folder that ``instant-runtime export-model`` and ``eval --weights`` read.
    Inside the bundle folder, ``export-model OUT`` finds the bundle by itself.

    Raises:
        UserError: the folder cannot be written.
    """
    from contract import atomic_write, json_text, write_npz, write_text

    from ..run_files import with_bundle_from_run

    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        if params is not None:
            atomic_write(out / "params.npz", lambda p: write_npz(p, params))
        if summary is not None:
            text = json_text(with_bundle_from_run(summary, out), indent=1)
            atomic_write(out / "summary.json", lambda p: write_text(p, text))
    except OSError as exc:
        raise UserError(f"cannot write {out}: {exc.strerror or exc}; {way_out}") from None
    return out / "params.npz"


def release_memory() -> None:
    """Give freed heap memory back to the OS (``gc``, then glibc's ``malloc_trim``): called
    between rounds, where Flower's message buffers have just been freed, so they do not stay
    in the RSS that the next round's budget plan measures as idle."""
    import gc

    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def current_rss() -> int:
    from ..memory import current_rss as rss
    return rss()


def _reset_optimizer(opt) -> None:
    for st in opt.state.values():
        for a in st.values():
            a.fill(0.0)
    opt.t = 0


class _TrainOnly:
    """The training rows of a data set without its held-out split (evaluated apart)."""

    def __init__(self, data) -> None:
        self.data = data
        self.name = getattr(data, "name", "data")
        self.test = None

    def __len__(self) -> int:
        return len(self.data)

    def take(self, idx):
        return self.data.take(idx)

    def __getattr__(self, name: str):
        return getattr(self.data, name)


def _shard(data, i: int, n: int):
    """Every n-th training example from i (the held-out split is kept whole)."""
    idx = np.arange(i, len(data), n)
    if idx.size == 0:
        raise UserError(f"--partition {i}/{n} leaves no examples of the {len(data)}; pass "
                        f"I/N with I < N <= {len(data)}")
    if hasattr(data, "x") and hasattr(data, "y") and dataclasses.is_dataclass(data):
        return dataclasses.replace(data, x={k: v[idx] for k, v in data.x.items()}, y=data.y[idx])
    from ..sources import SourceView

    view = SourceView(data, idx, f"{data.name} [{i}/{n}]")
    view.test = data.test
    return view


def _data_record(spec: str | None, options: dict, seed: int, data) -> dict:
    """What a client's summary.json records of its data, as a run's run.json does: ``eval``
    of the client's folder says when it scores rows the client trained on (session 47 probe:
    a client's --val-split rows and the rest scored as one, without a word)."""
    from ..run_files import data_realpath

    if not spec or data is None or options.get("val") is not None:
        return {}
    split = options.get("val_split")
    test = getattr(data, "test", None)
    out = {"data": str(spec), "val_split": split, "seed": seed,
           "rows": len(data) + (len(test) if split is not None and test is not None else 0)}
    if (path := data_realpath(spec)) is not None:
        out["data_path"] = path
    return out
