"""The GPU bench script's CPU smoke run: its correctness checks against ref/ (one train
step, one MoDE block in float32) must pass and it must print its table. Timings are not
looked at (they mean nothing on a CPU)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_train_small_runs_its_checks():
    env = {**os.environ, "XLA_FLAGS": ""}        # one CPU device, as a user would run it
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_train.py"), "--small", "--parts", "mode,block"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "check mode: loss" in proc.stdout and "check block: f32 fused" in proc.stdout
    assert "block fwd+bwd fast/ fused" in proc.stdout
