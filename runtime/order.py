"""The batch order of a run: a fresh permutation of the rows per epoch, held in one int32
buffer (4 bytes a row below 2³¹ rows, counted by the budget's plan: ``order_bytes``), with the
values ``rng.permutation`` gives, so that checkpoints resume the same order."""

from __future__ import annotations

import numpy as np

__all__ = ["Order", "is_permutation", "order_bytes"]


class Order:
    """Batch order: a fresh permutation of the data per epoch; its state resumes exactly."""

    def __init__(self, n: int, batch: int, rng: np.random.Generator,
                 data_id: str | None = None, val_id: str | None = None) -> None:
        self.n, self.batch, self.rng = n, batch, rng
        self.starts = range(0, n - batch + 1 if n >= batch else 1, batch)
        self.perm: np.ndarray | None = None
        self.pos = 0
        self.data_id = data_id  # data_fingerprint of the rows it orders, checked on resume
        self.val_id = val_id  # and of the held-out rows ("" where there are none)

    def next(self) -> np.ndarray:
        if self.perm is None or self.pos >= len(self.starts):
            self._shuffle()
        s = self.starts[self.pos]
        self.pos += 1
        return self.perm[s:s + self.batch]

    def _shuffle(self) -> None:
        """A new permutation of the rows in the one buffer (``rng.permutation(n)``'s values:
        the same draws on 0..n-1), 4 bytes a row below 2³¹ rows (order_bytes)."""
        dtype = _order_dtype(self.n)
        if (self.perm is None or len(self.perm) != self.n or self.perm.dtype != dtype
                or not self.perm.flags.writeable):
            self.perm = np.empty(self.n, dtype)
        for i in range(0, self.n, 1 << 20):
            self.perm[i:i + (1 << 20)] = np.arange(i, min(self.n, i + (1 << 20)))
        self.rng.shuffle(self.perm)
        self.pos = 0


def _order_dtype(n: int) -> np.dtype:
    return np.dtype(np.int32 if n < 2 ** 31 else np.int64)


def is_permutation(perm: np.ndarray) -> bool:
    """Every row index once (one byte a row, where sorting a copy took 16)."""
    n = len(perm)
    if n == 0:
        return True
    if int(perm.min()) < 0 or int(perm.max()) >= n:
        return False
    seen = np.zeros(n, np.bool_)
    seen[perm] = True
    return bool(seen.all())


def order_bytes(n: int) -> int:
    """Memory of the batch order over ``n`` rows (:class:`Order`), which the plan counts."""
    return _order_dtype(n).itemsize * n
