"""How an image folder is laid out: which entries are images, folders, or neither; which
sub-folders are not classes (a run or a bundle written inside it, the splits of a dataset);
what to say when none is a class (sources/images.py)."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

from contract.errors import UserError

from .common import IMAGE_SUFFIXES

__all__ = ["entry_kind", "folder_key", "no_classes", "refuse_splits", "written_by_us"]

_SPLITS = {"train", "training", "val", "valid", "validation", "test", "testing", "eval", "dev"}
_OTHER_IMAGES = (".webp", ".heic", ".heif", ".avif", ".gif", ".bmp", ".tif", ".tiff", ".jxl")


def written_by_us(folder: Path) -> bool:
    """Whether ``folder`` is a training run's or a bundle's (written by this runtime)."""
    return ((folder / "run.json").is_file() and (folder / "metrics.jsonl").exists()) or (
        (folder / "manifest.json").is_file() and (folder / "weights.bin").exists())


def no_classes(root: Path, folders: list[str], loose: int = 0) -> str:
    """The refusal of an image folder with no class folder holding a PNG/JPEG: where its
    sub-folders hold images of other formats, it says so (session 33 probe: folders of .heic
    photos were told to put "the images of each class in its own folder")."""
    other: dict[str, int] = {}
    for c in folders[:100]:
        try:
            with os.scandir(root / c) as entries:
                for e in itertools.islice(entries, 10_000):
                    suffix = os.path.splitext(e.name)[1].lower()
                    if suffix in _OTHER_IMAGES:
                        other[suffix] = other.get(suffix, 0) + 1
        except OSError:
            continue
    if other:
        seen = ", ".join(f"{n} {s}" for s, n in sorted(other.items(), key=lambda kv: -kv[1]))
        return (f"image folder {root} has class sub-folders but no PNG/JPEG images in them "
                f"({seen} files); the runtime reads PNG and JPEG: convert them (e.g. `mogrify "
                "-format jpg *.heic` with ImageMagick), or pass another --data")
    if loose:  # (session 33 probe: --data photos/cat was told of photos/cat/cat/1.png)
        return (f"image folder {root} holds {loose} image(s) but no class sub-folders with "
                "images: --data is the folder whose sub-folders are the classes; if "
                f"'{root.name}' is one class, pass its parent ({root.parent}), else put the "
                f"images of each class in its own folder, e.g. {root}/cat/1.png")
    return (f"image folder {root} has no class sub-folders with images; put the images of each "
            f"class in its own folder, e.g. {root}/cat/1.png")


def refuse_splits(root: Path, classes: list[str]) -> None:
    """Refuse class folders that are the splits of a dataset (``train/``, ``val/``, each with
    its class folders, no image of its own): session 33 probe, a run learnt the classes
    "train" and "val"."""
    if not set(c.lower() for c in classes) <= _SPLITS or len(classes) < 2:
        return
    for c in classes:
        try:
            with os.scandir(root / c) as entries:
                if any(entry_kind(e) == "image" for e in entries):
                    return  # images of its own: a class that happens to be named so
        except OSError:
            return
    train = next((c for c in classes if c.lower() in ("train", "training")), classes[0])
    held = next((c for c in classes if c.lower() in ("val", "valid", "validation", "dev")),
                next((c for c in classes if c != train), None))
    raise UserError(f"image folder {root} holds the splits of a dataset ({', '.join(classes)}, "
                    f"each with its class folders), not classes: pass --data {root / train}"
                    + (f" --val {root / held}" if held else ""))


def folder_key(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def entry_kind(e: os.DirEntry) -> str:
    """"folder", "image", or why the entry is ignored."""
    if e.name.startswith("."):
        return "hidden file or folder"
    try:
        if e.is_dir():
            return "folder"
        if not e.name.lower().endswith(IMAGE_SUFFIXES):
            return "not a PNG/JPEG file"
        if not e.is_file():  # a FIFO or device named like an image would block a read
            return "not a regular file"
    except OSError as exc:  # a link to itself, a vanished entry
        return f"unreadable entry ({exc.strerror})"
    return "image"
