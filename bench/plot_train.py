"""Bar chart of a `bench/gpu_train.py --json ROWS` run: train-step tokens/s of ours and the
peer, with the 1.25x-the-peer target marked, and the MoDE block's speed-up over ref/.

    python bench/plot_train.py bench/results/h100-2026-11-24-train.jsonl --out bench/results/train_steps.png
"""

from __future__ import annotations

import argparse
import json
import os
import sys

TARGET = 1.25
# (our row's part, the peer row it is compared with, label)
PAIRS = (("full", "peer_full", "full fine-tuning"), ("mode", "peer_full", "MoDE 2x(3x2)\nvs peer full FT"),
         ("lora", "peer_lora", "LoRA r16 attn"))


def read_rows(path: str) -> dict[str, dict]:
    rows = {}
    with open(path) as fh:
        for n, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise SystemExit(f"{path}:{n}: not a JSON row ({err})")
            rows[row["run"] if row.get("part") == "block" else row.get("part")] = row
    missing = [p for pair in PAIRS for p in pair[:2] if p not in rows]
    if missing:
        raise SystemExit(f"{path}: no row for {sorted(set(missing))} (run gpu_train.py with --peer-json and --json)")
    return rows


def plot(rows: dict, out: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    for i, (ours, peer, label) in enumerate(PAIRS):
        o, p = rows[ours]["tokens_per_s"] / 1e3, rows[peer]["tokens_per_s"] / 1e3
        ax.barh(i + 0.2, p, height=0.38, color="#bbbbbb", label="peer (transformers + torch.compile)" if i == 0 else None)
        ax.barh(i - 0.2, o, height=0.38, color="#3b6ea8", label="ours (mode_jax.fast)" if i == 0 else None)
        ax.plot([TARGET * p] * 2, [i - 0.42, i + 0.42], color="#c0392b", lw=1.5,
                label=f"target {TARGET}x peer" if i == 0 else None)
        ax.text(o + 4, i - 0.2, f"{o:.0f}k  ({o / p:.2f}x)", va="center", fontsize=8)
    ax.set_yticks(range(len(PAIRS)), [label for *_, label in PAIRS])
    ax.invert_yaxis()
    ax.set_xlabel("train-step throughput, thousand tokens/s (batch 16 x 1024, bf16, AdamW)")
    ax.set_xlim(0, max(rows[k]["tokens_per_s"] for pair in PAIRS for k in pair[:2]) / 1e3 * 1.75)
    ax.legend(loc="lower right", fontsize=7)
    ax.set_title("SmolLM2-135M shape on one H100", fontsize=10)
    fig.tight_layout()
    tmp = out + ".tmp.png"
    fig.savefig(tmp, dpi=130)
    plt.close(fig)
    os.replace(tmp, out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("rows", help="JSON lines from bench/gpu_train.py --json")
    p.add_argument("--out", default="train_steps.png")
    args = p.parse_args(argv)
    if not os.path.exists(args.rows):
        raise SystemExit(f"{args.rows}: no such file")
    plot(read_rows(args.rows), args.out)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
