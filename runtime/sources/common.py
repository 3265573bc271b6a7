"""Shared parts of the data sources: the problems report, the ``Source`` interface, index-subset
views and splits, label maps, and careful file reads."""

from __future__ import annotations

import array
import math
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from contract.errors import UserError

from .text_hints import shown_label

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


# ---------------------------------------------------------------------------- labels
_INT = re.compile(r"^[+-]?\d{1,18}$")
_WHOLE_FLOAT = re.compile(r"[+-]?\d{1,18}\.0*", re.ASCII)  # 1.0, 2., -3.00


def _whole(raw: str) -> str:
    """'1.0' -> '1', '-3.00' -> '-3' (by the text: no float rounding of long numbers)."""
    return str(int(raw.split(".", 1)[0]))


class _Labels:
    """Builds the label map during an index pass: provisional ids by first sight, remapped to
    the stable order in :meth:`finish`; or ids from a given ``class_names`` list."""

    def __init__(self, where: str, column: str, class_names: list[str] | None,
                 num_classes: int | None, regression: bool, unit: bool = False,
                 problems: Problems | None = None) -> None:
        self.where, self.column, self.problems = where, column, problems
        self.unit = unit  # targets of a binary cross-entropy: in [0, 1]
        self.num_classes, self.regression = num_classes, regression
        self.given: dict[str, int] | None = None
        if class_names is not None and not regression:
            if num_classes is not None and len(class_names) != num_classes:
                raise UserError(f"{len(class_names)} class names were given for a "
                                f"{num_classes}-class model; the label map must have exactly "
                                f"{num_classes} names")
            self.given = {str(c): i for i, c in enumerate(class_names)}
            self.given_whole = {_whole(c): i for c, i in self.given.items()
                                if _WHOLE_FLOAT.fullmatch(c)}
            self.given_names = [str(c) for c in class_names]
        self.seen: dict[str, int] = {}
        self.skipped: list[str] = []  # class folders left out (no images): named in errors
        self.forms: dict[str, set[str]] = {}  # '1' -> {'1.0', '1.00'}: whole floats read as 1
        self._wholes: dict[str, str] = {}  # '1.0' -> '1', once parsed
        self.plain: set[str] = set()  # labels seen as written (beside forms: '1' and '1.0')
        self.unknown: dict[str, int] = {}  # labels not among the given names (a few hundred)
        self.ids = array.array("f" if regression else "i")

    def add(self, raw: str) -> str | None:
        """Append the id of label ``raw`` (already stripped); returns a bad-row reason or None."""
        if self.regression:
            if self.unit and raw.lower() in ("true", "false"):  # (JSON's true/false: yes / no)
                raw = "1" if raw.lower() == "true" else "0"
            if not _PLAIN_NUMBER.fullmatch(raw):  # float() also takes 1_000 and full-width digits
                return "label is not a number"
            v = float(raw)
            if not math.isfinite(v) or abs(v) > ABSURD:
                return "label is not finite"
            if self.unit and not 0.0 <= v <= 1.0:
                return "label is outside [0, 1] (binary cross-entropy)"
            if abs(v) > SQUARE_SAFE:
                return "label is above 1e18 (its square passes float32 in the loss: scale down)"
            self.ids.append(v)
            return None
        if self.given is not None:
            i = self.given.get(raw)
            if i is None and _WHOLE_FLOAT.fullmatch(raw):
                i = self.given.get(_whole(raw))
            if i is None and _INT.match(raw):
                i = self.given.get(str(int(raw)))
                if i is None:  # class names written 0.0, 1.0 (a float column) and data 0, 1
                    i = self.given_whole.get(str(int(raw)))
            if i is None:
                if raw in self.unknown or len(self.unknown) < 256:
                    self.unknown[raw] = self.unknown.get(raw, 0) + 1
                return "unknown label"
            self.ids.append(i)
            return None
        whole = self._wholes.get(raw)  # 1.0 is the label 1 (as in JSON), not a class of its own
        if whole is None and _WHOLE_FLOAT.fullmatch(raw):
            whole = _whole(raw)
            if len(self._wholes) < 4096:  # (a label's spellings are few; rows are many)
                self._wholes[raw] = whole
            forms = self.forms.setdefault(whole, set())
            if len(forms) < 4:  # (named in the note: a few suffice)
                forms.add(raw)
        if whole is not None:
            raw = whole
        elif self.forms:
            self.plain.add(raw)
        i = self.seen.get(raw)
        if i is None:
            if raw not in self.forms:  # (a first sight before any whole float was)
                self.plain.add(raw)
            if len(self.seen) >= max(MAX_LABELS, self.num_classes or 0):
                if self.num_classes is not None and self.num_classes >= MAX_LABELS:
                    raise UserError(f"{self.where}: {self.column} has more than "
                                    f"{self.num_classes:,} distinct labels but the model has "
                                    f"{self.num_classes:,} classes; pass the right column with "
                                    "--label-column or use data of those classes")
                raise UserError(f"{self.where}: {self.column} has more than {MAX_LABELS:,} "
                                "distinct values, so it does not hold class labels; pass the "
                                "right column with --label-column")
            i = self.seen[raw] = len(self.seen)
        self.ids.append(i)
        return None

    def declare(self, raw: str) -> None:
        """A class that exists even without rows (an empty class folder), read as ``add``
        reads it (a folder '1.0' beside '1' had made an empty class '1.0' of its own)."""
        if _WHOLE_FLOAT.fullmatch(raw):
            raw = _whole(raw)
        if self.given is None and not self.regression and raw not in self.seen:
            self.seen[raw] = len(self.seen)

    def finish(self) -> tuple[np.ndarray, list[str] | None]:
        """(label per row, class names): int32 ids, or float32 targets for regression."""
        if self.regression:
            return np.frombuffer(self.ids, np.float32), None
        ids = np.frombuffer(self.ids, np.int32)
        if self.given is not None:
            self._hint_misspelt(ids)
            return ids, list(self.given_names)
        keys = list(self.seen)
        k = self.num_classes
        if keys and all(_INT.match(s) for s in keys):
            values = [int(s) for s in keys]
            self._note_spellings(keys, values)
            if k is not None and all(0 <= v < k for v in values):
                names = [str(i) for i in range(k)]  # an integer label is its own class id
                remap = np.asarray(values, np.int32)
            else:
                uniq = sorted(set(values))
                pos = {v: i for i, v in enumerate(uniq)}
                names = [str(v) for v in uniq]
                remap = np.asarray([pos[v] for v in values], np.int32)
        else:
            names = sorted(keys)
            pos = {s: i for i, s in enumerate(names)}
            remap = np.asarray([pos[s] for s in keys], np.int32)
        if k is not None and len(names) != k:
            shown = ", ".join(shown_label(n) for n in names[:6]) + (", ..." if len(names) > 6
                                                                else "")
            if self.skipped:  # (session 43 probe: an empty class folder went unnamed here)
                shown += ("; left out, holding no PNG/JPEG files: "
                          + ", ".join(shown_label(n) for n in self.skipped[:6]))
            has = "have" if self.column.endswith("folders") else "has"
            if len(names) > k and ids.size >= 20 and 2 * len(names) > ids.size and has == "has":
                raise UserError(f"{self.where}: {self.column} has {len(names)} distinct values "
                                f"in {ids.size} rows ({shown}), not labels of {k} classes; is "
                                "it the label column? pass the right one with --label-column")
            raise UserError(f"{self.where}: {self.column} {has} {len(names)} distinct labels "
                            f"({shown}) but the model has {k} classes; use data with {k} "
                            f"classes, or name all {k} at export (export --classes A,B,...) "
                            "so that data holding some of them fits")
        return (remap[ids] if ids.size else ids), names


    def _hint_misspelt(self, ids: np.ndarray) -> None:
        """Unknown labels that look like a class no row holds (another case, a typo: a class
        folder `dgo` of the class `dog`) are named with it (session 39: half the data was
        skipped with only "unknown label 'dgo'" and the run trained one class)."""
        if not self.unknown or self.problems is None:
            return
        import difflib

        held = set(np.unique(ids).tolist()) if ids.size else set()
        missing = {n.lower(): n for i, n in enumerate(self.given_names) if i not in held}
        cased = {n.lower(): n for n in self.given_names}  # (another case of any class: 'RED'
        pairs = []  # on every other row of a --classes red run, a probe in session 43)
        for raw in sorted(self.unknown, key=lambda r: -self.unknown[r]):
            if raw.lower() in cased:
                pairs.append(f"{raw!r} may be {cased[raw.lower()]!r}")
                missing.pop(raw.lower(), None)
                continue
            near = [] if (len(raw) < 3 or raw.lstrip("+-").isdigit()) else (  # ('-1' is no
                difflib.get_close_matches(raw.lower(), list(missing), n=1, cutoff=0.6))  # typo
            if near:  # of '1': a review)
                pairs.append(f"{raw!r} may be {missing.pop(near[0])!r}")
        if pairs:
            shown = ", ".join(pairs[:4]) + (", ..." if len(pairs) > 4 else "")
            self.problems.hints.append(f"{shown}: labels must match the class names exactly; "
                                       "rename them to keep those rows")

    def _note_spellings(self, keys: list[str], values: list[int]) -> None:
        """Labels that are one number written in different ways (01 and 1, 007 and 7) are one
        class, the number (an integer label is its own class id): said, naming them (session
        31 probe: class folders 0 1 01 2 trained as 3 classes without a word)."""
        spellings: dict[int, list[str]] = {}
        for s, v in zip(keys, values, strict=True):  # (1.0 beside 1: a probe, session 43)
            forms = sorted(self.forms.get(s, ()))
            spellings.setdefault(v, []).extend(([s] if s in self.plain or not forms else [])
                                               + forms)
        for v, written in sorted(spellings.items()):
            if len(written) > 1 and self.problems is not None:
                self.problems.note("number(s) written in different ways and read as one class, "
                                   "the number: name them as text (e.g. c01) to keep them apart",
                                   " and ".join(sorted(written)) + f" as {v}")


def _label_text(value: object) -> str | None:
    """A JSON label as the string it names, or None when it is not a usable scalar."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value.is_integer():
            return str(int(value))
        return repr(value) if math.isfinite(value) else None
    if isinstance(value, str):
        return value.strip()
    return None


# a decimal number as written in data files: 12, -0.5, 1e-3, .5, inf/nan (refused as not finite)
_PLAIN_NUMBER = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"
                           r"|[+-]?(?:inf|infinity|nan)", re.IGNORECASE | re.ASCII)


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


