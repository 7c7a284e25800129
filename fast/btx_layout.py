"""The stacked layout of BTX's MLP experts (`ref/btx.py`), and exact conversions to and from ref/.

    ref   {"layers": [{"mlps": [{"w_gate": [D, F], "w_up": [D, F], "w_down": [F, D]}] * E,
                       "gate_w": [D, E] (stage 2 only)}] * L}
    fast  {"mlps": {"w_gate": [L, E, D, F], "w_up": [L, E, D, F], "w_down": [L, E, F, D]},
           "gate_w": [L, D, E] (stage 2 only)}

Arrays are only stacked or unstacked, never cast (`to_ref(to_fast(t))` is `t` bit for bit).
`fast/params.py` calls these for a model tree's "btx" entry.
"""

from __future__ import annotations

import jax.numpy as jnp

from mode_jax.ref.btx import MLP_KEYS


def to_fast(btx: dict) -> dict:
    layers = btx["layers"]
    routed = {"gate_w" in layer for layer in layers}
    if len(routed) != 1 or len({len(layer["mlps"]) for layer in layers}) != 1:
        raise ValueError("btx: every layer must hold the same number of MLPs, all with or all without a router")
    out = {"mlps": {k: jnp.stack([jnp.stack([m[k] for m in layer["mlps"]]) for layer in layers])
                    for k in MLP_KEYS}}                                                # [L, E, ...]
    if routed.pop():
        out["gate_w"] = jnp.stack([layer["gate_w"] for layer in layers])                # [L, D, E]
    return out


def to_ref(btx: dict) -> dict:
    n_layers, n_experts = btx["mlps"]["w_gate"].shape[:2]
    layers = []
    for i in range(n_layers):
        layer = {"mlps": [{k: btx["mlps"][k][i, e] for k in MLP_KEYS} for e in range(n_experts)]}
        if "gate_w" in btx:
            layer["gate_w"] = btx["gate_w"][i]
        layers.append(layer)
    return {"layers": layers}
