"""GRU / LSTM train (export/recurrent.py unrolls them): torch's nn.GRU / nn.LSTM exported by
TorchScript, one forward + backward on the runtime's sessions, loss and every gradient compared
with torch autograd in float64 (the recurrent weights in ONNX's gate layout)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import make_trainer

from export import export_bundle
from runtime.bundle import open_bundle
from runtime.trainer import ArrayBatch

MODELS = textwrap.dedent('''
    import torch
    from torch import nn


    class Net(nn.Module):
        def __init__(self, kind, bidirectional, layers, batch_first):
            super().__init__()
            rnn = {"gru": nn.GRU, "lstm": nn.LSTM}[kind]
            self.rnn = rnn(6, 8, num_layers=layers, batch_first=batch_first,
                           bidirectional=bidirectional)
            self.fc = nn.Linear(16 if bidirectional else 8, 3)
            self.batch_first = batch_first

        def forward(self, x):
            out = self.rnn(x if self.batch_first else x.transpose(0, 1))[0]
            return self.fc((out if self.batch_first else out.transpose(0, 1)).mean(1))


    def make(kind="gru", bidirectional=False, layers=1, batch_first=True):
        torch.manual_seed(0)
        return Net(kind, bidirectional, layers, batch_first).eval()


    def gru_bi2():
        return make("gru", True, 2)


    def lstm():
        return make("lstm")


    def lstm_bi2_seq_first():
        return make("lstm", True, 2, batch_first=False)
''')

# torch's gate blocks in ONNX's order (GRU: r z n -> z r h; LSTM: i f g o -> i o f c)
GATES = {"gru": [1, 0, 2], "lstm": [0, 3, 1, 2]}


def _onnx_layout(kind: str, module, value: str, layer: int, directions: int) -> dict:
    """W, R, B of one ONNX node from torch's per-layer, per-direction tensors (``value``:
    'data' for the parameters, 'grad' for their gradients)."""
    def blocks(t: torch.Tensor) -> np.ndarray:
        a = getattr(t, value).detach().numpy()
        return np.concatenate([np.split(a, len(GATES[kind]))[i] for i in GATES[kind]])

    p = dict(module.rnn.named_parameters())
    out = {"W": [], "R": [], "B": []}
    for d in range(directions):
        sfx = f"_l{layer}" + ("_reverse" if d else "")
        out["W"].append(blocks(p[f"weight_ih{sfx}"]))
        out["R"].append(blocks(p[f"weight_hh{sfx}"]))
        out["B"].append(np.concatenate([blocks(p[f"bias_ih{sfx}"]), blocks(p[f"bias_hh{sfx}"])]))
    return {k: np.stack(v) for k, v in out.items()}


@pytest.mark.parametrize("factory, kind, directions, layers", [
    ("make", "gru", 1, 1), ("gru_bi2", "gru", 2, 2), ("lstm", "lstm", 1, 1),
    ("lstm_bi2_seq_first", "lstm", 2, 2),
])
def test_recurrent_gradients_match_torch(tmp_path, factory, kind, directions, layers):
    path = tmp_path / "rnn.py"
    path.write_text(MODELS)
    bundle = open_bundle(export_bundle(f"{path}:{factory}", tmp_path / "b",
                                       input_shape="4,7,6"))
    node = "GRU" if kind == "gru" else "LSTM"
    by_name = {p.torch_name: p.name for p in bundle.params}
    assert set(by_name) == {f"rnn.{node}{'_' + str(i) if i else ''}.{r}" for i in range(layers)
                            for r in "WRB"} | {"fc.weight", "fc.bias"}, sorted(by_name)

    import importlib.util
    spec = importlib.util.spec_from_file_location("rnn_models", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    module = getattr(mod, factory)().double()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 7, 6)).astype(np.float32)
    y = rng.integers(0, 3, 4).astype(np.int64)
    trainer = make_trainer(bundle, mode="vanilla", threads=0)
    loss, _ = trainer.gradients(ArrayBatch({"x": x}, y))
    ref = F.cross_entropy(module(torch.from_numpy(x).double()), torch.from_numpy(y))
    ref.backward()
    np.testing.assert_allclose(loss, ref.item(), rtol=1e-4)
    initial = np.load(bundle.path / "params.npz")
    for layer in range(layers):
        base = f"rnn.{node}{'_' + str(layer) if layer else ''}"
        want_values = _onnx_layout(kind, module, "data", layer, directions)
        want_grads = _onnx_layout(kind, module, "grad", layer, directions)
        for role in "WRB":
            name = by_name[f"{base}.{role}"]
            np.testing.assert_allclose(initial[name], want_values[role], rtol=1e-6, atol=1e-7)
            np.testing.assert_allclose(trainer._grads[name], want_grads[role], rtol=1e-3,
                                       atol=1e-5, err_msg=f"gradient of {base}.{role}")
    np.testing.assert_allclose(trainer._grads[by_name["fc.weight"]],
                               module.fc.weight.grad.numpy(), rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("op, attrs, extra", [
    ("GRU", {"linear_before_reset": 0, "direction": "reverse"}, []),
    ("GRU", {"layout": 1, "direction": "bidirectional", "linear_before_reset": 1}, ["h0"]),
    ("LSTM", {"layout": 1}, ["h0", "c0", "P"]),
    ("LSTM", {"direction": "bidirectional"}, ["P"]),
])
def test_unrolled_steps_compute_what_onnxruntime_computes(op, attrs, extra):
    """Variants torch never exports (ONNX layout 1, GRU with linear_before_reset=0, reverse,
    LSTM peepholes and initial states): the unrolled graph, run by onnxruntime, gives the GRU/LSTM
    outputs, as onnx's reference implementation computes them (the gradients then follow from
    the ops' rules, checked against torch above)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from export.recurrent import lower_recurrent

    rng = np.random.default_rng(1)
    nd = 2 if attrs.get("direction") == "bidirectional" else 1
    k, H, In, L, N = (3 if op == "GRU" else 4), 5, 4, 6, 3
    layout = attrs.get("layout", 0)
    inits = {"W": rng.standard_normal((nd, k * H, In)), "R": rng.standard_normal((nd, k * H, H)),
             "B": rng.standard_normal((nd, 2 * k * H))}
    state = [nd, N, H] if not layout else [N, nd, H]
    if "h0" in extra:
        inits["h0"] = rng.standard_normal(state)
    if "c0" in extra:
        inits["c0"] = rng.standard_normal(state)
    if "P" in extra:
        inits["P"] = rng.standard_normal((nd, 3 * H))
    names = ["x", "W", "R", "B", "", inits.get("h0") is not None and "h0" or ""]
    if op == "LSTM":
        names += ["c0" if "c0" in inits else "", "P" if "P" in inits else ""]
    outs = ["Y", "Y_h"] + (["Y_c"] if op == "LSTM" else [])
    node = helper.make_node(op, names, outs, name=f"/rnn/{op}", hidden_size=H, **attrs)
    xshape = [L, N, In] if not layout else [N, L, In]
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, xshape)],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outs],
        [numpy_helper.from_array((0.5 * v).astype(np.float32), n) for n, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    x = rng.standard_normal(xshape).astype(np.float32)

    def run(m):
        return ort.InferenceSession(m.SerializeToString(),
                                    providers=["CPUExecutionProvider"]).run(None, {"x": x})

    from onnx.reference import ReferenceEvaluator

    want = ReferenceEvaluator(model).run(None, {"x": x})  # onnxruntime has no layout 1
    lowered = onnx.ModelProto()
    lowered.CopyFrom(model)
    assert [n.name for n in lower_recurrent(lowered)] == [f"/rnn/{op}"]
    assert op not in {n.op_type for n in lowered.graph.node}
    for name, a, b in zip(outs, run(lowered), want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=name)


def test_a_long_sequence_exports_and_trains(tmp_path, monkeypatch):
    """128 steps: the unrolled Split's 128 sizes (1 KB of int64) went to weights.bin and the
    training graphs did not load; index and shape constants now stay inside the graphs.
    Session 42 probe: an LSTM over 400 steps took more than 9 minutes to export, two passes
    each scanning every backward node for every Mul's inputs (quadratic in the length); they
    look producers up in one map now: the scans are counted, and do not grow with the steps
    (4 steps' and 128 steps' exports scan as often; before: 165 and 5 125 scans)."""
    from export.autodiff import Draft

    scans = []
    for method in ("bwd_producer", "bwd_consumers"):
        real = getattr(Draft, method)
        monkeypatch.setattr(Draft, method, lambda self, name, real=real: (
            scans.append(name), real(self, name))[1])
    path = tmp_path / "rnn.py"
    path.write_text(MODELS)
    export_bundle(f"{path}:make", tmp_path / "short", input_shape="2,4,6")
    short, scans[:] = len(scans), []
    bundle = open_bundle(export_bundle(f"{path}:make", tmp_path / "b", input_shape="2,128,6"))
    assert len(scans) <= short + 4, (short, len(scans))
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 128, 6)).astype(np.float32)
    loss, _ = make_trainer(bundle, mode="vanilla", threads=0).gradients(
        ArrayBatch({"x": x}, np.array([0, 2], np.int64)))
    assert np.isfinite(loss)


@pytest.mark.parametrize("model", ["gru_bi2", "lstm_bi2_seq_first"])
def test_export_model_gives_recurrent_weights_in_torchs_layout(model, tmp_path):
    """Session 28 probe: export-model's .safetensors held a GRU's weights as ``rnn.GRU.W``,
    ``.R``, ``.B`` in ONNX's layout, which torch's ``load_state_dict(strict=False)`` skipped
    without a word (session 28 named them in a note). Now they are torch's own tensors
    (``rnn.weight_ih_l1_reverse`` & co., torch's gate order): after training, the file loads
    into the torch module with ``strict=True`` (fc's tensors and the layers' together) and the
    module then gives export-model's .onnx outputs. A peephole tensor (not torch's) would stay
    packed and be named."""
    import importlib.util
    import subprocess
    import sys

    import onnxruntime as ort
    from safetensors.numpy import load_file

    from runtime.torch_weights import packed_recurrent

    path = tmp_path / "rnn.py"
    path.write_text(MODELS)
    b = open_bundle(export_bundle(f"{path}:{model}", tmp_path / "b", input_shape="2,5,6"))
    assert packed_recurrent(b) == []
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 5, 6)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=rng.integers(0, 3, 64))
    repo = Path(__file__).resolve().parents[1]

    def cli(*args):
        r = subprocess.run([sys.executable, "-m", "runtime", *map(str, args)], cwd=repo,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        return r.stdout

    cli("train", tmp_path / "b", "--data", tmp_path / "d.npz", "--steps", 5, "--lr", 0.5,
        "--optimizer", "sgd", "--mode", "vanilla", "--threads", 1, "--out", tmp_path / "r")
    out = cli("export-model", tmp_path / "r", "--out", tmp_path / "m.onnx")
    assert "packed layout" not in out, out
    spec = importlib.util.spec_from_file_location("rnn_models", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    net = getattr(mod, model)()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    net.load_state_dict({k: torch.from_numpy(v) for k, v in
                         load_file(str(tmp_path / "m.safetensors")).items()}, strict=True)
    changed = [k for k, v in net.state_dict().items() if not torch.equal(v, before[k])]
    assert any("weight_hh_l1" in k for k in changed), changed  # trained, and given back
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    want = sess.run(None, {sess.get_inputs()[0].name: x[:2]})[0]
    with torch.no_grad():
        got = net(torch.from_numpy(x[:2])).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_peephole_and_foreign_recurrent_tensors_stay_packed_and_named():
    """The conversion's edges, on names and shapes alone: a peephole ``P`` and a tensor whose
    shape torch's layer does not give stay as they are (and are named); layer numbers come
    from the node's suffix, the second direction is ``_reverse``, gates in torch's order."""
    from runtime.torch_weights import _torch_recurrent

    w = np.arange(2 * 12 * 3, dtype=np.float32).reshape(2, 12, 3)  # GRU: 3 gates, H 4
    parts = _torch_recurrent("enc.rnn.GRU_2.W", w)
    assert sorted(parts) == ["enc.rnn.weight_ih_l2", "enc.rnn.weight_ih_l2_reverse"]
    np.testing.assert_array_equal(parts["enc.rnn.weight_ih_l2"][:4], w[0, 4:8])  # r from z r h
    np.testing.assert_array_equal(parts["enc.rnn.weight_ih_l2_reverse"][8:], w[1, 8:])
    bias = _torch_recurrent("LSTM.B", np.arange(32, dtype=np.float32)[None])  # H 4: Wb | Rb
    np.testing.assert_array_equal(bias["bias_hh_l0"], [16, 17, 18, 19, 24, 25, 26, 27,
                                                       28, 29, 30, 31, 20, 21, 22, 23])
    assert _torch_recurrent("rnn.LSTM.P", np.zeros((1, 12), np.float32)) is None
    assert _torch_recurrent("rnn.GRU.W", np.zeros((1, 10, 3), np.float32)) is None  # not 3·H
    assert _torch_recurrent("rnn.GRU.B", np.zeros((1, 2, 6), np.float32)) is None
    assert _torch_recurrent("fc.weight", np.zeros((3, 4), np.float32)) is None


def test_a_stacked_layer_whose_input_size_only_its_weights_state_exports(tmp_path):
    """Torch's dynamo exporter reshapes a stacked GRU/LSTM's output before the next layer so
    that shape inference leaves the next layer's input size unknown; W states it (session 38
    probe: a 2-layer LSTM from dynamo was refused, "the sequence length and input size must be
    static"). The same reshape put into a TorchScript file here: it exports and gives torch's
    loss."""
    import onnx
    from onnx import helper, numpy_helper

    path = tmp_path / "rnn.py"
    path.write_text(MODELS)
    import importlib.util

    spec = importlib.util.spec_from_file_location("rnn_models", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    net = mod.make("lstm", False, 2, batch_first=False)
    x = torch.randn(4, 10, 6)
    torch.onnx.export(net, (x,), tmp_path / "m.onnx", input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "N"}}, dynamo=False)
    m = onnx.load(tmp_path / "m.onnx")
    second = [n for n in m.graph.node if n.op_type == "LSTM"][1]
    for name, v in (("lo", [0]), ("mid", [2]), ("hi", [3]), ("ax", [0])):
        m.graph.initializer.append(numpy_helper.from_array(np.array(v, np.int64), name))
    src = second.input[0]  # its shape [L, N, C] with C as a product: [L, N, prod(C)]
    at = list(m.graph.node).index(second)
    for k, node in enumerate([
            helper.make_node("Shape", [src], ["s"]),
            helper.make_node("Slice", ["s", "lo", "mid"], ["s01"]),
            helper.make_node("Slice", ["s", "mid", "hi"], ["s2"]),
            helper.make_node("ReduceProd", ["s2"], ["c"], keepdims=1),
            helper.make_node("Concat", ["s01", "c"], ["flat"], axis=0),
            helper.make_node("Reshape", [src, "flat"], ["flat_out"], name="/flatten")]):
        m.graph.node.insert(at + k, node)
    second.input[0] = "flat_out"
    del m.graph.value_info[:]
    inferred = onnx.shape_inference.infer_shapes(m, data_prop=True)
    dims = next(v for v in inferred.graph.value_info if v.name == "flat_out").type.tensor_type.shape.dim
    assert not dims[2].HasField("dim_value")  # the input size is unknown to shape inference
    onnx.save(m, tmp_path / "flat.onnx")
    bundle = open_bundle(export_bundle(str(tmp_path / "flat.onnx"), tmp_path / "b"))
    y = np.array([0, 2, 1, 2], np.int64)
    loss, _ = make_trainer(bundle, mode="vanilla", threads=0).gradients(
        ArrayBatch({"x": x.numpy()}, y))
    want = F.cross_entropy(net(x), torch.from_numpy(y)).item()
    assert loss == pytest.approx(want, rel=1e-5, abs=1e-6)
