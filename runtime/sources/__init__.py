"""The user's own data files, streamed per micro-batch: a file larger than the budget trains in it.

Every source indexes its file once, when it is opened, and then holds only small per-row arrays
(byte offsets, record lengths, label ids: 16 bytes a row for text); ``take(idx)`` reads just the
rows asked for (``os.pread`` of their byte ranges; nothing is memory-mapped, so no page of the
file counts in the RSS) and builds exactly the bundle's input arrays for them.

| data | source | rows | labels |
|---|---|---|---|
| ``FILE.csv`` / ``FILE.tsv`` | :class:`TextSource` | one record each (quoted fields may span lines) | a column |
| ``FILE.jsonl`` (``.ndjson``) | :class:`TextSource` | one JSON object per line | a field |
| ``DIR/`` | :class:`ImageSource` | each PNG/JPEG under ``DIR/<class>/`` | the class folder |
| ``FILE.npz`` | :class:`NpzSource` | rows of the arrays, read in place | ``y`` |

Labels are strings mapped to class ids in a stable order: sorted, numerically when every label
is an integer, and an integer label is its own class id when all of them lie in
``[0, num_classes)``; or mapped through a given ``class_names`` list (the bundle's, or a resumed
run's), in which case an unknown label is a bad row. Bad rows (missing or empty label, empty
text, unparsable records, unreadable images...) are counted by reason with a few examples in
``source.problems``, never dropped silently; a file where nothing is usable is a one-line error.

Memory: ``bytes_fixed() + n * bytes_per_sample()`` bounds what ``take`` of ``n`` rows allocates
(its numpy outputs and casts, and the one record or image it decodes at a time).
Pillow and tokenizers are imported only when an image or text source is opened.
"""

from __future__ import annotations

from pathlib import Path

from contract.errors import UserError
from contract.files import read_listed
from contract.manifest import ImageSpec, Manifest, TensorSpec

from .common import IMAGE_SUFFIXES, TEXT_SUFFIXES, Problems, Source, SourceView, split
from .images import _MODES, ImageSource, open_images
from .npz import NpzSource, open_npz
from .text import MissingColumn, TextSource, open_text

__all__ = [
    "IMAGE_SUFFIXES",
    "TEXT_SUFFIXES",
    "ImageSource",
    "NpzSource",
    "Problems",
    "Source",
    "SourceView",
    "TextSource",
    "open_data",
    "open_images",
    "open_npz",
    "open_source",
    "open_text",
    "preprocessing",
    "split",
]


# ---------------------------------------------------------------------------- from a bundle
def _kind(path: Path) -> str:
    if path.is_dir():
        return "images"
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        return "text"
    if suffix == ".npz":
        return "npz"
    packed = suffix in (".gz", ".bz2", ".xz", ".zip", ".zst")  # (an outside probe: no hint)
    raise UserError(f"cannot tell the format of data '{path}': "
                    + (f"it is compressed ({suffix}): decompress it first, then pass " if packed
                       else "use ")
                    + "a .csv, .tsv or .jsonl file (text), a folder with one sub-folder per "
                    "class (images), or an .npz")


def open_source(data: str | Path, manifest: Manifest, bundle_dir: str | Path, *,
                text_column: str = "text", label_column: str = "label",
                class_names: list[str] | None = None,
                tokenizer: str | Path | object | None = None) -> Source:
    """One data file or folder, built for ``manifest``'s inputs (format by suffix; a folder is
    images). ``class_names`` fixes the label map (default: the bundle's, when it has one);
    ``tokenizer`` defaults to the bundle's ``text.tokenizer`` file.

    Raises:
        UserError: not found, unknown format, a bundle without the text or image spec the data
            needs, and everything the sources raise.
    """
    path = Path(data)
    if not str(data).strip():
        raise UserError("--data is empty; pass a built-in name, a file or a folder")
    if not path.exists():
        raise UserError(f"data '{data}' not found")
    if not (path.is_dir() or path.is_file()):
        raise UserError(f"data '{data}' is not a regular file or folder (a FIFO, socket or "
                        "device); pass a file or a folder")
    kind = _kind(path)
    if class_names is None:
        class_names = manifest.class_names
    if kind == "npz":
        return open_npz(path, manifest.inputs, manifest.loss, class_names=class_names)
    if kind == "text":
        if manifest.text is None:
            raise UserError(f"{path} is read as text (a CSV, TSV or JSONL file is), but the "
                            "bundle records no tokenizer: for numeric columns save the features "
                            "as x and the targets as y in an .npz (docs/data.md); for text, "
                            "export the model with its tokenizer (--tokenizer)")
        # the verified bytes themselves: the tokenising child never opens the bundle's file
        tok = tokenizer
        if tok is None:
            from .tokens import check_tokenizer_room

            name = manifest.text.tokenizer
            check_tokenizer_room(manifest.files[name].bytes, name)  # before it is read
            tok = read_listed(Path(bundle_dir), name, manifest.files)
        return open_text(path, manifest.text, manifest.inputs, manifest.loss, tok,
                         text_column=text_column, label_column=label_column,
                         class_names=class_names)
    if manifest.image is None:
        if manifest.text is not None:  # a text bundle given a folder: likely of .csv files
            raise UserError(f"{path} is a folder; a text model trains on one .csv, .tsv or "
                            ".jsonl file: pass that file instead (--data or --val)")
        raise UserError(f"{path} is an image folder, but the bundle records no image input "
                        "(manifest 'image': size and normalisation; a model whose one input is "
                        "a float [N, 1 or 3, H, W] or [N, H, W] tensor of fixed size gets it at "
                        "export); pass arrays in an .npz")
    return open_images(path, manifest.image, manifest.inputs, manifest.loss,
                       class_names=class_names)


def open_data(data: str | Path, manifest: Manifest, bundle_dir: str | Path, *,
              text_column: str = "text", label_column: str = "label",
              class_names: list[str] | None = None, val: str | Path | None = None,
              val_split: float | None = None, seed: int = 0,
              tokenizer: str | Path | object | None = None) -> Source:
    """Train data with its held-out split in ``.test``: ``val`` (a second file or folder, read
    with the train data's label map), ``val_split`` (a seeded fraction of the rows), or an
    ``.npz``'s own ``_test`` arrays; none of them: ``.test`` is None.

    Raises:
        UserError: both ``val`` and ``val_split``, a held-out split given twice, and everything
            :func:`open_source` raises.
    """
    if val is not None and val_split is not None:
        raise UserError("pass either --val FILE or --val-split FRACTION, not both")
    opts = {"text_column": text_column, "label_column": label_column, "tokenizer": tokenizer}
    train = open_source(data, manifest, bundle_dir, class_names=class_names, **opts)
    if (val is not None or val_split is not None) and train.test is not None:
        flag = "--val" if val is not None else "--val-split"
        raise UserError(f"{data} already has a held-out split (its _test arrays); drop {flag} or "
                        "remove the _test arrays from the file")
    if val is not None:
        names = train.class_names if train.class_names is not None else class_names
        try:
            held = open_source(val, manifest, bundle_dir, class_names=names, **opts)
        except MissingColumn as exc:  # (an outside probe: told to pass --text-column, which
            if exc.hinted:  # would then miss in --data; a format hint is the fix itself)
                raise
            raise UserError(f"{exc.what}; --text-column and --label-column name the columns of "
                            f"--data and --val alike: give --val the column names of {data}"
                            ) from None
        if held.test is not None:
            raise UserError(f"--val {val} has _test arrays of its own; pass a file with just the "
                            "held-out rows (x, y)")
        _note_shared_folders(train, held, val)
        if train.class_names is not None and held.class_names is not None and \
                held.class_names != train.class_names:  # numbered as the training data's
            from ..data import relabelled  # (session 27 probe: the same names in another

            held = relabelled(held, list(train.class_names),  # order were refused)
                              f"{data}'s classes")
        held.name = f"{held.name} (val)"
        train.test = held
        return train
    if val_split is not None:
        tr, va = split(train, val_split, seed)
        tr.test = va
        return tr
    return train


def _note_shared_folders(train: Source, held: Source, val) -> None:
    """Image folders read both for training and as held out (a link in one leads into the
    other) are noted: the held-out figures then include training rows (session 43 probe: a link
    in a class folder to the --val folder trained every held-out image, under that class's
    label, without a word; the "--val is --data itself" note compares the two paths only)."""
    shared = getattr(train, "_walked", set()) & getattr(held, "_walked", set())
    if shared:
        train.problems.note(f"folders read both as training images and as --val {val}'s (a "
                            "link leads from one into the other): the held-out figures include "
                            "training rows, and a link's images take its class folder's label",
                            f"{len(shared)} folder{'s' if len(shared) > 1 else ''}")


def preprocessing(image: ImageSpec, inputs: list[TensorSpec]) -> dict:
    """How an image file becomes the model's input here (:class:`ImageSource`,
    sources/images.py), for a program that feeds the standalone model of ``export-model``
    (docs/examples/classify_image.py): the model holds none of it, and pixels scaled to [0, 1]
    alone score lower, silently, where the export set a mean and std."""
    c = int(image.channels)
    mean, std = list(image.mean), list(image.std)
    spec = next((t for t in inputs if t.name == image.input), None)
    dtype = spec.dtype if spec is not None else "float32"
    grey3d = spec is not None and len(spec.shape) == 3  # [N, H, W]: no channel axis
    return {"input": image.input, "layout": "NHW" if grey3d else "NCHW", "dtype": dtype,
            "channels": c,
            "height": int(image.height), "width": int(image.width),
            "mode": _MODES[c],
            "resize": "bilinear", "scale": "1/255 (16-bit grey: 1/65535)",
            "mean": mean * c if len(mean) == 1 else mean,
            "std": std * c if len(std) == 1 else std,
            # Pillow's JPEG draft, as ImageSource._load: the smallest decode of 1/8, 1/4, 1/2
            # or full scale that is at least this size (a probe: 5 of 300 predictions differed)
            "jpeg_draft": [2 * int(image.width), 2 * int(image.height)],
            "steps": ["decode a JPEG at the smallest scale Pillow's Image.draft gives that keeps "
                      "it at least 'jpeg_draft' (width, height)",
                      "convert it to 'mode' (Pillow's Image.convert)",
                      "resize it bilinearly to width x height, or to height x width where its "
                      "EXIF orientation (5-8) turns it by 90 degrees",
                      "turn it upright as its EXIF orientation says (after the resize: the "
                      "other order rounds some pixels 1/255 apart)",
                      "scale its pixels to [0, 1]",
                      "x = (x - mean) / std per channel, stacked as 'layout' in 'dtype'"]}
