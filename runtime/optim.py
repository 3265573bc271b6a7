"""Optimizers in numpy, updating parameters in place (no copies of the weights)."""

from __future__ import annotations

import numpy as np

__all__ = ["SGD", "AdamW", "make_optimizer"]


class SGD:
    """SGD with momentum (PyTorch semantics: v = μv + g + λp; p -= lr·v)."""

    def __init__(self, params: dict[str, np.ndarray], lr: float, momentum: float = 0.9,
                 weight_decay: float = 0.0) -> None:
        self.lr, self.momentum, self.wd = lr, momentum, weight_decay
        self.state = {k: {"v": np.zeros_like(p)} for k, p in params.items()}
        self.t = 0

    def step(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray]) -> None:
        self.t += 1
        for k, p in params.items():
            g = grads[k]
            if self.wd:
                g = g + self.wd * p
            v = self.state[k]["v"]
            if self.momentum:
                v *= self.momentum
                v += g
                g = v
            p -= self.lr * g


class AdamW:
    """AdamW (decoupled weight decay, bias-corrected moments; PyTorch defaults)."""

    def __init__(self, params: dict[str, np.ndarray], lr: float, betas=(0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01) -> None:
        self.lr, self.b1, self.b2, self.eps, self.wd = lr, betas[0], betas[1], eps, weight_decay
        self.state = {k: {"m": np.zeros_like(p), "v": np.zeros_like(p)}
                      for k, p in params.items()}
        self.t = 0

    def step(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray]) -> None:
        self.t += 1
        c1 = 1.0 - self.b1 ** self.t
        c2 = 1.0 - self.b2 ** self.t
        for k, p in params.items():
            g = grads[k]
            st = self.state[k]
            m, v = st["m"], st["v"]
            m *= self.b1
            m += (1.0 - self.b1) * g
            v *= self.b2
            v += (1.0 - self.b2) * np.square(g)
            if self.wd:
                p *= 1.0 - self.lr * self.wd
            denom = np.sqrt(v / c2)
            denom += self.eps
            p -= (self.lr / c1) * (m / denom)


def make_optimizer(name: str, params: dict[str, np.ndarray], lr: float,
                   weight_decay: float | None = None):
    if name == "sgd":
        return SGD(params, lr, weight_decay=weight_decay or 0.0)
    if name == "adamw":
        return AdamW(params, lr, weight_decay=0.01 if weight_decay is None else weight_decay)
    from .errors import UserError

    raise UserError(f"unknown optimizer '{name}'; choose adamw or sgd")
