"""mode-jax: Modular Domain Experts (MoDE) in JAX.

`mode_jax.ref` is the readable reference, `mode_jax.kernels` the Pallas kernels,
`mode_jax.fast` the accelerated path; the rest of this package is application
code (CLI, model and data loading, checkpoints).
"""

__version__ = "0.1.0"
