"""Training-state checkpoints with orbax-checkpoint: atomic, sharded, restorable onto
another layout.

A checkpoint is the directory `<run>/checkpoints/step-XXXXXXXX/` (the state after that
many steps), written by orbax:

  * `state/`: every trainable parameter (float32 master weights) and the optimizer
    state. Each array is written by the processes that hold its shards (tensorstore),
    so nothing is gathered on one process: a multi-host run checkpoints as it trains.
  * `meta/`: JSON with the step, the data position (the mixture sampler is a pure
    function of the step, so the step *is* the position), the seed and PRNG key the run
    started from, the tokens seen and the phase.

Orbax writes into a temporary directory and renames it once every process is done, so
a run killed at any instant leaves the previous checkpoint or the new one, never half
of one; older checkpoints (and a killed save's temporary directory) are removed only
after the new one is in place. Restoring reads every array straight into the shardings
of the resuming run's own freshly initialised state, so a run checkpointed on
`--mesh dp=4,fsdp=2` resumes on `--mesh fsdp=8` or on one device, bit-identical to a
run that never stopped, as long as the state has the same tree (checked by orbax:
names and shapes, with a one-line error otherwise).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import jax

from mode_jax.errors import UserError

_NAME = re.compile(r"^step-(\d{8})$")


def _checkpointer():
    import orbax.checkpoint as ocp
    return ocp, ocp.Checkpointer(ocp.CompositeCheckpointHandler())


def save(directory: str | Path, *, step: int, trainable, opt_state, meta: dict[str, Any], keep: int = 1) -> Path:
    """Write the state after `step` completed steps; keep the newest `keep` checkpoints.
    Every process calls it (orbax synchronises them); only process 0 deletes."""
    directory = Path(directory).absolute()
    path = directory / f"step-{step:08d}"
    if not path.is_dir():       # already there: a run resumed from it and stopped again at once
        directory.mkdir(parents=True, exist_ok=True)
        ocp, ckpt = _checkpointer()
        with ckpt:
            ckpt.save(path, args=ocp.args.Composite(
                state=ocp.args.StandardSave({"trainable": trainable, "opt": opt_state}),
                meta=ocp.args.JsonSave({**meta, "step": int(step)})))
    if jax.process_index() == 0:
        kept = set(list_checkpoints(directory)[-keep:])
        for old in directory.iterdir():
            if old not in kept:
                _remove(old)
    return path


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def delete_all(directory: str | Path) -> None:
    """Remove the checkpoints directory (a phase whose artifact is written needs none)."""
    if jax.process_index() == 0:
        shutil.rmtree(directory, ignore_errors=True)


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Finished checkpoints, oldest first (a killed save's temporary directory is not one)."""
    directory = Path(directory).absolute()
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if _NAME.match(p.name) and p.is_dir())


def step_of(path: str | Path) -> int:
    """The step a checkpoint was written after, from its name."""
    return int(_NAME.match(Path(path).name).group(1))


def latest(directory: str | Path) -> Path | None:
    found = list_checkpoints(directory)
    return found[-1] if found else None


def read_meta(path: str | Path) -> dict[str, Any]:
    """The checkpoint's metadata alone (step, tokens_seen, data_position, seed, ...)."""
    ocp, ckpt = _checkpointer()
    with ckpt:
        return dict(ckpt.restore(Path(path).absolute(), args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])


def restore(path: str | Path, *, trainable_template, opt_template) -> tuple[Any, Any, dict[str, Any]]:
    """(trainable, opt_state, meta) from `path`, each array read into the shape, dtype and
    sharding of the template's leaf (the resuming run's own initial state)."""
    path = Path(path).absolute()
    like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        {"trainable": trainable_template, "opt": opt_template})
    ocp, ckpt = _checkpointer()
    try:
        with ckpt:
            out = ckpt.restore(path, args=ocp.args.Composite(state=ocp.args.StandardRestore(like),
                                                              meta=ocp.args.JsonRestore()))
    except (ValueError, KeyError, FileNotFoundError) as err:
        why = " ".join(str(err).split())[:400]
        raise UserError(f"checkpoint {path} does not fit this run's training state ({why}): it is from another "
                        f"method, config or state layout; delete it to start the phase again") from None
    state = out["state"]
    return state["trainable"], state["opt"], dict(out["meta"])
