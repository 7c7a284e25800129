"""Where the components of an MPMD step run (paper section 3.3, 4.4): the backbone on one
sub-mesh of the devices, the experts on one or more others. Data, like the rules tables
of `fast/sharding.py`: `mode_jax.distributed` parses `--placement` into a `Placement`,
and `fast/mpmd.py` builds its meshes from one.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mode_jax.fast.sharding import resolve_axes


@dataclasses.dataclass(frozen=True)
class SubMesh:
    """Devices (indices into `jax.devices()`), mesh axes ((name, size), ...; () means
    ("dp", all)) and, for an expert mesh, the expert ids it hosts (None: assigned)."""
    devices: tuple[int, ...]
    axes: tuple[tuple[str, int], ...] = ()
    experts: tuple[int, ...] | None = None


@dataclasses.dataclass(frozen=True)
class Placement:
    """Which component runs where. `allow_shared_devices` lets sub-meshes share devices
    (only to run the MPMD code path on fewer devices than meshes, e.g. one GPU)."""
    backbone: SubMesh
    experts: tuple[SubMesh, ...]
    allow_shared_devices: bool = False

    def names(self) -> list[str]:
        return ["backbone"] + [f"experts[{m}]" for m in range(len(self.experts))]

    def resolve(self, n_experts: int, n_devices: int) -> "Placement":
        """A copy with axes and expert ids filled in; ValueError naming the sub-mesh if
        a device is missing, repeated or shared, axes do not fit, or experts are amiss."""
        meshes = [self.backbone, *self.experts]
        if not self.experts:
            raise ValueError("placement: at least one expert sub-mesh is needed")
        owner: dict[int, str] = {}
        for name, sub in zip(self.names(), meshes):
            if not sub.devices:
                raise ValueError(f"placement {name!r}: no devices")
            if len(set(sub.devices)) != len(sub.devices):
                raise ValueError(f"placement {name!r}: a device is listed twice in {sub.devices}")
            for d in sub.devices:
                if not 0 <= d < n_devices:
                    raise ValueError(f"placement {name!r}: device {d} does not exist "
                                     f"({n_devices} devices: 0-{n_devices - 1})")
                if d in owner and not self.allow_shared_devices:
                    raise ValueError(f"placement: device {d} is in both {owner[d]!r} and {name!r} "
                                     f"(sub-meshes must be disjoint)")
                owner.setdefault(d, name)
        given = [sub.experts for sub in self.experts]
        if all(g is None for g in given):
            if len(self.experts) > n_experts:
                raise ValueError(f"placement: {len(self.experts)} expert sub-meshes for only "
                                 f"{n_experts} experts")
            q, r = divmod(n_experts, len(self.experts))
            bounds = np.cumsum([0] + [q + (m < r) for m in range(len(self.experts))]).tolist()
            given = [tuple(range(bounds[m], bounds[m + 1])) for m in range(len(self.experts))]
        elif any(g is None for g in given):
            raise ValueError("placement: give the experts of every expert sub-mesh, or of none")
        flat = sorted(e for g in given for e in g)
        if flat != list(range(n_experts)) or any(not g for g in given):
            raise ValueError(f"placement: expert sub-meshes host experts {list(given)}; each of "
                             f"the {n_experts} experts (0-{n_experts - 1}) must be on exactly one, "
                             f"and each sub-mesh needs at least one")
        axes = [resolve_axes(sub.axes or (("dp", -1),), len(sub.devices), where=f"placement {n!r}")
                for n, sub in zip(self.names(), meshes)]
        return Placement(SubMesh(self.backbone.devices, axes[0]),
                         tuple(SubMesh(s.devices, a, tuple(g))
                               for s, a, g in zip(self.experts, axes[1:], given)),
                         self.allow_shared_devices)


def even_placement(n_devices: int, n_expert_meshes: int, *, backbone_devices: int | None = None) -> Placement:
    """Backbone on the first devices, the rest split evenly over the expert meshes
    (leftovers go to the backbone). On fewer devices than meshes, meshes share devices."""
    if n_devices < n_expert_meshes + 1:
        return Placement(SubMesh((0,)), tuple(SubMesh(((m + 1) % n_devices,)) for m in range(n_expert_meshes)),
                         allow_shared_devices=True)
    bb = backbone_devices or max(1, n_devices // 2)
    per = max(1, (n_devices - bb) // n_expert_meshes)
    bb = n_devices - per * n_expert_meshes
    return Placement(SubMesh(tuple(range(bb))),
                     tuple(SubMesh(tuple(range(bb + m * per, bb + (m + 1) * per))) for m in range(n_expert_meshes)))
