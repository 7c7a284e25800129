"""Block expansion end to end on the smoke preset (tiny random backbone, synthetic domains):
one `mode-jax sweep` cell (train a few steps, evaluate, record), the saved model read back
through expert_io's checked format and evaluated again independently (fast/'s float32
logits, NumPy loss and accuracy), `eval --run` on the cell's run giving the recorded
numbers, `export --to hf` giving a deeper Llama that transformers itself loads with the same
logits (Python 3.11 env), a depth that `expansion.every` does not divide refused before
anything is written, and the sweep identity of runs that predate [expansion] unchanged."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mode_jax.cli import main
from mode_jax.export import load_run
from mode_jax.fast import model
from mode_jax.fast.config import FastConfig
from mode_jax.fast.params import to_fast
from mode_jax.pipeline import engine, expert_io, presets, sources, sweep
from mode_jax.ref.expansion import ExpansionConfig, expansion_param_count
from mode_jax.ref.methods import METHODS, init_method, partition
from tests.crosscheck_setup import py311  # noqa: F401 (fixture)
from tests.helpers import assert_refused
from tests.test_crosscheck_arch import run_reference
from tests.tolerances import APPROX_FLOAT64, assert_close

EVERY = 2
GRID = f"""
[sweep]
base = "smoke"
seeds = [0]
set = {{ "train.steps" = 3, "train.checkpoint_every" = 0 }}

[[sweep.cell]]
method = "block_expansion"
lr = 3e-3
"expansion.every" = {EVERY}
"""


@pytest.fixture(scope="module")
def cell(tmp_path_factory):
    root = tmp_path_factory.mktemp("expansion")
    (root / "grid.toml").write_text(GRID)
    out = root / "sweep"
    assert main(["sweep", str(root / "grid.toml"), "--out", str(out), "--quiet", "--keep-models"]) == 0
    [record] = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    cfg = sources.resolve_domains(presets.load_config(preset="smoke", overrides=[f"expansion.every={EVERY}"]))
    data = sources.synthetic_data(cfg.eval_domains, cfg.data.synthetic_documents, cfg.train.seed)
    backbone = sources.load_backbone(cfg, data.vocab_size, progress=False)
    return record, out / record["run_dir"], cfg, data, backbone


@pytest.mark.slow
def test_recorded_run_trains_the_new_layers_only(cell):
    record, run_dir, cfg, _, backbone = cell
    result = record["result"]
    assert record["method"] == "block_expansion" and result["label"] == f"block-expansion-k{EVERY}"
    assert record["config"]["lr"]["expansion"] == 3e-3 and result["train_steps"] == 3
    llama = backbone.config                                             # 4 layers: new ones after 1 and 3
    assert result["expansion"] == {"every": EVERY, "new_layers": 2, "after_backbone_layers": [1, 3],
                                   "params_new": expansion_param_count(llama, ExpansionConfig(EVERY))}
    fresh = init_method("block_expansion", jax.random.key(0), backbone.params, llama,
                        expansion=ExpansionConfig(EVERY))
    assert result["params_trainable"] == engine.param_count(partition(fresh, METHODS["block_expansion"])[0])
    assert result["params_trainable"] == result["expansion"]["params_new"]
    assert result["params_total"] == engine.param_count(backbone.params) + result["params_trainable"]

    params, method, info = expert_io.load_model(run_dir / "model.safetensors", backbone.params,
                                                fingerprint=backbone.fingerprint)
    assert method == "block_expansion" and info["label"] == result["label"]
    assert set(params) == {"backbone", "expansion"} and len(params["expansion"]["layers"]) == 2
    for new, start in zip(params["expansion"]["layers"], fresh["expansion"]["layers"]):
        for key in ("wo", "w_down", "wq", "w_gate"):
            # Trained: wo and w_down left zero at step 1, the rest at step 2.
            assert not np.array_equal(new[key], np.asarray(start[key])), key


@pytest.mark.slow
def test_recorded_accuracy_equals_an_independent_evaluation(cell):
    record, run_dir, cfg, data, backbone = cell
    params, _, _ = expert_io.load_model(run_dir / "model.safetensors", backbone.params,
                                        fingerprint=backbone.fingerprint)
    fast_params = to_fast(jax.tree.map(jnp.asarray, params))
    for d in cfg.eval_domains:
        rows = sources.eval_rows(data.test[d], cfg.data.seq_len, cfg.data.eval_sequences, domain=d)
        logits = np.asarray(model.logits(fast_params, jnp.asarray(rows[:, :-1]), backbone.config,
                                         FastConfig.exact()), np.float64)
        targets = rows[:, 1:]
        top = logits.max(-1, keepdims=True)
        nll = np.log(np.exp(logits - top).sum(-1)) + top[..., 0] - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
        got = record["result"]["domains"][d]
        assert_close(got["loss"], nll.mean(), dtype=jnp.float32, scale=2, err_msg=d)
        assert got["accuracy"] == pytest.approx(float((logits.argmax(-1) == targets).mean()), **APPROX_FLOAT64)


@pytest.mark.slow
def test_eval_run_gives_the_recorded_numbers(cell, tmp_path, capsys):
    record, run_dir, *_ = cell
    assert main(["eval", "--run", str(run_dir), "--out", str(tmp_path / "eval"), "--quiet"]) == 0
    again = json.loads((tmp_path / "eval" / "result.json").read_text())
    assert again["method"] == "block_expansion"
    for d, v in record["result"]["domains"].items():
        assert again["domains"][d]["accuracy"] == pytest.approx(v["accuracy"], **APPROX_FLOAT64)
        assert again["domains"][d]["loss"] == pytest.approx(v["loss"], rel=1e-6)


@pytest.mark.slow
def test_export_is_the_deeper_llama_in_transformers(cell, tmp_path, capsys, py311):  # noqa: F811
    _, run_dir, _, _, backbone = cell
    assert_refused(capsys, ["export", "--run", str(run_dir), "--to", "peft", str(tmp_path / "peft")],
                   tmp_path / "peft", "block-expansion run", "use --to hf")
    out = tmp_path / "hf"
    assert main(["export", "--run", str(run_dir), "--to", "hf", str(out), "--quiet"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 6 and config["architectures"] == ["LlamaForCausalLM"]
    ours = load_run(run_dir)
    tok = np.random.default_rng(12).integers(0, backbone.config.vocab_size, (2, 12))
    work = tmp_path / "theirs"
    work.mkdir()
    run_reference(py311, {"load": [{"name": "expanded", "kind": "hf", "dir": str(out), "tokens": tok.tolist()}]}, work)
    want = ours.logits(tok)
    assert_close(np.load(work / "out" / "expanded.npy"), want, scale=2)
    # The trained new layers matter: the backbone alone is far off.
    plain = np.asarray(model.logits(to_fast({"backbone": ours.params["backbone"]}), jnp.asarray(tok, jnp.int32),
                                    backbone.config, FastConfig.exact()))
    assert np.abs(plain - want).max() > 1e-3


def test_every_that_does_not_divide_the_depth_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert_refused(capsys, ["finetune", "--method", "block_expansion", "--preset", "smoke", "--set",
                            "expansion.every=3", "--out", str(out), "--quiet"], out,
                   "expansion.every=3 must divide the backbone's 4 layers (one of 1, 2, 4)")


def test_sweep_identity_of_earlier_runs_is_unchanged():
    """Runs recorded before [expansion] and lr.expansion existed keep their identity (their
    results still count as done); a run that sets them is another run."""
    default = sweep.identity(presets.load_config(preset="smoke"))
    assert "expansion" not in default and "expansion" not in default["lr"]
    changed = sweep.identity(presets.load_config(preset="smoke", overrides=["expansion.every=2", "lr.expansion=0.01"]))
    assert changed["expansion"] == {"every": 2} and changed["lr"]["expansion"] == 0.01
