"""The device side of issue #16 that CPU-only CI can check: execution-provider selection and its
errors, the optimizer as an ONNX graph against the numpy optimizer, and the device-resident step
(weights, gradients and optimizer state kept as provider OrtValues) run on the CPU provider
against the host step."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from helpers import make_trainer
from onnx import TensorProto, helper

from contract import UserError
from runtime.config import OptimConfig, SessionConfig
from runtime.data import load_data
from runtime.optim import make_optimizer
from runtime.sessions import resolve_device
from runtime.trainer import IndexBatch


def test_device_selection_and_fallback():
    cpu_only = ["CPUExecutionProvider"]
    with_cuda = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert resolve_device(SessionConfig(device="cpu"), with_cuda)[0] == "cpu"
    assert resolve_device(SessionConfig(device="cuda"), with_cuda)[0] == "cuda"
    assert resolve_device(SessionConfig(device="auto"), with_cuda)[0] == "cuda"
    jetson = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
    device, line = resolve_device(SessionConfig(device="auto", profile_providers=jetson),
                                  cpu_only)
    assert device == "cpu" and "using CPU" in line and "\n" not in line
    assert line.startswith("device auto: the profile lists a GPU provider"), line
    # without --profile no profile is named (session 38 probe: "the profile lists a GPU")
    line = resolve_device(SessionConfig(device="auto"), cpu_only)[1]
    assert line.startswith("device auto: no --profile: trying a GPU provider, but this "
                           "onnxruntime build has only CPUExecutionProvider; using CPU"), line
    pi = ("CPUExecutionProvider",)
    assert resolve_device(SessionConfig(device="auto", profile_providers=pi), with_cuda)[0] == \
        "cpu"
    with pytest.raises(UserError, match="--device cuda: this onnxruntime build has no CUDA"):
        resolve_device(SessionConfig(device="cuda"), cpu_only)


def test_device_cuda_on_a_cpu_build_is_one_line(cli, mlp_bundle, tmp_path):
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    r = cli("train", mlp_bundle, "--device", "cuda", "--steps", 1, "--out", tmp_path / "r",
            "--no-progress")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().startswith("error: --device cuda: this onnxruntime build has no CUDA")
    # (session 49 probe: the install advice left both builds in one folder, as pyproject warns)
    assert "pip uninstall -y onnxruntime, then pip install onnxruntime-gpu" in r.stderr


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_optimizer_graph_equals_numpy_over_20_steps(mlp_bundle, name):
    """Same gradients into both for 20 steps (one of them 1e20 times larger); parameters and
    state agree to 1e-6 and stay finite."""
    from runtime.bundle import open_bundle

    b = open_bundle(mlp_bundle)
    rng = np.random.default_rng(0)
    shapes = [(64, 128), (128,), (10, 128)]
    host = {f"p{i}": rng.standard_normal(s).astype(np.float32) for i, s in enumerate(shapes)}
    dev = {k: v.copy() for k, v in host.items()}
    cfg = OptimConfig(name=name, lr=3e-3, weight_decay=0.05)
    opt_host, opt_dev = make_optimizer(cfg, host), make_optimizer(cfg, dev)
    sess = ort.InferenceSession(b.read_file(b.manifest.optimizers[name]),
                                providers=["CPUExecutionProvider"])
    for t in range(1, 21):
        grads = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in host.items()}
        if t == 10:  # finite gradients whose squares pass float32: AdamW's v stays finite
            grads = {k: g * np.float32(1e20) for k, g in grads.items()}
        opt_host.step(host, grads)
        def f(v):
            return np.asarray(v, np.float32)

        for k in dev:
            st = opt_dev.state[k]
            if name == "adamw":
                feeds = {"p": dev[k], "g": grads[k], "m": st["m"], "v": st["v"], "lr": f(cfg.lr),
                         "b1": f(0.9), "b2": f(0.999), "eps": f(1e-8), "wd": f(cfg.decay),
                         "c1": f(1 - 0.9 ** t), "c2": f(1 - 0.999 ** t)}
                p, m, v = sess.run(["p_out", "m_out", "v_out"], feeds)
                dev[k][...], st["m"][...], st["v"][...] = p, m, v
            else:
                feeds = {"p": dev[k], "g": grads[k], "v": st["v"], "lr": f(cfg.lr),
                         "mu": f(0.9), "wd": f(cfg.decay)}
                p, v = sess.run(["p_out", "v_out"], feeds)
                dev[k][...], st["v"][...] = p, v
    for k in host:
        assert all(np.isfinite(a).all() for a in (host[k], *opt_host.state[k].values())), k
        np.testing.assert_allclose(dev[k], host[k], rtol=1e-6, atol=1e-6, err_msg=k)
        for s in opt_host.state[k]:
            np.testing.assert_allclose(opt_dev.state[k][s], opt_host.state[k][s], rtol=1e-6,
                                       atol=1e-7)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_resident_step_matches_the_host_step(cnn_bundle: Path, optimizer: str):
    """The device-resident path (provider OrtValues, optimizer graph, IOBinding) on the CPU
    provider against the host path (numpy optimizer), INSTANT mode with micro-batches."""
    host = make_trainer(cnn_bundle, optimizer=optimizer, lr=3e-3, micro_batch=7)
    res = make_trainer(cnn_bundle, optimizer=optimizer, lr=3e-3, micro_batch=7)
    res.config = replace(res.config, session=replace(res.config.session, resident=True))
    res.resident = True
    data = load_data("digits", host.bundle)
    rng = np.random.default_rng(0)
    host.calibrate(data, 32, np.random.default_rng(1))
    res.calibrate(data, 32, np.random.default_rng(1))
    for i in range(6):
        if i == 3:  # a recalibration window: INSTANT steps through the recal graphs
            host.begin_calibration()
            res.begin_calibration()
        idx = rng.choice(len(data), 20, replace=False)
        a, b = host.train_step(IndexBatch(data, idx)), res.train_step(IndexBatch(data, idx))
        assert abs(a.loss - b.loss) < 1e-4 and a.correct == b.correct
    assert host.window is None and res.window is None  # both windows closed (new bases)
    for k, (p, q) in host.ranks().items():
        assert res.ranks()[k] == (p, q), k
    res.sync_to_host()
    for k in host.params:
        np.testing.assert_allclose(res.params[k], host.params[k], rtol=1e-4, atol=1e-5,
                                   err_msg=k)
    assert host.evaluate(data.test) == pytest.approx(res.evaluate(data.test), abs=1e-5)


def test_a_cuda_provider_that_did_not_start_is_one_line():
    """onnxruntime-gpu whose CUDA/cuDNN libraries do not load gives a session on the CPU (its
    warning is below our log level): ``--device cuda`` must say so, not train on the CPU. (A
    session of this CPU build stands in for the fallen-back one; on the H200 of session 22 the
    real case was run, see the README's GPU section.)"""
    from runtime.sessions import check_provider_started

    graph = helper.make_model(helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])]),
        opset_imports=[helper.make_opsetid("", 17)])
    graph.ir_version = 8  # (onnx's newest IR is more than onnxruntime <= 1.31 reads)
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    with pytest.raises(UserError, match="CUDA provider did not start") as info:
        check_provider_started(session)
    assert "\n" not in str(info.value) and "--device cpu" in str(info.value)


def test_a_tampered_optimizer_graph_reads_nothing_outside_the_bundle(mlp_bundle, tmp_path):
    """The device-resident step's optimizer graph is untrusted as the step's graphs are: an
    external-data initializer naming a file outside the bundle (relative, '..' up to the root:
    onnxruntime resolved it against the current folder) is refused before a session loads it
    (session 40 probe: the file's bytes reached the trained weights)."""
    import hashlib
    import json
    import shutil

    import onnx

    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"TOP-SECRET-" * 4)
    bundle = tmp_path / "b"
    shutil.copytree(mlp_bundle, bundle)
    model = onnx.load(str(bundle / "optim.adamw.onnx"))
    leak = TensorProto(name="leak", data_type=TensorProto.UINT8, dims=[16],
                       data_location=TensorProto.EXTERNAL)
    for key, value in (("location", "../" * 30 + str(secret).lstrip("/")), ("offset", "0"),
                       ("length", "16")):
        entry = leak.external_data.add()
        entry.key, entry.value = key, value
    model.graph.initializer.append(leak)
    model.graph.node.append(helper.make_node("Cast", ["leak"], ["leak_f"], to=TensorProto.FLOAT))
    model.graph.output.append(helper.make_tensor_value_info("leak_f", TensorProto.FLOAT, [16]))
    data = model.SerializeToString()
    (bundle / "optim.adamw.onnx").write_bytes(data)
    m = json.loads((bundle / "manifest.json").read_text())
    m["files"]["optim.adamw.onnx"] = {"bytes": len(data),
                                      "sha256": hashlib.sha256(data).hexdigest()}
    (bundle / "manifest.json").write_text(json.dumps(m))
    tr = make_trainer(bundle, mode="vanilla", optimizer="adamw")
    tr.config = replace(tr.config, session=replace(tr.config.session, resident=True))
    tr.resident = True
    data_set = load_data("digits", tr.bundle)
    with pytest.raises(UserError, match="optim.adamw.onnx: tensor 'leak' points at external "
                                        "data .* re-export it"):
        tr.train_step(IndexBatch(data_set, np.arange(8)))
