"""bench/cost_table.py --small on CPU: every row it prints has the parameter counts ref/costs.py
computes for the same configs, a compiled memory figure, positive timings, and the sparse-dispatch
saving of ref.costs.dispatch_flops; the per-row child process (the GPU path) works too."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mode_jax.ref import costs
from mode_jax.ref.config import LlamaConfig, ModeConfig
from tests.tolerances import APPROX_FLOAT64

ROOT = Path(__file__).resolve().parents[1]
TINY = LlamaConfig.tiny()


def run(*args, tmp_path):
    env = {**os.environ, "XLA_FLAGS": ""}        # one CPU device, as a user would run it
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "cost_table.py"), "--small", *args,
                           "--out", str(tmp_path)], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "cost_table.jsonl").read_text().splitlines()]
    return {r["row"]: r for r in rows}, (tmp_path / "cost_table.md").read_text()


@pytest.mark.slow
def test_cost_table_small(tmp_path):
    rows, md = run("--in-process", "--rows", "full,capacity-1x4,mode-2x-top1", tmp_path=tmp_path)
    assert rows["full"]["params_trained"] == rows["full"]["params_total"] == costs.backbone_params(TINY)
    cap = ModeConfig(n_blocks=2, expert_layers=2, n_experts=1)
    assert rows["capacity-1x4"]["params_trained"] == costs.trained_params("uninit", TINY, mode=cap)
    top1 = ModeConfig(n_blocks=2, expert_layers=1, n_experts=2, gate_top_k=1)     # the --small layout
    assert rows["mode-2x-top1"]["params_trained"] == costs.trained_params("stage2", TINY, mode=top1)
    assert rows["mode-2x-top1"]["params_total"] == costs.backbone_params(TINY) + costs.trained_params(
        "stage2", TINY, mode=top1)
    assert rows["mode-2x-top1"]["sparse_saving"] == pytest.approx(
        round(costs.dispatch_flops(TINY, top1, 16)["saved_fraction"], 4), **APPROX_FLOAT64)
    for r in rows.values():
        assert r["compiled_gib"] > 0 and r["step_ms"] > 0 and r["eval_tokens_per_s"] > 0
        assert f"| {r['row']} |" in md
    ratio = rows["capacity-1x4"]["step_ms"] / rows["full"]["step_ms"]
    assert f"| {rows['capacity-1x4']['step_ms']:.2f} | {ratio:.2f}x |" in md and "| 1.00x |" in md
    # Again into the same --out with one more row, in a child process (the GPU path): the rows
    # measured before are kept as they were, the new one added; a backbone row trains nothing.
    more, _ = run("--rows", "full,backbone", tmp_path=tmp_path)
    assert more["full"] == rows["full"] and set(more) == {"full", "capacity-1x4", "mode-2x-top1", "backbone"}
    assert more["backbone"]["params_trained"] == 0 and "step_ms" not in more["backbone"]
    assert more["backbone"]["params_total"] == costs.backbone_params(TINY)
