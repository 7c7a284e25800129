"""The LM head + next-token loss alone on a GPU: the fused Pallas kernels (kernels/fused_ce.py)
against fast/loss.py's chunked XLA path, forward + backward at a train step's shape, and a
sweep of the kernels' tiles.

Timed: `jax.value_and_grad` of fast.loss.next_token_metrics(h, W, targets)["loss"] with
respect to h and W (full FT: the tied head trains) and to h alone (LoRA, MoDE: the head is
frozen, no dW), for N = batch x seq tokens, h [N, D] bfloat16, W [V, D] float32 (cast to
bf16 once, as in the step). Median of --repeats samples of --inner back-to-back calls; "temp" is XLA's scratch memory
for the call (the chunked path's [chunk, V] logits and their gradient live there).
Useful FLOPs are 2NVD per matmul: 3 for the chunked path with dW (logits, dh, dW), 2 without;
the fused kernels do 4 and 2 (the dW kernel recomputes its logits), and their TFLOP/s below
is counted on the useful 3 (2) matmuls, like the chunked path's. Before timing, the
kernels' loss and gradients are compared with the chunked path's (max error relative to the
largest entry).

--sweep then varies one BlockSizes field at a time from the defaults (keeping the best so
far) and times forward + backward of `fused_ce` itself; a tile that Triton cannot compile
(shared memory, registers) prints FAILED and the sweep goes on.

On the GPU:  source scripts/device_env.sh && python3 bench/gpu_fused_ce.py --shape 135m --sweep
CPU smoke:   python bench/gpu_fused_ce.py --small   (the kernels in the Pallas interpreter)
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from gpu_combine import median_seconds  # bench/, next to this script
from shapes import SHAPES  # bench/, next to this script
from mode_jax.fast.loss import next_token_metrics
from mode_jax.kernels.fused_ce import BlockSizes, fused_ce

SWEEP = {"block_t": (32, 64, 128), "block_v": (64, 128, 256), "grad_rows": (16, 32, 64),
         "num_warps": (4, 8), "num_stages": (1, 2, 3)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="135m", choices=list(SHAPES), help="D and V of this shape")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--loss-chunk", type=int, default=4096, help="the chunked path's FastConfig.loss_chunk")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--inner", type=int, default=5)
    p.add_argument("--sweep", action="store_true", help="also sweep the kernels' tiles")
    p.add_argument("--small", action="store_true", help="tiny CPU smoke run (Pallas interpreter)")
    args = p.parse_args(argv)
    args.width, args.vocab = SHAPES[args.shape]["hidden_size"], SHAPES[args.shape]["vocab_size"]
    args.kernel = "pallas"
    if args.small:
        args.batch, args.seq, args.width, args.vocab, args.repeats, args.inner = 2, 100, 64, 1000, 2, 1
        args.kernel, args.loss_chunk = "pallas_interpret", 64
    elif jax.default_backend() != "gpu":
        p.error(f"the Triton kernels need a CUDA GPU (this is {jax.default_backend()}); use --small here")
    return args


def inputs(args):
    kh, kw, kt = jax.random.split(jax.random.key(0), 3)
    h = jax.random.normal(kh, (args.batch, args.seq, args.width), jnp.bfloat16)
    w = jax.random.normal(kw, (args.vocab, args.width), jnp.float32) / np.sqrt(args.width)
    targets = jax.random.randint(kt, (args.batch, args.seq), 0, args.vocab, jnp.int32)
    return h, w, targets


def loss_and_grads(loss_fn, argnums):
    """jit(value_and_grad) of loss_fn(h, w, targets) -> scalar, w.r.t. argnums of (h, w)."""
    return jax.jit(jax.value_and_grad(loss_fn, argnums=argnums))


def metrics_loss(kernel, chunk):
    return lambda h, w, t: next_token_metrics(h, w, t, chunk=chunk, kernel=kernel)["loss"]


def fused_loss(bs):
    return lambda h, w, t: jnp.mean(fused_ce(h, w, t, block_sizes=bs, interpret=not _on_gpu())[0])


def _on_gpu():
    return jax.default_backend() == "gpu"


def max_rel(got, want) -> float:
    errs = [float(jnp.max(jnp.abs(g.astype(jnp.float32) - v.astype(jnp.float32))) /
                  max(float(jnp.max(jnp.abs(v.astype(jnp.float32)))), 1e-12))
            for g, v in zip(jax.tree.leaves(got), jax.tree.leaves(want))]
    return max(errs)


def report(name, seconds, useful_flops):
    print(f"{name:64s} {1e3 * seconds:9.3f} ms  {useful_flops / seconds / 1e12:7.1f} TFLOP/s (useful)", flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    h, w, targets = inputs(args)
    n = args.batch * args.seq
    matmul = 2.0 * n * args.vocab * args.width
    timing = dict(repeats=args.repeats, warmup=2, inner=args.inner)
    print(f"device {jax.devices()[0].device_kind}, jax {jax.__version__}; N {n} tokens, V {args.vocab}, "
          f"D {args.width}; h bf16, W f32; default tiles {BlockSizes.get_default(width=args.width)}", flush=True)
    for argnums, useful, case in (((0, 1), 3, "head trains (dh, dW)"), ((0,), 2, "head frozen (dh)")):
        chunked = loss_and_grads(metrics_loss("xla", args.loss_chunk), argnums)
        fused = loss_and_grads(metrics_loss(args.kernel, args.loss_chunk), argnums)
        err = max_rel(fused(h, w, targets), chunked(h, w, targets))
        print(f"-- {case}: fused vs chunked, max error relative to the largest entry {err:.1e}", flush=True)
        if not np.isfinite(err) or err > 5e-2:
            raise SystemExit(f"fused kernels disagree with the chunked path ({case}): {err}")
        for name, fn in ((f"chunked XLA (loss_chunk {args.loss_chunk})", chunked), (f"fused {args.kernel}", fused)):
            memory = fn.lower(h, w, targets).compile().memory_analysis()
            temp = getattr(memory, "temp_size_in_bytes", float("nan")) / 2**20 if memory is not None else float("nan")
            report(f"{name}, fwd+bwd, temp {temp:,.0f} MiB", median_seconds(fn, (h, w, targets), **timing),
                   useful * matmul)
    if args.sweep:
        print("-- sweep (fused_ce forward + backward, head trains): one field at a time", flush=True)
        best_bs = BlockSizes.get_default(width=args.width)
        best = median_seconds(loss_and_grads(fused_loss(best_bs), (0, 1)), (h, w, targets), **timing)
        report(f"default {best_bs}", best, 3 * matmul)
        for field, options in SWEEP.items():
            for value in options:
                if value == getattr(best_bs, field):
                    continue
                bs = dataclasses.replace(best_bs, **{field: value})
                start = time.perf_counter()
                try:
                    seconds = median_seconds(loss_and_grads(fused_loss(bs), (0, 1)), (h, w, targets), **timing)
                except Exception as e:  # a tile Triton cannot compile: say so and go on
                    print(f"{field}={value}: FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
                    continue
                report(f"{field}={value} ({time.perf_counter() - start:.0f}s incl. compile)", seconds, 3 * matmul)
                if seconds < best:
                    best, best_bs = seconds, bs
        print(f"best: {best_bs} {1e3 * best:.3f} ms", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
