"""Shared parts of the data sources: the problems report, the ``Source`` interface, index-subset
views and splits, and careful file reads (label maps: labels.py)."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from contract.errors import UserError

Arrays = dict[str, np.ndarray]

TEXT_SUFFIXES = {".csv": ",", ".tsv": "\t", ".jsonl": None, ".ndjson": None}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
MAX_RECORD_BYTES = 1 << 20  # a longer text record is a bad row (it bounds take's transients)
MAX_LABELS = 10_000  # more distinct values than this (and than the model's classes): not labels
MAX_IMAGE_PIXELS = 40_000_000  # a larger image is a bad row (decoding it would cost > 160 MB)
CHARS_PER_TOKEN = 64  # texts are cut to 64 x seq_len characters before tokenising
ABSURD = 1e30  # |value| above this in an .npz input is an error, not data
# |target| above this under MSE: its square, summed over a batch, passes float32 (every batch
# holding the row is skipped as non-finite; session 31 probe: a CSV target of 2e19)
SQUARE_SAFE = 1e18
COMPRESSED_LOAD_LIMIT = 16 << 20  # a compressed .npz member up to this size is loaded whole
_EXAMPLES = 3  # examples kept per reason
_SAMPLE_ROWS = 256  # rows of an .npz checked at open time



# ---------------------------------------------------------------------------- problems report
@dataclass
class Problems:
    """Bad rows by reason (``counts``), files or lines that are not rows (``ignored``, e.g.
    hidden files, blank lines), and up to three examples of each (``"line 17"``,
    ``"cat/x.png (OSError: ...)"``)."""

    source: str
    counts: dict[str, int] = field(default_factory=dict)
    ignored: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    noted: dict[str, int] = field(default_factory=dict)  # used as they are, worth knowing
    hints: list[str] = field(default_factory=list)  # how to keep the rows skipped

    def bad(self, reason: str, where: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        self._example(reason, where)

    def ignore(self, reason: str, where: str) -> None:
        self.ignored[reason] = self.ignored.get(reason, 0) + 1
        self._example(reason, where)

    def note(self, what: str, where: str) -> None:
        self.noted[what] = self.noted.get(what, 0) + 1
        self._example(what, where)

    def _example(self, reason: str, where: str) -> None:
        ex = self.examples.setdefault(reason, [])
        if len(ex) < _EXAMPLES:
            ex.append(where)

    @property
    def total(self) -> int:
        """Number of bad rows."""
        return sum(self.counts.values())

    def _part(self, counts: dict[str, int]) -> str:
        return "; ".join(f"{n:,} {reason} ({', '.join(self.examples.get(reason, []))}"
                         f"{', ...' if n > len(self.examples.get(reason, [])) else ''})"
                         for reason, n in sorted(counts.items(), key=lambda kv: -kv[1]))

    def summary(self) -> str | None:
        """One line for the user, or None when there is nothing to report."""
        parts = []
        if self.counts:
            parts.append(f"{self.total:,} bad row{'s' if self.total != 1 else ''} skipped: "
                         + self._part(self.counts))
        if self.ignored:
            n = sum(self.ignored.values())
            parts.append(f"{n:,} ignored: " + self._part(self.ignored))
        if self.noted:  # (counted where they occur: an array, not each value; session 38)
            parts.append("note: " + "; ".join(
                f"{reason} ({', '.join(self.examples[reason])}"
                f"{', ...' if n > len(self.examples[reason]) else ''})"
                for reason, n in self.noted.items()))
        parts += self.hints
        return f"{self.source}: " + " | ".join(parts) if parts else None

    def as_dict(self) -> dict:
        """JSON-ready (for metrics.jsonl / summary.json)."""
        return {"source": self.source, "bad_rows": self.total, "counts": dict(self.counts),
                "ignored": dict(self.ignored), "noted": dict(self.noted),
                "examples": {k: list(v) for k, v in self.examples.items()}}


# ---------------------------------------------------------------------------- the interface
class Source:
    """A dataset the trainer reads one micro-batch at a time.

    ``take(idx)`` returns ``({input name: array}, labels)`` for exactly those rows, with the
    bundle's names, dtypes and shapes. ``test`` is the held-out split (a source or None).
    ``bytes_fixed() + n * bytes_per_sample()`` bounds the memory ``take`` of ``n`` rows
    allocates. ``release()`` is there for sources that map files (none does: all read with
    ``pread``, so a batch leaves nothing of the file resident).
    """

    name: str = ""
    class_names: list[str] | None = None
    problems: Problems
    test: Source | None = None

    def __len__(self) -> int:
        raise NotImplementedError

    def take(self, idx: np.ndarray) -> tuple[Arrays, np.ndarray]:
        raise NotImplementedError

    def take_labels(self, idx: np.ndarray) -> np.ndarray:
        """The labels of those rows alone (the trainer weighs micro-batches by labelled tokens);
        sources that can read them without the inputs do."""
        return self.take(idx)[1]

    def bytes_per_sample(self) -> int:
        """Upper bound of the bytes ``take`` holds per row at its peak (rows read, outputs,
        casts): these grow with the micro-batch."""
        raise NotImplementedError

    def bytes_fixed(self) -> int:
        """Upper bound of the transient bytes of ``take`` that do not grow with the number of
        rows (the one record or image being decoded; rows are decoded one at a time)."""
        return 0

    def take_bytes(self, n: int) -> int:
        """Upper bound of what ``take`` of ``n`` rows allocates."""
        return self.bytes_fixed() + n * self.bytes_per_sample()

    def release(self) -> None:
        """Drop mapped file pages from this process's RSS (a no-op: no source maps its file)."""

    def close(self) -> None:
        """Close the file descriptors and maps (the source is unusable afterwards)."""

    def describe(self) -> str:
        """One line: rows, classes, bad rows."""
        n = len(self)
        s = f"{self.name}: {n:,} row{'s' if n != 1 else ''}"
        if self.class_names is not None:
            names = ", ".join(self.class_names[:8]) + (", ..." if len(self.class_names) > 8
                                                        else "")
            s += f", {len(self.class_names)} classes ({names})"
        bad = self.problems.total
        if bad:
            s += f", {bad:,} bad row{'s' if bad != 1 else ''} skipped"
        if self.problems.ignored:
            n = sum(self.problems.ignored.values())
            s += f", {n:,} entr{'y' if n == 1 else 'ies'} ignored"
        return s

    def _rows(self, idx: np.ndarray) -> np.ndarray:
        idx = np.asarray(idx).reshape(-1)
        if idx.dtype.kind not in "iu":
            raise TypeError(f"row indexes must be integers, got {idx.dtype}")
        idx = idx.astype(np.int64, copy=False)
        n = len(self)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise IndexError(f"row index out of range for {self.name} ({n} rows)")
        return idx


class SourceView(Source):
    """A subset of another source's rows (no copy): a train or validation split."""

    def __init__(self, base: Source, rows: np.ndarray, name: str) -> None:
        self.base = base
        self.rows = rows if isinstance(rows, np.ndarray) and rows.dtype in (np.int32, np.int64) \
            else np.asarray(rows, np.int64)
        self.name = name
        self.class_names = base.class_names
        self.problems = base.problems
        self.test = None

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    def take(self, idx: np.ndarray) -> tuple[Arrays, np.ndarray]:
        return self.base.take(self._base_rows(idx))

    def take_labels(self, idx: np.ndarray) -> np.ndarray:
        return self.base.take_labels(self._base_rows(idx))

    def _base_rows(self, idx: np.ndarray) -> np.ndarray:
        """The base's rows of ``idx`` as int64 (``rows`` may be kept as int32: ``split``)."""
        return self.rows[self._rows(idx)].astype(np.int64, copy=False)

    def bytes_per_sample(self) -> int:
        return self.base.bytes_per_sample()

    def bytes_fixed(self) -> int:
        return self.base.bytes_fixed()

    @property
    def largest_image(self) -> str | None:
        return getattr(self.base, "largest_image", None)

    def release(self) -> None:
        self.base.release()

    def close(self) -> None:
        self.base.close()


def numbers_in_some_order(names: list[str] | None) -> bool:
    """Whether a label map is the numbers 0..K-1 in another order ("9".."0"): numbered labels
    read against it are those names (``data.relabelled``), not places in it."""
    ids = [str(i) for i in range(len(names or []))]
    return names is not None and list(map(str, names)) != ids and sorted(map(str, names)) == \
        sorted(ids)


def split(source: Source, val_fraction: float, seed: int = 0) -> tuple[SourceView, SourceView]:
    """Train and validation views of ``source``: a seeded permutation (the same file, fraction
    and seed always give the same split), each side in file order. No rows are copied.

    Raises:
        UserError: a fraction outside (0, 1), or too few rows for both sides.
    """
    if not (isinstance(val_fraction, int | float) and 0.0 < float(val_fraction) < 1.0):
        raise UserError(f"--val-split must be a fraction between 0 and 1 (e.g. 0.1), got "
                        f"{val_fraction!r}")
    n = len(source)
    n_val = min(n - 1, max(1, int(round(n * float(val_fraction)))))
    if n < 2:
        raise UserError(f"{source.name} has {n} usable row(s): too few to hold some out with "
                        "--val-split; add data or pass --val FILE")
    # the rows of np.random.default_rng(seed).permutation(n) (shuffled in place: the same
    # order for any integer type), each side in file order; about 5 bytes a row at the most,
    # and the views' indices 4 (session 42 probe: permutation, two sorted copies and int64
    # views, 16 bytes a row, took 10 million rows to 239 MB before any budget was planned)
    kind = np.int32 if n < 2**31 else np.int64
    perm = np.arange(n, dtype=kind)
    np.random.default_rng(seed).shuffle(perm)
    held = np.zeros(n, np.bool_)
    held[perm[:n_val]] = True
    del perm
    train, val = _rows_where(~held, n - n_val, kind), _rows_where(held, n_val, kind)
    return (SourceView(source, train, f"{source.name}:train"),
            SourceView(source, val, f"{source.name}:val"))


def _rows_where(mask: np.ndarray, count: int, kind) -> np.ndarray:
    """``np.flatnonzero(mask)`` as ``kind``, built in chunks: no int64 copy of all of it."""
    out = np.empty(count, kind)
    at, chunk = 0, 1 << 16
    for a in range(0, mask.size, chunk):
        rows = np.flatnonzero(mask[a:a + chunk])
        out[at:at + rows.size] = rows + a
        at += rows.size
    return out


def _nothing_usable(where: str, problems: Problems, rows: int, hint: str) -> UserError:
    detail = problems.summary() or f"{where}: no rows"
    detail = detail.split(": ", 1)[1] if ": " in detail else detail
    return UserError(f"nothing usable in {where}: {rows:,} row(s), none usable ({detail}); "
                     f"{hint}")


def _pread_exact(fd: int, n: int, offset: int, where: str) -> bytes:
    out = os.pread(fd, n, offset)
    while len(out) < n:
        more = os.pread(fd, n - len(out), offset + len(out))
        if not more:
            raise UserError(f"{where} changed while training (bytes {offset}..{offset + n} are "
                            "gone); do not modify data files during a run")
        out += more
    return out


class _File:
    """An open data file with its identity, to notice a file replaced or edited mid-run."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO must not block
        except OSError as exc:
            raise UserError(f"cannot open data file {path}: {exc.strerror}") from None
        st = os.fstat(self.fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(self.fd)
            self.fd = -1
            raise UserError(f"data file {path} is not a regular file (a FIFO, socket or device); "
                            "pass a file")
        self.stamp = (st.st_size, st.st_mtime_ns, st.st_ino)

    def check(self) -> None:
        st = os.fstat(self.fd)
        if (st.st_size, st.st_mtime_ns, st.st_ino) != self.stamp:
            raise UserError(f"{self.path} changed while training (size or time differs from "
                            "when it was indexed); do not modify data files during a run")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self) -> None:
        if getattr(self, "fd", -1) >= 0:
            os.close(self.fd)


