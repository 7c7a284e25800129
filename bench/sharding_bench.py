"""SPMD vs MPMD training-step time for the paper's three parallelism experiments
(section 4.4, Figure 4), scaled to the devices at hand.

    (a) 4 experts x 6 layers, 2 blocks: 1 mesh (SPMD) vs 3 and 5 meshes (MPMD)
    (b) 2 experts, 2 blocks, 8/12/16/20 layers per expert (summed over blocks), SPMD vs
        MPMD on 3 meshes (backbone + one per expert)
    (c) 4 experts x 6 layers with 2/3/6 merges (blocks), SPMD vs MPMD on 5 meshes

SPMD: one mesh of all devices (`--spmd-mesh`, default fsdp: every weight sharded, as
the paper describes). MPMD: `fast.mpmd.even_placement`: the backbone on the first
half of the devices, the rest split evenly over the expert meshes (leftovers to the
backbone), dp inside each sub-mesh (`--mpmd-axes`). With fewer devices than meshes
(one GPU) the sub-meshes share devices: the MPMD code path runs, nothing overlaps.

Per configuration: ms/step (median of `--steps` timed steps after `--warmup`), and
for MPMD one extra serialised step that waits on every dispatch: busy ms per mesh
and the ms spent in `device_put` between meshes. The backbone is SmolLM2-135M's
shape with random weights (the time does not depend on the values), the layers
and loss of `fast/model.py` and `fast/loss.py` (bf16 compute, cuDNN attention), batch
`--batch` sequences of `--seq` tokens; the global batch must divide by every mesh's
dp size (the default, 8 per device, does for up to 8 devices).

`--merge stacked` times the stacked merge instead of the fused one (under MPMD the fused
merge ships each expert's r, u and W, 3.67x the stacked merge's bytes: docs/distributed.md).

GPU machine (any number of GPUs of one host; MPMD runs in one process, SPMD also across
hosts with --coordinator etc.):
    python bench/sharding_bench.py
CPU smoke test (8 forced devices, < 2 minutes):
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python bench/sharding_bench.py --small
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np

from mode_jax import distributed
from mode_jax.fast.config import FastConfig
from mode_jax.fast.mpmd import MpmdStep
from mode_jax.fast.placement import SubMesh, even_placement
from mode_jax.fast.sharding import make_mesh
from mode_jax.fast.spmd import SpmdStep
from mode_jax.ref.config import LlamaConfig, OptimConfig
from mode_jax.ref.llama import layer_shapes

FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def experiments(small: bool) -> list[dict]:
    """Rows of the table: experiment, label, n_experts, n_blocks, expert layers per
    block, and the execution modes (("spmd", None) or ("mpmd", number of meshes))."""
    rows = [dict(exp="a", label="1 mesh", experts=4, blocks=2, per_block=3, modes=[("spmd", 1)]),
            dict(exp="a", label="3 meshes", experts=4, blocks=2, per_block=3, modes=[("mpmd", 3)]),
            dict(exp="a", label="5 meshes", experts=4, blocks=2, per_block=3, modes=[("mpmd", 5)])]
    for total in ((8,) if small else (8, 12, 16, 20)):
        rows.append(dict(exp="b", label=f"{total} expert layers", experts=2, blocks=2,
                         per_block=total // 2, modes=[("spmd", 1), ("mpmd", 3)]))
    for merges in ((2, 3) if small else (2, 3, 6)):
        rows.append(dict(exp="c", label=f"{merges} merges", experts=4, blocks=merges,
                         per_block=6 // merges, modes=[("spmd", 1), ("mpmd", 5)]))
    return rows


def random_params(cfg: LlamaConfig, n_experts: int, n_blocks: int, per_block: int, frozen_dtype,
                  seed: int = 0):
    """The stacked MoDE tree of random normal weights (host numpy, placed by the step):
    the frozen backbone in `frozen_dtype` (it never updates: no float32 master copy,
    as `fast.train.cast_frozen`), experts and gates float32 master weights."""
    rng = np.random.default_rng(seed)

    def draw(shape, name):
        if name.endswith("norm"):
            return np.ones(shape, np.float32)
        return (0.02 * rng.standard_normal(shape, dtype=np.float32))

    def stack(*lead, dtype=np.float32):
        return {k: draw((*lead, *s), k).astype(dtype) for k, s in layer_shapes(cfg).items()}

    e = n_experts + 1
    gate_b = np.zeros((n_blocks, e), np.float32)
    gate_b[:, 0] = 2.0
    return {"backbone": {"embed": draw((cfg.vocab_size, cfg.d_model), "embed").astype(frozen_dtype),
                         "final_norm": np.ones((cfg.d_model,), frozen_dtype),
                         "layers": stack(cfg.n_layers, dtype=frozen_dtype)},
            "blocks": {"experts": stack(n_blocks, n_experts, per_block),
                       "gate_w": np.zeros((n_blocks, cfg.d_model, e), np.float32), "gate_b": gate_b}}


def time_steps(call, state, batch, *, warmup: int, steps: int):
    """Median seconds per step (each step waited for), and the final state."""
    for _ in range(warmup):
        state, metrics = call(state, batch)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, metrics = call(state, batch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t0)
    return statistics.median(times), state


def run_config(row, mode, n_meshes, args, cfg, opt, batch_np):
    params = random_params(cfg, row["experts"], row["blocks"], row["per_block"], args.fast.dtype)
    common = dict(batch_size=args.batch, seq_len=args.seq, fast=args.fast,
                  compiler_options=FAST_COMPILE if args.small else None)
    if mode == "spmd":
        mesh = make_mesh(distributed.parse_mesh(args.spmd_mesh), where="--spmd-mesh")
        step = SpmdStep.build(params, cfg, opt, mesh=mesh, **common)
        train, frozen, opt_state = step.place(params)
        batch = step.place_batch(batch_np)

        def call(state, batch):
            t, o, m = step(state[0], frozen, state[1], batch)
            return (t, o), m
        sec, _ = time_steps(call, (train, opt_state), batch, warmup=args.warmup, steps=args.steps)
        return dict(ms=1e3 * sec, where=f"{dict(mesh.shape)}")
    placement = even_placement(jax.device_count(), n_meshes - 1)
    axes = distributed.parse_mesh(args.mpmd_axes)
    placement = type(placement)(SubMesh(placement.backbone.devices, axes),
                                tuple(SubMesh(s.devices, axes) for s in placement.experts),
                                placement.allow_shared_devices)
    step = MpmdStep(params, cfg, opt, placement, **common)
    state, batch = step.place(params), step.place_batch(batch_np)
    sec, state = time_steps(step, state, batch, warmup=args.warmup, steps=args.steps)
    profile: dict = {}
    step(state, batch, profile=profile)
    where = " ".join(f"{len(s.devices)}" for s in (step.placement.backbone, *step.placement.experts))
    return dict(ms=1e3 * sec, where=f"devices {where}" + (" (shared)" if placement.allow_shared_devices else ""),
                busy={k: 1e3 * v for k, v in profile.items()})


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="tiny model, fewer rows: CPU smoke test")
    p.add_argument("--experiments", default="abc", help="which of a, b, c to run (default: abc)")
    p.add_argument("--batch", type=int, default=None, help="global batch (default: 8 per device, 8 if --small)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default: 512, 16 if --small)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default: 10, 2 if --small)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compiles)")
    p.add_argument("--compute-dtype", default=None, choices=("float32", "bfloat16"),
                   help="activations and matmuls, and the frozen backbone's storage (default: bfloat16, "
                        "float32 if --small); master weights, gates, optimizer stay float32")
    p.add_argument("--remat", default="none", choices=("none", "dots", "full"),
                   help="rematerialisation of each layer (FastConfig.remat)")
    p.add_argument("--merge", default="fused", choices=("fused", "stacked"),
                   help="how each block merges (FastConfig.merge; default: fused)")
    p.add_argument("--spmd-mesh", default="fsdp", help="SPMD mesh, --mesh syntax (default: fsdp)")
    p.add_argument("--mpmd-axes", default="dp", help="axes inside each MPMD sub-mesh (default: dp)")
    p.add_argument("--coordinator", default=None, help="multi-process: coordinator HOST:PORT or 'auto'")
    p.add_argument("--num-processes", type=int, default=None)
    p.add_argument("--process-id", type=int, default=None)
    args = p.parse_args(argv)
    distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    n = jax.device_count()
    args.batch = args.batch or (8 if args.small else 8 * n)
    args.seq = args.seq or (16 if args.small else 512)
    args.steps = args.steps or (2 if args.small else 10)
    args.warmup = 1 if args.small else args.warmup
    args.fast = FastConfig(compute_dtype=args.compute_dtype or ("float32" if args.small else "bfloat16"),
                           remat=args.remat, merge=args.merge)
    cfg = (LlamaConfig.tiny(vocab_size=128, n_layers=6) if args.small else LlamaConfig.smollm2_135m())
    opt = OptimConfig(learning_rate=1e-3, warmup_steps=1, total_steps=1000)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, args.seq + 1), dtype=np.int32)
    batch_np = {"tokens": tokens}
    say = print if jax.process_index() == 0 else (lambda *a, **k: None)
    say(f"{n} x {jax.devices()[0].device_kind} ({jax.process_count()} process(es)); model "
        f"{'tiny' if args.small else 'SmolLM2-135M shape'} d={cfg.d_model} L={cfg.n_layers}; "
        f"batch {args.batch} x {args.seq} tokens, {args.fast.compute_dtype}; SPMD mesh '{args.spmd_mesh}', "
        f"MPMD sub-mesh axes '{args.mpmd_axes}'")
    header = f"{'exp':<4}{'configuration':<20}{'SPMD ms/step':>13}{'MPMD ms/step':>13}{'MPMD/SPMD':>10}  layout / MPMD busy ms per mesh, transfer ms"
    say(header)
    say("-" * len(header))
    t_start, done, baseline = time.time(), {}, {}
    for row in experiments(args.small):
        if row["exp"] not in args.experiments:
            continue
        res = {}
        for mode, meshes in row["modes"]:
            key = (row["experts"], row["blocks"], row["per_block"], mode, meshes)
            if key not in done:   # (a) 1 and 5 meshes are (c) 2 merges: run once
                done[key] = run_config(row, mode, meshes, args, cfg, opt, batch_np)
            res[mode] = done[key]
        spmd, mpmd = res.get("spmd"), res.get("mpmd")
        if spmd:
            baseline[row["exp"]] = spmd["ms"]      # (a): the 1-mesh row is every MPMD row's SPMD
        ref_ms = spmd["ms"] if spmd else baseline.get(row["exp"])
        ratio = f"{mpmd['ms'] / ref_ms:.2f}" if mpmd and ref_ms else ""
        detail = []
        if spmd:
            detail.append(f"SPMD {spmd['where']}")
        if mpmd:
            busy = mpmd["busy"]
            meshes = " | ".join(f"{k.replace('experts', 'e').replace('backbone', 'bb')} {v:.1f}"
                                for k, v in busy.items() if k != "transfer")
            detail.append(f"MPMD {mpmd['where']}: {meshes}; transfer {busy.get('transfer', 0.0):.1f}")
        cols = [f"{r['ms']:.1f}" if r else "-" for r in (spmd, mpmd)]
        say(f"({row['exp']}) {row['label']:<20}{cols[0]:>13}{cols[1]:>13}{ratio:>10}  " + "; ".join(detail))
    say(f"total {time.time() - t_start:.0f} s. Paper (8 TPU v5e): (a) 329 / 204 / 202 ms; "
        f"(c) MPMD 514/575/627 vs SPMD 660/664/607 ms at 2/3/6 merges.")


if __name__ == "__main__":
    main()
