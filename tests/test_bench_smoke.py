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


def test_plot_train_draws_the_stored_run(tmp_path):
    out = tmp_path / "plot.png"
    script = ROOT / "bench" / "plot_train.py"
    rows = ROOT / "bench" / "results" / "h100-2026-11-24-train.jsonl"
    proc = subprocess.run([sys.executable, str(script), str(rows), "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    bad = tmp_path / "rows.jsonl"
    bad.write_text('{"run": "ours full FT", "part": "full", "tokens_per_s": 1.0}\n')
    proc = subprocess.run([sys.executable, str(script), str(bad), "--out", str(tmp_path / "x.png")],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "no row for" in proc.stderr and not (tmp_path / "x.png").exists()


def test_gpu_generate_small_runs_its_check():
    """bench/gpu_generate.py --small: fast/ greedy == ref/ on a small MoDE model, then one JSON row
    per model with the peer's keys."""
    import json
    env = {**os.environ, "XLA_FLAGS": ""}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_generate.py"), "--small"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "check: fast f32 greedy == ref/" in proc.stdout
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["part"] for r in rows] == ["backbone", "mode"]
    for r in rows:
        assert {"batch", "prompt", "new", "total_s", "ttft_s", "decode_tok_s", "ms_per_step"} <= set(r)
        assert r["decode_tok_s"] > 0 and r["total_s"] > r["ttft_s"] > 0
