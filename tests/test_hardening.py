"""Bad input, table-driven: every case runs the real CLI in a subprocess under a timeout and must
end with a non-zero exit, exactly one ``error:`` line on stderr that names the problem and the
way out, no traceback, and every file that existed before byte-identical afterwards.

The security cases plant a secret file outside the bundle and check its bytes appear in no
output, whatever the bundle's manifest or symlinks say.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SECRET = b"TOP-SECRET-" + b"s3cr3t" * 700  # > 4 KB: stands out in any output
TIMEOUT = 120
MAX_ERROR_LINE = 1000  # an error line never echoes a giant value in full


@dataclass
class Ctx:
    tmp: Path
    bundle: Path  # a private copy of the mlp bundle (tamper freely)
    secret: Path
    full: Path  # a private copy of the mlp bundle with every layer trainable (INSTANT layers)

    def manifest(self, bundle: Path | None = None) -> dict:
        return json.loads(((bundle or self.bundle) / "manifest.json").read_text())

    def write_manifest(self, m: dict, bundle: Path | None = None) -> None:
        ((bundle or self.bundle) / "manifest.json").write_text(json.dumps(m))


def _snapshot(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _run(argv: list[str], timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "runtime", *argv], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, check=False)


def _npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def _digits_npz(path: Path, n: int = 40, **extra) -> Path:
    x = np.random.default_rng(0).random((n, 64), dtype=np.float32)
    return _npz(path, x=x, y=np.arange(n) % 10, **extra)


# ------------------------------------------------------------------------------ the table
CASES: list[tuple[str, Callable[[Ctx], list[str]], list[str]]] = []


def case(name: str, *fragments: str):
    def register(fn):
        CASES.append((name, fn, list(fragments)))
        return fn
    return register


TRAIN = ["--steps", "2", "--no-progress", "--threads", "1"]


def _train(c: Ctx, *extra: str, data: str = "digits") -> list[str]:
    return ["train", str(c.bundle), "--data", data, "--out", str(c.tmp / "run"), *TRAIN, *extra]


# --- security: the bundle is untrusted ---------------------------------------------------
@case("symlinked-weights-to-outside", "symbolic link", "re-export")
def _(c):
    (c.bundle / "weights.bin").unlink()
    (c.bundle / "weights.bin").symlink_to(c.secret)
    return ["export-model", str(c.bundle), "--out", str(c.tmp / "x.onnx")]


@case("unlisted-weights-via-lookup", "must list weights.bin", "re-export")
def _(c):
    m = c.manifest()
    m["files"].pop("weights.bin", None)
    m["weights"]["stolen"] = {"offset": 0, "length": 16, "shape": [4], "dtype": "float32"}
    m["lookups"]["stolen.rows"] = {"table": "stolen", "indices": m["inputs"][0]["name"]}
    (c.bundle / "weights.bin").unlink(missing_ok=True)
    (c.bundle / "weights.bin").symlink_to(c.secret)
    c.write_manifest(m)
    return ["export-model", str(c.bundle), "--out", str(c.tmp / "x.onnx")]


@case("graph-path-outside", "plain file name inside the bundle folder")
def _(c):
    m = c.manifest()
    m["graphs"]["infer"]["forward"] = str(c.secret)
    c.write_manifest(m)
    return ["export-model", str(c.bundle), "--out", str(c.tmp / "x.onnx")]


@case("needs-a-newer-onnxruntime", "needs onnxruntime >= 99.1, installed onnxruntime",
      "pip install -U onnxruntime")
def _(c):
    m = c.manifest()
    m["min_onnxruntime"] = "99.1"
    c.write_manifest(m)
    return _train(c)


@case("manifest-class-names-repeated", "class_names", "repeats the name 'a'", "re-export")
def _(c):
    """Session 38 probe: a manifest naming its classes ["a", "a", "b", ...] trained, and
    export-model wrote those labels (export --classes refuses a repeated name)."""
    m = c.manifest()
    m["class_names"] = ["a", "a", *"bcdefghi"]
    c.write_manifest(m)
    return _train(c)


@case("min-onnxruntime-not-a-version", "min_onnxruntime 'latest' in manifest.json is not a "
      "version", "re-export")
def _(c):
    m = c.manifest()
    m["min_onnxruntime"] = "latest"
    c.write_manifest(m)
    return _train(c)


@case("manifest-of-millions-of-values", "JSON values, more than a manifest can have",
      "re-export")
def _(c):
    """Session 21 probe: 3.3 million empty lists (10 MB) under an unknown key took the process
    to 936 MB under --budget 200MB (parsed, then a path per value) before the one-line error."""
    text = json.dumps({**c.manifest(), "junk": "@@"})
    (c.bundle / "manifest.json").write_text(text.replace('"@@"', "[" + "[]," * 1_100_000 + "[]]"))
    return [*_train(c), "--budget", "200MB"]


@case("files-entry-dotdot", "not a plain file name inside the bundle folder")
def _(c):
    m = c.manifest()
    m["files"]["../secret.txt"] = {"bytes": len(SECRET), "sha256": "0" * 64}
    c.write_manifest(m)
    return _train(c)


@case("graph-external-data-outside", "points at external data", "re-export")
def _(c):
    import onnx
    from onnx import external_data_helper

    path = c.bundle / "infer.onnx"
    model = onnx.load(str(path), load_external_data=False)
    t = next(t for t in model.graph.initializer if t.data_location == 1)
    for e in t.external_data:
        if e.key == "location":
            e.value = "../secret.txt"
    del external_data_helper  # the entry is edited in place
    onnx.save(model, str(path))
    m = c.manifest()
    data = path.read_bytes()
    m["files"]["infer.onnx"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    c.write_manifest(m)
    return ["export-model", str(c.bundle), "--out", str(c.tmp / "x.onnx")]


@case("graph-external-data-outside-train", "points at external data", "re-export")
def _(c):
    argv = CASES[[n for n, _, _ in CASES].index("graph-external-data-outside")][1](c)
    assert argv[0] == "export-model"
    return _train(c)


def _train_on_edited_forward(c: Ctx, model, split: bool = False) -> list[str]:
    """Save ``model`` as the bundle's vanilla forward with its hash updated in the manifest
    (what a deliberate tamperer does); the train command that then runs it. ``split``: the
    graph written as two occurrences of ModelProto.graph, its nodes in the first and the rest
    in the second (protobuf, and so onnxruntime, merges them into one graph)."""
    import onnx

    path = c.bundle / "vanilla.forward.onnx"
    if split:
        nodes, rest = onnx.GraphProto(), onnx.GraphProto()
        nodes.node.extend(model.graph.node)
        rest.CopyFrom(model.graph)
        del rest.node[:]
        model.ClearField("graph")
        path.write_bytes(model.SerializeToString() + b"".join(
            _field(7, g.SerializeToString()) for g in (nodes, rest)))
        assert len(onnx.load_from_string(path.read_bytes()).graph.node) == len(nodes.node)
    else:
        onnx.save(model, str(path))
    m = c.manifest()
    data = path.read_bytes()
    m["files"][path.name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    c.write_manifest(m)
    return _train(c, "--mode", "vanilla")


@case("graph-opset-999", "cannot load", "Opset 999", "re-export")
def _(c):
    """Session 23 probe: the error line was cut off inside onnxruntime's C++ function
    signature, before the reason."""
    import onnx

    model = onnx.load(str(c.bundle / "vanilla.forward.onnx"), load_external_data=False)
    model.opset_import[0].version = 999
    return _train_on_edited_forward(c, model)


@case("graph-with-an-endless-loop", "holds a Loop node", "re-export")
def _(c):
    """A Loop of 2^62 iterations in the training forward (hashes updated): refused before
    onnxruntime sees it, where the step would never end (and ignored SIGINT / SIGTERM)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(c.bundle / "vanilla.forward.onnx"), load_external_data=False)
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"])], "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, [])])
    model.graph.initializer.extend([numpy_helper.from_array(np.array(2 ** 62), "trips"),
                                    numpy_helper.from_array(np.array(True), "go")])
    model.graph.node.insert(0, helper.make_node("Loop", ["trips", "go"], [], body=body))
    return _train_on_edited_forward(c, model)


@case("graph-in-ort-format-that-also-parses-as-onnx", "in onnxruntime's ORT format",
      "re-export")
def _(c):
    """Session 46 probe: onnxruntime reads its own flatbuffer format where bytes 4-7 are "ORTM";
    bytes laid out to be both that and a protobuf with no nodes hid an endless Loop from every
    check, and the step ran for good, deaf to SIGTERM. Here the ORT model's body moves to
    offset 65536 (the root offset's bytes 00 00 01 00 then read as protobuf field-0 pairs that
    swallow "ORTM"), wrapped in one opaque field 2."""
    import struct

    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    path = c.bundle / "vanilla.forward.onnx"
    model = onnx.load(str(path), load_external_data=False)
    body = helper.make_graph(
        [helper.make_node("Identity", ["go_in"], ["go_out"]),
         helper.make_node("Identity", ["n_in"], ["n_out"])], "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("go_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("n_in", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("go_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("n_out", TensorProto.FLOAT, [])])
    model.graph.initializer.extend([numpy_helper.from_array(np.array(2 ** 62), "trips"),
                                    numpy_helper.from_array(np.array(True), "go"),
                                    numpy_helper.from_array(np.float32(0), "n")])
    model.graph.node.append(helper.make_node("Loop", ["trips", "go", "n"], ["spun"], body=body))
    model.graph.output.append(helper.make_tensor_value_info("spun", TensorProto.FLOAT, []))
    for k in range(8):  # a doc string that puts the root table 8-aligned (moved, it stays)
        model.doc_string = "d" * k
        argv = _train_on_edited_forward(c, model)
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        so.optimized_model_filepath = str(c.tmp / "loop.ort")
        so.add_session_config_entry("session.save_model_format", "ORT")
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        flat = (c.tmp / "loop.ort").read_bytes()
        root = struct.unpack("<I", flat[:4])[0]
        if root % 8 == 0:
            break
    assert flat[4:8] == b"ORTM" and root % 8 == 0, flat[:8]
    start = 8 + 65536 - root  # where flat[8:] goes
    rest = start + len(flat) - 8 - 17  # field 2's key at 13, a 3-byte length, data from 17
    assert 1 << 14 <= rest < 1 << 21, rest
    head = bytearray(start)
    head[:8] = struct.pack("<I", 65536) + b"ORTM"
    head[13:17] = bytes([0x12, 0x80 | rest & 0x7F, 0x80 | rest >> 7 & 0x7F, rest >> 14])
    data = bytes(head) + flat[8:]
    # onnxruntime, left to tell the format by the bytes, loads the model with its Loop
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == \
        [o.name for o in ort.InferenceSession(str(path)).get_outputs()]
    path.write_bytes(data)
    m = c.manifest()
    m["files"][path.name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    c.write_manifest(m)
    return argv


@case("graph-sized-by-the-weights", "its Range node sizes a tensor by values that change as "
      "the run trains", "re-export")
def _(c):
    """Session 44 probe: a forward graph whose Unique ran over a Range as long as the weights'
    distance from their start (0 at the initial weights the planning probes see) took the run
    to 390 MB under --budget 256MB; refused before onnxruntime sees it. Here the Range's
    length is the weights' sum of magnitudes, and its nodes come before those that make it
    (onnxruntime sorts them; a review: a one-pass scan in file order missed it)."""
    return _train_on_edited_forward(c, _sized_by_the_weights(c))


@case("graph-sized-by-the-weights-split-in-two", "its Range node sizes a tensor by values "
      "that change as the run trains", "re-export")
def _(c):
    """Session 49 probe: the same graph written as two parts of ModelProto.graph, the nodes in
    the first: the scan kept the last part (no nodes) and passed it; the run took 778 MB under
    --budget 256MB."""
    return _train_on_edited_forward(c, _sized_by_the_weights(c), split=True)


def _sized_by_the_weights(c: Ctx):
    """The bundle's forward with a Range as long as the weights' sum of magnitudes."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(c.bundle / "vanilla.forward.onnx"), load_external_data=False)
    w = c.manifest()["params"][0]["name"]
    model.graph.initializer.extend([numpy_helper.from_array(np.float32(0), "r0"),
                                    numpy_helper.from_array(np.float32(1), "r1")])
    model.graph.node.extend([
        helper.make_node("Range", ["r0", "w_sum", "r1"], ["spread"]),
        helper.make_node("Unique", ["spread"], ["spread_unique"]),
        helper.make_node("ReduceSum", ["w_abs"], ["w_sum"], keepdims=0),
        helper.make_node("Abs", [w], ["w_abs"])])
    model.graph.output.append(helper.make_tensor_value_info("spread_unique", TensorProto.FLOAT,
                                                            None))
    return model


@case("graph-asks-for-4-terabytes", "out of memory", "smaller --batch")
def _(c):
    """Without a budget, an allocation onnxruntime cannot make is the machine's limit, not a
    budget's: the message says so (it once said "raise --budget" with no budget given)."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(c.bundle / "vanilla.forward.onnx"), load_external_data=False)
    model.graph.initializer.append(helper.make_tensor("bomb_shape", TensorProto.INT64, [2],
                                                      [1_000_000, 1_000_000]))
    model.graph.node.extend([helper.make_node("ConstantOfShape", ["bomb_shape"], ["bomb"]),
                             helper.make_node("ReduceSum", ["bomb"], ["bomb_sum"], keepdims=0)])
    model.graph.output.append(helper.make_tensor_value_info("bomb_sum", TensorProto.FLOAT, []))
    return _train_on_edited_forward(c, model)


@case("pickled-params", "is object [1], the bundle expects float32", "re-export the bundle")
def _(c):
    p = c.bundle / "params.npz"
    m = c.manifest()
    np.savez(p, **{m["params"][0]["name"]: np.array([{"a": 1}], dtype=object)},
             pad=np.zeros(1 << 14, np.float32))  # (its size as the params' shapes say)
    data = p.read_bytes()
    m["files"]["params.npz"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    c.write_manifest(m)
    return _train(c)


@case("params-of-integers", "is int64 [", "the bundle expects float32", "re-export the bundle")
def _(c):  # session 40 probe: the right shape in int64 was called "of another shape"
    arrays = {k: v.astype(np.int64) for k, v in _params_now(c).items()}
    _params_edited(c, arrays)
    return _train(c)


@case("params-not-an-npz", "cannot read parameters", "; re-export the bundle")
def _(c):  # session 40 probe: the way out was "pass another --init-from", never passed
    _params_edited(c, _params_now(c), lambda p, **a: Path(p).write_bytes(b"not a zip " * 2000))
    return _train(c)


def _params_edited(c: Ctx, arrays: dict, savez=np.savez) -> None:
    """params.npz rewritten with ``arrays`` (by ``savez``), the manifest's shapes and file entry
    edited to match: a bundle consistent in all but its graphs."""
    p = c.bundle / "params.npz"
    savez(p, **arrays)
    m = c.manifest()
    for spec in m["params"]:
        spec["shape"] = list(arrays[spec["name"]].shape)
    data = p.read_bytes()
    m["files"]["params.npz"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    c.write_manifest(m)


def _params_now(c: Ctx) -> dict:
    with np.load(c.bundle / "params.npz") as z:
        return {k: z[k] for k in z.files}


@case("params-of-another-shape-than-the-graphs", "takes trainable tensor", "[300, 300]",
      "re-export")
def _(c):  # session 28 probe: [20000, 20000] took 7.9 GB before onnxruntime refused it
    arrays = _params_now(c)
    arrays[next(iter(arrays))] = np.zeros((300, 300), np.float32)
    _params_edited(c, arrays)
    return _train(c)


@case("params-declared-beyond-their-file", "field 'params': their shapes hold",
      "more than params.npz's", "re-export the bundle")
def _(c):  # session 40 probe: `plan` advised an 18 EB budget for [2^31-1, 2^31-1]
    m = c.manifest()
    m["params"][0]["shape"] = [2**31 - 1, 2**31 - 1]
    c.write_manifest(m)
    return ["plan", str(c.bundle), "--data", "digits", "--budget", "300MB", "--threads", "1"]


@case("params-deflated", "is compressed", "re-export")
def _(c):  # a small file that inflates to far more than its listed size
    _params_edited(c, _params_now(c), np.savez_compressed)
    return _train(c)


@case("param-name-forging-an-error-line", "params[0].name", "without control characters",
      "re-export")
def _(c):  # session 28 probe: a second line "error: injected" in the refusal
    m = c.manifest()
    m["params"][0]["name"] += "\nerror: injected \x1b[31m"
    c.write_manifest(m)
    return _train(c)


@case("out-path-with-a-newline", "\\nline", "cannot be created")
def _(c):  # a user's path (a file where a folder is asked for): its newline stays escaped
    (c.tmp / "afile").write_text("x")
    return [*_train(c)[:-len(TRAIN) - 2], "--out", str(c.tmp / "afile" / "new\nline"),
            *TRAIN]


# --- manifest fields ------------------------------------------------------------------------
def _field(path: list, value):
    def edit(c: Ctx) -> list[str]:
        m = c.manifest()
        cur = m
        for k in path[:-1]:
            cur = cur[k]
        cur[path[-1]] = value
        c.write_manifest(m)
        return _train(c)
    return edit


for _name, _path, _value, _frag in [
    ("files-a-list", ["files"], [], "field 'files': expected an object"),
    ("num-classes-string", ["loss", "num_classes"], "10", "field 'loss.num_classes'"),
    ("version-string", ["format_version"], "3", "field 'format_version': expected an integer"),
    ("instant-null", ["instant"], None, "field 'instant'"),
    ("size-string", ["files", "params.npz", "bytes"], "16384", "expected an integer"),
    ("offset-huge", ["weights", "0.weight", "offset"], 10**12, "lie outside weights.bin"),
    ("energy-out-of-range", ["instant", "settings", "energy"], 2.0, "settings.energy"),
]:
    case(f"manifest-{_name}", _frag)(_field(_path, _value))


@case("manifest-unknown-field", "unknown field 'surprise'")
def _(c):
    m = c.manifest()
    m["surprise"] = 1
    c.write_manifest(m)
    return _train(c)


@case("manifest-with-a-repeated-key", "the key 'format_version' appears twice", "re-export")
def _(c):
    """Session 46 probe: of a key written twice the last value won without a word (two
    "output" values: the run failed later, in onnxruntime's evaluation pass)."""
    text = (c.bundle / "manifest.json").read_text()
    assert text.startswith("{")
    (c.bundle / "manifest.json").write_text('{"format_version": 999, ' + text[1:])
    return _train(c)


# --- hyperparameters ------------------------------------------------------------------------
for _flag, _value, _frag in [
    ("--lr", "nan", "--lr"), ("--lr", "inf", "--lr"), ("--lr", "-1", "--lr"),
    ("--weight-decay", "nan", "--weight-decay"), ("--steps", "0", "--steps"),
    ("--steps", "-1", "--steps"), ("--batch", "0", "--batch"), ("--batch", "-4", "--batch"),
    ("--micro-batch", "0", "--micro-batch"), ("--max-rank", "0", "--max-rank"),
    ("--energy", "2", "--energy"), ("--energy", "nan", "--energy"),
    ("--oversample", "-3", "--oversample"), ("--threads", "-1", "--threads"),
    ("--threads", "100000", "--threads"), ("--calib-batches", "0", "--calib-batches"),
    ("--val-split", "1.5", "--val-split"), ("--lr", "abc", "invalid float value"),
    ("--stop-grace", "0", "seconds from 1 to 86400"), ("--stop-grace", "nan", "--stop-grace"),
    ("--stop-grace", "1e9", "terminationGracePeriodSeconds"),
]:
    case(f"option{_flag}={_value}", _frag)(
        lambda c, f=_flag, v=_value: _train(c, f, v))


# session 27 probe: one rank policy's option with the other policy was silently ignored
for _opts, _frag in [(("--rank-policy", "energy", "--variance", "0.5"), "uses the energy policy"),
                     (("--energy", "0.9", "--variance", "0.5"), "(--energy asks for it)"),
                     (("--rank-policy", "budget", "--oversample", "3"), "--oversample sets the")]:
    case(f"options{'='.join(_opts)}", _frag, "leave one of them out")(
        lambda c, o=_opts: _train(c, *o))


@case("eval-batch-zero", "--batch")
def _(c):
    return ["eval", str(c.bundle), "--data", "digits", "--batch", "0"]


# --- data -----------------------------------------------------------------------------------
@case("data-empty-npz", "empty.npz")
def _(c):
    np.savez(c.tmp / "empty.npz")
    return _train(c, data=str(c.tmp / "empty.npz"))


@case("data-pickle-zip", "pickle.npz")
def _(c):
    with zipfile.ZipFile(c.tmp / "pickle.npz", "w") as z:
        z.writestr("x.npy", b"\x80\x04\x95" + b"\x00" * 64)
        z.writestr("y.npy", b"\x80\x04\x95" + b"\x00" * 64)
    return _train(c, data=str(c.tmp / "pickle.npz"))


@case("data-huge-values", "x")
def _(c):
    x = np.full((40, 64), 3e38, np.float32)
    _npz(c.tmp / "huge.npz", x=x, y=np.arange(40) % 10)
    return _train(c, data=str(c.tmp / "huge.npz"))


@case("data-x-test-without-y-test", "x_test")
def _(c):
    x = np.random.default_rng(0).random((40, 64), dtype=np.float32)
    _npz(c.tmp / "half.npz", x=x, y=np.arange(40) % 10, x_test=x[:5])
    return _train(c, data=str(c.tmp / "half.npz"))


# --- outputs are never overwritten or mixed ---------------------------------------------------
@case("train-into-another-run", "already holds a training run", "--resume", "--overwrite")
def _(c):
    out = c.tmp / "run"
    out.mkdir()
    (out / "params.npz").write_bytes(b"the other run's weights")
    (out / "run.json").write_text('{"format": "instant-runtime-run", "bundle_sha256": "ab"}')
    return _train(c)


for _flag in ("--overwrite", "--resume"):
    @case(f"train{_flag}-into-files-named-like-a-run", "but no training run",
          "new or empty folder")
    def _(c, _flag=_flag):
        """A probe's: a folder of the user's with summary.json and checkpoints/ (no run.json)
        was taken for a run: --overwrite deleted them, --resume wrote over summary.json."""
        out = c.tmp / "run"
        (out / "checkpoints").mkdir(parents=True)
        (out / "checkpoints" / "model_epoch3.pt").write_bytes(b"the user's own checkpoint")
        (out / "summary.json").write_text('{"my": 1}')
        (out / "notes.txt").write_text("mine")
        return _train(c, _flag)


@case("train-negative-budget", "--budget: invalid size '-5MB'", "greater than zero")
def _(c):
    """argparse read '-5MB' as an option: "expected one argument", naming neither."""
    return ["train", str(c.bundle), "--data", "digits", "--out", str(c.tmp / "run"),
            "--budget", "-5MB", *TRAIN]


@case("train-out-under-a-file", "is a file")
def _(c):
    (c.tmp / "blocker").write_text("x")
    return ["train", str(c.bundle), "--data", "digits", "--out", str(c.tmp / "blocker" / "run"),
            *TRAIN]


@case("export-model-existing-onnx", "already exist", "--overwrite")
def _(c):
    (c.tmp / "m.onnx").write_bytes(b"someone's model")
    return ["export-model", str(c.bundle), "--out", str(c.tmp / "m.onnx")]


def _trained(c: Ctx, *extra: str) -> Path:
    """c.tmp/run: a 2-step run of c.bundle with a checkpoint (the cases below tamper with it)."""
    r = _run(_train(c, "--checkpoint-every", "1", *extra))
    assert r.returncode == 0, r.stderr
    return c.tmp / "run"


@case("resume-a-finished-run-without-checkpoints", "no checkpoint to resume from",
      "--overwrite instead of --resume")
def _(c):
    """A probe's: --resume found no checkpoint, started afresh and replaced the finished run's
    params.npz (and summary) without --overwrite."""
    run = _trained(c)
    shutil.rmtree(run / "checkpoints")
    (run / "checkpoints").mkdir()
    return _train(c, "--resume")


@case("resume-a-checkpoint-whose-step-is-not-its-name", "no intact checkpoint",
      "is not the 9 of its name")
def _(c):
    """A checkpoint claiming another step (a probe's 10^30) resumed "from" it and trained
    nothing; its step must be the one its name and the pointer give."""
    run = _trained(c)
    folder = run / "checkpoints"
    for f in folder.glob("ckpt-*.npz"):
        f.unlink() if f.name != "ckpt-000002.npz" else f.rename(folder / "ckpt-000009.npz")
    pointer = json.loads((folder / "latest").read_text())
    pointer["checkpoints"] = [dict(e, file="ckpt-000009.npz", step=9)
                              for e in pointer["checkpoints"] if e["file"] == "ckpt-000002.npz"]
    (folder / "latest").write_text(json.dumps(pointer))
    return _train(c, "--resume", "--steps", "12")


@case("export-model-of-a-run-whose-bundle-was-replaced", "was trained on another bundle",
      "--bundle DIR")
def _(c):
    """A probe's: export-model baked a run's weights into another bundle of the same name
    (its run.json's manifest hash was recorded and never compared)."""
    run = _trained(c)
    m = c.manifest()
    m["flops"] = {**m["flops"], "forward": m["flops"]["forward"] + 1}  # re-exported otherwise:
    c.write_manifest(m)  # another manifest (its export time alone is not: session 33)
    return ["export-model", str(run), "--out", str(c.tmp / "m.onnx")]


@case("train-text-column-with-a-built-in-dataset", "--text-column applies to .csv/.tsv/.jsonl",
      "leave --text-column out")
def _(c):
    """A probe's: --text-column with digits (or an .npz) was ignored without a word."""
    return _train(c, "--text-column", "review")


@case("export-over-a-bundle", "already exists", "--overwrite")
def _(c):
    return ["export", "--model", "mlp", "--out", str(c.bundle)]


@case("export-overwrite-of-a-bundle-holding-runs", "holds more than a bundle (run, sub",
      "move them out")
def _(c):
    """BUNDLE/run is train's default --out: --overwrite deleted its checkpoints."""
    for name in ("run", "sub"):
        (c.bundle / name / "checkpoints").mkdir(parents=True)
        (c.bundle / name / "run.json").write_text("{}")
        (c.bundle / name / "checkpoints" / "ckpt-000002.npz").write_bytes(b"weights")
    return ["export", "--model", "mlp", "--out", str(c.bundle), "--overwrite"]


@case("export-calib-every-past-2-53", "--calib-every 99999999999999999999 is invalid: at "
      "most 2**53", "pass e.g. 1000000000")
def _(c):
    """Session 47 probe: exported whole, then refused naming a staging folder's manifest.json
    and "re-export the bundle"."""
    return ["export", "--model", "mlp", "--out", str(c.tmp / "b"), "--calib-every",
            "99999999999999999999"]


@case("train-budget-of-no-unit", "--budget: invalid size '256': a unit is required")
def _(c):
    """Session 47 probe: "invalid size '256'" named no option."""
    return ["train", str(c.bundle), "--out", str(c.tmp / "run"), "--budget", "256", *TRAIN]


@case("eval-given-a-train-option", "unrecognized arguments: --steps 3",
      "see `instant-runtime eval --help`")
def _(c):
    """Session 47 probe: an option of another command was sent to `instant-runtime --help`."""
    return ["eval", str(c.bundle), "--steps", "3"]


@case("train-data-that-is-the-bundle-folder", "--data", "is a bundle folder, not data")
def _(c):
    """Session 47 probe: "is an image folder, but the bundle records no image input"."""
    return ["train", str(c.bundle), "--data", str(c.bundle), "--out", str(c.tmp / "run"), *TRAIN]


@case("no-command", "the following arguments are required: COMMAND",
      "see `instant-runtime --help`")
def _(c):  # (session 47 probe: "required: cmd", an internal name)
    return []


@case("export-instant-exclude-matching-nothing", "--instant-exclude 'fc9*' matches no",
      "check the name")
def _(c):
    """A typo left the layer compressed without a word (a --trainable typo was refused)."""
    return ["export", "--model", "mlp", "--out", str(c.tmp / "b"), "--instant-exclude", "fc9*"]


@case("export-empty-class-names", "--classes ',,,,,,,,,' holds an empty or repeated name",
      "one distinct name per class")
def _(c):
    return ["export", "--model", "mlp", "--out", str(c.tmp / "b"), "--classes", ",,,,,,,,,"]


def _text_model_and_tokenizer(c, tokens: int | None) -> list[str]:
    """A 50-row embedding model, and a tokenizer.json of ``tokens`` words (None: one the
    tokenizers library cannot read)."""
    f = c.tmp / "text.py"
    f.write_text("import torch.nn as nn\n"
                 "class M(nn.Module):\n"
                 "    def __init__(s):\n"
                 "        super().__init__(); s.e = nn.Embedding(50, 8); s.h = nn.Linear(8, 2)\n"
                 "    def forward(s, ids):\n"
                 "        return s.h(s.e(ids).mean(1))\n"
                 "def make():\n"
                 "    return M()\n")
    tok = c.tmp / "tokenizer.json"
    if tokens is None:
        tok.write_text('{"version": "1.0", "model": {"type": "NoSuchModel"}}')
    else:
        from tokenizers import Tokenizer, models

        Tokenizer(models.WordLevel({f"w{i}": i for i in range(tokens)}, unk_token="w0")
                  ).save(str(tok))
    return ["export", "--model", f"{f}:make", "--input-shape", "4,8:int64", "--tokenizer",
            str(tok), "--out", str(c.tmp / "b")]


@case("export-tokenizer-larger-than-the-embedding", "has 60 tokens but the model's input",
      "pass the model's own tokenizer")
def _(c):
    """Ids past the table failed only at the first training step, whose advice (re-export)
    could not help."""
    return _text_model_and_tokenizer(c, 60)


@case("export-unreadable-tokenizer", "cannot be read by the tokenizers library",
      "saved with the model")
def _(c):
    return _text_model_and_tokenizer(c, None)


@case("export-over-a-non-bundle", "is not a bundle", "another --out")
def _(c):
    d = c.tmp / "photos"
    d.mkdir()
    (d / "cat.jpg").write_bytes(b"\xff\xd8")
    return ["export", "--model", "mlp", "--out", str(d), "--overwrite"]


@case("train-out-is-the-bundle", "is a bundle folder", "another --out")
def _(c):
    return ["train", str(c.bundle), "--data", "digits", "--out", str(c.bundle), "--overwrite",
            *TRAIN]


@case("train-overwrite-that-fails-keeps-the-old-run", "non-finite", "lower --lr")
def _(c):
    r = _run(_train(c))  # a finished run in tmp/run; its replacement fails once it trains (a
    assert r.returncode == 0, r.stderr[-800:]  # --budget under the start-up is refused first)
    return _train(c, "--overwrite", "--lr", "1e30", "--steps", "5")


@case("export-overwrite-with-a-bad-option-keeps-the-bundle", "--image-std", "positive")
def _(c):
    return ["export", "--model", "cnn", "--input-shape", "4,1,8,8", "--image-std", "0",
            "--out", str(c.bundle), "--overwrite"]


@case("export-model-out-is-a-companion-file", "beside the model", ".onnx")
def _(c):
    return ["export-model", str(c.bundle), "--out", str(c.tmp / "model.safetensors")]


# --- not a file, not a name -------------------------------------------------------------------
@case("fifo-params", "not a regular file", "re-export")
def _(c):
    (c.bundle / "params.npz").unlink()
    os.mkfifo(c.bundle / "params.npz")
    return _train(c)


@case("fifo-data", "not a regular file")
def _(c):
    os.mkfifo(c.tmp / "data.csv")
    return _train(c, data=str(c.tmp / "data.csv"))


@case("out-name-too-long", "too long", "a file or folder name takes at most 255 bytes")
def _(c):
    return ["train", str(c.bundle), "--data", "digits", "--out", str(c.tmp / ("a" * 300)), *TRAIN]


@case("out-path-of-5000-characters", "characters); a file or folder name takes at most 255")
def _(c):
    """Session 47 probe: the 5,094-character line said the whole path."""
    return ["train", str(c.bundle), "--data", "digits", "--out", "9" * 5000, *TRAIN]


@case("data-empty-string", "--data is empty")
def _(c):
    return _train(c, data="")


@case("budget-empty-string", "--budget is empty")
def _(c):
    return _train(c, "--budget", "")


@case("data-blank-string", "--data is empty (' ' was given)")
def _(c):  # (session 47 probe: said "('' was given)")
    return _train(c, data=" ")


@case("budget-below-a-megabyte", "below 1 MB")
def _(c):
    return _train(c, "--budget", "100KB")


@case("budget-astronomical", "larger than any machine")
def _(c):
    return _train(c, "--budget", "9" * 25 + "GB")


@case("export-empty-onnx", "no ONNX opset")
def _(c):
    (c.tmp / "empty.onnx").write_bytes(b"")
    return ["export", "--model", str(c.tmp / "empty.onnx"), "--out", str(c.tmp / "b")]


# --- numerics ---------------------------------------------------------------------------------
@case("calib-batches-zero", "--calib-batches")
def _(c):
    return _train(c, "--calib-batches", "0")


# --- device profiles are files of sane size ---------------------------------------------------
@case("profile-fifo", "not a regular file", ".toml")
def _(c):
    """A FIFO as --profile: opening it for reading waited for a writer for ever."""
    os.mkfifo(c.tmp / "fifo.toml")
    return ["plan", str(c.bundle), "--profile", str(c.tmp / "fifo.toml")]


@case("profile-over-a-megabyte", "more than a profile can have", ".toml")
def _(c):
    """A profile larger than any profile (/dev/zero, which never ends, is refused the same way,
    as not a regular file): read whole, it grew the process without bound."""
    (c.tmp / "huge.toml").write_bytes(b"#" * (1 << 20) + b"\nname = 'x'\n")
    return ["plan", str(c.bundle), "--profile", str(c.tmp / "huge.toml")]


def _profile(c: Ctx, gflops: str) -> list[str]:
    (c.tmp / "dev.toml").write_text(
        'name = "dev"\ndescription = "d"\narch = "x86_64"\nram = "4GB"\ncores = 4\n'
        'execution_providers = ["CPUExecutionProvider"]\ndefault_threads = 1\n'
        f'default_budget = "1GB"\ngflops = {gflops}\n')
    return ["plan", str(c.bundle), "--profile", str(c.tmp / "dev.toml")]


for _value in ["nan", "inf", "1" + "0" * 400, "1e-300"]:
    case(f"profile-gflops={_value[:8]}", "field 'gflops'")(lambda c, v=_value: _profile(c, v))


@case("plan-absurd-batch", "--batch 1000000000000", "must be 1 to")
def _(c):
    """``plan --batch`` of 300 digits printed an absurd step estimate; train caps it."""
    return ["plan", str(c.bundle), "--profile", "rpi4-2gb", "--batch", "1" + "0" * 300]


# --- fleet options: finite, in range, checked before anything starts ---------------------------
def _fleet_client(c: Ctx, *extra: str) -> list[str]:
    return ["fleet", "client", str(c.bundle), "--data", "digits", "--server", "127.0.0.1:1",
            "--threads", "1", "--out", str(c.tmp / "client"), *extra]


for _flag, _value in [("--connect-timeout", "nan"), ("--connect-timeout", "inf"),
                      ("--connect-timeout", "1e300"), ("--connect-timeout", "-5")]:
    case(f"fleet-client{_flag}={_value}", _flag, "seconds from 1 to")(
        lambda c, f=_flag, v=_value: _fleet_client(c, f, v))

for _flag, _value in [("--lr", "nan"), ("--weight-decay", "inf"), ("--micro-batch", "0"),
                      ("--max-nonfinite", "0"), ("--checkpoint-every", "-1")]:
    case(f"fleet-client{_flag}={_value}", _flag)(
        lambda c, f=_flag, v=_value: _fleet_client(c, "--connect-timeout", "1", f, v))

for _flag, _value in [("--wait", "nan"), ("--wait", "inf"), ("--wait", "1e300"),
                      ("--round-timeout", "nan"), ("--round-timeout", "-1")]:
    case(f"fleet-server{_flag}={_value}", _flag, "seconds from 1 to")(
        lambda c, f=_flag, v=_value: ["fleet", "server", str(c.bundle), "--address",
                                      "127.0.0.1:1", "--threads", "1", "--out",
                                      str(c.tmp / "server"), f, v])


# --- manifest numbers: bounded, and never echoed in full ---------------------------------------
def _train_full(c: Ctx, *extra: str) -> list[str]:
    return ["train", str(c.full), "--data", "digits", "--out", str(c.tmp / "run"), *TRAIN, *extra]


def _edit_full(edit: Callable[[dict], None], argv: Callable[[Ctx], list[str]] = _train_full):
    def setup(c: Ctx) -> list[str]:
        m = c.manifest(c.full)
        edit(m)
        c.write_manifest(m, c.full)
        return argv(c)
    return setup


def _layer(**values):
    return lambda m: m["instant"]["layers"][0].update(values)


for _name, _edit, _argv, _frags in [
    # ValueError "Maximum allowed dimension exceeded" in calibration
    ("layer-dims-astronomical", _layer(cx=10**400, x_dim=10**400), _train_full,
     ["field 'instant.layers[0].cx'", "-2**53 to 2**53", "(401 characters)"]),
    # OverflowError in the rank planning
    ("layer-dims-astronomical-plan", _layer(cx=10**400, x_dim=10**400),
     lambda c: ["plan", str(c.full)], ["field 'instant.layers[0].cx'"]),
    ("layer-dims-beyond-int32", _layer(cx=2**31, x_dim=2**31), _train_full,
     ["field 'instant.layers[0].cx'", "2147483647"]),
    ("layer-dims-not-its-weight", _layer(cx=65, x_dim=65), _train_full,
     ["instant.layers[0]", "do not match the shape of its weight"]),
    ("layer-tokens-on-a-2d-linear", _layer(tokens=2**30), _train_full,
     ["instant.layers[0].tokens", "at most 65536 rows a sample"]),
    ("shape-beyond-int32", lambda m: m["params"][0]["shape"].__setitem__(0, 2**40), _train_full,
     ["params[0].shape", "shape[0] must be from 1 to 2147483647"]),
    # OverflowError in plan's step-time estimate
    ("flops-astronomical", lambda m: m["flops"].update(forward=10**400),
     lambda c: ["plan", str(c.full), "--profile", "rpi4-2gb"], ["field 'flops.forward'"]),
    ("flops-negative", lambda m: m["flops"].update(forward=-1),
     lambda c: ["plan", str(c.full), "--profile", "rpi4-2gb"], ["flops.forward", ">= 0"]),
    # ValueError (broadcast) in evaluation: a classifier's loss said to be mse
    ("mse-on-a-classifier", lambda m: m["loss"].update(kind="mse"), _train_full,
     ["field 'loss.num_classes'", "mse has no classes"]),
    ("mse-with-int-labels", lambda m: m["loss"].update(kind="mse", num_classes=None),
     _train_full, ["field 'loss.labels.dtype'", "mse labels are float32"]),
    # every manifest field consistent with mse: the graphs' labels input still says int64
    ("mse-consistent-tamper", lambda m: (m["loss"].update(kind="mse", num_classes=None),
                                         m["loss"]["labels"].update(dtype="float32")),
     _train_full, ["takes labels tensor(int64)", "says float32", "re-export it"]),
    ("giant-field-name", lambda m: m.update({"x" * 100_000: 1}), _train_full,
     ["unknown field 'xxx", "re-export the bundle"]),
    ("giant-shape", lambda m: m["params"][0].update(shape=[1] * 100_000), _train_full,
     ["params[0].shape", "has 100000 axes"]),
    # KeyError / a broadcast ValueError in the calibration (session 16 probe)
    ("gram-of-no-layer", lambda m: m["io"]["calib"]["fwd_grams"].update({"7": "gram_x.7"}),
     _train_full, ["field 'io.calib.fwd_grams'", "'7'", "of one of instant.layers"]),
    ("grams-swapped", lambda m: m["io"]["recal"]["bwd_grams"].update(
        dict(zip(m["io"]["recal"]["bwd_grams"],
                 reversed(m["io"]["recal"]["bwd_grams"].values()), strict=True))),
     _train_full, ["field 'io.recal.bwd_grams'", "is not the Gram 'gram_g.<layer>'"]),
    ("gram-missing", lambda m: m["io"]["calib"]["fwd_grams"].popitem(), _train_full,
     ["field 'io.calib.fwd_grams'", "every one of instant.layers its Gram"]),
    ("layer-renamed", _layer(name="zz"), _train_full, ["'io.calib.fwd_grams'"]),
    ("layer-names-repeated", lambda m: m["instant"]["layers"][1].update(
        name=m["instant"]["layers"][0]["name"]), _train_full,
     ["field 'instant.layers'", "layer names must be unique"]),
]:
    case(f"manifest-{_name}", *_frags)(_edit_full(_edit, _argv))


@case("manifest-number-of-5000-digits", "field 'instant.layers[0].cx'", "(5000 characters)")
def _(c):
    """Python refuses int() of more than 4300 digits: json.loads raised a bare ValueError."""
    m = c.manifest(c.full)
    m["instant"]["layers"][0]["cx"] = 123456789
    text = json.dumps(m).replace("123456789", "9" * 5000)
    (c.full / "manifest.json").write_text(text)
    return _train_full(c)


# --- export-model checks every external tensor, wherever it sits --------------------------------
def _ext(name: str, location: str, offset: int | str, length: int = 16):
    from onnx import TensorProto, numpy_helper

    t = numpy_helper.from_array(np.zeros(length // 4, np.float32), name)
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
        e = t.external_data.add()
        e.key, e.value = k, v
    return t


def _save_graph(c: Ctx, name: str, model) -> None:
    """Write ``model`` as the bundle's graph ``name`` with its hash updated in the manifest
    (what a deliberate tamperer does)."""
    import onnx

    path = c.bundle / name
    onnx.save(model, str(path))
    m = c.manifest()
    data = path.read_bytes()
    m["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    c.write_manifest(m)


def _export_model(c: Ctx) -> list[str]:
    return ["export-model", str(c.bundle), "--out", str(c.tmp / "x.onnx")]


def _with_constant(c: Ctx, location: str, graph: str = "infer.onnx") -> None:
    """A Constant node (an output of the graph) whose tensor keeps its data in ``location``."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(c.bundle / graph), load_external_data=False)
    model.graph.node.insert(0, helper.make_node("Constant", [], ["stolen"],
                                                value=_ext("stolen", location, 0)))
    model.graph.output.append(helper.make_tensor_value_info("stolen", TensorProto.FLOAT, [4]))
    _save_graph(c, graph, model)


@case("export-model-offset-not-a-number", "points at external data", "re-export")
def _(c):
    """ValueError from int("abc") in export-model."""
    import onnx

    model = onnx.load(str(c.bundle / "infer.onnx"), load_external_data=False)
    t = next(t for t in model.graph.initializer if t.data_location == 1)
    for e in t.external_data:
        if e.key == "offset":
            e.value = "abc"
    _save_graph(c, "infer.onnx", model)
    return _export_model(c)


@case("export-model-constant-outside-absolute", "points at external data", "re-export")
def _(c):
    """export-model checked the initializers only: it exited 0 and its model kept the path."""
    _with_constant(c, str(c.secret))
    return _export_model(c)


@case("export-model-constant-outside-relative", "points at external data", "re-export")
def _(c):
    _with_constant(c, os.path.relpath(c.secret, c.bundle))
    return _export_model(c)


def _with_function_default(c: Ctx, graph: str) -> None:
    """A model-local function whose default tensor attribute keeps its data outside."""
    import onnx
    from onnx import helper

    model = onnx.load(str(c.bundle / graph), load_external_data=False)
    default = helper.make_attribute("value", _ext("stolen", str(c.secret), 0))
    fn = helper.make_function("evil", "Steal", [], ["out"],
                              [helper.make_node("Constant", [], ["out"], value_float=1.0)],
                              [helper.make_opsetid("", 17)], attributes=[])
    fn.attribute_proto.append(default)
    model.functions.append(fn)
    model.opset_import.append(helper.make_opsetid("evil", 1))
    _save_graph(c, graph, model)


@case("export-model-function-default-outside", "points at external data", "re-export")
def _(c):
    _with_function_default(c, "infer.onnx")
    return _export_model(c)


@case("train-function-default-outside", "points at external data", "re-export")
def _(c):
    """contract/onnx_scan.py skipped FunctionProto.attribute_proto."""
    _with_function_default(c, "vanilla.forward.onnx")
    return _train(c, "--mode", "vanilla")


# --- session 23 probe: paths and empty values ------------------------------------------------
@case("bundle-path-not-utf8", "is not valid UTF-8", "rename the folder")
def _(c):
    """A Latin-1 folder name: onnxruntime was handed the path and a TypeError traceback came."""
    odd = Path(shutil.copytree(c.bundle, c.tmp / os.fsdecode(b"lat\xfcn")))
    return ["train", str(odd), "--data", "digits", "--out", str(c.tmp / "run"), *TRAIN]


@case("eval-weights-empty", "--weights is empty", "leave the option out")
def _(c):
    """``--weights "$RUN"`` with RUN unset evaluated the initial weights, exit 0."""
    return ["eval", str(c.bundle), "--data", "digits", "--weights", ""]


@case("plan-data-empty", "--data is empty")
def _(c):
    return ["plan", str(c.bundle), "--data", ""]


@case("train-bundle-empty", "the bundle argument is empty")
def _(c):
    return ["train", "", "--data", "digits", "--out", str(c.tmp / "run"), *TRAIN]


@case("export-model-out-dot", "names no file", "model.onnx")
def _(c):
    """``--out .`` (or '' or '/'): a ValueError traceback from Path.with_suffix."""
    return ["export-model", str(c.bundle), "--out", "."]


@case("export-model-out-trailing-slash", "ends in a slash", "model.onnx")
def _(c):
    """``--out new/``: a FILE named 'new' was written, exit 0."""
    return ["export-model", str(c.bundle), "--out", str(c.tmp / "new") + "/"]


@case("export-model-out-slash-dot", "names no file", "new/model.onnx")
def _(c):
    """``--out new/.``: Path reads it as 'new' (the review's case of the trailing slash)."""
    return ["export-model", str(c.bundle), "--out", str(c.tmp / "new") + "/."]


# --- a run folder is untrusted data, as a bundle is -------------------------------------------
def _run_of(c: Ctx, **meta) -> Path:
    """c.tmp/run: the bundle's params.npz and a run.json of ``meta`` (no training)."""
    run = c.tmp / "run"
    run.mkdir()
    shutil.copy(c.bundle / "params.npz", run / "params.npz")
    (run / "run.json").write_text(json.dumps({"format": "instant-runtime-run", **meta}))
    return run


def _export_run(run: Path, c: Ctx) -> list[str]:
    return ["export-model", str(run), "--bundle", str(c.bundle), "--out", str(c.tmp / "m.onnx")]


def _eval_run(c: Ctx, weights: Path, *extra: str) -> list[str]:
    return ["eval", str(c.bundle), "--data", "digits", "--weights", str(weights), "--threads",
            "1", *extra]


# a probe's run.json of 5,000,000 class names (75 MB): eval under --budget 120MB peaked at 487 MB,
# export-model wrote them all into a labels.json for a 10-class model
for _cmd in ("eval", "export-model", "resume"):
    case(f"{_cmd}-of-a-run-json-over-a-megabyte", "run.json has", "more than a run's run.json "
         "can have", "put back the run's own run.json")(
        lambda c, cmd=_cmd: _tampered_run(c, cmd, class_names=["x" * 10] * 100_000))
    case(f"{_cmd}-of-a-run-json-with-11-class-names", "class_names holds 11 names for a "
         "10-class model", "put back the run's own run.json")(
        lambda c, cmd=_cmd: _tampered_run(c, cmd, class_names=[str(i) for i in range(11)]))
    case(f"{_cmd}-of-a-run-json-repeating-a-class-name", "class_names repeats a name",
         "put back the run's own run.json")(  # (session 38 probe: accepted)
        lambda c, cmd=_cmd: _tampered_run(c, cmd, class_names=["x", *map(str, range(9))][:9]
                                          + ["x"]))


def _tampered_run(c: Ctx, cmd: str, **fields) -> list[str]:
    run = _trained(c) if cmd == "resume" else _run_of(c)
    meta = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**meta, **fields}))
    return {"eval": _eval_run(c, run, "--budget", "120MB"), "export-model": _export_run(run, c),
            "resume": _train(c, "--resume", "--steps", "4")}[cmd]


@case("export-model-of-a-run-folder-without-weights", "'", "is a folder without params.npz "
      "or a checkpoint", "pass a run folder, its params.npz")
def _(c):
    """A probe's: a run folder holding only run.json exported the bundle's initial weights,
    saying "6 trained tensors from BUNDLE/params.npz" (eval refused it)."""
    (_run_of(c) / "params.npz").unlink()
    return _export_run(c.tmp / "run", c)


@case("export-model-of-a-run-folder-with-a-checkpoint-without-pointer",
      "is a folder without params.npz or a checkpoint")
def _(c):
    run = _run_of(c)
    (run / "params.npz").unlink()
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "ckpt-000030.npz").write_bytes(b"PK\x03\x04 cut short")
    return _export_run(run, c)


@case("eval-negative-seed", "--seed -1 is invalid", "at least 0")
def _(c):
    """A probe's: ValueError traceback from numpy's generator."""
    return ["eval", str(c.bundle), "--data", str(_digits_npz(c.tmp / "d.npz")), "--val-split",
            "0.5", "--seed", "-1", "--threads", "1"]


for _seed in (-1, 1.5, "7", None):  # -1: a traceback; the others: silently seed 0
    case(f"eval-run-json-seed-{_seed}", "run.json: seed", "is not a non-negative integer",
         "pass --seed N")(lambda c, v=_seed: [
             *_eval_run(c, _run_of(c, seed=v)), "--data", str(_digits_npz(c.tmp / "d.npz")),
             "--val-split", "0.5"])


def _linked_run(c: Ctx, name: str) -> Path:
    """A trained run whose file ``name`` (a checkpoint, the checkpoints folder, params.npz,
    run.json, metrics.jsonl) is a link to a copy of itself outside the run folder."""
    run = _trained(c)
    if name.startswith("checkpoints/ckpt") or name == "checkpoints":
        (run / "params.npz").unlink()  # the checkpoint is what eval and export-model read
    if name.startswith("checkpoints/ckpt"):
        name = f"checkpoints/{sorted((run / 'checkpoints').glob('ckpt-*.npz'))[-1].name}"
    outside = c.tmp / "elsewhere"
    outside.mkdir()
    target = outside / Path(name).name
    shutil.move(str(run / name), target)
    (run / name).symlink_to(target.resolve())
    return run


for _name, _cmds in [("checkpoints/ckpt", ("eval", "export-model")),
                     ("checkpoints", ("eval", "export-model")),
                     ("params.npz", ("eval", "export-model", "eval-file")),
                     ("run.json", ("eval", "export-model", "resume")),
                     ("metrics.jsonl", ("resume",))]:
    for _cmd in _cmds:  # a probe's: eval read, and export-model copied out, a linked checkpoint
        case(f"{_cmd}-of-a-run-whose-{_name.replace('/', '-')}-is-a-link", "is a symbolic link",
             "never read or written through a link", "cp -L")(
            lambda c, n=_name, cmd=_cmd: _read_linked_run(c, n, cmd))


def _read_linked_run(c: Ctx, name: str, cmd: str) -> list[str]:
    run = _linked_run(c, name)
    return {"eval": _eval_run(c, run), "eval-file": _eval_run(c, run / "params.npz"),
            "export-model": _export_run(run, c),
            "resume": _train(c, "--resume", "--steps", "4")}[cmd]


@case("profile-default-budget-below-1mb", "dev.toml: default_budget 100,000 bytes is below 1 MB",
      "or pass --budget")
def _(c):
    """A probe's: "--budget None is below 1 MB", an option never given."""
    _profile(c, "10")
    p = c.tmp / "dev.toml"
    p.write_text(p.read_text().replace('default_budget = "1GB"', 'default_budget = "0.1MB"'))
    return [*_train(c), "--profile", str(p)]


for _cmd in ("train", "plan"):  # a probe's: trained vanilla, and plan said "instant"; session
    # 50 probe: its way out "re-export it with --instant-exclude" added no layer
    case(f"{_cmd}-mode-instant-on-a-bundle-without-instant-layers", "--mode instant: bundle",
         "has no INSTANT layer", "pass --mode vanilla or leave --mode out (its export's notes "
         "name the layers it left exact and why)")(
        lambda c, cmd=_cmd: [*(_train(c) if cmd == "train" else ["plan", str(c.bundle)]),
                             "--mode", "instant"])


# ------------------------------------------------------------------------------ the test
@pytest.fixture
def ctx(mlp_head_bundle, mlp_bundle, tmp_path) -> Ctx:
    """A private copy of the mlp bundle whose hidden layers are frozen (weights.bin holds
    them), one of the fully trainable mlp bundle, and a secret file outside them."""
    secret = tmp_path.parent / f"{tmp_path.name}-secret.txt"
    secret.write_bytes(SECRET)
    bundle = Path(shutil.copytree(mlp_head_bundle, tmp_path / "bundle"))
    full = Path(shutil.copytree(mlp_bundle, tmp_path / "full"))
    return Ctx(tmp_path, bundle, secret, full)


@pytest.mark.parametrize("name, setup, fragments", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_error_and_changes_nothing(ctx, name, setup, fragments):
    argv = setup(ctx)
    before = _snapshot(ctx.tmp)
    r = _run(argv)
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode not in (0, None), (r.returncode, r.stdout[-500:])
    lines = [ln for ln in r.stderr.strip().splitlines() if not ln.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert len(lines[0]) <= MAX_ERROR_LINE, f"{len(lines[0])} characters: {lines[0][:300]}"
    for f in fragments:
        assert f in lines[0], f"{f!r} not in {lines[0]!r}"
    assert not any(ch < " " and ch != "\t" for ch in lines[0]), repr(lines[0])  # escaped
    after = _snapshot(ctx.tmp)
    changed = [p for p, h in before.items() if after.get(p) != h]
    assert not changed, f"pre-existing files changed: {changed}"
    for p in ctx.tmp.rglob("*"):
        if p.is_file() and not p.is_symlink():
            assert SECRET[:64] not in p.read_bytes(), f"the outside file leaked into {p}"


def test_bundle_never_unpickles(mlp_bundle):
    """The device side reads .npz files with allow_pickle=False everywhere."""
    src = "\n".join(p.read_text() for p in (REPO / "runtime").rglob("*.py"))
    src += "\n".join(p.read_text() for p in (REPO / "contract").rglob("*.py"))
    assert "allow_pickle=True" not in src and "pickle.load" not in src


def test_export_model_never_blocks_on_a_fifo_run_json(mlp_bundle, tmp_path):
    """A probe's: export-model read the run's run.json (for its class names) with a plain read,
    so a FIFO there hung it (and /dev/zero filled memory). It is skipped like any unreadable
    run.json: the model is written from the params and the bundle given."""
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(mlp_bundle / "params.npz", run / "params.npz")
    os.mkfifo(run / "run.json")
    r = _run(["export-model", str(run), "--bundle", str(mlp_bundle), "--out",
              str(tmp_path / "m.onnx")], timeout=60)
    assert r.returncode == 0 and (tmp_path / "m.onnx").is_file(), r.stderr


def test_budget_above_ram_warns(mlp_bundle, tmp_path):
    r = _run(["train", str(mlp_bundle), "--data", "digits", "--out", str(tmp_path / "run"),
              "--steps", "1", "--no-progress", "--budget", "100TB", "--threads", "1"])
    assert r.returncode == 0, r.stderr
    assert "exceeds this machine's RAM" in r.stderr


@pytest.mark.parametrize("delay", [0.3, 0.8, 1.5])
def test_sigint_during_start_up_exits_130_quietly(mlp_bundle, tmp_path, delay):
    """Interrupted while importing, loading or planning (or, on a fast machine, training: the
    run is long enough never to end by itself), the run exits 130 without a traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "runtime", "train", str(mlp_bundle),
                             "--data", "digits", "--out", str(tmp_path / "run"), "--steps",
                             "1000000", "--no-progress", "--budget", "400MB"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert "Traceback" not in err, err
    assert proc.returncode == 130, (proc.returncode, err)


@pytest.mark.parametrize("fork", ["os.fork", "fork_held"])
def test_a_signal_that_comes_as_a_probe_forks_still_stops_the_run(fork):
    """Session 33: the test above hung once under load, its stderr "interrupted by SIGINT
    before training began" and then an ignored exception in logging's ``_releaseLock``. A
    signal whose Python handler runs inside one of ``os.fork``'s at-fork hooks (Python code:
    logging's takes its lock before the fork and releases it after) has its exception
    swallowed: the run goes on, and logging's lock may stay held. Here a hook sends SIGINT
    during the fork, deterministically, in a process with another thread (onnxruntime's take
    signals that a signal mask held off only in the forking thread: a review's finding): with
    a bare ``os.fork`` the interrupt is lost; ``memory.fork_held`` (the planning probes' and the
    tokeniser's fork) notes it and raises it once the fork has returned, so it stops the
    parent, whose child is killed and reaped first, and logging still works."""
    code = textwrap.dedent(f"""
        import logging, os, signal, sys, threading, time
        from runtime.memory import fork_held, forked_child
        signal.signal(signal.SIGINT, signal.default_int_handler)
        threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
        armed = [True]
        def before():
            if armed[0]:
                armed[0] = False
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)  # (the handler runs here, inside the hook)
        os.register_at_fork(before=before)
        parent = os.getpid()
        try:
            pid = {fork}()
            if pid == 0:
                forked_child(parent)
                os._exit(0)
            os.waitpid(pid, 0)
            print("fork returned; not interrupted")
        except KeyboardInterrupt:
            print("interrupted after the fork")
            try:
                os.waitpid(-1, os.WNOHANG)
                print("a child left")
            except ChildProcessError:
                print("no child left")
        logging.getLogger("probe").error("logging works")
    """)
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert "logging works" in r.stderr, r.stderr
    if fork == "fork_held":
        assert r.stdout.split() == "interrupted after the fork no child left".split(), \
            (r.stdout, r.stderr)
        assert "Exception ignored" not in r.stderr, r.stderr
    else:  # (what the runtime's forks did before: shows the hazard is real on this Python)
        assert r.stdout.strip() == "fork returned; not interrupted", (r.stdout, r.stderr)
        assert "Exception ignored" in r.stderr, r.stderr


def test_sigint_while_the_command_imports_is_quiet(mlp_bundle, tmp_path):
    """Session 23 probe: the ``instant-runtime`` script imported runtime.cli before main()
    installed the handler, so a Ctrl-C in its first ~0.1 s printed a KeyboardInterrupt
    traceback. Its entry point (runtime/launch.py, also ``python -m runtime``'s) remembers a
    signal that comes before the command's modules are loaded and exits 130, quietly. (A
    Ctrl-C while the interpreter itself starts, importing ``site``, is Python's own.)"""
    import tomllib

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["instant-runtime"] == "runtime.launch:run"
    # (SIGINT set to its default first: a CI job started in the background inherits it ignored)
    code = ("import builtins, os, signal, sys\n"
            "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
            "import runtime.launch as launch\n"
            "assert 'runtime.cli' not in sys.modules\n"
            "assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # import: as is\n"
            "orig = builtins.__import__\n"
            "def imp(name, *a, **k):  # the signal comes as runtime.cli starts loading\n"
            "    if name == 'cli' and 'runtime.cli' not in sys.modules:\n"
            "        os.kill(os.getpid(), signal.SIGINT)\n"
            "    return orig(name, *a, **k)\n"
            "builtins.__import__ = imp\n"
            "launch.run()\n")
    r = subprocess.run([sys.executable, "-c", code, "train", str(mlp_bundle), "--data",
                        "digits", "--out", str(tmp_path / "run"), "--steps", "1000000"],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    assert "Traceback" not in r.stderr and r.stderr.strip() == "interrupted", r.stderr
    assert r.returncode == 130 and not (tmp_path / "run").exists()


def test_outside_file_never_read_by_training(ctx):
    """A symlink named like a listed file is refused before any byte of it is read."""
    (ctx.bundle / "params.npz").unlink()
    os.symlink(ctx.secret, ctx.bundle / "params.npz")
    r = _run(_train(ctx))
    assert r.returncode == 2 and "symbolic link" in r.stderr


def test_divergence_reaching_calibration_is_handled(mlp_bundle, tmp_path):
    """A diverging run whose calibration sees inf/NaN keeps its previous bases with a warning or
    stops with the documented non-finite message and a checkpoint; never a traceback."""
    r = _run(["train", str(mlp_bundle), "--data", "digits", "--out", str(tmp_path / "run"),
              "--steps", "40", "--no-progress", "--threads", "1", "--lr", "1e4",
              "--calib-every", "3", "--checkpoint-every", "5"])
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode in (0, 2), r.stderr
    if r.returncode == 2:
        errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and "non-finite" in errors[0], r.stderr


def test_a_diverged_runs_way_out_and_eval_read_as_they_are(mlp_bundle, tmp_path):
    """Session 48 probe: a run diverged at step 1 left no folder (its stub removed) and was
    still told to "start again with --overwrite"; the "last good checkpoint" of a diverging
    run (finite weights, loss 6e33) was not said to be only finite, and `eval` of it printed
    the loss with 34 digits."""
    quiet = ["--no-progress", "--threads", "1", "--mode", "vanilla"]
    r = _run(["train", str(mlp_bundle), "--data", "digits", "--out", str(tmp_path / "x"),
              "--steps", "20", "--lr", "1e38", *quiet])
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.rstrip().endswith("lower --lr and start again") \
        and not (tmp_path / "x").exists(), r.stderr
    r = _run(["train", str(mlp_bundle), "--data", "digits", "--out", str(tmp_path / "d"),
              "--steps", "60", "--lr", "1e4", "--checkpoint-every", "2", *quiet])
    assert r.returncode == 2 and "(the last with finite weights: its loss may already be " \
        "large)" in r.stderr and r.stderr.rstrip().endswith("with --overwrite"), r.stderr
    r = _run(["eval", str(tmp_path / "d"), "--threads", "1"])
    assert r.returncode == 0, r.stderr
    loss = r.stdout.split(", loss ")[1].split(",")[0]
    assert len(loss) <= 10 and (float(loss) < 1e6 or "e+" in loss), r.stdout


def test_degenerate_gram_keeps_the_previous_bases(mlp_bundle):
    """Calibration on activations with inf keeps the bases it had and warns."""
    from helpers import make_trainer

    from runtime.data import load_data

    tr = make_trainer(mlp_bundle)
    data = load_data("digits", tr.bundle)
    assert tr.calibrate(data, 32, np.random.default_rng(0))
    before = tr.ranks()

    class Inf:
        def __len__(self):
            return len(data)

        def take(self, idx):
            x, y = data.take(idx)
            return {k: np.full_like(v, np.inf) for k, v in x.items()}, y

    assert tr.calibrate(Inf(), 32, np.random.default_rng(1)) is False
    assert tr.ranks() == before and any("kept the previous bases" in w for w in tr.warnings)


def test_onnx_scan_finds_every_external_reference(tmp_path):
    """The runtime's own protobuf walk agrees with onnx on where external data hides: graph
    initializers, Constant nodes and graphs nested in If branches."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from contract.onnx_scan import external_data_refs

    def ext(name: str, location: str, offset: int) -> TensorProto:
        t = numpy_helper.from_array(np.zeros(4, np.float32), name)
        t.ClearField("raw_data")
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", location), ("offset", str(offset)), ("length", "16")):
            e = t.external_data.add()
            e.key, e.value = k, v
        return t

    then = helper.make_graph([helper.make_node("Constant", [], ["c"], value=ext("deep", "x", 8))],
                             "then", [], [helper.make_tensor_value_info("c", 1, [4])])
    g = helper.make_graph(
        [helper.make_node("If", ["cond"], ["c"], then_branch=then, else_branch=then)], "g",
        [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("c", 1, [4])], initializer=[ext("w", "weights.bin", 4096)])
    data = helper.make_model(g).SerializeToString()
    refs = {(r.tensor, r.location, r.offset, r.length) for r in external_data_refs(data)}
    assert refs == {("w", "weights.bin", 4096, 16), ("deep", "x", 8, 16)}
    assert external_data_refs(onnx.load_from_string(data).SerializeToString()) is not None


def test_an_extra_member_of_params_npz_is_never_inflated(ctx):
    """A bundle's params.npz with an unlisted 400 MB member that compresses to almost nothing:
    it is never inflated. The run is refused in one line (a bundle's members are never
    compressed: session 28) and stays inside a 150 MB budget; before, only the listed
    parameters were read, and the run trained."""
    from runtime.memory import run_measured

    p = ctx.bundle / "params.npz"
    with np.load(p) as z:
        arrays = {k: z[k] for k in z.files}
    np.savez_compressed(p, **arrays, junk=np.zeros(400_000_000, np.uint8))
    m = ctx.manifest()
    data = p.read_bytes()
    assert len(data) < 2_000_000
    m["files"]["params.npz"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    ctx.write_manifest(m)
    budget = 150_000_000
    r = run_measured([sys.executable, "-m", "runtime", *_train(ctx, "--budget", "150MB")],
                     timeout=TIMEOUT, cwd=REPO)
    assert r.returncode == 2 and "is compressed" in r.stderr, r.stderr[-1500:]
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.peak_polled <= budget, r.peak_polled


def test_a_run_writes_nothing_outside_its_folders(mlp_bundle, tmp_path):
    """Training writes only into --out: nothing lands in the user's home (onnxruntime 1.32
    records usage events under ~/.cache/Microsoft unless ORT_DISABLE_TELEMETRY is set, which
    the runtime does before it imports onnxruntime). HOME is an empty folder here, read after
    the run."""
    import os
    import subprocess

    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ("ORT_DISABLE_TELEMETRY", "XDG_CACHE_HOME", "XDG_CONFIG_HOME")}
    env["HOME"] = str(home)
    r = subprocess.run([sys.executable, "-m", "runtime", "train", str(mlp_bundle), "--data",
                        "digits", "--steps", "2", "--batch", "8", "--no-progress", "--out",
                        str(tmp_path / "run")], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-1500:]
    assert [str(p.relative_to(home)) for p in home.rglob("*")] == []


def test_onnx_scan_finds_function_defaults_and_training_graphs():
    """External data in a model-local function's default attribute values
    (``FunctionProto.attribute_proto``) and in the training-info graphs is found too."""
    from onnx import TensorProto, helper

    from contract.onnx_scan import external_data_refs

    fn = helper.make_function("d", "F", [], ["out"],
                              [helper.make_node("Constant", [], ["out"], value_float=1.0)],
                              [helper.make_opsetid("", 17)])
    fn.attribute_proto.append(helper.make_attribute("value", _ext("default", "/etc/x", 0)))
    g = helper.make_graph([], "g", [], [helper.make_tensor_value_info("o", TensorProto.FLOAT,
                                                                      [4])],
                          initializer=[_ext("o", "weights.bin", 64)])
    model = helper.make_model(g, functions=[fn])
    init = helper.make_graph([], "init", [], [], initializer=[_ext("t", "../y", 8)])
    model.training_info.add().initialization.CopyFrom(init)
    refs = {(r.tensor, r.location, r.offset) for r in external_data_refs(
        model.SerializeToString())}
    assert refs == {("o", "weights.bin", 64), ("default", "/etc/x", 0), ("t", "../y", 8)}


def _field(number: int, payload: bytes) -> bytes:
    """``payload`` as a length-delimited protobuf field ``number`` (< 16)."""
    n, length = len(payload), bytearray()
    while n >= 0x80:
        length.append(n & 0x7F | 0x80)
        n >>= 7
    return bytes([number << 3 | 2]) + bytes(length) + bytes([n]) + payload


def test_onnx_scan_merges_a_graph_written_in_parts():
    """A singular graph field (ModelProto.graph, an attribute's g) written twice is one graph to
    protobuf and onnxruntime: the scan merges the parts (session 49 probe: it kept the last
    part, and a Range sized by the weights in the first passed)."""
    import onnx
    from onnx import helper

    from contract.onnx_scan import main_graph, sized_by_values

    rng = helper.make_node("Range", ["zero", "w", "one"], ["r"])
    branch = helper.make_graph([rng], "then", [], [])
    empty = helper.make_graph([], "then", [], [])
    attr = helper.make_attribute("then_branch", empty)
    split_attr = attr.SerializeToString() + _field(6, branch.SerializeToString())
    node = helper.make_node("If", ["c"], ["o"], else_branch=empty)
    node_bytes = node.SerializeToString() + _field(5, split_attr)
    assert onnx.NodeProto.FromString(node_bytes).attribute[1].g.node[0].op_type == "Range"
    for graph_parts in ([_field(1, rng.SerializeToString()), b""],  # top-level, in two parts
                        [_field(1, node_bytes), b""]):  # in a branch written in two parts
        model = helper.make_model(helper.make_graph([], "g", [], []))
        model.ClearField("graph")
        data = model.SerializeToString() + b"".join(_field(7, p) for p in graph_parts)
        assert sized_by_values(main_graph(data), {"w"}) == ("Range", "w")


def test_graph_bytes_onnxruntime_could_read_otherwise_are_refused(ctx, monkeypatch):
    """Session 46 probe (an ORT-format file that was also a protobuf): the defences behind the
    "ORTM" check hold alone too. Field number 0, illegal in protobuf and how the probe hid the
    ORT header, fails our scan; and a session reads a graph's bytes as ONNX only, so a real
    ORT-format graph that passed every check would still not load."""
    import onnxruntime as ort

    from contract.onnx_scan import OnnxScanError, op_types
    from runtime import sessions
    from runtime.bundle import open_bundle

    with pytest.raises(OnnxScanError, match="field number 0"):
        op_types(b"\x00\x00")
    b = open_bundle(ctx.full)
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(ctx.tmp / "infer.ort")
    so.add_session_config_entry("session.save_model_format", "ORT")
    ort.InferenceSession(str(ctx.full / "infer.onnx"), so, providers=["CPUExecutionProvider"])
    flat = (ctx.tmp / "infer.ort").read_bytes()
    assert flat[4:8] == b"ORTM"
    ort.InferenceSession(flat, providers=["CPUExecutionProvider"])  # a model onnxruntime runs
    monkeypatch.setattr(sessions, "check_external_data", lambda *a: None)  # every check passed
    monkeypatch.setattr(b, "read_file", lambda name: flat)
    with pytest.raises(sessions.UserError, match="onnxruntime cannot load"):
        sessions.load_graph(b, "infer.onnx", ort.SessionOptions(), ["CPUExecutionProvider"])


def test_export_model_embeds_every_listed_external_tensor(ctx):
    """A Constant node whose tensor is a listed frozen weight at its place in weights.bin is
    filled from the verified file like the initializers: the written model names no outside
    file and runs alone."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    m = ctx.manifest()
    name = next(w for w in m["graph_weights"]["infer.onnx"]
                if m["weights"][w]["dtype"] == "float32")
    w = m["weights"][name]
    model = onnx.load(str(ctx.bundle / "infer.onnx"), load_external_data=False)
    model.graph.node.insert(0, helper.make_node(
        "Constant", [], ["copy"], value=_ext(name, "weights.bin", w["offset"], w["length"])))
    model.graph.output.append(helper.make_tensor_value_info("copy", TensorProto.FLOAT,
                                                            [w["length"] // 4]))
    _save_graph(ctx, "infer.onnx", model)
    out = ctx.tmp / "x.onnx"
    r = _run(["export-model", str(ctx.bundle), "--out", str(out)])
    assert r.returncode == 0, r.stderr[-1500:]
    written = onnx.load(str(out), load_external_data=False)
    from runtime.export_model import all_tensors

    assert not [t.name for t in all_tensors(written) if t.data_location == 1 or t.external_data]
    raw = (ctx.bundle / "weights.bin").read_bytes()[w["offset"]:w["offset"] + w["length"]]
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    feeds = {i.name: np.zeros([d if isinstance(d, int) else 2 for d in i.shape], np.float32)
             for i in sess.get_inputs()}
    copy = sess.run(["copy"], feeds)[0]
    assert copy.tobytes() == raw


@pytest.mark.parametrize("signals", [1, 2])
def test_a_step_that_does_not_end_is_stopped_by_sigterm(ctx, signals):
    """A tampered training forward (hashes updated) whose step runs for minutes: 600 chained
    1500×1500 MatMuls on a tensor computed from the input (so nothing folds at load). A Python
    signal handler runs only once onnxruntime returns: the step ignored SIGTERM (a probe
    SIGKILLed it 58 s after the signal). Now the run in progress is stopped ``--stop-grace``
    seconds after the signal (here 4, the default 30 s made this the default tier's slowest
    test), or at a second one; the run exits 143 with one line, the step dropped, nothing
    written since the last checkpoint."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(ctx.bundle / "vanilla.forward.onnx"), load_external_data=False)
    made = {o: n for n in model.graph.node for o in n.output}
    made["loss"].output[list(made["loss"].output).index("loss")] = "loss.real"
    x = model.graph.input[0].name
    model.graph.initializer.extend([
        numpy_helper.from_array(np.array([1500, 1500], np.int64), "slow.shape"),
        numpy_helper.from_array(np.array(0.0, np.float32), "slow.zero")])
    nodes = [helper.make_node("ReduceSum", [x], ["slow.sum"], keepdims=0),
             helper.make_node("Mul", ["slow.sum", "slow.zero"], ["slow.s0"]),
             helper.make_node("Expand", ["slow.s0", "slow.shape"], ["slow.0"])]
    for k in range(600):
        nodes.append(helper.make_node("MatMul", [f"slow.{k}", "slow.0"], [f"slow.{k + 1}"]))
    nodes += [helper.make_node("ReduceSum", ["slow.600"], ["slow.total"], keepdims=0),
              helper.make_node("Mul", ["slow.total", "slow.zero"], ["slow.nothing"]),
              helper.make_node("Add", ["loss.real", "slow.nothing"], ["loss"])]
    model.graph.node.extend(nodes)
    grace = 4 if signals == 1 else 30  # (two signals: stopped long before the grace ends)
    argv = [*_train_on_edited_forward(ctx, model), "--stop-grace", str(grace)]
    proc = subprocess.Popen([sys.executable, "-m", "runtime", *argv], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(8)  # start-up done; the first step is in its forward
        for _ in range(signals):
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=grace + 30)
        waited = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, (proc.returncode, err)
    assert "Traceback" not in err, err
    assert "interrupted by SIGTERM during step 1, which was stopped and dropped" in err, err
    assert f"did not finish within {grace} s of the signal" in err, err
    if signals == 2:
        assert waited < 15, waited  # stopped at the second signal
    else:
        assert waited > grace - 1, waited  # the step had its grace period


def test_without_proc_the_memory_reading_is_one_line(monkeypatch):
    """A session-24 probe masked /proc (unshare + tmpfs): `train` ended in psutil's
    NoSuchProcess traceback."""
    import psutil

    from runtime import memory
    from runtime.errors import UserError

    def gone(*a, **k):
        raise psutil.NoSuchProcess(0)

    monkeypatch.setattr(memory, "proc_status", lambda *a, **k: {})
    monkeypatch.setattr(psutil, "Process", gone)
    with pytest.raises(UserError, match="/proc is not mounted"):
        memory.current_rss()


def test_run_json_is_never_read_through_a_link(tmp_path):
    """Whoever reads a run's run.json (eval, export-model, a resume) gets a refusal for a link,
    never the file it points to nor a silent {} (checked before any other file of the run)."""
    from runtime.errors import UserError
    from runtime.run_folder import json_object

    (tmp_path / "elsewhere.json").write_text('{"seed": 3}')
    (tmp_path / "run.json").symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(UserError, match="run.json is a symbolic link"):
        json_object(tmp_path / "run.json")


def test_onnxruntime_errors_lose_their_cxx_source_locations():
    """Session 23: a signature filled the line before the reason; session 27 probe: a bare
    location ("tensor_external_data_info.cc:62 Create model format error! ...", a bundle whose
    external data named 'location' twice) reached the user."""
    from runtime.sessions import ort_message

    for raw, reason in (
            ("[ONNXRuntimeError] : 1 : FAIL : tensor_external_data_info.cc:62 Create model "
             "format error! TensorProto external data has duplicate 'location' entries",
             "Create model format error! TensorProto external data has duplicate 'location'"),
            ("[ONNXRuntimeError] : 1 : FAIL : /onnxruntime_src/onnxruntime/core/graph/model.cc:"
             "180 onnxruntime::Model::Model(onnx::ModelProto&&, const PathString&, const "
             "logging::Logger&) Unsupported model IR version: 99",
             "Unsupported model IR version: 99")):
        assert ort_message(RuntimeError(raw)).startswith(reason), ort_message(RuntimeError(raw))


@pytest.mark.parametrize("op, domain, extra", [
    ("HannWindow", "", {}), ("Tile", "", {}), ("FusedThing", "com.microsoft", {}),
    ("Relu", "", {}),
], ids=["window", "tile", "other-domain", "elementwise"])
def test_the_value_size_scan_follows_every_op_that_sizes_by_values(op, domain, extra):
    """A review of the scan (session 44): ops outside its first table (a HannWindow of the
    weights' sum) and other domains' ops passed; an elementwise op is not sizing."""
    from onnx import TensorProto, helper

    from contract.onnx_scan import main_graph, sized_by_values

    ins = ["w_n"] if op == "HannWindow" else ["x", "w_n"]
    g = helper.make_graph([
        helper.make_node("ReduceSum", ["w"], ["w_s"], keepdims=0),
        helper.make_node("Cast", ["w_s"], ["w_n"], to=TensorProto.INT64),
        helper.make_node(op, ins if op != "Relu" else ["w"], ["y"], domain=domain, **extra)],
        "g", [helper.make_tensor_value_info("w", TensorProto.FLOAT, [4]),
              helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    hit = sized_by_values(main_graph(model.SerializeToString()), {"w"})
    assert hit == (None if op == "Relu" else (op, "w_n")), hit
