"""fast/steps.py and fast/optim.py: one optimizer and one step factory for every backend.

- `optim.apply` with a norm given from outside (MPMD's sum over meshes) and a traced peak
  learning rate equals `ref.optim.adamw_update` with that norm and that learning rate;
- the "ref" and "fast" backends run two steps equal to `ref.train.train_step` (the
  from-scratch reference) and keep their optimizer state in one structure;
- steps built for another learning rate reuse the compiled step (the peak is traced);
- one eval step: the "ref" and "fast" backends agree with ref/train.py's metrics,
  per-token statistics and routing;
- the SPMD steps take a single-device optimizer state as it is (a checkpoint moves
  between layouts) and their next step equals the single-device one; MPMD's per-mesh
  state converts to and from that structure exactly, with the same next step.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mode_jax import distributed
from mode_jax.fast import optim
from mode_jax.fast import steps as S
from mode_jax.fast.params import partition as fast_partition
from mode_jax.fast.params import to_fast, to_ref
from mode_jax.fast.sharding import make_mesh, rules_for_axes
from mode_jax.ref import train as RT
from mode_jax.ref.methods import METHODS, partition
from mode_jax.ref.optim import adamw_init, adamw_update
from tests.test_sharding_spmd import BATCH, CFG, MOMENT_SCALE, OPT, SEQ, make_batches, make_params
from tests.tolerances import FLOAT32_RELATIVE, assert_close

METHOD = "stage2"


def _steps(backend="fast", opt=OPT, **kw):
    return S.make_steps(METHOD, CFG, opt=opt, backend=backend, **kw)


def test_optimizer_with_outside_norm_and_traced_peak_equals_ref():
    # The stacked layout (what optim serves); the per-layer-rank decay mask itself is
    # checked against ref/'s unstacked arrays in test_fast_train.py.
    params = fast_partition(to_fast(make_params()), METHODS[METHOD])[0]
    decay = optim.decay_mask(params)
    rng = np.random.default_rng(4)
    grads = jax.tree.map(lambda x: (0.3 * rng.standard_normal(x.shape)).astype(np.float32), params)
    opt = dataclasses.replace(OPT, clip_norm=0.5)
    state, ref_state = optim.init(params, opt), adamw_init(params)
    apply = jax.jit(lambda g, s, p, lr, n: optim.apply(g, s, p, opt, peak_lr=lr, grad_norm=n))
    for step, (lr, norm) in enumerate([(3e-3, 2.0), (5e-4, 0.25)]):      # one clipped, one not
        got, state, stats = apply(grads, state, params, lr, norm)
        want, ref_state, ref_stats = adamw_update(grads, ref_state, params,
                                                  dataclasses.replace(opt, learning_rate=lr), grad_norm=norm,
                                                  decay=decay)
        assert_close(stats["lr"], ref_stats["lr"], err_msg=f"step {step} lr")
        assert float(stats["grad_norm"]) == norm
        jax.tree.map(lambda a, b: assert_close(a, b, err_msg=f"step {step}"), got, want)
        params = want
    adam = optim.adam_state(state)
    jax.tree.map(assert_close, adam.mu, ref_state["mu"])
    jax.tree.map(assert_close, adam.nu, ref_state["nu"])


@pytest.fixture(scope="module")
def reference():
    """Two steps of ref.train.train_step (ref/optim.py's from-scratch AdamW)."""
    params, batches = make_params(), make_batches()
    train, frozen = partition(params, METHODS[METHOD])
    state = adamw_init(train)
    metrics = []
    for batch in batches:
        train, state, m = RT.train_step(train, frozen, state, batch, cfg=CFG, opt=OPT)
        metrics.append(m)
    return params, batches, metrics, train


@pytest.mark.parametrize("backend", ["ref", "fast"])
def test_backends_train_as_the_reference(reference, backend):
    params, batches, ref_metrics, ref_train = reference
    steps = _steps(backend)
    assert steps.backend == backend
    train, frozen = steps.split(steps.to_backend(params), METHODS[METHOD])
    state, frozen = steps.init_opt(train), steps.prepare_frozen(frozen)
    for batch, want in zip(batches, ref_metrics):
        train, state, got = steps.train_step(train, frozen, state, batch)
        for key in ("loss", "accuracy", "grad_norm", "lr"):
            assert_close(got[key], want[key], err_msg=key)
    got = partition(steps.from_backend(steps.join(train, frozen)), METHODS[METHOD])[0]
    jax.tree.map(lambda a, b: assert_close(a, b, scale=50), got, ref_train)   # 5% of lr: test_fast_train.py
    assert optim.step_count(state) == len(batches)


def test_one_state_structure_and_one_compile_for_every_learning_rate():
    params = to_fast(make_params())
    train = fast_partition(params, METHODS[METHOD])[0]
    structures = {jax.tree.structure(_steps(b).init_opt(train)) for b in ("ref", "fast")}
    assert len(structures) == 1
    S.train_step.clear_cache()
    batch = make_batches()[0]
    lrs = []
    for lr in (1e-3, 3e-4):
        steps = _steps("fast", dataclasses.replace(OPT, learning_rate=lr, warmup_steps=0))
        t, f = steps.split(params, METHODS[METHOD])
        t = jax.tree.map(jnp.copy, t)
        _, _, m = steps.train_step(t, steps.prepare_frozen(f), steps.init_opt(t), batch)
        lrs.append(float(m["lr"]))
    assert S.train_step._cache_size() == 1
    np.testing.assert_allclose(lrs, [1e-3, 3e-4], **FLOAT32_RELATIVE)     # step 0 after no warmup: the peak


def test_one_eval_step_for_both_forwards():
    params = make_params(seed=3)
    tokens = make_batches(seed=5)[0]["tokens"]
    want = RT.batch_metrics(params, {"tokens": tokens}, CFG, with_routing=True, with_tokens=True)
    for backend in ("ref", "fast"):
        steps = _steps(backend)
        got = steps.eval_step(steps.to_backend(params), tokens)
        assert set(got) == set(S.EVAL_KEYS)
        for key in ("loss", "accuracy", "routing", "token_nll"):
            assert_close(got[key], want[key], err_msg=f"{backend} {key}")
        np.testing.assert_array_equal(got["token_correct"], want["token_correct"])
        assert want["routing"].shape == (2, 5)
        assert_close(got["accuracy"], np.mean(got["token_correct"]), dtype=np.float32, scale=0.1)


def test_spmd_takes_the_single_device_state():
    """A single-device state (as a checkpoint restores it) placed on the SPMD layout steps
    on as the single-device steps do."""
    params = to_fast(make_params())
    batches = [{"tokens": b["tokens"]} for b in make_batches()]      # the pipeline's: no mask
    single = _steps("fast")
    mesh = make_mesh((("dp", 4), ("fsdp", 2)))
    par = distributed.Parallelism("spmd", mesh=mesh, rules=rules_for_axes(mesh.axis_names))
    spmd = _steps("fast", parallelism=par, params_like=to_ref(params), batch_size=BATCH, seq_len=SEQ)
    assert spmd.backend == "spmd"
    t, f = single.split(params, METHODS[METHOD])
    t, state = jax.tree.map(jnp.copy, t), single.init_opt(t)
    t, state, _ = single.train_step(t, single.prepare_frozen(f), state, batches[0])
    host_t, host_state = jax.tree.map(np.array, (t, state))   # copies: the next step donates
    assert jax.tree.structure(spmd.init_opt(t)) == jax.tree.structure(state)
    want_t, _, want = single.train_step(t, single.prepare_frozen(f), state, batches[1])
    st, sstate = spmd.place(host_t, host_state)
    sf = spmd.prepare_frozen(spmd.split(params, METHODS[METHOD])[1])
    got_t, _, got = spmd.train_step(st, sf, sstate, batches[1])
    for key in ("loss", "accuracy", "grad_norm", "lr"):
        assert_close(got[key], want[key], err_msg=key)
    jax.tree.map(lambda a, b: assert_close(np.asarray(a), b), got_t, want_t)


def test_mpmd_state_goes_through_the_single_device_structure():
    """MPMD's per-mesh state, as a checkpoint stores it (`state_out`), has the single-device
    structure; a single-device state goes in (`state_in`, experts hosted out of order) and
    out again unchanged, and the MPMD step from it equals the single-device step."""
    params = to_fast(make_params())
    batches = [{"tokens": b["tokens"]} for b in make_batches()]
    single = _steps("fast")
    par = distributed.Parallelism("mpmd", placement=distributed.parse_placement(
        "backbone=0-3;experts=4-5:0+2,6-7:1+3"))
    mpmd = _steps("fast", parallelism=par, params_like=to_ref(params), batch_size=BATCH, seq_len=SEQ)
    assert mpmd.backend == "mpmd"
    t, f = single.split(params, METHODS[METHOD])
    t, state = jax.tree.map(jnp.copy, t), single.init_opt(t)
    t, state, _ = single.train_step(t, single.prepare_frozen(f), state, batches[0])
    host = jax.tree.map(np.array, (t, state))        # copies: the next step donates
    want_t, want_state, want = single.train_step(t, single.prepare_frozen(f), state, batches[1])

    mt, mf = mpmd.split(params, METHODS[METHOD])
    fresh = mpmd.state_out(mt, mpmd.init_opt(mt))
    assert jax.tree.structure(fresh) == jax.tree.structure(host)
    mt, mo = mpmd.place(*mpmd.state_in(*host))
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, mpmd.state_out(mt, mo)), host)
    mt, mo, got = mpmd.train_step(mt, mpmd.prepare_frozen(mf), mo, batches[1])
    for key in ("loss", "accuracy", "grad_norm", "lr"):
        assert_close(got[key], want[key], err_msg=key)
    got_t, got_state = mpmd.state_out(mt, mo)
    jax.tree.map(lambda a, b: assert_close(np.asarray(a), b), got_t, want_t)
    # Moments relative to their largest entry, at test_sharding_spmd.py's MOMENT_SCALE (its
    # docstring says why): their size (~1e-4) is below the table's atol.
    def moments_close(a, b):
        top = float(np.max(np.abs(b))) or 1.0
        assert_close(np.asarray(a) / top, np.asarray(b) / top, scale=MOMENT_SCALE)
    for field in ("mu", "nu"):
        jax.tree.map(moments_close, getattr(optim.adam_state(got_state), field),
                     getattr(optim.adam_state(want_state), field))
