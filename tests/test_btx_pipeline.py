"""Branch-Train-MiX end to end on the smoke preset (tiny backbone, synthetic domains): two
branches from `btx branch`, `btx compose` (MLP experts and routers), the saved model read
back by `eval --run` with the same numbers, refusals of files that do not fit, and a
`mode-jax sweep` whose btx cells share their branches."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mode_jax.cli import main
from mode_jax.pipeline import expert_io
from mode_jax.ref.btx import BALANCE_COEF
from tests.helpers import assert_refused
from tests.tolerances import PROBABILITY_SUM

SMOKE = ["--preset", "smoke", "--quiet"]
D, F, L = 32, 64, 4                      # the smoke backbone: width 32, MLP 64, 4 layers


def _model(run):
    result = json.loads((run / "result.json").read_text())
    params, method, _ = expert_io.load_model(run / "model.safetensors", {}, fingerprint=result["backbone_fingerprint"])
    return result, params, method


@pytest.fixture(scope="module")
def branches(tmp_path_factory):
    """Branches for math and code: two runs of `btx branch`, two steps each."""
    root = tmp_path_factory.mktemp("branches")
    for d in ("math", "code"):
        assert main(["btx", "branch", "--domain", d, "--steps", "2", "--out", str(root / d), *SMOKE]) == 0
    return [root / d / "model.safetensors" for d in ("math", "code")]


def test_branch_trains_only_the_mlp_copies(branches):
    result, params, method = _model(branches[0].parent)
    assert method == result["method"] == "btx_branch" and result["domains_trained"] == ["math"]
    assert result["params_trainable"] == L * 3 * D * F                 # w_gate, w_up, w_down per layer
    assert params["backbone"] == {} and len(params["btx"]["layers"]) == L   # the file holds the MLP copies only
    _, other, _ = _model(branches[1].parent)
    # Both start as the backbone's MLP: after training on different domains they differ.
    assert not np.array_equal(params["btx"]["layers"][0]["mlps"][0]["w_up"], other["btx"]["layers"][0]["mlps"][0]["w_up"])


def test_compose_trains_experts_and_routers_and_evaluates_back(branches, tmp_path):
    out = tmp_path / "btx"
    assert main(["btx", "compose", "--branches", *map(str, branches), "--steps", "2", "--out", str(out), *SMOKE]) == 0
    result, params, method = _model(out)
    assert method == result["method"] == "btx" and result["label"] == "btx-2x"
    assert result["domains_trained"] == ["math", "code"] and result["routing_columns"] == ["seed", "math", "code"]
    assert result["params_trainable"] == L * (3 * 3 * D * F + D * 3)    # seed + 2 branches, a [D, 3] router
    layer = params["btx"]["layers"][0]
    _, math_branch, _ = _model(branches[0].parent)
    assert len(layer["mlps"]) == 3 and layer["gate_w"].shape == (D, 3)
    assert not np.array_equal(layer["mlps"][1]["w_up"], math_branch["btx"]["layers"][0]["mlps"][0]["w_up"])
    # The load-balancing loss is logged beside the plain loss at every step (BALANCE_COEF * ~1).
    logged = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(logged) == 2 and all(0 < x["aux_loss"] < 10 * BALANCE_COEF for x in logged)
    assert all("aux_loss" not in json.loads(x) for x in (branches[0].parent / "metrics.jsonl").read_text().splitlines())
    for d, v in result["domains"].items():
        routing = np.asarray(v["routing"])                             # [L, E] mean top-2 weights
        assert routing.shape == (L, 3)
        np.testing.assert_allclose(routing.sum(-1), 1.0, **PROBABILITY_SUM)
    # `eval --run` rebuilds the model from its directory alone: the same numbers
    assert main(["eval", "--run", str(out), "--out", str(tmp_path / "eval"), "--quiet"]) == 0
    again = json.loads((tmp_path / "eval" / "result.json").read_text())
    for d, v in result["domains"].items():
        assert again["domains"][d]["accuracy"] == v["accuracy"]
        assert again["domains"][d]["loss"] == pytest.approx(v["loss"], rel=1e-6)


def test_files_that_do_not_fit_are_refused(branches, tmp_path, capsys):
    out = tmp_path / "never"
    assert_refused(capsys, ["btx", "compose", "--branches", str(branches[0]), str(branches[0]), "--out", str(out),
                            *SMOKE], out, "two BTX branches for the same domain 'math'")
    assert_refused(capsys, ["btx", "compose", "--branches", str(tmp_path / "missing.safetensors"), "--out", str(out),
                            *SMOKE], out, "does not exist")
    # A model file of another method (a one-domain LoRA's layout, written directly): refused from
    # its checked metadata, before the backbone loads.
    lora = expert_io.save_model(tmp_path / "lora.safetensors", {"lora": {"layers": [{"wq": {
        "a": np.full((D, 2), 0.5, np.float32), "b": np.full((2, D), 0.25, np.float32)}}]}}, method="lora",
        metadata={"domains": ["math"], "backbone_fingerprint": "0" * 64})
    assert_refused(capsys, ["btx", "compose", "--branches", str(lora), "--out", str(out), *SMOKE], out,
                   "is not a BTX branch of one domain (method 'lora'")


GRID = """
[sweep]
base = "smoke"
seeds = [0]
set = {{ "train.stage1_steps" = 2, "train.checkpoint_every" = 0 }}
{cells}
"""


@pytest.mark.slow
def test_sweep_cells_share_their_branches(tmp_path):
    grid = tmp_path / "grid.toml"
    grid.write_text(GRID.format(cells='[[sweep.cell]]\nmethod = "btx"\n"train.steps" = [1, 2]\n'))
    out = tmp_path / "sweep"
    assert main(["sweep", str(grid), "--out", str(out), "--quiet"]) == 0
    records = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert [r["result"]["method"] for r in records] == ["btx", "btx"]
    assert [r["result"]["train_steps"] for r in records] == [1, 2]
    for r in records:
        assert set(r["phases"]) == {"btx-branch-math", "btx-branch-code"}
        assert r["phases"]["btx-branch-math"]["domains_trained"] == ["math"]
        assert r["phases"]["btx-branch-math"]["train_steps"] == 2
        assert set(r["result"]["domains"]) == {"math", "code", "english"}
    assert records[0]["phases"] == records[1]["phases"]                   # the same branches, not retrained
    assert len(list((out / "branches").iterdir())) == 2                   # one key per domain, trained once
