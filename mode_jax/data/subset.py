"""A fixed subset of a domain's training rows: `data.train_examples` / `data.stage1_examples`.

The paper's Figure 3 (right) and Figure 5 vary how many training examples a method sees
at a fixed step count. An example here is one training row of seq_len + 1 tokens (what
the sampler draws, data/pack.py's `rows`). The subset of N rows is the first N of one
permutation of the domain's rows that depends on the domain's name alone: not on the
seed and not on N, so the subsets are nested (the 160-row subset lies inside the
480-row one) and a curve over N compares like with like, while seeds vary the
initialisation and the order in which the subset is drawn. Training for the usual
number of steps cycles the subset: MixtureSampler draws it epoch after epoch, each
epoch in a fresh order. The rows come from the train split only, so they are disjoint
from every validation and test document (the build's split, data/split.py).
"""

from __future__ import annotations

import numpy as np

from mode_jax.data.mixture import epoch_permutation
from mode_jax.data.pack import num_rows, rows
from mode_jax.errors import UserError


def subset_indices(n_rows: int, n: int, *, domain: str) -> np.ndarray:
    """Sorted int64 [n]: which of a domain's `n_rows` training rows its N-example subset holds."""
    if not 1 <= n <= n_rows:
        raise UserError(too_few_rows(domain, n, n_rows))
    # "subset:" keeps this permutation apart from the sampler's per-epoch orders of the same domain.
    return np.sort(epoch_permutation(n_rows, seed=0, domain=f"subset:{domain}", epoch=0)[:n])


def subset_rows(tokens: np.ndarray, seq_len: int, n: int, *, domain: str) -> np.ndarray:
    """The subset's rows, int32 [n, seq_len + 1] (a copy: small, and the sampler takes it as rows)."""
    view = rows(tokens, seq_len)
    return np.asarray(view[subset_indices(view.shape[0], n, domain=domain)], dtype=np.int32)


def too_few_rows(domain: str, n: int, n_rows: int) -> str:
    return (f"config data.train_examples / data.stage1_examples = {n} is more than the {n_rows} training rows "
            f"of {domain!r} at this data.seq_len: lower it (0 = all rows)")


def check_examples(domain: str, n_tokens: int, seq_len: int, n: int) -> None:
    """UserError unless a train split of `n_tokens` tokens holds `n` rows (n = 0: all, always fine)."""
    if n and n > num_rows(n_tokens, seq_len):
        raise UserError(too_few_rows(domain, n, num_rows(n_tokens, seq_len)))
