"""File helpers both sides share: hashing, atomic writes, and opening bundle files safely.

Bundle files are opened only through :func:`open_listed`: the name must be a plain file name
listed in the manifest, the file is opened with ``O_NOFOLLOW`` relative to the bundle folder (a
symlink is refused, wherever it points), it must be a regular file, and its size and SHA-256 must
match the manifest before anything else reads it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import stat
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .errors import ManifestError
from .schema import is_safe_filename

__all__ = ["atomic_write", "bundle_in_use", "deferred_signals", "drop_dead_staging", "file_sha256",
           "fsync_dir", "hold_bundle", "json_text", "release_bundles",
           "open_listed", "read_listed", "read_npz", "refuse_special", "write_npz", "write_text"]

_BLOCK = 1 << 20


def file_sha256(path: str | os.PathLike | int) -> str:
    """SHA-256 of a file (a path or an open descriptor, read from its start in 1 MB blocks)."""
    h = hashlib.sha256()
    if isinstance(path, int):
        offset = 0
        while True:
            block = os.pread(path, _BLOCK, offset)
            if not block:
                break
            h.update(block)
            offset += len(block)
        return h.hexdigest()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            h.update(block)
    return h.hexdigest()


def open_listed(root: Path, name: str, entry, verify: bool = True) -> int:
    """An O_RDONLY descriptor of bundle file ``name``, checked against its manifest ``entry``
    (``bytes``, ``sha256``). The caller closes it.

    Raises:
        ManifestError: an unsafe name, a symlink, not a regular file, missing, another size, or
            another checksum.
    """
    if not is_safe_filename(name):
        raise ManifestError(f"bundle file name '{name}' is not a plain name inside the bundle "
                            "folder; re-export the bundle")
    try:
        dir_fd = os.open(root, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as exc:
        raise ManifestError(f"cannot open bundle folder '{root}': {exc.strerror}") from None
    try:
        # O_NONBLOCK: a FIFO in place of a file must not block the open (refused below)
        fd = os.open(name, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | os.O_NONBLOCK,
                     dir_fd=dir_fd)
    except FileNotFoundError:
        raise ManifestError(f"bundle file '{root / name}' is missing; re-export the "
                            "bundle") from None
    except OSError as exc:
        why = "is a symbolic link" if os.path.islink(root / name) else exc.strerror
        raise ManifestError(f"bundle file '{root / name}' {why}; a bundle may hold only "
                            "regular files; re-export the bundle") from None
    finally:
        os.close(dir_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ManifestError(f"bundle file '{root / name}' is not a regular file; re-export "
                                "the bundle")
        if st.st_size != entry.bytes:
            raise ManifestError(f"bundle file '{root / name}' has {st.st_size} bytes, the "
                                f"manifest says {entry.bytes} (truncated or modified); "
                                "re-export the bundle")
        if verify and file_sha256(fd) != entry.sha256:
            raise ManifestError(f"bundle file '{root / name}' fails its checksum (corrupt or "
                                "modified); re-export the bundle")
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_listed(root: Path, name: str, files: Mapping) -> bytes:
    """The bytes of bundle file ``name``, checked against its entry in the manifest's ``files``
    on the very bytes returned (a file swapped after a check cannot be what the caller uses).

    Raises:
        ManifestError: not listed, as :func:`open_listed`, or another checksum.
    """
    entry = files.get(name)
    if entry is None:
        raise ManifestError(f"bundle file '{name}' is not listed in the manifest; re-export the "
                            "bundle")
    fd = open_listed(root, name, entry, verify=False)
    try:  # one read of the listed size (+1 to see a longer file): a regular file's read returns
        # it whole, and the bytes are held once (chunks joined had held them twice: a session 38
        # probe's 83 MB file took a process 27 MB past its budget)
        data = os.read(fd, entry.bytes + 1)
        if 0 < len(data) < entry.bytes:  # (short: a file still being written)
            data += b"".join(iter(lambda: os.read(fd, 1 << 20), b""))
    finally:
        os.close(fd)
    if len(data) != entry.bytes or hashlib.sha256(data).hexdigest() != entry.sha256:
        raise ManifestError(f"bundle file '{root / name}' fails its checksum (corrupt or "
                            "modified); re-export the bundle")
    return data


def drop_dead_staging(out: Path, kind: str, suffix: str = r"\.[A-Za-z0-9_]+") -> None:
    """Remove what writers of ``out`` left beside it, named ``.NAME.`` + KIND + PID + ``suffix``
    (mkdtemp's random part by default), where process PID is gone: a SIGKILLed (OOM-killed)
    export, export-model or report left its staging folder or file there for good. Looked up
    on this machine: two machines writing into one shared folder at once are not told apart.
    Another name's entries never match (``B.export.4000000`` is not one of B's)."""
    import re
    import shutil

    pattern = re.compile(rf"^\.{re.escape(out.name[:100])}\.{re.escape(kind)}(\d{{1,9}}){suffix}$")
    try:
        entries = list(out.parent.iterdir())
    except OSError:
        return
    for e in entries:
        m = pattern.match(e.name)
        if not m or int(m.group(1)) == os.getpid():
            continue
        try:
            os.kill(int(m.group(1)), 0)
            continue  # alive
        except ProcessLookupError:
            pass
        except OSError:  # (another user's: alive)
            continue
        if e.is_dir() and not e.is_symlink():
            shutil.rmtree(e, ignore_errors=True)
        elif e.is_file() and not e.is_symlink():
            e.unlink(missing_ok=True)


@contextlib.contextmanager
def deferred_signals():
    """SIGINT, SIGTERM and SIGHUP wait until the block ends, then each arrives once: for a few
    renames that must all happen (a mask would not do: another thread, onnxruntime's or BLAS's,
    takes a signal the main thread blocks). Outside the main thread it holds nothing."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []
    held = {s: signal.signal(s, lambda n, _f: got.append(n))
            for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in held.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        for s in sorted(dict.fromkeys(got), key=lambda s: s == signal.SIGINT):  # (the stops
            signal.raise_signal(s)  # first: KeyboardInterrupt would end the loop)


_HELD: dict[str, int] = {}  # the bundles (and checkpoints) this command reads -> a descriptor


def hold_bundle(folder: Path) -> None:
    """A shared lock on the bundle ``folder`` until :func:`release_bundles` (``train``, ``eval``
    and fleet commands, to their end): an ``export --overwrite`` of it meanwhile is refused
    (session 46 probe: it replaced the bundle a run was training, and the finished run could
    then be neither evaluated nor resumed). It waits out an export's check of the folder (a
    moment); a file system without locks holds nothing. (:func:`hold_file`: a folder is held
    as a file is.)"""
    hold_file(folder)


def hold_file(path: Path) -> bool:
    """A shared lock on the file ``path`` until :func:`let_go` or :func:`release_bundles`: a
    run writing its folder prunes no checkpoint so held (``bundle_in_use``; session 48 probe:
    `eval --weights RUN/checkpoints/latest` beside a run checkpointing every step failed 9 of
    12 times, the file it chose pruned before it was read). False where the file is gone (or
    another one is at the path); True where it cannot be locked (no locks on this file system:
    nothing held, as before)."""
    import fcntl

    key = os.path.realpath(path)
    if key in _HELD:
        return True
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except FileNotFoundError:
        return False
    except OSError:
        return True  # (what is wrong with it, its reader says)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        if os.stat(path).st_ino != os.fstat(fd).st_ino:
            raise FileNotFoundError(key)
    except FileNotFoundError:
        os.close(fd)
        return False
    except OSError:
        os.close(fd)
        return True
    _HELD[key] = fd
    return True


def let_go(path: Path) -> None:
    """Drop what :func:`hold_file` holds of ``path`` (once it has been read)."""
    fd = _HELD.pop(os.path.realpath(path), None)
    if fd is not None:
        os.close(fd)


def release_bundles() -> None:
    """Drop what :func:`hold_bundle` and :func:`hold_file` hold (a command's end, for a process
    that runs another)."""
    while _HELD:
        os.close(_HELD.popitem()[1])


def bundle_in_use(folder: Path) -> bool:
    """Whether a command of this machine holds the bundle ``folder`` (:func:`hold_bundle`); as
    well, whether one holds any folder or file by ``flock`` (a run folder its ``train``, a
    checkpoint its reader). One that cannot be opened or locked here is not (the caller's
    checks say what it is)."""
    import fcntl

    try:
        fd = os.open(folder, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError:  # (O_NONBLOCK: a FIFO of a checkpoint's name would hold the open)
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:  # no locks on this file system
        return False
    finally:
        os.close(fd)  # (the lock, if taken, goes with it)
    return False


def refuse_special(path: Path, flag: str = "--out") -> None:
    """Refuse (``UserError``) an output path that is a device, FIFO or socket, or a link to one:
    --overwrite replaced such a node with a plain file (session 47 probe: a copy of /dev/null,
    as root), and a FIFO would block the write."""
    from .errors import UserError

    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return
    kind = ("a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a FIFO"
            if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else None)
    if kind:
        raise UserError(f"{flag} '{path}' is {kind}, not a file; name a file to write (nothing "
                        "there is replaced, --overwrite or not)")


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write ``path`` through ``write(tmp)`` on a temporary name in the same folder, then
    ``os.replace`` it over ``path`` and fsync the folder: a crash leaves the old file or the new
    one, never a torn one. ``write`` must flush and fsync what it writes."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def json_text(value: object, indent: int | None = None) -> str:
    """``value`` as strict JSON: a NaN or infinite number becomes ``null`` (Python's ``NaN`` /
    ``Infinity`` are not JSON: a diverged loss had made a fleet's summary.json unreadable to
    strict parsers), NumPy scalars become numbers."""

    def finite(v):
        if isinstance(v, dict):
            return {k: finite(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [finite(x) for x in v]
        if isinstance(v, (float, np.floating)):
            v = float(v)
            return v if math.isfinite(v) else None
        if isinstance(v, np.integer):
            return int(v)
        return v

    return json.dumps(finite(value), indent=indent, allow_nan=False, default=float)


def write_text(path: Path, text: str) -> None:
    """Text written, flushed and fsynced (a writer for :func:`atomic_write`)."""
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """An uncompressed ``.npz`` (readable by ``numpy.load``) streamed from the arrays' own memory:
    no copy of an array is made (``numpy.savez`` copies each array in 16 MB chunks), so writing a
    checkpoint adds no more than a few KB to the resident memory. Flushed and fsynced."""
    with open(path, "wb") as f:
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            for name, value in arrays.items():
                arr = np.asarray(value)
                if arr.dtype.hasobject:
                    raise ValueError(f"array '{name}' holds Python objects; refusing to pickle")
                if not arr.flags.c_contiguous:
                    arr = np.ascontiguousarray(arr)
                header = _npy_header(arr)
                info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                info.compress_type = zipfile.ZIP_STORED
                with zf.open(info, "w", force_zip64=True) as out:
                    out.write(header)
                    view = memoryview(arr.reshape(-1).view(np.uint8)) if arr.size else b""
                    for s in range(0, len(view), _BLOCK):
                        out.write(view[s:s + _BLOCK])
        f.flush()
        os.fsync(f.fileno())


def _npy_header(arr: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_2_0(buf, np.lib.format.header_data_from_array_1_0(arr))
    return buf.getvalue()


class Declared(NamedTuple):
    """An ``.npz`` member's header where it declared another shape or dtype than expected."""

    shape: tuple[int, ...]
    dtype: str


def read_npz(path: str | os.PathLike | int,
             expect: dict[str, tuple[int, ...]] | None = None) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` (never unpickled: object arrays are refused).

    With ``expect`` (name -> shape), only those members are read, and each only after its
    header declares that shape: an extra member, or one that would decompress to more than its
    shape's bytes, is never inflated (a bundle's ``params.npz`` is untrusted). A listed member
    with another shape or a dtype that is not a float comes back as a :class:`Declared` (its
    header's shape and dtype, never read), for the caller to name it.

    Raises:
        OSError, ValueError, zipfile.BadZipFile: unreadable or not an npz of plain arrays.
    """
    if isinstance(path, int):
        with os.fdopen(os.dup(path), "rb") as f:
            f.seek(0)
            with np.load(f, allow_pickle=False) as z:
                return _members(z, expect)
    with np.load(path, allow_pickle=False) as z:
        return _members(z, expect)


class Arrays(dict):
    """``read_npz``'s arrays; ``unread``: the file's members ``expect`` did not name."""

    def __init__(self, unread: list[str]) -> None:
        super().__init__()
        self.unread = unread


def _members(z, expect: dict[str, tuple[int, ...]] | None) -> dict[str, np.ndarray]:
    if expect is None:
        return {k: z[k] for k in z.files}
    out = Arrays([k for k in z.files if k not in expect])
    for k, shape in expect.items():
        if k not in z.files:
            continue
        with z.zip.open(k + ".npy") as f:
            version = np.lib.format.read_magic(f)
            header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                      else np.lib.format.read_array_header_2_0)(f)
        if tuple(header[0]) != tuple(shape) or header[2].kind != "f" or header[2].itemsize > 8:
            out[k] = Declared(tuple(header[0]), str(header[2]))  # not read
            continue
        out[k] = z[k]
    return out
