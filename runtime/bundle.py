"""Open and validate a training bundle (written by ``export/``). Never imports torch or onnx."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UserError

__all__ = ["FORMAT_VERSION", "Bundle", "file_sha256", "open_bundle"]

FORMAT_VERSION = 2


@dataclass
class Bundle:
    path: Path
    manifest: dict

    @property
    def inputs(self) -> list[dict]:
        return self.manifest["inputs"]

    @property
    def loss(self) -> dict:
        return self.manifest["loss"]

    @property
    def params(self) -> list[dict]:
        return self.manifest["params"]

    @property
    def layers(self) -> list[dict]:
        return self.manifest["instant"]["layers"]

    @property
    def lookups(self) -> dict[str, dict]:
        """Graph inputs the runtime fills with rows of a frozen table: {input: {table, indices}}."""
        return self.manifest.get("lookups", {})

    @property
    def modes(self) -> list[str]:
        return [m for m in self.manifest["graphs"] if m != "infer"]

    def graph(self, mode: str, part: str) -> Path:
        graphs = self.manifest["graphs"]
        if mode not in graphs:
            raise UserError(f"bundle {self.path} has no '{mode}' graphs (it has: "
                            f"{', '.join(self.modes)}); the model has no compressible layer "
                            "among its trainable ones" if mode in ("instant", "calib") else
                            f"bundle {self.path} has no '{mode}' graphs")
        return self.path / graphs[mode][part]

    def io(self, mode: str) -> dict:
        return self.manifest["io"][mode]

    def load_params(self, path: Path | None = None) -> dict[str, np.ndarray]:
        """Trainable parameters as writable float32 arrays (initial, or from ``path``)."""
        src = path or self.path / "params.npz"
        try:
            with np.load(src) as data:
                values = {k: np.array(data[k], dtype=np.float32) for k in data.files}
        except (OSError, ValueError, KeyError) as exc:
            raise UserError(f"cannot read parameters from {src}: {exc}; re-export the bundle "
                            "or pass another --weights file") from None
        for p in self.params:
            if p["name"] not in values:
                raise UserError(f"{src} lacks parameter '{p['name']}'")
            if list(values[p["name"]].shape) != list(p["shape"]):
                raise UserError(f"{src}: parameter '{p['name']}' has shape "
                                f"{list(values[p['name']].shape)}, the bundle expects {p['shape']}")
        return {p["name"]: values[p["name"]] for p in self.params}


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read in 1 MB blocks (the manifest's integrity check)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def open_bundle(path: str | Path, verify: bool = True) -> Bundle:
    """Read ``manifest.json`` and check every listed file is present, complete and intact.

    Raises:
        UserError: missing directory or file, corrupt manifest, other format version, a file whose
            size or checksum differs from the manifest.
    """
    root = Path(path)
    if not root.is_dir():
        raise UserError(f"bundle '{root}' is not a directory; create one with "
                        f"`instant-runtime export --model mlp --out {root}`")
    mpath = root / "manifest.json"
    if not mpath.is_file():
        raise UserError(f"bundle '{root}' has no manifest.json; re-export it")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{mpath} is corrupt ({exc.__class__.__name__}: {exc}); re-export "
                        "the bundle") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "instant-runtime-bundle":
        raise UserError(f"{mpath} is not an instant-runtime bundle manifest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise UserError(f"bundle '{root}' has format version {version}; this runtime reads "
                        f"version {FORMAT_VERSION}. Re-export it with the matching exporter")
    for key in ("inputs", "loss", "params", "graphs", "io", "instant", "files"):
        if key not in manifest:
            raise UserError(f"{mpath} lacks the '{key}' entry; re-export the bundle")
    for name, meta in manifest["files"].items():
        f = root / name
        if not f.is_file():
            raise UserError(f"bundle file '{f}' is missing; re-export the bundle")
        size = f.stat().st_size
        if size != meta["bytes"]:
            raise UserError(f"bundle file '{f}' has {size} bytes, the manifest says "
                            f"{meta['bytes']} (truncated or modified); re-export the bundle")
        if verify and file_sha256(f) != meta["sha256"]:
            raise UserError(f"bundle file '{f}' fails its checksum (corrupt); re-export the bundle")
    return Bundle(root, manifest)
