"""Bad input to the training commands: exit code 2, one line on stderr that says what is
wrong (and which command makes what is missing), no traceback, no run directory."""

from __future__ import annotations

import pytest

from mode_jax.cli import main
from tests.helpers import assert_refused


def _fails(capsys, argv, out, *needles):
    return assert_refused(capsys, [*argv, "--out", str(out), "--quiet"], out, *needles)


def test_unknown_domain(tmp_path, capsys):
    _fails(capsys, ["train-expert", "--domain", "physics", "--preset", "smoke"], tmp_path / "run",
           "unknown domain 'physics'", "math, code, english")
    _fails(capsys, ["compose", "--uninit", "--domains", "math", "law", "--preset", "smoke"], tmp_path / "run",
           "unknown domain 'law'")
    _fails(capsys, ["finetune", "--method", "full", "--preset", "smoke", "--set", 'domains.targets=["math","art"]'],
           tmp_path / "run", "unknown domain 'art'")


def test_missing_data_names_the_command(tmp_path, capsys):
    empty = tmp_path / "no-data"
    line = _fails(capsys, ["train-expert", "--domain", "math", "--preset", "cpu", "--data-dir", str(empty)],
                  tmp_path / "run", "mode-jax data build")
    assert str(empty) in line


def test_missing_model_names_the_command(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty-cache"))
    _fails(capsys, ["reproduce", "--preset", "smoke", "--set", 'model.source="smollm2-135m"'], tmp_path / "run",
           "mode-jax fetch smollm2-135m")
    _fails(capsys, ["eval", "--preset", "smoke", "--model", str(tmp_path / "nope.gguf")], tmp_path / "run",
           "nope.gguf", "mode-jax fetch --list")


@pytest.mark.parametrize("override, needle", [
    ("train.steps=0", "config train.steps must be >= 1, got 0"),
    ("data.seq_len=1", "config data.seq_len must be in [2, 65536], got 1"),
    ("mode.gate_margin=-1.0", "config mode.gate_margin must be in [0.0, 100.0], got -1.0"),
    ("lr.mode=3", "config lr.mode must be in [1e-08, 1.0], got 3.0"),
    ("train.batch_size=3", "config train.batch_size=3 must be a multiple of the 2 target domains"),
    ("mode.expert_init=\"clone\"", "config mode.expert_init must be one of copy, random, got 'clone'"),
    ("model.layer_loop=\"while\"", "config model.layer_loop must be one of auto, scan, python, got 'while'"),
    ("train.stepz=3", "unknown config key train.stepz"),
    ("mode.n_blocks=3", "mode.n_blocks"),     # 4 tiny layers do not split into 3 blocks
])
def test_config_value_out_of_range(tmp_path, capsys, override, needle):
    _fails(capsys, ["finetune", "--method", "lora", "--preset", "smoke", "--set", override], tmp_path / "run", needle)


def test_other_bad_input(tmp_path, capsys):
    _fails(capsys, ["reproduce", "--preset", "nonesuch"], tmp_path / "run", "unknown preset 'nonesuch'", "smoke")
    _fails(capsys, ["reproduce", "--config", str(tmp_path / "missing.toml")], tmp_path / "run", "does not exist")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nsteps = 3\n")
    _fails(capsys, ["reproduce", "--config", str(bad)], tmp_path / "run", "not valid TOML")
    _fails(capsys, ["train-expert", "--domain", "math", "--preset", "smoke", "--resume"], tmp_path / "run",
           "is not a run directory")
    _fails(capsys, ["compose", "--experts", str(tmp_path / "missing.safetensors"), "--preset", "smoke"],
           tmp_path / "run", "does not exist")
    _fails(capsys, ["reproduce", "--preset", "smoke", "--only", "expert-art"], tmp_path / "run",
           "unknown phase 'expert-art'")
    _fails(capsys, ["reproduce", "--preset", "smoke", "--time-limit", "-5"], tmp_path / "run",
           "--time-limit must be > 0")
    _fails(capsys, ["eval", "--run", str(tmp_path / "no_such_dir"), "--preset", "smoke"], tmp_path / "run",
           "no_such_dir does not exist")
    (tmp_path / "unfinished").mkdir()
    _fails(capsys, ["eval", "--run", str(tmp_path / "unfinished"), "--preset", "smoke"], tmp_path / "run",
           "is not a finished run")


def test_existing_run_directory_is_not_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code = main(["train-expert", "--domain", "math", "--preset", "smoke", "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "already exists" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
