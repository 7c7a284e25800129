"""How the fast path computes (not what): dtype, backends, chunking, remat.

One frozen dataclass, hashable so it is a `jax.jit` static argument. The model it
computes is fixed by `ref/`'s configs (LlamaConfig, ModeConfig, LoraConfig,
OptimConfig); every choice here must leave that function unchanged up to the
rounding of `compute_dtype`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

ATTENTION = ("auto", "xla", "cudnn")
MERGES = ("fused", "stacked")
REMATS = ("auto", "none", "dots", "full", "attention", "dots_attention")
LAYER_LOOPS = ("auto", "scan", "python")
LOSS_KERNELS = ("xla", "pallas", "pallas_interpret")


@dataclasses.dataclass(frozen=True)
class FastConfig:
    # Activations and matmul inputs; master weights, optimizer state, the gate, softmax
    # and norm statistics stay float32 whatever this says.
    compute_dtype: str = "bfloat16"
    # 'auto': cuDNN flash attention on a GPU for bf16/f16 (head dim a multiple of 8,
    # <= 128), XLA otherwise. jax.nn.dot_product_attention(implementation=None) means
    # XLA in jax 0.11, so the choice is made here (fast/attention.py).
    attention: str = "auto"
    # 'fused': each block's last down-projections and the gated sum are one matmul
    # (fast/merge.py); 'stacked': every stack runs whole, then fast.combine merges.
    merge: str = "fused"
    # Tokens per logits chunk in the loss: at most [loss_chunk, V] logits exist at once.
    loss_chunk: int = 4096
    # The LM head + cross-entropy (fast/loss.py). 'xla': the chunked path above. 'pallas': the
    # fused Triton kernels of kernels/fused_ce.py on a CUDA GPU (no [tokens, V] logits at all,
    # 800 MiB less per 16k tokens at SmolLM2's vocabulary, but 2.8x slower than 'xla' on the
    # H200: bench/RESULTS.md; for when memory binds), the chunked path on other
    # platforms. 'pallas_interpret': those kernels in the Pallas interpreter on any platform
    # (CPU tests of the integration; slow). The kernels have no sharding rule: meant for the
    # single-device step (not tried under a mesh, where XLA would have to gather their inputs).
    loss_kernel: str = "xla"
    # How a stack of layers is looped over. 'scan': one lax.scan (one compiled layer body;
    # each iteration copies its layer's weights and saved activations out of the stacked
    # arrays); 'python': a Python loop, every layer its own buffers, longer compiles.
    # 'auto': 'python' on a GPU (18-20% faster steps on the H100, bench/RESULTS.md),
    # 'scan' elsewhere (CPU runs are dominated by compile time).
    layer_loop: str = "auto"
    # Rematerialisation of each layer: 'none' saves every residual, 'dots' only matmul
    # outputs, 'full' recomputes the layer in the backward pass, 'attention' all but the
    # attention's output (and cuDNN's softmax statistics), 'dots_attention' both of the
    # latter. 'auto': 'none' with the Python loop (fastest there: the custom rules of
    # fast/norm.py and fast/swiglu.py keep the residuals to bf16 activations), 'full'
    # with scan (where saved activations cost a copy per layer, recomputing is cheaper).
    remat: str = "auto"
    scan_unroll: int = 1        # lax.scan unroll factor over layers
    # q|k|v and gate|up projections as one matmul each (weights concatenated per layer).
    fuse_projections: bool = True

    def __post_init__(self):
        if jnp.dtype(self.compute_dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16),
                                                 jnp.dtype(jnp.float16), jnp.dtype(jnp.float64)):
            raise ValueError(f"FastConfig.compute_dtype must be a float dtype name, got {self.compute_dtype!r}")
        for name, options in (("attention", ATTENTION), ("merge", MERGES), ("remat", REMATS),
                              ("layer_loop", LAYER_LOOPS), ("loss_kernel", LOSS_KERNELS)):
            if getattr(self, name) not in options:
                raise ValueError(f"FastConfig.{name} must be one of {options}, got {getattr(self, name)!r}")
        if not isinstance(self.fuse_projections, bool):
            raise ValueError(f"FastConfig.fuse_projections must be a bool, got {self.fuse_projections!r}")
        for name in ("loss_chunk", "scan_unroll"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"FastConfig.{name} must be a positive integer, got {value!r}")

    def loop_and_remat(self, backend: str | None = None) -> tuple[str, str]:
        """(layer_loop, remat) with 'auto' resolved for `backend` (default: JAX's default)."""
        loop = self.layer_loop
        if loop == "auto":
            loop = "python" if (backend or jax.default_backend()) == "gpu" else "scan"
        remat = self.remat
        if remat == "auto":
            remat = "none" if loop == "python" else "full"
        return loop, remat

    @property
    def dtype(self):
        return jnp.dtype(self.compute_dtype)

    @classmethod
    def exact(cls, **overrides) -> "FastConfig":
        """float32 compute: the fast path should then match `ref/` to float32 rounding."""
        return cls(**{"compute_dtype": "float32", **overrides})
