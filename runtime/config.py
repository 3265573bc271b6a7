"""Typed training configuration: one source of defaults, validated once at the edge.

Every value a user can set is a field here; ``__post_init__`` checks its type and range and raises
``UserError`` with one line naming the option, what was given and what is accepted. The INSTANT
defaults come from the bundle (``contract.InstantSettings``, recorded at export); options given
on the command line override them.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass, field, replace
from typing import Literal

from contract import InstantSettings, UserError
from devices.planner import budget_mb

__all__ = ["InstantConfig", "OptimConfig", "RunConfig", "SessionConfig", "TrainConfig",
           "check_budget", "max_threads", "profile_threads"]

RankPolicy = Literal["energy", "budget"]


def max_threads() -> int:
    """The most intra-op threads accepted: 4 per core (oversubscribing further only slows down;
    an absurd value used to hang onnxruntime while it spawned threads)."""
    return 4 * (os.cpu_count() or 1)


def profile_threads(prof) -> int:
    """A profile's threads: the device's, but on a smaller machine no more than it takes (a
    Jetson profile's 12 on this 2-core machine was refused as "--threads 12 is invalid", an
    option the user never passed; its 8 ran 8 threads on 2 cores). At most one per core of
    this machine; 0 (one per core) without a profile."""
    return min(prof.default_threads, os.cpu_count() or 1) if prof is not None else 0


def check_budget(budget: int | None, given: str | None, prof) -> None:
    """A budget's checks shared by ``train``/``plan`` and ``fleet client``: at least 1 MB,
    within the profile's RAM; a warning (stderr) where it exceeds this machine's RAM.

    Raises:
        UserError: below 1 MB, below what the process already took, or above the profile's RAM.
    """
    import sys

    from .memory import peak_rss, physical_ram

    if budget is None:
        return
    taken = peak_rss()
    # a profile whose RAM is below what the runtime takes here: no budget it allows can work
    # (session 49 probe: "raise --budget", then "exceeds the 64 MB of RAM of profile 'tiny'")
    def small(than: str) -> str | None:
        return (f"; profile '{prof.name}' has {_mb(prof.ram)} of RAM, less than {than}: pass the "
                "profile of a device with more RAM") if prof is not None and prof.ram <= taken \
            else None
    here = (f"the runtime takes here ({_mb(taken)}: Python and its libraries) before it reads "
            "a bundle")
    if budget < 1_000_000 and given is None:  # the profile's own
        raise UserError(f"{prof.source}: default_budget {budget:,} bytes is below 1 MB: no run "
                        "fits in it" + (small(here) or "; set there what a run may use (at "
                                        f"most its ram, {_mb(prof.ram)}), or pass --budget"))
    if budget < 1_000_000:
        raise UserError(f"--budget {given} is below 1 MB: no run fits in it" + (
            small(here) or "; pass e.g. 256MB (`instant-runtime plan --data DATA` without "
                           "--budget states the minimum)"))
    if prof is not None and budget > prof.ram:
        raise UserError(f"budget {budget_mb(budget)} MB exceeds the {_mb(prof.ram)} of RAM "
                        f"of profile '{prof.name}'; " + (
                            "pass a --budget below it, or " if prof.ram > taken else "pass ")
                        + "the profile of a device with more RAM")
    if taken >= budget:  # (a session 45 probe: a budget below this passed on to the sessions
        # and the plan's probes, 76 MB under --budget 40MB before its refusal)
        said = f"--budget {budget_mb(budget)} MB" if given is not None else \
            f"the budget of profile '{prof.name}', {budget_mb(budget)} MB,"
        raise UserError(f"{said} is below what the runtime already takes before it reads the "
                        f"bundle ({taken / 1e6:.0f} MB: Python and its libraries)"
                        + (small("that") or (
                            "; raise --budget well above it (`instant-runtime plan --data DATA` "
                            "without --budget" + ("" if given is not None else " and --profile")
                            + " states the minimum)" + (
                                "" if given is not None else ", or pass the profile of a device "
                                "with more RAM"))))
    if prof is not None and given is not None and budget > prof.default_budget:
        gives = budget_mb(prof.default_budget)  # (session 47 probe: 530 MB, Pi Zero, silent)
        print(f"warning: --budget {budget_mb(budget)} MB is above the {gives} MB that profile "
              f"'{prof.name}' gives a run (its RAM less what the system there takes): the OS "
              "may stop a run that uses it all on that device", file=sys.stderr)
    ram = physical_ram()
    if ram and budget > ram:
        said = "--budget" if given is not None else f"the budget of profile '{prof.name}':"
        print(f"warning: {said} {budget_mb(budget)} MB exceeds this machine's RAM "
              f"({ram / 1e6:.0f} MB); the budget cannot protect the run from the OS",
              file=sys.stderr)


def _mb(n: int) -> str:
    """``n`` bytes as a line says a device's RAM: MB, or bytes below 1 MB (a probe's 1 kB
    profile read "0 MB of RAM")."""
    return f"{n / 1e6:.0f} MB" if n >= 1_000_000 else f"{n:,} bytes"


def _bad(option: str, value, accepted: str) -> UserError:
    return UserError(f"{option} {value!r} is invalid: {accepted}")


def _finite(option: str, value, lo: float | None = None, hi: float | None = None,
            lo_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _bad(option, value, "expected a finite number")
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise _bad(option, value, f"must be {'>' if lo_open else '>='} {lo:g}")
    if hi is not None and value > hi:
        raise _bad(option, value, f"must be <= {hi:g}")


def _float32(option: str, value: float) -> None:
    """The optimizers compute in float32: 1e39 is finite here but inf there (every weight NaN
    after one update), 1e-50 is 0 there (nothing would train)."""
    try:
        f = struct.unpack("f", struct.pack("f", value))[0]
    except OverflowError:
        f = math.inf
    if not math.isfinite(f):
        raise _bad(option, value, "must be at most 3.4e+38 (the optimizer computes in float32)")
    if value and not f:
        raise _bad(option, value, "must be at least 1.4e-45 (smaller is 0 in float32, which the "
                   "optimizer computes in)")


def _int(option: str, value, lo: int, hi: int | None = None, none_ok: bool = False) -> None:
    if value is None and none_ok:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(option, value, "expected an integer")
    if value < lo:
        raise _bad(option, value, f"must be at least {lo}")
    if hi is not None and value > hi:
        raise _bad(option, value, f"must be at most {hi}")


@dataclass(frozen=True)
class SessionConfig:
    """How onnxruntime runs: threads, device, graph optimisation level."""

    threads: int = 0  # intra-op threads; 0: one per core
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    spinning: bool = False  # busy-wait in the thread pool (measured slower with 2 cores)
    optimization: Literal["basic", "extended", "all"] = "basic"
    # the profile's execution providers, in preference order (--device auto picks from them)
    profile_providers: tuple[str, ...] | None = None
    # keep weights, gradients and optimizer state in the provider's memory (runtime/resident.py);
    # always on for CUDA, settable on the CPU to test that path
    resident: bool = False

    def __post_init__(self) -> None:
        _int("--threads", self.threads, 0, max_threads())
        if self.device not in ("cpu", "cuda", "auto"):
            raise _bad("--device", self.device, "choose cpu, cuda or auto")

    @property
    def intra_threads(self) -> int:
        return self.threads or (os.cpu_count() or 1)


@dataclass(frozen=True)
class OptimConfig:
    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = 1e-3
    weight_decay: float | None = None  # None: AdamW 0.01, SGD 0
    momentum: float = 0.9  # SGD

    def __post_init__(self) -> None:
        if self.name not in ("adamw", "sgd"):
            raise _bad("--optimizer", self.name, "choose adamw or sgd")
        _finite("--lr", self.lr, 0.0, lo_open=True)
        _float32("--lr", self.lr)
        if self.weight_decay is not None:
            _finite("--weight-decay", self.weight_decay, 0.0)
            _float32("--weight-decay", self.weight_decay)
        _finite("momentum", self.momentum, 0.0, 1.0)

    @property
    def decay(self) -> float:
        if self.weight_decay is not None:
            return self.weight_decay
        return 0.01 if self.name == "adamw" else 0.0


@dataclass(frozen=True)
class InstantConfig:
    """INSTANT settings for a run: the bundle's defaults with the user's overrides."""

    energy: float = InstantSettings.energy
    oversample: int = InstantSettings.oversample
    calib_every: int = InstantSettings.calib_every
    calib_batches: int = InstantSettings.calib_batches
    max_rank: int | None = None
    # samples per batch of the first calibration (None: calibrate.calibration_samples' rule)
    calib_samples: int | None = None
    # "budget": ranks that minimise the gradient error under the plan's memory and flop_ratio;
    # "energy": the paper's ε rule (chosen automatically when ε or p is given explicitly).
    rank_policy: RankPolicy = "budget"
    # budget policy: the variance (σ² of the data) every compressed tensor keeps at most
    variance: float = 0.99
    # budget policy: compressed activations at most this fraction of the exact ones' bytes
    saved_ratio: float | None = None
    # budget policy: cap on the backward FLOPs of the compressed layers vs the exact backward
    # (0 or None: no cap). Default 1.0: INSTANT never computes more than the exact backward. Measured
    # (2 cores): a token MLP at batch 256 where 0.99 of the variance needs ranks near full took
    # 1.24x the exact step and 1.19x its memory uncapped, 1.02x / 0.78x at 1.0, 0.74x / 0.66x at
    # 0.5; a from-scratch CNN with 1x1 convs on digits (1000 steps, 6 seeds) lost 1.0 point at
    # 1.0 (+0.2 uncapped).
    flop_ratio: float | None = 1.0
    # the default cap binds only where the compressed layers' exact backward takes at least this
    # many FLOPs per batch (an explicit --flop-ratio always binds: the CLI sets 0 here; per
    # batch, not per micro-batch, so a budget's micro-batch does not change the rule).
    # Below it the cap's saving is a few milliseconds at most, and what it cost was accuracy: a
    # 2-layer transformer over 16 tokens (34 MFLOP a micro-batch of 32), whose activations need
    # near-full ranks for 0.99 of their variance, ended 3.4 points below exact training with the
    # cap (5 seeds, ranks pushed to 1-4 of 16 on some layers) and within 1 point without it
    # (session-20 probe); the CNN with 1x1 convs on digits: -1.0 capped, +0.2 uncapped.
    flop_cap_min: float = 1e8
    # budget policy: where the layers are below flop_cap_min (their backward cheap at any rank),
    # every rank starts at exact instead of at ``variance``; the plan's memory for compressed
    # activations and --saved-ratio still lower them, --max-rank caps them. A from-scratch DS-CNN
    # (two 32-wide 1x1 convs, keyword spotting, 600 steps, 3 seeds; session 37) ended 8.9 points
    # below exact training at 0.99 of the variance (ranks 8-21 of 32; 2.4 below at 0.999), to
    # save 18 KB a sample; exact activation ranks alone closed it. False where --variance is
    # given (from_bundle): the user asks for the variance rule.
    exact_when_small: bool = True

    def __post_init__(self) -> None:
        _finite("--energy", self.energy, 0.0, 1.0, lo_open=True)
        _int("--oversample", self.oversample, 0, 4096)
        _int("--calib-every", self.calib_every, 0)
        _int("--calib-batches", self.calib_batches, 1, 10_000)
        _int("--max-rank", self.max_rank, 1, none_ok=True)
        _int("--calib-samples", self.calib_samples, 1, 1 << 24, none_ok=True)
        if self.rank_policy not in ("energy", "budget"):
            raise _bad("--rank-policy", self.rank_policy, "choose energy or budget")
        if self.flop_ratio is not None:  # 0: no cap
            _finite("--flop-ratio", self.flop_ratio, 0.0, 4.0)
        _finite("flop_cap_min", self.flop_cap_min, 0.0, 1e30)
        _finite("--variance", self.variance, 0.0, 1.0, lo_open=True)
        if self.saved_ratio is not None:
            _finite("--saved-ratio", self.saved_ratio, 0.0, 1.0, lo_open=True)

    @classmethod
    def from_bundle(cls, settings: InstantSettings, **overrides) -> InstantConfig:
        """The bundle's recorded settings, with every override that is not None applied."""
        base = cls(energy=settings.energy, oversample=settings.oversample,
                   calib_every=settings.calib_every, calib_batches=settings.calib_batches)
        given = {k: v for k, v in overrides.items() if v is not None}
        if "variance" in given and "exact_when_small" not in given:
            given["exact_when_small"] = False
        return replace(base, **given)


@dataclass(frozen=True)
class TrainConfig:
    """What a :class:`runtime.trainer.Trainer` needs besides the bundle and the plan."""

    mode: Literal["instant", "vanilla"] = "instant"
    optim: OptimConfig = field(default_factory=OptimConfig)
    instant: InstantConfig = field(default_factory=InstantConfig)
    session: SessionConfig = field(default_factory=SessionConfig)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in ("instant", "vanilla"):
            raise _bad("--mode", self.mode, "choose instant or vanilla")
        _int("--seed", self.seed, 0, 2**63 - 1)


@dataclass(frozen=True)
class RunConfig:
    """The training loop around a trainer: steps, batch, checkpoints, evaluation, budget."""

    steps: int = 100
    batch: int = 32
    micro_batch: int | None = None  # forced micro-batch (None: the plan's)
    eval_every: int = 0  # steps; 0: evaluate before and after only
    eval_batch: int = 64
    checkpoint_every: int = 50  # steps; 0: only at the end
    resume: bool = False
    overwrite: bool = False
    max_nonfinite: int = 5
    budget: int | None = None  # bytes: the whole-process peak RSS must stay below it
    progress: bool = True
    new_log: bool = False  # a run from step 0 starts metrics.jsonl empty (train; not a fleet
    # client's rounds, which append to one log across rounds and restarts)
    stop_grace: float = 30.0  # seconds a step in progress has to end after SIGINT/SIGTERM/SIGHUP

    def __post_init__(self) -> None:
        _int("--steps", self.steps, 1, 10**12)  # (an int64 in checkpoints; years of steps)
        _int("--batch", self.batch, 1, 1 << 24)
        _int("--micro-batch", self.micro_batch, 1, 1 << 24, none_ok=True)
        _int("--eval-every", self.eval_every, 0)
        _int("--eval-batch", self.eval_batch, 1, 1 << 24)
        _int("--checkpoint-every", self.checkpoint_every, 0)
        _int("--max-nonfinite", self.max_nonfinite, 1)
        _int("--budget", self.budget, 1, none_ok=True)
        if isinstance(self.stop_grace, bool) or not isinstance(self.stop_grace, int | float) \
                or not math.isfinite(self.stop_grace) or not 1 <= self.stop_grace <= 86400:
            raise _bad("--stop-grace", self.stop_grace, "expected seconds from 1 to 86400 (a "
                       "day); set it below the kill timeout of what stops the run (systemd's "
                       "TimeoutStopSec, Kubernetes' terminationGracePeriodSeconds)")
        if self.micro_batch is not None and self.micro_batch > self.batch:
            raise UserError(f"--micro-batch {self.micro_batch} is larger than --batch "
                            f"{self.batch}: a micro-batch is a part of a step's batch; pass "
                            "--micro-batch at most --batch")
        if self.resume and self.overwrite:
            raise UserError("--resume and --overwrite contradict each other: --resume continues "
                            "the run in --out, --overwrite replaces it; pass one")
