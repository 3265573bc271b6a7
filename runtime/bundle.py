"""Open a training bundle (written by ``export/``): typed manifest, every file checked.

A bundle is untrusted data. Everything the runtime reads from it goes through here: the manifest
is validated against the schema in ``contract/manifest.py`` (types, ranges, file names that stay
inside the folder), and each file is opened without following symlinks and checked against its
listed size and SHA-256 before use (``contract.files.open_listed``). Graphs are handed to
onnxruntime as verified bytes, never as paths, so a graph cannot make onnxruntime read external
data from elsewhere: every external initializer must be one the runtime supplies itself from the
verified ``weights.bin``. Never imports torch or onnx.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from contract import (
    Manifest,
    ManifestError,
    UserError,
    let_go,
    names,
    open_listed,
    read_listed,
    read_manifest,
    read_npz,
)
from contract.files import Declared
from contract.manifest import FORMAT, ITEMSIZE, LayerInfo, TensorSpec

from .memory import all_finite

__all__ = ["Bundle", "is_bundle", "open_bundle"]


def _refuse_packed(fd: int, src: Path) -> None:
    """A bundle's params.npz is stored, never compressed (the exporter's ``np.savez``): its
    listed size then bounds the memory its tensors take. A 1.6 MB file of deflated members with
    a manifest edited to match had inflated to 1.6 GB, and the buffers made for it took a run
    to 7.9 GB (session 28 probe)."""
    import zipfile

    try:
        with os.fdopen(os.dup(fd), "rb") as f, zipfile.ZipFile(f) as zf:
            packed = [i.filename for i in zf.infolist() if i.compress_type != zipfile.ZIP_STORED]
    except (OSError, ValueError, zipfile.BadZipFile):
        return  # (read_npz words an unreadable file)
    if packed:
        raise UserError(f"{src}: member '{packed[0][:40]}' is compressed, which an exported "
                        "bundle's never is: the bundle was edited or damaged; re-export it")


@dataclass
class Bundle:
    path: Path
    manifest: Manifest

    # ------------------------------------------------------------------ contract views
    @property
    def inputs(self) -> list[TensorSpec]:
        return self.manifest.inputs

    @property
    def loss(self):
        return self.manifest.loss

    @property
    def params(self):
        return self.manifest.params

    @property
    def layers(self) -> list[LayerInfo]:
        return self.manifest.instant.layers

    @property
    def lookups(self):
        """Graph inputs the runtime fills with rows of a frozen table: {input: Lookup}."""
        return self.manifest.lookups

    @property
    def modes(self) -> list[str]:
        return self.manifest.modes

    @property
    def output(self) -> str:
        """The model output that training accuracy and evaluation both read."""
        return self.manifest.output

    @property
    def classification(self) -> bool:
        """Whether runs report an accuracy: a class per sample/token/pixel, or yes/no per
        output element (``bce``)."""
        return self.manifest.loss.kind in ("cross_entropy", "bce")

    def io(self, mode: str):
        return self.manifest.io[mode]

    def graph_file(self, mode: str, part: str = "forward") -> str:
        """The file name of one graph (``part``: forward or backward)."""
        graphs = self.manifest.graphs
        if mode not in graphs:
            raise UserError(f"bundle {self.path} has no '{mode}' graphs (it has: "
                            f"{', '.join(self.modes)}); the model has no compressible layer "
                            "among its trainable ones" if mode in ("instant", "calib") else
                            f"bundle {self.path} has no '{mode}' graphs")
        name = getattr(graphs[mode], part)
        if name is None:
            raise UserError(f"bundle {self.path}: mode '{mode}' has no {part} graph")
        return name

    # ------------------------------------------------------------------ verified reads
    def read_file(self, name: str) -> bytes:
        """The bytes of a listed bundle file, verified against the manifest (size and SHA-256,
        checked on the very bytes returned).

        Raises:
            ManifestError: not listed, unsafe, a symlink, another size or checksum.
        """
        return read_listed(self.path, name, self.manifest.files)

    def graph_bytes(self, mode: str, part: str = "forward") -> bytes:
        return self.read_file(self.graph_file(mode, part))

    def open_weights(self) -> int | None:
        """A descriptor of the verified ``weights.bin`` (None when the bundle has none)."""
        entry = self.manifest.files.get(names.WEIGHTS_FILE)
        if entry is None:
            return None
        return open_listed(self.path, names.WEIGHTS_FILE, entry, verify=False)

    def load_params(self, path: Path | None = None,
                    way_out: str | None = None) -> dict[str, np.ndarray]:
        """Trainable parameters as writable float32 arrays (initial, or from ``path``);
        ``way_out`` ends the message of a file that cannot be read or does not fit (default:
        for a --weights file, what it may be and what to pass; a session 49 probe was told to
        "re-export the bundle" of another model's weights, which a re-export cannot mend).

        Raises:
            UserError: unreadable file, a missing parameter, a wrong shape, non-finite values.
        """
        if path is None:  # (the bundle's own: no option of the command's can mend it)
            way_out = "re-export the bundle"
            entry = self.manifest.files[names.PARAMS_FILE]
            fd = open_listed(self.path, names.PARAMS_FILE, entry, verify=True)
            src: str | Path = self.path / names.PARAMS_FILE
            try:
                _refuse_packed(fd, src)
            except UserError:
                os.close(fd)
                raise
        else:
            fd, src = None, Path(path)
        misfit = way_out or ("another model's weights: use them with the bundle they were "
                             "trained with, or pass the weights of a run of this one")
        way_out = way_out or ("damaged, or not a weights file: pass a run folder, its "
                              "params.npz or one of its checkpoints")
        unreadable = way_out  # (a run's params.npz: session 47 probe, told to re-export with
        if fd is None and src.name == names.PARAMS_FILE and any(  # a checkpoint of its step
                src.parent.glob("checkpoints/ckpt-*.npz")):  # beside it)
            unreadable = (f"its run's checkpoints may hold them: pass "
                          f"{src.parent / 'checkpoints' / 'latest'} in its place, or another "
                          "weights file")
        unread: list[str] = []
        try:
            values = read_npz(fd if fd is not None else src,
                              expect={p.name: tuple(p.shape) for p in self.params})
            unread = getattr(values, "unread", [])
            if fd is None and self.params and not any(p.name in values for p in self.params):
                unread = []  # (a checkpoint's optimizer state, read as param/NAME below)
                # a run's checkpoint (checkpoints/ckpt-*.npz) holds them as param/NAME
                held = read_npz(src, expect={f"param/{p.name}": tuple(p.shape)
                                             for p in self.params})
                values = {k.removeprefix("param/"): v for k, v in held.items()} or values
        except (OSError, ValueError, KeyError, EOFError) as exc:
            why = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
            if "pickle" in why:
                why = "not an .npz of plain arrays"
            raise UserError(f"cannot read parameters from {src}: {why}; {unreadable}") from None
        except Exception as exc:  # noqa: BLE001 - zipfile.BadZipFile and friends
            raise UserError(f"cannot read parameters from {src}: {type(exc).__name__}; "
                            f"{unreadable}") from None
        finally:
            if fd is not None:
                os.close(fd)
            else:
                let_go(src)  # (a checkpoint held since it was chosen: read now)
        out = {}
        for p in self.params:
            v = values.get(p.name)
            if v is None:
                raise UserError(f"{src} lacks parameter '{p.name}'; " + (
                    way_out if path is None else "pass the params.npz of a run of this bundle"))
            if isinstance(v, Declared) or list(v.shape) != list(p.shape) or v.dtype.kind != "f":
                shape = [int(d) for d in v.shape[:8]]
                raise UserError(f"{src}: parameter '{p.name}' is {str(v.dtype)[:40]} {shape}"
                                f"{'...' if len(v.shape) > 8 else ''}, the bundle expects "
                                f"float32 {p.shape}; {misfit}")
            # the array read is used as it is where it can be (a copy of every tensor had
            # doubled the process's peak while loading: +77 MB for a 79 MB model, session 27)
            with np.errstate(over="ignore"):  # (float64 past float32's range: inf, said below)
                arr = v if v.dtype == np.float32 and v.flags.writeable and v.flags.c_contiguous \
                    else np.array(v, dtype=np.float32)
            values[p.name] = None
            if not all_finite(arr):
                raise UserError(f"{src}: parameter '{p.name}' holds NaN or inf values (or values "
                                "beyond float32's range); " + (
                    way_out if path is None else "use the weights of a healthy run"))
            out[p.name] = arr
        if unread:  # (session 46 probe: a run's 6 tensors read into a bundle training 2 of them,
            # the 4 frozen there left at their initial values without a word; 0.164 for 0.808)
            from .console import say

            say(f"note: {src} holds {len(unread)} tensor(s) this bundle does not train, not "
                    f"read ({', '.join(k[:40] for k in unread[:4])}"
                    f"{', ...' if len(unread) > 4 else ''}): the bundle's own values stand for "
                    "them; weights of another export of the model (another --trainable or "
                    "--head) go with that bundle")
        return out

    def frozen_bytes_touched(self, graph_file: str) -> int:
        """Bytes of ``weights.bin`` a pass over ``graph_file`` maps in (lookup tables excluded:
        the runtime reads only their rows)."""
        tables = {lk.table for lk in self.lookups.values()}
        return sum(self.manifest.weights[w].length
                   for w in self.manifest.graph_weights.get(graph_file, []) if w not in tables)


def _version(text: str) -> tuple[int, ...] | None:
    """``1.17`` / ``1.20.1`` / ``1.21.0rc1`` as (1, 21, 0); None for anything else."""
    m = re.fullmatch(r"(\d{1,4})\.(\d{1,4})(?:\.(\d{1,4}))?(?:[.+-]?\w*)?", text.strip())
    return None if m is None else tuple(int(g) for g in m.groups() if g is not None)


def _check_onnxruntime(root: Path, wanted: str) -> None:
    """The bundle's graphs need onnxruntime ``wanted`` or newer (its manifest says which)."""
    need = _version(wanted)
    if need is None:
        raise UserError(f"bundle '{root}': min_onnxruntime '{wanted[:40]}' in manifest.json is "
                        "not a version such as 1.17; re-export the bundle")
    from importlib import metadata

    for dist in ("onnxruntime", "onnxruntime-gpu"):
        try:
            have_text = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
        have = _version(have_text)
        if have is not None and have[:len(need)] < need:
            raise UserError(f"bundle '{root}' needs onnxruntime >= {wanted[:40]}, installed "
                            f"{dist} {have_text}; upgrade it (pip install -U {dist})")
        return


def open_bundle(path: str | Path, verify: bool = True) -> Bundle:
    """Read ``manifest.json`` and check every listed file is present, regular, complete and
    intact (SHA-256 unless ``verify`` is false).

    Raises:
        UserError: missing directory or file, corrupt or invalid manifest, other format version,
            a file whose size or checksum differs from the manifest, a symlink.
    """
    root = Path(path)
    if not str(path).strip():
        raise UserError("the bundle argument is empty; pass the bundle's folder (made by "
                        "`instant-runtime export`)")
    if not root.is_dir():
        raise UserError(f"bundle '{root}' is not a directory; " + _near_bundles(root))
    try:  # onnxruntime is told the folder (sessions.py: external data resolves inside it)
        str(root.resolve()).encode("utf-8")
    except UnicodeEncodeError:
        shown = os.fsencode(root).decode("ascii", "backslashreplace")
        raise UserError(f"bundle path '{shown}' is not valid UTF-8 (or not in this locale's "
                        "encoding), which onnxruntime cannot take; rename the folder or move "
                        "the bundle to a UTF-8 path (or run with a UTF-8 locale, e.g. "
                        "LANG=C.UTF-8)") from None
    mpath = root / names.MANIFEST_FILE
    if mpath.is_symlink() or not mpath.is_file():
        if not mpath.exists() and ((root / "params.npz").is_file()
                                   or (root / "summary.json").is_file()):
            # a run's or a fleet's folder given as the bundle (session 34 probe: `eval
            # FLEET_FOLDER` was told to re-export it)
            raise UserError(f"'{root}' is a run's folder (its params.npz or summary.json), not "
                            "a bundle; pass the bundle it was trained from (`eval` takes the "
                            f"run as --weights {root})")
        raise UserError(f"bundle '{root}' has no manifest.json (or it is not a regular file); "
                        "re-export it")
    manifest = read_manifest(mpath)
    _check_onnxruntime(root, manifest.min_onnxruntime)
    for name, entry in manifest.files.items():
        os.close(open_listed(root, name, entry, verify=verify))
    b = Bundle(root, manifest)
    for name, w in manifest.weights.items():
        if w.dtype not in ITEMSIZE:  # pragma: no cover - the schema already restricts dtypes
            raise ManifestError(f"weight '{name}' has an unsupported dtype {w.dtype}")
    return b


def _near_bundles(root: Path) -> str:
    """The way out for a bundle path that is no folder: a bundle beside it of a similar name (a
    typo: session 39 probe, `b/cnnx` was told to export an MLP there), else how to make one."""
    import difflib
    import itertools

    try:
        with os.scandir(root.parent) as entries:  # (a few thousand entries at most)
            beside = [e.name for e in itertools.islice(entries, 5000)
                      if e.is_dir() and (Path(e.path) / "manifest.json").is_file()]
    except OSError:
        beside = []
    near = difflib.get_close_matches(root.name, beside, n=1, cutoff=0.6)
    if near:
        return f"did you mean '{root.parent / near[0]}'?"
    return f"check the path, or create one with `instant-runtime export --model ... --out {root}`"


def is_bundle(folder: Path) -> bool:
    """A bundle's folder: its manifest.json says so, or cannot be read (a damaged bundle; a web
    app's manifest.json is another format: session 41 review)."""
    try:
        with open(folder / "manifest.json", "rb") as f:
            raw = json.loads(f.read(1 << 20))
    except FileNotFoundError:
        return False
    except (OSError, ValueError, RecursionError):
        return (folder / "manifest.json").is_file()
    return not isinstance(raw, dict) or raw.get("format") == FORMAT
