"""Experts as standalone files: bit-exact round trip, composition of experts trained in
separate runs, and refusal (exit 2, one line naming the differing field, nothing
written) of experts from another backbone, block layout or width, and of truncated or
foreign files."""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest

from mode_jax.cli import main
from tests.helpers import assert_refused, stage1_expert
from tests.tolerances import assert_trees_equal
from mode_jax.pipeline import expert_io

SMOKE = ["--preset", "smoke", "--quiet"]


def test_round_trip_is_bit_exact(tmp_path):
    expert = stage1_expert()
    path = expert_io.save_expert(tmp_path / "e.safetensors", expert)
    loaded = expert_io.load_expert(path)
    assert (loaded.domain, loaded.llama, loaded.mode) == (expert.domain, expert.llama, expert.mode)
    assert loaded.backbone_fingerprint == expert.backbone_fingerprint and loaded.training == {"steps": 0}
    assert_trees_equal((loaded.layers, loaded.gates), (expert.layers, expert.gates))
    assert {a.dtype for a in jax.tree.leaves(loaded.layers)} == {np.dtype(np.float32)}
    assert any(np.abs(g[0]).sum() > 0 for g in loaded.gates)     # not all zeros
    # the file is a few tensors, not a backbone
    assert path.stat().st_size < 200_000


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Experts for math and code trained in two separate runs of train-expert."""
    root = tmp_path_factory.mktemp("experts")
    for domain in ("math", "code"):
        assert main(["train-expert", "--domain", domain, "--steps", "3", "--out", str(root / domain), *SMOKE]) == 0
    return root


def test_compose_experts_from_separate_runs(two_runs, tmp_path):
    files = [two_runs / "math" / "expert-math.safetensors", two_runs / "code" / "expert-code.safetensors"]
    out = tmp_path / "composed"
    assert main(["compose", "--experts", *map(str, files), "--steps", "3", "--out", str(out), *SMOKE]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["method"] == "stage2" and result["domains_trained"] == ["math", "code"]
    assert result["routing_columns"] == ["backbone", "math", "code"]
    # the composed model starts from the experts: its file's expert 0 of block 0 moved from
    # the math expert's weights by training only (same shapes; finite)
    model, method, _ = expert_io.load_model(out / "model.safetensors", {}, fingerprint=result["backbone_fingerprint"])
    math_expert = expert_io.load_expert(files[0])
    w = np.asarray(model["blocks"][0]["experts"][0][0]["wq"])
    assert w.shape == math_expert.layers[0][0]["wq"].shape and np.all(np.isfinite(w))
    assert method == "stage2"
    # `eval --run` rebuilds the composed model from its run directory alone: same numbers
    assert main(["eval", "--run", str(out), "--out", str(tmp_path / "eval"), "--quiet"]) == 0
    again = json.loads((tmp_path / "eval" / "result.json").read_text())
    assert again["domains"] == result["domains"]
    # and the frozen-experts variant leaves the expert weights bit-identical
    frozen = tmp_path / "frozen"
    assert main(["compose", "--experts", *map(str, files), "--freeze-experts", "--steps", "3",
                 "--out", str(frozen), *SMOKE]) == 0
    model, _, _ = expert_io.load_model(frozen / "model.safetensors", {}, fingerprint=result["backbone_fingerprint"])
    for j, src in enumerate(files):
        e = expert_io.load_expert(src)
        for i in range(len(e.layers)):
            assert np.array_equal(model["blocks"][i]["experts"][j][0]["w_up"], e.layers[i][0]["w_up"])


@pytest.mark.parametrize("change, field", [
    (dict(model_seed=1), "backbone fingerprint differs"),
    (dict(n_blocks=4), "block layout (mode_config.n_blocks) differs"),
    (dict(expert_layers=2), "block layout (mode_config.expert_layers) differs"),
    (dict(d_model=48), "width (llama_config.d_model) differs"),
])
def test_incompatible_expert_is_refused(two_runs, tmp_path, capsys, change, field):
    bad = expert_io.save_expert(tmp_path / "bad.safetensors", stage1_expert(domain="code", **change))
    out = tmp_path / "out"
    line = assert_refused(capsys, ["compose", "--experts", str(two_runs / "math" / "expert-math.safetensors"),
                             str(bad), "--out", str(out), *SMOKE], out, field, "bad.safetensors")
    assert line.startswith("mode-jax compose: error:")


def test_matching_hand_built_expert_is_accepted(two_runs, tmp_path):
    """The refusals above are about the field, not about hand-built files."""
    good = expert_io.save_expert(tmp_path / "good.safetensors", stage1_expert(domain="code"))
    assert main(["compose", "--experts", str(two_runs / "math" / "expert-math.safetensors"), str(good),
                 "--steps", "3", "--out", str(tmp_path / "out"), *SMOKE]) == 0


def test_truncated_expert_file_is_refused(two_runs, tmp_path, capsys):
    src = two_runs / "code" / "expert-code.safetensors"
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    out = tmp_path / "out"
    assert_refused(capsys, ["compose", "--experts", str(two_runs / "math" / "expert-math.safetensors"), str(cut),
                      "--out", str(out), *SMOKE], out, "cut.safetensors", "not a readable safetensors file")


@pytest.mark.parametrize("kind", ["text", "model-file", "other-safetensors"])
def test_wrong_format_is_refused(two_runs, tmp_path, capsys, kind):
    path = tmp_path / "wrong.safetensors"
    if kind == "text":
        path.write_text("these are not the tensors you are looking for\n")
        needle = "not a readable safetensors file"
    elif kind == "model-file":
        expert_io.save_model(path, {"backbone": {}, "blocks": [{"gate_b": np.zeros(2)}]}, method="stage2",
                             metadata={"backbone_fingerprint": "x"})
        needle = "not a mode-jax expert file"
    else:
        from safetensors.numpy import save_file
        save_file({"weight": np.ones((2, 2), np.float32)}, str(path))
        needle = "not a mode-jax expert file"
    out = tmp_path / "out"
    assert_refused(capsys, ["compose", "--experts", str(path), str(two_runs / "code" / "expert-code.safetensors"),
                      "--out", str(out), *SMOKE], out, needle)


def test_eval_loads_an_expert_on_its_own(two_runs, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["eval", "--experts", str(two_runs / "code" / "expert-code.safetensors"), "--out", str(out),
                 *SMOKE]) == 0
    result = json.loads((out / "result.json").read_text())
    trained = json.loads((two_runs / "code" / "result.json").read_text())
    # evaluating the file alone gives exactly what the training run measured
    for d in result["domains"]:
        assert result["domains"][d]["accuracy"] == trained["domains"][d]["accuracy"]
        assert result["domains"][d]["loss"] == trained["domains"][d]["loss"]
    assert dataclasses.is_dataclass(expert_io.load_expert(two_runs / "code" / "expert-code.safetensors"))


def test_qwen2_expert_keeps_its_biases(tmp_path):
    """An expert over a Qwen2 backbone carries q/k/v biases (copied from the backbone's layers):
    they are saved and loaded like the other tensors."""
    from mode_jax.pipeline import sources
    from mode_jax.ref.config import LlamaConfig, ModeConfig
    from mode_jax.ref.llama import init_llama
    from mode_jax.ref.methods import init_method

    llama = LlamaConfig.tiny(qkv_bias=True)
    mode = ModeConfig(n_blocks=2, expert_layers=1, n_experts=1)
    backbone = init_llama(jax.random.key(0), llama)
    params = init_method("stage1", jax.random.key(1), backbone, llama, mode=mode)
    expert = expert_io.from_stage1(params, domain="math", llama=llama, mode=mode,
                                   fingerprint=sources.fingerprint(backbone), training={"steps": 0})
    loaded = expert_io.load_expert(expert_io.save_expert(tmp_path / "q.safetensors", expert))
    assert loaded.llama == llama
    for block, want in zip(loaded.layers, params["blocks"]):
        assert set(block[0]) >= {"bq", "bk", "bv"}
        for key in ("bq", "bk", "bv"):
            np.testing.assert_array_equal(block[0][key], np.asarray(want["experts"][0][0][key]))
            assert np.abs(block[0][key]).max() > 0
