"""`--mesh` (SPMD) and `--placement` (MPMD) on the pipeline's training commands: which
methods they shard, refused for the others before anything is written. The sharded
steps themselves are built by `mode_jax.fast.steps.make_steps` (given the run's
`Parallelism`); they shard MoDE models only (the methods that train experts and/or
gates: stage1, stage2, stage2_frozen, uninit); full and LoRA fine-tuning train on one
device. Every layout trains with the same optimizer, so checkpoints of the single-device
and SPMD layouts share one structure.
"""

from __future__ import annotations

from mode_jax.errors import UserError
from mode_jax.fast.steps import shardable
from mode_jax.ref.methods import METHODS


def check_method(method: str) -> None:
    """Refuse --mesh / --placement for a method they do not shard."""
    if not shardable(method):
        raise UserError(f"--mesh / --placement shard MoDE training (experts and gates); method {method!r} "
                        f"trains {METHODS[method]!r} on one device: drop the flag")
