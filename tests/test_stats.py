"""Intervals and paired comparisons (mode_jax/pipeline/stats.py) against independent references,
and the per-row / per-document counts evaluation feeds them (engine.evaluate, eval_units)."""

from __future__ import annotations

import numpy as np
import pytest

from mode_jax.pipeline import engine, eval_units, presets, sources, stages, stats
from mode_jax.ref.config import OptimConfig
from tests import numpy_llama
from tests.tolerances import APPROX_FLOAT64, MONTE_CARLO, assert_close


# ----------------------------------------------------------------------------- bootstrap

def test_one_document_pair_matches_exact_bootstrap_distribution():
    # One seed, two documents: y = [1, 3] of n = [2, 4]. A bootstrap draw takes document 0
    # twice (p 1/4: accuracy 1/2), both once (p 1/2: 4/6) or document 1 twice (p 1/4: 3/4).
    # Exact replicate mean 0.25*0.5 + 0.5*(2/3) + 0.25*0.75 = 0.6458..; sd from E[x^2].
    values, probs = np.array([0.5, 4 / 6, 0.75]), np.array([0.25, 0.5, 0.25])
    sd = np.sqrt(probs @ values**2 - (probs @ values) ** 2)
    iv = stats.bootstrap_accuracy([1, 3], [2, 4], n_boot=20000, seed=1)
    assert iv.estimate == 4 / 6
    assert (iv.low, iv.high) == (0.5, 0.75)            # 2.5% and 97.5% fall inside the end atoms
    np.testing.assert_allclose(iv.se, sd, **MONTE_CARLO)


def test_two_seeds_one_document_resamples_seeds():
    # Seeds with accuracies 0.2 and 0.6 on one document: a replicate is the mean of two seeds
    # drawn with replacement: 0.2 (p 1/4), 0.4 (p 1/2), 0.6 (p 1/4); sd = 0.2 / sqrt(2).
    iv = stats.bootstrap_accuracy([[1], [3]], [5], n_boot=20000, seed=2)
    assert iv.estimate == pytest.approx(0.4, **APPROX_FLOAT64)
    assert (iv.low, iv.high) == pytest.approx((0.2, 0.6), **APPROX_FLOAT64)
    np.testing.assert_allclose(iv.se, 0.2 / np.sqrt(2), **MONTE_CARLO)


def test_one_seed_bootstrap_se_approaches_analytic_clustered_se():
    # iid documents of equal size with heterogeneous difficulty: the cluster bootstrap's SE is
    # the sandwich SE times sqrt((C - 1) / C).
    rng = np.random.default_rng(3)
    c, size = 400, 50
    p = rng.beta(2, 3, size=c)
    y = rng.binomial(size, p)
    analytic = stats.clustered_se(y, np.full(c, size))
    # the formula by hand: ratio estimator, clusters independent
    acc = y.sum() / (c * size)
    assert analytic == pytest.approx(np.sqrt(c / (c - 1) * np.sum((y - acc * size) ** 2)) / (c * size),
                                     **APPROX_FLOAT64)
    iv = stats.bootstrap_accuracy(y, np.full(c, size), n_boot=20000, seed=4)
    np.testing.assert_allclose(iv.se, analytic * np.sqrt((c - 1) / c), **MONTE_CARLO)
    # and it is far above the binomial SE that treats tokens as independent
    assert iv.se > 2 * np.sqrt(acc * (1 - acc) / (c * size))


def test_crossed_documents_are_not_averaged_away_by_seeds():
    # Three identical seeds: no seed noise, the same documents. The interval must equal the
    # one-seed interval (drawing documents per seed would shrink it by sqrt(3)).
    rng = np.random.default_rng(5)
    y = rng.binomial(40, rng.beta(2, 2, size=120))
    one = stats.bootstrap_accuracy(y, np.full(120, 40), n_boot=4000, seed=6)
    three = stats.bootstrap_accuracy(np.stack([y] * 3), np.full(120, 40), n_boot=4000, seed=6)
    np.testing.assert_allclose(three.se, one.se, **MONTE_CARLO)
    nested = stats.bootstrap_accuracy([y] * 3, [np.full(120, 40)] * 3, shared_documents=False, n_boot=4000, seed=6)
    np.testing.assert_allclose(nested.se, one.se / np.sqrt(3), **MONTE_CARLO)


def _methods(effect: float, seed: int, n_seeds=3, c=150, size=60):
    """Two methods on the same seeds and documents; b = a's per-document skill + effect."""
    rng = np.random.default_rng(seed)
    skill = rng.beta(2, 2, size=c)
    seed_shift = rng.normal(0, 0.01, size=(n_seeds, 1))
    pa = np.clip(skill + seed_shift, 0, 1)
    pb = np.clip(skill + seed_shift + effect, 0, 1)
    return rng.binomial(size, pa), rng.binomial(size, pb), np.full(c, size)


def test_paired_difference_detects_a_known_difference():
    ya, yb, n = _methods(0.03, seed=7)
    d = stats.paired_difference(yb, n, ya, n, seed=0)
    assert d.estimate == pytest.approx(stats.accuracy(yb, n) - stats.accuracy(ya, n), **APPROX_FLOAT64)
    assert d.excludes_zero and d.low > 0
    assert d.low < 0.03 < d.high
    # pairing removes the shared document noise: the unpaired SEs add up to far more
    unpaired = np.hypot(stats.bootstrap_accuracy(ya, n).se, stats.bootstrap_accuracy(yb, n).se)
    assert d.se < unpaired / 3


def test_paired_difference_null_includes_zero():
    ya, yb, n = _methods(0.0, seed=8)
    d = stats.paired_difference(yb, n, ya, n, seed=0)
    assert d.low < 0 < d.high and not d.excludes_zero
    same = stats.paired_difference(ya, n, ya, n, seed=0)
    assert (same.estimate, same.low, same.high, same.excludes_zero) == (0.0, 0.0, 0.0, False)


def test_fixed_seed_reproduces_and_bad_counts_are_refused():
    ya, yb, n = _methods(0.01, seed=9)
    assert stats.paired_difference(ya, n, yb, n, seed=3) == stats.paired_difference(ya, n, yb, n, seed=3)
    with pytest.raises(ValueError, match="correct <= tokens"):
        stats.bootstrap_accuracy([3, 1], [2, 4])
    with pytest.raises(ValueError, match="same seeds and documents"):
        stats.paired_difference(ya[:2], n, yb, n)


# ----------------------------------------------------------------------------- per-document counts

def test_document_ids_by_hand():
    # EOS = 2. Stream positions: 0:5 1:6 2:EOS 3:7 4:8 5:9 6:EOS 7:4 8:EOS 9:3 10:3; seq_len 3
    # -> rows at offsets 0, 3, 6. A target at position p belongs to document #(EOS before p).
    stream = np.array([5, 6, 2, 7, 8, 9, 2, 4, 2, 3, 3], np.uint16)
    rows = np.array([[2, 4, 2, 3], [5, 6, 2, 7]], np.int32)          # offsets 6 and 0, out of order
    ids, unit = eval_units.document_ids(stream, rows, 3, separator=2)
    assert unit == "document"
    assert ids.tolist() == [[2, 2, 3], [0, 0, 1]]
    assert eval_units.row_offsets(stream, rows, 3).tolist() == [6, 0]
    foreign = np.array([[5, 6, 2, 8]], np.int32)
    ids, unit = eval_units.document_ids(stream, foreign, 3, separator=2)
    assert unit == "row" and ids.tolist() == [[0, 0, 0]]


def test_evaluate_counts_match_a_float64_numpy_model():
    cfg = presets.load_config(preset="smoke", overrides=["data.eval_sequences=4", "data.eval_batch_size=2"])
    ctx = stages.prepare(cfg, cfg.domains.targets, progress=False)
    params = {"backbone": ctx.backbone.params}
    npp = numpy_llama.to_numpy(params["backbone"])
    by_backend = {}
    for backend in ("ref", "fast"):
        steps = engine.make_steps("full", ctx.llama, opt=OptimConfig(), backend=backend)
        by_backend[backend] = engine.evaluate(steps, params, {"code": ctx.eval_sets["code"]}, batch_size=2,
                                              progress=False, separator=ctx.separator,
                                              documents={"code": ctx.eval_documents["code"]})["code"]
    rows = ctx.eval_sets["code"]
    targets = rows[:, 1:]
    keep = targets != ctx.separator
    logits = np.stack([numpy_llama.llama_logits(npp, r[:-1], ctx.llama) for r in rows])   # [n, T, V] float64
    correct = logits.argmax(-1) == targets
    top2 = np.sort(logits, axis=-1)[..., -2:]
    near_tie = (top2[..., 1] - top2[..., 0]) < 1e-4                     # float32 may break these either way
    ids, unit = ctx.eval_documents["code"]
    assert unit == "document" and 0 < (~keep).sum() < keep.size        # rows do cross documents
    for backend, got in by_backend.items():
        per_row = got["per_row"]
        assert per_row["tokens"] == keep.sum(axis=1).tolist()
        diff = np.abs(np.array(per_row["correct"]) - (correct & keep).sum(axis=1))
        assert (diff <= (near_tie & keep).sum(axis=1)).all(), backend
        doc = got["per_document"]
        assert doc["ids"] == np.unique(ids[keep]).tolist()
        assert doc["tokens"] == [int((ids[keep] == i).sum()) for i in doc["ids"]]
        assert sum(doc["correct"]) == sum(per_row["correct"])
        # today's all-token accuracy is unchanged and agrees with the per-token counts
        n_all = targets.size
        assert got["tokens"] == n_all
        assert got["accuracy_content"] == pytest.approx(sum(per_row["correct"]) / keep.sum(), **APPROX_FLOAT64)
    assert by_backend["ref"]["per_row"]["correct"] == by_backend["fast"]["per_row"]["correct"]
    assert_close(np.array(by_backend["fast"]["per_row"]["nll"]), np.array(by_backend["ref"]["per_row"]["nll"]),
                 np.float32, scale=10)
    nll64 = (np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
             - np.take_along_axis(logits, targets[..., None], -1)[..., 0])
    assert_close(np.array(by_backend["ref"]["per_row"]["nll"]), np.where(keep, nll64, 0).sum(1), np.float32,
                 scale=10)


def test_eval_rows_of_synthetic_data_map_to_documents():
    cfg = presets.load_config(preset="smoke")
    data = sources.synthetic_data(cfg.eval_domains, cfg.data.synthetic_documents, cfg.train.seed)
    for d in cfg.eval_domains:
        rows = sources.eval_rows(data.test[d], cfg.data.seq_len, cfg.data.eval_sequences)
        ids, unit = eval_units.document_ids(data.test[d], rows, cfg.data.seq_len, eval_units.separator_id(cfg))
        assert unit == "document"
        stream = np.asarray(data.test[d])
        doc_of = np.concatenate([[0], np.cumsum(stream == 2)[:-1]])     # EOS strictly before each position
        offsets = eval_units.row_offsets(stream, rows, cfg.data.seq_len)
        for r in range(rows.shape[0]):
            start = offsets[r] + 1
            assert rows[r].tolist() == stream[offsets[r]:offsets[r] + cfg.data.seq_len + 1].tolist()
            assert ids[r].tolist() == doc_of[start:start + cfg.data.seq_len].tolist()


def test_average_over_domains():
    rng = np.random.default_rng(10)
    y1, y2 = rng.binomial(30, rng.beta(2, 2, size=200)), rng.binomial(30, rng.beta(5, 2, size=120))
    n1, n2 = np.full(200, 30), np.full(120, 30)
    # one domain: the same draws, so exactly bootstrap_accuracy's interval
    one = stats.average_over_domains([(y1, n1)], n_boot=3000, seed=4)
    assert one == stats.bootstrap_accuracy(y1, n1, n_boot=3000, seed=4)
    # two domains, one seed: documents drawn independently per domain, so
    # SE(mean) = sqrt(se1^2 + se2^2) / 2
    both = stats.average_over_domains([(y1, n1), (y2, n2)], n_boot=20000, seed=5)
    assert both.estimate == pytest.approx((y1.sum() / n1.sum() + y2.sum() / n2.sum()) / 2, **APPROX_FLOAT64)
    se1, se2 = stats.clustered_se(y1, n1), stats.clustered_se(y2, n2)
    np.testing.assert_allclose(both.se, np.hypot(se1 * np.sqrt(199 / 200), se2 * np.sqrt(119 / 120)) / 2,
                               **MONTE_CARLO)
    # paired: a - a is exactly zero; a known shift shows
    zero = stats.average_over_domains([(y1, n1), (y2, n2)], [(y1, n1), (y2, n2)], n_boot=500)
    assert (zero.estimate, zero.low, zero.high) == (0.0, 0.0, 0.0)
    ya, yb, n = _methods(0.03, seed=11)
    d = stats.average_over_domains([(yb, n), (yb, n)], [(ya, n), (ya, n)], n_boot=2000)
    assert d.excludes_zero and d.estimate == pytest.approx(stats.accuracy(yb, n) - stats.accuracy(ya, n),
                                                           **APPROX_FLOAT64)


# ----------------------------------------------------------------------------- the reproduce table

def test_reproduce_table_clusters_its_standard_error_by_document():
    from mode_jax.pipeline import report
    # Three documents: y = [3, 1, 8] correct of n = [4, 4, 10] tokens, p = 12/18 = 2/3.
    # Residuals y - p n = [1/3, -5/3, 4/3]; sum of squares 42/9; C/(C-1) = 3/2;
    # SE = sqrt(3/2 * 42/9) / 18 = sqrt(7) / 18 = 0.14699 (14.70 points).
    docs = {"correct": [3, 1, 8], "tokens": [4, 4, 10], "ids": [0, 1, 2], "unit": "document"}
    row = {"label": "full-ft", "params_total": 10, "params_trainable": 10, "train_steps": 1, "train_seconds": 1.0,
           "domains": {"math": {"accuracy": 12 / 18, "loss": 1.0, "tokens": 18, "per_document": docs},
                       "code": {"accuracy": 0.5, "loss": 1.0, "tokens": 100}}}
    table = report.build_table([row], ["math", "code"])
    r = table["rows"][0]
    assert r["accuracy_se"]["math"] == pytest.approx(100 * np.sqrt(7) / 18, **APPROX_FLOAT64)
    assert r["accuracy_se_kind"] == {"math": "document", "code": "binomial"}
    # an older result without per-document counts: the binomial SE over tokens, sqrt(p(1-p)/n)
    assert r["accuracy_se"]["code"] == pytest.approx(100 * np.sqrt(0.25 / 100), **APPROX_FLOAT64)
    assert "binomial where a result has no per-document counts" in report.noise_note(table)
