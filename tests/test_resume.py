"""Kill-and-resume: a run killed with SIGKILL mid-way (after a checkpoint, with steps
logged past it) and resumed with --resume ends with the same loss curve and bit-identical
final weights as a run that was never interrupted (same device, same config)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from mode_jax.pipeline import checkpoint
from tests.helpers import kill_after_checkpoint

STEPS = 6
ARGS = ["--preset", "smoke", "--quiet", "--set", "train.checkpoint_every=2"]


def _cmd(kind: str, out, *extra) -> list[str]:
    if kind == "train-expert":
        head = ["train-expert", "--domain", "math"]
    else:
        head = ["finetune", "--method", "lora"]
    return [sys.executable, "-m", "mode_jax.cli", *head, "--steps", str(STEPS), "--out", str(out), *ARGS, *extra]


def _curve(run_dir):
    keys = ("phase", "step", "loss", "accuracy", "lr", "grad_norm", "tokens_seen")
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [tuple(m[k] for k in keys) for m in lines]


def _weights(run_dir, kind):
    name = "expert-math.safetensors" if kind == "train-expert" else "model.safetensors"
    return load_file(str(run_dir / name))


@pytest.mark.parametrize("kind", ["train-expert", "finetune-lora"])
def test_sigkill_then_resume_matches_uninterrupted(tmp_path, kind):
    # A shared persistent compilation cache: the three processes run the same executables
    # (loaded, not recompiled), which saves time and changes no number.
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax-cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    straight = tmp_path / "straight"
    subprocess.run(_cmd(kind, straight), check=True, env=env, timeout=300)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(kind, killed, "--throttle", "0.4"), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    kill_after_checkpoint([proc], killed, 4)
    assert not (killed / "result.json").exists()
    logged = [json.loads(x)["step"] for x in (killed / "metrics.jsonl").read_text().splitlines()]
    assert max(logged) < STEPS

    subprocess.run(_cmd(kind, killed, "--resume"), check=True, env=env, timeout=300)

    assert _curve(killed) == _curve(straight)
    assert [c[1] for c in _curve(killed)] == list(range(1, STEPS + 1))
    a, b = _weights(straight, kind), _weights(killed, kind)
    assert a.keys() == b.keys()
    for name in a:
        assert np.array_equal(a[name], b[name]), name
    ra = json.loads((straight / "result.json").read_text())["domains"]
    rb = json.loads((killed / "result.json").read_text())["domains"]
    assert ra == rb


def test_time_limit_stops_cleanly_and_resume_finishes_identically(tmp_path):
    """--time-limit (how a long preset is split into several calls) checkpoints and exits 0;
    the same command with --resume finishes the run exactly as if it never stopped."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax-cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    straight, split = tmp_path / "straight", tmp_path / "split"
    subprocess.run(_cmd("train-expert", straight), check=True, env=env, timeout=300)
    first = subprocess.run(_cmd("train-expert", split, "--throttle", "1.0", "--time-limit", "2"), env=env,
                           timeout=300, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "time limit" in first.stderr and not (split / "result.json").exists()
    stopped_at = checkpoint.read_meta(checkpoint.latest(split / "checkpoints"))["step"]
    assert 0 <= stopped_at < STEPS
    subprocess.run(_cmd("train-expert", split, "--resume"), check=True, env=env, timeout=300)
    assert _curve(split) == _curve(straight)
    a, b = _weights(straight, "train-expert"), _weights(split, "train-expert")
    assert all(np.array_equal(a[k], b[k]) for k in a)

