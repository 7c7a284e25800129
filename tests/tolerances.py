"""Every tolerance of the suite, in one place, each with the reason for its size.

Most comparisons use the table by dtype (`TOL`, through `assert_close` for arrays and
`assert_trees_close` for pytrees): the same computation done in another order or by
another implementation. The named entries below it are for comparisons of another kind
(quantized storage, a whole model against transformers, Monte Carlo estimates, ...).
NaN never passes any of the helpers here.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np

# Same function, another summation order or implementation, at this dtype: a few ulps
# of the dtype's epsilon (float32 1.2e-7, bfloat16 7.8e-3) times the depth of the sums in
# the tiny test models. `scale=` widens it where a test says why (deeper chains of ops).
TOL = {
    jnp.dtype(jnp.float64): dict(rtol=1e-10, atol=1e-12),
    jnp.dtype(jnp.float32): dict(rtol=1e-5, atol=1e-5),
    jnp.dtype(jnp.bfloat16): dict(rtol=2e-2, atol=2e-2),
}

# A float32 scalar computed from exact inputs (a learning rate from its schedule): a few ulps
# (1.2e-7) relative, and no absolute floor, which would swallow values as small as 1e-4.
FLOAT32_RELATIVE = dict(rtol=1e-6, atol=0.0)

# TOL's float64 row as pytest.approx keywords, for Python floats and lists of them: means,
# ratios and differences of counts computed two ways in float64 (exact up to rounding).
APPROX_FLOAT64 = dict(rel=TOL[jnp.dtype(jnp.float64)]["rtol"], abs=TOL[jnp.dtype(jnp.float64)]["atol"])

# Relative to the largest magnitude of the reference (atol = rtol * max(1, max|expected|)):
# for gradients that are differences of long dot products (the merge kernels' logit
# gradient), where entries near zero carry the absolute error of the big ones.
RELATIVE_TO_MAX = {jnp.dtype(jnp.float32): 1e-5, jnp.dtype(jnp.bfloat16): 1e-2}

# The fused LM-head + cross-entropy kernels (kernels/fused_ce.py) against float64 NumPy on
# the same (dtype-rounded) h and W, relative to the largest magnitude as RELATIVE_TO_MAX: the
# kernels round the logits and the matmul operands of the gradients (exp(l - max), dl) to the
# compute dtype (as the chunked path rounds its logits and dl), float64 does not. bfloat16
# rounds each to 2^-9 relative; measured at most 3.3e-3 (loss), 9.2e-3 (dh), 8.1e-3 (dW) of the
# largest entry over 30 draws of N 64-200, V 300-1000, D 32-64. float32: summation order only
# (measured 1.0e-6).
FUSED_CE_VS_FLOAT64 = {jnp.dtype(jnp.float32): 1e-5, jnp.dtype(jnp.bfloat16): 2e-2}
# An argmax computed from compute-dtype logits may pick another index than float64 only where
# the two largest float64 logits are closer than 2 ulps of the largest, relative (bfloat16
# 2 x 2^-7; float32 2 x 2^-23, rounded up to 1e-6).
ARGMAX_TIE_MARGIN = {jnp.dtype(jnp.float32): 1e-6, jnp.dtype(jnp.bfloat16): 2 ** -6}

# A MoDE block's forward + backward (y, dx, the gate's gradient), fast/ against ref/ in float32,
# relative to the largest magnitude as RELATIVE_TO_MAX: the fused merge's gate gradient is
# <dy, r_e> + <ds_e, u_e> (fast/merge.py), not <dy, h_e>, a longer chain of float32 sums over D
# and F. Measured 2.4e-5 of the largest entry on bench/test_bench_model.py's block (stacked
# merge 1.3e-6); 1e-4 leaves room for other CPUs' summation orders.
BLOCK_FWD_BWD_RELATIVE_TO_MAX = 1e-4

# Sums of probabilities that must be 1 (softmax rows, mean routing weights): float32
# rounding of a sum of a few terms.
PROBABILITY_SUM = dict(rtol=0.0, atol=1e-5)

# Float32 weights stored at a lower precision and read back (GGUF F16/BF16 tensors, Hugging
# Face float16/bfloat16 safetensors): half an ulp of the storage format relative to the value
# (float16 2^-11 = 4.9e-4, bfloat16 2^-8 = 3.9e-3, with a margin); atol for the values float16
# keeps only as subnormals.
_F16, _BF16 = dict(rtol=1e-3, atol=1e-7), dict(rtol=8e-3, atol=1e-7)
STORAGE_ROUND_TRIP = {"F16": _F16, "float16": _F16, "BF16": _BF16, "bfloat16": _BF16}

# SmolLM2's weights dequantized by our GGUF reader against transformers' own GGUF reader:
# independent dequantizers and q/k un-permutations of the same blocks, so float32 rounding
# of scale * quant + min only.
DEQUANTIZED_VS_TRANSFORMERS = dict(rtol=1e-6, atol=1e-7)

# The reference's logits on SmolLM2-135M against transformers' float32 forward: max |ours -
# theirs| / max |theirs| after 30 layers of float32 in two orders of summation (measured
# 3.6e-6 when it was added); 1e-4 leaves room for other CPUs' and libraries' summation orders.
TRANSFORMERS_LOGITS_RTOL = 1e-4
# The same measure for the tiny float32 models save_hf_dir writes (LlamaConfig.tiny, no quantization):
# the float32 row's rtol.
TINY_VS_TRANSFORMERS_RTOL = TOL[jnp.dtype(jnp.float32)]["rtol"]

# Numbers printed with 3 decimals and parsed back: half a unit of the last digit (5e-4) plus
# the float32 rounding of the value printed.
PRINTED_3_DECIMALS = dict(rtol=0.0, atol=6e-4)

# Monte Carlo estimates (bootstrap standard errors from ~4k-20k replicates) against their exact
# or analytic values: the estimate of a standard deviation from B replicates has relative error
# ~1/sqrt(2B), 0.5-1.1% here; 5% leaves room for that and for O(1/C) finite-sample terms.
# Use as np.testing.assert_allclose(estimate, exact, **MONTE_CARLO) (fails on NaN).
MONTE_CARLO = dict(rtol=0.05, atol=0.0)

# Frequencies of n = 4000 draws from a categorical distribution against its probabilities
# (the sampling tests): a frequency's standard deviation is at most sqrt(0.25 / n) = 0.0079,
# and 0.04 is five of them.
SAMPLED_FREQUENCY = dict(rtol=0.0, atol=0.04)


def _dtype(x, dtype):
    return jnp.dtype(dtype if dtype is not None else jnp.asarray(x).dtype)


def assert_close(actual, expected, dtype=None, scale=1.0, err_msg=""):
    """allclose with the table's tolerance for `dtype` (default: actual's), times `scale`.

    NaN never passes: it is rejected in both arguments, so a broken reference
    cannot pass silently either.
    """
    dtype = _dtype(actual, dtype)
    actual = np.asarray(jnp.asarray(actual, jnp.float32) if dtype == jnp.bfloat16 else actual)
    expected = np.asarray(expected, np.float64)
    assert not np.isnan(expected).any(), f"reference holds NaN {err_msg}"
    assert not np.isnan(actual).any(), f"result holds NaN {err_msg}"
    tol = TOL[dtype]
    np.testing.assert_allclose(actual, expected, rtol=tol["rtol"] * scale, atol=tol["atol"] * scale,
                               err_msg=err_msg)


def _finite64(tree):
    """Every leaf as a float64 numpy array (bfloat16 has no numpy arithmetic), NaN refused."""
    tree = jax.tree.map(lambda x: np.asarray(jnp.asarray(x, jnp.float32) if jnp.asarray(x).dtype == jnp.bfloat16
                                             else x, np.float64), tree)
    chex.assert_tree_all_finite(tree)
    return tree


def assert_trees_close(actual, expected, dtype=None, scale=1.0, tol=None):
    """`chex.assert_trees_all_close`: the same tree structure, every leaf close at the table's
    tolerance for `dtype` (default: the first leaf of `actual`) times `scale`, or at `tol`
    (one of the named entries above). NaN is rejected in both trees: numpy's allclose,
    which chex uses, would let NaN == NaN pass."""
    tol = tol if tol is not None else {k: v * scale for k, v in TOL[_dtype(jax.tree.leaves(actual)[0], dtype)].items()}
    chex.assert_trees_all_close(_finite64(actual), _finite64(expected), **tol)


def assert_trees_equal(actual, expected):
    """`chex.assert_trees_all_equal` with the same dtypes leaf for leaf, NaN rejected: for
    round trips that must be bit-exact."""
    chex.assert_trees_all_equal_dtypes(actual, expected)
    _finite64(actual)
    chex.assert_trees_all_equal(actual, expected)


def assert_close_to_max(actual, expected, dtype=None, err_msg="", table=None):
    """allclose with rtol from `table` (default `RELATIVE_TO_MAX`) for the dtype and
    atol = rtol * max(1, max|expected|)."""
    rtol = (table or RELATIVE_TO_MAX)[_dtype(actual, dtype)]
    actual = np.asarray(jnp.asarray(actual, jnp.float32), np.float64)
    expected = np.asarray(jnp.asarray(expected, jnp.float32), np.float64)
    assert not np.isnan(expected).any(), f"reference holds NaN {err_msg}"
    assert not np.isnan(actual).any(), f"result holds NaN {err_msg}"
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * max(1.0, float(np.abs(expected).max())),
                               err_msg=err_msg)

# Top-k gating compares two forwards whose selection must agree: draws where some token's k-th and
# (k+1)-th gate logits are closer than this are left out, since the other forward's rounding (a few
# float32 ulps of logits of size ~10; bf16 activations, 2^-8 relative, in the bf16 row) could swap them.
TOP_K_MARGIN = {jnp.dtype(jnp.float32): 1e-3, jnp.dtype(jnp.bfloat16): 0.2}
