"""Helpers shared by the test files (tolerances live in tests/tolerances.py).

* `assert_refused`: the contract every refused CLI call keeps: exit code 2, one line on
  stderr naming what is wrong, no traceback, and nothing written.
* `stage1_expert`: a small expert built the way the library builds one, on the smoke
  preset's tiny backbone, so it composes with the smoke runs unless altered.
* `tensor_data_start`: where the tensor bytes of a safetensors file begin (to damage them).
* `assert_checks_not_traced`: chex's shape checks leave nothing in a traced program.
"""

from __future__ import annotations

import struct
from pathlib import Path

from mode_jax.cli import main


def assert_refused(capsys, argv, out, *needles) -> str:
    """Run `mode-jax argv`; assert it was refused as above, that the line contains every
    needle and that `out` was not created. Returns the line."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not out.exists()
    return lines[0]


def stage1_expert(*, d_model=32, n_layers=4, n_blocks=2, expert_layers=1, model_seed=0, key=3, domain="math"):
    """A stage-1 expert on the smoke preset's tiny backbone (optionally altered), untrained
    but with random non-trivial gates, as the library builds it."""
    import jax

    from mode_jax.pipeline import expert_io, presets, sources
    from mode_jax.ref.llama import init_llama
    from mode_jax.ref.methods import init_method

    cfg = presets.load_config(preset="smoke", overrides=[f"mode.n_blocks={n_blocks}",
                                                         f"mode.expert_layers={expert_layers}"])
    llama = sources.tiny_config(d_model=d_model, n_layers=n_layers, vocab_size=259)
    backbone = init_llama(jax.random.key(model_seed), llama)
    params = init_method("stage1", jax.random.key(key), backbone, llama, mode=sources.mode_config(cfg, 1))
    for i, block in enumerate(params["blocks"]):
        block["gate_w"] = jax.random.normal(jax.random.key(100 + i), block["gate_w"].shape)
    return expert_io.from_stage1(params, domain=domain, llama=llama, mode=sources.mode_config(cfg, 1),
                                 fingerprint=sources.fingerprint(backbone), training={"steps": 0})


def tensor_data_start(path: Path) -> int:
    """Byte offset of the first tensor byte of a safetensors file: an 8-byte little-endian
    header length, the JSON header, then the data."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
    return 8 + header_len


def kill_after_checkpoint(procs, run_dir: Path, step: int, *, timeout: float = 240.0) -> None:
    """SIGKILL `procs[0]` (a training command run with --throttle) once its step-`step`
    checkpoint exists and a later step has been logged after it, so a resumed run must
    both restore the state and drop the lines logged past the checkpoint. Every process
    in `procs` must still be running until then; the others are left to the caller."""
    import json
    import signal
    import time

    from mode_jax.pipeline import checkpoint

    ckpt, metrics = run_dir / "checkpoints" / f"step-{step:08d}", run_dir / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if ckpt.is_dir() and metrics.exists():
            logged = [json.loads(x)["step"] for x in metrics.read_text().splitlines() if x.strip()]
            if max(logged) > step:
                break
        for p in procs:
            assert p.poll() is None, f"a training process ended early (exit {p.returncode})"
        time.sleep(0.05)
    else:
        raise AssertionError(f"the run never reached its step-{step} checkpoint in {timeout} s")
    procs[0].send_signal(signal.SIGKILL)
    procs[0].wait(timeout=30)
    assert procs[0].returncode == -signal.SIGKILL
    assert checkpoint.latest(run_dir / "checkpoints") == ckpt


def assert_checks_not_traced(trace) -> None:
    """`trace()` (e.g. str of a `jax.make_jaxpr`) is the same with chex's assertions on and off:
    the checks are static, read while tracing, and cost the compiled program nothing."""
    import chex

    with_checks = trace()
    chex.disable_asserts()
    try:
        without = trace()
    finally:
        chex.enable_asserts()
    assert with_checks == without
