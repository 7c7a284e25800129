"""MoDE with top-k gating (ModeConfig.gate_top_k): each token keeps the k largest of its N + 1
gate logits and the softmax runs over those alone. ref/ against float64 NumPy and hand cases;
fast/ (both merges) against ref/, forward and gradients, with draws whose k-th and (k+1)-th
logits are close (a tie, or a near tie that rounding could flip) left out."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, settings, strategies as st
from jax.test_util import check_grads

from mode_jax.fast import model, params as P
from mode_jax.fast.merge import fused_merge, fused_merge_reference
from mode_jax.fast.steps import make_steps
from mode_jax.ref.config import LlamaConfig, ModeConfig, OptimConfig
from mode_jax.ref.llama import embed, layers_forward
from mode_jax.ref.methods import apply
from mode_jax.ref.mode import gate_logits, gated_combine, top_k_logits
from tests.test_fast_model import DTYPES, _absmax, _at, jit, merge_and_cotangents, merge_inputs, tolerance_dtype
from tests.test_fast_params import random_params, to_fast_jit
from tests.tolerances import PROBABILITY_SUM, TOP_K_MARGIN, assert_close

CFG = LlamaConfig.tiny()                  # 4 layers, D 32


def numpy_top_k_softmax(logits: np.ndarray, k: int) -> np.ndarray:
    """float64: the softmax over each row's k largest logits, 0 elsewhere (no ties drawn)."""
    order = np.argsort(-logits, axis=-1)
    keep = np.zeros(logits.shape, bool)
    np.put_along_axis(keep, order[..., :k], True, axis=-1)
    z = np.where(keep, logits - logits.max(-1, keepdims=True), -np.inf)
    p = np.exp(z)
    return p / p.sum(-1, keepdims=True)


def test_top_k_by_hand():
    # logits [1, 3, 2]: k = 2 keeps 3 and 2, softmax([3, 2]) = [e / (1 + e), 1 / (1 + e)] = [0.7311, 0.2689].
    logits = jnp.array([1.0, 3.0, 2.0])
    assert_close(jax.nn.softmax(top_k_logits(logits, 2)), [0.0, np.e / (1 + np.e), 1 / (1 + np.e)])
    assert_close(jax.nn.softmax(top_k_logits(logits, 1)), [0.0, 1.0, 0.0])
    # k >= E and None are the dense gate, unchanged.
    for k in (3, 4, None):
        np.testing.assert_array_equal(top_k_logits(logits, k), logits)
    # Through the merge: k = 1 picks the second output alone.
    assert_close(gated_combine(top_k_logits(logits, 1), jnp.array([[1.0, 2.0], [5.0, 6.0], [7.0, 9.0]])), [5.0, 6.0])


@settings(max_examples=10)
@given(lead=st.sampled_from([(3,), (2, 5)]), e=st.sampled_from([2, 3, 5, 8]), k=st.integers(1, 8),
       seed=st.integers(0, 2**16))
def test_top_k_softmax_matches_numpy_float64(lead, e, k, seed):
    with jax.enable_x64(True):
        logits = np.random.default_rng(seed).standard_normal((*lead, e))          # continuous: no ties
        got = jax.nn.softmax(top_k_logits(jnp.asarray(logits), k), axis=-1)
        assert got.dtype == jnp.float64
        want = numpy_top_k_softmax(logits, min(k, e))
        assert_close(got, want)
        assert int(np.sum(np.asarray(got) > 0)) == np.prod(lead) * min(k, e)


@pytest.mark.parametrize("k", [1, 2])
def test_top_k_merge_gradients_float64(k):
    """The gradient is the renormalised softmax's over the kept logits, 0 for the dropped ones:
    finite differences (check_grads) and the closed form d l_i = p_i (<dy, h_i> - sum_j p_j <dy, h_j>)."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(k)
        logits = jnp.asarray(rng.standard_normal((5, 4)))
        outputs = jnp.asarray(rng.standard_normal((4, 5, 3)))
        dy = rng.standard_normal((5, 3))
        f = lambda lg, out: gated_combine(top_k_logits(lg, k), out)
        check_grads(f, (logits, outputs), order=1, modes=["rev"])
        d_logits = jax.vjp(lambda lg: f(lg, outputs), logits)[1](jnp.asarray(dy))[0]
        p = numpy_top_k_softmax(np.asarray(logits), k)                              # [5, 4]
        da = np.einsum("ETD,TD->TE", np.asarray(outputs), dy)                       # <dy, h_e>
        assert_close(d_logits, p * (da - np.sum(p * da, -1, keepdims=True)))
        # k = 1: the softmax of one logit is 1 whatever it is, so no logit has a gradient.
        assert np.count_nonzero(np.asarray(d_logits)) == (5 * k if k > 1 else 0)


@pytest.mark.parametrize("k", [1, 2])
def test_fused_merge_with_top_k_matches_reference(k):
    """The fused merge on -inf-masked logits: same output and cotangents as h_e materialised
    (every cotangent finite, the dropped logits' exactly 0)."""
    args = merge_inputs(7, 2, 3, 4, 8, 2, jnp.float32)
    masked = lambda lg, *rest, fn: fn(top_k_logits(lg, k), *rest)
    dy = jnp.asarray(np.random.default_rng(8).standard_normal((2, 3, 4)), jnp.float32)
    y, cts = merge_and_cotangents(lambda *a: masked(*a, fn=fused_merge), args, dy)
    y_ref, cts_ref = merge_and_cotangents(lambda *a: masked(*a, fn=fused_merge_reference), args, dy)
    assert_close(y, y_ref, scale=2)
    for name, g, w in zip(["logits", "r_bb", "u_bb", "w_bb", "r_ex", "u_ex", "w_ex"], cts, cts_ref):
        assert_close(g, w, scale=4 * max(1.0, _absmax(w)), err_msg=name)
    assert np.count_nonzero(np.asarray(cts[0])) == (2 * 3 * k if k > 1 else 0)


# --- the whole model: fast/ against ref/ -------------------------------------------------------

def build(seed, n_experts):
    mode = ModeConfig(n_blocks=2, expert_layers=1, n_experts=n_experts)
    params = random_params("uninit", seed, CFG, mode)
    for block in params["blocks"]:
        block["gate_w"] = 4 * block["gate_w"]       # logits spread per token: the selection varies
    return params


@jax.jit
def _ref_block_logits(params, tok, k):
    """Each block's dense gate logits [B, T, E] on the top-k model's path (ref/ in float32)."""
    x, out = embed(params["backbone"], tok), []
    per = CFG.n_layers // len(params["blocks"])
    for i, block in enumerate(params["blocks"]):
        h = [layers_forward(params["backbone"]["layers"][i * per:(i + 1) * per], x, CFG)]
        h += [layers_forward(ex, x, CFG) for ex in block["experts"]]
        logits = gate_logits(block, x)
        out.append(logits)
        x = gated_combine(top_k_logits(logits, k.shape[0]), jnp.stack(h))
    return out


def top_k_gap(params, tok, k) -> float:
    """The smallest gap between a token's k-th and (k+1)-th gate logit, over blocks and tokens."""
    gaps = []
    for logits in _ref_block_logits(params, tok, jnp.zeros((k,))):
        s = -np.sort(-np.asarray(logits), axis=-1)
        gaps.append((s[..., k - 1] - s[..., k]).min())
    return float(min(gaps))


ref_logits = jit(apply, ("cfg", "lora", "gate_top_k"))
fast_logits = jit(model.logits, ("cfg", "fast", "lora", "gate_top_k"))


@settings(max_examples=6)
@given(k=st.sampled_from([1, 2]), n_experts=st.sampled_from([3]), merge_kind=st.sampled_from(["fused", "stacked"]),
       dtype=st.sampled_from(sorted(DTYPES)), seed=st.integers(0, 2**16))
def test_mode_top_k_forward_matches_ref(k, n_experts, merge_kind, dtype, seed):
    params = build(seed, n_experts)
    tok = np.random.default_rng(seed + 3).integers(0, CFG.vocab_size, (2, 8)).astype(np.int32)
    fast = dataclasses.replace(DTYPES[dtype], merge=merge_kind)
    assume(top_k_gap(params, tok, k) > TOP_K_MARGIN[jnp.dtype(tolerance_dtype(fast))])
    want = ref_logits(params, tok, CFG, gate_top_k=k)
    got = fast_logits(to_fast_jit(params), tok, CFG, fast, gate_top_k=k)
    assert_close(got, want, dtype=tolerance_dtype(fast), scale=2)
    # top-k changes the function: the dense model's logits are elsewhere.
    assert np.max(np.abs(np.asarray(ref_logits(params, tok, CFG)) - np.asarray(want))) > 1e-3


def _vjp(params, tok, ct, *, k, merge_kind, reference):
    train, frozen = P.partition(params, "experts_and_gates")
    fast = dataclasses.replace(DTYPES["float32"], merge=merge_kind)
    if reference:
        fn = lambda t: apply(P.to_ref(P.merge(t, frozen)), tok, CFG, gate_top_k=k)
    else:
        fn = lambda t: model.logits(P.merge(t, frozen), tok, CFG, fast, gate_top_k=k)
    return jax.vjp(fn, train)[1](ct)[0]


vjp = jit(_vjp, ("k", "merge_kind", "reference"))


@settings(max_examples=4)
@given(k=st.sampled_from([1, 2]), merge_kind=st.sampled_from(["fused", "stacked"]), seed=st.integers(0, 2**16))
def test_mode_top_k_gradients_match_ref(k, merge_kind, seed):
    """float32 gradients of experts and gates through the top-k gate."""
    params = build(seed, 2)
    tok = np.random.default_rng(seed + 3).integers(0, CFG.vocab_size, (2, 8)).astype(np.int32)
    assume(top_k_gap(params, tok, k) > TOP_K_MARGIN[jnp.dtype(jnp.float32)])
    ct = np.random.default_rng(seed + 4).standard_normal((2, 8, CFG.vocab_size)).astype(np.float32)
    fast_params = to_fast_jit(params)
    want = vjp(fast_params, tok, ct, k=k, merge_kind="fused", reference=True)
    got = vjp(fast_params, tok, ct, k=k, merge_kind=merge_kind, reference=False)
    for path, g in jax.tree_util.tree_flatten_with_path(got)[0]:
        assert_close(g, _at(want, path), scale=2 * max(1.0, _absmax(_at(want, path))),
                     err_msg=jax.tree_util.keystr(path))


def test_top_k_routing_and_eval_step():
    """The gate weights fast/ reports are the top-k ones (k nonzero per token, summing to 1), and
    the step factory's eval step (gate_top_k=2) has the loss of ref/'s top-k logits."""
    params = build(5, 3)
    tok = np.random.default_rng(6).integers(0, CFG.vocab_size, (2, 9)).astype(np.int32)
    assert top_k_gap(params, tok[:, :-1], 2) > TOP_K_MARGIN[jnp.dtype(jnp.float32)]
    _, probs = model.mode_hidden(to_fast_jit(params), tok[:, :-1], CFG, DTYPES["float32"], return_probs=True,
                                 gate_top_k=2)
    for p in probs:
        assert np.all(np.count_nonzero(np.asarray(p), axis=-1) == 2)
        np.testing.assert_allclose(np.asarray(p.sum(-1)), 1.0, **PROBABILITY_SUM)
    steps = make_steps("uninit", CFG, opt=OptimConfig(), backend="fast", gate_top_k=2)
    got = steps.eval_step(steps.to_backend(params), tok)
    assert_close(got["routing"], np.stack([np.asarray(p).mean(axis=(0, 1)) for p in probs]))

    def nll(logits):
        l64 = np.asarray(logits, np.float64)
        z = l64 - l64.max(-1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
        return -np.take_along_axis(logp, tok[:, 1:, None], -1).mean()

    assert_close(got["loss"], nll(ref_logits(params, tok[:, :-1], CFG, gate_top_k=2)))
    assert abs(float(got["loss"]) - nll(ref_logits(params, tok[:, :-1], CFG))) > 1e-4     # not the dense model's


def test_gate_top_k_config_errors():
    with pytest.raises(ValueError, match="gate_top_k must be a positive integer"):
        ModeConfig(gate_top_k=0)
