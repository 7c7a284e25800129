"""Multi-process training and checkpoints on localhost: 2 processes x 4 CPU devices joined
by `jax.distributed.initialize` (--coordinator 127.0.0.1:PORT) train a tiny MoDE expert on
one `--mesh dp=4,fsdp=2` spanning both. One process is SIGKILLed mid-run (after a
checkpoint, with a step logged past it); both restart with --resume and end with the
expert of an uninterrupted run of the same mesh (float32 tolerance table). Each process
writes its own shards of the checkpoint; only process 0 writes the run's other files.
MPMD (`--placement`) across processes is refused in one line."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import pytest
from safetensors.numpy import load_file

from tests.helpers import kill_after_checkpoint
from tests.tolerances import assert_close

STEPS = 6
ARGS = ["train-expert", "--domain", "math", "--preset", "smoke", "--quiet", "--steps", str(STEPS),
        "--set", "train.batch_size=8", "--set", "train.checkpoint_every=2", "--mesh", "dp=4,fsdp=2"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(tmp_path, devices: int) -> dict:
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
            "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax-cache"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


def _start_pair(tmp_path, out, tag, *extra, args=ARGS) -> list[subprocess.Popen]:
    """Processes 0 and 1 of one run; their output goes to files (a full pipe would block them)."""
    port = _free_port()
    procs = []
    for i in range(2):
        log = open(tmp_path / f"{tag}-{i}.log", "wb")
        cmd = [sys.executable, "-m", "mode_jax.cli", *args, "--out", str(out), "--coordinator",
               f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i), *extra]
        procs.append(subprocess.Popen(cmd, env=_env(tmp_path, 4), stdout=log, stderr=subprocess.STDOUT))
        log.close()
    return procs


def _kill_all(procs) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
    for p in procs:
        p.wait(timeout=30)


@pytest.mark.slow
def test_two_processes_sigkill_one_resume_both(tmp_path):
    straight = tmp_path / "straight"      # the same mesh of 8 devices, in one process, never stopped
    subprocess.run([sys.executable, "-m", "mode_jax.cli", *ARGS, "--out", str(straight)], check=True,
                   env=_env(tmp_path, 8), timeout=300)

    out = tmp_path / "run"
    procs = _start_pair(tmp_path, out, "killed", "--throttle", "0.4")
    try:
        # Kill process 1 (it holds half of every sharded array); process 0 then waits in a
        # collective that never completes, so it goes too: both restart.
        kill_after_checkpoint([procs[1], procs[0]], out, 4)
    finally:
        _kill_all(procs)
    assert not (out / "result.json").exists()
    shards = sorted(p.name for p in (out / "checkpoints" / "step-00000004" / "state").glob("ocdbt.process_*"))
    assert shards == ["ocdbt.process_0", "ocdbt.process_1"]          # each process wrote its own

    procs = _start_pair(tmp_path, out, "resumed", "--resume")
    try:
        for i, p in enumerate(procs):
            assert p.wait(timeout=300) == 0, (tmp_path / f"resumed-{i}.log").read_text()[-3000:]
    finally:
        _kill_all(procs)

    want, got = load_file(str(straight / "expert-math.safetensors")), load_file(str(out / "expert-math.safetensors"))
    assert got.keys() == want.keys()
    for name in want:
        assert_close(got[name], want[name], err_msg=name)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(1, STEPS + 1))     # written once, by process 0
    for m, r in zip(lines, ref):
        assert_close(m["loss"], r["loss"], err_msg=f"step {m['step']}")
        assert m["tokens_seen"] == r["tokens_seen"]
    assert not (out / "checkpoints").exists()                        # the finished phase deleted them


def test_mpmd_across_processes_is_refused_in_one_line(tmp_path):
    """MPMD needs every sub-mesh in one process (docs/distributed.md): across 2 processes
    `--placement` is refused with exit 2 and one line, before the run directory is written."""
    out = tmp_path / "mpmd"
    args = [a for a in ARGS if a not in ("--mesh", "dp=4,fsdp=2")]
    procs = _start_pair(tmp_path, out, "mpmd", "--placement", "backbone=0-3;experts=4-7", args=args)
    try:
        codes = [p.wait(timeout=120) for p in procs]
    finally:
        _kill_all(procs)
    for i, code in enumerate(codes):
        log = (tmp_path / f"mpmd-{i}.log").read_text()
        errors = [line for line in log.splitlines() if "error:" in line]
        assert code == 2, log[-3000:]
        assert errors == ["mode-jax train-expert: error: MPMD (--placement) runs in one process, not 2: "
                          "across processes use --mesh (SPMD)"], log[-3000:]
    assert not out.exists()
