"""Artifacts you can trust: every expert and model file carries a checksum that a load
recomputes (a damaged file is a one-line "corrupted" error, exit 2, nothing written),
every loaded tensor is checked finite, nothing non-finite is written, result and metrics
files are strict JSON, and every file is written mode 0644."""

from __future__ import annotations

import hashlib
import json
import math
import os

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from mode_jax.cli import main
from mode_jax.integrity import NonFiniteError, check_finite, content_sha256, strict_json
from mode_jax.pipeline import expert_io, report, runs
from mode_jax.pipeline.expert_io import ExpertFileError
from tests.helpers import assert_refused, stage1_expert, tensor_data_start

SMOKE = ["--preset", "smoke", "--quiet"]


def _strict_loads(text: str):
    """json.loads that refuses the NaN/Infinity literals, as strict parsers do."""
    def refuse(name):
        raise ValueError(f"non-JSON literal {name}")
    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def expert_file(tmp_path_factory):
    """A stage-1 expert that fits the smoke preset's backbone, written by the library."""
    return expert_io.save_expert(tmp_path_factory.mktemp("expert") / "expert-math.safetensors", stage1_expert())


def _raw(path):
    with safe_open(str(path), framework="numpy") as f:
        return dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}


# ----------------------------------------------------------------------------- the checksum

def test_checksum_is_the_documented_sha256():
    """Pinned by hand: sha256 over tensors in name order (name, dtype, shape, bytes), then
    the metadata in key order, so another tool can recompute it."""
    a = np.array([1.5, -2.0], np.float32)
    b = np.arange(6, dtype=np.float32).reshape(2, 3) - 2.5
    by_hand = hashlib.sha256(b"tensor\0a\0<f4\0[2]\0" + a.tobytes() + b"tensor\0b\0<f4\0[2, 3]\0" + b.tobytes()
                             + b"meta\0domain\0math\0" + b"meta\0format\0x\0").hexdigest()
    assert content_sha256({"b": b, "a": a}, {"format": "x", "domain": "math"}) == by_hand


@pytest.mark.parametrize("change", ["value", "name", "shape", "metadata"])
def test_checksum_changes_with_any_part(change):
    tensors = {"w": np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)}
    meta = {"domain": "math"}
    before = content_sha256(tensors, meta)
    if change == "value":
        w = tensors["w"].copy()
        w.view(np.uint32)[1, 2] ^= 1            # one bit of one float
        tensors = {"w": w}
    elif change == "name":
        tensors = {"w2": tensors["w"]}
    elif change == "shape":
        tensors = {"w": tensors["w"].reshape(4, 3)}
    else:
        meta = {"domain": "code"}
    assert content_sha256(tensors, meta) != before


# ----------------------------------------------------------------------------- damaged experts

def test_intact_expert_evaluates(expert_file, tmp_path):
    """The file the refusals below damage is a good one: `eval` takes it as it is."""
    out = tmp_path / "eval"
    assert main(["eval", "--experts", str(expert_file), "--out", str(out), *SMOKE]) == 0
    result = _strict_loads((out / "result.json").read_text())
    assert 0.0 <= result["domains"]["math"]["accuracy"] <= 1.0 and math.isfinite(result["domains"]["math"]["loss"])


def test_flipped_bytes_in_tensor_data_are_refused(expert_file, tmp_path, capsys):
    """The issue's case: 64 bytes corrupted inside the tensor data."""
    flipped = tmp_path / "flipped.safetensors"
    data = bytearray(expert_file.read_bytes())
    start = tensor_data_start(expert_file)
    at = start + (len(data) - start) // 2
    rng = np.random.default_rng(0)
    data[at:at + 64] = bytes(x ^ y for x, y in zip(data[at:at + 64], rng.integers(1, 256, 64, dtype=np.uint8)))
    flipped.write_bytes(bytes(data))
    out = tmp_path / "out"
    line = assert_refused(capsys, ["eval", "--experts", str(flipped), "--out", str(out), *SMOKE], out,
                          "flipped.safetensors", "corrupted")
    assert line.startswith("mode-jax eval: error:")
    # compose reads experts through the same check
    assert_refused(capsys, ["compose", "--experts", str(flipped), str(expert_file), "--out", str(out), *SMOKE],
                   out, "flipped.safetensors", "corrupted")


def test_damaged_header_says_corrupted(expert_file, tmp_path, capsys):
    damaged = tmp_path / "damaged.safetensors"
    data = bytearray(expert_file.read_bytes())
    data[12:20] = b"\xff" * 8                    # inside the JSON header: no longer parses
    damaged.write_bytes(bytes(data))
    out = tmp_path / "out"
    assert_refused(capsys, ["eval", "--experts", str(damaged), "--out", str(out), *SMOKE], out,
                   "damaged.safetensors", "corrupted")


def test_nan_in_an_expert_with_a_valid_checksum_names_the_tensor(expert_file, tmp_path, capsys):
    """A NaN written by another tool that also wrote a matching checksum: the finite check
    names the tensor."""
    meta, tensors = _raw(expert_file)
    del meta[expert_io.SHA256]
    tensors["block1.layer0.w_up"][3, 5] = np.nan
    bad = tmp_path / "nan.safetensors"
    save_file(tensors, str(bad), metadata={**meta, expert_io.SHA256: content_sha256(tensors, meta)})
    out = tmp_path / "out"
    assert_refused(capsys, ["eval", "--experts", str(bad), "--out", str(out), *SMOKE], out,
                   "nan.safetensors", "'block1.layer0.w_up'", "NaN")


def test_nan_edited_into_an_expert_is_corrupted_and_named(expert_file, tmp_path, capsys):
    """A NaN edited in with the old metadata kept: the checksum catches it, the message names
    the non-finite tensor."""
    meta, tensors = _raw(expert_file)
    tensors["block0.gate_b"][1] = np.inf
    bad = tmp_path / "edited.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    out = tmp_path / "out"
    assert_refused(capsys, ["eval", "--experts", str(bad), "--out", str(out), *SMOKE], out,
                   "edited.safetensors", "corrupted", "'block0.gate_b'")


def test_non_finite_expert_is_never_written(tmp_path):
    expert = stage1_expert()
    wo = np.array(expert.layers[0][0]["wo"])
    wo[0, 1] = -np.inf
    expert.layers[0][0]["wo"] = wo
    with pytest.raises(ExpertFileError, match=r"refusing to write .*'block0\.layer0\.wo' holds NaN or infinite"):
        expert_io.save_expert(tmp_path / "e.safetensors", expert)
    assert os.listdir(tmp_path) == []            # no file, no temporary left behind


def test_expert_without_checksum_loads_with_a_warning(expert_file, tmp_path, capsys):
    """Files written before checksums existed still load (documented in expert_io), and are
    still checked finite."""
    meta, tensors = _raw(expert_file)
    del meta[expert_io.SHA256]
    old = tmp_path / "old.safetensors"
    save_file(tensors, str(old), metadata=meta)
    loaded = expert_io.load_expert(old)
    assert np.array_equal(loaded.layers[1][0]["wq"], tensors["block1.layer0.wq"])
    expert_io.load_expert(old)                   # a second read (eval and compose read twice) warns no more
    err = capsys.readouterr().err
    assert "warning" in err and "old.safetensors" in err and "no checksum" in err and err.count("\n") == 1
    tensors["block0.layer0.attn_norm"][0] = np.nan
    save_file(tensors, str(old), metadata=meta)
    with pytest.raises(ExpertFileError, match=r"old\.safetensors: tensor 'block0\.layer0\.attn_norm' holds NaN"):
        expert_io.load_expert(old)


# ----------------------------------------------------------------------------- model files

def _model_params(seed=0):
    rng = np.random.default_rng(seed)
    return {"backbone": {"embed": rng.standard_normal((4, 3), dtype=np.float32)},
            "blocks": [{"gate_w": rng.standard_normal((3, 2), dtype=np.float32),
                        "gate_b": rng.standard_normal(2, dtype=np.float32)}]}


def test_model_file_round_trip_and_corruption(tmp_path):
    params = _model_params()
    path = expert_io.save_model(tmp_path / "model.safetensors", params, method="stage2",
                                metadata={"backbone_fingerprint": "fp", "label": "mode-1x"})
    loaded, method, info = expert_io.load_model(path, params["backbone"], fingerprint="fp")
    assert method == "stage2" and info == {"backbone_fingerprint": "fp", "label": "mode-1x"}
    assert np.array_equal(loaded["blocks"][0]["gate_w"], params["blocks"][0]["gate_w"])
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40                             # one bit of the last tensor's last float
    path.write_bytes(bytes(data))
    with pytest.raises(ExpertFileError, match=r"model\.safetensors is corrupted"):
        expert_io.load_model(path, params["backbone"], fingerprint="fp")


@pytest.mark.parametrize("method", ["full", "lora"])
def test_model_file_refuses_non_finite(tmp_path, method):
    params = _model_params()
    params["blocks"][0]["gate_b"][0] = np.nan
    with pytest.raises(ExpertFileError, match=r"'blocks/0/gate_b' holds NaN"):
        expert_io.save_model(tmp_path / "m.safetensors", params, method=method, metadata={})
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- finite check

@pytest.mark.parametrize("bad, dtype", [(np.nan, np.float32), (np.inf, np.float32), (-np.inf, np.float64),
                                        (np.nan, jnp.bfloat16)])
def test_check_finite_names_count_and_first_index(bad, dtype):
    x = np.random.default_rng(1).standard_normal((3, 4)).astype(dtype)
    check_finite(x, "x")                         # finite: passes
    x[1, 2] = bad
    x[2, 0] = bad
    with pytest.raises(NonFiniteError, match=r"^w holds NaN or infinite values \(2 of 12, the first at flat index 6\)$"):
        check_finite(x, "w")
    with pytest.raises(KeyError, match="because"):
        check_finite(x, "w", error=KeyError, why="because")


def test_check_finite_passes_integers():
    check_finite(np.array([3, -7], np.int32), "ids")


# ----------------------------------------------------------------------------- strict JSON

def test_strict_json_writes_null_for_non_finite():
    text = strict_json({"loss": float("nan"), "acc": [np.float32(0.25), float("inf"), -float("inf")], "n": 3},
                       sort_keys=True)
    assert text == '{"acc": [0.25, null, null], "loss": null, "n": 3}'
    with pytest.raises(TypeError):
        strict_json({"x": {1, 2}})               # not JSON at all: refused, not guessed


def test_run_files_are_strict_json_and_0644(tmp_path):
    from mode_jax.pipeline import presets
    run = runs.RunDir.create(tmp_path / "run", presets.load_config(preset="smoke"), kind="test",
                             info={"score": float("nan")})
    run.log({"phase": "p", "step": 1, "loss": float("nan")})
    run.log({"phase": "p", "step": 2, "loss": 1.5})
    run.truncate_metrics("p", 5)
    run.write_result({"domains": {"math": {"loss": float("inf"), "accuracy": 0.5}}})
    assert _strict_loads((run.path / "result.json").read_text())["domains"]["math"] == {"loss": None, "accuracy": 0.5}
    assert _strict_loads((run.path / "run.json").read_text())["score"] is None
    lines = [_strict_loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    assert [m["loss"] for m in lines] == [None, 1.5]
    for name in ("result.json", "run.json", "config.toml", "metrics.jsonl"):
        assert oct((run.path / name).stat().st_mode & 0o777) == oct(0o644), name


def test_report_table_is_strict_json(tmp_path):
    row = {"label": "full-ft", "params_total": 10, "params_trainable": 10, "train_steps": 1, "train_seconds": 1.0,
           "domains": {"math": {"accuracy": 0.5, "loss": float("nan"), "tokens": 100}}}
    table = report.build_table([row], ["math"])
    md = report.write(tmp_path, table)
    assert _strict_loads((tmp_path / "table.json").read_text())["rows"][0]["loss"] == {"math": None}
    assert "| Full FT | - | 1 | 1 |" in md           # a non-finite loss shows as "-"


def test_artifacts_are_mode_0644(tmp_path, expert_file):
    old_umask = os.umask(0o077)                  # even under a strict umask: artifacts are shared files
    try:
        copy = expert_io.save_expert(tmp_path / "e.safetensors", expert_io.load_expert(expert_file))
        model = expert_io.save_model(tmp_path / "m.safetensors", _model_params(), method="full", metadata={})
    finally:
        os.umask(old_umask)
    for path in (copy, model):
        assert oct(path.stat().st_mode & 0o777) == oct(0o644), path


def test_finetuned_model_carries_a_checksum_and_eval_refuses_it_damaged(tmp_path, capsys):
    """A LoRA artifact as the pipeline writes it (full FT and composed models are written by
    the same save_model, tested above and in test_expert_io)."""
    run = tmp_path / "run"
    assert main(["finetune", "--method", "lora", "--steps", "2", "--out", str(run), *SMOKE]) == 0
    model = run / "model.safetensors"
    meta, tensors = _raw(model)
    assert meta[expert_io.SHA256] == content_sha256(tensors, {k: v for k, v in meta.items() if k != expert_io.SHA256})
    assert oct(model.stat().st_mode & 0o777) == oct(0o644)
    data = bytearray(model.read_bytes())
    at = tensor_data_start(model) + 100
    data[at:at + 64] = bytes(b ^ 0x5A for b in data[at:at + 64])
    model.write_bytes(bytes(data))
    out = tmp_path / "eval"
    assert_refused(capsys, ["eval", "--run", str(run), "--out", str(out), "--quiet"], out,
                   "model.safetensors", "corrupted")
