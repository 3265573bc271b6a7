"""``export-model``: a standalone inference .onnx and a torch .safetensors from trained weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from helpers import make_trainer

from runtime.bundle import open_bundle
from runtime.config import RunConfig
from runtime.data import load_data
from runtime.run import train


def _train(bundle_dir: Path, out: Path) -> Path:
    b = open_bundle(bundle_dir)
    train(make_trainer(b, mode="vanilla", lr=1e-2), load_data("digits", b),
          RunConfig(steps=20, progress=False), out)
    return out / "params.npz"


def _samples(bundle_dir: Path, n: int = 64) -> dict[str, np.ndarray]:
    data = load_data("digits", open_bundle(bundle_dir))
    return {k: v[:n] for k, v in data.x.items()}


def _reference(bundle_dir: Path, params: Path, x: dict[str, np.ndarray]) -> np.ndarray:
    """The training graph's forward: infer.onnx fed with the trained parameters."""
    sess = ort.InferenceSession(str(bundle_dir / "infer.onnx"),
                                providers=["CPUExecutionProvider"])
    with np.load(params) as p:
        feeds = {**x, **{k: p[k] for k in p.files}}
    return sess.run(None, feeds)[0]


def _exported(model: Path, x: dict[str, np.ndarray]) -> np.ndarray:
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    assert {i.name for i in sess.get_inputs()} == set(x)  # parameters are no longer inputs
    return sess.run(None, x)[0]


@pytest.mark.parametrize("which", ["mlp_bundle", "cnn_bundle"])
def test_export_from_bundle_matches_training_forward(which, request, copy_bundle, cli, tmp_path):
    bundle = copy_bundle(request.getfixturevalue(which))
    params = _train(bundle, bundle / "run")
    out = tmp_path / "export" / "model.onnx"
    r = cli("export-model", bundle, "--out", out)
    assert r.returncode == 0, r.stderr
    assert out.is_file() and (tmp_path / "export" / "model.safetensors").is_file()
    # the single file runs alone: move it away from the bundle and its weights.bin
    alone = tmp_path / "alone.onnx"
    out.rename(alone)
    x = _samples(bundle)
    np.testing.assert_allclose(_exported(alone, x), _reference(bundle, params, x), atol=1e-5)
    before = _reference(bundle, bundle / "params.npz", x)
    assert not np.allclose(_exported(alone, x), before, atol=1e-5)  # trained, not initial
    leftovers = [p.name for p in (tmp_path / "export").iterdir()
                 if p.name not in ("model.safetensors",)]
    # an image model's preprocessing beside it (the model holds none of it)
    assert leftovers == (["model.preprocess.json"] if which == "cnn_bundle" else [])


def test_export_from_run_dir_with_frozen_weights(mlp_head_bundle, cli, tmp_path):
    run = tmp_path / "elsewhere" / "run1"
    params = _train(mlp_head_bundle, run)
    out = tmp_path / "m.onnx"
    r = cli("export-model", run, "--bundle", mlp_head_bundle, "--out", out)
    assert r.returncode == 0, r.stderr
    x = _samples(mlp_head_bundle)
    np.testing.assert_allclose(_exported(out, x), _reference(mlp_head_bundle, params, x),
                               atol=1e-5)
    # without --bundle, a run dir outside its bundle is a clear error
    r = cli("export-model", run, "--out", tmp_path / "n.onnx")
    assert r.returncode == 2 and r.stderr.startswith("error:") and "--bundle" in r.stderr
    assert not (tmp_path / "n.onnx").exists()
    # into the run's checkpoints folder: refused as that, not as a file it would replace
    # (session 34 probe: "would replace the run's own file 'checkpoints/m.onnx'", none there)
    (run / "checkpoints").mkdir(exist_ok=True)
    r = cli("export-model", run, "--bundle", mlp_head_bundle, "--out", run / "checkpoints" / "m.onnx")
    assert r.returncode == 2 and "would write 'm.onnx' into the checkpoints folder of the run" in \
        r.stderr and not (run / "checkpoints" / "m.onnx").exists(), r.stderr


def test_export_model_never_writes_over_another_run_or_bundle(mlp_bundle, cnn_bundle, copy_bundle,
                                                            cli, tmp_path):
    """Session 41 probe: with --overwrite, ``--out`` at another run's params.npz or newest
    checkpoint, or at another bundle's manifest.json, replaced them with the model's bytes
    (only the source run's and source bundle's files were guarded)."""
    source = tmp_path / "source"
    _train(mlp_bundle, source)
    victim = tmp_path / "victim"
    _train(mlp_bundle, victim)
    (victim / "checkpoints").mkdir(exist_ok=True)
    (victim / "checkpoints" / "ckpt-000020.npz").write_bytes(b"kept")
    other = copy_bundle(cnn_bundle)
    before = {p: p.read_bytes() for p in (victim / "params.npz", other / "manifest.json",
                                          victim / "checkpoints" / "ckpt-000020.npz")}
    for out, said in ((victim / "params.npz", "would replace the run's own file"),
                      (victim / "checkpoints" / "ckpt-000020.npz",
                       f"into the checkpoints folder of the run {victim.resolve()}"),
                      (victim / "checkpoints" / "new.onnx", "into the checkpoints folder"),
                      (other / "manifest.json", "into the bundle folder"),
                      (other / "m.onnx", "into the bundle folder")):
        r = cli("export-model", source, "--bundle", mlp_bundle, "--out", out, "--overwrite")
        assert r.returncode == 2 and said in r.stderr and len(r.stderr.splitlines()) == 1, \
            (out, r.stderr)
    assert {p: p.read_bytes() for p in before} == before
    assert not (victim / "checkpoints" / "new.onnx").exists() and not (other / "m.onnx").exists()
    fleet = tmp_path / "fleet"  # a fleet server's aggregate (no run.json, no metrics.jsonl)
    fleet.mkdir()
    (fleet / "summary.json").write_text('{"min_clients": 2, "rounds": 1}')
    (fleet / "params.npz").write_bytes(b"aggregate")
    r = cli("export-model", source, "--bundle", mlp_bundle, "--out", fleet / "params.npz",
            "--overwrite")
    assert r.returncode == 2 and "would replace the run's own file" in r.stderr, r.stderr
    assert (fleet / "params.npz").read_bytes() == b"aggregate"
    # a plain folder beside them (or inside a run folder, not at its own files) is fine, and so
    # is a web app's folder, whose manifest.json is not a bundle's (session 41 review)
    web = tmp_path / "webapp"
    web.mkdir()
    (web / "manifest.json").write_text('{"name": "app", "start_url": "/"}')
    for out in (tmp_path / "models" / "m.onnx", victim / "exported" / "m.onnx",
                web / "m.onnx"):
        r = cli("export-model", source, "--bundle", mlp_bundle, "--out", out)
        assert r.returncode == 0 and out.is_file(), r.stderr


def test_a_stopped_run_with_a_lost_pointer_or_a_damaged_checkpoint_is_still_read(mlp_bundle,
                                                                                 cli, tmp_path):
    """Session 41 probe: a stopped run (no params.npz) whose checkpoints/latest was missing or
    unreadable was "a folder without params.npz or a checkpoint" to eval and export-model, and
    a damaged newest checkpoint ended them with "re-export the bundle"; --resume used the
    checkpoint before it in both cases, and now they do too, with a warning."""
    run = tmp_path / "run"
    b = open_bundle(mlp_bundle)
    train(make_trainer(b, mode="vanilla", lr=1e-2), load_data("digits", b),
          RunConfig(steps=30, checkpoint_every=10, progress=False), run)
    ckpts = run / "checkpoints"
    assert {p.name for p in ckpts.glob("ckpt-*.npz")} >= {"ckpt-000020.npz", "ckpt-000030.npz"}
    (run / "params.npz").unlink()
    (run / "summary.json").unlink()
    for damage in ("no pointer", "junk pointer", "truncated newest"):
        if damage == "no pointer":
            (ckpts / "latest").unlink()
        elif damage == "junk pointer":
            (ckpts / "latest").write_text("junk")
        else:
            with open(ckpts / "ckpt-000030.npz", "r+b") as f:
                f.truncate(100)
        want = "ckpt-000020.npz" if damage == "truncated newest" else "ckpt-000030.npz"
        said = 1 if damage == "truncated newest" else 0  # (a warning once, not per lookup)
        r = cli("eval", mlp_bundle, "--weights", run, "--threads", "1")
        assert r.returncode == 0 and r.stderr.count("is unusable") == said, (damage, r.stderr)
        out = tmp_path / f"{damage.replace(' ', '_')}.onnx"
        r = cli("export-model", run, "--bundle", mlp_bundle, "--out", out)
        assert r.returncode == 0 and want in r.stdout, (damage, r.stdout, r.stderr)
        assert r.stderr.count("is unusable") == said, r.stderr
    # through the pointer's name too (eval --weights RUN/checkpoints/latest)
    (ckpts / "latest").write_text("junk")
    r = cli("eval", mlp_bundle, "--weights", ckpts / "latest", "--threads", "1")
    assert r.returncode == 0 and "ckpt-000020.npz" in r.stdout, r.stdout + r.stderr


def test_the_classes_named_at_export_are_the_runs_where_the_data_numbers_its_labels(cli,
                                                                                   tmp_path):
    """Session 41 probe: a bundle exported with --classes zero,...,nine trained on data with
    numbered labels (the built-in digits) got the label map "0".."9" in run.json and in
    export-model's labels file; the numbers are the bundle's classes, so its names stand."""
    import json

    from export import export_bundle

    names = "zero one two three four five six seven eight nine".split()
    bundle = export_bundle("mlp", tmp_path / "b", class_names=names)
    run = tmp_path / "run"
    r = cli("train", bundle, "--steps", 2, "--threads", 1, "--no-progress", "--out", run)
    assert r.returncode == 0, r.stderr
    assert json.loads((run / "run.json").read_text())["class_names"] == names
    r = cli("export-model", run, "--out", tmp_path / "m.onnx")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "m.labels.json").read_text()) == names
    r = cli("eval", bundle, "--weights", run, "--threads", 1)  # (digits scored as numbered)
    assert r.returncode == 0 and "held-out examples: 360" in r.stdout, r.stderr
    # names that are the data's numbers in another order are not taken over: training read
    # label "0" as class id 0, so the map stays the data's (as data.relabelled decides)
    rev = export_bundle("mlp", tmp_path / "rev", class_names=[str(9 - i) for i in range(10)])
    r = cli("train", rev, "--steps", 1, "--threads", 1, "--no-progress", "--out", tmp_path / "r")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "r" / "run.json").read_text())["class_names"] == \
        [str(i) for i in range(10)]


def test_safetensors_loads_into_torch_model(mlp_bundle, copy_bundle, cli, tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.numpy import load_file

    from export.models import BUILTIN_MODELS

    bundle = copy_bundle(mlp_bundle)
    _train(bundle, bundle / "run")
    out = tmp_path / "model.onnx"
    r = cli("export-model", bundle / "run", "--out", out)
    assert r.returncode == 0 and "came from an .onnx file" not in r.stdout, r.stderr
    tensors = load_file(str(tmp_path / "model.safetensors"))
    net = BUILTIN_MODELS["mlp"].factory()
    state = net.state_dict()
    assert set(tensors) == set(state)
    assert {k: list(v.shape) for k, v in tensors.items()} == \
        {k: list(v.shape) for k, v in state.items()}
    missing, unexpected = net.load_state_dict({k: torch.from_numpy(v) for k, v in tensors.items()},
                                              strict=False)
    assert not missing and not unexpected
    x = _samples(bundle)
    with torch.no_grad():
        y = net.eval()(torch.from_numpy(x["input"])).numpy()
    np.testing.assert_allclose(y, _exported(out, x), atol=1e-4)


def test_explicit_weights_and_initial_fallback(mlp_bundle, cli, tmp_path):
    out = tmp_path / "init.onnx"
    r = cli("export-model", mlp_bundle, "--out", out, "--weights", mlp_bundle / "params.npz")
    assert r.returncode == 0, r.stderr
    x = _samples(mlp_bundle)
    np.testing.assert_allclose(_exported(out, x),
                               _reference(mlp_bundle, mlp_bundle / "params.npz", x), atol=1e-5)


def test_a_checkpoint_copied_out_of_its_run_is_checked_against_the_bundle(
        mlp_bundle, mlp_head_bundle, cli, tmp_path):
    """Session 31 probe: export-model read the bundle's hash from run.json only, so a
    checkpoint copied out of its run folder was exported into any bundle whose tensor names
    matched; its own __meta__ records the hash, as --resume and eval read it."""
    import shutil

    run = tmp_path / "run"
    r = cli("train", mlp_bundle, "--data", "digits", "--steps", 2, "--batch", 8, "--threads", 1,
            "--no-progress", "--checkpoint-every", 2, "--out", run)
    assert r.returncode == 0, r.stderr
    (tmp_path / "loose").mkdir()
    loose = shutil.copy(run / "checkpoints" / "ckpt-000002.npz", tmp_path / "loose")
    r = cli("export-model", mlp_head_bundle, "--weights", loose, "--out", tmp_path / "o.onnx")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith(f"error: checkpoint '{loose}' was trained on another bundle than "
                               f"'{mlp_head_bundle}'"), r.stderr
    r = cli("export-model", mlp_bundle, "--weights", loose, "--out", tmp_path / "m.onnx")
    assert r.returncode == 0, r.stderr
    # the run's own weights given to another bundle: the way out names the run's bundle
    # (session 39 probe: "--bundle DIR", while eval named it)
    r = cli("export-model", mlp_head_bundle, "--weights", run / "params.npz", "--out",
            tmp_path / "p.onnx")
    assert r.returncode == 2 and f"pass the run's own bundle with --bundle {mlp_bundle} (" \
        in r.stderr, r.stderr
    r = cli("export-model", run, "--out", tmp_path / "noext")  # (written; the name is noted)
    assert r.returncode == 0 and (tmp_path / "noext").is_file(), r.stderr
    assert "note: 'noext' has no .onnx suffix" in r.stdout, r.stdout


def test_overwrite_leaves_no_companion_of_the_replaced_export(mlp_bundle, cli, tmp_path):
    """A text model's tokenizer and labels beside model.onnx belong to the export it replaces:
    an --overwrite by a model without them removes them (they once stayed, describing another
    model)."""
    out = tmp_path / "model.onnx"
    out.write_bytes(b"old model")
    stale = [out.with_suffix(".tokenizer.json"), out.with_suffix(".labels.json")]
    for f in stale:
        f.write_text("{}")
    r = cli("export-model", mlp_bundle, "--out", out)
    assert r.returncode == 2 and "--overwrite" in r.stderr, r.stderr
    assert all(f.read_text() == "{}" for f in stale)
    r = cli("export-model", mlp_bundle, "--out", out, "--overwrite")
    assert r.returncode == 0, r.stderr
    assert not out.with_suffix(".tokenizer.json").exists()
    labels = out.with_suffix(".labels.json")
    assert not labels.exists() or labels.read_text() != "{}"
    x = _samples(mlp_bundle)
    np.testing.assert_allclose(_exported(out, x),
                               _reference(mlp_bundle, mlp_bundle / "params.npz", x), atol=1e-5)


def test_errors(cli, tmp_path, mlp_bundle):
    r = cli("export-model", tmp_path / "nope", "--out", tmp_path / "m.onnx")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:")
    assert not (tmp_path / "m.onnx").exists()

    empty = tmp_path / "empty"
    empty.mkdir()
    r = cli("export-model", empty, "--out", tmp_path / "m.onnx")
    assert r.returncode == 2 and r.stderr.startswith("error:")

    r = cli("export-model", mlp_bundle, "--out", tmp_path / "m.onnx",
            "--weights", tmp_path / "missing.npz")
    assert r.returncode == 2 and "not found" in r.stderr

    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = cli("export-model", mlp_bundle, "--out", blocker / "sub" / "m.onnx")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert r.stderr.startswith("error: cannot write")


def test_large_model_uses_external_data(mlp_head_bundle, tmp_path, monkeypatch):
    import runtime.export_model as em

    monkeypatch.setattr(em, "MAX_INLINE_BYTES", 0)
    r = em.export_model(mlp_head_bundle, tmp_path / "big.onnx")
    assert r.external_data == tmp_path / "big.onnx.data" and r.external_data.is_file()
    x = _samples(mlp_head_bundle)
    np.testing.assert_allclose(_exported(tmp_path / "big.onnx", x),
                               _reference(mlp_head_bundle, mlp_head_bundle / "params.npz", x),
                               atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == \
        ["big.onnx", "big.onnx.data", "big.safetensors"]


def test_missing_onnx_package_is_a_clear_error(mlp_bundle, tmp_path, monkeypatch):
    import sys

    import runtime.export_model as em
    from runtime.errors import UserError

    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(UserError, match="needs the onnx package: pip install onnx"):
        em.export_model(mlp_bundle, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("inner", ["sequential", "modulelist-in-a-module-of-its-name",
                                   "attention", "gru", "lstm"])
def test_safetensors_of_a_torch_onnx_file_load_into_the_torch_module(cli, tmp_path, inner):
    """An ONNX file from torch's TorchScript exporter: a raw parameter read as ``x @ self.W``
    keeps its own layout in the safetensors (was: stored transposed, a size mismatch in torch),
    and a nested nn.Sequential's Linear weights (anonymous in the file) get torch's names
    (``mlp.0.weight``, was ``mlp.mlp.0.weight``): the file loads strictly and gives torch's
    output. nn.MultiheadAttention's anonymous packed q/k/v weight is named after its bias
    (``in_proj_weight`` beside ``in_proj_bias``; was ``self_attn.weight``, which torch left
    untrained) and loads back untransposed."""
    torch = pytest.importorskip("torch")
    from safetensors.numpy import load_file

    class Inner(torch.nn.Module):  # scoped /mlp/mlp.0/ by TorchScript, as a Sequential is
        def __init__(self):
            super().__init__()
            self.mlp = torch.nn.ModuleList([torch.nn.Linear(16, 16), torch.nn.Linear(16, 3)])

        def forward(self, h):
            return self.mlp[1](torch.nn.functional.gelu(self.mlp[0](h)))

    class Attention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = torch.nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
            self.head = torch.nn.Linear(16, 3)

        def forward(self, h):
            return self.head(self.enc(h))

    class Recurrent(torch.nn.Module):  # an ONNX file's GRU / LSTM (an outside probe: its
        # tensors were r.param1..3, in ONNX's packed layout, and strict=False skipped them)
        def __init__(self):
            super().__init__()
            self.r = (torch.nn.GRU(16, 12, batch_first=True) if inner == "gru" else
                      torch.nn.LSTM(16, 12, num_layers=2, bidirectional=True, batch_first=True))
            self.head = torch.nn.Linear(12 if inner == "gru" else 24, 3)

        def forward(self, h):
            return self.head(self.r(h)[0])

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.W = torch.nn.Parameter(torch.randn(8, 16) * 0.3)
            self.mlp = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.GELU(),
                                           torch.nn.Linear(16, 3)) if inner == "sequential" \
                else Attention() if inner == "attention" else \
                Recurrent() if inner in ("gru", "lstm") else Inner()

        def forward(self, x):  # [N, 6, 8]
            return self.mlp(torch.relu(x @ self.W)).mean(1)

    torch.manual_seed(0)
    net = Net().eval()
    x = torch.randn(4, 6, 8)
    torch.onnx.export(net, (x,), str(tmp_path / "net.onnx"), dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["logits"], dynamic_axes={"x": {0: "N"}})
    r = cli("export", "--model", tmp_path / "net.onnx", "--out", tmp_path / "b")
    assert r.returncode == 0, r.stderr
    r = cli("export-model", tmp_path / "b", "--out", tmp_path / "model.onnx")
    assert r.returncode == 0, r.stderr
    tensors = load_file(str(tmp_path / "model.safetensors"))
    assert {k: list(v.shape) for k, v in tensors.items()} == \
        {k: list(v.shape) for k, v in net.state_dict().items()}
    fresh = Net().eval()
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in tensors.items()}, strict=True)
    with torch.no_grad():
        np.testing.assert_allclose(fresh(x).numpy(), net(x).numpy(), atol=1e-5)


def test_the_bundle_a_run_json_names_is_said(mlp_head_bundle, cli, tmp_path):
    """A run folder may come from elsewhere and its run.json name any bundle (a probe's: the
    path was followed without a word); the bundle found through it is named on its own line."""
    run = tmp_path / "elsewhere" / "run1"
    r = cli("train", mlp_head_bundle, "--data", "digits", "--steps", 2, "--out", run,
            "--no-progress", "--threads", 1)
    assert r.returncode == 0, r.stderr
    r = cli("export-model", run, "--out", tmp_path / "m.onnx")
    assert r.returncode == 0, r.stderr
    said = [ln for ln in r.stdout.splitlines() if ln.startswith("bundle: ")]
    assert said == [f"bundle: {mlp_head_bundle}, as {run / 'run.json'} names it (--bundle DIR "
                    "picks another)"], r.stdout
    r = cli("export-model", run, "--bundle", mlp_head_bundle, "--out", tmp_path / "n.onnx")
    assert r.returncode == 0 and "bundle: " not in r.stdout, r.stdout
    # the run's folder where a bundle belongs (session 34 probe: "has no manifest.json ...;
    # re-export it", for a fleet's or a run's folder given to eval)
    r = cli("plan", run, "--data", "digits")
    assert r.returncode == 2 and r.stderr.strip() == (
        f"error: '{run}' is a run's folder (its params.npz or summary.json), not a bundle; pass "
        f"the bundle it was trained from (`eval` takes the run as --weights {run})"), r.stderr
    # eval takes it as export-model does (a session 44 probe: refused, "pass the bundle")
    r = cli("eval", run, "--data", "digits", "--threads", 1)
    assert r.returncode == 0 and f"note: '{run}' is a run's folder: evaluating its weights " \
        f"with its bundle {mlp_head_bundle}" in r.stdout, (r.stdout, r.stderr)
    same = cli("eval", mlp_head_bundle, "--weights", run, "--data", "digits", "--threads", 1)
    # the figures are equal; the peak RSS at the end of the line is the process's own and may
    # differ by a fraction of a megabyte between two runs (stop 56's CI: 89.0 vs 89.1 MB)
    figures = [out.stdout.splitlines()[-1].split("; peak RSS")[0] for out in (r, same)]
    assert figures[0] == figures[1] and "; peak RSS" in r.stdout.splitlines()[-1], \
        (r.stdout, same.stdout)


def test_eval_of_a_run_whose_bundle_moved_names_a_way_eval_takes(copy_bundle, mlp_bundle, cli,
                                                                  tmp_path):
    """Session 46 probe: `eval RUN` of a run whose bundle had moved said "pass the bundle with
    --bundle DIR", an option eval does not have ("unrecognized arguments")."""
    bundle, run = copy_bundle(mlp_bundle), tmp_path / "run"
    r = cli("train", bundle, "--data", "digits", "--steps", 2, "--out", run, "--no-progress",
            "--threads", 1)
    assert r.returncode == 0, r.stderr
    bundle.rename(bundle.with_name("moved"))
    r = cli("eval", run, "--data", "digits")
    assert r.returncode == 2 and f"`instant-runtime eval DIR --weights {run}`" in r.stderr \
        and "--bundle" not in r.stderr, r.stderr
    r = cli("eval", bundle.with_name("moved"), "--weights", run, "--data", "digits")
    assert r.returncode == 0, r.stderr


def test_weights_a_bundle_does_not_train_are_said_not_read(mlp_bundle, mlp_head_bundle, cli,
                                                          tmp_path):
    """Session 46 probe: a run's params.npz of the whole mlp (6 tensors), copied out of its
    folder, evaluated or exported with a bundle that trains only the last layer: the 4 hidden
    tensors, frozen there, kept the bundle's initial values without a word (0.164 against
    0.808). Each command now names the tensors it did not read."""
    r = cli("train", mlp_bundle, "--data", "digits", "--steps", 2, "--out", tmp_path / "run",
            "--no-progress", "--threads", 1)
    assert r.returncode == 0, r.stderr
    loose = tmp_path / "loose.npz"
    loose.write_bytes((tmp_path / "run" / "params.npz").read_bytes())
    said = (f"note: {loose} holds 4 tensor(s) this bundle does not train, not read (0.weight, "
            "0.bias, 2.weight, 2.bias): the bundle's own values stand for them")
    for argv in (("eval", mlp_head_bundle, "--weights", loose, "--data", "digits"),
                 ("export-model", mlp_head_bundle, "--weights", loose, "--out",
                  tmp_path / "m.onnx")):
        r = cli(*argv)
        assert r.returncode == 0 and said in r.stdout, (r.stdout, r.stderr)
    r = cli("eval", mlp_bundle, "--weights", loose, "--data", "digits")  # all of them read
    assert r.returncode == 0 and "not read" not in r.stdout, r.stdout
    # the run's folder with another bundle by --bundle (session 48 probe: a model pairing the
    # run's trained last layer with untrained hidden ones was written, exit 0; eval refuses)
    r = cli("export-model", tmp_path / "run", "--bundle", mlp_head_bundle, "--out",
            tmp_path / "m2.onnx")
    assert r.returncode == 2 and "the run trained tensors that this bundle keeps frozen " \
        "(0.weight, 0.bias, 2.weight, ...)" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not list(tmp_path.glob("m2*")), r.stderr
    # a fleet server's folder records its model's signature: another bundle's is refused, as
    # a run folder of another bundle is (the probe's fleet of the whole mlp)
    import json

    from runtime.bundle import open_bundle
    from runtime.fleet.local import model_signature

    fleet = tmp_path / "fleet"
    fleet.mkdir()
    (fleet / "params.npz").write_bytes(loose.read_bytes())
    (fleet / "summary.json").write_text(json.dumps(
        {"rounds": 2, "rounds_done": 2, "signature": model_signature(open_bundle(mlp_bundle))}))
    r = cli("eval", mlp_head_bundle, "--weights", fleet, "--data", "digits")
    assert r.returncode == 2 and "holds a fleet's weights for another model" in r.stderr, \
        r.stderr
    r = cli("eval", mlp_bundle, "--weights", fleet, "--data", "digits")
    assert r.returncode == 0, r.stderr


def test_a_model_trained_on_arrays_gets_no_image_preprocessing(cnn_bundle, cli, tmp_path):
    """Session 27 probe: a Conv1d sensor model (float [N, 8, 20] input, trained on an .npz)
    got MODEL.preprocess.json telling users to decode, grey and resize an image. The run that
    trained on arrays now writes none; one on a built-in image set (or without a run) does."""
    data = load_data("digits", open_bundle(cnn_bundle))
    np.savez(tmp_path / "d.npz", y=data.y[:200], **{k: v[:200] for k, v in data.x.items()})
    for src, run in ((tmp_path / "d.npz", "arrays"), ("digits", "images")):
        r = cli("train", cnn_bundle, "--data", src, "--steps", 2, "--out", tmp_path / run,
                "--mode", "vanilla", "--no-progress")
        assert r.returncode == 0, r.stderr
        r = cli("export-model", tmp_path / run, "--out", tmp_path / run / "m.onnx")
        assert r.returncode == 0, r.stderr
        wrote = (tmp_path / run / "m.preprocess.json").exists()
        assert wrote == (run == "images") == ("image preprocessing" in r.stdout), r.stdout


def test_a_model_written_meanwhile_at_out_is_kept(mlp_bundle, tmp_path, monkeypatch):
    """Two export-models to one new --out at once both said "model written" and the last one
    replaced the other's files without a word (a session 44 probe, 6 of 6 races). The one that
    finds a file written meanwhile keeps it, leaves nothing of its own, and says so."""
    from contract import UserError
    from runtime import export_model as em

    out = tmp_path / "m.onnx"
    write = em.write_safetensors

    def and_another_command_writes(b, params, path):  # the other export-model, meanwhile
        (tmp_path / "m.onnx").write_bytes(b"the other model")
        return write(b, params, path)

    monkeypatch.setattr(em, "write_safetensors", and_another_command_writes)
    with pytest.raises(UserError) as exc:
        em.export_model(mlp_bundle, out)
    assert str(exc.value) == (f"'{out}' was written meanwhile (another export-model to this "
                              "--out?) and is kept; pass --overwrite to replace it, or another "
                              "--out"), exc.value
    assert out.read_bytes() == b"the other model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # (its .safetensors too)
    em.export_model(mlp_bundle, out, overwrite=True)  # --overwrite replaces it
    assert out.read_bytes() != b"the other model" and out.with_suffix(".safetensors").exists()


def test_export_model_writes_where_the_file_system_has_no_hard_links(mlp_bundle, tmp_path,
                                                                      monkeypatch):
    """A file system without hard links (FAT; EACCES from some CIFS/FUSE mounts) gets each
    file renamed in place where none is there (a session 44 review)."""
    import errno

    from contract import UserError
    from runtime import export_model as em

    def no_links(src, dst):
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(em.os, "link", no_links)
    em.export_model(mlp_bundle, tmp_path / "m.onnx")
    assert (tmp_path / "m.onnx").is_file() and (tmp_path / "m.safetensors").is_file()
    with pytest.raises(UserError, match="already exist"):  # (the check before it writes)
        em.export_model(mlp_bundle, tmp_path / "m.onnx")
