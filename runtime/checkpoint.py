"""Crash-safe training checkpoints: atomic ``.npz`` files, a verified pointer, clean stops.

Layout of ``RUN/checkpoints/``::

    ckpt-000100.npz   arrays (weights, optimizer moments, INSTANT bases, data order, losses)
                      plus ``__meta__``: the JSON metadata as a uint8 array (no pickle anywhere)
    latest            JSON {"checkpoints": [{"file", "sha256", "bytes", "step"}, ...]}, newest
                      first; the last ``keep`` good checkpoints

Every file is written to a temporary name in the same folder, flushed, fsynced, renamed over its
final name with ``os.replace`` and the folder fsynced, so a crash at any point leaves either the
old or the new ``latest``, each naming complete files. Loading checks each listed file's SHA-256
and falls back to the previous one (with a warning) when the newest is damaged (unreadable, not
this format). Only regular files are opened: a FIFO or device in a checkpoint's place must not
block the run.

A checkpoint that reads back but whose content cannot be the run's state (a wrong type, shape or
range, NaN weights: tampered, or written by another version) is not skipped silently: the
restore checks everything first (``run._restore``, ``Trainer.load_state``, with the helpers
below), raises :class:`DamagedCheckpoint`, and ``train`` turns it into one error naming the file
and the earlier checkpoint to resume from.

Why one module (~850 lines): the writer, the pointer, the reader and the content checks share one
file format and its rules (checkpoint names, the pointer's entries, regular-file opens), and the
stop signals decide when the last checkpoint is written and what an interrupted run says about
it; split, each part would re-derive those rules.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import signal
import stat
import threading
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from contract import (
    UserError,
    atomic_write,
    bundle_in_use,
    file_sha256,
    hold_file,
    let_go,
    names,
    write_npz,
    write_text,
)
from contract.files import fsync_dir

from .bundle import Bundle
from .memory import all_finite

__all__ = ["CheckpointWriteError", "Checkpointer", "DamagedCheckpoint", "StartupInterrupted", "StopSignals",
           "TrainingInterrupted", "Writer", "atomic_write", "bundle_ids", "bundle_sha256",
           "describe", "check_array", "has_checkpoints", "meta_array", "meta_dict", "meta_float", "meta_int",
           "newest_checkpoint", "pointer_entries", "read_regular", "restore_array", "warn",
           "write_npz", "write_text"]

FORMAT = "instant-runtime-checkpoint"
FORMAT_VERSION = 1
POINTER = "latest"
_META = "__meta__"
# a checkpoint's JSON metadata (settings, ranks, counters, RNG states) is a few KB to a few
# hundred KB; past these it is not one (and parsing it would pass any budget)
MAX_META_BYTES = 16 << 20
MAX_META_VALUES = 1_000_000
_NAME = re.compile(r"^ckpt-(\d+)\.npz$")


def _step_of(name: str) -> int:
    """The step in a checkpoint file's name (names are padded to 6 digits, so past step
    999,999 their text order is not their step order)."""
    return int(_NAME.match(name)[1])

Writer = Callable[[Path, dict[str, np.ndarray]], None]


def parse_meta(text: bytes) -> dict:
    """A checkpoint's ``__meta__`` JSON, bounded before it is parsed: each JSON value costs
    30-60 bytes parsed (30 MB of empty lists took a resume to 836 MB under a 200 MB budget).

    Raises:
        ValueError: too many values, not JSON, not an object.
    """
    values = text.count(b",") + text.count(b"[") + text.count(b"{")
    if values > MAX_META_VALUES:
        raise ValueError(f"its metadata holds over {values:,} JSON values, more than a "
                         f"checkpoint's can ({MAX_META_VALUES:,})")
    meta = json.loads(text.decode())
    if not isinstance(meta, dict):
        raise ValueError(f"its metadata is a JSON {type(meta).__name__}, not an object")
    return meta


_DESCRIPTIVE = ("created", "source")  # when and from what the export ran: not what trains


def bundle_ids(bundle_dir: Path) -> tuple[str, ...]:
    """The hashes a run may have recorded for the bundle in ``bundle_dir``: its identity
    (:func:`bundle_sha256`), then its manifest file's SHA-256 (what runs recorded before
    session 33); () where the manifest cannot be read.

    The identity is the SHA-256 of the manifest (which holds every file's checksum) without
    its export time and source: the same model exported again is the same bundle (session 33
    probe: a re-export, every graph and weight byte-identical, left its runs impossible to
    resume, "a run of another bundle")."""
    import hashlib

    from contract.manifest import MAX_MANIFEST_BYTES

    path = bundle_dir / names.MANIFEST_FILE
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_MANIFEST_BYTES + 1)
    except OSError:
        return ()
    ids = (hashlib.sha256(raw).hexdigest(),)
    try:
        manifest = json.loads(raw)
    except (ValueError, RecursionError):
        return ids
    if isinstance(manifest, dict) and len(raw) <= MAX_MANIFEST_BYTES:
        kept = {k: v for k, v in manifest.items() if k not in _DESCRIPTIVE}
        text = json.dumps(kept, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        ids = (hashlib.sha256(text.encode()).hexdigest(), *ids)
    return ids


def bundle_sha256(bundle: Bundle) -> str:
    """Identity of a bundle, as runs and checkpoints record it (:func:`bundle_ids`)."""
    ids = bundle_ids(bundle.path)
    return ids[0] if ids else file_sha256(bundle.path / names.MANIFEST_FILE)


SAID = 3  # unusable checkpoints named one by one; the rest are counted


def warn(msg: str) -> None:
    """One ``warning:`` line on stderr (above a progress bar, if one is showing; never blocking
    the run: ``runtime/console.py``)."""
    from .console import say_err

    say_err(f"warning: {msg}")


def warn_kept(trainer) -> None:
    """Say the warnings ``trainer`` kept (a calibration's) once each, then drop them."""
    for msg in trainer.warnings:
        warn(msg)
    trainer.warnings.clear()


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
        self.bundle_ids = bundle_ids(bundle.path) or (bundle_sha256(bundle),)
        self.bundle_sha = self.bundle_ids[0]  # (what this run's checkpoints record)
        self.writer = writer or write_npz
        self.keep = keep
        self.loaded: Path | None = None  # the checkpoint load() returned
        self._home = _identity(self.folder.parent)  # the run folder, as the run began

    def check_home(self, step: int) -> None:
        """Raises ``UserError`` where the run folder was removed, moved or replaced since the
        run began (session 48 probe: a run whose folder was deleted made it again for its
        next checkpoint, without run.json or its log, and exited 0; one whose folder was
        renamed went on in a new one, split in two)."""
        if self._home is None or _identity(self.folder.parent) == self._home:
            return
        out = self.folder.parent
        raise UserError(f"the run folder '{out}' was removed or moved while the run went on "
                        f"(seen at the checkpoint of step {step}); nothing more is written, so "
                        "that the run is not split between two folders: the checkpoints it "
                        "wrote went with the folder (`train --resume --out WHERE_IT_IS_NOW` "
                        "goes on from its newest)")

    # ---------------------------------------------------------------------------- writing
    def save(self, step: int, arrays: dict[str, np.ndarray], meta: dict) -> Path:
        """Write ``ckpt-STEP.npz`` and make it the latest; prune all but the last ``keep``.

        Raises:
            UserError: the folder cannot be created or written (permissions, full disk); the
                previous checkpoint and pointer are left as they were; the run folder was
                removed or moved (:meth:`check_home`).
        """
        self.check_home(step)
        final = self.folder / f"ckpt-{step:06d}.npz"
        tmp = self.folder / f".{final.name}.tmp{os.getpid()}"
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "step": step,
                "bundle_sha256": self.bundle_sha, **meta}
        blob = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        placed = False
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            if self._home is None:  # (a folder this first save made: from now on)
                self._home = _identity(self.folder.parent)
            self.writer(tmp, {**arrays, _META: blob})
            entry = {"file": final.name, "sha256": file_sha256(tmp),
                     "bytes": tmp.stat().st_size, "step": step}
            os.replace(tmp, final)
            placed = True
            fsync_dir(self.folder)
            kept = [entry] + [e for e in self.entries() if e["file"] != final.name]
            kept = kept[:self.keep]
            self._write_pointer(kept)
        except OSError as exc:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass  # the folder itself is unusable; nothing was written
            self.check_home(step)  # (moved as this one was written: that is what to say)
            # the path that failed: the pointer, where that is what is in the way (a session-28
            # probe's folder named 'latest' was reported as the checkpoint failing)
            at = exc.filename2 or exc.filename
            where = f" ({at})" if at and Path(at).name != final.name else ""
            if placed and final.is_file() and not self.entries():  # (a session 35 probe: the
                # pointer failed, and the line said no checkpoint existed; with no readable
                # pointer a --resume finds the newest file; with one, the pointer's below)
                raise CheckpointWriteError(
                    f"cannot write the checkpoint pointer {self.folder / POINTER}: "
                    f"{exc.strerror or exc.__class__.__name__}",
                    f"the checkpoint {final} itself was written (a --resume finds it)",
                    "free space, then --resume" if exc.errno in (errno.ENOSPC,
                                                                         errno.EDQUOT)
                    else f"check what is in the way in '{self.folder}'") from None
            raise CheckpointWriteError(
                f"cannot write checkpoint {final}: {exc.strerror or exc.__class__.__name__}"
                f"{where}",
                self._last_good(final),
                "free space, then --resume" if exc.errno in (errno.ENOSPC, errno.EDQUOT)
                else f"check what is in the way in '{self.folder}' (a folder where a file "
                     "goes, permissions) or pass another --out") from None
        self._prune({e["file"] for e in kept})
        return final

    def _last_good(self, failed: Path) -> str:
        """Which checkpoint a failed write leaves to resume from: the pointer's newest that is
        a regular file, else the newest checkpoint file in the folder (a damaged pointer)."""
        for e in self.entries():
            q = self.folder / e["file"]
            if q != failed and q.is_file() and not q.is_symlink():
                return f"the last good checkpoint {q} is intact"
        try:
            files = sorted((q for q in self.folder.iterdir() if _NAME.match(q.name)
                            and q != failed and q.is_file() and not q.is_symlink()),
                           key=lambda q: _step_of(q.name), reverse=True)
        except OSError:
            files = []
        if files:
            return f"the newest checkpoint file is {files[0]} (the pointer does not name it)"
        return "no earlier checkpoint exists"

    def _write_pointer(self, entries: list[dict]) -> None:
        text = json.dumps({"format": FORMAT, "checkpoints": entries}, indent=1)
        atomic_write(self.folder / POINTER, lambda p: write_text(p, text))

    def _prune(self, keep: set[str]) -> None:
        for f in self.folder.iterdir():
            stale = (_NAME.match(f.name) and f.name not in keep) or ".tmp" in f.name
            if stale and (".tmp" in f.name or not bundle_in_use(f)):  # (a reader's hold_file)
                try:
                    f.unlink()
                except OSError:
                    pass  # pruning is best effort: a leftover file costs space, not correctness

    def entries(self) -> list[dict]:
        """The pointer's list (newest first), or [] when it is missing or unreadable."""
        return pointer_entries(self.folder)

    def damaged(self, exc: DamagedCheckpoint) -> UserError:
        """The one error for the loaded checkpoint's content (``exc``): names the file, and the
        way on (the checkpoint before it, or --overwrite)."""
        path = self.loaded
        step = int(_NAME.match(path.name)[1]) if path and _NAME.match(path.name) else None
        earlier = sorted((f.name for f in self.folder.iterdir() if _NAME.match(f.name)
                          and step is not None and _step_of(f.name) < step),
                         key=_step_of, reverse=True) if self.folder.is_dir() else []
        way = (f"delete it to resume from {self.folder / earlier[0]}, or pass --overwrite "
               "instead of --resume to start afresh" if earlier else
               "no earlier checkpoint exists: pass --overwrite instead of --resume to start "
               "afresh")
        return UserError(f"checkpoint {path} cannot be resumed: {exc} (damaged, or written by "
                         f"another version); {way}")

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
            entries = _by_step(self.folder)
            if not entries:
                return None
            if (self.folder / POINTER).exists():
                warn(f"checkpoint pointer {self.folder / POINTER} is unreadable; "
                      "using the newest checkpoint that loads")
            verified = False
        problems = []
        for e in entries:
            path = self.folder / e["file"]
            try:
                arrays, meta = _read(path, e.get("sha256"))
            # a damaged zip raises BadZipFile, zlib.error, EOFError, NotImplementedError, ...
            except Exception as exc:  # noqa: BLE001
                why = (str(exc).splitlines() or [""])[0][:200] or type(exc).__name__
                problems.append(f"{path.name}: {why}")
                if len(problems) <= SAID:  # (a probe's 20,000 bad files: 20,000 lines)
                    warn(f"checkpoint {path} is unusable ({why}); trying the previous one")
                continue
            if meta.get("bundle_sha256") not in self.bundle_ids:
                raise UserError(f"checkpoint {path} was written for another bundle (manifest "
                                f"sha256 {str(meta.get('bundle_sha256'))[:12]}…, this bundle "
                                f"{self.bundle_sha[:12]}…); resume with that bundle, or drop "
                                "--resume / pass another --out to start afresh")
            if len(problems) > SAID:
                warn(f"{len(problems) - SAID} more checkpoints were unusable")
            if problems or not verified:
                warn(f"resuming from {path} (step {meta['step']})")
            self.loaded = path
            return arrays, meta
        more = f"; {len(problems) - SAID} more" if len(problems) > SAID else ""
        raise UserError(f"no intact checkpoint in {self.folder}: "
                        f"{'; '.join(problems[:SAID])}{more}; pass --overwrite instead of "
                        "--resume to start afresh")


def _open_regular(path: Path) -> int:
    """An O_RDONLY descriptor of ``path``, which must be a regular file. O_NONBLOCK: opening a
    FIFO in its place would otherwise wait for a writer forever (it is refused instead);
    O_NOFOLLOW: a run's file is never read through a link (OSError ELOOP)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError(f"'{path}' is not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular(path: Path) -> bytes:
    """The bytes of ``path``, a regular file (a FIFO, device or folder raises ValueError)."""
    fd = _open_regular(path)
    with os.fdopen(fd, "rb") as f:
        return f.read()


def pointer_entries(folder: Path) -> list[dict]:
    """The ``latest`` pointer's list of ``folder`` (newest first), or [] when it is missing or
    unreadable."""
    try:
        data = json.loads(read_regular(Path(folder) / POINTER))
        entries = data["checkpoints"]
        # only checkpoint names of this folder: a pointer never leads outside it
        if not all(isinstance(e, dict) and isinstance(e.get("file"), str)
                   and _NAME.match(e["file"]) for e in entries):
            return []
        return entries
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return []


def newest_checkpoint(folder: Path) -> tuple[int, Path] | None:
    """(step, path) of the newest checkpoint the pointer of ``folder`` names and that exists."""
    for e in pointer_entries(folder):
        path = Path(folder) / e["file"]
        if path.is_file():
            return int(_NAME.match(e["file"])[1]), path
    return None


_SKIPPED_SAID: set[tuple[str, str]] = set()  # (folder, line) of the warnings newest_intact said


def _identity(folder: Path) -> tuple[int, int] | None:
    """(device, inode) of ``folder``; None where it does not exist."""
    try:
        st = os.stat(folder)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def newest_intact(folder: Path, after: int = -1) -> tuple[int, Path] | None:
    """(step, path) of the newest checkpoint in ``folder`` past step ``after`` that reads whole
    (zip CRCs; the pointer's SHA-256 where it names the file), each one that does not named in
    a warning: what ``eval`` and ``export-model`` use of a stopped run. Where the pointer is
    missing or unreadable, the ``ckpt-*.npz`` files by step, as a resume does (session 41
    probe: both said "a folder without params.npz or a checkpoint", or "re-export the bundle"
    of a damaged newest checkpoint, where ``--resume`` used the one before)."""
    skipped, found, missing = 0, None, []
    for _ in range(3):  # (a run going on may prune every entry read: its pointer again)
        try:
            entries = pointer_entries(folder)
            if not entries and (Path(folder) / POINTER).exists():  # (as a resume says it:
                _say_once(folder, f"checkpoint pointer {Path(folder) / POINTER} is unreadable "
                          "or names files outside its folder; using the newest checkpoint "
                          "that loads")  # a session 49 probe: skipped silently)
            entries = entries or _by_step(folder)
        except OSError:
            return None
        gone = 0
        for e in entries:
            path, step = Path(folder) / e["file"], _step_of(e["file"])
            if step <= after:
                break
            try:
                if not hold_file(path):  # (held from here until read: a run going on
                    raise FileNotFoundError(str(path))  # prunes it no more)
                _read(path, e.get("sha256"))
            except FileNotFoundError:  # (pruned by a run going on meanwhile, or never there)
                gone += 1
                missing.append(e["file"])
                continue
            except Exception as exc:  # noqa: BLE001  (as in Checkpointer.load)
                let_go(path)
                skipped += 1
                why = (str(exc).splitlines() or [""])[0][:200] or type(exc).__name__
                if skipped <= SAID:
                    _say_once(folder, f"checkpoint {path} is unusable ({why}); skipped")
                continue
            found = step, path
            break
        if found is not None or not gone or gone < len(entries):
            break
    if skipped > SAID:
        _say_once(folder, f"{skipped - SAID} more checkpoints were unusable")
    # a file the pointer names and that is not there: pruned by a run going on (which takes it
    # out of the pointer too), or lost; only the lost ones, still named, are said
    listed = {e["file"] for e in pointer_entries(folder)} if missing else set()
    lost = [n for n in dict.fromkeys(missing) if n in listed
            and (found is None or _step_of(n) > found[0])]
    for name in lost[:SAID]:
        _say_once(folder, f"checkpoint {Path(folder) / name}, named by the pointer, is missing; "
                  "skipped")
    return found


def _say_once(folder: Path, line: str) -> None:
    """``line`` as a warning, once a process (``eval RUN`` looks twice: session 47)."""
    if (str(folder), line) not in _SKIPPED_SAID:
        _SKIPPED_SAID.add((str(folder), line))
        warn(line)


def _by_step(folder: Path) -> list[dict]:
    """The ``ckpt-*.npz`` files of ``folder``, newest first, as pointer entries without a
    checksum (where the pointer is missing or unreadable)."""
    names = [f.name for f in Path(folder).iterdir() if _NAME.match(f.name)]
    return [{"file": n} for n in sorted(names, key=_step_of, reverse=True)]


def has_checkpoints(folder: Path) -> bool:
    """Whether ``folder`` holds a checkpoint a resume would try: one its pointer names, or any
    ``ckpt-*.npz`` (a resume scans them where the pointer is missing or unreadable)."""
    if newest_checkpoint(folder) is not None:
        return True
    try:
        return any(_NAME.match(f.name) for f in Path(folder).iterdir())
    except OSError:
        return False


def _read(path: Path, sha256: str | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """Arrays and metadata of one checkpoint file, checked against ``sha256`` when given.

    Raises:
        ValueError, OSError, zipfile.BadZipFile, ...: not a regular file, another checksum, not
            a readable version-1 checkpoint (its metadata not a JSON object with a step).
    """
    with os.fdopen(_open_regular(path), "rb") as f:
        if sha256 is not None and file_sha256(f.fileno()) != sha256:
            raise ValueError("SHA-256 differs from the pointer's (corrupt)")
        with zipfile.ZipFile(f) as zf:  # checkpoints are written stored (write_npz): a packed
            infos = zf.infolist()  # member could unpack past any budget
            packed = [i.filename for i in infos if i.compress_type != zipfile.ZIP_STORED]
            if packed:
                raise ValueError(f"its member '{packed[0][:40]}' is compressed, which "
                                 "checkpoints never are (damaged, or not written by this "
                                 "runtime)")
            # every member's zip CRC is checked now (read to its end, 1 MB at a time: a member
            # is never held whole here), so that a damaged file is found before anything is
            # restored; the arrays are read again, one at a time, when they are restored
            for info in infos:
                with zf.open(info) as m:
                    while m.read(1 << 20):
                        pass
            names = [i.filename[:-4] for i in infos if i.filename.endswith(".npy")]
            meta_info = next((i for i in infos if i.filename == _META + ".npy"), None)
            if meta_info is None:
                raise ValueError(f"no {_META} member: not a {FORMAT}")
            if meta_info.file_size > MAX_META_BYTES:
                raise ValueError(f"its metadata has {meta_info.file_size:,} bytes, more than a "
                                 f"checkpoint's can ({MAX_META_BYTES:,})")
        f.seek(0)
        with np.load(f, allow_pickle=False) as z:
            meta_blob = z[_META]
    arrays = _Members(path, [k for k in names if k != _META])
    meta = parse_meta(meta_blob.tobytes())
    del meta_blob
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"not a version-{FORMAT_VERSION} {FORMAT}")
    step = meta.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"its step is {describe(step)}, not a count")
    named = _NAME.match(path.name)
    if named is not None and int(named[1]) != step:  # ckpt-000030.npz holds step 30
        raise ValueError(f"its step {describe(step)} is not the {int(named[1])} of its name")
    return arrays, meta


class _Members(Mapping):
    """A checkpoint's arrays, each read from the file when it is asked for (and checked by its
    zip CRC again): a resume holds one array of the checkpoint at a time besides the run's own
    state, never the whole file (a 154 MB checkpoint of a large embedding table stayed
    resident through a resumed run and passed its budget). The file is opened without
    following links, as for the first read."""

    def __init__(self, path: Path, keys: list[str]) -> None:
        self.path, self.keys_ = path, keys

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self.keys_:
            raise KeyError(key)
        with os.fdopen(_open_regular(self.path), "rb") as f, \
                np.load(f, allow_pickle=False) as z:
            return z[key]

    def __contains__(self, key: object) -> bool:  # (Mapping's would read the member)
        return key in self.keys_

    def stream(self, key: str, shape: tuple[int, ...], dtype, block: int = 1 << 20):
        """The array ``key`` of exactly ``shape`` and ``dtype`` (C order), as consecutive 1-D
        pieces of about ``block`` bytes: checked and restored without holding it whole (a
        resume had held two 51 MB AdamW moments of an embedding table at once, and its finite
        check a third of that: 77 MB over a 400 MB budget, session 29 probe).

        Raises:
            DamagedCheckpoint: missing, another shape, dtype or order, cut short.
        """
        if key not in self.keys_:
            raise DamagedCheckpoint(f"array '{key}' is missing")
        dt = np.dtype(dtype)
        with os.fdopen(_open_regular(self.path), "rb") as f, zipfile.ZipFile(f) as zf, \
                zf.open(key + ".npy") as m:
            got, fortran, got_dt = _header(m, key)
            if got_dt != dt or tuple(got) != tuple(shape) or (fortran and len(shape) > 1):
                raise DamagedCheckpoint(f"array '{key}' is {got_dt} {list(got)}, expected "
                                        f"{dt} {list(shape)}")
            yield from _pieces(m, key, dt, math.prod(shape), max(1, block // max(1, dt.itemsize)))

    def chunks(self, key: str, dtype, rows: int = 1 << 16):
        """The 1-D array ``key`` of exactly ``dtype``, ``rows`` values at a time, never held
        whole (a forged 10^7-step run's losses).

        Raises:
            DamagedCheckpoint: missing, not 1-D of that dtype, cut short.
        """
        if key not in self.keys_:
            raise DamagedCheckpoint(f"array '{key}' is missing")
        with os.fdopen(_open_regular(self.path), "rb") as f, zipfile.ZipFile(f) as zf, \
                zf.open(key + ".npy") as m:
            shape, _, dt = _header(m, key)
            if dt != np.dtype(dtype) or len(shape) != 1:
                raise DamagedCheckpoint(f"array '{key}' is {dt} {list(shape)}, expected "
                                        f"{np.dtype(dtype)} [n]")
            yield from _pieces(m, key, dt, int(shape[0]), rows)

    def __iter__(self):
        return iter(self.keys_)

    def __len__(self) -> int:
        return len(self.keys_)


def _pieces(m, key: str, dt: np.dtype, left: int, rows: int):
    """The next ``left`` values of member ``m`` (past its header), ``rows`` at a time.

    Raises:
        DamagedCheckpoint: the member ends before them.
    """
    while left:
        n = min(rows, left)
        data = m.read(n * dt.itemsize)
        if len(data) != n * dt.itemsize:
            raise DamagedCheckpoint(f"array '{key}' is cut short")
        left -= n
        yield np.frombuffer(data, dt)


def _header(m, key: str):
    """(shape, fortran order, dtype) from the ``.npy`` header at the start of member ``m``.

    Raises:
        DamagedCheckpoint: no valid header.
    """
    fmt = np.lib.format
    try:
        version = fmt.read_magic(m)
        read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        return read(m)
    except ValueError as exc:
        raise DamagedCheckpoint(f"array '{key}' has no valid .npy header ({exc})") from None


def check_array(arrays, key: str, shape: tuple[int, ...], dtype, nonneg: str = "") -> None:
    """``arrays[key]`` as :func:`meta_array` checks it (and, with ``nonneg`` naming what it
    is, no negative value), a piece at a time where ``arrays`` is a checkpoint's members."""
    if not isinstance(arrays, _Members):
        pieces = [meta_array(arrays, key, shape, dtype).reshape(-1)]
    else:
        pieces = arrays.stream(key, shape, dtype)
    for piece in pieces:
        if piece.dtype.kind == "f" and not np.isfinite(piece).all():
            raise DamagedCheckpoint(f"array '{key}' holds NaN or inf values")
        if nonneg and (piece < 0).any():
            raise DamagedCheckpoint(f"array '{key}' ({nonneg}) holds negative values")


def restore_array(arrays, key: str, out: np.ndarray) -> None:
    """Copy the checked array ``arrays[key]`` into ``out`` (C-contiguous), a piece at a time
    where ``arrays`` is a checkpoint's members: nothing of its size is held besides ``out``."""
    if not isinstance(arrays, _Members) or not out.flags.c_contiguous:
        np.copyto(out, arrays[key])
        return
    flat, at = out.reshape(-1), 0
    for piece in arrays.stream(key, out.shape, out.dtype):
        flat[at:at + piece.size] = piece
        at += piece.size


# ------------------------------------------------------------------------- content checks
class CheckpointWriteError(UserError):
    """A checkpoint could not be written: ``what`` failed, ``last`` is what remains to resume
    from, ``way`` the way out (joined, the one-line message)."""

    def __init__(self, what: str, last: str, way: str) -> None:
        super().__init__(f"{what}; {last}; {way}")
        self.what, self.last, self.way = what, last, way


class DamagedCheckpoint(ValueError):
    """A checkpoint that reads back but cannot be this run's state: a missing or malformed
    value, an array of another shape or dtype, NaN or inf weights, a count out of range.
    Raised before anything is restored; ``run.train`` names the file (Checkpointer.damaged)."""


def describe(v) -> str:
    """A short repr of a metadata value, for an error message."""
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def _got(meta: dict, key: str) -> str:
    return describe(meta[key]) if key in meta else "missing"


def meta_dict(meta: dict, key: str, where: str) -> dict:
    """``meta[key]``, which must be a JSON object."""
    v = meta.get(key)
    if not isinstance(v, dict):
        raise DamagedCheckpoint(f"{where}.{key} is {_got(meta, key)}, expected an object")
    return v


def meta_int(meta: dict, key: str, where: str, lo: int = 0, hi: int | None = None,
             none_ok: bool = False, default=...) -> int | None:
    """``meta[key]``: an integer in [lo, hi] (None too with ``none_ok``; ``default`` when the
    key is absent, if given)."""
    if key not in meta and default is not ...:
        return default
    v = meta.get(key)
    if v is None and none_ok and key in meta:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
        want = f"from {lo} to {hi}" if hi is not None else f">= {lo}"
        raise DamagedCheckpoint(f"{where}.{key} is {_got(meta, key)}, expected an integer {want}")
    return v


def meta_float(meta: dict, key: str, where: str, lo: float = 0.0, hi: float | None = None,
               none_ok: bool = False) -> float | None:
    """``meta[key]``: a finite number in [lo, hi] (None too with ``none_ok``)."""
    v = meta.get(key)
    if v is None and none_ok and key in meta:
        return None
    if (isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v)
            or v < lo or (hi is not None and v > hi)):
        want = f"from {lo:g} to {hi:g}" if hi is not None else f">= {lo:g}"
        raise DamagedCheckpoint(f"{where}.{key} is {_got(meta, key)}, expected a finite number "
                                f"{want}")
    return float(v)


def meta_array(arrays: dict[str, np.ndarray], key: str, shape: tuple[int, ...],
               dtype) -> np.ndarray:
    """``arrays[key]``: exactly ``dtype`` and ``shape`` (what ``state`` writes: a cast could
    overflow to inf), with finite values when floating-point."""
    a = arrays.get(key)
    if a is None:
        raise DamagedCheckpoint(f"array '{key}' is missing")
    if a.dtype != np.dtype(dtype) or a.shape != tuple(shape):
        raise DamagedCheckpoint(f"array '{key}' is {a.dtype} {list(a.shape)}, expected "
                                f"{np.dtype(dtype)} {list(shape)}")
    if a.dtype.kind == "f" and not all_finite(a):
        raise DamagedCheckpoint(f"array '{key}' holds NaN or inf values")
    return a


# -------------------------------------------------------------------------------- signals
class TrainingInterrupted(BaseException):
    """Training stopped on SIGINT/SIGTERM after a checkpoint; ``exit_code`` is 128 + signal.
    ``abandoned``: the step after ``step`` did not finish in time and was dropped (the
    checkpoint is the last one written, which may be older than ``step``).

    A BaseException, as KeyboardInterrupt: a signal handler raises it wherever the run is, and
    no ``except Exception`` may read it as that code's own failure (an outside probe: SIGTERM
    while a resumed run loaded its graphs said "onnxruntime cannot load ...; re-export the
    bundle", exit 2, of a sound bundle)."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None,
                 abandoned: bool = False, grace_s: float | None = None) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.exit_code = 128 + signum
        where = (f"checkpoint {checkpoint}; continue with --resume" if checkpoint
                 else "no checkpoint" + ("" if abandoned else " (no --out)"))
        when = (f"during step {step + 1}, which was stopped and dropped (it did not finish "
                f"within {grace_s or StopSignals.GRACE_S:g} s of the signal, or a second signal "
                "came)"
                if abandoned else f"after step {step}")
        super().__init__(f"interrupted by {signal.Signals(signum).name} {when}; {where}")


class StartupInterrupted(SystemExit):
    """SIGINT/SIGTERM before training began (``run.RunFolder``): the run folder was put back as
    it was and one line said so; the process exits 128 + signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum


class StopSignals:
    """Context manager: SIGINT/SIGTERM/SIGHUP set ``signum`` instead of killing, so the loop can
    finish its step and checkpoint; a second signal interrupts at once. No-op off the main
    thread.

    A Python handler runs only once onnxruntime returns, so a step that runs on (a tampered
    graph, a much slower device) would hold the signal off for good: a watchdog thread reads
    the signals from a wakeup pipe as they arrive and, ``grace_s`` (``train --stop-grace``,
    default ``GRACE_S``) after the first or at the second, sets the terminate flag of the runs'
    RunOptions (``sessions.abort_runs``); the run in progress then fails and the trainer raises
    ``StepAbandoned``."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # (HUP: a closed ssh session)
    GRACE_S = 30.0

    def __init__(self, grace_s: float = GRACE_S) -> None:
        self.grace_s = grace_s
        self.signum: int | None = None
        self._old: dict[int, object] = {}
        self._pipe: tuple[int, int] | None = None
        self._old_fd = -1
        self._watch: threading.Thread | None = None

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            exc = KeyboardInterrupt()
            exc.signum = signum  # the exit code says which (a second SIGTERM had exited 130)
            raise exc
        self.signum = signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            from .sessions import abort_runs

            abort_runs(False)  # a run of this process stopped before: not now
            r, w = os.pipe()
            os.set_blocking(w, False)
            self._pipe = (r, w)
            self._watch = threading.Thread(target=self._watchdog, args=(r, abort_runs),
                                           name="signal-watchdog", daemon=True)
            try:
                self._watch.start()
            except RuntimeError:  # "can't start new thread": the process limit (ulimit -u)
                self._watch = None
                self.__exit__()
                raise UserError("cannot start a thread: this user's process and thread limit "
                                "(ulimit -u) is reached; raise it, or train with --threads 1 "
                                "and fewer other processes") from None
            try:
                for s in self.SIGNALS:
                    if s == signal.SIGHUP and signal.getsignal(s) is signal.SIG_IGN:
                        continue  # nohup: a hang-up is meant to leave the run going
                    self._old[s] = signal.signal(s, self._handle)
                self._old_fd = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
            except BaseException:
                self.__exit__()
                raise
        return self

    def _watchdog(self, r: int, abort: Callable[[], None]) -> None:
        timer, seen = None, 0
        try:
            while True:
                data = os.read(r, 64)
                if not data or 0 in data:  # __exit__: done
                    return
                seen += sum(1 for b in data if b in self.SIGNALS)
                if seen >= 2:
                    abort()
                elif seen == 1 and timer is None:
                    timer = threading.Timer(self.grace_s, abort)
                    timer.daemon = True
                    timer.start()
        finally:
            if timer is not None:
                timer.cancel()
                timer.join()

    def __exit__(self, *exc) -> None:
        # signals wait while the handlers are put back (one now would find them half restored,
        # a KeyboardInterrupt from _handle in the middle), then arrive at the restored ones
        blocked = self._pipe is not None and hasattr(signal, "pthread_sigmask")
        if blocked:
            signal.pthread_sigmask(signal.SIG_BLOCK, self.SIGNALS)
        try:
            if self._pipe is not None:
                signal.set_wakeup_fd(self._old_fd)
            for s, h in self._old.items():
                signal.signal(s, h)
            self._old.clear()
            if self._pipe is not None:
                r, w = self._pipe
                self._pipe = None
                try:
                    os.set_blocking(w, True)
                    os.write(w, b"\0")
                    if self._watch is not None:
                        self._watch.join(timeout=5)
                finally:
                    os.close(w)
                    os.close(r)
                from .sessions import abort_runs

                abort_runs(False)  # later runs of this process (an evaluation) go on
        finally:
            if blocked:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, self.SIGNALS)
