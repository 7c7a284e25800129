"""Training stops at the first non-finite loss, gradient norm or state: a one-line error
naming the step and the last good checkpoint, exit 2, no artifact and no result; --resume
with a lower learning rate goes on from that checkpoint.

A NaN cannot reach training through the inputs (loaded tensors are checked finite), so
the tests poison the step itself: `engine.train_loop` is wrapped so that from a chosen
step on the step's outputs turn non-finite, the way a diverging run's would."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mode_jax.cli import main
from mode_jax.pipeline import checkpoint, engine, presets, stages
from mode_jax.ref.optim import learning_rate
from tests.tolerances import assert_close

STEPS = 8
BASE = ["train-expert", "--domain", "math", "--preset", "smoke", "--quiet", "--steps", str(STEPS)]


def _poison(monkeypatch, *, from_step: int, what: str, lr_above: float = 0.0):
    """From step `from_step` (1-based) on, while the run's lr.mode > `lr_above`, the step
    returns `what` non-finite: "loss" (and the state it would produce), "grad_norm" (and
    the state), or "state" only (finite metrics: an update that overflowed)."""
    real = engine.train_loop

    def train_loop(run, *, steps, **kw):
        if run.config().lr.mode <= lr_above:
            return real(run, steps=steps, **kw)
        found = checkpoint.latest(run.checkpoints)
        done = [0 if found is None else checkpoint.step_of(found)]

        def step(t, f, o, batch):
            t, o, m = steps.train_step(t, f, o, batch)
            done[0] += 1
            if done[0] >= from_step:
                nan = jnp.float32(jnp.nan)
                if what != "state":
                    m = {**m, what: m[what] * nan if what == "loss" else jnp.float32(jnp.inf)}
                t = jax.tree.map(lambda x: x * nan, t)
            return t, o, m
        return real(run, steps=dataclasses.replace(steps, train_step=step), **kw)
    monkeypatch.setattr(engine, "train_loop", train_loop)


def _steps_logged(out):
    return [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]


def _refused(capsys, argv, out):
    assert main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert not (out / "result.json").exists() and not (out / "expert-math.safetensors").exists()
    return err[0]


@pytest.mark.parametrize("what, label", [("loss", "loss nan"), ("grad_norm", "gradient norm inf")])
def test_first_bad_step_is_named_though_checked_late(tmp_path, capsys, monkeypatch, what, label):
    # Metrics are read every 4 steps only; the poison starts at step 3: the error still
    # names step 3, and the step-2 checkpoint is the last good one (step 4's never written).
    _poison(monkeypatch, from_step=3, what=what)
    out = tmp_path / "run"
    line = _refused(capsys, [*BASE, "--set", "train.log_every=4", "--set", "train.checkpoint_every=2"], out)
    ckpt = checkpoint.latest(out / "checkpoints")
    assert "training stopped at step 3" in line and label in line, line
    assert f"last good checkpoint is {ckpt} (step 2)" in line, line
    assert checkpoint.step_of(ckpt) == 2 and checkpoint.list_checkpoints(out / "checkpoints") == [ckpt]
    assert not (out / "metrics.jsonl").exists()      # nothing was logged: step 4 was the first log point


def test_non_finite_state_is_never_checkpointed(tmp_path, capsys, monkeypatch):
    # Finite loss and gradient, overflowed weights after step 4, which is a checkpoint step.
    _poison(monkeypatch, from_step=4, what="state")
    out = tmp_path / "run"
    line = _refused(capsys, [*BASE, "--set", "train.checkpoint_every=4"], out)
    assert "training stopped at step 4" in line and "parameters or optimizer state" in line, line
    assert "no checkpoint was written" in line, line
    assert checkpoint.list_checkpoints(out / "checkpoints") == []
    assert _steps_logged(out) == [1, 2, 3, 4]       # the loss was finite up to there


def test_resume_with_lower_lr_goes_on_from_the_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    flags = ["--set", "train.checkpoint_every=4"]
    clean = tmp_path / "clean"
    assert main([*BASE, *flags, "--out", str(clean)]) == 0          # lr.mode 1e-2, never poisoned
    # Diverges from step 6 on at lr.mode 1e-2; at 4e-3 it does not.
    _poison(monkeypatch, from_step=6, what="loss", lr_above=5e-3)
    out = tmp_path / "run"
    line = _refused(capsys, [*BASE, *flags], out)
    assert "training stopped at step 6" in line and "(step 4)" in line and "--set lr.mode=" in line, line

    # A key the state depends on still may not change.
    assert main([*BASE, *flags, "--set", "lr.mode=4e-3", "--seed", "1", "--out", str(out), "--resume"]) == 2
    assert "train.seed: 0 vs 1" in capsys.readouterr().err
    assert main([*BASE, *flags, "--set", "lr.mode=4e-3", "--out", str(out), "--resume"]) == 0
    assert "lr.mode" in capsys.readouterr().err            # the changed key is reported
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(x) for x in (clean / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(1, STEPS + 1))
    keys = ("loss", "grad_norm", "lr", "tokens_seen")
    # Steps 1-4 are the clean run's (restored from its checkpoint, nothing re-run) ...
    assert [[m[k] for k in keys] for m in lines[:4]] == [[m[k] for k in keys] for m in ref[:4]]
    # ... steps 5-8 ran with the new schedule (same warmup and decay, peak 4e-3) ...
    opt = stages.optim(presets.load_config(config=str(out / "config.toml")), 4e-3, STEPS)
    assert opt.learning_rate == 4e-3          # config.toml now holds the config the run goes on with
    for m in lines[4:]:
        assert_close(np.float32(m["lr"]), learning_rate(m["step"] - 1, opt))
        assert np.isfinite(m["loss"]) and m["lr"] < ref[m["step"] - 1]["lr"]
    # ... continuing from the clean state at step 4: the step-5 loss (computed before its
    # update) is the clean run's, the later ones are not.
    np.testing.assert_array_equal(lines[4]["loss"], ref[4]["loss"])
    assert lines[7]["loss"] != ref[7]["loss"]
    assert (out / "result.json").exists() and (out / "expert-math.safetensors").exists()
