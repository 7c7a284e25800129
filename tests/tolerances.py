"""One tolerance table, by dtype, for every numeric comparison in the suite."""

import jax.numpy as jnp
import numpy as np

TOL = {
    jnp.dtype(jnp.float64): dict(rtol=1e-10, atol=1e-12),
    jnp.dtype(jnp.float32): dict(rtol=1e-5, atol=1e-5),
    jnp.dtype(jnp.bfloat16): dict(rtol=2e-2, atol=2e-2),
}


def assert_close(actual, expected, dtype=None, scale=1.0, err_msg=""):
    """allclose with the table's tolerance for `dtype` (default: actual's), times `scale`.

    NaN never passes: it is rejected in both arguments, so a broken reference
    cannot pass silently either.
    """
    dtype = jnp.dtype(dtype if dtype is not None else jnp.asarray(actual).dtype)
    actual = np.asarray(jnp.asarray(actual, jnp.float32) if dtype == jnp.bfloat16 else actual)
    expected = np.asarray(expected, np.float64)
    assert not np.isnan(expected).any(), f"reference holds NaN {err_msg}"
    assert not np.isnan(actual).any(), f"result holds NaN {err_msg}"
    tol = TOL[dtype]
    np.testing.assert_allclose(actual, expected, rtol=tol["rtol"] * scale, atol=tol["atol"] * scale,
                               err_msg=err_msg)


# Monte Carlo estimates (bootstrap standard errors from ~4k-20k replicates) against their exact
# or analytic values: the estimate of a standard deviation from B replicates has relative error
# ~1/sqrt(2B), 0.5-1.1% here; 5% leaves room for that and for O(1/C) finite-sample terms.
# Use as np.testing.assert_allclose(estimate, exact, **MONTE_CARLO) (fails on NaN).
MONTE_CARLO = dict(rtol=0.05, atol=0.0)
