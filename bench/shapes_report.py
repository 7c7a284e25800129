"""The three-shape speed table of issue 16 from a `bench/shapes.sh OUT` directory: step time,
tokens/s, MFU, the throughput of the matmul kernels, memory, compile time and the ratio to the
peer against its target, then where each of our steps spends its GPU time (the profiles), as
Markdown on stdout and a two-panel picture.

    python bench/shapes_report.py bench/results/h200-2026-12-02-shapes --out bench/results/shapes.png

Matmul-kernel TFLOP/s = the FLOPs of the weight matmuls (gpu_train.flops_per_token without
attention) / the time the profile puts in matmul kernels: how close the matmuls themselves run
to the datasheet peak, against how much of the step is not matmuls at all. Needs, per shape,
ours_<shape>.jsonl (with the peer's rows, as gpu_train.py --peer-json writes them),
ours_<shape>.txt (its printed log, holding the profiles) and peer_<shape>.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import profile_summary  # noqa: E402  (bench/ siblings)
from gpu_train import LORA, flops_per_token, mode_config, model_config  # noqa: E402
from shapes import SHAPES  # noqa: E402

from mode_jax.atomic import atomic_path  # noqa: E402

PARTS = (("full", "peer_full"), ("mode", "peer_full"), ("lora", "peer_lora"))
LABELS = {"full": "full FT", "mode": "MoDE 2x", "lora": "LoRA r16 attn"}
# issue 16's targets: ours / the compiled peer, per shape and part
TARGETS = {"135m": {"full": 1.6, "mode": 1.6, "lora": 2.0}, "360m": dict.fromkeys(LABELS, 1.3),
           "1.7b": dict.fromkeys(LABELS, 1.3)}
MODE_OVER_FULL = 1.05                          # MoDE's step at most this times our full FT's
SHOWN = ("matmul", "attention", "elementwise fusion", "reduction fusion")


def _jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        raise SystemExit(f"{path}: no such file (run bench/shapes.sh OUT peer|ours SHAPE)")
    rows = []
    with open(path) as fh:
        for n, line in enumerate(fh, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise SystemExit(f"{path}:{n}: not a JSON row ({err})")
    return rows


def read_shape(root: str, shape: str) -> dict:
    """{part: row} for ours and the peer at one shape, each of ours with its profile categories
    and its matmul-kernel TFLOP/s; the peer rows with their peak memory."""
    rows = {r["part"]: r for r in _jsonl(os.path.join(root, f"ours_{shape}.jsonl"))}
    peer = {f"peer_{r['mode']}": r for r in _jsonl(os.path.join(root, f"peer_{shape}.jsonl"))}
    with open(os.path.join(root, f"ours_{shape}.txt")) as fh:
        profiles = profile_summary.read_categories(fh.read())
    missing = sorted({p for pair in PARTS for p in pair} - set(rows)) + sorted({"peer_full", "peer_lora"} - set(peer))
    if missing:
        raise SystemExit(f"{root}: no row for {missing} at shape {shape} (ours_{shape}.jsonl, peer_{shape}.jsonl)")
    cfg = model_config(False, shape=shape)
    mode = mode_config(False, shape)
    seq = next(iter(peer.values()))["seq"]                    # both sides ran batch x seq
    for part, _ in PARTS:
        row = rows[part]
        tokens = round(row["tokens_per_s"] * row["step_ms"] / 1e3)
        counted = flops_per_token(part, cfg, seq, mode=mode, lora=LORA) * tokens / 1e12
        if abs(counted - row["tflop_per_step"]) > 1e-6 * counted:
            raise SystemExit(f"ours_{shape}.jsonl: {part}'s {row['tflop_per_step']:.4f} TFLOP/step is not this "
                             f"shape's count ({counted:.4f}); was it run with other MoDE / LoRA settings?")
        if row["run"] not in profiles:
            raise SystemExit(f"ours_{shape}.txt: no profile for {row['run']!r} (run shapes.sh, which profiles)")
        row["profile"] = profiles[row["run"]]
        weights = flops_per_token(part, cfg, seq, attention=False, mode=mode, lora=LORA) * tokens
        row["kernel_tflops"] = weights / (row["profile"]["matmul"] / 1e3) / 1e12
    for name in ("peer_full", "peer_lora"):
        rows[name]["mem_gb"] = peer[name]["peak_mem_gb"]
    return rows


def table(shapes: dict[str, dict]) -> str:
    def mfu(r):        # against the datasheet; against the run's measured matmul where it has one
        return f"{r['mfu']:.1%}" + (f" ({r['mfu_matmul']:.0%})" if "mfu_matmul" in r else "")
    out = ["| shape | run | step ms | tokens/s | MFU (vs matmul) | matmul kernels TFLOP/s | memory GiB | compile s | ratio (target) |",
           "|---|---|---|---|---|---|---|---|---|"]
    for shape, rows in shapes.items():
        for part in ("peer_full", "peer_lora"):
            r = rows[part]
            out.append(f"| {shape} | peer {'full FT' if part == 'peer_full' else 'LoRA r16 attn'}, compiled | "
                       f"{r['step_ms']:.1f} | {r['tokens_per_s'] / 1e3:.0f}k | {mfu(r)} | - | "
                       f"{r['mem_gb']:.1f} | {r['compile_s']:.0f} | |")
        for part, peer in PARTS:
            r, want = rows[part], TARGETS.get(shape, {}).get(part)
            ratio = rows[peer]["step_ms"] / r["step_ms"]
            verdict = f"{ratio:.2f}x peer {'LoRA' if peer == 'peer_lora' else 'full'}"
            if want:
                verdict += f" ({want}x): {'met' if ratio >= want else '**not met**'}"
            if part == "mode":
                over = r["step_ms"] / rows["full"]["step_ms"]
                verdict += (f"; {over:.2f}x our full ({MODE_OVER_FULL}x): "
                            f"{'met' if over <= MODE_OVER_FULL else '**not met**'}")
            out.append(f"| {shape} | **ours {LABELS[part]}** | {r['step_ms']:.1f} | {r['tokens_per_s'] / 1e3:.0f}k | "
                       f"{mfu(r)} | {r['kernel_tflops']:.0f} | {r['mem_gb']:.1f} | {r['compile_s']:.0f} | {verdict} |")
    return "\n".join(out)


def pieces(row: dict) -> dict[str, float]:
    """One of our steps split into ms: the SHOWN kernel kinds, the other kernels, and idle time
    (step time minus GPU busy time)."""
    prof = row["profile"]
    split = {k: prof.get(k, 0.0) for k in SHOWN}
    split["other kernels"] = sum(v for k, v in prof.items() if k not in SHOWN)
    split["idle"] = max(row["step_ms"] - sum(prof.values()), 0.0)
    return split


def profile_table(shapes: dict[str, dict]) -> str:
    out = ["| shape | run | step ms | " + " | ".join(SHOWN) + " | other kernels | idle |",
           "|---|---|---|" + "---|" * (len(SHOWN) + 2)]
    for shape, rows in shapes.items():
        for part, _ in PARTS:
            step, split = rows[part]["step_ms"], pieces(rows[part])
            cells = [f"{split[k]:.1f} ({split[k] / step:.0%})" for k in SHOWN]
            out.append(f"| {shape} | ours {LABELS[part]} | {step:.1f} | " + " | ".join(cells)
                       + f" | {split['other kernels']:.1f} | {split['idle']:.1f} |")
    return "\n".join(out)


def plot(shapes: dict[str, dict], out: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.6), gridspec_kw={"width_ratios": [1, 1.3]})
    colors = {"full": "#3b6ea8", "mode": "#d08c2f", "lora": "#4a9a5b"}
    for i, (shape, rows) in enumerate(shapes.items()):
        for j, (part, peer) in enumerate(PARTS):
            x = i + (j - 1) * 0.27
            ratio = rows[peer]["step_ms"] / rows[part]["step_ms"]
            left.bar(x, ratio, width=0.25, color=colors[part], label=LABELS[part] if i == 0 else None)
            want = TARGETS.get(shape, {}).get(part)
            if want:
                left.plot([x - 0.12, x + 0.12], [want] * 2, color="#c0392b", lw=2,
                          label="target" if i == 0 and j == 0 else None)
            left.text(x, ratio + 0.03, f"{ratio:.2f}", ha="center", fontsize=7)
    left.axhline(1.0, color="#777", lw=0.8, ls=":")
    left.set_xticks(range(len(shapes)), [f"SmolLM2-{s.upper()}" for s in shapes])
    left.set_ylabel("speed-up over the compiled peer (step time)")
    left.set_title("ours / transformers (+PEFT) with torch.compile", fontsize=9)
    left.legend(fontsize=7, loc="upper right")

    palette = {"matmul": "#3b6ea8", "attention": "#8e5ea2", "elementwise fusion": "#d08c2f",
               "reduction fusion": "#c9b037", "other kernels": "#999999", "idle": "#dddddd"}
    labels, y = [], 0
    for shape, rows in shapes.items():
        for part, _ in PARTS:
            r = rows[part]
            step, start = r["step_ms"], 0.0
            for k, v in pieces(r).items():
                right.barh(y, v / step, left=start, color=palette[k], label=k if y == 0 else None)
                start += v / step
            right.text(1.01, y, f"MFU {r['mfu']:.0%}", va="center", fontsize=7)
            labels.append(f"{shape} {LABELS[part]}")
            y += 1
    right.set_yticks(range(len(labels)), labels, fontsize=7)
    right.invert_yaxis()
    right.set_xlim(0, 1.12)
    right.set_xlabel("share of our step time (profile)")
    right.set_title("where our step goes", fontsize=9)
    right.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=6, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=130, format="png")
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dir", help="a bench/shapes.sh output directory")
    p.add_argument("--out", default=None, help="also draw the picture to this PNG")
    p.add_argument("--title", default="train steps at three model sizes, batch 16 x 1024, bf16")
    args = p.parse_args(argv)
    present = [s for s in SHAPES if os.path.exists(os.path.join(args.dir, f"ours_{s}.jsonl"))]
    if not present:
        raise SystemExit(f"{args.dir}: no ours_<shape>.jsonl (shapes: {', '.join(SHAPES)})")
    shapes = {s: read_shape(args.dir, s) for s in present}
    print(table(shapes) + "\n\n" + profile_table(shapes))
    if args.out:
        plot(shapes, args.out, args.title)
        print(f"\n{args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
