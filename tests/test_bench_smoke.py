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
    assert "one bf16 1024^3 matmul:" in proc.stdout and "MFU/mm" in proc.stdout


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


def test_shapes_report_reads_the_stored_run(tmp_path):
    """bench/shapes_report.py on the committed three-shape run: the ratios are the step times'
    ratios, the matmul-kernel throughput is the weight-matmul FLOPs (counted here from the shape)
    over the profile's matmul time, and a missing half of the run is refused."""
    import json
    import shutil
    run = ROOT / "bench" / "results" / "h200-2026-12-02-shapes"
    out = tmp_path / "shapes.png"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "shapes_report.py"), str(run), "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = proc.stdout.splitlines()
    for name, d, f, layers, heads, kv in (("135m", 576, 1536, 30, 9, 3), ("1.7b", 2048, 8192, 24, 32, 32)):
        rows = {r["part"]: r for r in map(json.loads, (run / f"ours_{name}.jsonl").read_text().splitlines())}
        ratio = rows["peer_lora"]["step_ms"] / rows["lora"]["step_ms"]
        lora = next(line for line in lines if line.startswith(f"| {name} | **ours LoRA"))
        assert f"{ratio:.2f}x peer LoRA" in lora
        # full FT: 6 FLOPs per weight entry per token (layers' q,k,v,o,gate,up,down and the tied head)
        per_layer = d * heads * 64 * 2 + 2 * d * kv * 64 + 3 * d * f
        weights = 6 * (layers * per_layer + d * 49152) * 16 * 1024
        matmul_ms = next(float(line.split()[1]) for line in
                         (run / f"ours_{name}.txt").read_text().split("--- profile: ours full FT")[1].splitlines()
                         if line.startswith("matmul "))
        full = next(line for line in lines if line.startswith(f"| {name} | **ours full FT"))
        assert full.split(" | ")[5] == f"{weights / (matmul_ms / 1e3) / 1e12:.0f}"
    half = tmp_path / "half"
    shutil.copytree(run, half)
    (half / "peer_360m.jsonl").unlink()
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "shapes_report.py"), str(half)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "peer_360m.jsonl: no such file" in proc.stderr


def test_profile_categories_are_read_back():
    """profile_summary.read_categories reads the category table of each printed profile and stops
    at its kernel table; lines of other output are ignored."""
    sys.path.insert(0, str(ROOT / "bench"))
    import profile_summary
    text = "\n".join([
        "[  1.0s] compiling", "--- profile: ours A", "GPU busy 10.00 ms per step (step 11.00 ms, idle 1.00 ms)",
        "category              ms/step  share", "matmul                   6.25  62.5%",
        "elementwise fusion       3.75  37.5%", "kernel   ms/step calls/step", "gemm_fusion_dot_1   3.000   2.0",
        "--- profile: ours B", "GPU busy 2.00 ms per step", "category              ms/step  share",
        "attention                2.00 100.0%", "", "run   compile s  step ms"])
    assert profile_summary.read_categories(text) == {
        "ours A": {"matmul": 6.25, "elementwise fusion": 3.75}, "ours B": {"attention": 2.0}}
