"""Training-state checkpoints: written atomically, read back exactly.

A checkpoint is one `.npz` file `<run>/checkpoints/step-XXXXXXXX.npz` holding

  * every trainable parameter (float32 master weights) and the optimizer state
    (AdamW moments and step count), named by their pytree path;
  * `__meta__`: JSON with the step, the data position (the mixture sampler is a
    pure function of the step, so the step *is* the position), the PRNG key the
    run was started from, and the number of tokens seen.

It is written to a temporary name, fsynced and renamed (mode_jax.atomic), so a
run killed at any instant leaves either the previous checkpoint or the new one,
never half of one; older checkpoints are removed only after the new one is in
place. Restoring fills the arrays into a freshly initialised state of the same
structure (checked leaf by leaf), so the resumed run is bit-identical to one
that never stopped.
"""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mode_jax.atomic import atomic_path
from mode_jax.errors import UserError

_NAME = re.compile(r"^step-(\d{8})\.npz$")


def _flat(tree) -> list[tuple[str, Any]]:
    return [(jax.tree_util.keystr(p), leaf) for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def save(directory: str | Path, *, step: int, trainable, opt_state, meta: dict[str, Any], keep: int = 1) -> Path:
    """Write the state after `step` completed steps; keep the newest `keep` files."""
    directory = Path(directory)
    arrays = {f"trainable{k}": np.asarray(v) for k, v in _flat(trainable)}
    arrays.update({f"opt{k}": np.asarray(v) for k, v in _flat(opt_state)})
    meta = {**meta, "step": int(step)}
    arrays["__meta__"] = np.frombuffer(json.dumps(meta, sort_keys=True).encode(), dtype=np.uint8)
    path = directory / f"step-{step:08d}.npz"
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:   # a file object: np.savez(path) would append .npz to the temp name
            np.savez(f, **arrays)
    for old in list_checkpoints(directory)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def list_checkpoints(directory: str | Path) -> list[Path]:
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if _NAME.match(p.name))


def step_of(path: str | Path) -> int:
    """The step a checkpoint was written after, from its name."""
    return int(_NAME.match(Path(path).name).group(1))


def latest(directory: str | Path) -> Path | None:
    found = list_checkpoints(directory)
    return found[-1] if found else None


def restore(path: str | Path, *, trainable_template, opt_template) -> tuple[Any, Any, dict[str, Any]]:
    """(trainable, opt_state, meta) from `path`, shaped like the templates (jax arrays)."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            stored = {k: data[k] for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise UserError(f"checkpoint {path} cannot be read ({err}); delete it to resume from an earlier one") from None
    meta = json.loads(bytes(stored.pop("__meta__")).decode())

    def fill(prefix: str, template):
        leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(template)
        out = []
        for p, leaf in leaves_with_path:
            key = prefix + jax.tree_util.keystr(p)
            if key not in stored:
                raise UserError(f"checkpoint {path} lacks {key}: it is from another method or config")
            arr = stored.pop(key)
            if arr.shape != tuple(leaf.shape) or arr.dtype != np.dtype(leaf.dtype):
                raise UserError(f"checkpoint {path}: {key} is {arr.dtype}{list(arr.shape)}, the run expects "
                                f"{np.dtype(leaf.dtype)}{list(leaf.shape)}")
            out.append(jnp.asarray(arr))
        return jax.tree_util.tree_unflatten(treedef, out)

    trainable = fill("trainable", trainable_template)
    opt_state = fill("opt", opt_template)
    if stored:
        raise UserError(f"checkpoint {path} has entries this run does not know ({next(iter(stored))}): "
                        f"it is from another method or config")
    return trainable, opt_state, meta
