"""Training batches from a mixture of domains, equal samples per domain, as a pure function of the step.

    sampler = MixtureSampler({"math": load_split(d, "math", "train"),
                              "code": load_split(d, "code", "train")},
                             batch_size=8, seq_len=512, seed=0)
    tokens = sampler.batch(step)            # int32 [B, seq_len + 1]
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    sampler.domain_ids                      # int32 [B]: row b comes from domains[domain_ids[b]]

A domain may also be given as rows already, [n, seq_len + 1] (a fixed training subset,
data/subset.py): it is drawn from like any other.

Each domain's token stream is viewed as rows of seq_len + 1 tokens (`pack.rows`).
Every batch holds batch_size / n_domains rows of each domain, in domain blocks
(rows 0..k-1 from the first domain, and so on). Within a domain the rows are
drawn without replacement in a shuffled order that is fresh each epoch over that
domain; a smaller domain simply starts new epochs sooner.

`batch(step)` depends only on (arrays, batch_size, seq_len, seed, step): no
iterator state, so a run resumed from a checkpoint at step s continues with
exactly the batches it would have seen. The shuffle is a counter-based hash
(splitmix64) sorted with numpy, not a numpy Generator, so the order is the same
on every numpy version; a domain's order depends on its name and the seed, not
on which other domains are in the mixture.
"""

from __future__ import annotations

import hashlib
from typing import Mapping

import numpy as np

from mode_jax.data.pack import rows


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer, elementwise on uint64 (wrapping arithmetic)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def epoch_permutation(n: int, *, seed: int, domain: str, epoch: int) -> np.ndarray:
    """A permutation of range(n) determined by (seed, domain, epoch)."""
    salt = hashlib.sha256(f"mixture:{seed}:{domain}:{epoch}".encode()).digest()
    key = np.uint64(int.from_bytes(salt[:8], "big"))
    with np.errstate(over="ignore"):
        scores = _splitmix64(np.arange(n, dtype=np.uint64) ^ key)
    return np.argsort(scores, kind="stable")


class MixtureSampler:
    """Deterministic batches with equal rows per domain; `batch(step)` is pure in `step`."""

    def __init__(self, arrays: Mapping[str, np.ndarray], *, batch_size: int, seq_len: int, seed: int):
        if not arrays:
            raise ValueError("a mixture needs at least one domain")
        if seq_len < 1:
            raise ValueError(f"{seq_len=} must be >= 1")
        if batch_size < 1 or batch_size % len(arrays):
            raise ValueError(f"{batch_size=} must be a positive multiple of the number of domains "
                             f"({len(arrays)}) so each domain gets the same number of rows")
        self.domains = tuple(arrays)
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.rows_per_domain = batch_size // len(arrays)        # k: rows of each domain per batch
        self._rows = {}
        for name, tokens in arrays.items():
            # A 2-D array is rows already (a training subset, data/subset.py); 1-D is a stream.
            view = np.asarray(tokens) if np.ndim(tokens) == 2 else rows(tokens, seq_len)   # [n_rows, seq_len + 1]
            if view.shape[1] != seq_len + 1:
                raise ValueError(f"domain {name!r}: rows of {view.shape[1]} tokens, expected seq_len + 1 = {seq_len + 1}")
            if view.shape[0] == 0:
                raise ValueError(f"domain {name!r} has {np.asarray(tokens).shape[0]} tokens, fewer than "
                                 f"one row of {seq_len + 1}")
            self._rows[name] = view
        self.domain_ids = np.repeat(np.arange(len(self.domains), dtype=np.int32), self.rows_per_domain)
        self._perm_cache: dict[tuple[str, int], np.ndarray] = {}

    def rows_in_epoch(self, domain: str) -> int:
        """Rows in one pass over `domain` (its epoch length in samples)."""
        return self._rows[domain].shape[0]

    def row_indices(self, step: int) -> dict[str, np.ndarray]:
        """Which rows of each domain `batch(step)` holds: {domain: int64 [k]}."""
        if step < 0:
            raise ValueError(f"{step=} must be >= 0")
        k = self.rows_per_domain
        out = {}
        for name in self.domains:
            n = self._rows[name].shape[0]
            sample = step * k + np.arange(k, dtype=np.int64)     # [k] global sample numbers
            epoch, position = np.divmod(sample, n)
            out[name] = np.array([self._permutation(name, int(e), n)[p] for e, p in zip(epoch, position)],
                                 dtype=np.int64)
        return out

    def batch(self, step: int) -> np.ndarray:
        """int32 [batch_size, seq_len + 1]: rows of domains[0], then domains[1], ..."""
        picked = self.row_indices(step)
        return np.concatenate([self._rows[name][picked[name]] for name in self.domains]).astype(np.int32)

    def _permutation(self, name: str, epoch: int, n: int) -> np.ndarray:
        key = (name, epoch)
        if key not in self._perm_cache:
            if len(self._perm_cache) >= 4 * len(self.domains):  # a step touches <= 2 epochs per domain
                self._perm_cache.clear()
            self._perm_cache[key] = epoch_permutation(n, seed=self.seed, domain=name, epoch=epoch)
        return self._perm_cache[key]

