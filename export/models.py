"""Built-in PyTorch models (workstation side).

Each entry gives a factory and the example input shape (batch first; the batch dim is exported as
the symbolic dim ``N``). ``token-mlp`` is the activation-heavy workload of the INSTANT benchmark.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["BUILTIN_MODELS", "BuiltinModel", "TokenMLP"]


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


@dataclass(frozen=True)
class BuiltinModel:
    factory: Callable[[], nn.Module]
    input_shape: tuple[int, ...]  # one example, batch first
    description: str


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "mlp": BuiltinModel(MLP, (32, 64), "MLP 64-128-128-10 for 8x8 digits (flattened)"),
    "cnn": BuiltinModel(CNN, (32, 1, 8, 8), "small CNN (3x3 + 1x1 convs, BN, pooling) for digits"),
    "token-mlp": BuiltinModel(TokenMLP, (8, 128, 64),
                              "per-token MLP, width 512, 4 hidden layers, sequence 128"),
}
