"""mode-jax: Modular Domain Experts (MoDE) in JAX.

`mode_jax.ref` is the readable reference, `mode_jax.kernels` the Pallas kernels,
`mode_jax.fast` the accelerated path; the rest of this package is application
code (CLI, model and data loading, checkpoints).
"""

__version__ = "0.1.0"


def load(*args, **kwargs):
    """A backbone (plus experts or a composed run) ready to generate: see `mode_jax.api.load`.
    Imported on call, so `import mode_jax` stays free of jax."""
    from mode_jax.api import load as _load
    return _load(*args, **kwargs)
