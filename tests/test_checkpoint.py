"""Orbax checkpoints (mode_jax/pipeline/checkpoint.py) on the 8 forced CPU devices.

* checkpoint.save/restore: arrays sharded over a dp=4,fsdp=2 mesh come back bit-equal on
  an fsdp=8 mesh and on one device, with the target's shardings; a killed save's
  temporary directory is never taken for a checkpoint and is cleaned by the next save;
  a checkpoint that does not fit the run is a one-line error.
* Lifetime: while a phase trains only its newest checkpoint exists; once its artifact
  and result are written its checkpoints are deleted, unless --keep-checkpoints.
* Through the CLI: train-expert on `--mesh dp=4,fsdp=2` killed with SIGKILL mid-run,
  resumed on `--mesh fsdp=8` and on one device, ends with the uninterrupted run's expert
  (float32 tolerance table).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file

from mode_jax.cli import main
from mode_jax.errors import UserError
from mode_jax.pipeline import checkpoint
from tests.helpers import kill_after_checkpoint
from tests.tolerances import assert_close

META = {"phase": "p", "tokens_seen": 512, "data_position": 4, "seed": 3}


def _state(sharding_2d, sharding_1d, sharding_0d):
    """A trainable tree and an optimizer-like state with None placeholders (frozen parts)
    and a scalar count, laid out with the given shardings."""
    w = jax.random.normal(jax.random.key(1), (8, 16))
    b = jax.random.normal(jax.random.key(2), (8,))
    trainable = {"blocks": {"w": jax.device_put(w, sharding_2d), "b": jax.device_put(b, sharding_1d)},
                 "backbone": None}
    opt = {"mu": {"blocks": {"w": jax.device_put(w * 0.5, sharding_2d), "b": jax.device_put(b - 1, sharding_1d)},
                  "backbone": None},
           "count": jax.device_put(jnp.int32(4), sharding_0d)}
    return trainable, opt


def test_sharded_save_restores_on_other_layouts(tmp_path):
    assert jax.device_count() == 8
    mesh = jax.make_mesh((4, 2), ("dp", "fsdp"))
    trainable, opt = _state(NamedSharding(mesh, P("dp", "fsdp")), NamedSharding(mesh, P("fsdp")),
                            NamedSharding(mesh, P()))
    path = checkpoint.save(tmp_path, step=4, trainable=trainable, opt_state=opt, meta=META)
    assert checkpoint.latest(tmp_path) == path and checkpoint.step_of(path) == 4
    assert checkpoint.read_meta(path) == {**META, "step": 4}

    fsdp8 = jax.make_mesh((8,), ("fsdp",))
    one = jax.sharding.SingleDeviceSharding(jax.devices()[3])
    for shardings in [(NamedSharding(fsdp8, P(None, "fsdp")), NamedSharding(fsdp8, P("fsdp")),
                       NamedSharding(fsdp8, P())), (one, one, one)]:
        t_like, o_like = _state(*shardings)
        t_like, o_like = jax.tree.map(jnp.zeros_like, (t_like, o_like))     # only shapes and shardings count
        t, o, meta = checkpoint.restore(path, trainable_template=t_like, opt_template=o_like)
        assert meta == {**META, "step": 4}
        assert t["backbone"] is None and o["mu"]["backbone"] is None
        for got, want, like in zip(jax.tree.leaves((t, o)), jax.tree.leaves((trainable, opt)),
                                   jax.tree.leaves((t_like, o_like))):
            assert got.sharding == like.sharding
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_killed_save_is_ignored_and_only_the_newest_is_kept(tmp_path):
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    trainable, opt = _state(one, one, one)
    checkpoint.save(tmp_path, step=2, trainable=trainable, opt_state=opt, meta=META)
    # What a save killed mid-write leaves: orbax's temporary directory, never renamed.
    tmp = tmp_path / "step-00000004.orbax-checkpoint-tmp-1234"
    (tmp / "state").mkdir(parents=True)
    assert [checkpoint.step_of(p) for p in checkpoint.list_checkpoints(tmp_path)] == [2]
    doubled = jax.tree.map(lambda x: x * 2, trainable)
    newest = checkpoint.save(tmp_path, step=4, trainable=doubled, opt_state=opt, meta=META)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000004"]
    t, _, _ = checkpoint.restore(newest, trainable_template=trainable, opt_template=opt)
    np.testing.assert_array_equal(np.asarray(t["blocks"]["w"]), 2 * np.asarray(trainable["blocks"]["w"]))


def test_checkpoint_of_another_state_is_refused(tmp_path):
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    trainable, opt = _state(one, one, one)
    path = checkpoint.save(tmp_path, step=2, trainable=trainable, opt_state=opt, meta=META)
    wider = {**trainable, "blocks": {**trainable["blocks"], "w": jnp.zeros((8, 32))}}
    extra = {**trainable, "gates": jnp.zeros(3)}
    for t_like in (wider, extra):
        with pytest.raises(UserError, match="does not fit this run's training state") as err:
            checkpoint.restore(path, trainable_template=t_like, opt_template=opt)
        assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------- CLI
STEPS = 6


def _watch_saves(monkeypatch):
    """The checkpoint directory's contents right after each save of the run."""
    seen, real = [], checkpoint.save

    def save(directory, **kw):
        path = real(directory, **kw)
        seen.append(sorted(p.name for p in Path(directory).iterdir()))
        return path
    monkeypatch.setattr(checkpoint, "save", save)
    return seen


@pytest.mark.parametrize("keep", [False, True])
def test_a_phase_keeps_its_last_checkpoint_and_deletes_them_when_done(tmp_path, monkeypatch, keep):
    seen = _watch_saves(monkeypatch)
    out = tmp_path / "run"
    argv = ["train-expert", "--domain", "math", "--out", str(out), "--preset", "smoke", "--quiet",
            "--steps", str(STEPS), "--set", "train.checkpoint_every=2"]
    assert main(argv + (["--keep-checkpoints"] if keep else [])) == 0
    assert seen == [["step-00000002"], ["step-00000004"]]        # the final step needs none
    assert (out / "expert-math.safetensors").is_file() and (out / "result.json").is_file()
    if keep:
        assert [p.name for p in checkpoint.list_checkpoints(out / "checkpoints")] == ["step-00000004"]
    else:
        assert not (out / "checkpoints").exists()


def test_finetune_deletes_its_checkpoints_when_done(tmp_path, monkeypatch):
    seen = _watch_saves(monkeypatch)
    out = tmp_path / "run"
    assert main(["finetune", "--method", "lora", "--out", str(out), "--preset", "smoke", "--quiet",
                 "--steps", "3", "--set", "train.checkpoint_every=2"]) == 0
    assert seen == [["step-00000002"]] and (out / "model.safetensors").is_file()
    assert not (out / "checkpoints").exists()
ARGS = ["--preset", "smoke", "--quiet", "--steps", str(STEPS), "--set", "train.batch_size=8",
        "--set", "train.checkpoint_every=2"]


def _cmd(out, *extra):
    return [sys.executable, "-m", "mode_jax.cli", "train-expert", "--domain", "math", "--out", str(out),
            *ARGS, *extra]


@pytest.mark.slow
def test_sigkill_on_one_mesh_resume_on_another_and_on_one_device(tmp_path):
    # The subprocesses inherit the 8 forced CPU devices (tests/conftest.py sets XLA_FLAGS)
    # and share a persistent compilation cache (same executables, loaded not recompiled).
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax-cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    first = ["--mesh", "dp=4,fsdp=2"]
    straight = tmp_path / "straight"
    subprocess.run(_cmd(straight, *first), check=True, env=env, timeout=300)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(killed, *first, "--throttle", "0.4"), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        kill_after_checkpoint([proc], killed, 4)
    finally:
        proc.kill()
    assert not (killed / "result.json").exists()
    other = tmp_path / "other"
    shutil.copytree(killed, other)

    want = load_file(str(straight / "expert-math.safetensors"))
    curve = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    for run, flags in ((killed, ["--mesh", "fsdp=8"]), (other, [])):
        subprocess.run(_cmd(run, *flags, "--resume"), check=True, env=env, timeout=300)
        got = load_file(str(run / "expert-math.safetensors"))
        assert got.keys() == want.keys()
        for name in want:
            assert_close(got[name], want[name], err_msg=name)
        lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in lines] == list(range(1, STEPS + 1))
        # Steps 1-4 ran on the first mesh before the kill: the very same numbers.
        assert [m["loss"] for m in lines[:4]] == [m["loss"] for m in curve[:4]]
        assert_close(np.array([m["loss"] for m in lines]), np.array([m["loss"] for m in curve]))
        assert [m["tokens_seen"] for m in lines] == [m["tokens_seen"] for m in curve]
