"""Optimizers in numpy, updating parameters in place.

Every update runs through one scratch buffer the size of the largest parameter, allocated once:
a step allocates nothing (numpy expressions such as ``p -= lr * m / (sqrt(v) + eps)`` would make
three temporaries per parameter, each page-faulted in and released again every step).
"""

from __future__ import annotations

import numpy as np

from .config import OptimConfig

__all__ = ["SGD", "AdamW", "make_optimizer"]


class _Scratch:
    def __init__(self, params: dict[str, np.ndarray]) -> None:
        size = max((p.size for p in params.values()), default=0)
        self.buf = np.zeros(size, np.float32)

    def like(self, p: np.ndarray) -> np.ndarray:
        return self.buf[:p.size].reshape(p.shape)


class SGD:
    """SGD with momentum (PyTorch semantics: v = μv + g + λp; p -= lr·v)."""

    def __init__(self, params: dict[str, np.ndarray], lr: float, momentum: float = 0.9,
                 weight_decay: float = 0.0) -> None:
        self.lr, self.momentum, self.wd = lr, momentum, weight_decay
        self.state = {k: {"v": np.zeros_like(p)} for k, p in params.items()}
        self.t = 0
        self._s = _Scratch(params)

    def step(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray]) -> None:
        self.t += 1
        for k, p in params.items():
            g, s = grads[k], self._s.like(p)
            if self.wd:
                np.multiply(p, self.wd, out=s)
                s += g
                g = s
            if self.momentum:
                v = self.state[k]["v"]
                v *= self.momentum
                v += g
                g = v
            np.multiply(g, self.lr, out=s)
            p -= s


class AdamW:
    """AdamW (decoupled weight decay, bias-corrected moments; PyTorch defaults)."""

    def __init__(self, params: dict[str, np.ndarray], lr: float, betas=(0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01) -> None:
        self.lr, self.b1, self.b2, self.eps, self.wd = lr, betas[0], betas[1], eps, weight_decay
        self.state = {k: {"m": np.zeros_like(p), "v": np.zeros_like(p)}
                      for k, p in params.items()}
        self.t = 0
        self._s = _Scratch(params)

    def step(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray]) -> None:
        self.t += 1
        c1 = 1.0 - self.b1 ** self.t
        c2 = 1.0 - self.b2 ** self.t
        for k, p in params.items():
            g, s = grads[k], self._s.like(p)
            st = self.state[k]
            m, v = st["m"], st["v"]
            m *= self.b1
            np.multiply(g, 1.0 - self.b1, out=s)
            m += s
            v *= self.b2
            np.square(g, out=s)
            s *= 1.0 - self.b2
            v += s
            if self.wd:
                p *= 1.0 - self.lr * self.wd
            np.multiply(v, 1.0 / c2, out=s)
            np.sqrt(s, out=s)
            s += self.eps
            np.divide(m, s, out=s)
            s *= self.lr / c1
            p -= s


def make_optimizer(cfg: OptimConfig, params: dict[str, np.ndarray]):
    if cfg.name == "sgd":
        return SGD(params, cfg.lr, momentum=cfg.momentum, weight_decay=cfg.decay)
    return AdamW(params, cfg.lr, weight_decay=cfg.decay)
