"""What the export takes from the user before any tracing: ``--input-shape`` parsed into example
arrays, an .npz's named arrays put in the model's input order, the ``file.py:factory`` that
builds the torch module (its errors one line each); and what the trace fixed from them."""

from __future__ import annotations

import contextlib
import importlib.util
import linecache
import math
import sys
import warnings
from pathlib import Path

import numpy as np

from .graph import ExportError

__all__ = ["DTYPES", "EXAMPLE_ROWS", "by_name", "example_arrays", "examples", "fixed_by_tracer",
           "parse_input_shapes", "same_buffers", "seed_factories", "buffers_written"]


DTYPES = ("float32", "float64", "float16", "int64", "int32", "uint8", "int8", "bool")


EXAMPLE_MAX_BYTES = 4 << 30  # an example input larger than this is a typo, not a model


def parse_input_shapes(text: str) -> list[tuple[tuple[int, ...], str]]:
    """``32,1,8,8`` or ``8,64:int64;8,64:int64`` (one shape per model input, batch first, with
    an optional dtype, default float32)."""
    shapes = []
    for part in text.split(";"):
        dims_text, _, dtype = part.partition(":")
        dtype = dtype.strip() or "float32"
        if dtype not in DTYPES:
            raise ExportError(f"invalid --input-shape '{text}': unknown dtype '{dtype}'; "
                              f"use one of {', '.join(DTYPES)}")
        try:
            dims = tuple(int(d) for d in dims_text.split(",") if d.strip())
        except ValueError:
            raise ExportError(f"invalid --input-shape '{text}': expected comma-separated "
                              "integers, e.g. 32,1,8,8 or 8,64:int64 (use ';' between "
                              "inputs)") from None
        if not dims or any(d <= 0 for d in dims):
            raise ExportError(f"invalid --input-shape '{text}': dims must be positive")
        if math.prod(dims) * np.dtype(dtype).itemsize > EXAMPLE_MAX_BYTES:
            raise ExportError(f"invalid --input-shape '{text[:80]}': an example input of "
                              f"{math.prod(dims):.3g} elements is too large (at most "
                              f"{EXAMPLE_MAX_BYTES >> 30} GiB); the example batch can be small, "
                              "e.g. 8")
        shapes.append((dims, dtype))
    return shapes


def example_arrays(text: str) -> list[np.ndarray]:
    """Example inputs for ``--input-shape``: float noise, or ones for integer inputs (valid
    token ids and attention masks for any vocabulary)."""
    rng = np.random.default_rng(0)
    out = []
    for dims, dtype in parse_input_shapes(text):
        if np.dtype(dtype).kind == "f":
            out.append(rng.standard_normal(dims).astype(dtype))
        else:
            out.append(np.ones(dims, dtype=dtype))
    return out


_FACTORY_SEED = [0]  # export --seed: torch's seed before a factory file runs


def seed_factories(seed: int) -> None:
    """Seed torch with ``seed`` before each model factory file is imported and called, so the
    weights it draws at random are the same at each export (session 39: they differed)."""
    _FACTORY_SEED[0] = int(seed)


def _load_factory(spec: str):
    import torch

    path, _, fn = spec.rpartition(":")
    file = Path(path)
    if not file.is_file():
        raise ExportError(f"model file '{path}' not found (expected path/to/file.py:factory)")
    mod_spec = importlib.util.spec_from_file_location(f"_user_model_{file.stem}", file)
    assert mod_spec is not None and mod_spec.loader is not None
    module = importlib.util.module_from_spec(mod_spec)
    folder = str(file.resolve().parent)
    sys.path.insert(0, folder)  # the file may import modules next to it, as python file.py would
    torch.manual_seed(_FACTORY_SEED[0])
    try:
        try:
            mod_spec.loader.exec_module(module)
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - the user's file may raise anything
            raise ExportError(f"cannot import model file '{path}': {type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
        factory = getattr(module, fn, None)
        if not callable(factory):
            avail = [n for n in dir(module)
                     if callable(getattr(module, n)) and not n.startswith("_")]
            raise ExportError(f"'{fn}' is not a function in {path}; callables there: "
                              f"{', '.join(avail) or 'none'}")
        try:
            return factory()
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - the user's code may raise anything
            what = "exits" if isinstance(exc, SystemExit) else "fails"
            raise ExportError(f"factory '{fn}' in {path} {what}: {type(exc).__name__}: "
                              f"{_first_line(exc)}; it must take no arguments and return the "
                              "torch module") from None
    finally:
        if folder in sys.path:
            sys.path.remove(folder)


def _first_line(exc: BaseException) -> str:
    """An exception's message on one line (torch's carry URLs and graph dumps after it)."""
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    line = line.split(" Please feel free to request support")[0].split("  [Caused by")[0]
    return line[:300]


def fixed_by_tracer(seen: list) -> list[str]:
    """A note naming the lines of the model's own code where torch's tracer turned a tensor
    computed from the inputs into a Python number or bool (an ``if`` on the data, ``.item()``,
    ``int(mask.sum(1).max())``): the bundle then computes what the example rows gave, for every
    row (an outside probe: a padding trim read 5 of 10 tokens of every row, and an ``if`` took
    one branch for all; the tracer's warnings had been silenced). Library code's are left out
    (transformers' benign checks), as are the built-in models' (their fixed length)."""
    import torch

    where = []
    for w in seen:
        if not issubclass(w.category, torch.jit.TracerWarning) \
                or "registered as constants" in str(w.message):  # (torch.tensor([...]) in forward)
            continue
        f = str(w.filename)
        if "site-packages" in f or "dist-packages" in f or f.startswith(sys.prefix) \
                or Path(f).parent == Path(__file__).parent:  # (the built-ins fix their length)
            continue
        line = linecache.getline(f, w.lineno).strip()
        at = f"{Path(f).name}:{w.lineno}" + (f" ({line[:60]})" if line else "")
        if at not in where:
            where.append(at)
    if not where:
        return []
    return [f"note: the trace fixed {len(where)} value(s) computed from tensors at what the "
            f"example gave ({'; '.join(where[:3])}{'; ...' if len(where) > 3 else ''}): a Python "
            "number or bool from a tensor (int(), float(), .item(), an if); where it depends on "
            "the data, not only on shapes, the bundle computes the example's value for every "
            "row: write that part with tensor ops (torch.where, masks)"]


def by_name(example: list | None, names: list[str] | None, inputs) -> list | None:
    """``example``'s arrays in the model's input order (``inputs()``: its input names) where the
    .npz named them as the model's inputs (an outside probe: arrays went by their order in the
    file, and a forward(input_ids, attention_mask=None, token_type_ids=None) fed {input_ids,
    token_type_ids} traced the token types as the attention mask); as given otherwise.

    Raises:
        ExportError: the names are inputs of the model but leave out one before the last.
    """
    if not example or not names or len(names) != len(example):
        return example
    params = list(inputs())
    if not set(names) <= set(params):
        return example  # (other names: by position, as before)
    last = max(params.index(n) for n in names)
    missing = [p for p in params[:last + 1] if p not in names]
    if missing:
        raise ExportError(f"the example .npz holds {', '.join(names)}, inputs the model takes in "
                          f"the order {', '.join(params[:last + 1])}: "
                          f"{', '.join(missing)} would be missing before them; save every input "
                          f"up to '{params[last]}' in the .npz (e.g. an all-ones "
                          f"'{missing[0]}')")
    return [example[names.index(p)] for p in params[:last + 1]]


@contextlib.contextmanager
def same_buffers(module):
    """``module``'s buffers put back as they were after the block: each export then starts from
    the same ones (an outside probe: a forward that changes one, ``self.n += 1``, gave every
    second export other constants, which were read as computed from the parameters). Yields
    the set that the names of the buffers a forward changed are put into."""
    import torch

    kept = {n: b.detach().clone() for n, b in module.named_buffers()}
    changed: set[str] = set()

    def put_back(*_) -> None:
        with torch.no_grad():
            for n, b in module.named_buffers():
                if n in kept and b.shape == kept[n].shape and not torch.equal(b, kept[n]):
                    changed.add(n)  # (only those: an unchanged buffer keeps its storage,
                    b.data = kept[n].clone()  # shared or not; .data is no op a trace records)

    # after each forward too: torch.onnx.export reads a buffer's value for the graph after its
    # traced forward ran, and a forward that updates one in place (a running mean) had its
    # update counted twice (session 47 probe: the bundle's constant was 0.5*mean(x), not 0)
    try:
        hook = module.register_forward_hook(put_back)
    except RuntimeError:  # a ScriptModule takes no hooks (torch.jit.script): the end alone
        hook = None
    try:
        yield changed
    finally:
        if hook is not None:
            hook.remove()
        put_back()


def buffers_written(module, example: list[np.ndarray]) -> list[str]:
    """The buffers a forward of ``module`` on ``example`` changes, in its own mode and in eval
    mode, a norm's running statistics aside (their note is the training-mode one), run on a
    copy of it. The bundle keeps them as the factory made them (session 47 probe: a running mean
    that forward updated stayed 0 in training, without a word)."""
    import copy

    import torch
    from torch.nn.modules.batchnorm import _NormBase

    try:  # (on a copy: a forward in training mode may change more than buffers, e.g. a
        twin = copy.deepcopy(module)  # max-norm on a weight or a Python counter: a review)
    except Exception:  # noqa: BLE001 - a module that cannot be copied: not checked
        return []
    norms = {f"{m}.{b}" if m else b for m, mod in twin.named_modules()
             if isinstance(mod, _NormBase) for b, _ in mod.named_buffers(recurse=False)}
    args = tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in example)
    out: set[str] = set()
    for mode in dict.fromkeys((module.training, False)):
        try:
            twin.train(mode)
            with torch.no_grad(), warnings.catch_warnings(), same_buffers(twin) as changed:
                warnings.simplefilter("ignore")
                twin(*args)
            out |= changed
        except Exception:  # noqa: BLE001 - the user's forward: the trace says what fails
            pass
    return sorted(out - norms)


EXAMPLE_ROWS = 8  # rows of an --npz that the export runs through the model


def _first_rows(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a[:EXAMPLE_ROWS]) if a.ndim else np.asarray(a)


def examples(input_shape: str | None, npz: str | None
              ) -> tuple[list[np.ndarray] | None, list[int] | None, list[str] | None]:
    """(example inputs, the shape of the example ``.npz``'s ``y``, the .npz's names of the
    inputs): the labels' shape tells a per-position output's class axis (export/losses.py);
    None where not given."""
    if npz:
        try:
            with np.load(npz, allow_pickle=False) as data:
                labels = list(data["y"].shape) if "y" in data.files else None
                if labels:
                    labels[0] = min(labels[0], EXAMPLE_ROWS)
                # the first rows only: a training .npz of 3000 rows ran through a 16k-vocab
                # model at once asked for 24.6 GB of logits (probe, session 20)
                names = [k for k in data.files  # (a training .npz's held-out arrays and
                         if k not in ("y", "class_names") and not k.endswith("_test")]  # names)
                arrays = [_first_rows(data[k]) for k in names]
        except (OSError, ValueError) as exc:
            raise ExportError(f"cannot read example inputs from --npz '{npz}': "
                              f"{str(exc)[:160]}") from None
        if input_shape:  # both: they must agree (session 43 probe: --input-shape 8,64 was
            rows = [(list(a.shape[1:]), a.dtype.kind) for a in arrays]  # dropped for the .npz's
            asked = [(list(a.shape[1:]), a.dtype.kind) for a in example_arrays(input_shape)]
            if rows != asked:  # [300, 128, 64] without a word)
                raise ExportError(f"--input-shape {input_shape} and --npz '{npz}' give other "
                                  f"example inputs (a row of {', '.join(names)}: "
                                  f"{'; '.join(str(r[0]) for r in rows)}); pass one of them")
        return arrays, labels, names
    return (example_arrays(input_shape) if input_shape else None), None, None
