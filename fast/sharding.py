"""Shardings as data (paper section 3.3, "SPMD"): logical axis names per parameter,
and one rules table per configuration mapping them to mesh axes.

Every array of the stacked (`fast/params.py`) tree gets a tuple of *logical* axis
names, one per dimension, read off its key:

    embed [V, D] ("vocab", "embed")          wq [L, D, N*H] ("layers", "embed", "q_heads")
    lm_head [D, V] ("embed", "vocab")        wo [L, N*H, D] ("layers", "q_heads", "embed")
    final_norm / *_norm ("norm",)            w_gate, w_up ("layers", "embed", "mlp")
    gate_w [n_blocks, D, E] ("blocks", "embed", "gate")      w_down ("layers", "mlp", "embed")
    expert layers: ("blocks", "experts", "layers", <the layer's own names>)

A *rules table* maps logical names to mesh axes (a name, a tuple of names, or
absent = replicated). Mesh axes are named after the parallelism they carry, and
each contributes a fixed set of rules (`AXIS_RULES`):

    dp    data parallel: the batch is split, every weight replicated
    fsdp  fully sharded data parallel: the batch and every weight's D dimension split
    tp    tensor (Megatron) parallel: heads, MLP width and vocab split
    ep    expert parallel: the experts axis of expert weights (and the batch) split

so a mesh's rules are the union over its axes (`rules_for_axes`), and the SPMD
presets (`PRESETS`) are just mesh shapes. Rules naming a mesh axis that a mesh lacks
are ignored, so one table serves every sub-mesh. `shardings_for` checks, before
anything compiles, that each sharded dimension is divisible by its mesh axes.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

# Logical names of one transformer layer's arrays (without the leading stack axes).
LAYER_AXES = {
    "attn_norm": ("norm",), "mlp_norm": ("norm",),
    "wq": ("embed", "q_heads"), "wk": ("embed", "kv_heads"), "wv": ("embed", "kv_heads"),
    "wo": ("q_heads", "embed"),
    "w_gate": ("embed", "mlp"), "w_up": ("embed", "mlp"), "w_down": ("mlp", "embed"),
    "bq": ("q_heads",), "bk": ("kv_heads",), "bv": ("kv_heads",),          # Qwen2's q/k/v biases
}
TOP_AXES = {
    "embed": ("vocab", "embed"), "lm_head": ("embed", "vocab"), "final_norm": ("norm",),
    "gate_w": ("blocks", "embed", "gate"), "gate_b": ("blocks", "gate"),
}
# Activations: tokens [B, T], hidden states [B, T, D], stacked outputs [E, B, T, D].
ACTIVATION_AXES = {
    "tokens": ("batch", "seq"),
    "hidden": ("batch", "seq", "act_embed"),
    "stack": ("act_experts", "batch", "seq", "act_embed"),
}

MESH_AXES = ("dp", "fsdp", "ep", "tp")   # canonical order: batch-like axes outermost
AXIS_RULES = {
    "dp": {"batch": "dp"},
    "fsdp": {"batch": "fsdp", "embed": "fsdp"},
    "ep": {"batch": "ep", "experts": "ep"},
    "tp": {"q_heads": "tp", "kv_heads": "tp", "mlp": "tp", "vocab": "tp"},
}

# SPMD presets: mesh shapes over all devices (-1 = whatever is left).
PRESETS = {
    "dp": (("dp", -1),),
    "fsdp": (("fsdp", -1),),
    "tp": (("tp", -1),),
    "dp_tp": (("dp", -1), ("tp", 2)),
    "fsdp_tp": (("fsdp", -1), ("tp", 2)),
    "dp_ep": (("dp", -1), ("ep", 2)),
}


def rules_for_axes(axis_names) -> dict[str, tuple[str, ...]]:
    """The rules table of a mesh with these axes: logical name -> tuple of mesh axes."""
    unknown = [a for a in axis_names if a not in AXIS_RULES]
    if unknown:
        raise ValueError(f"unknown mesh axis {unknown[0]!r}: mesh axes must be among {MESH_AXES}")
    rules: dict[str, tuple[str, ...]] = {}
    for axis in sorted(axis_names, key=MESH_AXES.index):
        for logical, mesh_axis in AXIS_RULES[axis].items():
            rules[logical] = rules.get(logical, ()) + (mesh_axis,)
    return rules


# One rules table per SPMD configuration, written out as data.
PRESET_RULES = {name: rules_for_axes([a for a, _ in axes]) for name, axes in PRESETS.items()}


def resolve_axes(axes, n_devices: int, *, where: str = "mesh") -> tuple[tuple[str, int], ...]:
    """((name, size), ...) with at most one size -1 filled in so the product is n_devices."""
    axes = tuple((str(a), int(s)) for a, s in axes)
    names = [a for a, _ in axes]
    rules_for_axes(names)  # validates the names
    if len(set(names)) != len(names):
        raise ValueError(f"{where}: mesh axis repeated in {names}")
    free = [a for a, s in axes if s == -1]
    if len(free) > 1:
        raise ValueError(f"{where}: at most one mesh axis may omit its size, got {free}")
    bad = [(a, s) for a, s in axes if s != -1 and s < 1]
    if bad:
        raise ValueError(f"{where}: mesh axis sizes must be >= 1, got {bad}")
    fixed = math.prod(s for _, s in axes if s != -1)
    if free:
        if n_devices % fixed:
            raise ValueError(f"{where}: {n_devices} devices are not divisible by the fixed mesh "
                             f"axes {[(a, s) for a, s in axes if s != -1]} (product {fixed})")
        axes = tuple((a, n_devices // fixed if s == -1 else s) for a, s in axes)
    if math.prod(s for _, s in axes) != n_devices:
        raise ValueError(f"{where}: mesh axes {dict(axes)} hold {math.prod(s for _, s in axes)} "
                         f"devices but {n_devices} were given")
    return axes


def make_mesh(axes, devices=None, *, where: str = "mesh") -> jax.sharding.Mesh:
    """A mesh with `Auto` axis types (jit propagates shardings, as GSPMD) over `devices`
    (default: all). axes: ((name, size), ...), one size may be -1."""
    devices = list(jax.devices() if devices is None else devices)
    axes = resolve_axes(axes, len(devices), where=where)
    return jax.make_mesh(tuple(s for _, s in axes), tuple(a for a, _ in axes),
                         axis_types=(AxisType.Auto,) * len(axes), devices=devices)


def _keys(path) -> tuple:
    return tuple(getattr(k, "key", getattr(k, "idx", None)) for k in path)


def logical_axes_for(keys: tuple, ndim: int) -> tuple[str | None, ...]:
    """Logical names of the array at `keys` (a path in the fast tree)."""
    name = keys[-1]
    if name in ("a", "b") and len(keys) >= 2 and keys[-2] in LAYER_AXES:   # LoRA adapters
        d_in, d_out = LAYER_AXES[keys[-2]] if len(LAYER_AXES[keys[-2]]) == 2 else (None, None)
        own = (d_in, "lora_rank") if name == "a" else ("lora_rank", d_out)
    elif name in LAYER_AXES:
        own = LAYER_AXES[name]
    elif name in TOP_AXES:
        own = TOP_AXES[name]
    else:
        raise ValueError(f"no logical axes known for parameter {'/'.join(map(str, keys))}")
    if "experts" in keys:
        lead = ("blocks", "experts", "layers")
    elif "layers" in keys:
        lead = ("layers",)
    else:
        lead = ()
    axes = lead + own
    if len(axes) != ndim:
        raise ValueError(f"parameter {'/'.join(map(str, keys))} has {ndim} dims, its logical "
                         f"axes {axes} have {len(axes)}")
    return axes


def logical_axes(params):
    """A tree of logical-axis tuples, one per array of `params` (None leaves stay None)."""
    return jax.tree_util.tree_map_with_path(lambda p, x: logical_axes_for(_keys(p), np.ndim(x)),
                                            params)


def spec_for(axes, shape, mesh, rules, *, name: str = "array", where: str = "mesh") -> P:
    """PartitionSpec of one array: each logical axis -> its mesh axes present in `mesh`.

    Raises ValueError naming the array, dimension and mesh axes when a mesh axis is
    used twice or a dimension is not divisible by the product of its mesh axes.
    """
    used: set[str] = set()
    spec = []
    for dim, (logical, size) in enumerate(zip(axes, shape)):
        mesh_axes = tuple(a for a in rules.get(logical, ()) if a in mesh.shape) if logical else ()
        for a in mesh_axes:
            if a in used:
                raise ValueError(f"{where}: {name} would use mesh axis {a!r} twice "
                                 f"(logical axes {axes}); fix the rules table")
            used.add(a)
        n = math.prod(mesh.shape[a] for a in mesh_axes)
        if size % n:
            raise ValueError(f"{where}: dimension {dim} ({logical!r}) of {name} has size {size}, "
                             f"not divisible by mesh axes {mesh_axes} of size {n} "
                             f"(mesh {dict(mesh.shape)})")
        spec.append(mesh_axes[0] if len(mesh_axes) == 1 else (mesh_axes or None))
    return P(*spec)


def shardings_for(params, mesh, rules, *, where: str = "mesh"):
    """A tree of `NamedSharding`s for `params` (arrays or ShapeDtypeStructs) on `mesh`."""
    def one(path, x):
        keys = _keys(path)
        spec = spec_for(logical_axes_for(keys, len(x.shape)), x.shape, mesh, rules,
                        name="params/" + "/".join(map(str, keys)), where=where)
        return NamedSharding(mesh, spec)
    return jax.tree_util.tree_map_with_path(one, params)


def activation_sharding(kind: str, shape, mesh, rules, *, where: str = "mesh") -> NamedSharding:
    """Sharding of an activation: kind in ACTIVATION_AXES ('tokens', 'hidden', 'stack')."""
    return NamedSharding(mesh, spec_for(ACTIVATION_AXES[kind], shape, mesh, rules,
                                        name=f"{kind} activations {tuple(shape)}", where=where))


def batch_axes(mesh, rules) -> tuple[str, ...]:
    """The mesh axes the batch dimension is split over."""
    return tuple(a for a in rules.get("batch", ()) if a in mesh.shape)


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def place(tree, shardings):
    """Put a tree of arrays onto `shardings` as fresh buffers (never aliasing the input,
    so a step may donate them). Goes through host memory: every process holds the
    whole (global) value and contributes its addressable shards, so the same call
    works single- and multi-process. (`jax.device_put` to a replicated sharding
    reuses the source device's buffer as one shard: donating it would delete `tree`.)
    An array already laid out so (e.g. restored from a checkpoint into these shardings) is
    copied on its devices: no process needs to hold all of it."""
    def one(x, sharding):
        if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(sharding, x.ndim):
            return jnp.copy(x)
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
    return jax.tree.map(one, tree, shardings)


def host(tree):
    """The (sharded) tree as host numpy arrays; across processes, gathered from all of them."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        # Only arrays spread over several processes are gathered: process_allgather would
        # stack a process-local array (the frozen backbone each process holds) once per process.
        def one(x):
            if isinstance(x, jax.Array) and not x.is_fully_addressable:
                return np.asarray(multihost_utils.process_allgather(x, tiled=True))
            return np.asarray(x)
        return jax.tree.map(one, tree)
    return jax.tree.map(np.asarray, tree)
