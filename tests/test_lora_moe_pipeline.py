"""LoRA-MoE end to end on the smoke preset (tiny backbone, synthetic domains): two per-domain
LoRAs from `finetune --method lora`, `compose-lora` (LoRAs and routers; routers only), the
saved model read back by `eval --run` with the same numbers, refusals of files that do not
fit, and `mode-jax sweep` cells that share their stage-1 LoRAs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mode_jax.cli import main
from mode_jax.pipeline import expert_io
from mode_jax.ref.config import LlamaConfig
from mode_jax.ref.lora import lora_param_count
from mode_jax.ref.config import LoraConfig
from tests.helpers import assert_refused, tensor_data_start
from tests.tolerances import PROBABILITY_SUM

# The fast backend (scan over layers) compiles these tiny steps faster than the smoke preset's ref.
SMOKE = ["--preset", "smoke", "--quiet", "--set", "model.backend=fast"]


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    """Per-domain LoRAs for math and code: two runs of `finetune --method lora` on one domain."""
    root = tmp_path_factory.mktemp("loras")
    for d in ("math", "code"):
        assert main(["finetune", "--method", "lora", "--set", f'domains.targets=["{d}"]', "--steps", "2",
                     "--out", str(root / d), *SMOKE]) == 0
    return [root / d / "model.safetensors" for d in ("math", "code")]


def _model(run):
    result = json.loads((run / "result.json").read_text())
    params, method, _ = expert_io.load_model(run / "model.safetensors", {}, fingerprint=result["backbone_fingerprint"])
    return result, params, method


def test_compose_lora_trains_loras_and_routers_and_evaluates_back(loras, tmp_path, capsys):
    out = tmp_path / "moe"
    assert main(["compose-lora", "--loras", *map(str, loras), "--steps", "2", "--out", str(out), *SMOKE]) == 0
    result, params, method = _model(out)
    assert method == result["method"] == "lora_moe" and result["label"] == "lora-moe-2x"
    assert result["domains_trained"] == result["router_columns"] == ["math", "code"]
    for d, v in result["domains"].items():         # mean router weights per layer: [L][N], rows sum to 1
        assert np.asarray(v["routing"]).shape == (4, 2), d
        np.testing.assert_allclose(np.sum(v["routing"], axis=1), 1.0, **PROBABILITY_SUM)
    # smoke: 4 layers of width 32, rank 4 on q, k, v, o; two LoRAs plus a [32, 2] router per layer
    llama, lora = LlamaConfig.tiny(vocab_size=259, n_layers=4), LoraConfig(rank=4, alpha=8.0)
    assert result["params_trainable"] == 2 * lora_param_count(llama, lora) + 4 * 32 * 2
    layers = params["lora_moe"]["layers"]
    assert len(layers) == 4 and layers[0]["gate_w"].shape == (32, 2)
    assert np.abs(layers[0]["gate_w"]).max() > 0                          # the routers moved from zero
    _, math_lora, _ = _model(loras[0].parent)
    assert not np.array_equal(layers[0]["adapters"][0]["wq"]["b"], math_lora["lora"]["layers"][0]["wq"]["b"])
    # load_run gives the model with the LoRA shape its logits need; export refuses it
    from mode_jax.export import load_run
    loaded = load_run(out)
    assert loaded.method == "lora_moe" and loaded.lora == lora and "lora_moe" in loaded.params
    assert_refused(capsys, ["export", "--run", str(out), "--to", "peft", str(tmp_path / "adapter")],
                   tmp_path / "adapter", "is a LoRA-MoE run (method lora_moe)")
    # `eval --run` rebuilds the model from its directory alone: the same numbers
    assert main(["eval", "--run", str(out), "--out", str(tmp_path / "eval"), "--quiet"]) == 0
    again = json.loads((tmp_path / "eval" / "result.json").read_text())
    for d, v in result["domains"].items():
        assert again["domains"][d]["accuracy"] == v["accuracy"]
        assert again["domains"][d]["loss"] == pytest.approx(v["loss"], rel=1e-6)


def test_frozen_loras_stay_as_trained_in_stage1(loras, tmp_path):
    out = tmp_path / "moe-frozen"
    assert main(["compose-lora", "--loras", *map(str, loras), "--freeze-loras", "--steps", "2",
                 "--out", str(out), *SMOKE]) == 0
    result, params, method = _model(out)
    assert method == "lora_moe_frozen" and result["params_trainable"] == 4 * 32 * 2
    for j, path in enumerate(loras):
        _, stage1, _ = _model(path.parent)
        for i, layer in enumerate(params["lora_moe"]["layers"]):
            for name, ab in stage1["lora"]["layers"][i].items():
                np.testing.assert_array_equal(layer["adapters"][j][name]["a"], ab["a"])
                np.testing.assert_array_equal(layer["adapters"][j][name]["b"], ab["b"])


def test_files_that_do_not_fit_are_refused(loras, tmp_path, capsys):
    out = tmp_path / "never"
    assert_refused(capsys, ["compose-lora", "--loras", *map(str, loras), "--set", "lora.rank=8", "--out", str(out),
                            *SMOKE], out, "lora.rank is 4 in the file, 8 in the config")
    assert_refused(capsys, ["compose-lora", "--loras", str(loras[0]), str(loras[0]), "--out", str(out), *SMOKE],
                   out, "two LoRAs for the same domain 'math'")
    assert_refused(capsys, ["compose-lora", "--loras", str(tmp_path / "missing.safetensors"), "--out", str(out),
                            *SMOKE], out, "does not exist")
    # one byte of tensor data flipped: the checksum refuses the file before anything loads
    damaged = tmp_path / "damaged.safetensors"
    data = bytearray(loras[1].read_bytes())
    data[tensor_data_start(loras[1]) + 40] ^= 0x5A
    damaged.write_bytes(bytes(data))
    assert_refused(capsys, ["compose-lora", "--loras", str(loras[0]), str(damaged), "--out", str(out), *SMOKE],
                   out, "damaged.safetensors is corrupted")
    # a model file that is not a per-domain LoRA (here a composed MoDE's, written as compose writes it)
    mode = expert_io.save_model(tmp_path / "mode.safetensors", {"blocks": [{"gate_w": np.full((32, 3), 0.5)}]},
                                method="stage2", metadata={"domains": ["math", "code"]})
    assert_refused(capsys, ["compose-lora", "--loras", str(loras[0]), str(mode), "--out", str(out), *SMOKE],
                   out, "is not a LoRA trained on one domain (method 'stage2'")


GRID = """
[sweep]
base = "smoke"
seeds = [0]
set = {{ "train.steps" = 2, "train.stage1_steps" = 2, "train.checkpoint_every" = 0, "model.backend" = "fast" }}
{cells}
"""


@pytest.mark.slow
def test_sweep_cells_share_their_stage1_loras(tmp_path):
    cells = '[[sweep.cell]]\nmethod = "lora-moe"\n[[sweep.cell]]\nmethod = "lora-moe-frozen"\n'
    grid = tmp_path / "grid.toml"
    grid.write_text(GRID.format(cells=cells))
    out = tmp_path / "sweep"
    assert main(["sweep", str(grid), "--out", str(out), "--quiet"]) == 0
    records = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert [r["method"] for r in records] == ["lora-moe", "lora-moe-frozen"]
    assert [r["result"]["method"] for r in records] == ["lora_moe", "lora_moe_frozen"]
    assert len(list((out / "loras").iterdir())) == 1                      # trained once, used twice
    for r in records:
        assert set(r["phases"]) == {"lora-math", "lora-code"}
        assert r["phases"]["lora-math"]["domains_trained"] == ["math"]
        assert r["phases"]["lora-math"]["train_steps"] == 2 and r["result"]["train_steps"] == 2
        assert set(r["result"]["domains"]) == {"math", "code", "english"}
    assert records[0]["phases"] == records[1]["phases"]                   # the same runs, not retrained
