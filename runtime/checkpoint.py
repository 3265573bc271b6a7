"""Crash-safe training checkpoints: atomic ``.npz`` files, a verified pointer, clean stops.

Layout of ``RUN/checkpoints/``::

    ckpt-000100.npz   arrays (weights, optimizer moments, INSTANT bases, data order, losses)
                      plus ``__meta__``: the JSON metadata as a uint8 array (no pickle anywhere)
    latest            JSON {"checkpoints": [{"file", "sha256", "bytes", "step"}, ...]}, newest
                      first; the last ``keep`` good checkpoints

Every file is written to a temporary name in the same folder, flushed, fsynced, renamed over its
final name with ``os.replace`` and the folder fsynced, so a crash at any point leaves either the
old or the new ``latest``, each naming complete files. Loading checks each listed file's SHA-256
and falls back to the previous one (with a warning) when the newest is damaged.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import threading
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from tqdm import tqdm

from contract import UserError, atomic_write, file_sha256, names, write_npz, write_text
from contract.files import fsync_dir

from .bundle import Bundle

__all__ = ["Checkpointer", "StopSignals", "TrainingInterrupted", "Writer", "atomic_write",
           "bundle_sha256", "warn", "write_npz", "write_text"]

FORMAT = "instant-runtime-checkpoint"
FORMAT_VERSION = 1
POINTER = "latest"
_META = "__meta__"
_NAME = re.compile(r"^ckpt-(\d+)\.npz$")

Writer = Callable[[Path, dict[str, np.ndarray]], None]


def bundle_sha256(bundle: Bundle) -> str:
    """Identity of a bundle: the SHA-256 of its manifest (which holds every file's checksum)."""
    return file_sha256(bundle.path / names.MANIFEST_FILE)


def warn(msg: str) -> None:
    """One ``warning:`` line on stderr (above a progress bar, if one is showing)."""
    tqdm.write(f"warning: {msg}", file=sys.stderr)


class Checkpointer:
    """Writes and reads the checkpoints of one run folder for one bundle.

    ``writer`` writes the arrays to a path (default :func:`write_npz`); tests pass a failing one
    to simulate a full disk.
    """

    def __init__(self, folder: Path, bundle: Bundle, writer: Writer | None = None,
                 keep: int = 3) -> None:
        if keep < 1:
            raise UserError(f"keep must be at least 1 checkpoint, got {keep}")
        self.folder = Path(folder)
        self.bundle_sha = bundle_sha256(bundle)
        self.writer = writer or write_npz
        self.keep = keep
        self.loaded: Path | None = None  # the checkpoint load() returned

    # ---------------------------------------------------------------------------- writing
    def save(self, step: int, arrays: dict[str, np.ndarray], meta: dict) -> Path:
        """Write ``ckpt-STEP.npz`` and make it the latest; prune all but the last ``keep``.

        Raises:
            UserError: the folder cannot be created or written (permissions, full disk); the
                previous checkpoint and pointer are left as they were.
        """
        final = self.folder / f"ckpt-{step:06d}.npz"
        tmp = self.folder / f".{final.name}.tmp{os.getpid()}"
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "step": step,
                "bundle_sha256": self.bundle_sha, **meta}
        blob = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.writer(tmp, {**arrays, _META: blob})
            entry = {"file": final.name, "sha256": file_sha256(tmp),
                     "bytes": tmp.stat().st_size, "step": step}
            os.replace(tmp, final)
            fsync_dir(self.folder)
            kept = [entry] + [e for e in self.entries() if e["file"] != final.name]
            kept = kept[:self.keep]
            self._write_pointer(kept)
        except OSError as exc:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass  # the folder itself is unusable; nothing was written
            prev = self.entries()
            last = (f"the last good checkpoint {self.folder / prev[0]['file']} is intact"
                    if prev else "no earlier checkpoint exists")
            raise UserError(f"cannot write checkpoint {final}: "
                            f"{exc.strerror or exc.__class__.__name__}; {last}; free space "
                            "or pass another --out") from None
        self._prune({e["file"] for e in kept})
        return final

    def _write_pointer(self, entries: list[dict]) -> None:
        text = json.dumps({"format": FORMAT, "checkpoints": entries}, indent=1)
        atomic_write(self.folder / POINTER, lambda p: write_text(p, text))

    def _prune(self, keep: set[str]) -> None:
        for f in self.folder.iterdir():
            stale = (_NAME.match(f.name) and f.name not in keep) or ".tmp" in f.name
            if stale:
                try:
                    f.unlink()
                except OSError:
                    pass  # pruning is best effort: a leftover file costs space, not correctness

    def entries(self) -> list[dict]:
        """The pointer's list (newest first), or [] when it is missing or unreadable."""
        try:
            data = json.loads((self.folder / POINTER).read_text())
            entries = data["checkpoints"]
            # only checkpoint names of this folder: a pointer never leads outside it
            if not all(isinstance(e, dict) and isinstance(e.get("file"), str)
                       and _NAME.match(e["file"]) for e in entries):
                return []
            return entries
        except (OSError, ValueError, KeyError, TypeError):
            return []

    # ---------------------------------------------------------------------------- reading
    def load(self) -> tuple[dict[str, np.ndarray], dict] | None:
        """The newest intact checkpoint as (arrays, meta); None when the folder has none.

        Raises:
            UserError: checkpoints exist but none is intact, or they belong to another bundle.
        """
        if not self.folder.is_dir():
            return None
        entries = self.entries()
        verified = True
        if not entries:
            names = sorted((f.name for f in self.folder.iterdir() if _NAME.match(f.name)),
                           reverse=True)
            if not names:
                return None
            if (self.folder / POINTER).exists():
                warn(f"checkpoint pointer {self.folder / POINTER} is unreadable; "
                      "using the newest checkpoint that loads")
            entries = [{"file": n} for n in names]
            verified = False
        problems = []
        for e in entries:
            path = self.folder / e["file"]
            try:
                if "sha256" in e and file_sha256(path) != e["sha256"]:
                    raise ValueError("SHA-256 differs from the pointer's (corrupt)")
                arrays, meta = _read(path)
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
                problems.append(f"{path.name}: {exc}")
                warn(f"checkpoint {path} is unusable ({exc}); trying the previous one")
                continue
            if meta.get("bundle_sha256") != self.bundle_sha:
                raise UserError(f"checkpoint {path} was written for another bundle (manifest "
                                f"sha256 {str(meta.get('bundle_sha256'))[:12]}…, this bundle "
                                f"{self.bundle_sha[:12]}…); resume with that bundle, or drop "
                                "--resume / pass another --out to start afresh")
            if problems or not verified:
                warn(f"resuming from {path} (step {meta['step']})")
            self.loaded = path
            return arrays, meta
        raise UserError(f"no intact checkpoint in {self.folder}: {'; '.join(problems)}; "
                        "drop --resume to start afresh")


def _read(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}  # reading each member checks its zip CRC
    meta = json.loads(arrays.pop(_META).tobytes().decode())
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"not a version-{FORMAT_VERSION} {FORMAT}")
    return arrays, meta


# -------------------------------------------------------------------------------- signals
class TrainingInterrupted(Exception):
    """Training stopped on SIGINT/SIGTERM after a checkpoint; ``exit_code`` is 128 + signal."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.exit_code = 128 + signum
        where = (f"checkpoint {checkpoint}; continue with --resume" if checkpoint
                 else "no checkpoint (no --out)")
        super().__init__(f"interrupted by {signal.Signals(signum).name} after step {step}; "
                         f"{where}")


class StopSignals:
    """Context manager: SIGINT/SIGTERM set ``signum`` instead of killing, so the loop can finish
    its step and checkpoint; a second signal interrupts at once. No-op off the main thread."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old.clear()
