"""``export-model``: turn a bundle plus trained weights into a standalone inference model.

Writes ``OUT.onnx`` (the bundle's ``infer.onnx`` with the trainable parameters baked in as
initializers and the frozen weights embedded, so the file runs alone in plain onnxruntime) and,
when ``safetensors`` is installed, ``OUT.safetensors`` with the trainable weights under their torch
names (transposed back where the ONNX graph stores them transposed). Needs ``onnx``, never torch.

Why one module (~550 lines): one pipeline, each step reading the last one's result: which
weights of which bundle (a run, a checkpoint, a fleet folder), baked into the graph, then the
side files a user runs it with (labels, tokenizer, preprocessing, safetensors).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from contract import (
    UserError,
    atomic_write,
    deferred_signals,
    drop_dead_staging,
    names,
    refuse_special,
    write_text,
)

from .bundle import Bundle, open_bundle
from .checkpoint import bundle_ids
from .run_files import params_step, weights_record
from .run_folder import bundle_run, check_run_links, json_object, run_class_names
from .sources.common import TEXT_SUFFIXES
from .torch_weights import packed_recurrent, write_safetensors

__all__ = ["ExportResult", "export_model", "other_bundle", "own_bundle", "resolve_source"]

# protobuf's hard limit is 2 GiB; stay clear of it and spill tensors to external data above this.
MAX_INLINE_BYTES = int(1.8e9)


@dataclass
class ExportResult:
    onnx_path: Path
    external_data: Path | None
    safetensors_path: Path | None
    weights: Path
    params: int
    labels_path: Path | None = None
    tokenizer_path: Path | None = None
    from_onnx_file: bool = False  # the bundle was exported from an .onnx file
    bundle_from_run: Path | None = None  # the bundle, where the run's run.json named it
    preprocess_path: Path | None = None  # an image model's preprocessing (runtime/sources)
    packed: list[str] | None = None  # .safetensors keys in ONNX's recurrent layout


_BAD = " and its run.json, which names the bundle, is unreadable"

def resolve_source(source: str | Path, weights: str | Path | None = None,
                   bundle: str | Path | None = None,
                   way: Callable[[str], str] | None = None) -> tuple[Bundle, Path]:
    """``(bundle, params file)`` for a bundle directory or a training run directory. ``way``:
    how the calling command is given a run's bundle (``eval`` has no ``--bundle``), from the
    bundle's path or ``DIR``."""
    src = Path(source)
    if not src.is_dir():
        raise UserError(f"'{src}' is not a directory; pass a bundle directory or a training run "
                        "directory (one holding params.npz)")
    src = run_of_checkpoints(src)  # (as eval --weights reads it: a session 49 review)
    run_dir = None if (src / "manifest.json").is_file() else src
    if weights is not None and Path(weights).is_dir():  # a run's folder, as eval --weights
        weights = trained_weights(run_of_checkpoints(Path(weights)), "--weights")  # takes (a
        # session 43 probe)
    if weights is not None:  # the run of a checkpoint or params file given with --weights
        wp = Path(weights)
        run_dir = wp.parent.parent if wp.parent.name == "checkpoints" else wp.parent
        check_run_links(run_dir)
    # what the run recorded; a checkpoint given with --weights records its own bundle's hash
    # (one copied out of its run folder was not checked: session 31 probe)
    meta = ({} if run_dir is None else json_object(run_dir / "run.json") if weights is None
            else weights_record(Path(weights), run_dir))
    src_weights = run_weights(src)
    want = meta.get("bundle_sha256") if isinstance(meta.get("bundle_sha256"), str) else None
    if bundle is not None:
        bdir = Path(bundle)
    elif (src / "manifest.json").is_file():
        bdir = src
    elif src_weights is not None:
        found = [d for d in [src.parent, *_run_bundle(src)] if (d / "manifest.json").is_file()]
        if not found:  # (its run.json named if damaged: a session 43 probe)
            bad = (src / "run.json").is_file() and not json_object(src / "run.json")
            raise UserError(f"run directory '{src}' is not inside a bundle{_BAD * bad}; "
                            + (way("DIR") if way else "pass the bundle with --bundle DIR"))
        # the bundle the run trained (its manifest's hash), not one of the same name
        bdir = next((d for d in found if want is None or want in bundle_ids(d)), found[0])
    else:
        from .run_folder import set_aside_hint

        raise UserError(f"'{src}' is neither a bundle (no manifest.json) nor a training run "
                        f"(no params.npz or checkpoint){set_aside_hint(src)}")
    if (why := other_bundle(bdir, want, run_dir, weights)) is not None:
        if bundle is None:  # (named where its run.json says: session 39 probe)
            own = own_bundle(run_dir, want) if run_dir is not None and want else None
            raise UserError(f"{why}; " + (way(own or "DIR") if way else "pass the run's own "
                                          f"bundle with --bundle {own or 'DIR'}")
                            + " (a bundle given so is used even when its hash differs)")
    b = open_bundle(bdir)
    if weights is not None:
        w = Path(weights)
        if not w.is_file():
            raise UserError(f"weights file '{w}' "
                            + ("is not a regular file; pass a .npz file or a run folder"
                               if w.exists() else "not found"))
    elif run_dir is not None:  # a run's trained weights, never the bundle's initial ones
        w = trained_weights(src, "run", src_weights)  # (found once: its warnings said once)
    elif bundle_run(bdir).is_dir() and (w := run_weights(bdir / "run")) is not None:
        pass
    elif (bdir / "params.npz").is_file():
        w = bdir / "params.npz"
    else:
        raise UserError(f"no parameters found for '{src}' (no run/params.npz or params.npz); "
                        "train first or pass --weights FILE")
    if why is not None and run_dir is not None:  # (session 48 probe: a bundle exported again
        from .run_files import trained_shapes  # with fewer trained tensors, given by --bundle,
        # wrote a model pairing the run's trained fc3 with an untrained fc2, exit 0; eval
        # refuses the same pair)
        ours = {p.name for p in b.params}
        dropped = [n for n in trained_shapes(w) if n not in ours]
        if dropped:
            raise UserError(f"{why}, and the run trained tensors that this bundle keeps frozen "
                            f"({', '.join(dropped[:3])}{', ...' if len(dropped) > 3 else ''}): "
                            "the model written would hold their untrained values; pass the "
                            "run's own bundle with --bundle")
    if why is not None:
        import sys

        print(f"warning: {why}; its graphs are used as --bundle asks", file=sys.stderr)
    return b, w


def run_of_checkpoints(folder: Path) -> Path:
    """The run a ``checkpoints`` folder belongs to, where ``folder`` is one (its pointer or
    checkpoint files, no run.json or manifest.json of its own); else ``folder``."""
    if folder.name == "checkpoints" and folder.is_dir() and not any(
            (folder / f).exists() for f in ("run.json", "manifest.json")) and (
            (folder / "latest").exists() or any(folder.glob("ckpt-*.npz"))):
        return folder.parent
    return folder


def trained_weights(run: Path, what: str, found: Path | None = None) -> Path:
    """:func:`run_weights` of a folder given as a run (``what``: the option that named it).

    Raises:
        UserError: it holds neither params.npz nor a checkpoint (a probe's export-model wrote
            the bundle's initial weights, saying "6 trained tensors").
    """
    found = found or run_weights(run)
    if found is None:
        from .run_folder import set_aside_hint

        raise UserError(f"{what} '{run}' is a folder without params.npz or a checkpoint; pass a "
                        "run folder, its params.npz, or one of its checkpoints"
                        f"{set_aside_hint(run)}")
    return found


def run_weights(run: Path) -> Path | None:
    """A run folder's trained weights: its ``params.npz``, or, for a run stopped before its
    end (Ctrl-C, a crash; also a finished run resumed for more steps and stopped: params.npz
    is then older than its newest checkpoint), its newest checkpoint; None when it has
    neither.

    Raises:
        UserError: a symbolic link among the run's files (``check_run_links``).
    """
    from .checkpoint import newest_intact

    check_run_links(run)
    params = run / "params.npz"
    has = params.is_file()
    done = params_step(run) if has else None  # a finished run resumed for more steps and
    newest = newest_intact(run / "checkpoints", -1 if done is None else done)  # stopped
    return newest[1] if newest is not None else params if has else None


def other_bundle(bdir: Path, want: str | None, run_dir: Path | None,
                 weights: Path | None = None) -> str | None:
    """Why ``bdir`` is not the bundle a run was trained on (``want``: the hash of its manifest
    that the run, or the ``weights`` checkpoint copied out of it, recorded), or None: it is, or
    nothing was recorded (a plain .npz of weights). ``export-model`` and ``eval`` both say it
    (``train --resume`` does, in its checkpoint)."""
    if want is None or not (bdir / "manifest.json").is_file() or want in bundle_ids(bdir):
        return None
    what = (f"the run in '{run_dir}'" if weights is None or (run_dir / "run.json").is_file()
            else f"checkpoint '{weights}'")
    return (f"{what} was trained on another bundle than '{bdir}' (its manifest's hash differs: "
            "re-exported or replaced)")


def own_bundle(run: Path, want: str) -> Path | None:
    """The bundle the run's run.json names, where its manifest's hash is still ``want``."""
    return next((Path(os.path.normpath(d)) for d in _run_bundle(run)
                 if want in bundle_ids(d)), None)


def _run_bundle(run: Path) -> list[Path]:
    """Where the bundle a run recorded in its run.json (written by ``train``; a fleet folder's
    summary.json, since session 48) may be: the path as given (relative to its working
    directory) and, since session 19, the same bundle relative to the run folder (any working
    directory)."""
    meta = json_object(run / "run.json") or json_object(run / "summary.json")
    out = []
    if isinstance(meta.get("bundle_from_run"), str):
        out.append(run / meta["bundle_from_run"])
    if isinstance(meta.get("bundle"), str):
        out.append(Path(meta["bundle"]))
    return out


def _import_onnx():
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise UserError("export-model needs the onnx package: pip install onnx") from None
    return onnx, numpy_helper


def _read_weight(b: Bundle, fd: int | None, name: str) -> bytes:
    w = b.manifest.weights[name]
    if fd is None:
        raise UserError(f"bundle {b.path} lists weight '{name}' but has no {names.WEIGHTS_FILE}")
    data = os.pread(fd, w.length, w.offset)
    if len(data) != w.length:
        raise UserError(f"{names.WEIGHTS_FILE} of {b.path} is shorter than the manifest says; "
                        "re-export the bundle")
    return data


def _tensors_of_graph(g):
    """Every TensorProto of a GraphProto: initializers, sparse initializers, node attributes and
    the graphs nested in them."""
    yield from g.initializer
    for sp in g.sparse_initializer:
        yield from (sp.values, sp.indices)
    for node in g.node:
        for a in node.attribute:
            yield from _tensors_of_attribute(a)


def _tensors_of_attribute(a):
    if a.HasField("t"):
        yield a.t
    yield from a.tensors
    for sp in ([a.sparse_tensor] if a.HasField("sparse_tensor") else []) + list(a.sparse_tensors):
        yield from (sp.values, sp.indices)
    for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
        yield from _tensors_of_graph(sub)


def all_tensors(model):
    """Every TensorProto of a ModelProto, wherever it sits (the places contract/onnx_scan.py
    scans): the graph and its nested graphs, model-local functions (their nodes and default
    attribute values) and the training-info graphs."""
    yield from _tensors_of_graph(model.graph)
    for f in model.functions:
        for node in f.node:
            for a in node.attribute:
                yield from _tensors_of_attribute(a)
        for a in f.attribute_proto:
            yield from _tensors_of_attribute(a)
    for info in model.training_info:
        yield from _tensors_of_graph(info.initialization)
        yield from _tensors_of_graph(info.algorithm)


def _fill_external(b: Bundle, model, infer: str) -> None:
    """Resolve the graph's external tensors (initializers, Constant nodes, nested graphs,
    functions: all of them) from the verified weights.bin only: each must name weights.bin at
    the offset and length the manifest lists for it (``check_external_data`` has checked the
    bytes the model came from; checked again here on the parsed model)."""
    fd = b.open_weights()
    try:
        for t in all_tensors(model):
            if t.data_location != 1 and not t.external_data:  # not EXTERNAL
                continue
            ext = {e.key: e.value for e in t.external_data}
            w = b.manifest.weights.get(t.name)
            if (w is None or t.name not in b.manifest.graph_weights.get(infer, [])
                    or ext.get("location") != names.WEIGHTS_FILE
                    or _number(ext.get("offset", "0")) != w.offset
                    or _number(ext.get("length", str(w.length))) != w.length):
                where = str(ext.get("location"))[:80]
                raise UserError(f"{infer}: tensor '{t.name[:80]}' points at external data "
                                f"{where!r} that the manifest does not list; the bundle is "
                                "damaged or was tampered with; re-export it")
            t.raw_data = _read_weight(b, fd, t.name)
            del t.external_data[:]
            t.data_location = 0
    finally:
        if fd is not None:
            os.close(fd)


def _number(text: str) -> int | None:
    """An external-data offset or length as ONNX writes it (decimal digits); None otherwise."""
    return int(text) if text.isascii() and text.isdigit() and len(text) <= 20 else None


def _build_model(b: Bundle, params: dict[str, np.ndarray]):
    onnx, numpy_helper = _import_onnx()
    infer = b.graph_file(names.INFER)
    from .sessions import check_external_data

    data = b.graph_bytes(names.INFER)
    check_external_data(b, infer, data)  # as training does: no file or byte range but listed ones
    try:
        model = onnx.load_from_string(data)
    except Exception as exc:  # noqa: BLE001  (protobuf errors: a damaged bundle)
        raise UserError(f"cannot read {infer}: {str(exc)[:160]}; re-export the bundle") from None
    del data
    _fill_external(b, model, infer)
    g = model.graph
    inputs = {i.name for i in g.input}
    missing = [n for n in params if n not in inputs]
    if missing:
        raise UserError(f"{infer} has no input for parameter(s) {', '.join(missing)}; "
                        "re-export the bundle")
    keep = [i for i in g.input if i.name not in params]
    del g.input[:]
    g.input.extend(keep)
    existing = {t.name for t in g.initializer}
    for name, value in params.items():
        if name in existing:
            raise UserError(f"{infer} already holds an initializer '{name}'; re-export the bundle")
        g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(value, np.float32),
                                                     name))
    restore_lookups(b, model, onnx)
    model.producer_name = "instant-runtime export-model"
    return onnx, model


def restore_lookups(b: Bundle, model, onnx) -> None:
    """Put back the embedding lookups the runtime did itself (``Gather`` of the frozen table by
    the token ids), so the written model takes the same inputs as the original."""
    g = model.graph
    lookups = b.lookups
    if not lookups:
        return
    keep = [i for i in g.input if i.name not in lookups]
    del g.input[:]
    g.input.extend(keep)
    fd = b.open_weights()
    try:
        for out, lk in lookups.items():
            t = b.manifest.weights[lk.table]
            table = np.frombuffer(_read_weight(b, fd, lk.table), np.dtype(t.dtype)).reshape(t.shape)
            g.initializer.append(onnx.numpy_helper.from_array(table, lk.table))
            g.node.insert(0, onnx.helper.make_node("Gather", [lk.table, lk.indices], [out],
                                                   name=f"lookup/{out}", axis=0))
    finally:
        if fd is not None:
            os.close(fd)


def _fresh_tmpdir(out: Path) -> Path:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        drop_dead_staging(out, "export-model.")  # (a SIGKILLed export-model's: session 36)
        return Path(tempfile.mkdtemp(prefix=f".{out.name[:100]}.export-model.{os.getpid()}.",
                                     dir=out.parent))
    except OSError as exc:
        raise UserError(f"cannot write to '{out.parent}': {exc.strerror or exc}; pass another "
                        "--out") from None


def _write_onnx(onnx, model, tmp: Path, name: str) -> str | None:
    """Write the model as ``tmp/name``; returns the name of its external data file, if any."""
    data_name = name + ".data"
    if model.ByteSize() > MAX_INLINE_BYTES:
        onnx.save_model(model, str(tmp / name), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=data_name, size_threshold=1024)
        return data_name
    onnx.save_model(model, str(tmp / name))
    return None


def _check_not_a_source(targets: list[Path], b: Bundle, weights: Path) -> None:
    """No file export-model writes may land in a bundle folder (its files are checked by their
    sizes and checksums, and without torch it cannot be re-exported) or on a run's own files
    (weights, checkpoints, metrics; a fleet's aggregate): the source's or any other's (session
    41 probe: ``--out OTHER_RUN/params.npz --overwrite`` replaced another run's weights).

    Raises:
        UserError: a target that does.
    """
    from .bundle import is_bundle
    from .fleet.folders import FLEET_FILES, fleet_role
    from .run_files import RUN_FILES, is_run

    run_dir = weights.resolve().parent
    if run_dir.name == "checkpoints":
        run_dir = run_dir.parent
    for t in targets:
        folder = t.parent.resolve()  # (the name itself unresolved: a link there is replaced)
        where = folder / t.name
        if folder == b.path.resolve() or is_bundle(folder):
            raise UserError(f"--out '{targets[0]}' would write '{t.name}' into the bundle folder "
                            f"{folder}, whose files the bundle's manifest checks; pass an --out "
                            "outside it")
        owner = next((p.parent for p in where.parents if p.name == "checkpoints"
                      and (p.parent == run_dir or is_run(p.parent))), None)
        if owner is not None:
            raise UserError(f"--out '{targets[0]}' would write '{t.name}' into the checkpoints "
                            f"folder of the run {owner}, which keeps it for itself; pass "
                            "an --out outside it")  # (not as a file it would replace: session 34)
        fleet = t.name in FLEET_FILES and fleet_role(folder) is not None
        if where == weights.resolve() or fleet or t.name in RUN_FILES and (
                folder == run_dir or is_run(folder)):
            raise UserError(f"--out '{targets[0]}' would replace the run's own file '{t}'; pass "
                            "another --out")


def export_model(source: str | Path, out: str | Path, weights: str | Path | None = None,
                 bundle: str | Path | None = None, overwrite: bool = False) -> ExportResult:
    """Write the standalone ``.onnx`` (and ``.safetensors`` when possible) for ``source``.

    Raises:
        UserError: a bad source or bundle, or output files that exist (without ``overwrite``).
    """
    text = str(out)
    out = Path(out)
    last = os.path.basename(text)  # Path drops a trailing '/' or '/.': 'new/' named a file
    if text.rstrip("/") and not last:
        raise UserError(f"--out '{text}' ends in a slash (a folder); name the .onnx file to "
                        f"write, e.g. {out / 'model.onnx'}")
    if not last or last in (".", "..") or last.startswith(".") and not Path(last).suffix:
        near = out.parent if last.startswith(".") and last not in (".", "..") else out
        raise UserError(f"--out '{text}' names no file; name the .onnx file to write, e.g. "
                        f"{near / 'model.onnx'}")
    targets = [out, out.with_suffix(".safetensors"), out.parent / (out.name + ".data"),
               out.with_suffix(".labels.json"), out.with_suffix(".tokenizer.json"),
               out.with_suffix(".preprocess.json")]
    if out.is_dir():
        raise UserError(f"--out '{out}' is a directory; name the .onnx file to write")
    if out in targets[1:]:
        raise UserError(f"--out '{out}' is the name of a file written beside the model; name "
                        f"the .onnx file, e.g. {out.with_suffix('.onnx')}")
    for t in targets:
        refuse_special(t)
    b, w = resolve_source(source, weights, bundle)
    _check_not_a_source(targets, b, Path(w))  # (first: --overwrite would not help there)
    taken = [str(t) for t in targets if t.exists()]
    if taken and not overwrite:
        raise UserError(f"{', '.join(taken)} already exist(s); pass --overwrite to replace, or "
                        "another --out")
    params = b.load_params(None if w == b.path / names.PARAMS_FILE else w)
    onnx, model = _build_model(b, params)
    labels = _class_names(b, w)
    images = b.manifest.image is not None and not _trained_on_arrays(w)
    # every file is written into a folder beside --out first and moved in place once all are
    # complete: a failure (a full disk) leaves what was at --out as it was
    tmp = _fresh_tmpdir(out)
    try:
        try:
            data_name = _write_onnx(onnx, model, tmp, out.name)
            wrote = write_safetensors(b, params, tmp / "model.safetensors")
            if labels:
                text = json.dumps(labels, indent=1)
                atomic_write(tmp / "labels.json", lambda p: write_text(p, text))
            if b.manifest.text is not None:
                data_tok = _fixed_length_tokenizer(b.read_file(b.manifest.text.tokenizer),
                                                   b.manifest.text.seq_len)
                atomic_write(tmp / "tokenizer.json", lambda p: _write_bytes(p, data_tok))
            if images:
                from .sources import preprocessing

                prep = json.dumps(preprocessing(b.manifest.image, b.manifest.inputs), indent=1)
                atomic_write(tmp / "preprocess.json", lambda p: write_text(p, prep))
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001 - OSError, safetensors' own error
            why = getattr(exc, "strerror", None) or str(exc).splitlines()[0][:200] or \
                type(exc).__name__
            raise UserError(f"cannot write the model beside '{out}': {why}; nothing at --out "
                            "was changed: free space or pass another --out") from None
        st = out.with_suffix(".safetensors")
        labels_path = out.with_suffix(".labels.json") if labels else None
        tok_path = out.with_suffix(".tokenizer.json") if b.manifest.text is not None else None
        prep_path = out.with_suffix(".preprocess.json") if images else None
        data = out.parent / data_name if data_name else None
        moves = [(data_name, data), ("model.safetensors", st if wrote else None),
                 ("labels.json", labels_path), ("tokenizer.json", tok_path),
                 ("preprocess.json", prep_path),
                 (out.name, out)]  # the .onnx last: it names its data file
        # a stop signal waits until every file is in place (session 36 probe: Ctrl-C between
        # two moves of an --overwrite left one model's .onnx beside another's .safetensors)
        written = {out, data, st if wrote else None, labels_path, tok_path, prep_path}
        placed: list[Path] = []
        try:
            with deferred_signals():
                for name, target in moves:
                    if target is not None and overwrite:
                        os.replace(tmp / name, target)
                    elif target is not None:
                        _place_new(tmp / name, target)
                        placed.append(target)
                for t in targets:  # a replaced export's companion this model lacks
                    if overwrite and t not in written and t.exists():
                        t.unlink()
        except FileExistsError as exc:  # (a session 44 probe: two at once both said written)
            for t in placed:  # this command's own files, just made: nothing of it is left
                t.unlink(missing_ok=True)
            raise UserError(f"'{exc.filename}' was written meanwhile (another export-model to "
                            "this --out?) and is kept; pass --overwrite to replace it, or "
                            "another --out") from None
        except OSError as exc:
            raise UserError(f"cannot write '{out}': {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    src = Path(source)
    return ExportResult(out, data, st if wrote else None, w, len(params), labels_path, tok_path,
                        str(b.manifest.source).lower().endswith(".onnx"),
                        None if bundle is not None or b.path in (src, src.parent) else b.path,
                        prep_path, packed_recurrent(b) if wrote else None)


def _place_new(src: Path, target: Path) -> None:
    """Move ``src`` to ``target`` where no file is there, else ``FileExistsError``: a hard
    link then an unlink, so a file another command wrote meanwhile is never replaced (a file
    system without hard links, FAT on an SD card: checked, then renamed)."""
    import errno

    try:
        os.link(src, target)
    except FileExistsError:  # (its filename is the staging file's: the target is named)
        raise FileExistsError(errno.EEXIST, "File exists", str(target)) from None
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EROFS, errno.EDQUOT):
            raise
        # no hard links here (EPERM, ENOTSUP, EXDEV; EACCES on some CIFS/FUSE mounts)
        if target.exists() or target.is_symlink():
            raise FileExistsError(errno.EEXIST, "File exists", str(target)) from None
        os.rename(src, target)
        return
    os.unlink(src)


def _fixed_length_tokenizer(data: bytes, seq_len: int) -> bytes:
    """The tokenizer set to truncate and pad to the model's sequence length, as in training, so
    ``encode_batch`` output feeds the exported model as it is (without ``tokenizers`` installed,
    the file is written as the bundle holds it)."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        return data
    from .sources.tokens import load_tokenizer

    try:
        tok = Tokenizer.from_str(data.decode("utf-8"))
    except Exception as exc:  # tokenizers raises plain Exception for a bad file
        raise UserError(f"the bundle's tokenizer cannot be read ({str(exc)[:120]}); re-export "
                        "the bundle") from None
    return load_tokenizer(tok, seq_len).to_str().encode("utf-8")


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _run_of(weights: Path) -> Path:
    """The run folder of ``weights``: its params.npz's, or one folder up from a checkpoint."""
    folder = Path(weights).parent
    return folder.parent if folder.name == "checkpoints" and not (
        folder / "run.json").exists() else folder


def _trained_on_arrays(weights: Path) -> bool:
    """Whether the run recorded arrays or text rows as its data (an .npz, .csv, ...): a float
    [N, A, B] input that could be a grey image (session 27 probe: a Conv1d sensor model) then
    gets no image preprocessing. Unknown (no run.json, a built-in, a folder): images."""
    data = json_object(_run_of(weights) / "run.json").get("data")
    return isinstance(data, str) and Path(data).suffix.lower() in (".npz", *TEXT_SUFFIXES)


def _class_names(b: Bundle, weights: Path) -> list[str] | None:
    """The run's label map (``run.json`` next to its params.npz, or one folder up from a
    checkpoint), else the bundle's."""
    names_ = run_class_names(_run_of(weights), b)
    return names_ if names_ is not None else b.manifest.class_names
