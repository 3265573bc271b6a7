"""Image folders (one sub-folder per class, PNG/JPEG) as a data source."""

from __future__ import annotations

import array
import math
import os
import stat
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from contract.errors import UserError
from contract.manifest import IMAGE_STD_MIN, ImageSpec, LossSpec, TensorSpec
from devices.planner import budget_mb

from ..memory import budget_given, current_rss
from .common import (
    IMAGE_SUFFIXES,
    MAX_IMAGE_PIXELS,
    Arrays,
    Problems,
    Source,
    _nothing_usable,
)
from .image_layout import entry_kind, folder_key, no_classes, refuse_splits, written_by_us
from .image_meta import TOO_MANY_SCANS, bound_pillow_text, metadata, png_pixels
from .labels import _Labels

# ---------------------------------------------------------------------------- images
_MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}
MAX_DEPTH = 64  # folders nested deeper under a class folder are ignored (and counted)


class ImageSource(Source):
    """A folder with one sub-folder per class of PNG/JPEG files, built to the ``ImageSpec``.

    Held per row: the file's path relative to the folder (all paths in one uint8 array with int64
    offsets) and its class id (int32). Each file is opened and verified once at index time
    (JPEGs are also decoded at 1/8 scale, which finds truncated files); ``take`` decodes one
    image at a time (JPEGs at a reduced scale when at least 4x the target), converts it
    (``L``/``RGB``), resizes it bilinearly to height x width, scales it to [0, 1] and normalises
    ``(x - mean) / std`` into ``[N, C, H, W]`` (``[N, H, W]`` for a 3-D grey input).
    """

    def __init__(self, root: str | Path, image: ImageSpec, inputs: list[TensorSpec],
                 loss: LossSpec, *, class_names: list[str] | None = None) -> None:
        self.root = Path(root)
        self.name = self.root.name or str(self.root)
        self.problems = Problems(self.name)
        if loss.kind != "cross_entropy":
            raise UserError(f"{self.root}: an image folder gives class labels (one sub-folder per "
                            f"class); this model's loss is {loss.kind}; use an .npz with targets")
        if len(loss.labels.shape) > 1:
            raise UserError(f"{self.root}: an image folder gives one class per image; this "
                            f"model takes labels {loss.labels.shape} (a class per pixel or "
                            "token); use an .npz with x and y of that shape")
        if image.channels not in _MODES:
            raise UserError(f"image models with {image.channels} channels are not supported")
        self.spec = image
        self.c, self.h, self.w = int(image.channels), int(image.height), int(image.width)
        self.out_name, self.out_dtype, self.grey3d = _image_output(image, inputs)
        if min(image.std) < IMAGE_STD_MIN:  # (a manifest takes any positive std)
            raise UserError(f"the bundle's image std {min(image.std):g} is below "
                            f"{IMAGE_STD_MIN:g}: every pixel would become inf or NaN; export the "
                            f"bundle again with --image-std of at least {IMAGE_STD_MIN:g}")
        self.mean = _per_channel(image.mean, self.c)
        self.std = _per_channel(image.std, self.c)
        self.label_dtype = np.dtype(loss.labels.dtype)
        try:
            from PIL import Image, PngImagePlugin
        except ImportError:
            raise UserError("image data needs Pillow; install it with `pip install pillow`") \
                from None
        self._Image = Image
        bound_pillow_text(PngImagePlugin)
        self.max_metadata = 0
        if not self.root.is_dir():
            raise UserError(f"image folder {self.root} not found")
        labels = _Labels(str(self.root), "its class folders", class_names, loss.num_classes,
                         False, problems=self.problems)
        self.largest_image: str | None = None  # (relative path; the budget refusal names it)
        blob, offsets, rows, self.max_pixels = self._index(labels)
        self.paths = np.frombuffer(bytes(blob), np.uint8)
        self.path_offsets = np.frombuffer(offsets, np.int64)
        del blob
        if self.path_offsets.size <= 1:
            way = ("put PNG/JPEG files in one sub-folder per class, e.g. "
                   f"{self.root}/cat/1.png")
            if "unknown label" in self.problems.counts and labels.given is not None:
                shown = ", ".join(labels.given_names[:8])  # (session 38 probe: "e.g. cat"
                way = (f"its class folders must be named as the classes ({shown}"  # only)
                       f"{', ...' if len(labels.given_names) > 8 else ''}), one per class")
            raise _nothing_usable(str(self.root), self.problems, rows, way)
        self.labels, self.class_names = labels.finish()

    # ------------------------------------------------------------------ index pass
    def _index(self, labels: _Labels) -> tuple[bytearray, array.array, int, int]:
        blob, offsets = bytearray(), array.array("q", [0])
        rows, max_pixels = 0, 0
        try:
            top = sorted(os.scandir(self.root), key=lambda e: e.name)
        except OSError as exc:
            raise UserError(f"cannot list image folder {self.root}: {exc.strerror}") from None
        classes, keys, loose = [], {}, 0
        for e in top:
            kind = entry_kind(e)
            if kind == "folder":
                try:
                    key = folder_key(self.root / e.name)
                except OSError as exc:
                    self.problems.ignore(f"unreadable entry ({exc.strerror})", e.name)
                    continue
                keys.setdefault(key, []).append(e)
                classes.append(e.name)
            elif kind.startswith(("hidden", "unreadable")):
                self.problems.ignore(kind, e.name)
            else:
                self.problems.ignore("file outside the class folders", e.name)
                loose += e.name.lower().endswith(IMAGE_SUFFIXES)
        for same in keys.values():  # class folders that are one folder: the real one is read
            if len(same) > 1:
                keep = next((e for e in same if not e.is_symlink()), same[0])
                for e in same:
                    if e is not keep:
                        self.problems.ignore("class folder that links to another class's "
                                             "folder", e.name)
                        classes.remove(e.name)
        # the data folder and its class folders are read from the top only, never through a
        # link below them (a loop)
        self._walked = set()
        self._reserved = {folder_key(self.root), *keys}
        ours = [c for c in classes if written_by_us(self.root / c)]
        for c in ours:  # (session 33 probe: `report` drew report.png into a run folder kept
            # inside the data folder, and the next run trained it as a class)
            self.problems.ignore("run or bundle folder", c)
        empty = [c for c in classes if c not in ours and not self._has_images(c)]
        for c in empty:  # e.g. an empty class folder
            self.problems.ignore("folder without PNG/JPEG files", c)
        classes = [c for c in classes if c not in empty and c not in ours]
        labels.skipped = empty
        if not classes:
            raise UserError(no_classes(self.root, empty, loose))
        refuse_splits(self.root, classes)
        for c in classes:
            labels.declare(c)
        for c in classes:
            for rel in self._walk(c, top=True):
                rows += 1
                reason, pixels = self._check(rel)
                if reason is not None:
                    self.problems.bad(reason[0], f"{rel} ({reason[1]})" if reason[1] else rel)
                    continue
                why = labels.add(c)
                if why is not None:
                    self.problems.bad(why, f"{rel}: {c!r}" if why == "unknown label" else rel)
                    continue
                blob += os.fsencode(rel)
                offsets.append(len(blob))
                if pixels > max_pixels:
                    max_pixels, self.largest_image = pixels, rel
        return blob, offsets, rows, max_pixels

    def _has_images(self, rel_dir: str, seen: set | None = None, depth: int = 0) -> bool:
        """Whether ``rel_dir`` holds a PNG/JPEG file within ``MAX_DEPTH`` levels (what
        :meth:`_walk` would yield; nothing is recorded)."""
        seen = set() if seen is None else seen
        if depth > MAX_DEPTH:
            return False
        try:
            key = folder_key(self.root / rel_dir)
            if key in seen:  # a symlink loop
                return False
            seen.add(key)
            with os.scandir(self.root / rel_dir) as entries:  # (read as it goes: a folder
                folders = []  # of 300,000 files is never held)
                for e in entries:
                    kind = entry_kind(e)
                    if kind == "image":
                        return True
                    if kind == "folder":
                        folders.append(e.name)
        except OSError:
            return True  # _walk reports it
        return any(self._has_images(f"{rel_dir}/{name}", seen, depth + 1) for name in folders)

    def _walk(self, rel_dir: str, top: bool = False, depth: int = 0) -> Iterator[str]:
        """The images under ``rel_dir`` in name order. A folder reached a second time (a
        symlink loop, or a link to a folder already read, or to the data folder or a class
        folder) is ignored and counted, never read twice; so is one nested more than
        ``MAX_DEPTH`` levels (session 30 probe: 1200 levels ran out of Python's recursion and
        were called "a JSON/TOML structure")."""
        if depth > MAX_DEPTH:
            self.problems.ignore(f"folder nested more than {MAX_DEPTH} levels deep", rel_dir)
            return
        try:
            key = folder_key(self.root / rel_dir)
            if key in self._walked or (not top and key in self._reserved):
                self.problems.ignore("folder reached a second time (a symlink loop or a second "
                                     "link to it)", rel_dir)
                return
            # names only, of images and folders: the others are counted as they are met
            # (session 33 probe: the DirEntry objects of 300,000 sidecar files in one class
            # folder took a 100 MB run to 165 MB)
            kept = []
            with os.scandir(self.root / rel_dir) as entries:
                for e in entries:
                    kind = entry_kind(e)
                    if kind in ("folder", "image"):
                        kept.append((e.name, kind == "folder"))
                    else:
                        self.problems.ignore(kind, f"{rel_dir}/{e.name}")
        except OSError as exc:
            self.problems.ignore("unreadable folder", f"{rel_dir} ({exc.strerror})")
            return
        self._walked.add(key)
        kept.sort()
        for name, folder in kept:
            rel = f"{rel_dir}/{name}"
            if folder:
                yield from self._walk(rel, depth=depth + 1)
            else:
                yield rel

    def _check(self, rel: str) -> tuple[tuple[str, str] | None, int]:
        """(bad reason and detail, or None; decoded pixels ``take`` will hold)."""
        Image = self._Image
        path = self.root / rel
        try:
            meta, too_much = metadata(path)
            if too_much:
                return ("too many JPEG scans" if too_much == TOO_MANY_SCANS else
                        "too much metadata", too_much), 0
            with warnings.catch_warnings():  # a huge image: our own line says so, not Pillow's
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                im = Image.open(path)
                with im:
                    fmt, (w, h) = _format(im), im.size
                    coefficients = _coefficients(im)
                    if fmt != "PNG":  # (a PNG: png_pixels, in blocks, not whole chunks)
                        im.verify()
                if fmt not in ("PNG", "JPEG"):
                    return ("not a PNG or JPEG image", f"format {fmt}"), 0
                # what a read decodes (a JPEG at up to 1/8 scale: a 48 MP phone photo is
                # 0.75 MP) (a progressive JPEG: its full-size coefficients, 2-8 bytes a pixel)
                if self._decoded_pixels(fmt, w, h, coefficients) > MAX_IMAGE_PIXELS or (
                        coefficients and w * h > MAX_IMAGE_PIXELS):
                    return ("image too large", f"{w}x{h}"), 0
                if fmt == "PNG" and (damaged := png_pixels(path)):  # (after the size: a huge
                    return ("unreadable image", damaged), 0  # one is not inflated for nothing)
                if fmt == "JPEG":  # verify() does not decode JPEG data: decode it at 1/8 scale
                    _check_fits(path, w, h, 12 * self._decoded_pixels(fmt, w, h, coefficients),
                                bool(coefficients))
                    with Image.open(path) as im:
                        im.draft(im.mode, (max(1, w // 8), max(1, h // 8)))
                        im.load()
        except UserError:  # (_check_fits: the budget's, not the image's fault)
            raise
        except Exception as exc:  # Pillow raises many types (OSError, SyntaxError, ...)
            why = str(exc).replace(str(path), path.name)  # (the row names the file already)
            return ("unreadable image", f"{type(exc).__name__}: {why[:60]}"), 0
        self.max_metadata = max(self.max_metadata, meta)
        return None, self._decoded_pixels(fmt, w, h, coefficients)

    def _draft_size(self) -> tuple[int, int]:  # (preprocessing's "jpeg_draft" says the same)
        return 2 * self.w, 2 * self.h

    def _decoded_pixels(self, fmt: str, w: int, h: int, coefficients: float = 0.0) -> int:
        """What a read of the image holds, in pixels of the decoded image (12 bytes each in
        ``bytes_fixed``). A progressive JPEG keeps its full-size coefficients whatever the
        draft scale, 2 bytes each, ``coefficients`` a pixel (:func:`_coefficients`: 4:2:0
        colour 1.5, a 24 MP one at 1/8 scale took 72 MB; 4:4:4 colour 3, CMYK 4: session 31
        probe, 6 and 8 bytes a pixel measured, 303 and 375 MB under a 248 MB budget when
        every progressive file was counted at 3)."""
        if fmt == "JPEG" and coefficients:
            return max(self._decoded_pixels(fmt, w, h), math.ceil(w * h * coefficients / 6))
        if fmt == "JPEG":  # Pillow's JPEG draft: the largest of 8, 4, 2, 1 the size allows
            dw, dh = self._draft_size()
            scale = min(w // dw, h // dh)
            for s in (8, 4, 2, 1):
                if scale >= s:
                    return math.ceil(w / s) * math.ceil(h / s)
        return w * h

    # ------------------------------------------------------------------ reading rows
    def __len__(self) -> int:
        return int(self.path_offsets.shape[0] - 1)

    def file(self, i: int) -> Path:
        """The image file of row ``i``."""
        a, b = self.path_offsets[i], self.path_offsets[i + 1]
        return self.root / os.fsdecode(self.paths[a:b].tobytes())

    def _load(self, path: Path) -> np.ndarray:
        """One image as float32 [C, H, W] in [0, 1]... or uint8 [H, W, C] for the common case:
        a regular file (opened without blocking) of no more pixels than the plan counted
        (session 30 probe: an image swapped mid-run for a FIFO blocked the run beyond a
        SIGTERM; one swapped for a 6200x6200 PNG took a 120 MB run to 277 MB)."""
        Image = self._Image
        changed = (f"image {path} changed since the folder was indexed ({{}}); do not modify "
                   "data during a run: restore it or remove it, and run again")
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        except OSError as exc:
            raise UserError(changed.format(exc.strerror or exc)) from None
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise UserError(changed.format("now not a regular file"))
            os.set_blocking(fd, True)
            try:
                with warnings.catch_warnings():  # (a huge one: our own line says so below)
                    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                    im = Image.open(f)
                with im:
                    w, h = im.size
                    fmt = _format(im)
                    if self._decoded_pixels(fmt, w, h, _coefficients(im)) > self.max_pixels:
                        raise UserError(changed.format(
                            f"now {w}x{h}, larger than any image the memory plan counted"))
                    if fmt == "JPEG":
                        im.draft(im.mode, self._draft_size())
                    im.load()
                    return self._convert(im, _orientation(im))
            except UserError:
                raise
            except Exception as exc:  # noqa: BLE001 - Pillow raises many types
                raise UserError(f"image {path} cannot be decoded ({type(exc).__name__}: "
                                f"{str(exc)[:80]}); it passed the check when the folder was "
                                "indexed: fix or remove it, do not modify data during a run") \
                    from None

    def _convert(self, im, orientation: int = 1) -> np.ndarray:
        """``im`` in the bundle's channels and size, turned as its EXIF orientation says (a
        phone's portrait photo is stored sideways with a tag; a viewer shows it upright):
        resized first (to the turned size), so that the turn copies only the small image."""
        Image = self._Image
        turn = _TURNS.get(orientation)
        size = (self.h, self.w) if orientation in (5, 6, 7, 8) else (self.w, self.h)

        def upright(img):
            if img.size != size:
                img = img.resize(size, Image.BILINEAR)
            return img.transpose(getattr(Image.Transpose, turn)) if turn else img

        if im.mode.startswith("I") or im.mode == "F":  # 16/32-bit grey
            scale = 1.0 if im.mode == "F" else 1.0 / 65535.0
            f = upright(Image.fromarray(np.asarray(im, dtype=np.float32) * np.float32(scale), "F"))
            a = np.asarray(f, dtype=np.float32)
            return np.repeat(a[None], self.c, axis=0) if self.c > 1 else a[None]
        target = _MODES[self.c]
        if im.mode != target:
            if im.mode in ("P", "PA") or (im.mode in ("LA", "La", "RGBa") and target != "LA"):
                im = im.convert("RGBA")
            im = im.convert(target)
        a = np.asarray(upright(im))  # uint8 [H, W] or [H, W, C]
        return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)

    def take(self, idx: np.ndarray) -> tuple[Arrays, np.ndarray]:
        idx = self._rows(idx)
        n = idx.shape[0]
        out = np.empty((n, self.c, self.h, self.w), np.float32)
        mean = self.mean[:, None, None]
        inv_std = (1.0 / self.std)[:, None, None]
        for k, i in enumerate(idx):
            a = self._load(self.file(int(i)))
            o = out[k]
            o[...] = a
            if a.dtype == np.uint8:
                o /= np.float32(255.0)
            o -= mean
            o *= inv_std
        x = out if self.out_dtype == np.float32 else out.astype(self.out_dtype)
        if self.grey3d:
            x = x.reshape(n, self.h, self.w)
        return {self.out_name: x}, self.labels[idx].astype(self.label_dtype)

    def take_labels(self, idx: np.ndarray) -> np.ndarray:
        return self.labels[self._rows(idx)].astype(self.label_dtype)

    def bytes_per_sample(self) -> int:
        px = self.c * self.h * self.w
        cast = px * self.out_dtype.itemsize if self.out_dtype != np.float32 else 0
        return px * 4 + cast + 2 * self.label_dtype.itemsize + 8

    def bytes_fixed(self) -> int:
        # one image at a time: Pillow's file reads (64 KB decoder blocks), the decoded image
        # (up to 4 bytes a pixel, 16-bit grey as float32 copies), one or two mode conversions,
        # the resized image and its float32 copy; its metadata (kept, a copy of it, the chunk
        # being read, PNG text as Pillow expands it)
        return ((2 << 16) + 12 * self.max_pixels + 12 * self.h * self.w * max(self.c, 1)
                + 3 * self.max_metadata)


# EXIF orientation -> the turn that shows the image upright (Pillow's Transpose names)
_TURNS = {2: "FLIP_LEFT_RIGHT", 3: "ROTATE_180", 4: "FLIP_TOP_BOTTOM", 5: "TRANSPOSE",
          6: "ROTATE_270", 7: "TRANSVERSE", 8: "ROTATE_90"}


def _check_fits(rel: Path, w: int, h: int, need: int, progressive: bool) -> None:
    """Refuse, before decoding it, an image whose check would take the process past the
    command's --budget (session 31 probe: indexing a 6000x6000 progressive 4:4:4 / CMYK JPEG
    took the process to 280 / 352 MB before the plan refused --budget 248MB)."""
    budget = budget_given()
    rss = current_rss()
    if budget is None or rss + need <= budget:
        return
    if rss >= budget or 4 * need <= budget:
        # a small image: the budget is the problem (session 34 probe: --budget 40MB was
        # blamed on a 31x54 JPEG of 1 MB beside the 62 MB the process took at start)
        raise UserError(f"budget {budget_mb(budget)} MB is below the minimum for this bundle "
                        f"(the runtime already takes {rss / 1e6:.0f} MB as it reads the image "
                        f"folder); raise --budget well above it, e.g. to "
                        f"{math.ceil(2 * rss / 1e6)}MB (`instant-runtime plan --data DATA` without "
                        "--budget estimates the minimum)")
    raise UserError(f"image {rel} ({w}x{h}) takes about {math.ceil(need / 1e6)} MB to decode"
                    + (" (a progressive JPEG keeps every coefficient)" if progressive else "")
                    + f", more than --budget {budget_mb(budget)}MB leaves beside the "
                    f"{rss / 1e6:.0f} MB already in use; shrink or remove it, or raise --budget")


def _format(im) -> str:
    """Pillow's format name, a multi-picture JPEG's (MPO: what many phones and cameras write as
    .jpg, a second picture after the first) read as the JPEG it starts with (session 33 probe:
    refused as "not a PNG or JPEG image")."""
    return "JPEG" if im.format == "MPO" else im.format


def _coefficients(im) -> float:
    """DCT coefficients a progressive JPEG's decoder keeps per pixel, whatever the draft scale:
    its components at their sampling factors (the header's), 0 for any other image; 4 (CMYK's)
    where the header does not say."""
    if not (im.info.get("progressive") or im.info.get("progression")):
        return 0.0
    try:
        layers = [(int(c[1]), int(c[2])) for c in im.layer]
        hmax, vmax = max(h for h, _ in layers), max(v for _, v in layers)
        return sum(h * v for h, v in layers) / (hmax * vmax)
    except (AttributeError, TypeError, ValueError, IndexError, ZeroDivisionError):
        return 4.0


def _orientation(im) -> int:
    """The image's EXIF orientation tag (1, upright, where it has none or it is unreadable)."""
    try:
        v = im.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - a damaged EXIF block: the pixels still decode
        return 1
    return v if isinstance(v, int) and v in _TURNS else 1


def _per_channel(values: list[float], c: int) -> np.ndarray:
    v = np.asarray(values, np.float32).reshape(-1)
    return np.broadcast_to(v, (c,)).astype(np.float32) if v.size == 1 else v


def _image_output(image: ImageSpec, inputs: list[TensorSpec]) -> tuple[str, np.dtype, bool]:
    by_name = {s.name: s for s in inputs}
    extra = [s.name for s in inputs if s.name != image.input]
    if extra:
        raise UserError(f"the model also needs input(s) {', '.join(extra)}, which image data "
                        "does not give; use an .npz with one array per input")
    spec = by_name.get(image.input)
    if spec is None:
        raise UserError(f"the bundle's image spec names input '{image.input}', which the model "
                        "does not have; re-export the bundle")
    dt = np.dtype(spec.dtype)
    want4 = [image.channels, image.height, image.width]
    got = spec.shape[1:]

    def fits(want: list[int]) -> bool:
        return len(got) == len(want) and all(not isinstance(g, int) or g == w
                                             for g, w in zip(got, want, strict=True))

    grey3d = image.channels == 1 and fits([image.height, image.width])
    if dt.kind != "f" or not (fits(want4) or grey3d):
        raise UserError(f"model input '{spec.name}' is {spec.dtype} {spec.shape}; image data "
                        f"gives float [N, {image.channels}, {image.height}, {image.width}]; "
                        "re-export the bundle")
    return spec.name, dt, grey3d


def open_images(root: str | Path, image: ImageSpec, inputs: list[TensorSpec], loss: LossSpec, *,
                class_names: list[str] | None = None) -> ImageSource:
    """An image-folder source (see :class:`ImageSource`).

    Raises:
        UserError: no such folder, no class folders, nothing usable, a class count that does
            not fit the model.
    """
    return ImageSource(root, image, inputs, loss, class_names=class_names)
