"""Shared fixtures: bundles exported once per session, and the CLI run in a real subprocess.

Bundles come from the Python API (``export.export_bundle``) because a torch-importing export
subprocess costs seconds. The session bundles are read-only by convention: a test that damages a
bundle or trains without ``--out`` works on a ``copy_bundle`` copy.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CLI_TIMEOUT_S = 120

Run = Callable[..., subprocess.CompletedProcess]


def _run(argv: list[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          check=False)


@pytest.fixture(scope="session")
def cli() -> Run:
    """``cli("train", bundle, "--steps", 5)`` runs ``python -m runtime ...`` (str() on each arg)
    and returns the completed process; a run past ``timeout`` seconds fails the test."""

    def run(*args: object, timeout: float = CLI_TIMEOUT_S) -> subprocess.CompletedProcess:
        return _run([sys.executable, "-m", "runtime", *map(str, args)], timeout)

    return run


@pytest.fixture(scope="session")
def run_python() -> Run:
    """``run_python(code, *argv)`` runs ``python -c code argv...`` from the repository root."""

    def run(code: str, *args: object, timeout: float = CLI_TIMEOUT_S) -> subprocess.CompletedProcess:
        return _run([sys.executable, "-c", code, *map(str, args)], timeout)

    return run


@pytest.fixture(scope="session")
def bundle_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bundles")


def _export(root: Path, name: str, model: str, **kwargs) -> Path:
    from export import export_bundle

    return export_bundle(model, root / name, **kwargs)


@pytest.fixture(scope="session")
def mlp_bundle(bundle_root: Path) -> Path:
    """Built-in ``mlp`` (64-128-128-10), every parameter trainable, its two hidden Linears
    INSTANT layers (the export leaves them exact by default: one vector per sample)."""
    return _export(bundle_root, "mlp", "mlp", instant_exclude=["4"])


@pytest.fixture(scope="session")
def cnn_bundle(bundle_root: Path) -> Path:
    """Built-in ``cnn`` for 8x8 digits, every parameter trainable."""
    return _export(bundle_root, "cnn", "cnn", input_shape="32,1,8,8")


@pytest.fixture(scope="session")
def mlp_head_bundle(bundle_root: Path) -> Path:
    """``mlp`` with only its last layer trainable: the frozen layers fill ``weights.bin``."""
    return _export(bundle_root, "mlp-head", "mlp", trainable="last:1")


@pytest.fixture
def copy_bundle(tmp_path: Path) -> Callable[[Path], Path]:
    """``copy_bundle(bundle)`` copies a session bundle into this test's tmp dir."""

    def copy(bundle: Path) -> Path:
        return Path(shutil.copytree(bundle, tmp_path / bundle.name))

    return copy
