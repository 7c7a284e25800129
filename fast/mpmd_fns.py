"""The jitted functions an MPMD step (`fast/mpmd.py`) runs on each sub-mesh, one per
component (paper section 3.3): the embedding, head and loss, a block's backbone layers
and its merge on the backbone mesh; a block's experts on each expert mesh; the
per-mesh optimizer update. Forward functions return `jax.vjp` pullbacks (pytrees of
residuals living on their mesh) that `apply` runs in the backward pass.

What a block's stacks hand the merge follows `FastConfig.merge`: with 'fused' the last
layer's (r, u) and down-projections W go to `fast/components.py`'s `fused_gate_merge`
(`fast/merge.py`), with 'stacked' the stacks' outputs h go to `gate_merge` (the combine
per batch shard under shard_map, `fast/sharded_combine.py`). The block index is a
traced int32, so one compiled function serves every block.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from mode_jax.fast import components as C
from mode_jax.fast import optim
from mode_jax.fast.sharded_combine import sharded_gated_combine
from mode_jax.fast.sharding import batch_axes, replicated


@dataclasses.dataclass(frozen=True)
class MeshFns:
    embed: Callable          # backbone, tokens [B, T + 1] -> x [B, T, D]                     (backbone mesh)
    bb_fwd: Callable         # layers, x, i -> (p_bb: (r, u) or (h,), pullback)               (backbone mesh)
    merge_fwd: Callable      # gates, w_down, x, p_bb, outs, i -> (y, pullback)               (backbone mesh)
    head: Callable           # backbone, y, batch -> (metrics, dy)                            (backbone mesh)
    add: Callable            # [arrays] -> their sum
    apply: Callable          # pullback, cotangent -> cotangents of its inputs
    ex_fwd: list             # per expert mesh: experts, x, i -> (what it ships, pullback)
    stack_norm: Callable     # per-block grads -> ([n_blocks, ...] grads, squared norm)
    update: list             # per mesh (backbone first): grads, opt state, params, sq norms, lr ->
    #                          (params, opt state, stats)


def mesh_fns(step, combine, jit) -> MeshFns:
    """The functions of `step` (an `MpmdStep`: its meshes, shardings, numerics and what its
    expert meshes ship), jitted with `jit`; `combine`: the stacked merge per batch shard."""
    num, per_block, bb = step.num, step.per_block, step.meshes[0]
    order = tuple(e for s in step.placement.experts for e in s.experts)
    token_axes = batch_axes(bb.mesh, bb.rules)

    def merge_combine(logits, outputs):
        return sharded_gated_combine(logits, outputs, mesh=bb.mesh, token_axes=token_axes,
                                     combine=combine)

    def embed(backbone, tokens):
        return jax.lax.with_sharding_constraint(num.embed(backbone, tokens[:, :-1]), bb.hidden)

    fused, n_diff = step.fused, step.n_diff

    def bb_fwd(layers, x, i):                 # -> (r, u) fused, (h,) stacked; its pullback
        def f(x):
            out = C.backbone_block(layers, x, i, per_block=per_block, num=num, parts=fused)
            return out if fused else (out,)
        return jax.vjp(f, x)

    def merge_fwd(gates, w_down, x, p_bb, outs, i):
        # outs: per expert mesh, what it shipped; the first n_diff are differentiated.
        consts = [o[n_diff:] for o in outs]

        def f(w, b, x, p_bb, diff):
            ex = [d + c for d, c in zip(diff, consts)]
            if fused:
                # The down-projection of the block's last backbone layer: [F, D].
                w_bb = jax.lax.dynamic_index_in_dim(w_down, (i + 1) * per_block - 1, 0, keepdims=False)
                y = C.fused_gate_merge(w, b, x, (*p_bb, w_bb), ex, expert_order=order)
            else:
                y = C.gate_merge(w, b, x, p_bb[0], [e[0] for e in ex], combine=merge_combine,
                                 expert_order=order)
            return jax.lax.with_sharding_constraint(y, bb.hidden)
        return jax.vjp(f, gates["gate_w"][i], gates["gate_b"][i], x, p_bb, [o[:n_diff] for o in outs])

    def head(backbone, y, batch):
        def loss(y):
            m = num.head_metrics(backbone, y, batch["tokens"][:, 1:], batch.get("mask"))
            return m["loss"], m
        (_, metrics), dy = jax.value_and_grad(loss, has_aux=True)(y)
        return metrics, dy

    def make_ex_fwd(ship):
        def ex_fwd(experts, x, i):            # -> what this mesh ships (fast/mpmd.py's docstring), pullback
            def f(p, x):
                out = C.experts_forward(p, x, num, parts=fused)
                out = tuple(jax.lax.with_sharding_constraint(o, s)
                            for o, s in zip(out if fused else (out,), ship))
                # The experts' last down-projections [n, F, D], differentiated when they train.
                return out + (p["w_down"][:, -1],) if fused and step.train_experts else out
            p_i = C.take_block(experts["experts"], i)
            if step.train_experts:
                return jax.vjp(f, p_i, x)
            out, vjp = jax.vjp(lambda x: f(p_i, x), x)
            # Frozen experts: W goes along for the forward, and no dW comes back.
            return out + ((p_i["w_down"][:, -1],) if fused else ()), vjp
        return jit(ex_fwd)

    def stack_norm(grads):            # per-block grads -> [n_blocks, ...] and its squared norm
        stacked = jax.tree.map(lambda *g: jnp.stack(g), *grads)
        return stacked, sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(stacked))

    opt = step.opt

    def update(grads, state, params, sq_norms, peak_lr):
        # Every mesh clips by the norm of all the gradients, as one tree would be.
        norm = jnp.sqrt(sum(sq_norms))
        return optim.apply(grads, state, params, opt, peak_lr=peak_lr, grad_norm=norm)

    def make_update(shardings, opt_shardings, mesh):   # outputs keep the placed layout: no recompiles
        out = (shardings, opt_shardings, replicated(mesh))
        return jit(update, donate_argnums=(1, 2), out_shardings=out)

    opt_sh = step.shardings["opt"]
    updates = [make_update(step.shardings["gates"], opt_sh["gates"], bb.mesh)] + [
        make_update(s, o, m.mesh) for s, o, m in zip(step.shardings["experts"], opt_sh["experts"], step.meshes[1:])]
    return MeshFns(embed=jit(embed), bb_fwd=jit(bb_fwd), merge_fwd=jit(merge_fwd), head=jit(head),
                   add=jit(lambda parts: sum(parts[1:], parts[0])), apply=jit(lambda vjp, ct: vjp(ct)),
                   ex_fwd=[make_ex_fwd(s) for s in step.ship_ex], stack_norm=jit(stack_norm), update=updates)
