"""Accuracy with honest 95% intervals, and paired comparisons of two methods (pure NumPy).

The data: for each seed s and test document (cluster) c, the number of correctly
predicted targets y[s, c] out of n[s, c] counted targets (engine.evaluate's
`per_document`). A method's accuracy is the mean over seeds of the pooled accuracy
on the test set, sum_c y[s, c] / sum_c n[s, c].

Tokens of one document are correlated (a memorised chapter is right everywhere), so
tokens cannot be resampled one by one: the bootstrap resamples whole documents. Seeds
are a second, crossed source of noise: every seed is evaluated on the same documents,
so one bootstrap replicate draws seeds with replacement and one multiset of documents
with replacement, and applies that same document multiset to every drawn seed (the
documents are shared by the seeds, not nested in them; drawing documents afresh per
seed would shrink the document noise by the number of seeds). Where each seed has its
own test documents (the synthetic data is drawn per seed), documents are nested in
seeds and are drawn afresh within each drawn seed (`shared_documents=False`). With one
seed both are the ordinary cluster bootstrap.

A paired comparison applies the same drawn seeds and documents to both methods, so
what the two share (a hard document, a lucky seed) cancels in the difference.
Intervals are percentile intervals; the RNG seed is fixed so a report is reproducible.
"""

from __future__ import annotations

import dataclasses

import numpy as np

N_BOOT = 2000          # replicates: percentile ends move by ~0.1 SE between RNG seeds
LEVEL = 0.95


@dataclasses.dataclass(frozen=True)
class Interval:
    estimate: float        # the statistic on the data as observed
    low: float             # percentile interval of the bootstrap replicates
    high: float
    se: float              # standard deviation of the replicates
    n_seeds: int
    n_units: int           # documents (clusters) resampled

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0.0 or self.high < 0.0

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "excludes_zero": self.excludes_zero}


def _as_counts(correct, tokens) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per seed, float64 correct and token counts per document, checked. `correct` is [S, C]
    (or [C]: one seed) or a list of S 1-D arrays (seeds evaluated on different documents);
    `tokens` has the same layout, or is [C] (the same for every seed)."""
    ragged = isinstance(correct, (list, tuple)) and len(correct) > 0 and np.ndim(correct[0]) == 1 \
        and len({len(c) for c in correct}) > 1
    ys = [np.asarray(c, np.float64) for c in correct] if ragged else list(np.atleast_2d(np.asarray(correct, np.float64)))
    if ragged:
        ns = [np.asarray(t, np.float64) for t in tokens]
    else:
        n = np.asarray(tokens, np.float64)
        ns = [n] * len(ys) if n.ndim == 1 else list(np.atleast_2d(n))
    if not ys or len(ns) != len(ys) or any(y.shape != n.shape or y.ndim != 1 or y.size == 0 for y, n in zip(ys, ns)):
        raise ValueError("correct and tokens must be counts per seed and document, non-empty and of equal shapes")
    for y, n in zip(ys, ns):
        if not (np.isfinite(y).all() and np.isfinite(n).all()) or (y < 0).any() or (y > n).any():
            raise ValueError("counts must be finite with 0 <= correct <= tokens")
        if n.sum() <= 0:
            raise ValueError("every seed needs at least one counted token")
    return ys, ns


def accuracy(correct, tokens) -> float:
    """Mean over seeds of the pooled accuracy sum_c y / sum_c n."""
    ys, ns = _as_counts(correct, tokens)
    return float(np.mean([y.sum() / n.sum() for y, n in zip(ys, ns)]))


def _replicates(pairs, n_boot: int, rng: np.random.Generator, shared: bool, seeds=None) -> list[np.ndarray]:
    """Bootstrap replicates [B] of each statistic in `pairs` (a list of (ys, ns) per method,
    all on the same seeds and documents), every method getting the same draws: seeds with
    replacement (or the given draws `seeds` [B, S]); documents with replacement, once for
    all seeds (`shared`) or afresh for each drawn seed (seeds evaluated on their own documents)."""
    n_seeds = len(pairs[0][0])
    if seeds is None:
        seeds = rng.integers(0, n_seeds, size=(n_boot, n_seeds))               # [B, S] drawn seeds
    sizes = [y.size for y in pairs[0][0]]
    if shared and len(set(sizes)) != 1:
        raise ValueError("shared documents need the same documents for every seed")

    def draw(c):                                                               # [B, C] multiplicities
        return rng.multinomial(c, np.full(c, 1.0 / c), size=n_boot).astype(np.float64)

    common = draw(sizes[0]) if shared else None
    out = [np.zeros(n_boot) for _ in pairs]
    for j in range(n_seeds):                                                   # slot j of each replicate
        per_seed = {s: common if shared else draw(sizes[s]) for s in range(n_seeds)}
        for k, (ys, ns) in enumerate(pairs):
            acc = np.empty((n_boot, n_seeds))
            for s in range(n_seeds):
                num, den = per_seed[s] @ ys[s], per_seed[s] @ ns[s]
                # A draw of only empty documents has no accuracy: use the seed's observed one.
                acc[:, s] = np.where(den > 0, num / np.maximum(den, 1e-300), ys[s].sum() / ns[s].sum())
            out[k] += acc[np.arange(n_boot), seeds[:, j]] / n_seeds
    return out


def _interval(estimate, reps, n_seeds, n_units, level) -> Interval:
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(reps, [tail, 100 - tail])
    return Interval(float(estimate), float(low), float(high), float(np.std(reps, ddof=1)), n_seeds, n_units)


def bootstrap_accuracy(correct, tokens, *, shared_documents: bool = True, n_boot: int = N_BOOT,
                       level: float = LEVEL, seed: int = 0) -> Interval:
    """Accuracy (mean over seeds of pooled accuracy) with a bootstrap over seeds and documents.
    shared_documents: every seed was evaluated on the same documents (crossed); False: each
    seed on its own (nested: documents are drawn afresh within each drawn seed)."""
    ys, ns = _as_counts(correct, tokens)
    (reps,) = _replicates([(ys, ns)], n_boot, np.random.default_rng(seed), shared_documents)
    return _interval(accuracy(ys, ns), reps, len(ys), int(np.mean([y.size for y in ys])), level)


def paired_difference(correct_a, tokens_a, correct_b, tokens_b, *, shared_documents: bool = True,
                      n_boot: int = N_BOOT, level: float = LEVEL, seed: int = 0) -> Interval:
    """accuracy(a) - accuracy(b), both measured on the same seeds (in the same order) and, per
    seed, the same documents; every replicate draws one set of seeds and documents for both.
    `excludes_zero` says whether the interval rules out no difference."""
    ya, na = _as_counts(correct_a, tokens_a)
    yb, nb = _as_counts(correct_b, tokens_b)
    if [y.shape for y in ya] != [y.shape for y in yb]:
        raise ValueError("a paired comparison needs the same seeds and documents for both methods")
    ra, rb = _replicates([(ya, na), (yb, nb)], n_boot, np.random.default_rng(seed), shared_documents)
    return _interval(accuracy(ya, na) - accuracy(yb, nb), ra - rb, len(ya), int(np.mean([y.size for y in ya])),
                     level)


def average_over_domains(per_domain, per_domain_b=None, *, shared_documents: bool = True,
                         n_boot: int = N_BOOT, level: float = LEVEL, seed: int = 0) -> Interval:
    """The mean over domains of the accuracy (or, given `per_domain_b`, of the paired difference
    a - b), each domain a (correct, tokens) pair as above, all on the same seeds. One draw of
    seeds serves every domain (a seed's luck is shared by its domains); documents are drawn
    per domain (each domain has its own test documents)."""
    a = [_as_counts(c, t) for c, t in per_domain]
    b = None if per_domain_b is None else [_as_counts(c, t) for c, t in per_domain_b]
    n_seeds = len(a[0][0])
    if any(len(ys) != n_seeds for ys, _ in a + (b or [])):
        raise ValueError("every domain must be measured on the same seeds")
    if b is not None and [[y.shape for y in ys] for ys, _ in a] != [[y.shape for y in ys] for ys, _ in b]:
        raise ValueError("a paired comparison needs the same seeds and documents for both methods")
    rng = np.random.default_rng(seed)
    seeds = rng.integers(0, n_seeds, size=(n_boot, n_seeds))
    reps, estimate = np.zeros(n_boot), 0.0
    for k, (ys, ns) in enumerate(a):
        pairs = [(ys, ns)] if b is None else [(ys, ns), b[k]]
        r = _replicates(pairs, n_boot, rng, shared_documents, seeds=seeds)
        reps += (r[0] if b is None else r[0] - r[1]) / len(a)
        estimate += (accuracy(ys, ns) - (0.0 if b is None else accuracy(*b[k]))) / len(a)
    return _interval(estimate, reps, n_seeds, int(sum(np.mean([y.size for y in ys]) for ys, _ in a)), level)


def clustered_se(correct, tokens) -> float:
    """Analytic standard error of one seed's pooled accuracy (a ratio estimator) with documents as
    independent clusters: sqrt(C / (C - 1) * sum_c (y_c - p n_c)^2) / sum_c n_c (the sandwich
    estimator with the usual small-sample factor). What the bootstrap approaches for one seed."""
    ys, ns = _as_counts(correct, tokens)
    if len(ys) != 1 or ys[0].size < 2:
        raise ValueError("clustered_se takes one seed and at least two documents")
    y, n = ys[0], ns[0]
    p = y.sum() / n.sum()
    c = y.size
    return float(np.sqrt(c / (c - 1) * np.sum((y - p * n) ** 2)) / n.sum())
