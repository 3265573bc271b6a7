"""A run folder's own files read as untrusted data (``eval --weights``, ``export-model``,
``report``, ``train --resume``): never through a symbolic link, ``run.json`` bounded in size
and its class names checked against the model (a run folder may come from anywhere, as a
bundle may)."""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

from contract import UserError

from .checkpoint import _open_regular

__all__ = ["MAX_RUN_JSON_BYTES", "RUN_FILES", "check_run_links", "is_run", "json_object",
           "params_step", "run_class_names", "weights_record", "checkpoint_meta",
           "data_realpath", "our_folder"]

RUN_FILES = ("run.json", "metrics.jsonl", "params.npz", "summary.json", "checkpoints")


def is_run(folder: Path) -> bool:
    """A training run's folder (the CLI's run.json, or the log every run writes)."""
    return (folder / "run.json").is_file() or (folder / "metrics.jsonl").is_file()


# a run.json holds ~1 KB and the class names (60,000 names of 12 characters fit); parsed, a
# larger one could take any memory past a --budget (a probe's 75 MB: 490 MB under 120 MB)
MAX_RUN_JSON_BYTES = 1 << 20


def json_object(path: Path) -> dict:
    """The JSON object in ``path`` (a run's run.json); {} when it is missing, unreadable or not
    an object.

    Raises:
        UserError: a symbolic link, or more than ``MAX_RUN_JSON_BYTES``.
    """
    try:
        fd = _open_regular(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _link_error(path) from None
        return {}
    except ValueError:
        return {}
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(fd).st_size
        if size > MAX_RUN_JSON_BYTES:
            raise UserError(f"{path} has {size:,} bytes, more than a run's run.json can have "
                            f"({MAX_RUN_JSON_BYTES:,}); put back the run's own run.json, or "
                            "pass another run")
        try:
            data = json.loads(f.read(MAX_RUN_JSON_BYTES + 1))
        except (OSError, ValueError, RecursionError):
            return {}
    return data if isinstance(data, dict) else {}


def params_step(run: Path) -> int | None:
    """The step whose weights ``run/params.npz`` holds: the ``steps`` of its summary.json
    (written after it, at the end of a run); None where either is missing or unreadable.

    Which of params.npz and the newest checkpoint is the newer is decided by step, not by file
    time (session 33 probe: after a ``cp -r`` or an ``scp`` of a finished run resumed for more
    steps and stopped, eval and export-model took its older params.npz, and --resume of a
    finished run whose checkpoint was touched trained again)."""
    if not (run / "params.npz").is_file():
        return None
    try:
        steps = json_object(run / "summary.json").get("steps")
    except UserError:
        return None
    return steps if isinstance(steps, int) and not isinstance(steps, bool) and steps >= 0 \
        else None


def checkpoint_meta(path: Path) -> dict:
    """A checkpoint's metadata member alone, bounded as a resume reads it (the arrays stay
    unread); {} where there is none (a plain .npz, not a zip, damaged)."""
    import zipfile

    import numpy as np

    from .checkpoint import _META, MAX_META_BYTES, parse_meta

    try:
        with os.fdopen(_open_regular(path), "rb") as f, zipfile.ZipFile(f) as zf:
            info = zf.getinfo(_META + ".npy")
            if info.file_size > MAX_META_BYTES:
                return {}
            with zf.open(info) as m:
                return parse_meta(np.lib.format.read_array(m, allow_pickle=False).tobytes())
    except Exception:  # noqa: BLE001 - no metadata (KeyError), not a zip, damaged
        return {}


def weights_record(weights: Path, run: Path) -> dict:
    """What trained ``weights`` recorded of their run: the run folder's run.json, with a
    checkpoint's own ``bundle_sha256`` over it, and its ``seed`` where the run.json has none (a
    checkpoint copied out of its run); {} for a plain .npz of weights (a bundle's params.npz,
    a user's file)."""
    out = json_object(run / "run.json")
    if not out and not (run / "run.json").exists():  # a fleet client's folder: the seed its
        summary = json_object(run / "summary.json")  # --val-split was drawn with (a review)
        if "data" in summary and type(summary.get("seed")) is int:
            out = {"seed": summary["seed"]}
    meta = checkpoint_meta(weights)
    run_meta = meta.get("run")
    if isinstance(run_meta, dict) and "seed" in run_meta:
        out.setdefault("seed", run_meta["seed"])
    if isinstance(meta.get("bundle_sha256"), str):
        out["bundle_sha256"] = meta["bundle_sha256"]
    return out


def _first_link(run: Path, only: tuple[str, ...] | None = None) -> Path | None:
    """The first link among the entries of ``run`` (those named ``only``, when given) and of
    its ``checkpoints`` folder: a symbolic link, or a file with other names (a hard link: a
    resume appends to metrics.jsonl in place, and a probe's hard link to a file outside the
    bundle had it truncated and rewritten; session 28). None when there is none."""
    try:
        for entry in run.iterdir():
            if only is not None and entry.name not in only:
                continue
            if _is_link(entry):
                return entry
            if entry.name == "checkpoints" and entry.is_dir():
                link = next((e for e in entry.iterdir() if _is_link(e)), None)
                if link is not None:
                    return link
    except OSError:
        pass
    return None


def _is_link(p: Path) -> bool:
    try:
        st = p.lstat()
    except OSError:
        return False
    return stat.S_ISLNK(st.st_mode) or (stat.S_ISREG(st.st_mode) and st.st_nlink > 1)


def link_kind(p: Path) -> str:
    """How ``p`` (found by ``_first_link``) is a link, for a message."""
    return ("a symbolic link" if p.is_symlink() else
            "a hard link (the file has other names, which may be outside)")


def _link_error(link: Path) -> UserError:
    return UserError(f"{link} is {link_kind(link)}: a run's files are never read or written "
                     "through a link (it may lead outside the run folder); replace it with a "
                     "copy of the file (cp -L it to a new name, then mv that over it), or pass "
                     "another run")


def check_run_links(run: Path) -> None:
    """Refuse a run folder (eval's and export-model's weights, a resumed run) whose files
    (``RUN_FILES``, the checkpoints) include a symbolic link: a run is untrusted data, as a
    bundle is, and its links may lead anywhere (a probe's ``checkpoints/ckpt-000030.npz`` to a
    file outside: export-model copied its bytes out).

    Raises:
        UserError: a link, named.
    """
    link = _first_link(Path(run), RUN_FILES)
    if link is not None:
        raise _link_error(link)


def run_class_names(run: Path, bundle) -> list[str] | None:
    """The label map ``run`` recorded in its run.json (None when it has none), one name per
    class of ``bundle``'s model (a probe's 5,000,000 names for a 10-class model went into
    export-model's labels.json).

    Raises:
        UserError: as :func:`json_object`, or class names that do not fit the model.
    """
    path = Path(run) / "run.json"
    names = json_object(path).get("class_names")
    if names is None and not path.exists():  # a fleet run (server or client): its summary's
        path = Path(run) / "summary.json"
        names = json_object(path).get("class_names")
    if names is None:
        return None
    loss = bundle.loss
    k = loss.num_classes if loss.kind == "cross_entropy" else None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        why = "is not a list of names"
    elif k is not None and len(names) != k:
        why = (f"holds {len(names):,} names for a {k}-class model (a run of another export "
               "of the model? then use the bundle it was trained on)")
    elif len(set(names)) != len(names):  # (session 38 probe: ["x", "x", "z"] accepted)
        why = "repeats a name"
    else:
        return names
    raise UserError(f"{path}: class_names {why}; put back the run's own run.json (or delete "
                    "its class_names), or pass another run")


def our_folder(path: Path) -> str | None:
    """"a bundle" or "a run's" where ``path`` is such a folder (by its manifest's or run.json's
    format: a data set's own manifest.json is no bundle's), else None."""
    from .bundle import is_bundle

    if not path.is_dir():
        return None
    if (path / "manifest.json").is_file() and is_bundle(path):
        return "a bundle"
    try:
        return "a run's" if json_object(path / "run.json").get("format") == \
            "instant-runtime-run" else None
    except Exception:  # noqa: BLE001 - an unreadable run.json: not ours to say
        return None


def data_realpath(spec: str | None) -> str | None:
    """The real path of a --data that names a file or folder (None for a built-in data set or
    nothing there): what run.json and a fleet client's summary.json record as ``data_path``."""
    from .data import BUILTIN_DATASETS

    if not spec or spec in BUILTIN_DATASETS or not os.path.exists(spec):
        return None
    return os.path.realpath(spec)


def trained_shapes(path: Path) -> dict[str, tuple[int, ...] | None]:
    """The tensors a weights file holds (a checkpoint's ``param/NAME`` as NAME) -> their shapes
    from the .npy headers (None where one has none), read without loading an array; {} for a
    file that is no zip."""
    import zipfile

    from .checkpoint import _header

    out: dict[str, tuple[int, ...] | None] = {}
    try:
        with zipfile.ZipFile(path) as zf:
            for n in zf.namelist():
                try:
                    with zf.open(n) as m:
                        out[n.removesuffix(".npy")] = tuple(_header(m, n)[0])
                except Exception:  # noqa: BLE001 - zlib.error, an encrypted member: unknown
                    out[n.removesuffix(".npy")] = None
    except (OSError, zipfile.BadZipFile, ValueError):
        return {}
    if any(n.startswith("param/") for n in out):  # a checkpoint: param/NAME, opt/..., meta
        out = {n.removeprefix("param/"): v for n, v in out.items() if n.startswith("param/")}
    return out


def with_bundle_from_run(record: dict, folder: Path) -> dict:
    """``record`` (a run's run.json, a fleet folder's summary.json) with its ``bundle`` also as
    a path from ``folder`` (``bundle_from_run``): the bundle is found again from any working
    directory (``export_model._run_bundle``). As it is where it names none or no such path can
    be made."""
    if not isinstance(record.get("bundle"), str):
        return record
    try:
        rel = os.path.relpath(Path(record["bundle"]).resolve(), Path(folder).resolve())
    except (OSError, ValueError):
        return record
    return {**record, "bundle_from_run": rel}
