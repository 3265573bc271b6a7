"""Keep a training run inside a memory budget: measure in forked probes, plan, validate at the
real size, then train with onnxruntime's arena capped at what the budget leaves.

1. ``measure``: two forked probe processes (the parent has no onnxruntime session yet, so a fork
   is safe and the parent's own high-water mark is never touched): the first creates the
   sessions and reports their memory; the second, with its arena capped, runs two calibration
   passes and two gradient passes (full-rank bases: the most a compressed activation can take)
   at small micro-batches and reports how the arena grew, plus the activation spectra.
2. ``devices.planner.make_plan`` picks the micro-batch at which the rank policy's ranks fit, the
   calibration micro-batch, the per-sample memory for compressed activations and the arena cap;
   or refuses before anything trains, stating the minimum budget.
3. ``validate``: a third probe runs the plan at its real size — a calibration, a full step at
   the planned micro-batch with ranks that fill the planned memory, an evaluation pass — under
   the planned cap, and its peak is read from outside (``wait4``). If it fails, the micro-batch
   shrinks and the check repeats; nothing is extrapolated into the real run.
4. During training the cap holds: an allocation past it fails inside onnxruntime, and the loop
   (``runtime/run.py``) halves the micro-batch and repeats the step.

Every probe is stopped before its RSS passes the budget (read from this process every 2 ms), and
a refusal states the probes' estimate × ``MIN_FACTOR`` (``_stated_minimum``).

Why one module (~870 lines): the probes, the plan they feed and the refusal's wording share one
set of measured quantities (base, frozen bytes, per-sample data, Gram bytes, margin) and one
process discipline (no onnxruntime session in this process until the plan is made); split, each
part would re-derive them.
"""

from __future__ import annotations

import gc
import json
import math
import os
import select
import signal
import time
from collections.abc import Callable
from dataclasses import replace

import numpy as np

from contract import UserError, names
from devices.planner import (
    BudgetError,
    MemoryModel,
    Plan,
    budget_mb,
    larger_micro_batch,
    make_plan,
    plan_at,
    smaller_micro_batch,
)

from .calibrate import (
    GramWindow,
    Spectrum,
    basis,
    calibration_samples,
    decompose_bytes,
    gram_vectors,
    spectrum_width,
)
from .memory import (
    WouldPassLimit,
    budget_from_profile,
    current_rss,
    device_given,
    fork_held,
    forked_child,
    physical_ram,
    set_limit,
)
from .order import order_bytes
from .ranks import basis_groups, saved_bytes, x_bytes_per_rank
from .sessions import arena_cap, use_arena
from .trainer import ArenaExhausted, ArrayBatch, IndexBatch, Trainer

__all__ = ["MIN_FACTOR", "ProbeError", "estimate_minimum", "largest_read", "plan_for_budget", "print_plan"]

PROBE_TIMEOUT_S = 900
MIN_MARGIN = 6 << 20  # bytes of slack for Python objects, logs, checkpoint buffers


class ProbeError(UserError):
    """A probe process failed for a reason other than memory: it ran past its time, or a bug
    (one line all the same; an outside review found it a traceback)."""


def _failed(res: dict, what: str) -> UserError:
    """The error of a probe that failed for a reason other than memory: a ``UserError`` the
    probe raised (bad data met while it ran) as it is, anything else as a ``ProbeError``."""
    if res.get("user"):
        return UserError(res["user"])
    return ProbeError(f"{what}: {res['error'][:300]}; train without --budget to see it "
                      "unplanned, and report it with the command")


class BudgetTooSmall(UserError):
    """The budget is below this bundle's minimum: ``why``, and ``need``, an estimate of the
    minimum in bytes (None: unknown), or at least ``floor``, bytes the run is known to take
    before any step. ``_stated_minimum`` words the refusal from them."""

    def __init__(self, why: str, need: int | None = None, floor: int = 0) -> None:
        super().__init__(why)
        self.need, self.why, self.floor = need, why, floor


# a probe is stopped this far below its limit: what it allocates between two reads of its RSS
# (2 ms apart) stays inside the limit (measured overshoot 0.3-3 MB; session 30 probe: with 4 MB
# a probe writing a 120 MB weight's gradient reached 500.1 and 502.8 MB under 500, 2 of 13)
PROBE_HEADROOM = 8 << 20
STEP_UP_ROOM = 0.10  # of the budget left unused by a validated plan: probe a larger micro-batch
STEP_UP_TRIES = 3
MIN_FACTOR = 1.25  # stated minimum / estimated need (see _stated_minimum)
_PROGRESS_FD: int | None = None  # (in a probe) where _progress writes what it measured so far


def _progress(partial: dict) -> None:
    """(In a probe.) Send what is measured so far: a probe stopped at a larger micro-batch
    keeps the smaller ones (``_fork`` returns the last as ``partial``)."""
    if _PROGRESS_FD is not None:
        _send(_PROGRESS_FD, {"partial": partial})


def _send(fd: int, doc: dict) -> None:
    """(In a probe.) One JSON line to the parent."""
    data = (json.dumps(doc) + "\n").encode()
    while data:
        data = data[os.write(fd, data):]


def resident_file_pages() -> np.ndarray:
    """Addresses of this process's resident pages of file-backed mappings (shared libraries,
    mapped files), from ``/proc/self/pagemap``; empty where that is unreadable."""
    page = os.sysconf("SC_PAGE_SIZE")
    runs = []
    try:
        with open("/proc/self/maps") as f:
            maps = [line.split() for line in f]
        fd = os.open("/proc/self/pagemap", os.O_RDONLY)
    except OSError:
        return np.zeros(0, np.int64)
    try:
        for m in maps:
            if len(m) < 6 or not m[5].startswith("/") or "r" not in m[1]:
                continue
            lo, hi = (int(x, 16) for x in m[0].split("-"))
            data = os.pread(fd, 8 * ((hi - lo) // page), (lo // page) * 8)
            present = np.flatnonzero(np.frombuffer(data, np.uint64) >> np.uint64(63))
            if present.size:
                runs.append(lo + present.astype(np.int64) * page)
    except OSError:
        return np.zeros(0, np.int64)
    finally:
        os.close(fd)
    return np.concatenate(runs) if runs else np.zeros(0, np.int64)


def _touch(addresses: np.ndarray) -> None:
    import ctypes

    for a in addresses.tolist():
        ctypes.string_at(a, 1)


def _trim_heap() -> None:
    """Give the heap's free pages back to the OS (glibc's ``malloc_trim``): a probe reusing
    them would copy them from this process, and the tree would hold both copies."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _fork(fn: Callable[[], dict], timeout: float = PROBE_TIMEOUT_S,
          limit: int | None = None, prepare: Callable[[], None] | None = None) -> dict:
    """Run ``fn`` in a forked child; its JSON result plus ``peak`` (the child's maximum RSS
    from ``wait4``, read by this process) and ``oom`` (the arena's cap was reached).

    ``limit``: this process reads the child's RSS every few milliseconds and stops it past
    ``limit`` bytes (``oom`` and ``over`` set): a probe never takes more than the budget it
    checks, whatever the bundle's graphs allocate outside onnxruntime's capped arena.

    A fork copies the page tables of private memory but not of file mappings: the child starts
    with far fewer library pages resident than this process. It first touches every
    file-backed page resident here, so its RSS, and every difference it measures, is this
    process's. ``prepare`` runs in the child first: it makes the buffers the child will write,
    which this process freed (Trainer.release_written_buffers), so that the tree holds them
    once."""
    pages = resident_file_pages()
    _trim_heap()  # freed heap pages the probe would reuse: copied, they count for the tree
    r, w = os.pipe()
    parent = os.getpid()
    gc.freeze()  # the child's collections leave this process's objects (and their pages) alone
    try:
        pid = fork_held()
    except BaseException:
        gc.unfreeze()
        raise
    if pid == 0:  # child
        os.close(r)
        global _PROGRESS_FD
        _PROGRESS_FD = w
        try:
            forked_child(parent)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            _touch(pages)
            set_limit(limit - PROBE_HEADROOM if limit else None)
            if prepare is not None:
                prepare()
            out = {"ok": True, **fn()}
        except WouldPassLimit as exc:  # as if stopped by the parent, before passing the line
            out = {"ok": False, "oom": True, "over": True, "error": str(exc)}
        except ArenaExhausted as exc:
            out = {"ok": False, "oom": True, "error": str(exc)}
        except UserError as exc:  # bad data met by the probe: the parent says it as it is
            out = {"ok": False, "oom": False, "user": str(exc), "error": str(exc)}
        except BaseException as exc:  # noqa: BLE001 - report anything to the parent
            out = {"ok": False, "oom": False, "error": f"{type(exc).__name__}: {exc}"}
        try:
            _send(w, out)
        finally:
            os._exit(0)
    gc.unfreeze()
    os.close(w)
    chunks = []
    deadline = time.monotonic() + timeout
    over = False
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                os.kill(pid, signal.SIGKILL)
                raise ProbeError(f"a planning probe ran past {timeout:.0f} s (a step of this "
                                 "bundle takes that long on this machine, or it is busy); "
                                 "train with a smaller --batch, or without --budget")
            ready, _, _ = select.select([r], [], [], min(left, 0.002 if limit else 1.0))
            if limit and _rss(pid) > limit - PROBE_HEADROOM:
                os.kill(pid, signal.SIGKILL)
                over = True
                while block := os.read(r, 1 << 20):  # what it sent before: its progress
                    chunks.append(block)
                break
            if ready:
                block = os.read(r, 1 << 20)
                if not block:
                    break
                chunks.append(block)
    except BaseException:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(pid, 0)
        raise
    finally:
        os.close(r)
    _, status, usage = os.wait4(pid, 0)
    res, partial = {}, None
    for line in b"".join(chunks).split(b"\n"):  # progress lines, then the result
        try:
            doc = json.loads(line)
        except ValueError:
            continue  # (a line cut by the kill)
        if isinstance(doc, dict) and "partial" in doc:
            partial = doc["partial"]
        elif isinstance(doc, dict):
            res = doc
    if over:
        res = {"ok": False, "oom": True, "over": True,
               "error": f"a planning probe passed {limit / 1e6:.0f} MB and was stopped"}
    if partial is not None and not res.get("ok"):
        res["partial"] = partial
    if not res:
        res = {"ok": False, "oom": False,
               "error": f"probe process ended with status {os.waitstatus_to_exitcode(status)}"}
    res["peak"] = usage.ru_maxrss * 1024
    res.setdefault("oom", False)
    return res


def _data_bytes_per_sample(trainer: Trainer, data) -> int:
    """numpy bytes one sample of a micro-batch costs: inputs, labels, embedding rows read."""
    per = getattr(data, "bytes_per_sample", None)
    x, y = data.take(np.arange(min(2, len(data))))
    n = max(1, len(y))
    nbytes = sum(v.nbytes for v in x.values()) + y.nbytes
    inputs = nbytes / n
    if callable(per):
        inputs = max(inputs, float(per()))
    lookups = 0
    for lk in trainer.bundle.lookups.values():
        t = trainer.bundle.manifest.weights[lk.table]
        row = int(np.prod(t.shape[1:])) * np.dtype(t.dtype).itemsize
        width = int(np.prod(x[lk.indices].shape[1:])) if lk.indices in x else 1
        lookups += 3 * row * width  # rows read, gathered copy, the OrtValue's view
    return int(2 * inputs + lookups + _carried_bytes(trainer))


def _carried_bytes(trainer: Trainer) -> int:
    """Per sample: a frozen prefix's outputs outside the arena (the copy read back and the
    array padded to the trained length)."""
    prefix = trainer.bundle.manifest.prefix
    return 0 if prefix is None else 2 * prefix.bytes_per_sample


def _data_fixed_bytes(data) -> int:
    """The data's bytes that do not grow with the micro-batch: the batch order over its rows
    (order.Order, made at the first step: 26 MB for 6.5 million rows), and the source's transient
    bytes of a read (decoding the largest image of a folder: up to ~10 bytes a pixel for a
    16-bit PNG). The probes read a few random rows and would miss both. A held-out source
    (``--val``) is read by the same process between steps: its largest read counts too (session
    31 probe: a 6000x6000 image in --val took a run planned at 92 MB to 265 MB)."""
    return order_bytes(len(data)) + largest_read(data)[0]


def largest_read(data) -> tuple[int, str | None]:
    """(bytes, the image's name) of the largest read of the training or held-out source."""
    reads = []
    for d, where in ((data, ""), (getattr(data, "test", None), " of the held-out data")):
        f, name = getattr(d, "bytes_fixed", None), getattr(d, "largest_image", None)
        if callable(f):
            reads.append((int(f()), name and name + where))
    return max(reads, key=lambda r: r[0], default=(0, None))


def _grams_bytes(trainer: Trainer, batch: int) -> int:
    """A calibration's numpy memory: the Gram accumulators, every spectrum kept until the
    ranks are set, and the largest decomposition's workspace. A calibration sums at most
    ``batch`` × ``--calib-batches`` samples, which bounds each Gram's rank (decompose)."""
    layers = trainer.bundle.layers
    if trainer.mode != "instant" or not layers:
        return 0
    rows = _calibration_rows(trainer, batch)
    kept = work = 0
    for ly in layers:
        for dim, vectors in zip((ly.x_dim, ly.g_dim), gram_vectors(ly), strict=True):
            held, temp = decompose_bytes(dim, rows * vectors)
            kept += held
            work = max(work, temp)
    return int(GramWindow.accumulator_bytes(layers) + kept + work)


def _frozen(trainer: Trainer) -> int:
    b = trainer.bundle
    graphs = [b.graph_file(trainer.mode, "forward"), b.graph_file(names.INFER)]
    if b.manifest.prefix is not None:
        graphs.append(b.graph_file(names.PREFIX))
    if trainer.mode == "instant":
        graphs.append(b.graph_file("calib", "forward"))
    return max(b.frozen_bytes_touched(g) for g in graphs)


def _batch(data, m: int, rng: np.random.Generator) -> IndexBatch:
    return IndexBatch(data, rng.choice(len(data), size=min(len(data), m), replace=False))


def _full_rank_bases(trainer: Trainer, batch: int) -> None:
    """The largest bases a calibration can give: every compressed activation saved at full
    size (the most it can take), or, for a Gram that sums fewer vectors than its width (a wide
    [N, C] layer), at the most directions its calibration computes (calibrate.spectrum_width,
    which also caps the chosen ranks). A full-rank Q runs the exact input gradient
    (docs/method.md). Probing Q at the largest rank that still runs compressed was tried: the
    step probe on MiniLM then grew 54 -> 76 MB at micro-batch 8 (odd-sized tensors fragment the
    arena more than full-size ones, though they are smaller) and the 256 MB plan fell from
    micro-batch 14 to 9; the arena cap and the micro-batch halving keep the budget whatever the
    ranks, as before."""
    rows = _calibration_rows(trainer, batch)
    for ly in trainer.bundle.layers:
        rx = spectrum_width(ly.x_dim, rows * gram_vectors(ly)[0])
        sx = Spectrum(np.ones(rx), np.eye(ly.x_dim, rx))
        sg = Spectrum(np.ones(ly.g_dim), np.eye(ly.g_dim))
        trainer.set_bases(ly.name, basis(sx, rx), basis(sg, ly.g_dim))


def _calibration_rows(trainer: Trainer, batch: int) -> int:
    """The most samples one calibration sums: ``--calib-batches`` batches of the run's batch
    (``trainer.train_batch``, where set: planned at a --micro-batch cap, the rows had been 4 × 2
    for a batch of 600, and 1200 vectors took the 1536-wide Grams from a 292 MB validated plan
    to 444 MB under --budget 350MB: session 31 probe)."""
    return max(1, batch, trainer.train_batch or 0) * trainer.config.instant.calib_batches


def run_plan(trainer: Trainer, data, batch: int, budget: int | None, micro: int | None,
             log: Callable[[str], None] = print, reserve: int = 0) -> Plan:
    """A run's plan, for ``train``, ``eval``, ``plan`` and a fleet client: measured and
    validated under ``budget`` (``reserve`` bytes kept free), else unbounded at ``micro``.
    Registers the process arena (capped at the plan's cap) before any session exists, and
    says where ``micro`` (--micro-batch) did not fit."""
    whole = min(batch, len(data))
    if budget is None:
        _whole_batches(trainer, micro, whole, f"--micro-batch {micro}",
                       f"drop --micro-batch, or pass --batch {micro}")
        use_arena(None)
        return Plan(micro_batch=micro, calib_micro_batch=micro, eval_micro_batch=micro)
    _whole_batches(trainer, micro, whole, f"--micro-batch {micro}",  # (before the probes,
                   f"drop --micro-batch, or pass --batch {micro}", enforce=False)  # which split)
    trainer.train_batch = min(batch, len(data))  # (a calibration sums whole batches)
    plan = plan_for_budget(trainer, data, min(batch, micro or batch), budget, log=log,
                           reserve=reserve)
    use_arena(plan.arena_cap)
    print_plan(plan, trainer, log=log)
    if (micro is not None and plan.micro_batch is not None
            and plan.micro_batch < min(micro, batch, len(data))):  # (not where the data is less)
        log(f"--micro-batch {micro} does not fit under the budget: micro-batch "
            f"{plan.micro_batch} (raise --budget for more)")
    _whole_batches(trainer, plan.micro_batch, whole, f"the budget holds micro-batch "
                   f"{plan.micro_batch}, which", f"raise --budget, or pass --batch "
                   f"{plan.micro_batch}")
    return plan


def _whole_batches(trainer: Trainer, micro: int | None, batch: int, what: str,
                   way: str, enforce: bool = True) -> None:
    """A bundle whose model mixes the rows of its batch (manifest ``mixes_rows``) trains on
    whole batches only: ``UserError`` where ``micro`` would split ``batch``; otherwise, with
    ``enforce``, the trainer refuses any split batch from here on (``Trainer.gradients``: a
    micro-batch the budget guard would shrink to; not the planning probes, which split)."""
    if not trainer.bundle.manifest.mixes_rows or trainer.eval_only:
        return
    if micro is not None and micro < batch:
        raise UserError(f"{what} splits the batch of {batch}, and this model's output for a row "
                        "depends on the other rows of its batch (the export's note): a "
                        f"micro-batch would train another function; {way}")
    trainer.whole_batches = enforce


def plan_for_budget(trainer: Trainer, data, batch: int, budget: int,
                    log: Callable[[str], None] = print, reserve: int = 0) -> Plan:
    """Measure, plan and validate; returns the plan (the caller registers its arena cap and
    gives it to the trainer). The trainer must not have opened a session yet. ``reserve``:
    bytes the plan leaves free for the caller (a fleet client's message buffers). Every probe
    process is stopped once it holds more than ``budget``.

    The graphs at shorter lengths (export/lengths.py) are a speed option: where the budget
    cannot hold their sessions as well, the run plans and trains at the full length only.

    Raises:
        UserError: the budget is below the minimum for this bundle (the message states one).
    """
    try:
        return _plan_for_budget(trainer, data, batch, budget, log, reserve)
    except BudgetTooSmall as exc:
        if not _has_shorter(trainer):
            raise _stated_minimum(exc, budget, trainer.mode, trainer.eval_only,
                                  trainer.resuming) from None
    trainer.shorter = False
    log("budget: no plan with the graphs at shorter lengths as well; planning at the full "
        "length only")
    try:
        return _plan_for_budget(trainer, data, batch, budget, log, reserve)
    except BudgetTooSmall as exc:
        raise _stated_minimum(exc, budget, trainer.mode, trainer.eval_only,
                                  trainer.resuming) from None


def _has_shorter(trainer: Trainer) -> bool:
    """Whether the run would use graphs at shorter lengths (and could do without them)."""
    text = trainer.bundle.manifest.text
    return bool(trainer.shorter and text is not None and text.lengths and not trainer.resident
                and not trainer.eval_only)  # evaluation runs the inference graph only


def _stated_minimum(exc: BudgetTooSmall, budget: int, mode: str = "vanilla",
                    evaluating: bool = False, resuming: bool = False) -> UserError:
    """The refusal's way out. The estimate comes from probes that stayed inside ``budget``
    (a budget above it cannot be tried without passing it), so it extrapolates: measured on
    workloads refused at their first stated minimum, the budget that then worked was up to
    1.21× that estimate; the stated minimum is the estimate × ``MIN_FACTOR``."""
    why = f" ({exc.why})"
    device = device_given()

    def beyond(stated: float, guess: bool = False) -> str:  # a way out past the device's RAM
        if device is None or stated <= device[1]:  # is none (session 34)
            return ""
        if guess:  # (session 43 probe: a guess called the device too small; 320 MB then ran)
            return (f"; that guess is more than the {device[1] / 1e6:.0f} MB of RAM of profile "
                    f"'{device[0]}', and a budget below it may do: if none does, train fewer "
                    "layers on that device (export --trainable)")
        return (f"; that is more than the {device[1] / 1e6:.0f} MB of RAM of profile "
                f"'{device[0]}': on that device, train fewer layers (export --trainable)")
    if device is not None and budget >= device[1]:  # no budget above it fits the device
        # (session 49 probe: a profile at its RAM was told a budget below it "may do")
        return UserError(f"budget {budget_mb(budget)} MB is below the minimum for this bundle"
                         f"{why}, and profile '{device[0]}' has no more RAM "
                         f"({device[1] / 1e6:.0f} MB): " + (
                             "the model does not fit that device; evaluate it on one with more "
                             "RAM, or without --budget and --profile here" if evaluating else
                             "on that device, train fewer layers (export --trainable)"
                             + _or_vanilla(mode, resuming)))
    if not exc.need:  # a probe at micro-batch 1 alone passed the budget
        # twice what is known to be taken before any step (the first probe's own need: sessions
        # and activations come on top; MiniLM: 73 MB known, 116 MB needed)
        hint = max(2 * budget, 2 * exc.floor)
        without = "--budget and --profile" if budget_from_profile() else "--budget"
        return UserError(f"budget {budget_mb(budget)} MB is below the minimum for this bundle"
                         f"{why}: a planning probe alone passed it; raise --budget well "
                         f"above it, e.g. to {math.ceil(hint / 1e6)}MB, a generous guess (the "
                         "probes stop at the budget, so how far was not measured; "
                         + (f"or evaluate without {without})" if evaluating else
                            f"`instant-runtime plan --data DATA` without {without} estimates "
                            "the minimum)")
                         + beyond(hint, guess=True) + _or_vanilla(mode, resuming))
    # the estimate with headroom, whatever budget was tried (session 34 probe: stated as
    # MIN_FACTOR x the refused budget, each refusal at the stated figure asked 25 % more);
    # only where that is not above this budget (the probes missed part of the need) it asks
    # for MIN_FACTOR x the budget rather than a step to repeat MB by MB
    need = exc.need * MIN_FACTOR
    if need <= budget:
        need = budget * MIN_FACTOR
    return UserError(f"budget {budget_mb(budget)} MB is below the minimum for this bundle{why}; "
                     f"raise --budget to {math.ceil(need / 1e6)}MB (the probes' estimate with "
                     f"{MIN_FACTOR - 1:.0%} headroom: one between the two may fit too)"
                     + beyond(need) + _or_vanilla(mode, resuming))


def _or_vanilla(mode: str, resuming: bool = False) -> str:
    """INSTANT's calibration holds each layer's Grams (a wide [N, C] layer: D² each), which
    exact training does not: a session-18 probe saw a 971 MB minimum for INSTANT where exact
    training ran in 160 MB. The refusal names that way out too; a resumed run keeps its mode
    (session 27 probe: the resume then refused the --mode vanilla the refusal advised)."""
    if mode != "instant":
        return ""
    return (", or train exactly with --mode vanilla " + (
        "as a new run (another --out: a resumed run keeps its mode; "
        if resuming else "(") + "no calibration: its minimum may be lower; "
        "`instant-runtime plan --data DATA --mode vanilla` states it)")


def estimate_minimum(trainer: Trainer, data, batch: int, reserve: int = 0) -> int | None:
    """The smallest budget for this run (bytes), as a refusal would state it but measured by
    probes without a limit: for ``plan`` without ``--budget``, where no budget is to be kept.
    None where even that could not be estimated. At the full length only: a run at this
    budget leaves the graphs at shorter lengths out where they do not fit (plan_for_budget)."""
    trainer.shorter = False
    try:
        _plan_for_budget(trainer, data, batch, 1_000_000, lambda _msg: None, reserve,
                         limit_probes=False)
    except BudgetTooSmall as exc:
        return int(exc.need * MIN_FACTOR) if exc.need else None
    return None


def _plan_for_budget(trainer: Trainer, data, batch: int, budget: int,
                     log: Callable[[str], None], reserve: int, limit_probes: bool = True) -> Plan:
    if trainer._sessions or arena_cap() is not None:
        raise RuntimeError("plan_for_budget must run before any onnxruntime session exists")
    # the probes (forked from here) run the frozen prefix at the full length: the worst case
    trainer.trim = False
    base0 = current_rss()  # with the buffers the probes write: the run holds them
    trainer.release_written_buffers()
    try:
        return _probe_plan(trainer, data, batch, budget, log, reserve, limit_probes, base0)
    finally:
        trainer.trim = True
        trainer.renew_written_buffers()


def _probe_plan(trainer: Trainer, data, batch: int, budget: int, log: Callable[[str], None],
                reserve: int, limit_probes: bool, base0: int) -> Plan:
    instant = trainer.mode == "instant"
    limit = budget if limit_probes else None

    def forked(fn: Callable[[], dict]) -> dict:  # a probe makes the buffers it writes
        return _fork(fn, limit=limit, prepare=trainer.renew_written_buffers)
    frozen = _frozen(trainer)
    per_sample = _data_bytes_per_sample(trainer, data)
    grams = _grams_bytes(trainer, batch)
    # decoding one row (the largest image) holds this besides a micro-batch's arrays, outside
    # the arena and while the arena is full: planned like them
    decode = _data_fixed_bytes(data)
    # 2 % of what the process may use: the budget, or the machine's RAM when that is smaller
    margin = max(MIN_MARGIN, int(0.02 * min(budget, physical_ram() or budget))) + int(reserve)
    batch = max(1, min(batch, len(data)))

    def sessions_only(cap: int | None) -> dict:
        use_arena(cap)
        before = current_rss()
        trainer.open_sessions()
        _warm_up(trainer, data)
        return {"overhead": current_rss() - before}

    def minimum(why: str, floor: int = 0) -> UserError:
        """The smallest budget: probes at micro-batch 1 with no arena cap (stopped at the
        budget: then the estimate is unknown) measure what one sample needs; planned like any
        budget (``_stated_minimum`` words the refusal)."""
        warm = forked(lambda: sessions_only(None))
        if not warm["ok"]:
            if warm.get("over"):
                return BudgetTooSmall(why, floor=floor)
            return _failed(warm, "cannot open the bundle's sessions")
        base1 = base0 + int(warm["overhead"])
        probe = forked(lambda: _measure(trainer, data, 1, None, target=False))
        if not probe["ok"]:
            if probe.get("over"):
                return BudgetTooSmall(why, floor=floor)
            return _failed(probe, "a planning probe failed")
        m1 = _model(trainer, probe, base1, frozen, per_sample, grams, margin, decode)
        # the probes of a real run at micro-batch 1 (full-rank bases, under a cap that keeps
        # room for 8 samples of input and the Grams) must fit the stated minimum too
        need = max(m1.peak(1, 1 if instant else 0, m1.saved_min), warm["peak"] + margin,
                   probe["peak"] + margin + 8 * per_sample + grams + decode)
        return BudgetTooSmall(why, int(need))

    cap0 = budget - base0 - frozen - margin - 2 * per_sample - grams - decode
    if cap0 <= 0:
        largest = largest_read(data)[1]
        part = max(1 << 20, budget // 20)  # named where it is a real part (session 39 probe,
        # "shrink or remove it" for 1 MB of a 120 MB budget)
        what = ((", and decoding its largest image" + (f" ({largest}: shrink or remove it)")
                 if largest else ", and the order of its rows")  # (an .npz has no image)
                + f" up to {decode / 1e6:.0f} MB" if decode >= part else "")
        # (session 46 probe: "already take 333 MB" refused 600 MB, its 300 MB of Grams unsaid)
        more = frozen + grams
        what += (f", and its frozen weights and calibration Grams {more / 1e6:.0f} MB more"
                 if more >= part else "")
        raise minimum(f"the runtime and its data already take {base0 / 1e6:.0f} MB{what}",
                      budget - cap0)
    res = forked(lambda: sessions_only(cap0))
    if not res["ok"]:
        if res["oom"]:
            raise minimum(f"{_pass(trainer)} at micro-batch 1 did not fit")
        raise _failed(res, "cannot open the bundle's sessions")
    base = base0 + int(res["overhead"])
    floor = base + frozen + margin
    if floor + 2 * per_sample + grams + decode >= budget:
        raise minimum(f"the runtime, its sessions and weights take {base / 1e6:.0f} MB")
    # its arena filling the cap can take the probe past the line where it is stopped
    # (PROBE_HEADROOM under the budget, above the margin): it keeps the micro-batches measured
    # before (_measured; session 34 probe: the refusal said micro-batch 1 did not fit, at 113
    # MB where 112 and 115 trained). A cap kept under that line instead raised the minimum.
    cap = budget - floor - 8 * per_sample - grams - decode
    measured = _measured(lambda n: forked(lambda: _measure(trainer, data, batch, cap, n)),
                         min(8, batch))
    if not measured["ok"]:
        if measured["oom"]:
            raise minimum("a probe at micro-batch 1 did not fit")
        raise _failed(measured, "a planning probe failed")
    model = _model(trainer, measured, base, frozen, per_sample, grams, margin, decode)
    try:
        plan = make_plan(model, budget, batch, instant)
    except BudgetError as exc:
        raise BudgetTooSmall(exc.why, exc.need) from None
    steps_down = []  # said with the plan that validates; a refusal stays one line
    for _ in range(10):  # 32 of 32 reaches 1 at the 9th try (smaller_micro_batch)
        check = forked(lambda p=plan: _validate(trainer, data, batch, p))
        if check["ok"] and check["peak"] <= budget:
            for line in steps_down:
                log(line)
            if not steps_down:
                plan, check = _step_up(plan, check, batch, forked,
                                       lambda p: _validate(trainer, data, batch, p), log)
            return _validated(plan, check["peak"])
        if not check["ok"] and not check["oom"]:
            raise _failed(check, "the validation probe failed")
        if plan.micro_batch == 1:
            need = max(check["peak"], budget) + margin
            raise BudgetTooSmall(f"{_pass(trainer)} at micro-batch 1 did not fit at its real "
                                 f"size (probe "
                                 f"peak {check['peak'] / 1e6:.0f} MB)", int(need))
        smaller = smaller_micro_batch(batch, plan.micro_batch)
        why = ("arena cap reached" if check["oom"] else
               f"peak {check['peak'] / 1e6:.1f} MB")
        steps_down.append(f"budget: micro-batch {plan.micro_batch} did not fit at its real "
                          f"size ({why}); trying {smaller}")
        try:
            plan = make_plan(model, budget, smaller, instant)
        except BudgetError as exc:
            raise BudgetTooSmall(exc.why, exc.need) from None
    raise BudgetTooSmall("no micro-batch validated at its real size", budget + margin)


def _measured(measure: Callable[[int], dict], largest: int = 8) -> dict:
    """The measuring probe's result (``measure(largest micro-batch)``); one stopped at a larger
    micro-batch keeps the smaller ones it measured (their steps; stopped in calibration, it is
    measured again up to the largest calibration that passed). Stopped at micro-batch 1, it
    is returned as it came (a refusal)."""
    res = measure(largest)
    while True:
        part = (res.get("partial") or {}) if not res["ok"] and res.get("over") else {}
        if part.get("step"):
            return {**part, "ok": True, "peak": res["peak"]}
        done = max((int(k) for k in part.get("calib", {})), default=0)
        if not 0 < done < largest:  # (stopped at its first step: no smaller one to keep)
            return res
        largest = done
        res = measure(largest)


def _validated(plan: Plan, peak: int) -> Plan:
    return Plan(**{**plan.__dict__, "breakdown": {
        **plan.breakdown, "validated peak (probe at this plan, measured by wait4)": peak}})


def _step_up(plan: Plan, check: dict, batch: int, forked, validate,
             log: Callable[[str], None]) -> tuple[Plan, dict]:
    """A larger micro-batch where the plan's probe left more than ``STEP_UP_ROOM`` of the
    budget unused, besides the model's margin (which holds what the caller keeps free, a
    fleet client's message buffers). The memory model is
    a line through probes at micro-batches 1, 2 and 8; a pass whose working memory jumps once
    instead of growing with the micro-batch makes it predict too much for every larger one
    (session 31: onnxruntime took a weight's size, 139 MB, more at micro-batch 8 than at 2 for
    a 4096×8192 Linear, cause not traced; a run that fitted at micro-batch 32 under 1000 MB
    was planned at 6 under 1040, 2.2× slower a step). Each larger micro-batch is probed at its
    real size under its own cap, keeping the compressed-activation bytes a sample the plan
    already had (no fewer than the rank policy asks for: a session 43 probe's step-up from
    micro-batch 1 at exact ranks to 2 at the energy rule's 16 KB gave rank 1 under 103 MB where
    102 MB had trained at exact ranks; a larger micro-batch is speed, not at the cost of the
    gradients) and the calibration micro-batch already validated, and must leave the margin
    free; the first that does not fit ends the search."""
    model, planned = plan.model, plan.micro_batch
    if model is None or plan.budget is None:
        return plan, check
    limit = plan.budget - model.margin
    for _ in range(STEP_UP_TRIES):
        m = plan.micro_batch or batch
        if m >= batch or limit - check["peak"] < STEP_UP_ROOM * plan.budget:
            break
        up = plan_at(model, plan.budget, larger_micro_batch(batch, m),
                     plan.saved_budget is not None,  # no fewer bytes a sample than the
                     saved_floor=max(model.saved_want, plan.saved_budget or 0),  # plan had
                     calib_floor=plan.calib_micro_batch or 0)
        if up.arena_cap <= 0:
            break
        got = forked(lambda p=up: validate(p))
        if not (got["ok"] and got["peak"] <= limit):
            break
        plan, check = _at_measured_peak(up, got["peak"]), got
    if plan.micro_batch != planned:
        log(f"budget: micro-batch {plan.micro_batch} fits at its real size (probe peak "
            f"{check['peak'] / 1e6:.1f} MB), above the memory model's {planned}")
    return plan, check


def _at_measured_peak(plan: Plan, peak: int) -> Plan:
    """``plan`` (above what the memory model says fits) with its probe's measured ``peak`` as
    the predicted one, the arena's line what the probe left beside the other lines, so that
    they still add up to it (session 42 probe: 603 MB of lines under a 505.6 MB prediction, an
    arena line above the cap it named)."""
    arena = next(k for k in plan.breakdown if k.startswith("onnxruntime arena"))
    rest = sum(v for k, v in plan.breakdown.items() if k != arena)
    lines = {(k.replace("onnxruntime arena (", "onnxruntime arena, measured (") if k == arena
              else k): (max(0, peak - rest) if k == arena else v)
             for k, v in plan.breakdown.items()}
    return replace(plan, predicted_peak=max(peak, rest), breakdown=lines)


def _warm_up(trainer: Trainer, data) -> None:
    """One pass of every kind at micro-batch 1 (code pages fault in, kernels initialise), then
    the arena is shrunk back: what remains is the run's fixed cost."""
    rng = np.random.default_rng(999)
    cfg = trainer.config
    trainer.use_plan(Plan(micro_batch=1, calib_micro_batch=1, eval_micro_batch=1))
    if trainer.mode == "instant" and not trainer.eval_only:
        trainer.config = replace(cfg, instant=replace(cfg.instant, calib_batches=1))
        trainer.calibrate(data, 1, rng)
        trainer.begin_calibration()
        trainer.gradients(_batch(data, 1, rng))  # a recalibration pass
        trainer.window = None
        trainer.config = cfg
    if not trainer.eval_only:  # (evaluation: the pass below is all it runs)
        trainer.gradients(_batch(data, 1, rng))
        _warm_up_lengths(trainer, data)
    trainer.evaluate(_Subset(data, 1), 1, trim=False)
    trainer.shrink_arena(data)
    trainer.bases.clear()
    trainer._cut_bases.clear()


def _warm_up_lengths(trainer: Trainer, data) -> None:
    """One pass through the graphs at each shorter length (export/lengths.py), on a sample
    whose mask is cut to that length: their first run is part of the fixed cost as well."""
    text = trainer.bundle.manifest.text
    if text is None or not text.lengths or text.mask_input is None:
        return
    x, y = data.take(np.arange(1))
    mask = x.get(text.mask_input)
    if mask is None or mask.ndim != 2:
        return
    trim = trainer.trim
    trainer.trim = True
    try:
        for n in text.lengths:
            short = {k: v.copy() for k, v in x.items()}
            short[text.mask_input][:, n:] = 0
            short[text.mask_input][:, 0] = 1
            if trainer.graphs_at(trainer.mode, short)[1] == n:
                trainer.gradients(ArrayBatch(short, y))
    finally:
        trainer.trim = trim


def _measure(trainer: Trainer, data, batch: int, cap: int | None, largest: int = 8,
             target: bool = True) -> dict:
    """(In a probe process.) Arena growth of calibration and gradient passes at micro-batches
    1, 2 and 8 (as many as fit under ``cap``, none above ``largest``; the arena keeps its
    largest size, so each reading is the need of the largest pass so far), and the ranks the
    rank policy chooses with no memory limit (:func:`_wanted_ranks`); sent after each pass
    (``_progress``)."""
    use_arena(None if cap is None else max(cap, 1 << 20))
    trainer.open_sessions()
    _warm_up(trainer, data)
    rng = np.random.default_rng(12345)
    start = current_rss()
    out: dict = {"calib": {}, "step": {}}
    sizes = sorted({max(1, min(k, batch, largest)) for k in (1, 2, 8)})
    if trainer.mode == "instant" and not trainer.eval_only:
        trainer.train_batch = trainer.train_batch or batch  # (the rank rule's: set_ranks)
        for mc in sizes:
            try:
                _calibrate_once(trainer, data, mc, mc, rng)
            except ArenaExhausted:
                break
            out["calib"][mc] = current_rss() - start
            out["ranks"] = _wanted_ranks(trainer)
            _progress(out)
        if not out["calib"]:
            raise ArenaExhausted("calibration at micro-batch 1")
        if target:  # (the minimum's probes plan at rank 1: no target)
            _target_ranks(trainer, data, max(out["calib"]), rng, out)
        _full_rank_bases(trainer, batch)
        out["saved_full"] = saved_bytes(trainer.bundle.layers, trainer.ranks())
        trainer.shrink_arena(data)  # steps are measured from an arena without calibration's
        start = current_rss()
    for m in sizes:  # steps, or for `eval` evaluation passes (what it runs)
        trainer.use_plan(Plan(micro_batch=m, eval_micro_batch=m))
        try:
            if trainer.eval_only:
                trainer.evaluate(_Subset(data, min(len(data), 2 * m)), m, trim=False)
            else:
                trainer.gradients(_batch(data, 2 * m, rng))
        except ArenaExhausted:
            break
        out["step"][m] = current_rss() - start
        _progress(out)
    if not out["step"]:
        raise ArenaExhausted(f"{_pass(trainer)} at micro-batch 1")
    return out


def _target_ranks(trainer: Trainer, data, mc: int, rng: np.random.Generator, out: dict) -> None:
    """(In a probe process.) The planning target from a calibration over as many rows as the
    run's first one reads (in micro-batches of ``mc``, which fitted: the Grams do not grow
    with the rows): spectra from 1-8 rows see fewer directions and asked for lower ranks than
    the run's calibration then chose (session 50 probe: a transformer-like model planned 847 KB
    a sample under 160 MB where its ranks needed 962 KB, ratio 0.527 where 140 MB kept 0.599).
    Kept from the small calibrations where this one does not fit."""
    layers, text = trainer.bundle.layers, trainer.bundle.manifest.text
    rows = calibration_samples(layers, trainer.train_batch or mc,
                               trainer.config.instant.calib_samples, padded=text is not None)
    if rows <= mc:
        return
    try:
        _calibrate_once(trainer, data, min(rows, len(data)), mc, rng)
        out["ranks"] = _wanted_ranks(trainer)
    except ArenaExhausted:
        pass


def _calibrate_once(trainer: Trainer, data, rows: int, mc: int, rng: np.random.Generator) -> None:
    """(In a probe process.) One calibration batch of ``rows`` random rows in micro-batches of
    ``mc``, its ranks chosen with no memory limit (a plan without a saved budget)."""
    cfg = trainer.config
    trainer.use_plan(Plan(calib_micro_batch=mc))
    trainer.config = _one_batch(cfg)
    try:
        trainer.calibrate(data, rows, rng)
    finally:
        trainer.config = cfg


def _wanted_ranks(trainer: Trainer) -> dict[str, list[int]]:
    """The ranks the run's own rank policy chose at the probe's calibration with no memory
    limit (``--rank-policy``, ``--variance`` or ε and p, ``--max-rank``, ``--saved-ratio``, the
    FLOP cap at a step of the whole batch): the planning target. The plan takes the largest
    micro-batch at which they fit, so more budget never buys a larger micro-batch at lower
    ranks. Session 49 probe: the target was the energy rule's ranks (ε 0.95) while the default
    policy keeps 0.99 of the variance; a token MLP at batch 256 planned micro-batch 128 at its
    policy's ranks (saved ratio 0.642) under 470 MB, and 256 under 520 MB, where what was
    left a sample cut them to 0.430."""
    return {name: [int(r) for r in ranks] for name, ranks in trainer.ranks().items()}


def _one_batch(cfg):
    return replace(cfg, instant=replace(cfg.instant, calib_batches=1))


def _model(trainer: Trainer, m: dict, base: int, frozen: int, per_sample: int, grams: int,
           margin: int, decode: int = 0) -> MemoryModel:
    def line(points: dict) -> tuple[int, float]:
        pts = {int(k): float(v) for k, v in points.items()}
        lo, hi = min(pts), max(pts)
        if lo == hi:
            return 0, pts[lo] / lo
        slope = max(0.0, (pts[hi] - pts[lo]) / (hi - lo))
        return max(0, int(pts[lo] - slope * lo)), slope

    fixed, slope = line(m["step"])
    layers = trainer.bundle.layers
    saved_full = int(m.get("saved_full", 0))
    cfixed, cslope = line(m["calib"]) if m.get("calib") else (0, 0.0)
    want = min_ = full = 0
    if trainer.mode == "instant":
        # the policy's, --max-rank included (ranks.choose_ranks), from the last probe
        want = saved_bytes(layers, {k: tuple(v) for k, v in m["ranks"].items()})
        leads = [g[0] for g in basis_groups(layers).values()]  # one x̂ per basis
        min_ = sum(x_bytes_per_rank(ly) for ly in leads)
        full = sum(x_bytes_per_rank(ly) * ly.x_dim for ly in leads)
    return MemoryModel(base=base, frozen=frozen, data_per_sample=per_sample,
                       arena_fixed=fixed, arena_per_sample=max(0.0, slope - saved_full),
                       calib_fixed=cfixed, calib_per_sample=cslope, grams=grams, margin=margin,
                       data_fixed=decode,
                       saved_min=min_, saved_want=want, saved_max=full)


def _validate(trainer: Trainer, data, batch: int, plan: Plan) -> dict:
    """(In a probe process.) The plan at its real size under its own cap: a calibration whose
    ranks fill the planned memory, a full step, an evaluation pass."""
    use_arena(plan.arena_cap)
    trainer.use_plan(plan)
    trainer.open_sessions()
    rng = np.random.default_rng(54321)
    if trainer.mode == "instant" and not trainer.eval_only:
        cfg = trainer.config
        trainer.config = replace(cfg, instant=replace(cfg.instant, calib_batches=1,
                                                      rank_policy="budget", flop_ratio=None,
                                                      variance=1.0))
        trainer.calibrate(data, batch, rng)
        trainer.config = cfg
        trainer.begin_calibration()  # a recalibration step: INSTANT plus the Grams
        trainer.gradients(_batch(data, batch, rng))
        trainer.window = None
    if not trainer.eval_only:  # (evaluation: the pass below, at the plan's micro-batch)
        trainer.gradients(_batch(data, batch, rng))
    sub = _Subset(data, min(len(data), 2 * (plan.eval_micro_batch or batch)))
    trainer.evaluate(sub, plan.eval_micro_batch, trim=False)
    return {"rss": current_rss()}


class _Subset:
    def __init__(self, data, n: int) -> None:
        self.data, self.n = data, n

    def __len__(self) -> int:
        return self.n

    def take(self, idx):
        return self.data.take(idx)


def _pass(trainer: Trainer) -> str:
    return "an evaluation pass" if trainer.eval_only else "a step"


def print_plan(plan: Plan, trainer: Trainer, log=print) -> None:
    """The plan's micro-batches, the memory breakdown and the per-layer ranks of the first
    calibration (when the trainer has bases). An evaluation's plan (``eval``) says what its
    probes measured: evaluation passes, without gradients or an optimizer."""

    mb = 1e6
    log(f"plan for budget {budget_mb(plan.budget)} MB: micro-batch {plan.micro_batch}"
        + (f", calibration micro-batch {plan.calib_micro_batch}" if plan.calib_micro_batch
           else "")
        + f"; predicted peak {(plan.predicted_peak or 0) / mb:.1f} MB"
        + (f", compressed activations up to {plan.saved_budget / 1e3:.1f} KB per sample"
           if plan.saved_budget is not None else ""))
    for k, v in plan.breakdown.items():
        if trainer.eval_only:
            k = (k.replace("weights, gradients, optimizer", "weights")
                 .replace(" / calibration Grams", "").replace("(step x", "(evaluation x"))
        log(f"  {k:<64} {v / mb:8.1f} MB")
    if trainer.bases:
        log(trainer.cost_table())

