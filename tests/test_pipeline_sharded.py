"""`--mesh` (SPMD) and `--placement` (MPMD) on the pipeline's training commands, on the 8
forced CPU devices: `mode-jax train-expert` sharded trains the same expert as on one
device (ref/'s step), and flags that do not fit are refused before anything is written."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from mode_jax.cli import main
from mode_jax.pipeline import expert_io, presets, sources
from mode_jax.ref.llama import init_llama
from tests.helpers import assert_refused
from tests.tolerances import assert_close

# The smoke preset, 4 steps, batch 8 (divisible by every batch axis used below).
BASE = ["--preset", "smoke", "--steps", "4", "--set", "train.batch_size=8", "--set", "train.checkpoint_every=2",
        "--quiet"]


def _train(tmp_path, name, *flags):
    out = tmp_path / name
    assert main(["train-expert", "--domain", "math", "--out", str(out), *BASE, *flags]) == 0
    return expert_io.load_expert(out / "expert-math.safetensors")


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("single"), "run")


def _assert_same_expert(got, want):
    # 4 AdamW steps at lr 1e-2 from the same start: float32 rounding of different but equal
    # formulas (fast/ layers vs ref/) moves a near-zero gradient's step by a fraction of lr,
    # as in tests/test_fast_train.py: tolerance 5% of lr.
    for block_got, block_want in zip(got.layers, want.layers):
        for layer_got, layer_want in zip(block_got, block_want):
            for k in layer_want:
                assert_close(layer_got[k], layer_want[k], scale=50, err_msg=k)
    for (w, b), (w0, b0) in zip(got.gates, want.gates):
        assert_close(w, w0, scale=50)
        assert_close(b, b0, scale=50)
    # Training moved the expert from its start (a copy of the block's last backbone layer)
    # far more than the two runs differ.
    start = _initial_expert_wq()
    for block in range(len(want.layers)):
        moved = np.max(np.abs(want.layers[block][0]["wq"] - start[block]))
        apart = np.max(np.abs(got.layers[block][0]["wq"] - want.layers[block][0]["wq"]))
        assert apart < 0.01 * moved, (block, apart, moved)


def _initial_expert_wq():
    """The smoke backbone's last layer of each block (where stage 1 copies its expert from)."""
    cfg = presets.load_config(preset="smoke")
    data = sources.synthetic_data(cfg.eval_domains, cfg.data.synthetic_documents, cfg.train.seed)
    llama = sources.tiny_config(d_model=cfg.model.tiny_d_model, n_layers=cfg.model.tiny_n_layers,
                                vocab_size=data.vocab_size)
    layers = init_llama(jax.random.key(cfg.model.seed), llama)["layers"]
    per_block = llama.n_layers // cfg.mode.n_blocks
    return [np.asarray(layers[(b + 1) * per_block - 1]["wq"]) for b in range(cfg.mode.n_blocks)]


@pytest.mark.parametrize("flags", [["--mesh", "dp=4,fsdp=2"], ["--mesh", "fsdp"],
                                   ["--placement", "backbone=0-3[fsdp=4];experts=4-7"]],
                         ids=["spmd-dp-fsdp", "spmd-fsdp8", "mpmd"])
def test_sharded_train_expert_equals_one_device(tmp_path, single, flags):
    assert jax.device_count() == 8
    got = _train(tmp_path, "run", *flags)
    _assert_same_expert(got, single)


def test_sharded_resume_continues_the_same_run(tmp_path, single):
    """A sharded run stopped after its first checkpoint and resumed ends where an
    uninterrupted one does."""
    out = tmp_path / "run"
    flags = ["--placement", "backbone=0-3;experts=4-7"]
    assert main(["train-expert", "--domain", "math", "--out", str(out), *BASE, *flags, "--time-limit", "1e-9"]) == 0
    assert (out / "checkpoints").exists()
    assert main(["train-expert", "--domain", "math", "--out", str(out), *BASE, *flags, "--resume"]) == 0
    _assert_same_expert(expert_io.load_expert(out / "expert-math.safetensors"), single)


@pytest.mark.parametrize("argv, needles", [
    (["finetune", "--method", "full", *BASE, "--mesh", "dp=8"], ["shard MoDE training", "'full'"]),
    (["train-expert", "--domain", "math", *BASE, "--mesh", "dp=3"], ["--mesh"]),
    (["train-expert", "--domain", "math", *BASE, "--placement", "backbone=0-3;experts=2-5"], ["disjoint"]),
    (["train-expert", "--domain", "math", *BASE, "--placement", "backbone=0-3;experts=4-11"], ["does not exist"]),
    (["train-expert", "--domain", "math", *BASE, "--mesh", "tp=8"], ["divisible"]),
])
def test_bad_parallelism_is_refused(tmp_path, capsys, argv, needles):
    out = tmp_path / "never"
    assert_refused(capsys, [*argv, "--out", str(out)], out, *needles)
