"""Small constructors the tests share (the runtime's own API, spelled shortly)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from devices.planner import Plan
from runtime.bundle import Bundle, open_bundle
from runtime.config import InstantConfig, OptimConfig, SessionConfig, TrainConfig
from runtime.trainer import Trainer

__all__ = ["make_trainer", "need"]


def need(*packages: str) -> None:
    """Skip the calling test unless every package is installed (``make test`` installs them)."""
    for p in packages:
        if importlib.util.find_spec(p) is None:
            pytest.skip(f"package '{p}' is not installed (make test installs it)")


def make_trainer(bundle: Bundle | Path, mode: str = "instant", lr: float = 1e-3,
                 optimizer: str = "adamw", threads: int = 1, seed: int = 0,
                 micro_batch: int | None = None, weights: Path | None = None,
                 **instant) -> Trainer:
    """A trainer on ``bundle`` with the bundle's INSTANT settings overridden by ``instant``."""
    b = bundle if isinstance(bundle, Bundle) else open_bundle(bundle)
    if ("energy" in instant or "oversample" in instant) and "rank_policy" not in instant:
        instant["rank_policy"] = "energy"  # as the CLI does for an explicit ε or p
    cfg = TrainConfig(mode=mode, optim=OptimConfig(name=optimizer, lr=lr),
                      instant=InstantConfig.from_bundle(b.manifest.instant.settings, **instant),
                      session=SessionConfig(threads=threads), seed=seed)
    plan = Plan(micro_batch=micro_batch, calib_micro_batch=micro_batch,
                eval_micro_batch=micro_batch)
    return Trainer(b, cfg, plan, weights=weights)
