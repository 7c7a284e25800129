"""The #13 MoDE variants through `mode-jax sweep` on the smoke preset: the capacity control
(uninit with mode.n_experts = 1 and expert_layers doubled: one expert as large as two, on the
mixture) and top-k gating (mode.gate_top_k = 1), each checked against what it must be: the
trained parameter count of the param tree ref/ builds, and the recorded accuracy against
ref/'s evaluation of the saved model with the top-1 gate."""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest

import mode_jax
from mode_jax.cli import main
from mode_jax.export import load_run
from mode_jax.pipeline import engine, expert_io, presets, sources
from mode_jax.ref.methods import METHODS, apply, init_method, partition
from mode_jax.ref.train import batch_metrics
from tests.tolerances import PROBABILITY_SUM, assert_close

GRID = """
[sweep]
base = "smoke"
seeds = [0]
set = { "train.steps" = 4, "train.checkpoint_every" = 0 }

[[sweep.cell]]
name = "capacity"
method = "uninit"
"mode.n_experts" = 1
"mode.expert_layers" = 2

[[sweep.cell]]
name = "top1"
method = "uninit"
"mode.gate_top_k" = 1
"""


@pytest.mark.slow
def test_capacity_control_and_top_k_cells(tmp_path):
    grid = tmp_path / "grid.toml"
    grid.write_text(GRID)
    out = tmp_path / "sweep"
    assert main(["sweep", str(grid), "--out", str(out), "--quiet", "--keep-models"]) == 0
    records = {r["name"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    cfg = sources.resolve_domains(presets.load_config(preset="smoke"))
    ctx_backbone = sources.load_backbone(cfg, sources.synthetic_data(cfg.eval_domains, cfg.data.synthetic_documents,
                                                                    cfg.train.seed).vocab_size, progress=False)

    cap = records["capacity"]["result"]
    assert cap["label"] == "mode-1x-uninit" and cap["routing_columns"] == ["backbone", "expert-1"]
    # Trained parameters: those of the param tree ref/ builds for one 2-layer expert, and equal
    # to MoDE 2x uninit's (two 1-layer experts) but for the one gate column fewer per block.
    def trained(mode_cfg):
        params = init_method("uninit", jax.random.key(0), ctx_backbone.params, ctx_backbone.config, mode=mode_cfg)
        return engine.param_count(partition(params, METHODS["uninit"])[0])
    one_big = trained(sources.mode_config(dataclasses.replace(cfg, mode=dataclasses.replace(cfg.mode, expert_layers=2)), 1))
    two_small = trained(sources.mode_config(cfg, 2))
    assert cap["params_trainable"] == one_big
    assert two_small - one_big == cfg.mode.n_blocks * (cfg.model.tiny_d_model + 1)
    for d, v in cap["domains"].items():
        assert np.asarray(v["routing"]).shape == (cfg.mode.n_blocks, 2)

    top1 = records["top1"]
    assert top1["config"]["mode"]["gate_top_k"] == 1
    run_dir = out / top1["run_dir"]
    params, method, _ = expert_io.load_model(run_dir / "model.safetensors", ctx_backbone.params,
                                             fingerprint=ctx_backbone.fingerprint)
    assert method == "uninit"
    data = sources.synthetic_data(cfg.eval_domains, cfg.data.synthetic_documents, cfg.train.seed)
    for d in cfg.eval_domains:
        rows = sources.eval_rows(data.test[d], cfg.data.seq_len, cfg.data.eval_sequences, domain=d)
        m = batch_metrics(params, {"tokens": rows}, ctx_backbone.config, with_routing=True, gate_top_k=1)
        got = top1["result"]["domains"][d]
        n_tok = rows.shape[0] * (rows.shape[1] - 1)
        assert got["accuracy"] == pytest.approx(float(m["accuracy"]), abs=0.5 / n_tok)   # a count of tokens
        routing = np.asarray(got["routing"])
        np.testing.assert_allclose(routing, np.asarray(m["routing"]), **PROBABILITY_SUM)
        # and not the dense gate's (means of softmax rows, not of one-hot ones)
        dense = batch_metrics(params, {"tokens": rows}, ctx_backbone.config, with_routing=True)["routing"]
        assert np.max(np.abs(routing - np.asarray(dense))) > 1e-3
    # A loaded run serves its top-1 gate (export.load_run), and so does generation (mode_jax.load; its
    # decoding is checked in tests/test_top_k_decode.py).
    loaded = load_run(run_dir)
    assert loaded.gate_top_k == 1
    assert_close(loaded.logits(rows[:2, :-1]), apply(params, rows[:2, :-1], ctx_backbone.config, gate_top_k=1))
    model = mode_jax.load(run=str(run_dir))
    assert model.gate_top_k == 1
    assert np.all(np.count_nonzero(model.routing("1 + 2 = 3"), axis=-1) == 1)
