"""Training data for the runtime: ``.npz`` files and built-in datasets, checked against a bundle.

Built-in datasets are read straight from the data files that ship inside their packages (found
with ``importlib.util.find_spec``, never imported: importing scikit-learn would cost tens of MB).
"""

from __future__ import annotations

import gzip
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .bundle import Bundle
from .errors import UserError

__all__ = ["BUILTIN_DATASETS", "Dataset", "load_data"]


@dataclass
class Dataset:
    """Arrays by model input name plus labels; ``test`` is a fixed held-out split (or None)."""

    name: str
    x: dict[str, np.ndarray]
    y: np.ndarray
    test: Dataset | None = None

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def take(self, idx: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
        return {k: np.ascontiguousarray(v[idx]) for k, v in self.x.items()}, self.y[idx]


def _package_file(package: str, *parts: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"built-in dataset needs the '{package}' package; install it with "
                        f"`pip install {package}` (or `pip install instant-runtime[data]`)")
    path = Path(list(spec.submodule_search_locations)[0]).joinpath(*parts)
    if not path.is_file():
        raise UserError(f"data file {path} is missing from the installed '{package}' package")
    return path


def _split(x: np.ndarray, y: np.ndarray, n_test: int, seed: int = 0):
    perm = np.random.default_rng(seed).permutation(len(y))
    te, tr = perm[:n_test], perm[n_test:]
    return (x[tr], y[tr]), (x[te], y[te])


def _digits() -> tuple[np.ndarray, np.ndarray, int]:
    """scikit-learn's 1,797 8x8 digits (UCI), pixels scaled to [0, 1]."""
    with gzip.open(_package_file("sklearn", "datasets", "data", "digits.csv.gz")) as f:
        raw = np.loadtxt(f, delimiter=",", dtype=np.float32)
    return raw[:, :-1] / 16.0, raw[:, -1].astype(np.int64), 360


BUILTIN_DATASETS: dict[str, Callable[[], tuple[np.ndarray, np.ndarray, int]]] = {
    "digits": _digits,
}


def _adapt(name: str, x: np.ndarray, spec: dict) -> np.ndarray:
    """Reshape a built-in dataset's samples to the bundle input when the sizes agree."""
    want = spec["shape"][1:]
    if all(isinstance(d, int) for d in want):
        if int(np.prod(want)) == int(np.prod(x.shape[1:])):
            return x.reshape([x.shape[0]] + list(want))
    raise UserError(f"dataset '{name}' has samples of shape {list(x.shape[1:])}, which do not "
                    f"fit bundle input '{spec['name']}' of shape {spec['shape']}; use a bundle "
                    "exported for this data or pass --data file.npz")


def check_arrays(bundle: Bundle, x: dict[str, np.ndarray], y: np.ndarray, where: str) -> None:
    """Shapes, dtypes, finiteness and label range against the bundle; one clear error each."""
    n = y.shape[0]
    for spec in bundle.inputs:
        arr = x[spec["name"]]
        want = spec["shape"][1:]
        got = list(arr.shape[1:])
        if len(got) != len(want) or any(isinstance(w, int) and w != g
                                         for w, g in zip(want, got, strict=True)):
            raise UserError(f"{where}: input '{spec['name']}' has sample shape {got}, the bundle "
                            f"expects {want} (batch first: {spec['shape']})")
        if arr.shape[0] != n:
            raise UserError(f"{where}: input '{spec['name']}' has {arr.shape[0]} samples but "
                            f"there are {n} labels")
        if np.dtype(spec["dtype"]).kind == "f":
            if arr.dtype.kind not in "fiu":
                raise UserError(f"{where}: input '{spec['name']}' has dtype {arr.dtype}, "
                                f"expected {spec['dtype']}")
            if not np.isfinite(arr).all():
                raise UserError(f"{where}: input '{spec['name']}' contains NaN or inf values")
        elif arr.dtype.kind not in "iu":
            raise UserError(f"{where}: input '{spec['name']}' has dtype {arr.dtype}, expected "
                            f"{spec['dtype']}")
    loss = bundle.loss
    if loss["kind"] == "cross_entropy":
        if y.ndim != 1 or y.dtype.kind not in "iu":
            raise UserError(f"{where}: labels must be a 1-D integer array of class ids, got "
                            f"dtype {y.dtype} shape {list(y.shape)}")
        k = loss["num_classes"]
        if n and (y.min() < 0 or y.max() >= k):
            raise UserError(f"{where}: labels must be in [0, {k - 1}] for this {k}-class model; "
                            f"found values from {y.min()} to {y.max()}")
    elif not np.isfinite(y).all():
        raise UserError(f"{where}: labels contain NaN or inf values")


def _cast(bundle: Bundle, x: dict[str, np.ndarray], y: np.ndarray):
    xs = {s["name"]: np.ascontiguousarray(x[s["name"]], dtype=np.dtype(s["dtype"]))
          for s in bundle.inputs}
    ydt = np.int64 if bundle.loss["kind"] == "cross_entropy" else np.float32
    return xs, np.ascontiguousarray(y, dtype=ydt)


def _from_npz(path: Path, bundle: Bundle) -> Dataset:
    try:
        data = np.load(path, allow_pickle=False)
        arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read data file {path}: {exc}") from None
    names = [s["name"] for s in bundle.inputs]

    def pick(suffix: str) -> tuple[dict[str, np.ndarray], np.ndarray] | None:
        ykey = "y" + suffix
        if ykey not in arrays:
            return None
        x = {}
        for n in names:
            if n + suffix in arrays:
                x[n] = arrays[n + suffix]
            elif len(names) == 1 and "x" + suffix in arrays:
                x[n] = arrays["x" + suffix]
            else:
                raise UserError(f"data file {path} lacks array '{n + suffix}' for bundle input "
                                f"'{n}'; it has: {', '.join(sorted(arrays))}")
        return x, arrays[ykey]

    train = pick("")
    if train is None:
        raise UserError(f"data file {path} has no 'y' array (labels); it has: "
                        f"{', '.join(sorted(arrays))}")
    check_arrays(bundle, train[0], train[1], str(path))
    test = pick("_test")
    ds = Dataset(path.name, *_cast(bundle, *train))
    if test is not None:
        check_arrays(bundle, test[0], test[1], f"{path} (test split)")
        ds.test = Dataset(path.name + ":test", *_cast(bundle, *test))
    return ds


def load_data(spec: str, bundle: Bundle) -> Dataset:
    """``spec`` is an ``.npz`` path or a built-in name; returns train data with its test split.

    Raises:
        UserError: unknown dataset, unreadable file, shapes/dtypes/labels that do not fit.
    """
    if spec in BUILTIN_DATASETS:
        x, y, n_test = BUILTIN_DATASETS[spec]()
        if len(bundle.inputs) != 1:
            raise UserError(f"dataset '{spec}' has one input; the bundle has "
                            f"{len(bundle.inputs)}")
        inp = bundle.inputs[0]
        x = _adapt(spec, x, inp)
        (xtr, ytr), (xte, yte) = _split(x, y, n_test)
        check_arrays(bundle, {inp["name"]: xtr}, ytr, spec)
        ds = Dataset(spec, *_cast(bundle, {inp["name"]: xtr}, ytr))
        ds.test = Dataset(spec + ":test", *_cast(bundle, {inp["name"]: xte}, yte))
        return ds
    path = Path(spec)
    if path.suffix == ".npz":
        if not path.is_file():
            raise UserError(f"data file '{spec}' not found")
        return _from_npz(path, bundle)
    raise UserError(f"unknown dataset '{spec}'; use a built-in ({', '.join(BUILTIN_DATASETS)}) "
                    "or an .npz file with one array per model input (or 'x') and 'y'")
