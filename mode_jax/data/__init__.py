"""Tokenized domain corpora (Math, Code, English) for training and evaluating MoDE experts.

    mode-jax data build                       # once: sources -> $XDG_CACHE_HOME/mode-jax/data
    tokens = load_split(data_dir, "math", "train")        # uint16 [n], hash-checked
    sampler = MixtureSampler({"math": ..., "code": ...}, batch_size=8, seq_len=512, seed=0)
    batch = sampler.batch(step)                           # int32 [B, seq_len + 1]

sources.py (where documents come from) and mathgen.py (the math generator) ->
split.py (hash split) -> pack.py (tokens + EOS, uint16) -> store.py (files,
manifest, verified loading); build.py runs the pipeline, mixture.py samples
training batches. docs/DATA.md describes the sources, licences and sizes.
"""

from mode_jax.data.mixture import MixtureSampler
from mode_jax.data.pack import rows
from mode_jax.data.store import DataError, default_data_dir, load_split, read_manifest

__all__ = ["DataError", "MixtureSampler", "default_data_dir", "load_split", "read_manifest", "rows"]
