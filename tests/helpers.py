"""Small constructors the tests share (the runtime's own API, spelled shortly)."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from devices.planner import Plan
from runtime.bundle import Bundle, open_bundle
from runtime.config import InstantConfig, OptimConfig, SessionConfig, TrainConfig
from runtime.trainer import Trainer

__all__ = ["make_trainer", "need", "run_tree_peak"]


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


# a small launcher: the kernel's maximum RSS over the command and every process it reaped
# (planning probes, the tokenising child), printed after the command's own output
_TREE_PEAK = ("import resource, subprocess, sys\n"
              "r = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
              "sys.stdout.write(r.stdout)\n"
              "sys.stderr.write(r.stderr)\n"
              "print('tree-peak-kb', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
              "sys.exit(r.returncode)\n")


def run_tree_peak(argv: list[str], cwd, timeout: float = 600
                  ) -> tuple[subprocess.CompletedProcess, int]:
    """Run ``argv`` under the launcher: (its result, the largest process of its tree in bytes)."""
    r = subprocess.run([sys.executable, "-c", _TREE_PEAK, *map(str, argv)], cwd=cwd,
                       capture_output=True, text=True, timeout=timeout)
    return r, int(re.search(r"tree-peak-kb (\d+)", r.stdout)[1]) * 1024
