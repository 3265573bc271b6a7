"""INSTANT compressed rules (export/rules.py ``linear_instant``) and calibration (runtime/).

* full-rank bases: the compressed gradients equal the exact ones;
* reduced rank: they equal an independent numpy implementation of docs/method.md's formulas, written below
  in the paper's layout (per sample ``x ∈ R^{L×Cx}``, ``W ∈ R^{Cy×Cx}``);
* the forward saves the compressed activation instead of the layer input;
* ranks are runtime data: one exported graph pair runs with bases of several ranks;
* calibration: ranks and energy-compensated bases from known spectra.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper
from reference import Runner, loss_weight, op_model, run_training

from export.autodiff import build_training_graphs
from export.graph import Shapes
from export.layers import find_compressible_layers
from runtime.calibrate import (
    RANGE_OVERSAMPLE,
    DegenerateGram,
    basis,
    basis_from_gram,
    decompose,
    rank_for_energy,
)

# name: (body, kind, x shape, w shape, expected (x_axis, g_axis))
LAYERS = {
    "linear3d_token": ("h = MatMul(x, w)\n y = Add(h, b)", "matmul", (2, 3, 5), (5, 4),
                       ("token", "token")),
    "linear3d_channel": ("h = MatMul(x, w)\n y = Add(h, b)", "matmul", (2, 6, 4), (4, 3),
                         ("channel", "channel")),
    "linear3d_mixed": ("h = MatMul(x, w)\n y = Add(h, b)", "matmul", (2, 4, 3), (3, 6),
                       ("channel", "token")),
    "gemm2d": ("y = Gemm <transB = 1> (x, w, b)", "gemm", (5, 4), (3, 4),
               ("channel", "channel")),
    "conv1x1_token": ("y = Conv(x, w, b)", "conv", (2, 6, 2, 2), (5, 6, 1, 1),
                      ("token", "token")),
    "conv1x1_channel": ("y = Conv(x, w, b)", "conv", (2, 3, 3, 3), (4, 3, 1, 1),
                        ("channel", "channel")),
    "conv1x1_mixed": ("y = Conv(x, w, b)", "conv", (2, 3, 2, 2), (6, 3, 1, 1),
                      ("channel", "token")),
    # a Linear over a channels-last map [N, H, W, C] (ConvNeXt): positions flattened
    "linear4d_token": ("h = MatMul(x, w)\n y = Add(h, b)", "matmul", (2, 2, 3, 8), (8, 5),
                       ("token", "channel")),
    "linear4d_channel": ("h = MatMul(x, w)\n y = Add(h, b)", "matmul", (2, 3, 3, 4), (4, 6),
                         ("channel", "channel")),
    # pointwise Conv1d / Conv3d: the same layer over [N, C, L] / [N, C, D, H, W]
    "conv1d_k1_token": ("y = Conv(x, w, b)", "conv", (2, 6, 4), (5, 6, 1), ("token", "token")),
    "conv1d_k1_channel": ("y = Conv(x, w, b)", "conv", (2, 3, 7), (4, 3, 1),
                          ("channel", "channel")),
    "conv3d_k1_mixed": ("y = Conv(x, w, b)", "conv", (2, 3, 1, 2, 2), (6, 3, 1, 1, 1),
                        ("channel", "token")),
}
PARAMS = ["x", "w", "b"]


def _cy(kind: str, w_shape) -> int:
    return w_shape[1] if kind == "matmul" else w_shape[0]


def _inputs(case: str, seed: int = 0) -> dict[str, np.ndarray]:
    _, kind, xs, ws, _ = LAYERS[case]
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal(xs).astype(np.float32),
            "w": rng.standard_normal(ws).astype(np.float32),
            "b": rng.standard_normal(_cy(kind, ws)).astype(np.float32)}


def _instant_setup(case: str, body: str | None = None, inputs=None, trainable=PARAMS,
                   bases: bool = True):
    """The forward model (with basis inputs unless ``bases`` is false) and its one layer."""
    inputs = inputs if inputs is not None else _inputs(case)
    model = op_model(body or LAYERS[case][0], inputs)
    layers = find_compressible_layers(model, Shapes(model), set(trainable), {}, exclude=[])
    assert len(layers) == 1, layers
    ly = layers[0]
    ly.p_input, ly.q_input = f"instant.{ly.name}.P", f"instant.{ly.name}.Q"
    if not bases:
        return model, ly, inputs
    for name, dim, rank in ((ly.p_input, ly.x_dim, "rank_x"), (ly.q_input, ly.g_dim, "rank_g")):
        model.graph.input.append(helper.make_tensor_value_info(
            name, TensorProto.FLOAT, [f"{rank}.{ly.name}", dim]))
    return model, ly, inputs


def _orthonormal_rows(rank: int, dim: int, scale: float, seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((dim, dim)))
    return (scale * q[:rank]).astype(np.float32)


# --------------------------------------------------------------- independent numpy reference


def _rows(t: np.ndarray, kind: str) -> np.ndarray:
    """Per-sample matrices in the paper's layout, [N, L, C]."""
    if kind == "conv":
        n, c = t.shape[:2]
        return t.reshape(n, c, -1).transpose(0, 2, 1)
    if t.ndim > 3:  # [N, H, W, C] -> [N, H·W, C]
        return t.reshape(t.shape[0], -1, t.shape[-1])
    return t[:, None, :] if t.ndim == 2 else t


def _unrows(m: np.ndarray, kind: str, shape) -> np.ndarray:
    if kind == "conv":
        return m.transpose(0, 2, 1).reshape(shape)
    if len(shape) > 3:
        return m.reshape(shape)
    return m[:, 0, :] if len(shape) == 2 else m


def instant_reference(kind, x, w, gy, P, Q, x_axis, g_axis):
    """(g_x, g_W, g_b) of docs/method.md in float64, in the layouts of x and w."""
    X, G = _rows(x.astype(np.float64), kind), _rows(gy.astype(np.float64), kind)
    P, Q = P.astype(np.float64), Q.astype(np.float64)
    Wc = {"matmul": lambda: w.T, "gemm": lambda: w,
          "conv": lambda: w.reshape(w.shape[0], w.shape[1])}[kind]().astype(np.float64)
    if x_axis == "token":   # x̂ = P x;  g_W = Σ_b (P g_y)ᵀ x̂
        xh = np.einsum("rl,nlc->nrc", P, X)
        gw = sum((P @ G[i]).T @ xh[i] for i in range(len(X)))
    else:                   # x̂ = x Pᵀ;  g_W = (g_yᵀ x̂) P
        xh = X @ P.T
        gw = sum(G[i].T @ xh[i] for i in range(len(X))) @ P
    if g_axis == "token":   # g_x = Qᵀ((Q g_y) W)
        gx = np.stack([Q.T @ ((Q @ G[i]) @ Wc) for i in range(len(X))])
    else:                   # g_x = (g_y Qᵀ)(Q W)
        gx = np.stack([(G[i] @ Q.T) @ (Q @ Wc) for i in range(len(X))])
    gw = {"matmul": lambda: gw.T, "gemm": lambda: gw, "conv": lambda: gw.reshape(w.shape)}[kind]()
    gb = G.sum(axis=(0, 1))
    return _unrows(gx, kind, x.shape), gw, gb


def exact_reference(kind, x, w, gy):
    """The exact gradients in the same layout (full-rank identity bases in the formulas)."""
    X = _rows(x, kind)
    eye_x, eye_g = np.eye(X.shape[1]), np.eye(X.shape[1])
    return instant_reference(kind, x, w, gy, eye_x, eye_g, "token", "token")


def _check(grads, expected, rtol, atol):
    for name, want in zip(PARAMS, expected, strict=True):
        assert grads[name].shape == want.shape, (name, grads[name].shape, want.shape)
        np.testing.assert_allclose(grads[name], want, rtol=rtol, atol=atol,
                                   err_msg=f"gradient of '{name}'")


# ------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("case", list(LAYERS))
def test_layer_detection_and_axis_modes(case):
    _, ly, _ = _instant_setup(case)
    kind = LAYERS[case][1]
    assert ly.kind == ("conv1x1" if kind == "conv" else "linear")
    assert (ly.x_axis, ly.g_axis) == LAYERS[case][4]
    assert ly.weight == "w" and ly.x == "x"


@pytest.mark.parametrize("case", list(LAYERS))
def test_full_rank_bases_give_exact_gradients(case):
    model, ly, inputs = _instant_setup(case)
    feeds = {**inputs, ly.p_input: np.eye(ly.x_dim, dtype=np.float32),
             ly.q_input: np.eye(ly.g_dim, dtype=np.float32)}
    _, vanilla = run_training(model, PARAMS, feeds, "vanilla")
    _, instant = run_training(model, PARAMS, feeds, "instant", [ly])
    _check(instant, [vanilla[p] for p in PARAMS], rtol=1e-5, atol=1e-6)
    # and both are the exact gradient, computed independently
    kind = LAYERS[case][1]
    _check(vanilla, exact_reference(kind, inputs["x"], inputs["w"], loss_weight(model)),
           rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", list(LAYERS))
def test_full_rank_gradient_basis_runs_the_exact_input_gradient(case):
    """A Q with g_dim rows selects the exact g·W (the output gradient is never saved, so a full
    projection could only cost compute): its values are not used. A scaled rotation would give
    1.44 × the exact input gradient through the compressed formula Qᵀ((Q g) W)."""
    model, ly, inputs = _instant_setup(case)
    Q = _orthonormal_rows(ly.g_dim, ly.g_dim, 1.2, seed=3)
    feeds = {**inputs, ly.p_input: np.eye(ly.x_dim, dtype=np.float32), ly.q_input: Q}
    _, instant = run_training(model, PARAMS, feeds, "instant", [ly])
    kind = LAYERS[case][1]
    want = exact_reference(kind, inputs["x"], inputs["w"], loss_weight(model))
    _check(instant, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", list(LAYERS))
def test_reduced_rank_matches_numpy_formulas(case):
    model, ly, inputs = _instant_setup(case)
    kind = LAYERS[case][1]
    rx, ry = max(1, ly.x_dim - 2), max(1, ly.g_dim - 1)
    P = _orthonormal_rows(rx, ly.x_dim, 1.25, seed=1)
    Q = _orthonormal_rows(ry, ly.g_dim, 1.1, seed=2)
    feeds = {**inputs, ly.p_input: P, ly.q_input: Q}
    _, grads = run_training(model, PARAMS, feeds, "instant", [ly])
    gy = loss_weight(model)
    want = instant_reference(kind, inputs["x"], inputs["w"], gy, P, Q, ly.x_axis, ly.g_axis)
    _check(grads, want, rtol=1e-4, atol=1e-5)
    # not the exact gradient in disguise
    exact = exact_reference(kind, inputs["x"], inputs["w"], gy)
    for name, g, e in zip(PARAMS[:2], [grads["x"], grads["w"]], exact[:2], strict=True):
        assert np.abs(g - e).max() > 1e-2, f"'{name}' gradient is not compressed"


def test_a_scaled_gemm_is_compressed_with_its_alpha_and_beta():
    """A Gemm with alpha != 1 (other exporters' scaled heads and layers) is an INSTANT layer:
    x·W's output gradient is alpha·g, the bias's beta·g. At full rank the gradients are the
    exact ones; at reduced rank they are the formulas' with alpha·g. (Before, such a layer was
    left exact: its compressed rule dropped alpha.)"""
    body = "y = Gemm <transB = 1, alpha = 0.5, beta = 2.0> (x, w, b)"
    model, ly, inputs = _instant_setup("gemm2d", body)
    feeds = {**inputs, ly.p_input: np.eye(ly.x_dim, dtype=np.float32),
             ly.q_input: np.eye(ly.g_dim, dtype=np.float32)}
    _, vanilla = run_training(model, PARAMS, feeds, "vanilla")
    _, instant = run_training(model, PARAMS, feeds, "instant", [ly])
    gy = loss_weight(model)
    gx, gw, gb = exact_reference("gemm", inputs["x"], inputs["w"], gy)
    want = [0.5 * gx, 0.5 * gw, 2.0 * gb]
    _check(vanilla, want, rtol=1e-4, atol=1e-5)
    _check(instant, want, rtol=1e-4, atol=1e-5)
    P = _orthonormal_rows(ly.x_dim - 2, ly.x_dim, 1.25, seed=1)
    Q = _orthonormal_rows(ly.g_dim - 1, ly.g_dim, 1.1, seed=2)
    _, grads = run_training(model, PARAMS, {**inputs, ly.p_input: P, ly.q_input: Q},
                            "instant", [ly])
    gx, gw, _ = instant_reference("gemm", inputs["x"], inputs["w"], 0.5 * gy, P, Q,
                                  ly.x_axis, ly.g_axis)
    _check(grads, [gx, gw, 2.0 * gb], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", ["linear3d_token", "gemm2d", "conv1x1_channel",
                                  "conv1d_k1_token"])
def test_reduced_rank_first_layer(case):
    """The layer input is data (no g_x): only the weight and bias gradients, no Q needed."""
    model, ly, inputs = _instant_setup(case, trainable=["w", "b"])
    P = _orthonormal_rows(max(1, ly.x_dim - 1), ly.x_dim, 1.25, seed=6)
    tg = build_training_graphs(model, "loss", ["w", "b"], "instant", [ly], 17)
    assert ly.q_input not in {i.name for i in tg.backward.graph.input}
    _, grads = Runner(tg)({**inputs, ly.p_input: P, ly.q_input: np.zeros((1, ly.g_dim),
                                                                           np.float32)})
    _, gw, gb = instant_reference(LAYERS[case][1], inputs["x"], inputs["w"], loss_weight(model),
                                  P, np.eye(ly.g_dim), ly.x_axis, ly.g_axis)
    np.testing.assert_allclose(grads["w"], gw, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(grads["b"], gb, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", ["linear3d_token", "linear3d_channel", "conv1x1_channel"])
def test_instant_forward_saves_compressed_activation_not_input(case):
    """With ``x = Relu(x0)`` the layer input is a forward tensor: vanilla saves it, instant not."""
    body = "x = Relu(x0)\n " + LAYERS[case][0]
    inputs = _inputs(case)
    inputs = {"x0": inputs.pop("x"), **inputs}
    params = ["x0", "w", "b"]
    model, ly, _ = _instant_setup(case, body, inputs, params)
    opset = 17
    vanilla = build_training_graphs(model, "loss", params, "vanilla", [], opset)
    instant = build_training_graphs(model, "loss", params, "instant", [ly], opset)
    assert "x" in vanilla.saved
    assert "x" not in instant.saved, instant.saved

    P = _orthonormal_rows(2, ly.x_dim, 1.0, seed=3)
    Q = _orthonormal_rows(2, ly.g_dim, 1.0, seed=4)
    fwd_out, _ = Runner(instant)({**inputs, ly.p_input: P, ly.q_input: Q})
    X = _rows(np.maximum(inputs["x0"], 0), LAYERS[case][1]).astype(np.float64)
    xhat = np.einsum("rl,nlc->nrc", P, X) if ly.x_axis == "token" else X @ P.T
    def is_xhat(v: np.ndarray) -> bool:  # in the paper's layout or per-sample transposed
        return any(c.shape == xhat.shape and np.allclose(c, xhat, rtol=1e-5, atol=1e-6)
                   for c in (v, np.swapaxes(v, -1, -2)))

    assert any(is_xhat(fwd_out[s]) for s in instant.saved), \
        f"no saved tensor equals the compressed activation; saved: {instant.saved}"
    assert not any(fwd_out[s].dtype == np.float32 and fwd_out[s].size >= X.size
                   for s in instant.saved), "a full-size float activation is still saved"


@pytest.mark.parametrize("case, inputs", [
    ("linear3d_channel", {"x": (2, 8, 6), "w": (6, 7), "b": (7,)}),
    ("conv1x1_token", {"x": (2, 7, 2, 3), "w": (8, 7, 1, 1), "b": (8,)}),
])
def test_ranks_are_runtime_data(case, inputs):
    rng = np.random.default_rng(5)
    inputs = {k: rng.standard_normal(s).astype(np.float32) for k, s in inputs.items()}
    model, ly, _ = _instant_setup(case, inputs=inputs)
    assert min(ly.x_dim, ly.g_dim) >= 6
    run = Runner(build_training_graphs(model, "loss", PARAMS, "instant", [ly], 17))
    gy = loss_weight(model)
    results = []
    for rx, ry in ((2, 3), (5, 4)):
        P = _orthonormal_rows(rx, ly.x_dim, 1.2, seed=rx)
        Q = _orthonormal_rows(ry, ly.g_dim, 1.3, seed=10 + ry)
        _, grads = run({**inputs, ly.p_input: P, ly.q_input: Q})
        want = instant_reference(LAYERS[case][1], inputs["x"], inputs["w"], gy, P, Q,
                                 ly.x_axis, ly.g_axis)
        _check(grads, want, rtol=1e-4, atol=1e-5)
        results.append(grads["w"])
    assert np.abs(results[0] - results[1]).max() > 1e-2  # the rank really changed the result


@pytest.mark.parametrize("case", ["linear3d_token", "linear3d_channel", "conv1x1_channel",
                                  "gemm2d"])
def test_calib_grams_match_numpy(case):
    """The first calibration's graphs: no parameter gradients, the layer's Σ X Xᵀ and Σ G Gᵀ."""
    model, ly, inputs = _instant_setup(case, bases=False)
    tg = build_training_graphs(model, "loss", PARAMS, "calib", [ly], 17)
    assert tg.grads == {}
    fwd_out, bwd_out = Runner(tg).run_all(inputs)
    _check_grams(case, ly, model, inputs, fwd_out[tg.fwd_grams[ly.name]],
                 bwd_out[tg.bwd_grams[ly.name]])


def _check_grams(case, ly, model, inputs, gram_x, gram_g):
    kind = LAYERS[case][1]

    def gram(t, axis):  # Σ_b over samples, along the basis axis
        m = _rows(t.astype(np.float64), kind)
        return np.einsum("nlc,nkc->lk", m, m) if axis == "token" else np.einsum(
            "nlc,nld->cd", m, m)

    np.testing.assert_allclose(gram_x, gram(inputs["x"], ly.x_axis), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(gram_g, gram(loss_weight(model), ly.g_axis), rtol=1e-4,
                               atol=1e-4)


@pytest.mark.parametrize("case", ["linear3d_token", "linear3d_channel", "conv1x1_channel",
                                  "gemm2d"])
def test_recal_is_the_instant_step_plus_grams(case):
    """Recalibration steps: the INSTANT gradients with the current bases, unchanged, plus the
    Grams of the full activation and output gradient (not of their projections)."""
    model, ly, inputs = _instant_setup(case)
    rx, ry = max(1, ly.x_dim - 2), max(1, ly.g_dim - 1)
    feeds = {**inputs, ly.p_input: _orthonormal_rows(rx, ly.x_dim, 1.25, seed=1),
             ly.q_input: _orthonormal_rows(ry, ly.g_dim, 1.1, seed=2)}
    _, instant = run_training(model, PARAMS, feeds, "instant", [ly])
    tg = build_training_graphs(model, "loss", PARAMS, "recal", [ly], 17)
    fwd_out, bwd_out = Runner(tg).run_all(feeds)
    for p, out in tg.grads.items():
        np.testing.assert_allclose(bwd_out[out], instant[p], rtol=1e-5, atol=1e-6, err_msg=p)
    _check_grams(case, ly, model, inputs, fwd_out[tg.fwd_grams[ly.name]],
                 bwd_out[tg.bwd_grams[ly.name]])


# ------------------------------------------------------------------------------ calibration

# Gram singular values S with S² = ENERGY (sums to 1): cumsum = .6, .9, .96, .99, 1.0
ENERGY = np.array([0.6, 0.3, 0.06, 0.03, 0.01])


@pytest.mark.parametrize("eps, p, rank", [
    (0.95, 0, 3),   # #{.6, .9} = 2, + 0 + 1
    (0.95, 1, 4),   # oversampling adds exactly p
    (0.95, 2, 5),
    (0.95, 3, 5),   # capped at the dimension
    (0.5, 0, 1),    # nothing under the threshold: one direction
    (0.99, 0, 5),   # .99 <= .99 counts (4) + 1
    (0.97, 0, 4),
])
def test_rank_for_energy(eps, p, rank):
    s = np.sqrt(ENERGY) * 7.0  # the rule is scale-free
    assert rank_for_energy(s, eps, p) == rank


def _gram_with_eigenvalues(lam: np.ndarray, seed: int = 0):
    u, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((len(lam), len(lam))))
    return (u * lam) @ u.T, u


@pytest.mark.parametrize("eps, p, rank, retained", [
    (0.95, 0, 3, 0.96), (0.95, 1, 4, 0.99), (0.5, 0, 1, 0.6), (0.95, 9, 5, 1.0),
])
def test_basis_from_gram_known_spectrum(eps, p, rank, retained):
    lam = np.sqrt(ENERGY) * 3.0             # eigenvalues of the Gram = its singular values
    gram, u = _gram_with_eigenvalues(lam)
    basis = basis_from_gram(gram, energy=eps, oversample=p)
    B = basis.matrix.astype(np.float64)
    assert basis.rank == rank and B.shape == (rank, len(lam))
    assert basis.retained == pytest.approx(retained, rel=1e-6)
    # energy compensation: orthogonal rows of norm 1/sqrt(retained fraction)
    np.testing.assert_allclose(B @ B.T, np.eye(rank) / retained, rtol=1e-5, atol=1e-6)
    # the rows span the top-`rank` eigenvectors, in order (up to sign)
    top = u[:, :rank]
    np.testing.assert_allclose(B @ top @ top.T, B, atol=1e-5)
    np.testing.assert_allclose(np.abs(B @ top) * np.sqrt(retained), np.eye(rank), atol=1e-5)
    np.testing.assert_allclose(basis.spectrum, ENERGY, rtol=1e-5)


def test_basis_from_gram_rank_override_and_cap():
    gram, u = _gram_with_eigenvalues(np.array([4.0, 2.0, 1.0, 0.5]), seed=1)
    b2 = basis_from_gram(gram, rank=2)
    assert b2.rank == 2
    e = np.array([16.0, 4.0, 1.0, 0.25])
    assert b2.retained == pytest.approx(e[:2].sum() / e.sum())
    assert basis_from_gram(gram, rank=100).rank == 4
    assert basis_from_gram(gram, rank=100).retained == pytest.approx(1.0)
    # a full-rank basis is orthonormal: the INSTANT rules then give the exact gradient
    full = basis_from_gram(gram, rank=4).matrix.astype(np.float64)
    np.testing.assert_allclose(full.T @ full, np.eye(4), atol=1e-6)


def test_basis_from_gram_of_real_activations_spans_them():
    """Activations of rank 2 in 6 dims: ε = 0.95 keeps the 2 live directions (plus one)."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4, 9, 2)) @ rng.standard_normal((2, 6))  # [N, L, C], rank 2 in C
    gram = np.einsum("nlc,nld->cd", x, x) / len(x)
    basis = basis_from_gram(gram, energy=0.95, oversample=0)
    assert basis.rank == 2
    B = basis.matrix.astype(np.float64) * np.sqrt(basis.retained)
    flat = x.reshape(-1, 6)
    np.testing.assert_allclose(flat @ B.T @ B, flat, atol=1e-4)


def test_a_wide_gram_of_few_vectors_decomposes_like_eigh():
    """A Gram summing fewer vectors than its width (a wide [N, C] layer seen by a few dozen
    rows) goes through the range finder: the same eigenvalues, bases spanning the same
    directions as a full eigh, a completed orthonormal basis when a rank above its range is
    asked for, and DegenerateGram on non-finite entries like the full path."""
    rng = np.random.default_rng(3)
    d, n = 300, 40
    x = rng.standard_normal((n, 6)) @ rng.standard_normal((6, d)) + 0.05 * rng.standard_normal((n, d))
    gram = x.T @ x  # rank <= n, summed over n rows
    full = decompose(gram, 1.0 / n)
    fast = decompose(gram, 1.0 / n, rank_bound=n)
    assert fast.vectors.shape == (d, n + RANGE_OVERSAMPLE)  # the range finder ran
    assert full.vectors.shape == (d, d)
    np.testing.assert_allclose(fast.values[:n], full.values[:n], rtol=1e-8, atol=1e-10)
    assert np.all(fast.values[n:] < 1e-9 * fast.values[0])
    for r in (1, 6, 20, n):
        a, b = basis(full, r).matrix.astype(np.float64), basis(fast, r).matrix.astype(np.float64)
        # the same subspace and compensation: each basis reproduces the other's projector
        np.testing.assert_allclose(a.T @ a, b.T @ b, atol=2e-5)
    # above the computed range: still an orthonormal basis, containing the whole range
    big = basis(fast, 120).matrix.astype(np.float64)
    np.testing.assert_allclose(big @ big.T, np.eye(120), atol=1e-5)
    np.testing.assert_allclose(x @ big.T @ big, x, atol=1e-3 * np.abs(x).max())
    bad = gram.copy()
    bad[5, 7] = np.nan
    with pytest.raises(DegenerateGram):
        decompose(bad, 1.0 / n, rank_bound=n)
    # a bound near the width keeps the full eigh
    assert decompose(gram, 1.0 / n, rank_bound=d // 2).vectors.shape == (d, d)
    # a bound below the true rank (a layer whose rows per sample are more than its shapes say:
    # [N·L, C] counted as N rows) is caught by the variance the range misses: the full eigh
    wrong = decompose(gram, 1.0 / n, rank_bound=10)
    assert wrong.vectors.shape == (d, d)
    np.testing.assert_allclose(wrong.values, full.values)


@pytest.mark.parametrize("case", ["linear3d_token", "linear3d_channel", "conv1x1_token",
                                  "conv1x1_channel"])
def test_int8_compressed_activation(case):
    """``export --saved-int8``: x̂ is saved as int8 with a float32 scale per sample and rank
    direction; the weight gradient stays within 1 % of the float32 INSTANT formula (and is not
    identical: the rounding is real), the input gradient (Q path) is unchanged."""
    body = "x = Relu(x0)\n " + LAYERS[case][0]
    inputs = _inputs(case, seed=5)
    inputs = {"x0": inputs.pop("x"), **inputs}
    params = ["x0", "w", "b"]
    model, ly, _ = _instant_setup(case, body, inputs, params)
    P = _orthonormal_rows(max(1, ly.x_dim - 1), ly.x_dim, 1.2, seed=7)
    Q = _orthonormal_rows(max(1, ly.g_dim - 1), ly.g_dim, 1.1, seed=8)
    feeds = {**inputs, ly.p_input: P, ly.q_input: Q}
    fp32 = build_training_graphs(model, "loss", params, "instant", [ly], 17, compress_saved=True)
    ly.x_itemsize = 1
    small = build_training_graphs(model, "loss", params, "instant", [ly], 17, compress_saved=True)
    f32, g32 = Runner(fp32)(feeds)
    fwd, g8 = Runner(small)(feeds)
    int8 = [s for s in small.saved if fwd[s].dtype == np.int8]
    assert int8 and not any(f32[s].dtype == np.int8 for s in fp32.saved), small.saved
    # the int8 tensor is x̂ (rank x other elements per sample), with one scale per direction
    other = ly.cx if ly.x_axis == "token" else ly.tokens
    assert any(fwd[s].size == len(inputs["x0"]) * P.shape[0] * other for s in int8)
    err = np.abs(g8["w"] - g32["w"]).max() / np.abs(g32["w"]).max()
    assert 0 < err < 1e-2, err
    np.testing.assert_allclose(g8["x0"], g32["x0"], rtol=1e-5, atol=1e-6)


def test_layers_reading_one_activation_share_its_basis_and_save_it_once():
    """Three Linear layers over the same x (an attention's query, key and value): one basis P,
    one saved x̂ in the forward, and each layer's gradients those of the formulas with that P
    and its own Q; a layer over another tensor keeps a basis of its own."""
    from export.layers import share_activation_bases

    rng = np.random.default_rng(0)
    inputs = {"x0": rng.standard_normal((2, 4, 6)).astype(np.float32),
              **{w: rng.standard_normal((6, 5)).astype(np.float32) for w in ("wq", "wk", "wv")},
              "wo": rng.standard_normal((5, 5)).astype(np.float32)}
    body = ("x = Relu(x0)\n q = MatMul(x, wq)\n k = MatMul(x, wk)\n v = MatMul(x, wv)\n"
            " s = Add(q, k)\n t = Mul(s, v)\n y = MatMul(t, wo)")
    params = ["x0", "wq", "wk", "wv", "wo"]
    model = op_model(body, inputs)
    layers = find_compressible_layers(model, Shapes(model), set(params), {}, exclude=[])
    assert len(layers) == 4
    share_activation_bases(layers)
    share_activation_bases(layers)  # idempotent
    assert len({ly.p_input for ly in layers[:3]}) == 1 and layers[3].p_input != layers[0].p_input
    assert len({ly.q_input for ly in layers}) == 4
    for name, dim, rank in ([(layers[0].p_input, 4, "rank_x"), (layers[3].p_input, 4, "rank_x")]
                            + [(ly.q_input, 4, f"rank_g{i}") for i, ly in enumerate(layers)]):
        model.graph.input.append(helper.make_tensor_value_info(name, TensorProto.FLOAT,
                                                               [rank, dim]))
    tg = build_training_graphs(model, "loss", params, "instant", layers, 17)
    P = _orthonormal_rows(3, 4, 1.2, seed=1)
    P2 = _orthonormal_rows(2, 4, 1.0, seed=5)
    # the last layer's Q full: the exact input gradient, so q, k, v see torch's output gradient
    Qs = [_orthonormal_rows(2 + i % 2, 4, 1.1, seed=10 + i) for i in range(3)]
    Qs.append(np.eye(4, dtype=np.float32))
    feeds = {**inputs, layers[0].p_input: P, layers[3].p_input: P2,
             **{ly.q_input: q for ly, q in zip(layers, Qs, strict=True)}}
    fwd_out, grads = Runner(tg)(feeds)
    saved_xhat = [s for s in tg.saved if fwd_out[s].shape == (2, 3, 6)]
    assert len(saved_xhat) == 1, tg.saved
    assert "x" not in tg.saved
    # each weight's gradient: the formulas with the shared P, against the exact output gradient
    ex = {k: torch.from_numpy(v.astype(np.float64)).requires_grad_() for k, v in inputs.items()}
    xt = torch.relu(ex["x0"])
    q, k, v = xt @ ex["wq"], xt @ ex["wk"], xt @ ex["wv"]
    y = ((q + k) * v) @ ex["wo"]
    gq, gk, gv = torch.autograd.grad((y * torch.from_numpy(loss_weight(model).astype(np.float64)))
                                     .sum(), (q, k, v))
    for ly, g in zip(layers[:3], (gq, gk, gv), strict=True):
        _, gw, _ = instant_reference("matmul", np.maximum(inputs["x0"], 0), inputs[ly.weight],
                                     g.detach().numpy(), P, np.eye(4), "token", "token")
        np.testing.assert_allclose(grads[ly.weight], gw, rtol=1e-4, atol=1e-5,
                                   err_msg=ly.weight)


def test_vector_layers_whose_grams_outweigh_what_they_save_train_exactly(tmp_path):
    """A Linear over one vector per sample saves at most its input per sample while its Grams
    are C×C: a probe's residual MLP peaked at 240 MB with INSTANT against 101 MB exact, and
    another lost 2.7 points. Such layers (past 256 samples of break-even) now train exactly by
    default, with a note naming the way back (--instant-exclude none); narrow ones and layers
    over tokens stay compressed."""
    import json

    from export.bundle import export_bundle
    from export.layers import CompressedLayer, vector_layers_kept_exact

    def linear(name, cx, cy, tokens=1):
        return CompressedLayer(name=name, kind="linear", node=name, x="x", y="y", weight="w",
                               weight_layout="out_in", tokens=tokens, cx=cx, cy=cy,
                               x_axis="channel" if tokens == 1 else "token",
                               g_axis="channel" if tokens == 1 else "token",
                               rank3=tokens > 1)

    wide = [linear("up", 256, 2048), linear("down", 2048, 256)]
    assert vector_layers_kept_exact(wide) == wide
    assert vector_layers_kept_exact([linear("fc", 16, 16)]) == []  # pays from 96 samples on
    small = linear("fc", 128, 128)  # the built-in mlp's: pays past 768 samples only
    assert vector_layers_kept_exact([small]) == [small]
    tok = linear("tok", 2048, 2048, tokens=64)
    assert vector_layers_kept_exact([tok, *wide]) == wide

    (tmp_path / "wide.py").write_text(
        "import torch.nn as nn\n"
        "def make():\n"
        "    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 2048),\n"
        "                         nn.ReLU(), nn.Linear(2048, 256), nn.ReLU(),\n"
        "                         nn.Linear(256, 10))\n")

    def export(out, exclude):
        notes: list[str] = []
        export_bundle(f"{tmp_path / 'wide.py'}:make", tmp_path / out, input_shape="8,64",
                      instant_exclude=exclude, notes=notes)
        manifest = json.loads((tmp_path / out / "manifest.json").read_text())
        return [ly["name"] for ly in manifest["instant"]["layers"]], notes

    layers, notes = export("default", None)
    assert layers == [], layers
    (note,) = [n for n in notes if "one vector per sample" in n]
    assert "3 layer(s)" in note and "train exactly" in note, note
    assert "--instant-exclude '6' (this model's head" in note, note
    layers, notes = export("all", [])  # --instant-exclude none: every layer compressed
    assert len(layers) == 4 and not any("one vector per sample" in n for n in notes), layers
    # a GPT-2-style Linear over x.view(-1, C): 2-D, but N·L rows, not one a sample
    (tmp_path / "flat.py").write_text(
        "import torch, torch.nn as nn\n"
        "class C1(nn.Module):\n"
        "    def __init__(s, i, o):\n"
        "        super().__init__(); s.w = nn.Parameter(torch.randn(i, o) * 0.05)\n"
        "    def forward(s, x):\n"
        "        return (x.view(-1, x.size(-1)) @ s.w).view(*x.shape[:-1], s.w.shape[1])\n"
        "class M(nn.Module):\n"
        "    def __init__(s):\n"
        "        super().__init__(); s.emb = nn.Embedding(100, 128)\n"
        "        s.f1, s.f2, s.head = C1(128, 512), C1(512, 128), nn.Linear(128, 2)\n"
        "    def forward(s, x):\n"
        "        h = s.emb(x); h = h + s.f2(torch.relu(s.f1(h)))\n"
        "        return s.head(h.mean(1))\n"
        "def make():\n"
        "    return M()\n")
    notes = []
    export_bundle(f"{tmp_path / 'flat.py'}:make", tmp_path / "flat", input_shape="8,32:int64",
                  notes=notes)
    manifest = json.loads((tmp_path / "flat" / "manifest.json").read_text())
    assert len(manifest["instant"]["layers"]) == 2, notes


def test_the_decompositions_run_numpy_blas_on_one_thread(monkeypatch):
    """OpenBLAS's default pool (a thread a core) made a calibration's eigh up to 50x slower as
    soon as anything else wanted a core (session 23 speed probe, under a load of 3: an
    encoder's INSTANT plan 14.3 s against 5.3 s; benchmarks/blas_threads.py). Every eigh and qr
    of a calibration runs with BLAS on one thread, and the process's setting is back after."""
    from threadpoolctl import threadpool_info, threadpool_limits

    seen = []

    def recorder(fn):
        def wrapped(*a, **k):
            seen.append({i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"})
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(np.linalg, "eigh", recorder(np.linalg.eigh))
    monkeypatch.setattr(np.linalg, "qr", recorder(np.linalg.qr))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((10, 64))
    gram = x.T @ x
    with threadpool_limits(limits=2, user_api="blas"):
        full = decompose(gram)  # full eigh
        fast = decompose(gram, rank_bound=10)  # range finder: qr + small eigh
        basis(fast, 40)  # past the range: completed by qr
        after = {i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}
    assert full.vectors.shape == (64, 64) and fast.vectors.shape[1] < 64
    assert len(seen) >= 4 and all(s == {1} for s in seen), seen
    assert after == {2}


def test_inputs_too_large_for_float32_grams_are_named_before_any_update(mlp_bundle, recwarn):
    """Features ~1e19 overflow INSTANT's float32 Grams (vanilla trains on them): the first
    calibration printed numpy RuntimeWarning lines and blamed --lr, before any update. One
    error names the cause and the ways out (scale the data, --mode vanilla), no warning."""
    from helpers import make_trainer

    from runtime.data import Dataset, load_data
    from runtime.errors import UserError

    tr = make_trainer(mlp_bundle)
    d = load_data("digits", tr.bundle)
    rng = np.random.default_rng(0)  # signed features: inf and -inf Grams, NaN where they add
    big = Dataset("big", {k: (rng.standard_normal(v.shape) * 1e19).astype(np.float32)
                          for k, v in d.x.items()}, d.y)
    with pytest.raises(UserError, match=r"^calibration saw non-finite activations or gradients "
                                        r"before any update: .* float32 statistics .*; scale the "
                                        r"inputs \(or targets\) down, or pass --mode vanilla$"):
        tr.calibrate(big, 8, np.random.default_rng(0))  # (8: the range finder, calibrate.py)
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]
