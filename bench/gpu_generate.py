"""Generation speed of fast/decode.py on one GPU: time to first token and decode tokens/s,
for the backbone and MoDE 2x, next to the peer (transformers generate, plain and static
cache + its compile: /work/shared/bench/peer_generate.py, same model shape and workload).

What runs: a SmolLM2-135M-shaped Llama with random weights (bf16 compute, weights
pre-cast once), and MoDE 2x over it (3 blocks x 2 expert layers, 2 experts: 12 expert
layers beside the 30 backbone layers), random prompts of --prompt tokens, --new new
tokens with no EOS (every row decodes every step), at each --batches size.

Timing, as the peer's: two warm-up runs (compiles), then
  ttft_s       best of 3 prefills (prompt -> cache and first token), waited on
  total_s      median of 3 whole generations (prefill + the jitted decode loop)
  decode_tok_s batch * (new - 1) / (total_s - ttft_s);  ms_per_step = its inverse per row
One JSON line per case (the peer's keys, "run" naming ours), then a table with the peer's
rows (--peer-json) and the targets: ours >= 1.5x transformers' best decode at batch 1
and 64, MoDE 2x step time <= 1.5x our backbone's.

Before timing, a check on a small model: fast/ greedy tokens (float32) equal ref/decode.py's
and the bf16 first-token logits are within bf16 rounding of float32.

On the GPU (one command each, well inside 10 minutes):
    python3 /work/shared/bench/peer_generate.py > /tmp/peer_generate.jsonl
    source scripts/device_env.sh && python3 bench/gpu_generate.py --peer-json /tmp/peer_generate.jsonl \\
        --json bench/results/h200-generate.jsonl
CPU smoke test (seconds): python bench/gpu_generate.py --small
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from mode_jax.fast import decode
from mode_jax.fast.config import FastConfig
from mode_jax.fast.generate import generate
from mode_jax.fast.params import to_fast
from mode_jax.ref import decode as ref_decode
from mode_jax.ref.config import LlamaConfig, ModeConfig
from mode_jax.ref.llama import init_llama
from mode_jax.ref.mode import init_mode
from mode_jax.ref.sampling import SamplingConfig

TARGET_VS_PEER = 1.5       # our decode tokens/s over transformers' best, at batch 1 and 64
TARGET_MODE_COST = 1.5     # MoDE 2x time per decode step over our backbone's


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="a tiny model and workload (CPU smoke test)")
    p.add_argument("--batches", default="1,64", help="comma-separated batch sizes (default 1,64)")
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens (default 128)")
    p.add_argument("--new", type=int, default=256, help="new tokens (default 256)")
    p.add_argument("--parts", default="backbone,mode", help="backbone, mode (comma-separated)")
    p.add_argument("--dtype", default="bfloat16", help="compute dtype (default bfloat16)")
    p.add_argument("--unroll", default="1", help="decode steps per loop iteration; several values time each")
    p.add_argument("--peer-json", default=None, help="JSON lines of peer_generate.py")
    p.add_argument("--json", default=None, help="also write our rows as JSON lines here")
    args = p.parse_args(argv)
    if args.small:
        args.batches, args.prompt, args.new = "2", 16, 8
    return args


def model_config(small: bool) -> tuple[LlamaConfig, ModeConfig]:
    mode = ModeConfig(n_blocks=3, expert_layers=2, n_experts=2, expert_init="random")
    if small:
        return LlamaConfig.tiny(vocab_size=512, d_model=64, n_layers=6, n_heads=4, n_kv_heads=2,
                                head_dim=16, d_ff=128), mode
    return LlamaConfig.smollm2_135m(), mode


def build(cfg: LlamaConfig, mode: ModeConfig, part: str) -> dict:
    """Random weights (float32 masters), gates with real spread so every expert is used."""
    backbone = init_llama(jax.random.key(0), cfg)
    if part == "backbone":
        return {"backbone": backbone}
    params = init_mode(jax.random.key(1), backbone, cfg, mode)
    for i, block in enumerate(params["blocks"]):
        block["gate_w"] = 0.05 * jax.random.normal(jax.random.key(10 + i), block["gate_w"].shape)
    return params


def check(mode: ModeConfig) -> str:
    """fast/ against ref/ on a small model: greedy tokens in float32, first logits in bf16."""
    small, _ = model_config(True)
    params = build(small, mode, "mode")
    prompt = np.asarray(jax.random.randint(jax.random.key(5), (12,), 0, small.vocab_size))
    want = ref_decode.generate(params, prompt[None], small, max_new_tokens=6, keep_logits=True)
    exact = FastConfig.exact()
    got = generate(decode.prepare(to_fast(params), exact), [prompt.tolist()], small, exact, max_new_tokens=6)
    if got.tokens != want.tokens:
        raise SystemExit(f"check FAILED: fast greedy {got.tokens} != ref {want.tokens}")
    bf16 = FastConfig()
    tok = generate(decode.prepare(to_fast(params), bf16), [prompt.tolist()], small, bf16, max_new_tokens=1,
                   keep_logits=True)
    ref0 = np.asarray(want.logits[0][0])
    err = float(np.abs(tok.logits[0][0] - ref0).max() / np.abs(ref0).max())
    if not err < 0.05:
        raise SystemExit(f"check FAILED: bf16 first logits relative error {err:.3e}")
    return f"fast f32 greedy == ref/ ({len(got.tokens[0])} tokens, MoDE 2x); bf16 first logits rel err {err:.2e}"


def time_case(prepared, cfg, fast, *, batch: int, prompt: int, new: int, unroll: int) -> dict:
    tokens = jax.random.randint(jax.random.key(batch), (batch, prompt), 0, cfg.vocab_size, dtype=jnp.int32)
    pad = jnp.zeros((batch,), jnp.int32)
    key = jax.random.key(0)
    statics = dict(cfg=cfg, fast=fast, sampling=SamplingConfig())
    size = prompt + new + unroll - 1

    def first():
        return decode.prefill(prepared, tokens, pad, key, size=size, **statics)

    def whole():
        tok, logits, routing, cache, _ = first()
        return decode.decode_loop(prepared, cache, tok, logits, routing, jnp.int32(prompt), pad, key,
                                  jnp.int32(-1), max_new=new, unroll=unroll, **statics)

    def timed(fn) -> float:
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        return time.perf_counter() - t0

    t0 = time.perf_counter()
    out = jax.block_until_ready(whole())
    compile_s = time.perf_counter() - t0
    if int(out[3]) != new:
        raise SystemExit(f"decode ran {int(out[3])} steps, expected {new}")
    timed(whole)
    ttft = min(timed(first) for _ in range(3))
    total = statistics.median(timed(whole) for _ in range(3))
    return {"batch": batch, "prompt": prompt, "new": new, "unroll": unroll, "total_s": round(total, 4),
            "ttft_s": round(ttft, 4), "decode_tok_s": round(batch * (new - 1) / max(total - ttft, 1e-9), 1),
            "ms_per_step": round(1e3 * (total - ttft) / (new - 1), 3), "compile_s": round(compile_s, 1)}


def peer_rows(path: str | None) -> list[dict]:
    if not path:
        return []
    rows = []
    with open(path) as fh:
        for line in fh:
            line = line.strip()
            if line.startswith("{"):
                rows.append(json.loads(line))
    return rows


def report(rows: list[dict], peers: list[dict]) -> None:
    print(f"\n{'run':40s} {'batch':>5s} {'ttft ms':>8s} {'ms/step':>8s} {'decode tok/s':>12s}  vs target")
    best_peer = {}
    for r in peers:
        best_peer[r["batch"]] = max(best_peer.get(r["batch"], 0.0), r["decode_tok_s"])
    ours_bb = {r["batch"]: r for r in rows if r["part"] == "backbone"}
    for r in peers + rows:
        name = r.get("run") or f"transformers.generate {r.get('mode')}"
        note = ""
        if r.get("part") == "backbone" and r["batch"] in best_peer:
            ratio = r["decode_tok_s"] / best_peer[r["batch"]]
            note = f"{ratio:.2f}x peer's best (target >= {TARGET_VS_PEER})"
        elif r.get("part") == "mode" and r["batch"] in ours_bb:
            cost = r["ms_per_step"] / ours_bb[r["batch"]]["ms_per_step"]
            note = f"{cost:.2f}x our backbone's step (target <= {TARGET_MODE_COST})"
        print(f"{name:40s} {r['batch']:5d} {1e3 * r['ttft_s']:8.2f} {r['ms_per_step']:8.3f} "
              f"{r['decode_tok_s']:12.1f}  {note}")


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg, mode = model_config(args.small)
    fast = FastConfig(compute_dtype=args.dtype)
    dev = jax.devices()[0]
    print(f"device {dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}; prompt {args.prompt}, "
          f"new {args.new}, batches {args.batches}, {args.dtype}", flush=True)
    print(f"check: {check(mode)}", flush=True)
    rows = []
    for part in args.parts.split(","):
        prepared = decode.prepare(to_fast(build(cfg, mode, part)), fast)
        for batch in (int(b) for b in args.batches.split(",")):
            for unroll in (int(u) for u in args.unroll.split(",")):
                r = time_case(prepared, cfg, fast, batch=batch, prompt=args.prompt, new=args.new, unroll=unroll)
                name = "ours backbone" if part == "backbone" else "ours MoDE 2x"
                r = {"run": f"{name}" + (f" unroll {unroll}" if unroll > 1 else ""), "part": part,
                     "dtype": args.dtype, **r}
                rows.append(r)
                print(json.dumps(r), flush=True)
        del prepared
    report(rows, peer_rows(args.peer_json))
    if args.json:
        with open(args.json, "w") as fh:
            for r in rows:
                fh.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
