"""``.npz`` files as a data source, rows read in place (no memory map, no full load)."""

from __future__ import annotations

import io
import math
import os
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from contract import names
from contract.errors import UserError
from contract.manifest import LossSpec, TensorSpec

from .common import (
    _SAMPLE_ROWS,
    ABSURD,
    COMPRESSED_LOAD_LIMIT,
    MAX_LABELS,
    SQUARE_SAFE,
    Arrays,
    Problems,
    Source,
    _File,
    numbers_in_some_order,
)

FULL_CHECK_BYTES = 1 << 30  # an .npz whose rows take up to this is checked row by row at open

# ---------------------------------------------------------------------------- .npz
@dataclass
class _Member:
    """One array of an ``.npz``: where its rows lie in the file (``offset`` of the raw data of
    a stored, C-ordered member), or the array itself when it had to be loaded (a compressed or
    Fortran-ordered member, up to ``COMPRESSED_LOAD_LIMIT``)."""

    key: str
    shape: tuple[int, ...]
    dtype: np.dtype
    offset: int = -1
    array: np.ndarray | None = None

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize

    def rows(self, fd: int, idx: np.ndarray, where: str) -> np.ndarray:
        """A fresh array of rows ``idx``: one ``preadv`` straight into it per run of
        consecutive rows. Nothing is mapped, so no page of the file enters the RSS."""
        if self.array is not None:
            return self.array[idx]
        n = idx.shape[0]
        out = np.empty((n, *self.shape[1:]), self.dtype)
        rb = self.row_bytes
        if n == 0 or rb == 0:
            return out
        buf = out.reshape(n, -1).view(np.uint8)
        cut = np.flatnonzero(np.diff(idx) != 1) + 1
        for a, b in zip(np.r_[0, cut], np.r_[cut, n], strict=True):
            _preadv_exact(fd, buf[a:b], self.offset + int(idx[a]) * rb, where)
        return out


def _preadv_exact(fd: int, dest: np.ndarray, offset: int, where: str) -> None:
    mv = memoryview(dest).cast("B")
    while len(mv):
        got = os.preadv(fd, [mv], offset)
        if got <= 0:
            raise UserError(f"{where} is shorter than when it was opened; do not modify data "
                            "files during a run")
        mv, offset = mv[got:], offset + got


class _NpzFile:
    """An ``.npz`` read in place: for each uncompressed member (what ``np.savez`` writes) the
    zip's local header gives where the ``.npy`` header starts, and that header where the raw
    rows start; ``take`` reads rows from there with ``preadv``. (A memory map was measured to
    be worse: on Linux 6.x a fault on a file page maps its whole large folio, up to MBs, so 32
    random rows of a 63 MB file brought 60 MB into the RSS.)"""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise UserError(f"cannot read data file {path}: {exc.strerror}") from None
        if size == 0:
            raise UserError(f"data file {path} is empty (0 bytes); write it with "
                            "numpy.savez(path, x=inputs, y=labels)")
        self.file = _File(path)
        self.size = size
        try:
            zf = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as exc:
            raise UserError(f"data file {path} is not an .npz (zip) archive ({exc}); write it "
                            "with numpy.savez(path, x=inputs, y=labels)") from None
        with zf:
            infos = [i for i in zf.infolist() if i.filename.endswith(".npy")]
            if not infos:
                names = ", ".join(i.filename for i in zf.infolist()[:8]) or "nothing"
                raise UserError(f"data file {path} holds no arrays (no .npy members; it has "
                                f"{names}); write it with numpy.savez(path, x=inputs, y=labels)")
            self.members: dict[str, _Member] = {}
            self.loaded: list[str] = []
            for info in infos:
                m = self._member(zf, info)
                self.members[m.key] = m

    def _member(self, zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> _Member:
        key = info.filename[:-4]
        where = f"{self.path}: array '{key}'"
        if info.flag_bits & 0x1:
            raise UserError(f"{where} is encrypted; write the file with numpy.savez")
        if info.compress_type != zipfile.ZIP_STORED:
            if info.file_size > COMPRESSED_LOAD_LIMIT:
                raise UserError(f"{where} is compressed ({info.file_size / 1e6:.0f} MB unpacked) "
                                "and cannot be streamed; re-save the file with numpy.savez "
                                "(not savez_compressed)")
            try:
                with zf.open(info) as f:
                    arr = np.lib.format.read_array(f, allow_pickle=False)
            except ValueError as exc:
                raise UserError(_npy_error(where, exc)) from None
            except MemoryError:
                raise  # the machine's limit, said as such by the CLI, not a damaged file
            except Exception as exc:  # noqa: BLE001 - any decompressor's or parser's error
                raise UserError(f"{where} is unreadable ({type(exc).__name__}: "  # (LZMA, an
                                f"{str(exc)[:80]}); write the file again with "  # unknown
                                "numpy.savez") from None                         # method)
            self.loaded.append(key)
            return _Member(key, arr.shape, arr.dtype, array=arr)
        fd = self.file.fd
        local = os.pread(fd, 30, info.header_offset)
        if len(local) != 30 or local[:4] != b"PK\x03\x04":
            raise UserError(f"{where}: the zip archive is damaged (no local header); write the "
                            "file again with numpy.savez")
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        start = info.header_offset + 30 + name_len + extra_len
        buf = io.BytesIO(os.pread(fd, min(info.file_size, 1 << 16), start))
        try:
            shape, fortran, dtype = _npy_header(buf)
        except Exception as exc:  # noqa: BLE001 - an untrusted header: any parse error
            raise UserError(_npy_error(where, exc)) from None
        if dtype.hasobject:
            raise UserError(_npy_error(where, ValueError("Object arrays cannot be loaded")))
        nbytes = math.prod(shape) * dtype.itemsize  # Python ints: a huge shape cannot overflow
        data = start + buf.tell()
        if buf.tell() + nbytes > info.file_size or data + nbytes > self.size:
            raise UserError(f"{where} is truncated ({info.file_size} bytes hold less than its "
                            f"{list(shape)} {dtype}); write the file again")
        if fortran and len(shape) > 1:  # rows are not contiguous: load it, if small
            if nbytes > COMPRESSED_LOAD_LIMIT:
                raise UserError(f"{where} is stored in Fortran (column) order, {nbytes / 1e6:.0f}"
                                " MB, so its rows cannot be streamed; save "
                                "numpy.ascontiguousarray(array) instead")
            raw = np.empty(nbytes, np.uint8)
            _preadv_exact(fd, raw, data, where)
            self.loaded.append(key)
            arr = raw.view(dtype).reshape(shape, order="F")
            return _Member(key, tuple(shape), dtype, array=arr)
        return _Member(key, tuple(shape), dtype, offset=data)

    def close(self) -> None:
        self.file.close()


def _npy_header(buf: io.BytesIO) -> tuple[tuple[int, ...], bool, np.dtype]:
    """Shape, Fortran order and dtype of a .npy header, versions 1.0, 2.0 and 3.0 (3.0 is 2.0
    with a UTF-8 header, which numpy writes for non-Latin-1 field names; numpy has no public
    reader for it)."""
    version = np.lib.format.read_magic(buf)
    if version == (3, 0):
        size = struct.unpack("<I", buf.read(4))[0]
        header = buf.read(size)
        if len(header) != size:
            raise ValueError("the header is cut short")
        header = header.decode("utf-8").encode("latin-1", "replace")
        buf = io.BytesIO(b"\x93NUMPY\x02\x00" + struct.pack("<I", len(header)) + header)
        version = np.lib.format.read_magic(buf)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(buf)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(buf)
    else:
        raise ValueError(f".npy format version {version[0]}.{version[1]} is unknown")
    if any(not isinstance(d, int) or d < 0 for d in shape):
        raise ValueError(f"its shape {shape} is not a shape")
    return tuple(shape), fortran, dtype


def _npy_error(where: str, exc: Exception) -> str:
    if "bject arrays" in str(exc) or "allow_pickle" in str(exc):
        return (f"{where} holds Python objects (pickled), which are never loaded; save plain "
                "numeric arrays with numpy.savez")
    return f"{where} is not a valid .npy array ({str(exc)[:80]}); write the file with numpy.savez"


class NpzSource(Source):
    """Rows of an ``.npz``'s arrays, read in place per ``take`` (``preadv`` of just those rows
    of ``np.savez``'s uncompressed members; see :class:`_NpzFile`).

    Keys: one array per model input (named like the input, or ``x`` for a single-input model)
    and ``y``; ``<name>_test`` / ``x_test`` and ``y_test`` give a held-out split (``.test``).
    Dtypes and shapes are checked at open, values (finite, ``|x| <= 1e30``, integers that fit
    the model's dtype, labels in range) on a sample of rows at open and on every row ``take``
    returns. An optional 1-D string array ``class_names`` names the classes."""

    def __init__(self, npz: _NpzFile, x: dict[str, _Member], y: _Member,
                 inputs: list[TensorSpec], loss: LossSpec, name: str,
                 class_names: list[str] | None) -> None:
        self._npz = npz
        self.path = npz.path
        self.name = name
        self.x, self.y = x, y
        self.specs = {s.name: s for s in inputs}
        self.loss = loss
        self.out_dtypes = {s.name: np.dtype(s.dtype) for s in inputs}
        self.label_dtype = np.dtype(loss.labels.dtype)
        self.class_names = class_names
        self.problems = Problems(name)
        for m in [*x.values(), y]:
            if m.key in npz.loaded:
                self.problems.note("array read into memory whole (compressed or Fortran "
                                   "order; np.savez, uncompressed, lets rows be read from the "
                                   "file)", m.key)
        self._check_static()
        self._check_sample()

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def _where(self, name: str) -> str:
        m = self.y if name == "y" else self.x[name]
        return f"{self.path}: array '{m.key}'"

    def _check_static(self) -> None:
        n = self.y.shape[0] if self.y.ndim else -1
        if n <= 0:
            raise UserError(f"{self._where('y')} has no rows (shape {list(self.y.shape)}); the "
                            "labels need one row per example")
        for name, m in self.x.items():
            spec = self.specs[name]
            want = spec.sample_shape
            got = list(m.shape[1:])
            if m.ndim != len(spec.shape) or any(isinstance(w, int) and w != g
                                                for w, g in zip(want, got, strict=True)):
                # channels last (images [N, H, W, C], sensor series [N, T, C]): a transpose, a
                # reshape would scramble the values and train on them without an error
                last = len(got) >= 2 and got[-1:] + got[:-1] == want
                axes = ", ".join(map(str, [0, len(got), *range(1, len(got))]))
                ids = (self.out_dtypes[name].kind in "iu" and len(got) == len(want) == 1
                       and isinstance(want[0], int))  # token ids of another length
                fix = (f"it looks channels-last: save {m.key}.transpose({axes})" if last
                       else f"pad (or cut) every row to {want[0]} ids with the tokenizer's "
                       "padding id, or export the model again at this length" if ids
                       else "reshape the array (a transpose where its axes are in another "
                       "order) or re-export the model")
                raise UserError(f"{self._where(name)} has sample shape {got}; model input "
                                f"'{name}' expects {want} (batch first: {spec.shape}); {fix}")
            if m.shape[0] != n:
                raise UserError(f"{self._where(name)} has {m.shape[0]} rows but "
                                f"'{self.y.key}' has {n}; every array needs one row per "
                                "example")
            kind = self.out_dtypes[name].kind
            if m.dtype.kind not in ("fiub" if kind == "f" else "iub"):
                raise UserError(f"{self._where(name)} has dtype {m.dtype}; model input "
                                f"'{name}' is {spec.dtype}; save it as {spec.dtype}")
            if kind == "f" and m.dtype == np.uint8:  # raw pixels: trained at 0-255 silently
                self.problems.note(f"uint8 values fed to float input '{name}' as stored "
                                   "(0-255); divide by 255 first if the model expects [0, 1]",
                                   m.key)
        if self.loss.kind == "cross_entropy":
            want = self.loss.labels.shape  # ["N"], or ["N", L] for a class per token
            if (self.y.ndim != len(want) or self.y.dtype.kind not in "iu"
                    or any(isinstance(w, int) and w != d
                           for w, d in zip(want[1:], self.y.shape[1:], strict=True))):
                shape = ("1-D" if len(want) == 1 else f"[N, {', '.join(map(str, want[1:]))}]"
                         + (" (a class per token)" if len(want) == 2 else " (a class per pixel)"))
                fix = ""
                if len(want) == 1 and self.y.ndim == 2 and self.y.shape[1] == 1:
                    fix = "; save y.ravel()"
                elif self.y.ndim == len(want) and self.y.dtype.kind in "fb":
                    fix = "; save y.astype(int) (the class ids as integers)"
                elif (len(want) == 2 and self.y.ndim == 2
                      and self.y.shape[1] == self.loss.num_classes):
                    # a [N, C, L] output (a Conv1d tagger's) read as [N, L, C] at export: the
                    # labels were right, the export was not (session 28 probe)
                    fix = (f"; if the model's {want[1]} classes are on axis 1 of its output "
                           f"([N, C, L], as a Conv1d's), re-export it with --class-axis 1")
                elif (len(want) == 1 and self.y.ndim == 2
                      and self.y.shape[1] == self.loss.num_classes):  # (session 38 probe)
                    fix = "; if y is one-hot (or scores per class), save y.argmax(1)"
                elif self.y.dtype.kind in "USO":  # (a probe's string labels: no way out said)
                    fix = ("; save ids instead: names, y = np.unique(labels, "
                           "return_inverse=True) (the names in that order)")
                raise UserError(f"{self._where('y')} must be a {shape} integer array of class "
                                f"ids; got {self.y.dtype} shape {list(self.y.shape)}{fix}")
        else:
            want = self.loss.labels.sample_shape
            got = list(self.y.shape[1:])
            if self.y.ndim != len(self.loss.labels.shape) or any(
                    isinstance(w, int) and w != g for w, g in zip(want, got, strict=True)):
                raise UserError(f"{self._where('y')} has sample shape {got}; the model's targets "
                                f"are {want}: save y with shape {['N', *want]}")
            if self.y.dtype.kind not in ("fiub" if self.loss.kind == "bce" else "fiu"):
                raise UserError(f"{self._where('y')} has dtype {self.y.dtype}; targets must be "
                                "numbers")

    def _check_sample(self) -> None:
        """Every row, read 1 MB at a time, where the file's rows take at most
        ``FULL_CHECK_BYTES`` (a NaN in row 4000 of 5000 stopped a run at its 18th step, before
        its first checkpoint); in a larger file the first and last 64 rows and 256 random ones
        (seeded), and every batch is checked as it is read."""
        n = len(self)
        per_row = sum(m.row_bytes for m in self.x.values()) + self.y.row_bytes
        if n * per_row <= FULL_CHECK_BYTES:
            step = max(1, (1 << 20) // max(1, per_row))
            chunks = (np.arange(a, min(n, a + step)) for a in range(0, n, step))
        else:
            rng = np.random.default_rng(0)
            edge = np.r_[np.arange(min(n, 64)), np.arange(max(0, n - 64), n)]
            chunks = iter([np.unique(np.r_[edge, rng.integers(0, n, size=min(n, _SAMPLE_ROWS))])])
        try:
            for rows in chunks:
                self.take(rows)
        except UserError as exc:
            raise UserError(f"{exc} (found in the rows checked at open)") from None

    def _check_values(self, name: str, a: np.ndarray, idx: np.ndarray) -> None:
        """Finite and not absurd (floats), fitting the model's dtype (integers): min and max
        only, no temporaries but on the error path."""
        bound = self.specs[name].index_bound if name in self.specs else 0
        if bound and a.dtype.kind == "b":  # (a bool mask input is fine; ids are not bools)
            raise UserError(f"{self._where(name)} holds bools; model input '{name}' takes "
                            f"ids into a {bound}-row embedding table: store the ids as integers")
        if not a.size or a.dtype.kind == "b":
            return
        lo, hi = a.min(), a.max()
        where = self._where(name)
        out = self.out_dtypes.get(name, self.label_dtype) if name != "y" else self.label_dtype
        big = max(abs(float(lo)), abs(float(hi)))
        if a.dtype.kind == "f":
            if not (np.isfinite(lo) and np.isfinite(hi)):
                bad = idx[~np.isfinite(a.reshape(a.shape[0], -1)).all(axis=1)]
                more = f" and {bad.size - 1} more in this batch" if bad.size > 1 else ""
                raise UserError(f"{where} has NaN or inf values (row {int(bad[0])}{more}); "
                                "clean them (e.g. numpy.nan_to_num) or drop those rows")
            if big > ABSURD:
                flat = np.abs(a.reshape(a.shape[0], -1)).max(axis=1)
                row = int(idx[int(np.argmax(flat))])
                raise UserError(f"{where} has absurdly large values (|x| up to "
                                f"{float(flat.max()):.3g} in row {row}); scale the data or fix "
                                "the file")
        if out.kind == "f" and big > float(np.finfo(out).max):  # (an outside probe: float16
            flat = np.abs(a.reshape(a.shape[0], -1)).max(axis=1)  # input made inf, steps were
            row = int(idx[int(np.argmax(flat))])  # skipped, float32 blamed)
            raise UserError(f"{where} has |x| up to {big:.3g} (row {row}), beyond "
                            f"{float(np.finfo(out).max):g}, the largest value of the model's "
                            f"{out} input '{name}'; scale the data down, or export the model "
                            "with a float32 input")
        if bound and a.dtype.kind in "iu" and (int(lo) < 0 or int(hi) >= bound):
            v = int(lo) if int(lo) < 0 else int(hi)
            flat = a.reshape(a.shape[0], -1)  # the row holding the id named (an outside
            row = int(idx[int(np.argmax((flat == v).any(axis=1)))])  # probe: the first bad one)
            raise UserError(f"{where} has id {v} (row {row}); model input '{name}' indexes a "
                            f"{bound}-row embedding table, so ids must be 0 to {bound - 1}: "
                            "encode the data with the model's own tokenizer or vocabulary")
        if out.kind in "iu" and a.dtype.kind in "iu":
            info = np.iinfo(out)
            if int(lo) < info.min or int(hi) > info.max:
                raise UserError(f"{where} has values from {int(lo)} to {int(hi)}, which do not "
                                f"fit the model's {out}; fix the data")

    def _check_labels(self, y: np.ndarray, idx: np.ndarray) -> None:
        if not y.size:
            return
        if self.loss.kind == "cross_entropy":
            k = int(self.loss.num_classes or 0)
            if y.ndim > 1:  # per token: IGNORE_LABEL marks positions without a label
                y = np.where(y == names.IGNORE_LABEL, 0, y)
            lo, hi = int(y.min()), int(y.max())
            if lo < 0 or hi >= k:
                bad = idx[((y < 0) | (y >= k)).reshape(len(y), -1).any(axis=1)]
                raise UserError(f"{self._where('y')} has class id {lo if lo < 0 else hi} (row "
                                f"{int(bad[0])}); labels must be in [0, {k - 1}] for this "
                                f"{k}-class model" + (f" ({names.IGNORE_LABEL}: no label)"
                                                      if y.ndim > 1 else "")
                                + (f"; if they are numbered from 1 ({lo} to {hi} here), save "
                                   "y - 1" if lo == 1 and hi == k else ""))  # (session 38)
        else:
            self._check_values("y", y, idx)
            if self.loss.kind == "mse" and y.size and float(np.abs(y).max()) > SQUARE_SAFE:
                flat = np.abs(y.reshape(len(y), -1)).max(axis=1)
                raise UserError(f"{self._where('y')} has a target of {float(flat.max()):.3g} "
                                f"(row {int(idx[int(np.argmax(flat))])}): above 1e18 its square "
                                "passes float32 in the MSE loss; scale the targets down")
            if self.loss.kind == "bce" and y.dtype.kind != "b" and ((y < 0) | (y > 1)).any():
                bad = idx[((y < 0) | (y > 1)).reshape(len(y), -1).any(axis=1)]
                raise UserError(f"{self._where('y')} has a target outside [0, 1] (row "
                                f"{int(bad[0])}); binary cross-entropy (--loss bce) takes 0/1 "
                                "targets or probabilities")

    def take(self, idx: np.ndarray) -> tuple[Arrays, np.ndarray]:
        idx = self._rows(idx)
        f = self._npz.file
        f.check()
        x = {}
        for name, m in self.x.items():
            a = m.rows(f.fd, idx, self._where(name))
            self._check_values(name, a, idx)
            x[name] = np.ascontiguousarray(a, dtype=self.out_dtypes[name])
            del a
        return x, self._labels(f.fd, idx)

    def take_labels(self, idx: np.ndarray) -> np.ndarray:
        idx = self._rows(idx)
        f = self._npz.file
        f.check()
        return self._labels(f.fd, idx)

    def _labels(self, fd: int, idx: np.ndarray) -> np.ndarray:
        y = self.y.rows(fd, idx, self._where("y"))
        self._check_labels(y, idx)
        return np.ascontiguousarray(y, dtype=self.label_dtype)

    def bytes_per_sample(self) -> int:
        total = 0
        for name, m in [*self.x.items(), ("y", self.y)]:
            out = self.label_dtype if name == "y" else self.out_dtypes[name]
            total += m.row_bytes  # the rows read (or fancy-indexed from a loaded array)
            if out != m.dtype:
                total += m.row_bytes // m.dtype.itemsize * out.itemsize  # the cast
        return total + 8

    def close(self) -> None:
        self._npz.close()


def open_npz(path: str | Path, inputs: list[TensorSpec], loss: LossSpec, *,
             class_names: list[str] | None = None) -> NpzSource:
    """An ``.npz`` source read in place; its ``.test`` is the ``_test`` split when it has one.

    Raises:
        UserError: empty, not a zip, no arrays, pickled members, compressed or Fortran-ordered
            members over 16 MB, a missing array, bad dtypes, shapes, values or labels.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data file '{path}' not found")
    npz = _NpzFile(path)
    arrays = npz.members
    names = [s.name for s in inputs]
    have = ", ".join(sorted(arrays))

    def key_for(name: str, suffix: str) -> str | None:
        if name + suffix in arrays:
            return name + suffix
        if len(names) == 1 and "x" + suffix in arrays:
            return "x" + suffix
        return None

    keys = {}
    for n in names:
        k = key_for(n, "")
        if k is None:
            want = f"'{n}'" + (" (or 'x')" if len(names) == 1 and n != "x" else "")
            near = next((a for a in arrays if a.lower() == n.lower() or (
                len(names) == 1 and a.lower() == "x")), None)  # ('X': a session 43 probe)
            raise UserError(f"data file {path} lacks array {want} for model input '{n}'; it "
                            f"has: {have}; " + (f"save '{near}' under the name '{n}'" if near
                                                else f"save the inputs under the name '{n}'" + (
                                                    f" (np.savez(..., {n}=inputs, y=labels))"
                                                    if n.isidentifier() else "")))
        keys[n] = k
    if "y" not in arrays:
        alias = next((k for k in ("labels", "label", "targets", "target") if k in arrays), None)
        raise UserError(f"data file {path} has no 'y' array (labels); it has: {have}; "
                        + (f"save '{alias}' under the name 'y'" if alias else
                           "save the labels under the name 'y' (np.savez(..., y=labels))"))
    test_keys = {n: key_for(n, "_test") for n in names}
    test_y = "y_test" if "y_test" in arrays else None
    present = [k for k in [*test_keys.values(), test_y] if k is not None]
    if present and len(present) != len(names) + 1:
        missing = [f"'{n}_test'" for n, k in test_keys.items() if k is None]
        missing += [] if test_y else ["'y_test'"]
        raise UserError(f"data file {path} has {', '.join(repr(k) for k in present)} but not "
                        f"{', '.join(missing)}; a held-out split needs both its inputs and its "
                        "labels (add the missing arrays or remove the _test ones)")
    if "class_names" not in arrays and numbers_in_some_order(class_names):  # (session 49:
        class_names = None  # "9".."0": the numbers are names, as data.relabelled reads them)
    if "class_names" in arrays:  # its own names (a given map renumbers them: data.relabelled)
        cn = arrays["class_names"]
        if cn.ndim != 1 or cn.dtype.kind not in "US" or cn.shape[0] > MAX_LABELS:
            raise UserError(f"{path}: array 'class_names' must be a 1-D array of at most "
                            f"{MAX_LABELS:,} strings (numpy.array(['cat', 'dog']))")
        arr = cn.rows(npz.file.fd, np.arange(cn.shape[0]), f"{path}: array 'class_names'")
        class_names = [str(c) for c in arr.tolist()]
        k = loss.num_classes
        if loss.kind == "cross_entropy" and k is not None and len(class_names) != k:
            raise UserError(f"{path}: array 'class_names' has {len(class_names)} names for a "
                            f"{k}-class model; fix it or remove it")
    train = NpzSource(npz, {n: arrays[keys[n]] for n in names}, arrays["y"], inputs, loss,
                      path.name, class_names)
    read = {*keys.values(), "y", *present, "class_names"}
    for k in sorted(set(arrays) - read):  # (session 41 probe: x_val / y_val, unsaid)
        train.problems.note("array not read (only the inputs' arrays or 'x', 'y', their "
                            "'_test' pairs and 'class_names' are; a held-out split is "
                            "'x_test'/'y_test')", k)
    if present:
        train.test = NpzSource(npz, {n: arrays[test_keys[n]] for n in names}, arrays["y_test"],
                               inputs, loss, path.name + ":test", class_names)
    return train
