"""mode_jax/pipeline/gate_analysis.py: the statistics on hand-computed gate weights, the eval pass
against ref/'s gate probabilities, and a smoke uninit run analysed end to end, whose stage-2
trace replays the run (its last point is the saved model's routing)."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from mode_jax.cli import main
from mode_jax.fast.config import FastConfig
from mode_jax.fast.params import to_fast
from mode_jax.pipeline import gate_analysis as G
from mode_jax.pipeline import sources
from mode_jax.ref import costs
from mode_jax.ref.config import LlamaConfig, ModeConfig
from mode_jax.ref.mode import mode_hidden
from tests.test_fast_params import random_params
from tests.tolerances import APPROX_FLOAT64, PROBABILITY_SUM, assert_close

# Three tokens, E = 3 (backbone, expert 1, expert 2), no ties among a row's expert columns.
P = np.array([[0.7, 0.2, 0.1],
              [0.2, 0.3, 0.5],
              [0.1, 0.6, 0.3]])


def test_gate_stats_by_hand():
    out = G.gate_stats([P, np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [1 / 3, 1 / 3, 1 / 3]])], own=1, top_k=2)
    # Block 0 entropy: mean over rows of -sum p ln p.
    h = lambda row: -sum(x * np.log(x) for x in row if x > 0)       # noqa: E731
    assert out["entropy"][0] == pytest.approx(np.mean([h(r) for r in P]), **APPROX_FLOAT64)
    # Block 1: one-hot (0), a half-half row (ln 2), uniform (ln 3): mean ln(6) / 3.
    assert out["entropy"][1] == pytest.approx(np.log(6) / 3, **APPROX_FLOAT64)
    # Own expert (column 1) largest among the experts: rows 0 and 2, not row 1 -> 2/3.
    assert out["own_top_share"][0] == pytest.approx(2 / 3, **APPROX_FLOAT64)
    # Backbone largest overall: row 0 only.
    assert out["backbone_top"][0] == pytest.approx(1 / 3, **APPROX_FLOAT64)
    # Top-2 sets {0, 1}, {2, 1}, {1, 2}: backbone 1/3, expert 1 all, expert 2 2/3 (rows sum to k = 2).
    assert out["selected"][0] == pytest.approx([1 / 3, 1.0, 2 / 3], **APPROX_FLOAT64)
    assert out["mean_routing"][0] == pytest.approx(P.mean(0).tolist(), **APPROX_FLOAT64)
    # Top-1 (the default k): each token's argmax 0, 2, 1.
    assert G.gate_stats([P], own=2)["selected"][0] == pytest.approx([1 / 3] * 3, **APPROX_FLOAT64)
    assert G.gate_stats([P], own=None)["own_top_share"] is None


def test_gate_probs_match_ref():
    cfg = LlamaConfig.tiny()
    mode = ModeConfig(n_blocks=2, expert_layers=1, n_experts=2)
    params = random_params("uninit", 3, cfg, mode)
    rows = np.random.default_rng(4).integers(0, cfg.vocab_size, (4, 7)).astype(np.int32)
    got = G.gate_probs(to_fast(params), rows, cfg, FastConfig.exact(), batch_size=2)
    _, want = mode_hidden(params, rows[:, :-1], cfg, return_probs=True)
    for g, w in zip(got, want):
        assert g.shape == (4 * 6, 3)
        assert_close(g, np.asarray(w).reshape(-1, 3))


@pytest.mark.slow
def test_analysis_and_trace_of_an_uninit_run(tmp_path):
    run = tmp_path / "uninit"
    assert main(["compose", "--uninit", "--domains", "math", "code", "--preset", "smoke", "--steps", "4",
                 "--out", str(run), "--quiet"]) == 0
    report = G.run_analysis(run, tmp_path / "analysis", trace_every=2)
    assert (tmp_path / "analysis" / "gate_analysis.png").stat().st_size > 0
    saved = json.loads((tmp_path / "analysis" / "gate_analysis.json").read_text())
    assert saved["columns"] == ["backbone", "math", "code"] and set(saved["domains"]) == {"math", "code", "english"}
    result = json.loads((run / "result.json").read_text())
    for d, stats in report["domains"].items():
        # The eval pass is the run's own evaluation: same mean routing as result.json.
        np.testing.assert_allclose(stats["mean_routing"], result["domains"][d]["routing"], **PROBABILITY_SUM)
        assert (stats["own_top_share"] is None) == (d == "english")
        assert all(0 <= h <= np.log(3) for h in stats["entropy"])
        # Sparse dispatch FLOPs from the measured top-1 selection (dense run: each token's largest weight).
        smoke = sources.tiny_config(d_model=32, n_layers=4, vocab_size=259)     # the smoke preset's backbone
        want = costs.dispatch_flops(smoke, ModeConfig(n_blocks=2, expert_layers=1, n_experts=2), 32,
                                    selected=stats["selected"])
        assert report["sparse_dispatch"][d] == pytest.approx(want, **APPROX_FLOAT64)
    trace = report["trace"]
    assert [p["step"] for p in trace] == [0, 2, 4]
    # Step 0: the backbone-favouring gate init (zero weights, margin 4): a_bb = e^4 / (e^4 + 2) for every token.
    assert_close(np.asarray(trace[0]["routing"]["math"])[:, 0], np.full(2, np.e**4 / (np.e**4 + 2)))
    # The replay ends at the saved model: its routing on the probe rows (the first 4 eval rows).
    assert saved["gate_top_k"] is None
    from mode_jax.pipeline import expert_io, presets
    pcfg = sources.resolve_domains(presets.load_config(config=str(run / "config.toml")))
    ctx_bb = sources.load_backbone(pcfg, sources.synthetic_data(pcfg.eval_domains, pcfg.data.synthetic_documents,
                                                                pcfg.train.seed).vocab_size, progress=False)
    params, _, _ = expert_io.load_model(run / "model.safetensors", ctx_bb.params, fingerprint=ctx_bb.fingerprint)
    data = sources.synthetic_data(pcfg.eval_domains, pcfg.data.synthetic_documents, pcfg.train.seed)
    rows = sources.eval_rows(data.test["code"], pcfg.data.seq_len, pcfg.data.eval_sequences, domain="code")[:4]
    _, probs = mode_hidden(jax.tree.map(np.asarray, params), rows[:, :-1], ctx_bb.config, return_probs=True)
    assert_close(trace[-1]["routing"]["code"], [np.asarray(p).mean((0, 1)) for p in probs])
