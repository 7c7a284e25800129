"""MPMD training step (paper section 3.3 and 4.4): the backbone on one sub-mesh, the
experts on one or more other sub-meshes, each block's parts running concurrently.

jax 0.11 has no MPMD API; the idiom here is one mesh per disjoint device subset,
one jitted function per component and mesh, and `jax.device_put` between them.
Async dispatch runs the meshes side by side. Per block i and step:

    forward   x --put--> each expert mesh: out_m, vjp_m = experts_m(x)       } run
              p_bb, vjp_bb = backbone_i(x)  (backbone mesh)                  } concurrently
              out_m --put--> backbone mesh; y, vjp_merge = merge(gate_i, x, p_bb, out_*)
    backward  d_gate_i, dx, dp_bb, d_out_* = vjp_merge(dy)
              d_out_m --put--> mesh m: dp_m, dx_m = vjp_m(d_out_m)           } concurrently
              dx_bb = vjp_bb(dp_bb);  dx_m --put--> backbone mesh; dy = dx + dx_bb + sum dx_m
    update    `fast/optim.py`'s AdamW (the optimizer of every layout) of the gates on the
              backbone mesh and of each mesh's experts on that mesh, all clipped by one
              global gradient norm (the meshes swap their squared norms, a few scalars),
              as one tree would be.

What a stack's output `out`/`p` is follows `FastConfig.merge` (as in `fast/model.py`):

    'fused'   (the default) the last layer's residual r [n, B, T, D], SwiGLU hidden
              u [n, B, T, F] and down-projection W [n, F, D]; the backbone mesh runs
              `fast/merge.py`'s `fused_merge` (N + 1 down-projections and the gated sum in
              one matmul) and sends back dr, du and, when the experts train, dW.
    'stacked' the stack's output h [n, B, T, D]; the backbone mesh runs the stacked merge
              (the Pallas combine per batch shard) and sends back dh.

The fused merge ships (D + F) / D = 3.67x the stacked merge's activation bytes each way
(SmolLM2: F / D = 2.67), plus W, and runs every last down-projection on the backbone
mesh; docs/distributed.md weighs this. `fast=None` (ref/'s layer math) merges stacked.

The per-mesh functions are `fast/mpmd_fns.py`'s. Each `jax.vjp` runs inside the forward
jit and returns its pullback (a pytree holding the residuals on that mesh), which the
backward jit applies: no recomputation.
Each sub-mesh has its own axes and so its own rules table (`fast/sharding.py`).
The backbone (and embedding, LM head) is frozen; gates and, unless
trainable='gates', experts train. The merge runs on the backbone mesh.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import numpy as np

from mode_jax.fast import components as C
from mode_jax.fast import optim
from mode_jax.fast.combine import gated_combine as platform_gated_combine
from mode_jax.fast.config import FastConfig
from mode_jax.fast.placement import Placement
from mode_jax.fast.mpmd_fns import mesh_fns
from mode_jax.fast.sharding import (activation_sharding, host, make_mesh, place,
                                    replicated, rules_for_axes, shardings_for)
from mode_jax.fast.spmd import batch_shardings, check_batch
from mode_jax.ref.config import LlamaConfig, OptimConfig

MPMD_TRAINABLE = ("experts_and_gates", "gates")


@dataclasses.dataclass
class _Mesh:
    name: str
    mesh: jax.sharding.Mesh
    rules: dict
    hidden: jax.sharding.NamedSharding     # [B, T, D]
    index: list                            # block index i as a replicated int32 on this mesh


class MpmdStep:
    """A MoDE training step over the sub-meshes of a `Placement`. Build, `place`, call."""

    def __init__(self, params, cfg: LlamaConfig, opt: OptimConfig, placement: Placement, *,
                 trainable: str = "experts_and_gates", batch_size: int, seq_len: int,
                 masked: bool = False, fast: FastConfig | None = None, combine=platform_gated_combine,
                 devices=None, compiler_options: dict | None = None):
        """params: the stacked MoDE tree (arrays or ShapeDtypeStructs), read for shapes.
        fast: None for ref/'s float32 layer math, a FastConfig for fast/model.py's.
        Every check (devices, experts, divisibility) runs here, before any compile.
        compiler_options go to every `jax.jit` (tests use them to compile faster)."""
        if trainable not in MPMD_TRAINABLE:
            raise ValueError(f"MPMD trains {MPMD_TRAINABLE} (the backbone is frozen), got {trainable!r}")
        if jax.process_count() > 1:
            # Placing, gathering and checkpointing the state, and the loop's metrics and
            # finiteness checks, read sub-meshes this process cannot address when they live
            # on another; transfers between processes need jax's DCN flags (docs/distributed.md).
            raise ValueError(f"MPMD (--placement) runs in one process, not {jax.process_count()}: "
                             "across processes use --mesh (SPMD)")
        devices = list(jax.devices() if devices is None else devices)
        n_blocks, n_experts = params["blocks"]["experts"]["wq"].shape[:2]
        self.placement = placement.resolve(n_experts, len(devices))
        self.num, self.opt, self.trainable, self.n_blocks = C.Numerics(cfg, fast), opt, trainable, n_blocks
        self.train_experts = trainable == "experts_and_gates"
        self.per_block = params["backbone"]["layers"]["wq"].shape[0] // n_blocks
        shape = (batch_size, seq_len, cfg.d_model)
        self.meshes = []
        for name, sub in zip(self.placement.names(), [self.placement.backbone, *self.placement.experts]):
            mesh = make_mesh(sub.axes, [devices[d] for d in sub.devices], where=f"placement {name!r}")
            rules = rules_for_axes(mesh.axis_names)
            hidden = activation_sharding("hidden", shape, mesh, rules, where=f"placement {name!r}")
            self.meshes.append(_Mesh(name, mesh, rules, hidden,
                                     [place(np.int32(i), replicated(mesh)) for i in range(n_blocks)]))
        bb = self.meshes[0]
        where = f"placement 'backbone' {dict(bb.mesh.shape)}"
        self.check_batch = functools.partial(check_batch, batch_size=batch_size, seq_len=seq_len, masked=masked,
                                             where="MPMD step")
        comps = jax.eval_shape(self._split, params)        # shapes only: params may be ShapeDtypeStructs
        self.shardings = {
            "backbone": shardings_for(comps["backbone"], bb.mesh, bb.rules, where=where),
            "gates": shardings_for(comps["gates"], bb.mesh, bb.rules, where=where),
            "experts": [shardings_for(e, m.mesh, m.rules, where=f"placement {m.name!r} {dict(m.mesh.shape)}")
                        for e, m in zip(comps["experts"], self.meshes[1:])],
            "batch": batch_shardings(bb.mesh, bb.rules, batch_size=batch_size, seq_len=seq_len,
                                     masked=masked, where=where),
        }
        def opt_shardings(like, shardings, mesh):
            return optim.shardings(like, shardings, opt, replicated(mesh))
        self.shardings["opt"] = {
            "gates": opt_shardings(comps["gates"], self.shardings["gates"], bb.mesh),
            "experts": [opt_shardings(e, s, m.mesh) if self.train_experts else None
                        for e, s, m in zip(comps["experts"], self.shardings["experts"], self.meshes[1:])]}
        # What each expert mesh's stacks hand the merge per block (module docstring), laid
        # out on that mesh (`ship_ex`) and on the backbone mesh (`ship_bb`); the first
        # `n_diff` of them are differentiated (their cotangents go back).
        self.fused = fast is not None and fast.merge == "fused"
        self.n_diff = (3 if self.train_experts else 2) if self.fused else 1
        width = params["blocks"]["experts"]["w_up"].shape[-1]
        def shipped(m, n):
            on = f"placement {m.name!r}"
            stack = activation_sharding("stack", (n, *shape), m.mesh, m.rules, where=on)       # [n, B, T, D]
            if not self.fused:
                return (stack,)
            hidden_u = activation_sharding("stack", (n, batch_size, seq_len, width), m.mesh, m.rules, where=on)
            return stack, hidden_u, replicated(m.mesh)                                          # r, u, W
        self.ship_ex = [shipped(m, len(s.experts)) for s, m in zip(self.placement.experts, self.meshes[1:])]
        self.ship_bb = [shipped(bb, len(s.experts)) for s in self.placement.experts]
        self.fns = mesh_fns(self, combine, functools.partial(jax.jit, compiler_options=compiler_options))

    # ------------------------------------------------------------------ layout
    def _split(self, params) -> dict:
        """The stacked tree -> {"backbone", "gates", "experts": [per expert mesh]}."""
        blocks = params["blocks"]
        experts = [{"experts": jax.tree.map(lambda a: a[:, list(s.experts)], blocks["experts"])}
                   for s in self.placement.experts]
        return {"backbone": params["backbone"], "experts": experts,
                "gates": {"gate_w": blocks["gate_w"], "gate_b": blocks["gate_b"]}}

    def place(self, params) -> dict:
        """The stacked tree laid out on the sub-meshes, with optimizer states."""
        comps = self._split(params)
        state = {k: place(comps[k], self.shardings[k]) for k in ("backbone", "gates")}
        state["experts"] = [place(e, s) for e, s in zip(comps["experts"], self.shardings["experts"])]

        state["opt"] = self.init_opt(state)
        return state

    def init_opt(self, state) -> dict:
        """Fresh optimizer states of the placed gates and experts ({"gates", "experts": [per
        mesh, None when experts are frozen]}), each laid out like its params."""
        def init(tree, shardings):
            return jax.jit(lambda t: optim.init(t, self.opt), out_shardings=shardings)(tree)
        opt_sh = self.shardings["opt"]
        return {"gates": init(state["gates"], opt_sh["gates"]),
                "experts": [init(e, s) if s is not None else None
                            for e, s in zip(state["experts"], opt_sh["experts"])]}

    def to_canonical(self, trainable: dict, opt_state: dict, template: dict):
        """(trainable {"gates", "experts"}, opt_state {"gates", "experts"}) in the structure
        one device holds them (the partition of the stacked tree, `template`, with one
        optimizer state over it), on one device: what a checkpoint stores, so it restores
        on any layout."""
        ex_adam = [optim.adam_state(o) for o in opt_state["experts"]] if self.train_experts else []

        def tree(gates, experts):
            if self.train_experts:
                blocks = self.gather({"backbone": {}, "gates": gates, "experts": experts})["blocks"]
            else:
                blocks = {"experts": template["blocks"]["experts"], **jax.tree.map(np.asarray, gates)}
            return jax.device_put({**template, "blocks": blocks})

        t = tree(trainable["gates"], [{"experts": e["experts"]} for e in trainable["experts"]])
        o = optim.replace_adam(
            opt_state["gates"],
            lambda a: a._replace(count=jax.device_put(np.asarray(a.count)), mu=tree(a.mu, [e.mu for e in ex_adam]),
                                 nu=tree(a.nu, [e.nu for e in ex_adam])),
            lambda x: jax.device_put(np.asarray(x)))
        return t, o

    def from_canonical(self, trainable: dict, opt_state, frozen_experts: list) -> tuple[dict, dict]:
        """Inverse of `to_canonical` (host arrays, for `place`); with frozen experts
        (trainable='gates') the experts are `frozen_experts`, as placed."""
        def parts(tree):
            blocks = jax.tree.map(np.asarray, tree["blocks"])
            gates = {"gate_w": blocks["gate_w"], "gate_b": blocks["gate_b"]}
            if not self.train_experts:
                return gates, None
            return gates, self._split({"backbone": None, "blocks": blocks})["experts"]

        gates, experts = parts(trainable)
        t = {"gates": gates, "experts": experts if self.train_experts else frozen_experts}
        host = lambda x: np.asarray(x)
        o = {"gates": optim.replace_adam(opt_state, lambda a: a._replace(
                 count=host(a.count), mu=parts(a.mu)[0], nu=parts(a.nu)[0]), host),
             "experts": [optim.replace_adam(opt_state, lambda a, m=m: a._replace(
                 count=host(a.count), mu=parts(a.mu)[1][m], nu=parts(a.nu)[1][m]), host)
                 if self.train_experts else None for m in range(len(self.placement.experts))]}
        return t, o

    def place_batch(self, batch: dict) -> dict:
        self.check_batch(batch)
        return place(batch, {k: self.shardings["batch"][k] for k in batch})

    def gather(self, state) -> dict:
        """The stacked tree back from the sub-meshes (host numpy, gathered across processes)."""
        ids = [e for s in self.placement.experts for e in s.experts]
        order = np.argsort(ids)
        experts = jax.tree.map(lambda *parts: np.concatenate(parts, axis=1)[:, order],
                               *[host(e["experts"]) for e in state["experts"]])
        return {"backbone": host(state["backbone"]), "blocks": {"experts": experts, **host(state["gates"])}}

    # ------------------------------------------------------------------ the step
    def __call__(self, state: dict, batch: dict, *, profile: dict | None = None, peak_lr=None):
        """One step; batch from `place_batch`; `peak_lr` overrides opt.learning_rate (traced:
        no recompile). Returns (new state, metrics). With a
        `profile` dict, every dispatch is waited for and its seconds added to
        profile[mesh name] or profile["transfer"] (serialises the meshes: for
        measuring busy time, not for speed)."""
        def run(kind, fn, *args):
            if profile is None:
                return fn(*args)
            t0 = time.perf_counter()
            out = jax.block_until_ready(fn(*args))
            profile[kind] = profile.get(kind, 0.0) + time.perf_counter() - t0
            return out

        def put(x, sharding):
            return run("transfer", jax.device_put, x, sharding)

        bb, ex_meshes = self.meshes[0], self.meshes[1:]
        x = run(bb.name, self.fns.embed, state["backbone"], batch["tokens"])
        tapes = []
        for i in range(self.n_blocks):
            xs = [put(x, m.hidden) for m in ex_meshes]
            ex = [run(m.name, f, e, xm, m.index[i])
                  for m, f, e, xm in zip(ex_meshes, self.fns.ex_fwd, state["experts"], xs)]
            p_bb, vjp_bb = run(bb.name, self.fns.bb_fwd, state["backbone"]["layers"], x, bb.index[i])
            outs = [put(o, s) for (o, _), s in zip(ex, self.ship_bb)]
            x, vjp_merge = run(bb.name, self.fns.merge_fwd, state["gates"], state["backbone"]["layers"]["w_down"],
                               x, p_bb, outs, bb.index[i])
            tapes.append((vjp_merge, vjp_bb, [v for _, v in ex]))
        metrics, dy = run(bb.name, self.fns.head, state["backbone"], x, batch)
        g_gates, g_experts = [], [[] for _ in ex_meshes]
        for i in reversed(range(self.n_blocks)):
            vjp_merge, vjp_bb, vjp_ex = tapes[i]
            d_w, d_b, dx, dp_bb, d_outs = run(bb.name, self.fns.apply, vjp_merge, dy)
            d_outs = [put(d, s[:self.n_diff]) for d, s in zip(d_outs, self.ship_ex)]
            ex = [run(m.name, self.fns.apply, v, d) for m, v, d in zip(ex_meshes, vjp_ex, d_outs)]
            dx_bb, = run(bb.name, self.fns.apply, vjp_bb, dp_bb)
            dxs = [put(r[-1], bb.hidden) for r in ex]
            if i:                                   # block 0's input is the frozen embedding
                dy = run(bb.name, self.fns.add, [dx, dx_bb, *dxs])
            g_gates.insert(0, {"gate_w": d_w, "gate_b": d_b})
            for m, r in enumerate(ex):
                if self.train_experts:
                    g_experts[m].insert(0, {"experts": r[0]})
        peak_lr = self.opt.learning_rate if peak_lr is None else peak_lr
        return self._optimizer_step(state, g_gates, g_experts, metrics, run, put, peak_lr)

    def _optimizer_step(self, state, g_gates, g_experts, metrics, run, put, peak_lr):
        bb, ex_meshes = self.meshes[0], self.meshes[1:]
        grads = [run(bb.name, self.fns.stack_norm, g_gates)]
        if self.train_experts:
            grads += [run(m.name, self.fns.stack_norm, g) for m, g in zip(ex_meshes, g_experts)]
        targets = self.meshes[:len(grads)]
        sq = [[put(sq, replicated(t.mesh)) for _, sq in grads] for t in targets]
        new = {"backbone": state["backbone"], "experts": state["experts"], "opt": dict(state["opt"])}
        new["gates"], new["opt"]["gates"], stats = run(
            bb.name, self.fns.update[0], grads[0][0], state["opt"]["gates"], state["gates"], sq[0], peak_lr)
        if self.train_experts:
            updated = [run(m.name, u, g[0], o, e, s, peak_lr) for m, u, g, o, e, s in
                       zip(ex_meshes, self.fns.update[1:], grads[1:], state["opt"]["experts"],
                           state["experts"], sq[1:])]
            new["experts"] = [u[0] for u in updated]
            new["opt"]["experts"] = [u[1] for u in updated]
        return new, {**metrics, **stats}
