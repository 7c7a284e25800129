"""The accelerated path: the same functions as `mode_jax.ref`, built for speed.

Every function here is tested against its `ref/` counterpart (tests/test_fast_*.py);
`FastConfig` says how it computes, never what.

    params.py     the stacked layout ([L, ...] layers, [n_blocks, N, expert_layers, ...]
                  experts), `to_fast`/`to_ref` (exact inverses) and the trainable partitions
    model.py      Llama, LoRA (unmerged) and MoDE forward: a Python loop (GPU) or scan
                  over layers, vmap over experts, bf16 compute with float32
                  norms/RoPE/softmax/gate
    btx.py        Branch-Train-MiX (ref/btx.py): the backbone's attention, then every layer's
                  MLP experts as one batched matmul under a top-2 router (btx_layout.py: the
                  stacked [L, E, ...] layout of the experts)
    norm.py       RMSNorm with a VJP that keeps the bf16 input and one statistic per row
    swiglu.py     x @ [W_gate | W_up] -> SwiGLU, with d[gate | up] written once
    projection.py one matmul split into q|k|v, with the joined cotangent written once
    attention.py  causal GQA attention via jax.nn.dot_product_attention (cuDNN on GPU)
    merge.py      the MoDE merge fused with every stack's last down-projection (eq. 1)
    combine.py    the plain merge, dispatching to the Pallas kernels per platform
    loss.py       chunked next-token loss/accuracy (no [tokens, V] logits), gradients in
                  the forward rule
    optim.py      the one optimizer: optax AdamW (equal to ref/optim.py) for every layout
    train.py      the train step of every single-mesh backend, and the batch metrics
    steps.py      the step factory: "ref", "fast", "spmd", "mpmd" behind one interface;
                  the eval step
    spmd.py       the train step sharded over one mesh (rules tables: sharding.py)
    mpmd.py       backbone and experts on their own sub-meshes (placement.py)
    config.py     FastConfig: compute dtype, attention backend, merge, loss chunk, layer
                  loop and remat
"""

from mode_jax.fast.combine import gated_combine
from mode_jax.fast.config import FastConfig
from mode_jax.fast.loss import next_token_metrics
from mode_jax.fast.merge import fused_merge, fused_merge_reference
from mode_jax.fast.model import block_forward, hidden, llama_hidden, logits, mode_hidden
from mode_jax.fast.params import merge, partition, to_fast, to_ref, trainable_mask
from mode_jax.fast.optim import make_optimizer
from mode_jax.fast.steps import Steps, eval_step, make_steps
from mode_jax.fast.train import cast_frozen, init_opt_state, train_step

__all__ = [
    "FastConfig", "gated_combine", "fused_merge", "fused_merge_reference", "next_token_metrics",
    "block_forward", "hidden", "llama_hidden", "logits", "mode_hidden",
    "to_fast", "to_ref", "partition", "merge", "trainable_mask",
    "make_optimizer", "init_opt_state", "train_step", "eval_step", "cast_frozen", "make_steps", "Steps",
]
