"""scripts/separator_check.py's counting: separator targets left out under either candidate, pooled
accuracies and the paired row bootstrap against a hand computation."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from tests.tolerances import APPROX_FLOAT64

_spec = importlib.util.spec_from_file_location(
    "separator_check", Path(__file__).resolve().parents[1] / "scripts" / "separator_check.py")
check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check)


def test_row_counts_leave_out_the_separator():
    rng = np.random.default_rng(5)
    rows = rng.integers(3, 50, size=(6, 9))
    rows[rows % 7 == 0] = 2                                    # separators scattered through the rows
    truth = rng.random((6, 8)) < 0.6                           # what the stub "model" gets right

    def eval_step(params, tokens):                             # tokens [B, T+1] -> per-target correctness
        i = next(k for k in range(6) if np.array_equal(np.asarray(tokens)[0], rows[k]))
        hit = truth[i:i + tokens.shape[0]]
        return {"token_correct": hit, "token_nll": np.zeros(hit.shape), "loss": 0.0,
                "accuracy": float(hit.mean()), "routing": None}

    steps = SimpleNamespace(eval_step=eval_step, to_backend=lambda p: p)
    correct, counted = check.row_counts(steps, None, rows, 2, batch=2)
    keep = rows[:, 1:] != 2
    np.testing.assert_array_equal(counted, keep.sum(axis=1))
    np.testing.assert_array_equal(correct, (truth & keep).sum(axis=1))
    assert (rows[:, 1:] == 2).any() and counted.sum() < keep.size      # something was left out


def test_paired_interval_by_hand():
    rng = np.random.default_rng(9)
    n = rng.integers(50, 200, size=12)
    ya, yb = rng.binomial(n, 0.6), rng.binomial(n, 0.5)
    est, low, high = check.paired_interval(ya, n, yb, n, n_boot=500, seed=3)
    assert est == pytest.approx(ya.sum() / n.sum() - yb.sum() / n.sum(), **APPROX_FLOAT64)
    # the same replicates by hand: rows drawn with replacement (multiplicities), both candidates
    # on the same draw (the one seed's draw comes first, as in stats._replicates)
    draws = np.random.default_rng(3)
    draws.integers(0, 1, size=(500, 1))
    w = draws.multinomial(12, np.full(12, 1 / 12), size=500).astype(float)
    reps = (w @ ya) / (w @ n) - (w @ yb) / (w @ n)
    assert (low, high) == pytest.approx(tuple(np.percentile(reps, [2.5, 97.5])), **APPROX_FLOAT64)
    assert low < est < high
