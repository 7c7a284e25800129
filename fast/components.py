"""The pieces of a MoDE forward pass (paper eq. 1-2) as separate pure functions, for
running them on different meshes (section 3.3, MPMD: `fast/mpmd.py`). The whole
forward, on one device or one mesh (SPMD), is `fast/model.py`'s `mode_hidden`.

Params are the stacked layout of `fast/params.py`. `Numerics` says how a stack of
layers, the embedding and the loss compute: `fast=None` is `ref/llama.py`'s math
(`layer_forward` under `lax.scan`, float32, full logits: what the tests compare
with `ref/`), a `FastConfig` is `fast/model.py`'s (bf16 compute, cuDNN attention,
remat) and `fast/loss.py`'s chunked loss. Experts are a `vmap` over the stack.

    Numerics.embed         backbone, tokens [B, T]           -> x [B, T, D]
    backbone_block         layers [L, ...], x, block i        -> f_bb^i(x) [B, T, D]
    experts_forward        one block's experts [n, EL, ...], x -> [f_e^{i,j}(x)]_j  [n, B, T, D]
    gate_merge             gate_w, gate_b, x, h_bb, h_experts -> y [B, T, D]          (eq. 1-2)
    Numerics.head_metrics  backbone, h, targets, mask         -> {"loss", "accuracy", "tokens"}

With `parts=True` the stacks stop before their last down-projection and return that
layer's (r, u) (`fast/model.py`'s `stack_parts`), and `fused_gate_merge` mixes them
with `fast/merge.py`'s `fused_merge`: FastConfig.merge='fused', the same function as
`fast/model.py`'s block, split where MPMD's meshes meet. The block index is a traced
int32, so one compiled function serves every block.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

from mode_jax.fast import loss as fast_loss
from mode_jax.fast import model as fast_model
from mode_jax.fast.config import FastConfig
from mode_jax.fast.merge import fused_merge
from mode_jax.ref.config import LlamaConfig
from mode_jax.ref.llama import layer_forward, lm_head
from mode_jax.ref.mode import gated_combine as ref_gated_combine
from mode_jax.ref.train import next_token_metrics

Combine = Callable[[jax.Array, jax.Array], jax.Array]   # (logits [B,T,E], outputs [E,B,T,D]) -> [B,T,D]


@dataclasses.dataclass(frozen=True)
class Numerics:
    """How the pieces compute (not what): ref's float32 math, or fast/'s (see above)."""
    cfg: LlamaConfig
    fast: FastConfig | None = None

    def embed(self, backbone: dict, tokens: jax.Array) -> jax.Array:
        """tokens [B, T] int -> [B, T, D] (the compute dtype under a FastConfig)."""
        if self.fast is None:
            return jnp.take(backbone["embed"], tokens, axis=0)
        return fast_model.embed(backbone, tokens, self.fast.dtype)

    def stack(self, layers: dict, x: jax.Array) -> jax.Array:
        """x [B, T, D] through a stack of layers ({key: [L, ...]}), in order."""
        if self.fast is None:
            return lax.scan(lambda h, layer: (layer_forward(layer, h, self.cfg), None), x, layers)[0]
        fast = self.fast
        cos, sin = fast_model._rope(x.shape[1], self.cfg)
        return fast_model.scan_layers(layers, None, x, cos, sin, **fast_model._stack_kwargs(self.cfg, fast))

    def stack_parts(self, layers: dict, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x [B, T, D] through a stack but its last down-projection -> (r [B, T, D], u [B, T, F])
        of its last layer (fast/model.py's layers only: ref/'s layer is not split)."""
        if self.fast is None:
            raise ValueError("the fused merge needs fast/model.py's layers (a FastConfig), not ref/'s")
        cos, sin = fast_model._rope(x.shape[1], self.cfg)
        return fast_model.stack_parts(layers, x, cos, sin, **fast_model._stack_kwargs(self.cfg, self.fast))

    def head_metrics(self, backbone: dict, h: jax.Array, targets: jax.Array, mask: jax.Array | None) -> dict:
        """Final norm, LM head and next-token metrics of the last hidden state h [B, T, D]."""
        if self.fast is None:
            return next_token_metrics(lm_head(backbone, h, self.cfg), targets, mask)
        hn = fast_model.final_norm(backbone, h, self.cfg)
        return fast_loss.next_token_metrics(hn, fast_model.head_weight(backbone, self.cfg), targets, mask,
                                            chunk=self.fast.loss_chunk, kernel=self.fast.loss_kernel)


def take_block(tree: dict, block: jax.Array, size: int = 1) -> dict:
    """Rows [block * size, (block + 1) * size) of every array's leading axis; size=1
    drops that axis (the block's slice of a [n_blocks, ...] stack)."""
    if size == 1:
        return jax.tree.map(lambda a: lax.dynamic_index_in_dim(a, block, 0, keepdims=False), tree)
    return jax.tree.map(lambda a: lax.dynamic_slice_in_dim(a, block * size, size, 0), tree)


def backbone_block(layers: dict, x: jax.Array, block: jax.Array, *, per_block: int,
                   num: Numerics, parts: bool = False):
    """f_bb^i(x): block i's `per_block` backbone layers of the [L, ...] stack; with `parts`,
    (r, u) of its last layer instead (`Numerics.stack_parts`)."""
    layers = take_block(layers, block, per_block)
    return num.stack_parts(layers, x) if parts else num.stack(layers, x)


def experts_forward(experts: dict, x: jax.Array, num: Numerics, *, parts: bool = False):
    """One block's experts {key: [n, EL, ...]} on the same x -> [n, B, T, D]; with `parts`,
    (r [n, B, T, D], u [n, B, T, F]) of their last layers."""
    return jax.vmap(lambda expert: num.stack_parts(expert, x) if parts else num.stack(expert, x))(experts)


def gate_merge(gate_w: jax.Array, gate_b: jax.Array, x: jax.Array, h_bb: jax.Array,
               h_experts: list[jax.Array], *, combine: Combine = ref_gated_combine,
               expert_order: tuple[int, ...] | None = None) -> jax.Array:
    """y = sum_e softmax(x W_g + b_g)_e h_e with h = [h_bb, *experts] (eq. 1-2).

    gate_w [D, E], gate_b [E], x and h_bb [B, T, D], h_experts: arrays [n_k, B, T, D]
    whose n_k add up to E - 1. Their rows hold experts `expert_order` (default 0, 1,
    ...); the gate's columns are permuted to match (logits are [B, T, E]: cheap).
    """
    outputs = jnp.concatenate([h_bb[None], *h_experts], axis=0)                   # [E, B, T, D]
    return combine(ordered_gate_logits(gate_w, gate_b, x, expert_order), outputs)


def ordered_gate_logits(gate_w, gate_b, x, expert_order: tuple[int, ...] | None) -> jax.Array:
    """Gate logits [B, T, E] with the expert columns in `expert_order` (backbone first)."""
    logits = fast_model.gate_logits(gate_w, gate_b, x)                            # [B, T, E]
    if expert_order is not None and tuple(expert_order) != tuple(range(len(expert_order))):
        logits = logits[..., jnp.array((0, *(1 + e for e in expert_order)))]
    return logits


def fused_gate_merge(gate_w: jax.Array, gate_b: jax.Array, x: jax.Array, backbone: tuple,
                     experts: list[tuple], *, expert_order: tuple[int, ...] | None = None) -> jax.Array:
    """`gate_merge` fused with the stacks' last down-projections (`fast/merge.py`).

    backbone: (r [B, T, D], u [B, T, F], W_down [F, D]) of the block's last backbone layer;
    experts: tuples (r [n_k, B, T, D], u [n_k, B, T, F], W_down [n_k, F, D]) whose n_k add
    up to E - 1, rows in `expert_order` as in `gate_merge`. -> y [B, T, D].
    """
    r_ex, u_ex, w_ex = (jnp.concatenate(part, axis=0) for part in zip(*experts))
    return fused_merge(ordered_gate_logits(gate_w, gate_b, x, expert_order), *backbone, r_ex, u_ex, w_ex)
