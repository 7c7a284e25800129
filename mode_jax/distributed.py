"""Multi-process start-up and the `--mesh` / `--placement` flags of the training
commands (paper section 3.3 and 4.4: SPMD over one mesh, MPMD over sub-meshes).

    add_mesh_args(parser)        adds --mesh, --placement and the multi-process flags
    mesh_from_args(args)         starts jax.distributed if asked, returns a `Parallelism`

Flag syntax (docs/distributed.md has examples):

    --mesh dp=2,tp=4             mesh axes name=size over all devices (product = devices);
                                 one size may be left out (`fsdp,tp=2`: fsdp takes the rest);
                                 a preset name (dp, fsdp, tp, dp_tp, fsdp_tp, dp_ep) also works
    --placement 'backbone=0-3[fsdp=4];experts=4-5[tp=2]:0-1,6-7:2-3'
                                 MPMD: `;` separates the backbone and experts parts, `,` the
                                 expert sub-meshes; each is DEVICES[AXES][:EXPERTS] with
                                 DEVICES and EXPERTS as ranges joined by `+` (0-3, 0+2+5),
                                 AXES in --mesh syntax (default: dp over the sub-mesh) and
                                 EXPERTS the expert ids it hosts (default: split in order)
    --coordinator HOST:PORT --num-processes N --process-id I
                                 one process per host; falls back to the environment
                                 (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID);
                                 `--coordinator auto` lets jax detect the cluster (SLURM, ...)

Device numbers index `jax.devices()`, which lists every process's devices (process 0's
first), so the same flags are given to every process.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re

import jax

from mode_jax.fast.placement import Placement, SubMesh
from mode_jax.fast.sharding import PRESETS, make_mesh, rules_for_axes

_initialized = False


@dataclasses.dataclass(frozen=True)
class Parallelism:
    """What the flags asked for: an SPMD mesh (and its rules) or an MPMD placement."""
    kind: str                                    # "spmd" or "mpmd"
    mesh: jax.sharding.Mesh | None = None        # spmd
    rules: dict | None = None                    # spmd
    placement: Placement | None = None           # mpmd (validated against N experts later)

    def describe(self) -> str:
        if self.kind == "spmd":
            return f"SPMD mesh {dict(self.mesh.shape)}"
        p = self.placement
        parts = [f"backbone devices {list(p.backbone.devices)}"]
        parts += [f"experts[{m}] devices {list(s.devices)}" for m, s in enumerate(p.experts)]
        return "MPMD " + "; ".join(parts)


def add_mesh_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("parallelism (docs/distributed.md)")
    g.add_argument("--mesh", default=None,
                   help="SPMD mesh over all devices: axes name=size from dp, fsdp, tp, ep, e.g. "
                        "'dp=2,tp=4' or 'fsdp' (one size may be omitted), or a preset: "
                        f"{', '.join(PRESETS)} (default: one device, no mesh)")
    g.add_argument("--placement", default=None,
                   help="MPMD instead of SPMD: e.g. 'backbone=0-3;experts=4-5,6-7' or "
                        "'backbone=0-3[fsdp=4];experts=4-5[tp=2]:0-1,6-7:2-3'")
    g.add_argument("--coordinator", default=None,
                   help="multi-process: coordinator HOST:PORT (process 0's host), or 'auto' "
                        "(default: $JAX_COORDINATOR_ADDRESS; unset = single process)")
    g.add_argument("--num-processes", type=int, default=None,
                   help="multi-process: number of processes (default: $JAX_NUM_PROCESSES)")
    g.add_argument("--process-id", type=int, default=None,
                   help="multi-process: this process's id, 0-based (default: $JAX_PROCESS_ID)")


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """`jax.distributed.initialize` from arguments or the environment; a no-op when
    neither names a coordinator (single process). Returns whether it initialized.
    Must run before anything touches the devices."""
    global _initialized
    env = os.environ
    coordinator = coordinator or env.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and env.get("JAX_NUM_PROCESSES"):
        num_processes = int(env["JAX_NUM_PROCESSES"])
    if process_id is None and env.get("JAX_PROCESS_ID"):
        process_id = int(env["JAX_PROCESS_ID"])
    if _initialized or not coordinator:
        if num_processes not in (None, 1) and not _initialized:
            raise ValueError(f"--num-processes={num_processes} needs --coordinator HOST:PORT")
        return _initialized
    if coordinator == "auto":
        jax.distributed.initialize()
    else:
        if num_processes is None or process_id is None:
            raise ValueError("--coordinator needs --num-processes and --process-id "
                             "(or JAX_NUM_PROCESSES and JAX_PROCESS_ID)")
        if not 0 <= process_id < num_processes:
            raise ValueError(f"--process-id={process_id} must be in [0, {num_processes})")
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id)
    _initialized = True
    return True


def parse_mesh(text: str) -> tuple[tuple[str, int], ...]:
    """'dp=2,tp=4' -> (("dp", 2), ("tp", 4)); 'fsdp' -> (("fsdp", -1),); a preset name
    -> its axes. Sizes are resolved against a device count by `fast.sharding.make_mesh`."""
    text = text.strip()
    if text in PRESETS:
        return PRESETS[text]
    axes = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        m = re.fullmatch(r"([a-z]+)(?:=(\d+))?", item)
        if not m:
            raise ValueError(f"--mesh: cannot read {item!r} in {text!r}: expected name=size, e.g. dp=2,tp=4")
        axes.append((m.group(1), int(m.group(2)) if m.group(2) else -1))
    if not axes:
        raise ValueError(f"--mesh: no axes in {text!r}")
    rules_for_axes([a for a, _ in axes])   # unknown names fail here, with the list of known ones
    return tuple(axes)


def parse_ids(text: str, what: str) -> tuple[int, ...]:
    """'0-3' -> (0, 1, 2, 3); '0+2+4-5' -> (0, 2, 4, 5)."""
    out: list[int] = []
    for item in text.split("+"):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", item)
        if not m:
            raise ValueError(f"--placement: cannot read {what} {text!r}: expected ranges like 0-3 or 0+2+5")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise ValueError(f"--placement: empty range {item!r} in {what} {text!r}")
        out.extend(range(lo, hi + 1))
    return tuple(out)


def _parse_submesh(text: str, name: str, *, experts_allowed: bool) -> SubMesh:
    m = re.fullmatch(r"\s*([\d+\-\s]+?)\s*(?:\[([^\]]*)\])?\s*(?::\s*([\d+\-\s]+))?\s*", text)
    if not m:
        raise ValueError(f"--placement: cannot read sub-mesh {text!r} of {name}: expected "
                         f"DEVICES[AXES][:EXPERTS], e.g. 4-5[tp=2]:0-1")
    if m.group(3) and not experts_allowed:
        raise ValueError(f"--placement: {name} cannot list experts ({text!r})")
    axes = parse_mesh(m.group(2)) if m.group(2) else ()
    experts = parse_ids(m.group(3), f"experts of {name}") if m.group(3) else None
    return SubMesh(parse_ids(m.group(1), f"devices of {name}"), axes, experts)


def parse_placement(text: str) -> Placement:
    """The --placement string -> `Placement` (checked against devices and experts when
    the step is built, by `Placement.resolve`)."""
    parts: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        key, eq, value = part.partition("=")
        key = key.strip()
        if not eq or key not in ("backbone", "experts"):
            raise ValueError(f"--placement: cannot read {part!r}: expected backbone=... or experts=...")
        if key in parts:
            raise ValueError(f"--placement: {key!r} given twice")
        parts[key] = value
    missing = [k for k in ("backbone", "experts") if k not in parts]
    if missing:
        raise ValueError(f"--placement {text!r} lacks {missing[0]}=...")
    backbone = _parse_submesh(parts["backbone"], "backbone", experts_allowed=False)
    chunks = re.split(r",(?![^\[]*\])", parts["experts"])      # commas outside [...]
    experts = tuple(_parse_submesh(c, f"experts[{m}]", experts_allowed=True) for m, c in enumerate(chunks))
    return Placement(backbone, experts)


def mesh_from_args(args: argparse.Namespace) -> Parallelism:
    """Start jax.distributed if the flags (or environment) ask for it, then build what
    --mesh / --placement describe. Bad flags raise ValueError before any compile."""
    initialize(getattr(args, "coordinator", None), getattr(args, "num_processes", None),
               getattr(args, "process_id", None))
    if getattr(args, "placement", None):
        placement = parse_placement(args.placement)
        n = jax.device_count()
        for sub in (placement.backbone, *placement.experts):   # device ids checked now; experts later
            bad = [d for d in sub.devices if d >= n]
            if bad:
                raise ValueError(f"--placement: device {bad[0]} does not exist ({n} devices: 0-{n - 1})")
        return Parallelism("mpmd", placement=placement)
    mesh = make_mesh(parse_mesh(args.mesh or "dp"), where="--mesh")
    return Parallelism("spmd", mesh=mesh, rules=rules_for_axes(mesh.axis_names))
