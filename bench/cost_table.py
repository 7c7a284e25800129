"""The cost table of issue #13: for every method, total and trained parameters, training step
time and peak device memory (batch 16 x 1024, SmolLM2-135M's shape, bf16 compute, float32
master weights, gates and AdamW state), and evaluation tokens/s.

Every row is built as the pipeline builds it (`ref.methods.init_method` around a random backbone:
random weights time the same as trained ones) and runs through the pipeline's own step factory
(`fast.steps.make_steps`, the "fast" backend on one device), so the times are those of
`mode-jax sweep`'s steps. Step time: the median of --steps timed steps (each waited on) after
--warmup; eval tokens/s: batch * seq / the median eval-step time.

Peak memory: on a GPU each row runs in its own process (the device's peak_bytes_in_use is a
high-water mark of the whole process), and `peak_gib` is that process's peak after the train
and eval steps. `compiled_gib` is what XLA's memory analysis of the compiled train step says
it needs (arguments + outputs + temporaries - donated aliases): available everywhere, CPU too.

Top-k rows run the same dense compute (every stack runs; the gate masks): `sparse_saving` is the
share of forward FLOPs a sparse dispatch would save (ref.costs.dispatch_flops, the backbone
taken as always kept).

On the H200 (one process per row, ~30-60 s each; rows already in --out are kept, so the same
command, repeated, finishes the table within calls of 10 minutes):
    source scripts/device_env.sh && python3 bench/cost_table.py --out bench/results/cost-table-h200 --time-limit 500
CPU smoke run (a tiny model, every row in this process):
    python bench/cost_table.py --small --in-process
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROWS = ("backbone", "full", "lora-r16-attn", "lora-r139-attn_mlp", "expert", "mode-2x", "mode-2x-top1",
        "mode-2x-top2", "mode-2x-frozen", "mode-2x-uninit", "capacity-1x4", "mode-small", "lora-moe-2x",
        "btx-2x", "block-expansion")


def spec(row: str, small: bool) -> dict:
    """How row `row` is built: method, and the configs it needs (SmolLM2 shape, or tiny with --small)."""
    from mode_jax.ref.config import LoraConfig, ModeConfig
    from mode_jax.ref.expansion import ExpansionConfig
    mode = ModeConfig(n_blocks=2, expert_layers=1) if small else ModeConfig()       # 3 blocks x 2 layers
    r139 = 3 if small else 139
    table = {
        "backbone": dict(method=None),
        "full": dict(method="full"),
        "lora-r16-attn": dict(method="lora", lora=LoraConfig(rank=16, targets="attn")),
        "lora-r139-attn_mlp": dict(method="lora", lora=LoraConfig(rank=r139, targets="attn_mlp")),
        "expert": dict(method="stage1", mode=mode),
        "mode-2x": dict(method="stage2", mode=mode, n_stage1=2),
        "mode-2x-top1": dict(method="stage2", mode=dataclasses.replace(mode, gate_top_k=1), n_stage1=2),
        "mode-2x-top2": dict(method="stage2", mode=dataclasses.replace(mode, gate_top_k=2), n_stage1=2),
        "mode-2x-frozen": dict(method="stage2_frozen", mode=mode, n_stage1=2),
        "mode-2x-uninit": dict(method="uninit", mode=dataclasses.replace(mode, n_experts=2)),
        "capacity-1x4": dict(method="uninit", mode=dataclasses.replace(mode, n_experts=1,
                                                                     expert_layers=2 * mode.expert_layers)),
        "mode-small": dict(method="stage2", mode=ModeConfig(n_blocks=1, expert_layers=1), n_stage1=2),
        "lora-moe-2x": dict(method="lora_moe", lora=LoraConfig(rank=16, targets="attn"), n_stage1=2,
                            stage1_method="lora"),
        "btx-2x": dict(method="btx", n_stage1=2, stage1_method="btx_branch"),
        # LLaMA Pro's new layers after every 5th backbone layer (ExpansionConfig's default); every 2nd of 4 small.
        "block-expansion": dict(method="block_expansion", expansion=ExpansionConfig(every=2) if small else None),
    }
    return table[row]


def build(row: str, cfg, small: bool):
    """(method, params in the reference layout, its spec) of `row`."""
    import jax
    from mode_jax.ref.llama import init_llama
    from mode_jax.ref.methods import init_method
    s = spec(row, small)
    backbone = init_llama(jax.random.key(0), cfg)
    if s["method"] is None:
        return None, {"backbone": backbone}, s
    stage1 = None
    if s.get("n_stage1"):
        kind = s.get("stage1_method", "stage1")
        stage1 = [init_method(kind, jax.random.key(10 + i), backbone, cfg, mode=s.get("mode"), lora=s.get("lora"))
                  for i in range(s["n_stage1"])]
    extra = {"expansion": s["expansion"]} if s.get("expansion") else {}
    params = init_method(s["method"], jax.random.key(1), backbone, cfg, mode=s.get("mode"), lora=s.get("lora"),
                         stage1=stage1, **extra)
    return s["method"], params, s


def _median_time(fn, n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(row: str, args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from mode_jax.fast.steps import make_steps
    from mode_jax.ref import costs
    from mode_jax.ref.config import LlamaConfig, OptimConfig
    from mode_jax.ref.methods import METHODS

    cfg = LlamaConfig.tiny() if args.small else LlamaConfig.smollm2_135m()
    method, params, s = build(row, cfg, args.small)
    mode = s.get("mode")
    count = lambda tree: int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))      # noqa: E731
    steps = make_steps(method or "full", cfg, opt=OptimConfig(total_steps=1000), lora=s.get("lora"),
                       compute_dtype=args.dtype, backend="fast", layer_loop=args.layer_loop,
                       expert_layers=mode.expert_layers if mode else None,
                       gate_top_k=mode.gate_top_k if mode else None)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (args.batch, args.seq + 1)), jnp.int32)
    backend = steps.to_backend(params)
    out = {"row": row, "method": method or "backbone", "params_total": count(params), "params_trained": 0}
    if method is not None:
        trainable, frozen = steps.split(backend, METHODS[method])
        out["params_trained"] = count(trainable)
        opt_state = steps.init_opt(trainable)
        frozen = steps.prepare_frozen(frozen)
        batch = {"tokens": tokens}
        compiled = steps.train_step.func.lower(trainable, frozen, opt_state, batch, **steps.train_step.keywords) \
            .compile()
        mem = compiled.memory_analysis()
        if mem is not None:
            need = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
                    - mem.alias_size_in_bytes)
            out["compiled_gib"] = round(need / 2**30, 3)
        state = [trainable, opt_state]

        def one():
            state[0], state[1], m = steps.train_step(state[0], frozen, state[1], batch)
            jax.block_until_ready(m["loss"])

        for _ in range(args.warmup):
            one()
        out["step_ms"] = round(1e3 * _median_time(one, args.steps), 2)
        out["train_tokens_per_s"] = round(args.batch * args.seq / (out["step_ms"] / 1e3), 1)
        backend = steps.join(state[0], frozen)
    evaluate = lambda: jax.block_until_ready(steps.eval_step(backend, tokens)["loss"])   # noqa: E731
    for _ in range(max(args.warmup, 1)):
        evaluate()
    out["eval_tokens_per_s"] = round(args.batch * args.seq / _median_time(evaluate, args.steps), 1)
    if mode is not None and mode.gate_top_k:
        mode_n = dataclasses.replace(mode, n_experts=s.get("n_stage1") or mode.n_experts)
        out["sparse_saving"] = round(costs.dispatch_flops(cfg, mode_n, args.seq)["saved_fraction"], 4)
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        out["peak_gib"] = round(stats["peak_bytes_in_use"] / 2**30, 3)
    return out


def markdown(rows: list[dict], args) -> str:
    """The rows as a Markdown table; "vs full" is a row's step time over the full FT row's."""
    full = next((r["step_ms"] for r in rows if r["row"] == "full" and "step_ms" in r), None)

    def gib(r, k):
        return f"{r[k]:.2f}" if k in r else "-"

    def saving(r):
        return f"{100 * r['sparse_saving']:.1f}%" if "sparse_saving" in r else "-"

    def step(r):
        if "step_ms" not in r:
            return "- | - | -"
        ratio = f"{r['step_ms'] / full:.2f}x" if full else "-"
        return f"{r['step_ms']:.2f} | {ratio} | {r['train_tokens_per_s']:,.0f}"
    lines = [f"batch {args.batch} x {args.seq}, compute {args.dtype}", "",
             "| method | total params | trained params | step ms | vs full | train tok/s | peak GiB | compiled GiB | "
             "eval tok/s | sparse top-k saving |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['row']} | {r['params_total'] / 1e6:.2f}M | {r['params_trained'] / 1e6:.3f}M | "
                     f"{step(r)} | {gib(r, 'peak_gib')} | "
                     f"{gib(r, 'compiled_gib')} | {r['eval_tokens_per_s']:,.0f} | {saving(r)} |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="a tiny model and batch (CPU smoke run)")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated rows (default all: {','.join(ROWS)})")
    p.add_argument("--batch", type=int, default=None, help="rows per step (default 16; --small 2)")
    p.add_argument("--seq", type=int, default=None, help="tokens per row (default 1024; --small 16)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 10; --small 2)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compiles included)")
    p.add_argument("--dtype", default=None, help="compute dtype (default bfloat16; --small float32)")
    p.add_argument("--layer-loop", default="scan", choices=("auto", "scan", "python"),
                   help="how stacks of layers loop (default scan, as the gpu preset and its sweeps run)")
    p.add_argument("--time-limit", type=float, default=0, help="start no new row after this many seconds (0: none)")
    p.add_argument("--in-process", action="store_true", help="every row in this process (peak_gib then "
                   "is the high-water mark of all rows so far: left out)")
    p.add_argument("--one", help=argparse.SUPPRESS)          # a child process: measure this row, print JSON
    p.add_argument("--out", help="write cost_table.jsonl and cost_table.md into this directory")
    args = p.parse_args(argv)
    defaults = dict(batch=(2, 16), seq=(16, 1024), steps=(2, 10), dtype=("float32", "bfloat16"))
    for key, (small, full) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, small if args.small else full)
    args.row_list = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in args.row_list if r not in ROWS]
    if unknown:
        p.error(f"unknown row {unknown[0]!r} (rows: {', '.join(ROWS)})")
    return args


def _child_args(args, row: str) -> list[str]:
    out = [sys.executable, __file__, "--one", row, "--batch", str(args.batch), "--seq", str(args.seq),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--dtype", args.dtype,
           "--layer-loop", args.layer_loop]
    return out + (["--small"] if args.small else [])


def _write(out: Path, rows: list[dict], args) -> None:
    from mode_jax.atomic import write_text_atomic
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "cost_table.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    write_text_atomic(out / "cost_table.md", markdown(rows, args))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.one, args)), flush=True)
        return 0
    began = time.time()
    out = Path(args.out) if args.out else None
    done = {}
    if out is not None and (out / "cost_table.jsonl").is_file():
        # Rows measured by an earlier call (same --out) are kept: the table fills in over calls.
        done = {r["row"]: r for r in map(json.loads, (out / "cost_table.jsonl").read_text().splitlines())}
    rows, failed = [], []

    def with_kept():         # this call's rows, then the kept rows it did not measure again
        return rows + [done[x] for x in done if x not in {y["row"] for y in rows}]
    for row in args.row_list:
        if row in done:
            rows.append(done[row])
            continue
        if args.time_limit and time.time() - began > args.time_limit:
            print(f"time limit: {row} and later rows not measured; run the same command again", file=sys.stderr)
            break
        if args.in_process:
            r = measure(row, args)
            r.pop("peak_gib", None)
        else:
            proc = subprocess.run(_child_args(args, row), capture_output=True, text=True)
            if proc.returncode != 0:
                # One row failing (out of memory, say) leaves the others to measure; the exit code says so.
                print(f"{row}: failed\n{proc.stderr[-3000:]}", file=sys.stderr)
                failed.append(row)
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(r)
        print(json.dumps(r), flush=True)
        if out is not None:
            _write(out, with_kept(), args)
    if out is not None:      # also when every row was measured before: the table is rendered anew
        _write(out, with_kept(), args)
    print(markdown(rows, args))
    if failed:
        print(f"failed rows: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
