"""Bandwidth of the MoDE merge (eq. 1-2) on a GPU: Triton kernel vs XLA, as % of copy.

The merge is memory-bound, so the yardstick is a device-to-device copy. For
E experts, T tokens, width D and itemsize s (outputs and dy), the bytes that
must move at least once are

    forward:          E*T*D*s read + T*D*s written                 (+ T*E logits)
    forward+backward: forward + T*D*s dy read + E*T*D*s outputs read
                      + E*T*D*s d_outputs written                  (+ T*E logits, d_logits)

and achieved bandwidth = those bytes / median time. Every implementation is
charged the same bytes, so a number above the copy is a sign of a miscount.

On the GPU:   python bench/gpu_combine.py
CPU smoke:    python bench/gpu_combine.py --interpret --tokens 256 --repeats 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from mode_jax.kernels.gated_combine import BlockSizes, gated_combine
from mode_jax.ref.mode import gated_combine as ref_gated_combine


def median_seconds(fn, args, *, repeats: int, warmup: int, inner: int = 1) -> float:
    """Median over `repeats` samples of the time per call, each sample timing `inner`
    back-to-back calls (dispatch is asynchronous, so per-call launch overhead hides
    behind the previous call's work), after warm-up (compiles)."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) / inner)
    return statistics.median(times)


def copy_bandwidth(n_bytes: int, *, repeats: int, warmup: int) -> float:
    """Bytes read + written per second by a jitted jnp.copy of an n_bytes array."""
    x = jnp.arange(n_bytes // 4, dtype=jnp.float32)   # not constant: nothing to fold away
    seconds = median_seconds(jax.jit(jnp.copy), (x,), repeats=repeats, warmup=warmup)
    return 2 * x.nbytes / seconds


def merge_bytes(n_experts: int, tokens: int, width: int, itemsize: int, logits_itemsize: int):
    """Minimum bytes moved by the forward and by forward+backward (module docstring)."""
    hidden, logits = tokens * width * itemsize, tokens * n_experts * logits_itemsize
    forward = n_experts * hidden + hidden + logits
    backward = hidden + n_experts * hidden + n_experts * hidden + 2 * logits
    return forward, forward + backward


def forward_and_backward(combine):
    def run(logits, outputs, dy):
        y, vjp = jax.vjp(combine, logits, outputs)
        return (y, *vjp(dy))
    return jax.jit(run)


def max_abs_err(got, want) -> float:
    return max(float(np.max(np.abs(np.asarray(g, np.float32) - np.asarray(w, np.float32))))
               for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128 * 1024,
                        help="tokens per call; the default makes E=2 outputs 300 MB, far past L2")
    parser.add_argument("--width", type=int, default=576, help="SmolLM2-135M's hidden width")
    parser.add_argument("--experts", type=str, default="2,4,8")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--inner", type=int, default=10, help="back-to-back calls per sample")
    parser.add_argument("--copy-mib", type=int, default=4096, help="size of the copied array")
    parser.add_argument("--block-t", type=int, default=None, help="override the default tile")
    parser.add_argument("--block-d", type=int, default=None)
    parser.add_argument("--num-warps", type=int, default=None)
    parser.add_argument("--interpret", action="store_true",
                        help="run the Triton kernel in the Pallas interpreter (CPU smoke test)")
    args = parser.parse_args()

    device = jax.devices()[0]
    if device.platform != "gpu" and not args.interpret:
        parser.error(f"no GPU ({device.platform}); pass --interpret for a CPU smoke test")
    copy_mib = min(args.copy_mib, 64) if args.interpret else args.copy_mib
    dtype = jnp.dtype(args.dtype)
    T, D = args.tokens, args.width

    copy_bw = copy_bandwidth(copy_mib * 2**20, repeats=args.repeats, warmup=args.warmup)
    print(f"device: {device.device_kind}; jax {jax.__version__}; "
          f"copy of {copy_mib} MiB: {copy_bw / 1e9:.0f} GB/s (read + write)\n")

    print("| E | pass | impl | max abs err | time (us) | GB/s | % of copy |")
    print("|---|------|------|-------------|-----------|------|-----------|")
    for E in (int(e) for e in args.experts.split(",")):
        block_sizes = BlockSizes.get_default("triton", width=D, n_experts=E, itemsize=dtype.itemsize)
        overrides = {k: v for k, v in (("block_t", args.block_t), ("block_d", args.block_d),
                                        ("num_warps", args.num_warps)) if v is not None}
        block_sizes = BlockSizes(**{**block_sizes.__dict__, **overrides})
        kernel = lambda z, h: gated_combine(z, h, backend="triton", block_sizes=block_sizes,
                                            interpret=args.interpret)
        k_logits, k_outputs, k_dy = jax.random.split(jax.random.key(E), 3)
        logits = jax.random.normal(k_logits, (T, E), jnp.float32)                   # [T, E]
        outputs = jax.random.normal(k_outputs, (E, T, D), jnp.float32).astype(dtype)  # [E, T, D]
        dy = jax.random.normal(k_dy, (T, D), jnp.float32).astype(dtype)             # [T, D]
        fwd_bytes, fwd_bwd_bytes = merge_bytes(E, T, D, dtype.itemsize, logits.dtype.itemsize)

        for name, n_bytes, make in (
                ("fwd", fwd_bytes, lambda c: jax.jit(lambda z, h, g: c(z, h))),
                ("fwd+bwd", fwd_bwd_bytes, forward_and_backward)):
            ref_fn, kernel_fn = make(ref_gated_combine), make(kernel)
            err = max_abs_err(kernel_fn(logits, outputs, dy), ref_fn(logits, outputs, dy))
            for impl, fn, shown_err in (("triton", kernel_fn, f"{err:.2e}"), ("xla", ref_fn, "-")):
                seconds = median_seconds(fn, (logits, outputs, dy), repeats=args.repeats,
                                         warmup=args.warmup, inner=args.inner)
                bw = n_bytes / seconds
                print(f"| {E} | {name} | {impl} | {shown_err} | {seconds * 1e6:.1f} | "
                      f"{bw / 1e9:.0f} | {100 * bw / copy_bw:.1f}% |", flush=True)
    print(f"\nblock sizes: {block_sizes}; T={T}, D={D}, {dtype.name} outputs, float32 logits")


if __name__ == "__main__":
    main()
