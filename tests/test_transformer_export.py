"""Whole-model gradients: small BERT-like and EfficientNet-like torch models, exported with
``export_bundle`` from a ``file.py:factory``, one forward + backward on the runtime's sessions
(``Trainer.fwd`` / ``Trainer.bwd``, as ``Trainer.train_step`` runs them), compared with torch
autograd of the same module on the same batch in float64.

INSTANT runs with full-rank bases (identity matrices), so its compressed gradient must equal the
exact one (STYLE.md 8).
"""

from __future__ import annotations

import importlib.util
import re
import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from helpers import make_trainer

from export import export_bundle
from export.graph import ExportError
from runtime.bundle import open_bundle
from runtime.calibrate import Basis
from runtime.errors import UserError
from runtime.export_model import export_model
from runtime.trainer import ArrayBatch

# float32 runtime against float64 torch, through ~40 ops: |Δ| <= ATOL + RTOL·|expected|
RTOL, ATOL = 1e-3, 1e-5

MODELS = textwrap.dedent('''
    import math

    import torch
    import torch.nn.functional as F
    from torch import nn


    class Block(nn.Module):
        """Post-LN BERT layer: fused QKV (Split), masked softmax attention (Where), erf GELU."""

        def __init__(self, d=32, heads=4, ff=64):
            super().__init__()
            self.heads = heads
            self.qkv = nn.Linear(d, 3 * d)
            self.out = nn.Linear(d, d)
            self.ln1 = nn.LayerNorm(d)
            self.ff1 = nn.Linear(d, ff)
            self.ff2 = nn.Linear(ff, d)
            self.ln2 = nn.LayerNorm(d)

        def forward(self, x, keep):
            n, length, d = x.shape
            q, k, v = (t.reshape(n, length, self.heads, d // self.heads).transpose(1, 2)
                       for t in self.qkv(x).chunk(3, -1))
            s = q @ k.transpose(-1, -2) / math.sqrt(d // self.heads)
            s = s.masked_fill(keep == 0, -1e4)
            a = (torch.softmax(s, -1) @ v).transpose(1, 2).reshape(n, length, d)
            x = self.ln1(x + self.out(a))
            return self.ln2(x + self.ff2(F.gelu(self.ff1(x))))


    class TinyBert(nn.Module):
        def __init__(self, vocab=50, max_len=20, d=32, classes=3):
            super().__init__()
            self.tok = nn.Embedding(vocab, d)
            self.pos = nn.Parameter(torch.randn(max_len, d) * 0.1)
            self.ln = nn.LayerNorm(d)
            self.layers = nn.ModuleList([Block(d), Block(d)])
            self.head = nn.Linear(d, classes)

        def forward(self, input_ids, attention_mask):
            length = input_ids.shape[1]
            x = self.ln(self.tok(input_ids) + self.pos[:length])      # Gather, Slice
            keep = attention_mask[:, None, None, :]
            for layer in self.layers:
                x = layer(x, keep)
            m = attention_mask.unsqueeze(-1).to(x.dtype)                # mean pooling
            return self.head((x * m).sum(1) / m.sum(1))


    class TinyEfficientNet(nn.Module):
        """Stem, one MBConv block (expand 1x1, depthwise 3x3, project 1x1, residual), ReLU6 as
        clamp, eval BatchNorm with non-trivial running statistics, pooled linear head."""

        def __init__(self, zero_pad=False, classes=4):
            super().__init__()
            self.pad = nn.ZeroPad2d((0, 1, 0, 1)) if zero_pad else nn.Identity()
            self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=0 if zero_pad else 1, bias=False)
            self.expand = nn.Conv2d(8, 16, 1, bias=False)
            self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)
            self.project = nn.Conv2d(16, 8, 1, bias=False)
            self.bns = nn.ModuleList([nn.BatchNorm2d(c) for c in (8, 16, 16, 8)])
            for bn in self.bns:
                bn.running_mean.normal_(0.0, 0.1)
                bn.running_var.uniform_(0.5, 2.0)
                bn.weight.data.uniform_(0.5, 1.5)
                bn.bias.data.normal_(0.0, 0.1)
            self.head = nn.Linear(8, classes)

        def forward(self, x):
            x = torch.clamp(self.bns[0](self.stem(self.pad(x))), 0.0, 6.0)
            h = torch.clamp(self.bns[1](self.expand(x)), 0.0, 6.0)
            h = torch.clamp(self.bns[2](self.dw(h)), 0.0, 6.0)
            x = x + self.bns[3](self.project(h))
            return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


    class TorchEncoder(nn.Module):
        """torch's own nn.TransformerEncoderLayer (batch first): TorchScript exports its
        attention with Reshape targets computed from the batch size, and runs the fused
        in_proj sequence first ([L, N, C])."""

        def __init__(self, d=32, classes=3):
            super().__init__()
            self.emb = nn.Linear(8, d)
            self.enc = nn.TransformerEncoderLayer(d, 4, 64, dropout=0.0, batch_first=True)
            self.head = nn.Linear(d, classes)

        def forward(self, x):
            return self.head(self.enc(self.emb(x)).mean(1))


    class NormCNN(nn.Module):
        """GroupNorm (exported as InstanceNormalization over [N, G, -1] and an affine Mul/Add
        whose weights torch folds to [C, 1, 1]) twice with equal fresh weights, and an affine
        InstanceNorm2d; a pointwise conv between them."""

        def __init__(self, classes=3):
            super().__init__()
            self.c1 = nn.Conv2d(3, 8, 3, padding=1)
            self.g1 = nn.GroupNorm(2, 8)
            self.c2 = nn.Conv2d(8, 8, 1)
            self.g2 = nn.GroupNorm(4, 8)
            self.c3 = nn.Conv2d(8, 6, 3, padding=1)
            self.inorm = nn.InstanceNorm2d(6, affine=True)
            self.head = nn.Linear(6, classes)

        def forward(self, x):
            x = F.relu(self.g1(self.c1(x)))
            x = F.relu(self.g2(self.c2(x)))
            x = F.relu(self.inorm(self.c3(x)))
            return self.head(x.mean((2, 3)))


    class Decoder(nn.Module):
        """Upsampling paths of decoders / U-Nets: ConvTranspose, nearest and bilinear
        interpolation, PixelShuffle (DepthToSpace), and a Conv1d over the flattened rows."""

        def __init__(self, classes=3):
            super().__init__()
            self.down = nn.Conv2d(3, 8, 3, stride=2, padding=1)
            self.up = nn.ConvTranspose2d(8, 8, 4, stride=2, padding=1)
            self.mix = nn.Conv2d(8, 16, 1)
            self.shuffle = nn.PixelShuffle(2)
            self.row = nn.Conv1d(4, 4, 3, padding=1)
            self.head = nn.Linear(4, classes)

        def forward(self, x):
            x = F.relu(self.up(F.relu(self.down(x))))                  # 8x8 -> 4x4 -> 8x8
            x = F.interpolate(x, scale_factor=2, mode="nearest")        # 16x16
            x = F.interpolate(x, size=(12, 12), mode="bilinear", align_corners=False)
            x = self.shuffle(self.mix(x))                               # [N, 4, 24, 24]
            x = torch.cumsum(self.row(x.flatten(2)), -1)                # [N, 4, 576]
            return self.head(x.mean(-1))


    def decoder():
        torch.manual_seed(0)
        return Decoder()


    def norm_cnn():
        torch.manual_seed(0)
        return NormCNN()


    class TinyViT(nn.Module):
        """Patch embedding, a class token by ``expand`` (its size along the tokens comes from a
        shape computed from the batch size), pre-norm encoder layers, head on the class token."""

        def __init__(self, d=32, classes=3):
            super().__init__()
            self.patch = nn.Conv2d(3, d, 4, stride=4)
            self.cls = nn.Parameter(torch.randn(1, 1, d) * 0.02)
            self.pos = nn.Parameter(torch.randn(1, 5, d) * 0.02)
            self.enc = nn.TransformerEncoderLayer(d, 4, 64, dropout=0.0, batch_first=True,
                                                  norm_first=True, activation="gelu")
            self.head = nn.Linear(d, classes)

        def forward(self, x):
            x = self.patch(x).flatten(2).transpose(1, 2)
            x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
            return self.head(self.enc(x)[:, 0])


    def vit():
        torch.manual_seed(0)
        return TinyViT()


    def torch_encoder():
        torch.manual_seed(0)
        return TorchEncoder()


    class EncoderStack(nn.Module):
        """nn.TransformerEncoder: two deep copies of one layer, equal until trained."""

        def __init__(self, d=32, classes=3):
            super().__init__()
            self.emb = nn.Linear(8, d)
            self.enc = nn.TransformerEncoder(
                nn.TransformerEncoderLayer(d, 4, 64, dropout=0.0), 2, enable_nested_tensor=False)
            self.head = nn.Linear(d, classes)

        def forward(self, x):
            return self.head(self.enc(self.emb(x).transpose(0, 1)).transpose(0, 1).mean(1))


    def encoder_stack():
        torch.manual_seed(0)
        return EncoderStack()


    class CopiedLinear(nn.Module):
        """A deep copy of a Linear, one used over tokens (a MatMul of the transposed weight in
        an ONNX file) and one on the pooled vector (a Gemm): two parameters, equal at first."""

        def __init__(self):
            super().__init__()
            import copy

            self.inp, self.head = nn.Linear(8, 16), nn.Linear(16, 3)
            self.a = nn.Linear(16, 16)
            self.b = copy.deepcopy(self.a)

        def forward(self, x):
            h = torch.relu(self.a(torch.relu(self.inp(x))))
            return self.head(torch.relu(self.b(h.mean(1))))


    def copied_linear():
        torch.manual_seed(0)
        return CopiedLinear()


    def bert():
        torch.manual_seed(0)
        return TinyBert()


    def bert_big_vocab():
        torch.manual_seed(0)
        return TinyBert(vocab=8192)  # a 1 MiB table: frozen, the runtime reads its rows


    def effnet():
        torch.manual_seed(0)
        return TinyEfficientNet()


    class TiedLM(nn.Module):
        """The output layer shares the embedding's weight (torch's exporter folds the second
        use into a transposed copy of the table)."""

        def __init__(self, vocab=20, d=16, pad=None):
            super().__init__()
            self.emb = nn.Embedding(vocab, d, padding_idx=pad)
            self.mix = nn.Linear(d, d)
            self.head = nn.Linear(d, vocab, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            h = self.emb(ids)
            return self.head(torch.tanh(self.mix(h)).mean(1))


    def tied_lm():
        torch.manual_seed(0)
        return TiedLM()


    def tied_lm_pad():
        torch.manual_seed(0)
        return TiedLM(pad=0)


    class Cosine(nn.Module):
        """A cosine classifier: F.normalize on a weight (folded into a constant norm)."""

        def __init__(self):
            super().__init__()
            self.l1 = nn.Linear(12, 16)
            self.w = nn.Parameter(torch.randn(3, 16))

        def forward(self, x):
            return 10 * F.normalize(torch.relu(self.l1(x)), dim=-1) @ F.normalize(self.w, dim=-1).t()


    def cosine():
        torch.manual_seed(0)
        return Cosine()


    class ConvNeXtBlock(nn.Module):
        """ConvNeXt: a depthwise conv, then LayerNorm and a pointwise MLP of Linear layers on
        the channels-last [N, H, W, C] map, a layer scale, a residual."""

        def __init__(self, c=8):
            super().__init__()
            self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
            self.norm = nn.LayerNorm(c)
            self.pw1 = nn.Linear(c, 4 * c)
            self.pw2 = nn.Linear(4 * c, c)
            self.gamma = nn.Parameter(torch.full((c,), 0.5))

        def forward(self, x):
            h = self.norm(self.dw(x).permute(0, 2, 3, 1))
            h = self.gamma * self.pw2(F.gelu(self.pw1(h)))
            return x + h.permute(0, 3, 1, 2)


    def convnext():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 2, stride=2), ConvNeXtBlock(), ConvNeXtBlock(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))


    class GQA(nn.Module):
        """Grouped-query attention: 4 query heads share 2 key/value heads, repeated with
        repeat_interleave (exported through OneHot/Tile: repeats folded to a constant); q, k
        and v read one x (one INSTANT basis)."""

        def __init__(self, d=16, heads=4, kv=2):
            super().__init__()
            self.heads, self.kv = heads, kv
            self.q, self.k = nn.Linear(d, d), nn.Linear(d, d * kv // heads)
            self.v, self.o = nn.Linear(d, d * kv // heads), nn.Linear(d, d)
            self.head = nn.Linear(d, 3)

        def forward(self, x):
            n, length, d = x.shape
            dh = d // self.heads
            q = self.q(x).reshape(n, length, self.heads, dh).transpose(1, 2)
            k, v = (t.reshape(n, length, -1, dh).transpose(1, 2) for t in (self.k(x), self.v(x)))
            r = self.heads // k.shape[1]  # traced from a shape: the repeats are computed
            k, v = k.repeat_interleave(r, dim=1), v.repeat_interleave(r, dim=1)
            a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dh), -1) @ v
            return self.head((x + self.o(a.transpose(1, 2).reshape(n, length, d))).mean(1))


    def gqa():
        torch.manual_seed(0)
        return GQA()


    def pad_emb():
        """nn.Embedding(padding_idx=0): torch keeps that row's gradient zero."""
        torch.manual_seed(0)
        return nn.Sequential(nn.Embedding(20, 16, padding_idx=0), nn.Flatten(),
                             nn.Linear(16 * 6, 3))


    def padded_cnn():
        """Reflect and replicate padding (padding_mode="reflect", nn.ReplicationPad2d)."""
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect"), nn.ReLU(),
                             nn.ReplicationPad2d((2, 1, 0, 1)), nn.Conv2d(8, 8, 3), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))


    def effnet_zero_pad():
        torch.manual_seed(0)
        return TinyEfficientNet(zero_pad=True)


    class LlamaBlock(nn.Module):
        """LLaMA-style: RMSNorm (torch's exporter has no opset-17 translation: ours,
        export/symbolics.py), causal SDPA, a SwiGLU MLP, and a Threshold before the head."""

        def __init__(self, d=16, heads=2, ffn=24):
            super().__init__()
            self.heads = heads
            self.n1, self.n2 = nn.RMSNorm(d, eps=1e-5), nn.RMSNorm(d)  # default eps: None
            self.qkv, self.o = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
            self.gate, self.up = nn.Linear(d, ffn, bias=False), nn.Linear(d, ffn, bias=False)
            self.down = nn.Linear(ffn, d, bias=False)
            self.thr = nn.Threshold(0.1, -0.5)
            self.head = nn.Linear(d, 3)

        def forward(self, x):
            n, length, d = x.shape
            q, k, v = (t.reshape(n, length, self.heads, -1).transpose(1, 2)
                       for t in self.qkv(self.n1(x)).chunk(3, dim=-1))
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.o(a.transpose(1, 2).reshape(n, length, d))
            y = self.n2(x)
            x = x + self.down(F.silu(self.gate(y)) * self.up(y))
            return self.head(self.thr(F.rms_norm(x, (d,))).mean(1))


    def llama():
        torch.manual_seed(0)
        return LlamaBlock()


    class SoftplusNet(nn.Module):
        """Softplus with beta and threshold, as a module and as a call (torch's own export
        dropped the threshold)."""

        def __init__(self):
            super().__init__()
            self.a, self.b, self.head = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 3)
            self.act = nn.Softplus(beta=2.0, threshold=3.0)

        def forward(self, x):
            h = self.act(self.a(x) * 3)
            h = F.softplus(self.b(h), beta=0.5, threshold=1.0)
            return self.head(h.mean(1))


    def softplus():
        torch.manual_seed(0)
        return SoftplusNet()


    class WSlice(nn.Module):
        """Two column slices of one weight (W[:, :6], W[:, 10:16])."""

        def __init__(self):
            super().__init__()
            self.W = nn.Parameter(torch.randn(12, 20) * 0.3)
            self.head = nn.Linear(6, 3)

        def forward(self, x):
            return self.head(torch.tanh(x @ self.W[:, :6]) + torch.tanh(x @ self.W[:, 10:16]))


    def wslice():
        torch.manual_seed(0)
        return WSlice()


    def embedding_max_norm():
        return nn.Sequential(nn.Embedding(20, 8, max_norm=1.0), nn.Flatten(), nn.Linear(80, 3))


    def embedding_by_freq():
        return nn.Sequential(nn.Embedding(20, 8, scale_grad_by_freq=True), nn.Flatten(),
                             nn.Linear(80, 3))


    def tagger1d():
        """A class per time step from a Conv1d: [N, 3, L] logits (torch's layout)."""
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv1d(2, 8, 3, padding=1), nn.ReLU(), nn.Conv1d(8, 8, 1),
                             nn.ReLU(), nn.Conv1d(8, 3, 1))


    def segmenter_hwc():
        """The segmenter with its classes last: [N, H, W, 3]."""
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 1),
                             Permute())


    class Permute(nn.Module):
        def forward(self, x):
            return x.permute(0, 2, 3, 1)


    def segmenter():
        """A class per pixel: [N, 3, H, W] logits (torch's dense layout)."""
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1),
                             nn.ReLU(), nn.Conv2d(8, 3, 1))


    class Lrn(nn.Module):
        """A frozen backbone (requires_grad_(False)) and a squeeze torch writes as an ONNX If
        (local_response_norm hides the axis' size from torch's exporter)."""

        def __init__(self):
            super().__init__()
            self.backbone = nn.Linear(8, 16)
            self.backbone.requires_grad_(False)
            self.mlp = nn.Sequential(nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 16))
            self.head = nn.Linear(16, 3)

        def forward(self, x):
            h = self.mlp(torch.relu(self.backbone(x)))
            return self.head(F.local_response_norm(h.unsqueeze(-1), 3).squeeze(-1))


    def lrn():
        torch.manual_seed(0)
        return Lrn()


    class ResBlock(nn.Module):
        """A ResNet basic block that halves the map: its shortcut is a 1x1 conv at stride 2."""

        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.conv1 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
            self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
            self.down = nn.Conv2d(8, 16, 1, stride=2, bias=False)
            self.head = nn.Linear(16, 4)

        def forward(self, x):
            h = torch.relu(self.stem(x))
            y = torch.relu(self.conv2(torch.relu(self.conv1(h))) + self.down(h))
            return self.head(y.mean((2, 3)))


    def resblock():
        torch.manual_seed(0)
        return ResBlock()
''')


@pytest.fixture(scope="module")
def models_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("transformer_models") / "models.py"
    path.write_text(MODELS)
    return path


def _factory(path: Path, name: str) -> torch.nn.Module:
    spec = importlib.util.spec_from_file_location("transformer_models", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, name)().eval()


def runtime_grads(bundle_path: Path, mode: str, x: dict[str, np.ndarray],
                  labels: np.ndarray) -> tuple[float, dict[str, np.ndarray]]:
    """Loss and parameter gradients (by torch name, in torch layout) of one forward + backward
    on the trainer's sessions; INSTANT layers get full-rank (identity) bases."""
    bundle = open_bundle(bundle_path)
    trainer = make_trainer(bundle, mode=mode, threads=0)
    assert trainer.mode == mode, f"bundle has no INSTANT layer to test in mode {mode}"
    for ly in bundle.layers if mode == "instant" else ():
        full = [Basis(np.eye(d, dtype=np.float32), d, 1.0, np.ones(d) / d)
                for d in (ly.x_dim, ly.g_dim)]
        trainer.set_bases(ly.name, *full)
    loss, _ = trainer.gradients(ArrayBatch(x, labels))
    out = {}
    for p in bundle.params:
        g = trainer._grads[p.name]
        out[p.torch_name] = _torch_layout(p, g)
    return loss, out


def _torch_layout(p, v: np.ndarray) -> np.ndarray:
    """A bundle tensor in its torch parameter's layout."""
    v = v.T if p.transposed else v
    return v.reshape(p.torch_shape) if p.torch_shape else v


def torch_grads(module: torch.nn.Module, x: dict[str, np.ndarray], labels: np.ndarray,
                names: list[str]) -> tuple[float, dict[str, np.ndarray]]:
    """Cross-entropy loss and gradients of ``names`` by torch autograd in float64."""
    module = module.double()
    params = dict(module.named_parameters())
    for n, p in params.items():
        p.requires_grad_(n in names)
    args = [torch.from_numpy(v.astype(np.float64) if v.dtype.kind == "f" else v)
            for v in x.values()]
    loss = F.cross_entropy(module(*args), torch.from_numpy(labels))
    loss.backward()
    return loss.item(), {n: params[n].grad.numpy() for n in names}


def check_bundle_grads(models_file: Path, factory: str, bundle: Path, x: dict[str, np.ndarray],
                       labels: np.ndarray, modes: tuple[str, ...]) -> None:
    module = _factory(models_file, factory)
    manifest_params = open_bundle(bundle).params
    names = [p.torch_name for p in manifest_params]
    initial = np.load(bundle / "params.npz")
    state = dict(module.named_parameters())
    for p in manifest_params:  # the bundle starts from the module's own weights
        np.testing.assert_array_equal(_torch_layout(p, initial[p.name]),
                                      state[p.torch_name].detach().numpy())
    ref_loss, ref = torch_grads(module, x, labels, names)
    for mode in modes:
        loss, got = runtime_grads(bundle, mode, x, labels)
        np.testing.assert_allclose(loss, ref_loss, rtol=RTOL, atol=ATOL, err_msg=f"{mode} loss")
        for n in names:
            np.testing.assert_allclose(got[n], ref[n], rtol=RTOL, atol=ATOL,
                                       err_msg=f"{mode}: gradient of '{n}'")


def _bert_batch(n: int = 4, length: int = 16) -> tuple[dict[str, np.ndarray], np.ndarray]:
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 50, (n, length)).astype(np.int64)
    mask = np.ones((n, length), np.int64)
    mask[1, 10:] = 0
    mask[3, 5:] = 0
    return {"input_ids": ids, "attention_mask": mask}, rng.integers(0, 3, n).astype(np.int64)


@pytest.mark.parametrize("trainable", ["all", "layers.1.*,head.*"])
def test_bert_like_gradients_match_torch(models_file: Path, tmp_path: Path, trainable: str):
    x, labels = _bert_batch()
    np.savez(tmp_path / "batch.npz", **x)
    bundle = export_bundle(f"{models_file}:bert", tmp_path / "bundle", npz=str(tmp_path /
                                                                                "batch.npz"),
                           trainable=trainable)
    check_bundle_grads(models_file, "bert", bundle, x, labels, ("vanilla", "instant"))


def test_frozen_embedding_rows_are_read_by_the_runtime(models_file: Path, tmp_path: Path):
    """A frozen 1 MiB embedding table leaves the graphs (the runtime reads its rows with pread):
    gradients still match torch, export-model puts the Gather back, bad ids are one error."""
    x, labels = _bert_batch()
    np.savez(tmp_path / "batch.npz", **x)
    bundle = export_bundle(f"{models_file}:bert_big_vocab", tmp_path / "bundle",
                           npz=str(tmp_path / "batch.npz"), trainable="layers.1.*,head.*")
    b = open_bundle(bundle)
    assert [(lk.table, lk.indices) for lk in b.lookups.values()] == [("tok.weight", "input_ids")]
    for mode in ("vanilla", "instant", "calib", "infer"):
        g = onnx.load_from_string(b.graph_bytes(mode, "forward")).graph
        assert not any(n.op_type == "Gather" and n.input[0] == "tok.weight" for n in g.node)
    check_bundle_grads(models_file, "bert_big_vocab", bundle, x, labels, ("vanilla", "instant"))

    out = tmp_path / "model.onnx"
    export_model(bundle, out)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = sess.run(None, x)[0]
    module = _factory(models_file, "bert_big_vocab")
    with torch.no_grad():
        want = module(*(torch.from_numpy(x[k]) for k in ("input_ids", "attention_mask")))
    np.testing.assert_allclose(got, want.numpy(), rtol=RTOL, atol=ATOL)

    bad = {**x, "input_ids": np.full_like(x["input_ids"], 8192)}
    with pytest.raises(UserError, match=r"token id 8192 is outside the 8192-row table"):
        make_trainer(b, mode="vanilla").gradients(ArrayBatch(bad, labels))


def test_torch_transformer_encoder_layer_gradients_match_torch(models_file: Path,
                                                               tmp_path: Path):
    """nn.TransformerEncoderLayer with a dynamic batch: its batch-size arithmetic is folded
    (export/shape_fold.py), its sequence-first in_proj is an INSTANT layer, and both modes give
    torch's gradients (INSTANT at full rank)."""
    rng = np.random.default_rng(3)
    x = {"x": rng.standard_normal((3, 10, 8)).astype(np.float32)}
    labels = rng.integers(0, 3, 3).astype(np.int64)
    bundle = export_bundle(f"{models_file}:torch_encoder", tmp_path / "bundle",
                           input_shape="3,10,8")
    layers = {ly.name: ly for ly in open_bundle(bundle).layers}
    assert layers["enc.self_attn.in_proj"].seq_first, sorted(layers)
    assert {"emb", "enc.self_attn.out_proj", "enc.linear1", "enc.linear2"} <= set(layers)
    # its out_proj reads [L·N, C]: 10 rows a sample (a model probe found it counted as one,
    # its memory and FLOPs 17x low in the plan's table)
    assert layers["enc.self_attn.out_proj"].tokens == 10, layers["enc.self_attn.out_proj"]
    check_bundle_grads(models_file, "torch_encoder", bundle, x, labels, ("vanilla", "instant"))


def _copies_apart(models_file: Path, factory: str, shape: tuple[int, ...], seed: int,
                  tmp_path: Path):
    """The factory's model written to an ONNX file by torch's exporter and exported from it,
    its equal weights noted as trained apart, none tied; (module, bundle, x, labels)."""
    module = _factory(models_file, factory)
    onnx_file = tmp_path / "model.onnx"
    torch.onnx.export(module, (torch.zeros(*shape),), str(onnx_file), dynamo=False,
                      opset_version=17, input_names=["x"], output_names=["logits"],
                      dynamic_axes={"x": {0: "N"}, "logits": {0: "N"}})
    rng = np.random.default_rng(seed)
    x = {"x": rng.standard_normal(shape).astype(np.float32)}
    labels = rng.integers(0, 3, shape[0]).astype(np.int64)
    notes: list[str] = []
    bundle = export_bundle(str(onnx_file), tmp_path / "bundle", notes=notes)
    assert not any("tied weights" in n for n in notes), notes
    assert any("trained as separate tensors" in n for n in notes), notes
    return module, bundle, x, labels


def test_deep_copied_layers_in_an_onnx_file_train_apart(models_file: Path, tmp_path: Path):
    """nn.TransformerEncoder deep-copies its layer: in an ONNX file the two layers' weights hold
    equal values, read the same way. They are copies, not one tied tensor (a probe found them
    trained as one, each update the sum of both layers' gradients): each trains on its own,
    with torch's gradients, and a note says so."""
    module, bundle, x, labels = _copies_apart(models_file, "encoder_stack", (3, 10, 8), 6,
                                              tmp_path)
    params = open_bundle(bundle).params
    assert len(params) == len(list(module.named_parameters())), [p.torch_name for p in params]
    names = ["enc.layers.0.linear1.bias", "enc.layers.1.linear1.bias",
             "enc.layers.0.norm1.weight", "enc.layers.1.norm1.weight"]
    ref_loss, ref = torch_grads(module, x, labels, names)
    loss, got = runtime_grads(bundle, "vanilla", x, labels)
    np.testing.assert_allclose(loss, ref_loss, rtol=RTOL, atol=ATOL)
    for n in names:
        np.testing.assert_allclose(got[n], ref[n], rtol=RTOL, atol=ATOL, err_msg=n)


def test_a_copied_layer_read_by_another_op_trains_apart(models_file: Path, tmp_path: Path):
    """Equal weights that are not a lookup table and its output layer stay apart, though torch
    wrote one as a transposed MatMul weight and the other as a Gemm's (an outside probe found
    them tied: b's gradient was a's plus b's)."""
    module, bundle, x, labels = _copies_apart(models_file, "copied_linear", (3, 5, 8), 2,
                                              tmp_path)
    names = ["a.weight", "a.bias", "b.weight", "b.bias"]
    ref_loss, ref = torch_grads(module, x, labels, names)
    loss, got = runtime_grads(bundle, "vanilla", x, labels)
    np.testing.assert_allclose(loss, ref_loss, rtol=RTOL, atol=ATOL)
    for n in names:  # (the file's transposed weight has an anonymous name: found by value)
        assert any(v.shape == ref[n].shape and np.allclose(v, ref[n], rtol=RTOL, atol=ATOL)
                   for v in got.values()), (n, sorted(got))
    assert len(got) == 8, sorted(got)  # inp, a, b, head: nothing merged


def test_group_and_instance_norm_gradients_match_torch(models_file: Path, tmp_path: Path):
    """Every parameter of GroupNorm / InstanceNorm2d trains under its torch name, the two
    GroupNorms' equal fresh weights each under its own (told apart by a second export with
    distinct values), and the gradients are torch's; export-model writes torch's shapes."""
    rng = np.random.default_rng(4)
    x = {"x": rng.standard_normal((3, 3, 8, 8)).astype(np.float32)}
    labels = rng.integers(0, 3, 3).astype(np.int64)
    bundle = export_bundle(f"{models_file}:norm_cnn", tmp_path / "bundle", input_shape="3,3,8,8")
    module = _factory(models_file, "norm_cnn")
    params = open_bundle(bundle).params
    assert sorted(p.torch_name for p in params) == sorted(n for n, _ in
                                                          module.named_parameters())
    assert {p.torch_name: p.torch_shape for p in params}["g1.weight"] == [8]
    check_bundle_grads(models_file, "norm_cnn", bundle, x, labels, ("vanilla", "instant"))
    safetensors = pytest.importorskip("safetensors.numpy")
    export_model(bundle, tmp_path / "model.onnx")
    state = safetensors.load_file(str(tmp_path / "model.safetensors"))
    for n, p in module.named_parameters():
        np.testing.assert_array_equal(state[n], p.detach().numpy())


def test_decoder_upsampling_gradients_match_torch(models_file: Path, tmp_path: Path):
    rng = np.random.default_rng(5)
    x = {"x": rng.standard_normal((2, 3, 8, 8)).astype(np.float32)}
    labels = rng.integers(0, 3, 2).astype(np.int64)
    bundle = export_bundle(f"{models_file}:decoder", tmp_path / "bundle", input_shape="2,3,8,8")
    assert [ly.name for ly in open_bundle(bundle).layers] == ["mix"]
    check_bundle_grads(models_file, "decoder", bundle, x, labels, ("vanilla", "instant"))


def test_vit_with_an_expanded_class_token_gradients_match_torch(models_file: Path,
                                                                tmp_path: Path):
    """Shape inference loses the class token's length (``expand`` to a computed shape); the
    shapes measured at two batch sizes restore it (export/shape_fold.py)."""
    rng = np.random.default_rng(6)
    x = {"x": rng.standard_normal((2, 3, 8, 8)).astype(np.float32)}
    labels = rng.integers(0, 3, 2).astype(np.int64)
    bundle = export_bundle(f"{models_file}:vit", tmp_path / "bundle", input_shape="2,3,8,8")
    assert "enc.self_attn.in_proj" in {ly.name for ly in open_bundle(bundle).layers}
    check_bundle_grads(models_file, "vit", bundle, x, labels, ("vanilla", "instant"))


def test_vit_onnx_file_with_its_own_input_shape(models_file: Path, tmp_path: Path):
    """The same ViT as a TorchScript ONNX file, given --input-shape (which fixes the file's
    batch): the shapes are still measured at other batch sizes."""
    module = _factory(models_file, "vit")
    onnx_file = tmp_path / "vit.onnx"
    torch.onnx.export(module, (torch.zeros(2, 3, 8, 8),), str(onnx_file), dynamo=False,
                      opset_version=17, input_names=["x"], output_names=["logits"],
                      dynamic_axes={"x": {0: "N"}, "logits": {0: "N"}})
    bundle = export_bundle(str(onnx_file), tmp_path / "bundle", input_shape="2,3,8,8")
    assert len(open_bundle(bundle).layers) >= 4


def test_efficientnet_like_gradients_match_torch(models_file: Path, tmp_path: Path):
    rng = np.random.default_rng(1)
    x = {"x": rng.standard_normal((3, 3, 16, 16)).astype(np.float32)}
    labels = rng.integers(0, 4, 3).astype(np.int64)
    bundle = export_bundle(f"{models_file}:effnet", tmp_path / "bundle", input_shape="3,3,16,16")
    check_bundle_grads(models_file, "effnet", bundle, x, labels, ("vanilla", "instant"))


def test_frozen_batch_norms_are_folded_once_into_their_convs(models_file: Path,
                                                            tmp_path: Path):
    """A frozen backbone's Conv -> BatchNormalization pairs are folded into the convs' weights
    at export (export/fold_frozen.py): every bundle graph reads the folded weights from the
    shared weights.bin, so no onnxruntime session makes a fused copy of its own (session 36:
    a forward session 4.7 -> 1.9 MB on EfficientNet-Lite0 at 224 px, four in INSTANT). Pairs with a
    trainable tensor stay; the gradients and the inference outputs stay torch's."""
    rng = np.random.default_rng(5)
    x = {"x": rng.standard_normal((3, 3, 16, 16)).astype(np.float32)}
    labels = rng.integers(0, 4, 3).astype(np.int64)
    bundle = export_bundle(f"{models_file}:effnet", tmp_path / "bundle", input_shape="3,3,16,16",
                           trainable="project.*,bns.3.*,head.*")
    for mode, files in open_bundle(bundle).manifest.graphs.items():
        ops = [n.op_type for n in onnx.load(str(bundle / files.forward),
                                            load_external_data=False).graph.node]
        # stem, expand and dw are frozen with their norms: folded; project's norm trains
        assert ops.count("BatchNormalization") == 1 and ops.count("Conv") == 4, (mode, ops)
    check_bundle_grads(models_file, "effnet", bundle, x, labels, ("vanilla", "instant"))
    with torch.no_grad():
        want = _factory(models_file, "effnet")(torch.from_numpy(x["x"])).numpy()
    export_model(bundle, tmp_path / "model.onnx")
    got = ort.InferenceSession(str(tmp_path / "model.onnx"),
                               providers=["CPUExecutionProvider"]).run(None, x)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_a_strided_pointwise_shortcut_is_an_instant_layer_with_torch_gradients(
        models_file: Path, tmp_path: Path):
    """ResNet's downsampling shortcut (1x1 conv, stride 2, odd map size) is rewritten as a
    strided Slice and a unit-stride 1x1 conv (export/passes/strided_pointwise.py): INSTANT
    compresses it, and both modes give torch's gradients (full-rank bases)."""
    rng = np.random.default_rng(4)
    x = {"x": rng.standard_normal((3, 3, 9, 9)).astype(np.float32)}
    labels = rng.integers(0, 4, 3).astype(np.int64)
    bundle = export_bundle(f"{models_file}:resblock", tmp_path / "bundle", input_shape="3,3,9,9")
    layers = open_bundle(bundle).layers
    assert [ly.name for ly in layers] == ["down"] and layers[0].tokens == 25, layers
    check_bundle_grads(models_file, "resblock", bundle, x, labels, ("vanilla", "instant"))


def test_efficientnet_like_with_zero_pad(models_file: Path, tmp_path: Path):
    """nn.ZeroPad2d exports its pads through a ConstantOfShape/Concat/Reshape/Slice chain that
    shape inference cannot follow; folded to constants (export/shape_fold.py)."""
    rng = np.random.default_rng(2)
    x = {"x": rng.standard_normal((2, 3, 16, 16)).astype(np.float32)}
    labels = rng.integers(0, 4, 2).astype(np.int64)
    bundle = export_bundle(f"{models_file}:effnet_zero_pad", tmp_path / "bundle",
                           input_shape="2,3,16,16")
    check_bundle_grads(models_file, "effnet_zero_pad", bundle, x, labels, ("vanilla",))


def test_a_tied_output_layer_trains_the_embedding_through_both_uses(models_file: Path,
                                                                   tmp_path: Path):
    """``head.weight = emb.weight``: torch's exporter writes the head's use as a constant copy
    of the table (transposed); the bundle computes it from the table instead, so the one
    tensor gets the gradient of both uses, as in torch."""
    rng = np.random.default_rng(0)
    x = {"ids": rng.integers(0, 20, (4, 8)).astype(np.int64)}
    labels = rng.integers(0, 20, 4).astype(np.int64)
    np.savez(tmp_path / "batch.npz", **x)
    bundle = export_bundle(f"{models_file}:tied_lm", tmp_path / "bundle",
                           npz=str(tmp_path / "batch.npz"))
    names = [p.torch_name for p in open_bundle(bundle).params]
    assert "emb.weight" in names and len(names) == len(set(names)), names
    check_bundle_grads(models_file, "tied_lm", bundle, x, labels, ("vanilla",))
    # with padding_idx: the lookups of the padding row add nothing, the output layer's use of
    # that row keeps its gradient (masking the whole row's gradient lost it)
    x["ids"][:, 5:] = 0
    bundle = export_bundle(f"{models_file}:tied_lm_pad", tmp_path / "bundle_pad",
                           npz=str(tmp_path / "batch.npz"))
    check_bundle_grads(models_file, "tied_lm_pad", bundle, x, labels, ("vanilla",))
    _, got = runtime_grads(bundle, "vanilla", x, labels)
    assert got["emb.weight"][0].any()


def test_a_weight_normalised_in_forward_is_refused_not_trained_wrong(models_file: Path,
                                                                     tmp_path: Path):
    """``F.normalize(self.w)``: the exporter folds the norm of ``w`` into a constant, through
    which no gradient passes: training ``w`` is refused in one line; frozen, the rest trains."""
    np.savez(tmp_path / "batch.npz", x=np.ones((4, 12), np.float32))
    with pytest.raises(ExportError, match=r"computes a tensor from parameter\(s\) w that"):
        export_bundle(f"{models_file}:cosine", tmp_path / "b1", npz=str(tmp_path / "batch.npz"))
    bundle = export_bundle(f"{models_file}:cosine", tmp_path / "b2",
                           npz=str(tmp_path / "batch.npz"), trainable="l1.*")
    assert [p.torch_name for p in open_bundle(bundle).params] == ["l1.weight", "l1.bias"]


def test_a_tied_output_layer_in_an_onnx_file_trains_one_tensor(models_file: Path,
                                                               tmp_path: Path):
    """The tied language model as an ONNX file: the exporter wrote the table and, for the
    output layer, its transpose; the bundle trains them as one tensor (a note says so) and the
    gradient is torch's for the tied weight."""
    module = _factory(models_file, "tied_lm")
    onnx_file = tmp_path / "tied.onnx"
    torch.onnx.export(module, (torch.zeros(2, 8, dtype=torch.int64),), str(onnx_file),
                      dynamo=False, opset_version=17, input_names=["ids"],
                      output_names=["logits"],
                      dynamic_axes={"ids": {0: "N"}, "logits": {0: "N"}})
    rng = np.random.default_rng(0)
    x = {"ids": rng.integers(0, 20, (4, 8)).astype(np.int64)}
    labels = rng.integers(0, 20, 4).astype(np.int64)
    notes: list[str] = []
    bundle = export_bundle(str(onnx_file), tmp_path / "bundle", notes=notes)
    assert any("trained as one tensor (tied weights)" in n for n in notes), notes
    names = sorted(p.torch_name for p in open_bundle(bundle).params)
    assert names == ["emb.weight", "mix.bias", "mix.weight"], names
    check_bundle_grads(models_file, "tied_lm", bundle, x, labels, ("vanilla",))


def test_reflect_and_replicate_padding_gradients_match_torch(models_file: Path, tmp_path: Path):
    x = {"input": np.random.default_rng(0).standard_normal((4, 3, 9, 9)).astype(np.float32)}
    labels = np.array([0, 1, 2, 1])
    bundle = export_bundle(f"{models_file}:padded_cnn", tmp_path / "bundle",
                           input_shape="4,3,9,9")
    check_bundle_grads(models_file, "padded_cnn", bundle, x, labels, ("vanilla",))


def test_an_embedding_padding_row_gets_no_gradient(models_file: Path, tmp_path: Path):
    """ONNX's Gather has no padding_idx: the bundle's backward zeroes that row's gradient, as
    torch does (was: the padding row trained like the others)."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 20, (4, 6)).astype(np.int64)
    ids[:, 4:] = 0  # padding
    np.savez(tmp_path / "batch.npz", input=ids)
    bundle = export_bundle(f"{models_file}:pad_emb", tmp_path / "bundle",
                           npz=str(tmp_path / "batch.npz"))
    labels = np.array([0, 1, 2, 1])
    check_bundle_grads(models_file, "pad_emb", bundle, {"input": ids}, labels, ("vanilla",))
    _, got = runtime_grads(bundle, "vanilla", {"input": ids}, labels)
    assert not got["0.weight"][0].any() and got["0.weight"][1:].any()


def test_convnext_pointwise_linears_on_channels_last_maps_are_instant_layers(
        models_file: Path, tmp_path: Path):
    """A Linear over [N, H, W, C] (ConvNeXt's and Swin's pointwise MLPs) is an INSTANT layer
    (its positions flattened, ``LayerInfo.flat``); at full rank its gradients are torch's."""
    x = {"input": np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32)}
    labels = np.array([0, 1, 2, 1])
    bundle = export_bundle(f"{models_file}:convnext", tmp_path / "bundle",
                           input_shape="4,3,8,8")
    flat = [ly for ly in open_bundle(bundle).layers if ly.flat]
    assert len(flat) == 4 and all(ly.tokens == 16 for ly in flat), flat
    check_bundle_grads(models_file, "convnext", bundle, x, labels, ("vanilla", "instant"))


def test_grouped_query_attention_with_repeat_interleave(models_file: Path, tmp_path: Path):
    """repeat_interleave's repeats come through OneHot/Tile (was: "must be a constant");
    q, k and v share one basis; gradients are torch's."""
    x = {"x": np.random.default_rng(0).standard_normal((4, 6, 16)).astype(np.float32)}
    labels = np.array([0, 1, 2, 1])
    bundle = export_bundle(f"{models_file}:gqa", tmp_path / "bundle", input_shape="4,6,16")
    layers = open_bundle(bundle).layers
    assert len({ly.p_input for ly in layers if ly.name in ("q", "k", "v")}) == 1, layers
    check_bundle_grads(models_file, "gqa", bundle, x, labels, ("vanilla", "instant"))


def test_rms_norm_and_threshold_export_and_match_torch(models_file: Path, tmp_path: Path):
    """nn.RMSNorm (with and without a weight, eps given and default), F.rms_norm and
    nn.Threshold export (torch has no opset-17 translation; was: "cannot export ... aten::
    rms_norm") and both modes give torch's loss and gradients, weights of the norms included."""
    rng = np.random.default_rng(1)
    x = {"x": rng.standard_normal((4, 6, 16)).astype(np.float32)}
    labels = np.array([0, 1, 2, 1])
    bundle = export_bundle(f"{models_file}:llama", tmp_path / "bundle", input_shape="4,6,16")
    b = open_bundle(bundle)
    assert {"n1.weight", "n2.weight"} <= {p.torch_name for p in b.params}
    assert {"qkv", "o", "gate", "up", "down"} <= {ly.name for ly in b.layers}
    check_bundle_grads(models_file, "llama", bundle, x, labels, ("vanilla", "instant"))


def test_softplus_with_beta_and_threshold_matches_torch(models_file: Path, tmp_path: Path):
    """torch's exporter wrote Softplus(beta x) / beta and dropped the threshold (a probe's
    Linear-softplus(beta 2, threshold 3)-Linear: loss 8e-4, gradients 2e-2 off torch's)."""
    x = {"x": np.random.default_rng(2).standard_normal((4, 6, 16)).astype(np.float32)}
    bundle = export_bundle(f"{models_file}:softplus", tmp_path / "bundle", input_shape="4,6,16")
    check_bundle_grads(models_file, "softplus", bundle, x, np.array([0, 1, 2, 1]), ("vanilla",))


def test_slices_of_a_weight_in_an_onnx_file_train(models_file: Path, tmp_path: Path):
    """torch's exporter without constant folding writes W[:, :6]'s bounds as Unsqueeze of
    Constants: "tensor '/Unsqueeze_4_output_0' must be a constant" (a probe's; the torch route
    folds W into constants and freezes it, with a note). Integer arithmetic on constants is now
    evaluated at export: W trains, with torch's gradient."""
    module = _factory(models_file, "wslice")
    onnx_file = tmp_path / "wslice.onnx"
    torch.onnx.export(module, (torch.zeros(2, 12),), str(onnx_file), dynamo=False,
                      do_constant_folding=False, opset_version=17, input_names=["x"],
                      dynamic_axes={"x": {0: "N"}})
    x = {"x": np.random.default_rng(3).standard_normal((4, 12)).astype(np.float32)}
    labels = np.array([0, 1, 2, 1])
    bundle = export_bundle(str(onnx_file), tmp_path / "bundle")
    assert "W" in {p.name for p in open_bundle(bundle).params}
    ref_loss, ref = torch_grads(module, x, labels, ["W", "head.weight"])
    loss, got = runtime_grads(bundle, "vanilla", x, labels)
    np.testing.assert_allclose(loss, ref_loss, rtol=RTOL, atol=ATOL)
    for n in ("W", "head.weight"):
        np.testing.assert_allclose(got[n], ref[n], rtol=RTOL, atol=ATOL, err_msg=n)


@pytest.mark.parametrize("name,what", [("embedding_max_norm", "max_norm=1.0"),
                                       ("embedding_by_freq", "scale_grad_by_freq=True")])
def test_embedding_options_the_graphs_cannot_reproduce_are_refused(models_file: Path,
                                                                   tmp_path: Path, name, what):
    """nn.Embedding(max_norm=...) renormalised rows in the traced forward only, and
    scale_grad_by_freq scaled torch's gradient only: both trained silently unlike torch."""
    from export.graph import ExportError

    with pytest.raises(ExportError, match=f"nn.Embedding with {re.escape(what)}"):
        export_bundle(f"{models_file}:{name}", tmp_path / "b", input_shape="2,10:int64")


def _pixels(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """[n, 1, 8, 8] images and [n, 8, 8] labels: each pixel's brightness third (learnable), a
    few pixels without a label (-100, torch's ignore_index)."""
    rng = np.random.default_rng(seed)
    x = rng.random((n, 1, 8, 8), dtype=np.float32)
    y = np.digitize(x[:, 0], [1 / 3, 2 / 3]).astype(np.int64)
    y[rng.random(y.shape) < 0.1] = -100
    return x, y


def test_a_class_per_pixel_trains_like_torch(models_file: Path, tmp_path: Path, cli):
    """Cross-entropy on an [N, classes, H, W] output with [N, H, W] labels (was: "needs a
    [N, classes] output"): torch's loss and gradients with ignored pixels, the same gradient
    at any micro-batch (each weighs in by its labelled pixels), and a CLI run that learns,
    with held-out accuracy per labelled pixel; labels of the wrong shape are one error."""
    from helpers import make_trainer

    x, y = _pixels(6, 0)
    y[2] = -100  # an image without any label
    bundle = export_bundle(f"{models_file}:segmenter", tmp_path / "bundle", input_shape="6,1,8,8")
    loss = open_bundle(bundle).manifest.loss
    assert (loss.classes_first, loss.num_classes, loss.labels.shape) == (True, 3, ["N", 8, 8])
    check_bundle_grads(models_file, "segmenter", bundle, {"input": x}, y, ("vanilla", "instant"))
    whole = make_trainer(bundle, mode="vanilla")
    ref_loss, _ = whole.gradients(ArrayBatch({"input": x}, y))
    ref = {p: g.copy() for p, g in whole._grads.items()}
    for micro in (2, 4):
        tr = make_trainer(bundle, mode="vanilla", micro_batch=micro)
        got_loss, _ = tr.gradients(ArrayBatch({"input": x}, y))
        assert abs(got_loss - ref_loss) <= 1e-5 * ref_loss, (micro, got_loss, ref_loss)
        for p, g in ref.items():
            np.testing.assert_allclose(tr._grads[p], g, rtol=1e-4, atol=1e-7, err_msg=p)

    train, val = _pixels(256, 1), _pixels(128, 2)
    np.savez(tmp_path / "train.npz", x=train[0], y=train[1])
    np.savez(tmp_path / "val.npz", x=val[0], y=val[1])
    out = cli("train", bundle, "--data", tmp_path / "train.npz", "--val", tmp_path / "val.npz",
              "--steps", 60, "--batch", 32, "--micro-batch", 12, "--optimizer", "adamw",
              "--lr", "0.02", "--no-progress", "--out", tmp_path / "run")
    assert out.returncode == 0, out.stderr
    m = re.search(r"^held-out accuracy (\S+) \(before (\S+)\)", out.stdout, re.MULTILINE)
    assert m and float(m[1]) > 0.8 and float(m[1]) > float(m[2]) + 0.3, out.stdout
    ev = cli("eval", bundle, "--data", tmp_path / "val.npz", "--weights",
             tmp_path / "run" / "params.npz")
    assert ev.returncode == 0 and f"accuracy {m[1]}" in ev.stdout, (ev.stdout, ev.stderr)

    np.savez(tmp_path / "flat.npz", x=train[0], y=np.zeros(256, np.int64))
    bad = cli("train", bundle, "--data", tmp_path / "flat.npz", "--steps", 1)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr
    assert "must be a [N, 8, 8] (a class per pixel) integer array" in bad.stderr, bad.stderr
    bad = cli("train", bundle, "--data", "digits", "--steps", 1)  # a class per image
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr
    assert "one class per example; this model takes labels ['N', 8, 8]" in bad.stderr, bad.stderr
    from PIL import Image
    for c in "abc":  # an image folder has a class per image
        (tmp_path / "imgs" / c).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "imgs" / c / "0.png")
    bad = cli("train", bundle, "--data", tmp_path / "imgs", "--steps", 1)
    assert bad.returncode == 2 and "one class per image" in bad.stderr, bad.stderr


def test_a_class_per_time_step_of_a_conv1d_reads_the_class_axis_from_the_labels(
        models_file: Path, tmp_path: Path):
    """A rank-3 output is [N, L, classes] (a token tagger) unless the example .npz's labels say
    [N, classes, L]: y [N, L] matching axis 2 (a Conv1d tagger); then torch's loss and
    gradients, ignored steps included."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((5, 2, 10)).astype(np.float32)
    y = rng.integers(0, 3, (5, 10))
    y[1, 4:] = -100
    np.savez(tmp_path / "ex.npz", input=x, y=y)
    bundle = export_bundle(f"{models_file}:tagger1d", tmp_path / "b", npz=str(tmp_path / "ex.npz"))
    loss = open_bundle(bundle).manifest.loss
    assert (loss.classes_first, loss.num_classes, loss.labels.shape) == (True, 3, ["N", 10])
    check_bundle_grads(models_file, "tagger1d", bundle, {"input": x}, y, ("vanilla", "instant"))
    plain = export_bundle(f"{models_file}:tagger1d", tmp_path / "p", input_shape="5,2,10")
    loss = open_bundle(plain).manifest.loss  # no labels to tell: the token tagger's layout
    assert (loss.classes_first, loss.num_classes, loss.labels.shape) == (False, 10, ["N", 3])
    told = export_bundle(f"{models_file}:tagger1d", tmp_path / "t", input_shape="5,2,10",
                         class_axis="1")  # --class-axis 1: also where C == L leaves it open
    assert open_bundle(told).manifest.loss.classes_first
    np.savez(tmp_path / "bad.npz", input=x, y=y[:, :4])
    with pytest.raises(ExportError, match=r"fits neither a class axis 1 nor a last class axis"):
        export_bundle(f"{models_file}:tagger1d", tmp_path / "x", npz=str(tmp_path / "bad.npz"))
    # the plain export's training names the way out (session 28 probe: it was told to reshape
    # its right [N, L] labels into [N, 3])
    np.savez(tmp_path / "train.npz", input=x, y=np.maximum(y, 0))
    from runtime.data import load_data

    with pytest.raises(UserError, match=r"got int64 shape \[5, 10\].*re-export it with "
                                        r"--class-axis 1"):
        load_data(str(tmp_path / "train.npz"), open_bundle(plain))


def test_a_channels_last_dense_output_reads_its_classes_last(models_file: Path, tmp_path: Path):
    """[N, H, W, classes] (a TF-style segmenter) with [N, H, W] example labels: classes last,
    torch's loss and gradients (the output permuted for torch's cross-entropy)."""
    import torch

    x, y = _pixels(4, 5)
    np.savez(tmp_path / "ex.npz", input=x, y=y)
    bundle = export_bundle(f"{models_file}:segmenter_hwc", tmp_path / "b",
                           npz=str(tmp_path / "ex.npz"))
    loss = open_bundle(bundle).manifest.loss
    assert (loss.classes_first, loss.num_classes, loss.labels.shape) == (False, 3, ["N", 8, 8])
    module = _factory(models_file, "segmenter_hwc").double()
    out = module(torch.from_numpy(x).double())
    ref = F.cross_entropy(out.permute(0, 3, 1, 2), torch.from_numpy(y))
    ref.backward()
    got, grads = runtime_grads(bundle, "vanilla", {"input": x}, y)
    assert abs(got - ref.item()) <= 1e-5, (got, ref.item())
    for n, p in module.named_parameters():
        np.testing.assert_allclose(grads[n], p.grad.numpy(), rtol=RTOL, atol=ATOL, err_msg=n)


def test_frozen_parameters_stay_frozen_and_a_constant_branch_is_inlined(models_file: Path,
                                                                       tmp_path: Path):
    """Parameters the factory froze (``requires_grad_(False)``) stay frozen, as in torch (they
    trained before, silently), with a note; asked for by name they are one error. The If node
    torch writes for ``squeeze(-1)`` (its condition folds to a constant) is replaced by its
    branch (was: "'mlp.0.weight' does not reach the loss"); a nested nn.Sequential's weights
    keep torch's names (``mlp.0.weight``, was ``mlp.mlp.0.weight``); torch's gradients."""
    notes: list[str] = []
    bundle = export_bundle(f"{models_file}:lrn", tmp_path / "b", input_shape="4,8", notes=notes)
    b = open_bundle(bundle)
    assert [p.torch_name for p in b.params] == ["mlp.0.weight", "mlp.0.bias", "mlp.2.weight",
                                                "mlp.2.bias", "head.weight", "head.bias"]
    assert any("requires_grad=False" in n and "backbone.weight" in n for n in notes), notes
    assert {"mlp.0", "mlp.2"} <= {ly.name for ly in b.layers}
    assert "If" not in {n.op_type for n in onnx.load(str(bundle / "infer.onnx")).graph.node}
    rng = np.random.default_rng(0)
    x = {"x": rng.standard_normal((4, 8)).astype(np.float32)}
    check_bundle_grads(models_file, "lrn", bundle, x, np.array([0, 1, 2, 1]),
                       ("vanilla", "instant"))
    with pytest.raises(ExportError, match="requires_grad=False.*requires_grad_\\(True\\)"):
        export_bundle(f"{models_file}:lrn", tmp_path / "b2", input_shape="4,8",
                      trainable="backbone.*")


TOKEN_MASKS = textwrap.dedent('''
    import torch
    from torch import nn


    class Pooled(nn.Module):
        """Masked mean of token embeddings, then a classifier; ``flip``: the mask input marks
        the padding with 1 (torch's key_padding_mask)."""

        def __init__(self, flip):
            super().__init__()
            self.flip = flip
            self.emb = nn.Embedding(40, 8)
            self.fc = nn.Linear(8, 2)

        def pooled(self, ids, mask):
            keep = (1 - mask if self.flip else mask).unsqueeze(-1).float()
            return self.fc((self.emb(ids) * keep).sum(1) / keep.sum(1).clamp(min=1))


    class KeyPadding(Pooled):
        def __init__(self):
            super().__init__(True)

        def forward(self, input_ids, key_padding_mask):
            return self.pooled(input_ids, key_padding_mask)


    class Valid(Pooled):
        def __init__(self):
            super().__init__(False)

        def forward(self, input_ids, valid):
            return self.pooled(input_ids, valid)


    class FloatMask(Pooled):
        def __init__(self):
            super().__init__(False)

        def forward(self, input_ids, attention_mask):
            return self.pooled(input_ids, attention_mask)
''')


@pytest.mark.parametrize("factory,match", [
    ("KeyPadding", r"input 'key_padding_mask' marks the padding with 1 .* give the model an "
                   r"attention_mask input"),
    ("Valid", r"input\(s\) valid match none: rename them"),
    ("FloatMask", r"input\(s\) attention_mask are not: give the model int64 token inputs")])
def test_a_tokenizer_is_refused_for_mask_inputs_it_cannot_fill(tmp_path, factory, match):
    """Session 26 probe: a model whose mask input marks the padding with 1 was fed the
    tokenizer's attention mask (1 on real tokens) unchanged: it attended to the padding alone,
    losses and evaluations silently wrong. A mask input not named *mask* exported, then `train`
    refused text data pointing to an .npz. Both are refused at export now, in one line."""
    from test_sources import _write_tokenizer

    (tmp_path / "masks.py").write_text(TOKEN_MASKS)
    tok = _write_tokenizer(tmp_path / "tokenizer.json")
    with pytest.raises(ExportError, match=match):
        export_bundle(f"{tmp_path / 'masks.py'}:{factory}", tmp_path / "b",
                      input_shape="4,12:int64;4,12:" + ("float32" if "Float" in factory
                                                         else "int64"), tokenizer=tok)
