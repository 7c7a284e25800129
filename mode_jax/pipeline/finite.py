"""The training loop's stop at the first non-finite value (loss, gradient norm, state).

The loop must not make the host wait for the device after every step (steps queue up
on the device between log points), so each step's loss and gradient norm are kept as
device scalars in a `Watch` and read together at the next log point or checkpoint: the
first bad step is still named exactly. Before a checkpoint is written the state itself
is checked too (an update can overflow the weights while the loss it came from was
finite), so no checkpoint, artifact or result ever holds a NaN or an infinity.
"""

from __future__ import annotations

import math
from pathlib import Path

import jax
import jax.numpy as jnp

from mode_jax.errors import UserError


class NonFiniteTraining(UserError):
    """Training produced NaN or inf: the run stops with a one-line message (exit 2)."""


class Watch:
    """Loss and gradient norm of the steps since the last `check`, still on the device."""

    def __init__(self):
        self._pending: list[tuple[int, jax.Array, jax.Array]] = []

    def add(self, step: int, metrics: dict) -> None:
        """Record step `step` (1-based: the step count once it is done); reads nothing."""
        self._pending.append((step, metrics["loss"], metrics["grad_norm"]))

    def check(self, stop) -> None:
        """Read the recorded values (one wait for the device); call `stop(step, what)` for
        the first non-finite one, which is expected to raise."""
        pending, self._pending = self._pending, []
        values = jax.device_get([(loss, norm) for _, loss, norm in pending])
        for (step, _, _), (loss, norm) in zip(pending, values):
            for name, value in (("loss", loss), ("gradient norm", norm)):
                if not math.isfinite(float(value)):
                    stop(step, f"{name} {float(value)}")


@jax.jit
def _leaf_finite(x):
    return jnp.all(jnp.isfinite(x))


def state_finite(*trees) -> bool:
    """Whether every floating-point leaf of `trees` is finite. One reduction per leaf, on
    the leaf's own devices (leaves may live on different meshes), so nothing is gathered;
    the results are scalars replicated to every process."""
    flags = [_leaf_finite(x) for tree in trees for x in jax.tree.leaves(tree)
             if jnp.issubdtype(x.dtype, jnp.floating)]
    return all(bool(f) for f in jax.device_get(flags))


def stop_message(phase: str, step: int, what: str, *, last_good: Path | None, last_step: int | None,
                 lr_key: str) -> str:
    """The one line the user sees: where, what, what was kept and how to go on."""
    if last_good is None:
        kept = "no checkpoint was written before it, so --resume starts the phase again from step 0"
    else:
        kept = f"the last good checkpoint is {last_good} (step {last_step}); --resume goes on from it"
    return (f"{phase}: training stopped at step {step}: non-finite {what}; nothing was written for this phase "
            f"(no artifact, no result); {kept}. Change the config first (e.g. a lower learning rate: "
            f"--set {lr_key}=...)")


def lr_key(method: str) -> str:
    """The config key of `method`'s learning rate (for the message above)."""
    return {"full": "lr.full", "lora": "lr.lora", "block_expansion": "lr.expansion",
            "lora_moe": "lr.lora", "lora_moe_frozen": "lr.lora"}.get(method, "lr.mode")

