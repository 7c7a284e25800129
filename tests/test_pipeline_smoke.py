"""`mode-jax reproduce --preset smoke` end to end, through the CLI, and checks that its
table holds real numbers: the backbone row equals an independent evaluation with ref/,
accuracies are fractions of the eval tokens, parameter counts add up, routing weights
are distributions, and every training curve went down."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mode_jax.cli import main
from mode_jax.pipeline import presets, sources
from mode_jax.ref.config import LoraConfig
from mode_jax.ref.llama import init_llama, layer_shapes
from mode_jax.ref.lora import lora_param_count
from mode_jax.ref.train import eval_step
from tests.tolerances import PROBABILITY_SUM, assert_close, assert_trees_close

LABELS = ["backbone", "expert-math", "expert-code", "mode-2x", "mode-2x-frozen", "mode-2x-uninit",
          "full-ft", "lora-r4-attn"]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke") / "run"
    code = main(["reproduce", "--preset", "smoke", "--out", str(out), "--quiet"])
    assert code == 0
    return out


def test_table_rows_and_columns(smoke_run):
    table = json.loads((smoke_run / "table.json").read_text())
    assert table["domains"] == ["math", "code", "english"]
    assert [r["label"] for r in table["rows"]] == LABELS
    md = (smoke_run / "table.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| method"))
    for col in ("params", "Math", "Code", "English", "avg", "paper Math", "paper avg"):
        assert f" {col} |" in header
    for row in table["rows"]:
        accs = [row["accuracy"][d] for d in table["domains"]]
        assert all(0.0 <= a <= 100.0 for a in accs)
        assert_close(row["avg"], np.mean(accs), dtype=np.float64)
        assert all(np.isfinite(row["loss"][d]) and row["loss"][d] > 0 for d in table["domains"])
        assert row["method"] in md
    paper = {r["label"]: r["paper"] for r in table["rows"]}
    assert paper["mode-2x"]["math"] == 77.47 and paper["full-ft"]["english"] == 47.95
    assert paper["lora-r4-attn"]["code"] == 65.71 and paper["backbone"] is None


def test_backbone_row_equals_independent_ref_eval(smoke_run):
    cfg = presets.load_config(preset="smoke")
    data = sources.synthetic_data(cfg.eval_domains, cfg.data.synthetic_documents, cfg.train.seed)
    llama = sources.tiny_config(d_model=cfg.model.tiny_d_model, n_layers=cfg.model.tiny_n_layers,
                                vocab_size=data.vocab_size)
    params = {"backbone": init_llama(jax.random.key(cfg.model.seed), llama)}
    table = json.loads((smoke_run / "table.json").read_text())
    row = next(r for r in table["rows"] if r["label"] == "backbone")
    for d in cfg.eval_domains:
        rows = sources.eval_rows(data.test[d], cfg.data.seq_len, cfg.data.eval_sequences)
        accs, losses = [], []
        for i in range(0, rows.shape[0], cfg.data.eval_batch_size):
            m = eval_step(params, {"tokens": rows[i:i + cfg.data.eval_batch_size]}, cfg=llama)
            accs.append(float(m["accuracy"]))
            losses.append(float(m["loss"]))
        assert_close(row["accuracy"][d], 100 * np.mean(accs), dtype=np.float64)
        assert_close(row["loss"][d], np.mean(losses), dtype=np.float32, scale=0.1)
        # accuracy is a count of correct tokens over eval tokens
        n_tok = rows.shape[0] * (rows.shape[1] - 1)
        assert abs(row["accuracy"][d] / 100 * n_tok - round(row["accuracy"][d] / 100 * n_tok)) < 1e-6


def test_parameter_counts(smoke_run):
    cfg = presets.load_config(preset="smoke")
    rows = {r["label"]: r for r in json.loads((smoke_run / "table.json").read_text())["rows"]}
    bb = rows["backbone"]["params_total"]
    assert rows["backbone"]["params_trainable"] == 0
    assert rows["full-ft"]["params_trainable"] == bb == rows["full-ft"]["params_total"]
    d, layers = cfg.model.tiny_d_model, cfg.mode.n_blocks * cfg.mode.expert_layers
    llama = sources.tiny_config(d_model=d, n_layers=cfg.model.tiny_n_layers, vocab_size=259)
    layer = sum(int(np.prod(s)) for s in layer_shapes(llama).values())
    one_expert = layers * layer
    gates = lambda n: cfg.mode.n_blocks * (d * (n + 1) + n + 1)       # noqa: E731
    assert rows["expert-math"]["params_total"] == bb + one_expert + gates(1)
    assert rows["expert-math"]["params_trainable"] == one_expert + gates(1)
    assert rows["mode-2x"]["params_total"] == bb + 2 * one_expert + gates(2)
    assert rows["mode-2x-frozen"]["params_trainable"] == gates(2)
    lora = lora_param_count(llama, LoraConfig(rank=cfg.lora.rank, alpha=cfg.lora.alpha, targets=cfg.lora.targets))
    assert rows["lora-r4-attn"]["params_trainable"] == lora
    assert rows["lora-r4-attn"]["params_total"] == bb + lora


def test_run_directories_metrics_and_routing(smoke_run):
    cfg = presets.load_config(preset="smoke")
    for label in LABELS:
        sub = smoke_run / label
        assert presets.load_config(config=str(sub / "config.toml")) == cfg   # resolved config round-trips
        result = json.loads((sub / "result.json").read_text())
        if label == "backbone":
            continue
        lines = [json.loads(x) for x in (sub / "metrics.jsonl").read_text().splitlines()]
        steps = [m["step"] for m in lines if m["phase"] == label]
        total = cfg.train.stage1_steps if label.startswith("expert") else cfg.train.steps
        assert steps == list(range(1, total + 1))
        losses = [m["loss"] for m in lines]
        assert np.mean(losses[-3:]) < np.mean(losses[:3]), f"{label} did not learn: {losses}"
        if label.startswith(("expert", "mode")):
            n_e = 1 if label.startswith("expert") else 2
            for d, v in result["domains"].items():
                routing = np.asarray(v["routing"])
                assert routing.shape == (cfg.mode.n_blocks, n_e + 1)
                np.testing.assert_allclose(routing.sum(axis=1), 1.0, **PROBABILITY_SUM)
    assert (smoke_run / "expert-math" / "expert-math.safetensors").is_file()
    assert (smoke_run / "mode-2x" / "model.safetensors").is_file()


def test_plots_are_png(smoke_run):
    for name in ("loss_curves.png", "accuracy.png", "routing.png"):
        data = (smoke_run / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_rerun_with_resume_skips_finished_phases(smoke_run, capsys):
    before = (smoke_run / "table.json").read_text()
    assert main(["reproduce", "--preset", "smoke", "--out", str(smoke_run), "--resume", "--quiet"]) == 0
    assert json.loads((smoke_run / "table.json").read_text())["rows"] == json.loads(before)["rows"]
    timing = json.loads((smoke_run / "timing.json").read_text())
    assert len(timing["calls"]) == 2 and timing["calls"][1]["seconds"] < timing["calls"][0]["seconds"]


def _losses(run_dir):
    return np.array([json.loads(x)["loss"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()])


def test_backends_and_compute_dtypes_agree(tmp_path):
    """The fast path (stacked params, chunked loss; scan or a Python loop over layers) and bf16
    compute train the same model as the float32 reference, up to rounding; the expert files
    they write are interchangeable."""
    from mode_jax.pipeline import expert_io
    common = ["train-expert", "--domain", "code", "--steps", "3", "--preset", "smoke", "--quiet"]
    variants = {"ref": [], "fast": ["--set", 'model.backend="fast"'],
                "fast-python-loop": ["--set", 'model.backend="fast"', "--set", 'model.layer_loop="python"'],
                "fast-bf16": ["--set", 'model.backend="fast"', "--set", 'model.compute_dtype="bfloat16"'],
                "ref-bf16": ["--set", 'model.compute_dtype="bfloat16"']}
    for name, extra in variants.items():
        assert main([*common, "--out", str(tmp_path / name), *extra]) == 0
    ref = _losses(tmp_path / "ref")
    # float32: three steps of updates on top of the forward's rounding (2x the table)
    assert_close(_losses(tmp_path / "fast"), ref, dtype=np.float32, scale=2)
    assert_close(_losses(tmp_path / "fast-python-loop"), ref, dtype=np.float32, scale=2)
    for name in ("fast-bf16", "ref-bf16"):
        assert_close(_losses(tmp_path / name), ref, dtype=jnp.bfloat16)
    a = expert_io.load_expert(tmp_path / "ref" / "expert-code.safetensors")
    b = expert_io.load_expert(tmp_path / "fast" / "expert-code.safetensors")
    assert_trees_close(b.layers, a.layers, scale=2)
    results = {n: json.loads((tmp_path / n / "result.json").read_text()) for n in variants}
    assert results["fast"]["backend"] == "fast" and results["ref"]["backend"] == "ref"
    for d in results["ref"]["domains"]:
        assert_close(results["fast"]["domains"][d]["loss"], results["ref"]["domains"][d]["loss"], dtype=np.float32)
        assert_close(results["fast"]["domains"][d]["routing"], results["ref"]["domains"][d]["routing"],
                     dtype=np.float32)


def test_model_layer_loop_reaches_the_fast_step():
    """`model.layer_loop` picks FastConfig.layer_loop of the steps the pipeline builds."""
    from mode_jax.pipeline import engine
    from mode_jax.ref.config import LlamaConfig, OptimConfig
    for loop in ("auto", "scan", "python"):
        steps = engine.make_steps("full", LlamaConfig.tiny(), opt=OptimConfig(), backend="fast", layer_loop=loop)
        assert steps.train_step.keywords["forward"].fast.layer_loop == loop
    cfg = presets.load_config(preset="gpu")
    assert cfg.model.layer_loop == "scan"
