"""What makes a file mode-jax reads or writes trustworthy: tensor checksums, finite
checks and strict JSON.

* `content_sha256` is the checksum every artifact (expert file, composed model, LoRA,
  full fine-tune) stores in its metadata; a load recomputes it, so a flipped byte in
  the tensor data is a one-line "corrupted" error instead of a silently worse model.
* `check_finite` is the one NaN/inf check for every tensor loaded from a file (artifacts
  and the backbone loaders alike).
* `strict_json` writes JSON that any parser accepts: Python's `json.dumps` writes
  `NaN`/`Infinity`, which are not JSON; here a non-finite float becomes `null`.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any, Mapping

import numpy as np


def content_sha256(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> str:
    """sha256 hex over every tensor, in name order (its name, dtype, shape and raw bytes),
    then over every metadata field, in key order.

    Names, shapes and the metadata are hashed too, so a flipped byte anywhere in the file
    that still parses (a value, a shape, the domain, the backbone fingerprint) changes the
    sum. The caller leaves the field that stores the sum out of `metadata`."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        digest.update(f"tensor\0{name}\0{arr.dtype.str}\0{list(arr.shape)}\0".encode())
        digest.update(arr.reshape(-1).view(np.uint8))   # its memory, in order, without a copy
    for key in sorted(metadata or {}):
        digest.update(f"meta\0{key}\0{metadata[key]}\0".encode())
    return digest.hexdigest()


class NonFiniteError(ValueError):
    """A tensor that holds NaN or infinite values."""


def check_finite(array, what: str, *, error: type[Exception] = NonFiniteError, why: str = "") -> None:
    """Raise `error` if `array` holds a NaN or an infinity: one line naming `what`, with the
    count and the first flat index so the reader can find it, then `why` if given."""
    arr = np.asarray(array)
    if arr.dtype.kind in "biu":              # integers and bools are always finite
        return
    if not np.issubdtype(arr.dtype, np.floating):
        arr = np.asarray(arr, np.float32)    # bfloat16 and other ml_dtypes are not np.floating
    bad = ~np.isfinite(arr)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise error(f"{what} holds NaN or infinite values ({int(bad.sum())} of {arr.size}, the first at "
                    f"flat index {first}){': ' + why if why else ''}")


def finite_or_none(obj: Any) -> Any:
    """`obj` (nested dicts/lists/tuples of JSON-able values) with every non-finite float
    replaced by None, numpy scalars turned into Python numbers."""
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def strict_json(obj: Any, **kwargs) -> str:
    """json.dumps that never writes NaN/Infinity (they become null) and refuses anything
    else that is not JSON (`allow_nan=False` is the guarantee)."""
    return json.dumps(finite_or_none(obj), allow_nan=False, **kwargs)
