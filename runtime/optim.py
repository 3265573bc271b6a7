"""Optimizers in numpy, updating parameters in place.

Every update runs through one scratch buffer the size of the largest parameter, allocated once:
a step allocates nothing (numpy expressions such as ``p -= lr * m / (sqrt(v) + eps)`` would make
three temporaries per parameter, each page-faulted in and released again every step).
"""

from __future__ import annotations

import numpy as np

from .config import OptimConfig

__all__ = ["SGD", "AdamW", "fusable", "make_optimizer", "state_buffers"]


def resident_zeros(like: np.ndarray | None = None, size: int = 0) -> np.ndarray:
    """Zeros whose pages are written now. ``np.zeros`` maps untouched pages that enter the RSS
    only at the first update: after the budget's probes measured the run's fixed cost (a 51 MB
    embedding table's momentum and gradient buffers took a run 33 MB past its budget at its
    first step). Written here, they are part of what the probes measure."""
    a = np.empty_like(like) if like is not None else np.empty(size, np.float32)
    a.fill(0)
    return a


class _Scratch:
    def __init__(self, params: dict[str, np.ndarray]) -> None:
        self.size = max((p.size for p in params.values()), default=0)
        self.buf: np.ndarray | None = resident_zeros(size=self.size)

    def like(self, p: np.ndarray) -> np.ndarray:
        return self.buf[:p.size].reshape(p.shape)

    def release(self) -> None:
        """Free the buffer (its contents are never kept between updates); :meth:`renew`
        makes it again."""
        self.buf = None

    def renew(self) -> None:
        if self.buf is None:
            self.buf = resident_zeros(size=self.size)


class SGD:
    """SGD with momentum (PyTorch semantics: v = μv + g + λp; p -= lr·v)."""

    def __init__(self, params: dict[str, np.ndarray], lr: float, momentum: float = 0.9,
                 weight_decay: float = 0.0) -> None:
        self.lr, self.momentum, self.wd = lr, momentum, weight_decay
        self.state = {k: {"v": resident_zeros(p)} for k, p in params.items()}
        self._shapes = {k: p.shape for k, p in params.items()}  # (renew_fused)
        self.t = 0
        self._s = _Scratch(params)

    def step(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray]) -> None:
        self.t += 1
        f = np.float32
        for k, p in params.items():
            g, s = grads[k], self._s.like(p)
            if self.wd:
                np.multiply(p, f(self.wd), out=s)
                s += g
                g = s
            if self.momentum:
                v = self.state[k]["v"]
                v *= f(self.momentum)
                v += g
                g = v
            np.multiply(g, f(self.lr), out=s)
            p -= s

    # Fused momentum (:func:`fusable`): the backward accumulates the gradient straight into the
    # momentum buffer (no gradient buffer: the parameters' size less memory). Same arithmetic
    # as ``step``: v = μv + λp + g, then p -= lr·v.
    def begin_fused(self, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Scale the momentum (v *= μ, v += λp) before the backward adds g; returns the buffers
        the backward accumulates into."""
        f = np.float32
        for k, p in params.items():
            v = self.state[k]["v"]
            v *= f(self.momentum)
            if self.wd:
                s = self._s.like(p)
                np.multiply(p, f(self.wd), out=s)
                v += s
        return {k: self.state[k]["v"] for k in params}

    def release_fused(self) -> bool:
        """Free the momentum buffers while they hold zeros (no step yet) and the scratch: the
        buffers :meth:`begin_fused` and the backward write (runtime/budget.py: the probes).
        Returns whether they were freed; :meth:`renew_fused` makes them again."""
        if any(st["v"] is None or st["v"].any() for st in self.state.values()):
            return False
        for st in self.state.values():
            st["v"] = None
        self._s.release()
        return True

    def renew_fused(self) -> None:
        for k, st in self.state.items():
            if st["v"] is None:
                shape = self._shapes[k]
                st["v"] = resident_zeros(size=int(np.prod(shape))).reshape(shape)
        self._s.renew()

    def finish_fused(self, params: dict[str, np.ndarray]) -> None:
        self.t += 1
        f = np.float32
        for k, p in params.items():
            s = self._s.like(p)
            np.multiply(self.state[k]["v"], f(self.lr), out=s)
            p -= s

    def reset(self) -> None:
        """Zero the momentum (after a step whose gradient was not finite polluted it)."""
        for st in self.state.values():
            st["v"].fill(0.0)


_MAX = np.float32(np.finfo(np.float32).max)


class AdamW:
    """AdamW (decoupled weight decay, bias-corrected moments; PyTorch defaults)."""

    def __init__(self, params: dict[str, np.ndarray], lr: float, betas=(0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01) -> None:
        self.lr, self.b1, self.b2, self.eps, self.wd = lr, betas[0], betas[1], eps, weight_decay
        self.state = {k: {"m": resident_zeros(p), "v": resident_zeros(p)}
                      for k, p in params.items()}
        self.t = 0
        self._s = _Scratch(params)

    def step(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray]) -> None:
        """One update. Scalars are float32 and the order of operations is that of the ONNX
        step graph (export/optim_graphs.py), so host and device steps agree to rounding."""
        self.t += 1
        f = np.float32
        b1, b2, eps, lr = f(self.b1), f(self.b2), f(self.eps), f(self.lr)
        c1, c2 = f(1.0 - self.b1 ** self.t), f(1.0 - self.b2 ** self.t)
        one = f(1.0)
        for k, p in params.items():
            g, s = grads[k], self._s.like(p)
            st = self.state[k]
            m, v = st["m"], st["v"]
            m *= b1
            np.multiply(g, one - b1, out=s)
            m += s
            v *= b2
            np.multiply(g, g, out=s)
            s *= one - b2
            v += s
            np.minimum(v, _MAX, out=v)  # g² of a finite |g| > 1.8e19 overflows (the step:
            # m/√v → 0 either way); an inf moment made every checkpoint unresumable
            if self.wd:
                p *= one - lr * f(self.wd)
            np.divide(v, c2, out=s)
            np.sqrt(s, out=s)
            s += eps
            np.divide(m, s, out=s)
            s *= lr / c1
            p -= s


def fusable(cfg: OptimConfig) -> bool:
    """Whether the backward can add gradients into the optimizer's state (SGD's momentum)."""
    return cfg.name == "sgd" and cfg.momentum > 0


def state_buffers(cfg: OptimConfig) -> int:
    """Arrays of a parameter's size the optimizer keeps per parameter (AdamW: m and v)."""
    return 2 if cfg.name == "adamw" else 1


def make_optimizer(cfg: OptimConfig, params: dict[str, np.ndarray]):
    if cfg.name == "sgd":
        return SGD(params, cfg.lr, momentum=cfg.momentum, weight_decay=cfg.decay)
    return AdamW(params, cfg.lr, weight_decay=cfg.decay)
