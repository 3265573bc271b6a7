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


@dataclass
class Ctx:
    tmp: Path
    bundle: Path  # a private copy of the mlp bundle (tamper freely)
    secret: Path

    def manifest(self) -> dict:
        return json.loads((self.bundle / "manifest.json").read_text())

    def write_manifest(self, m: dict) -> None:
        (self.bundle / "manifest.json").write_text(json.dumps(m))


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


@case("min-onnxruntime-not-a-version", "min_onnxruntime 'latest' in manifest.json is not a "
      "version", "re-export")
def _(c):
    m = c.manifest()
    m["min_onnxruntime"] = "latest"
    c.write_manifest(m)
    return _train(c)


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


def _train_on_edited_forward(c: Ctx, model) -> list[str]:
    """Save ``model`` as the bundle's vanilla forward with its hash updated in the manifest
    (what a deliberate tamperer does); the train command that then runs it."""
    import onnx

    path = c.bundle / "vanilla.forward.onnx"
    onnx.save(model, str(path))
    m = c.manifest()
    data = path.read_bytes()
    m["files"][path.name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    c.write_manifest(m)
    return _train(c, "--mode", "vanilla")


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


@case("pickled-params", "is of another shape", "expects float32")
def _(c):
    p = c.bundle / "params.npz"
    m = c.manifest()
    np.savez(p, **{m["params"][0]["name"]: np.array([{"a": 1}], dtype=object)})
    data = p.read_bytes()
    m["files"]["params.npz"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    c.write_manifest(m)
    return _train(c)


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
]:
    case(f"option{_flag}={_value}", _frag)(
        lambda c, f=_flag, v=_value: _train(c, f, v))


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
    (out / "run.json").write_text("{}")
    return _train(c)


@case("train-out-under-a-file", "is a file")
def _(c):
    (c.tmp / "blocker").write_text("x")
    return ["train", str(c.bundle), "--data", "digits", "--out", str(c.tmp / "blocker" / "run"),
            *TRAIN]


@case("export-model-existing-onnx", "already exist", "--overwrite")
def _(c):
    (c.tmp / "m.onnx").write_bytes(b"someone's model")
    return ["export-model", str(c.bundle), "--out", str(c.tmp / "m.onnx")]


@case("export-over-a-bundle", "already exists", "--overwrite")
def _(c):
    return ["export", "--model", "mlp", "--out", str(c.bundle)]


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


@case("train-overwrite-that-fails-keeps-the-old-run", "budget")
def _(c):
    r = _run(_train(c))  # a finished run in tmp/run; its replacement fails after start-up
    assert r.returncode == 0, r.stderr[-800:]
    return _train(c, "--overwrite", "--budget", "5MB")


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


@case("out-name-too-long", "too long")
def _(c):
    return ["train", str(c.bundle), "--data", "digits", "--out", str(c.tmp / ("a" * 300)), *TRAIN]


@case("data-empty-string", "--data is empty")
def _(c):
    return _train(c, data="")


@case("budget-empty-string", "invalid size")
def _(c):
    return _train(c, "--budget", "")


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


# ------------------------------------------------------------------------------ the test
@pytest.fixture
def ctx(mlp_head_bundle, tmp_path) -> Ctx:
    """A private copy of the mlp bundle whose hidden layers are frozen (weights.bin holds
    them), and a secret file outside it."""
    secret = tmp_path.parent / f"{tmp_path.name}-secret.txt"
    secret.write_bytes(SECRET)
    bundle = Path(shutil.copytree(mlp_head_bundle, tmp_path / "bundle"))
    return Ctx(tmp_path, bundle, secret)


@pytest.mark.parametrize("name, setup, fragments", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_error_and_changes_nothing(ctx, name, setup, fragments):
    argv = setup(ctx)
    before = _snapshot(ctx.tmp)
    r = _run(argv)
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode not in (0, None), (r.returncode, r.stdout[-500:])
    lines = [ln for ln in r.stderr.strip().splitlines() if not ln.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for f in fragments:
        assert f in lines[0], f"{f!r} not in {lines[0]!r}"
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
    only the listed parameters are read, so the run stays inside a 150 MB budget."""
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
    assert r.returncode == 0, r.stderr[-1500:]
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
