"""The shape and dtype checks (chex) at fast/'s public entry points: the model forward,
the loss, decoding and generation, the fused merge and the train/eval steps (one device,
SPMD, MPMD). A wrong input is a one-line ValueError naming the function and what it
expects, raised while tracing (before anything compiles), and the checks leave nothing
in the traced program (as ref/'s: tests/test_ref_checks.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mode_jax import distributed
from mode_jax.fast import decode, loss, model
from mode_jax.fast import steps as S
from mode_jax.fast import train as fast_train
from mode_jax.fast.config import FastConfig
from mode_jax.fast.generate import generate
from mode_jax.fast.merge import fused_merge
from mode_jax.fast.mpmd import MpmdStep
from mode_jax.fast.params import to_fast
from mode_jax.fast.sharding import make_mesh
from mode_jax.fast.spmd import SpmdStep
from mode_jax.ref.config import LlamaConfig, ModeConfig, OptimConfig
from mode_jax.ref.llama import init_llama
from mode_jax.ref.methods import METHODS, partition
from mode_jax.ref.mode import init_mode
from mode_jax.ref.sampling import SamplingConfig
from tests.helpers import assert_checks_not_traced

CFG = LlamaConfig.tiny(n_layers=2)
MODE = ModeConfig(n_blocks=2, expert_layers=1, n_experts=2, expert_init="random")
FAST = FastConfig.exact()
OPT = OptimConfig()


@pytest.fixture(scope="module")
def params():
    return to_fast(init_mode(jax.random.key(0), init_llama(jax.random.key(1), CFG), CFG, MODE))


def _tokens(shape=(2, 6)):
    return jax.random.randint(jax.random.key(2), shape, 1, CFG.vocab_size)


def _one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text, text
    return text


@pytest.mark.parametrize("tokens, message", [
    (jnp.zeros((2, 6), jnp.float32), r"mode_hidden: tokens must be integer ids"),
    (jnp.zeros((6,), jnp.int32), r"mode_hidden: tokens must be \[B, T\]"),
])
def test_model_forward_checks_tokens(params, tokens, message):
    assert model.logits(params, _tokens(), CFG, FAST).shape == (2, 6, CFG.vocab_size)
    with pytest.raises(ValueError, match=message) as err:
        model.logits(params, tokens, CFG, FAST)
    _one_line(err)
    with pytest.raises(ValueError, match=message.replace("mode_hidden", "llama_hidden")):
        model.hidden({"backbone": params["backbone"]}, tokens, CFG, FAST)


def test_loss_checks_its_inputs():
    h = jax.random.normal(jax.random.key(3), (2, 5, CFG.d_model))
    w = jax.random.normal(jax.random.key(4), (7, CFG.d_model))
    targets = _tokens((2, 5)) % 7
    assert float(loss.next_token_metrics(h, w, targets)["tokens"]) == 10.0
    bad = [((h[0], w, targets), r"h, w, targets must be \[B, T, D\], \[V, D\], \[B, T\]"),
           ((h, w, targets[:, :4]), r"h \(2, 5, 32\) must be \[B, T, D\] for targets \(2, 4\) \[B, T\]"),
           ((h, w, targets.astype(jnp.float32)), "targets must be integer ids"),
           ((h, w[:, :-1], targets), r"w must be \[V, D\] with D = 32"),
           ((h, w, targets, jnp.ones((2, 4))), r"mask must be \[B, T\] = \(2, 5\)"),
           ((h.astype(jnp.int32), w, targets), "h and w must be float arrays")]
    for args, message in bad:
        with pytest.raises(ValueError, match="next_token_metrics: " + message) as err:
            loss.next_token_metrics(*args)
        _one_line(err)


def _merge_inputs(n=2, b=2, t=3, d=8, f=12):
    keys = iter(jax.random.split(jax.random.key(5), 7))
    shapes = [(b, t, n + 1), (b, t, d), (b, t, f), (f, d), (n, b, t, d), (n, b, t, f), (n, f, d)]
    return [jax.random.normal(next(keys), s) for s in shapes]


@pytest.mark.parametrize("index, value, message", [
    (0, lambda a: a[..., :-1], r"logits must be \[B, T, E\] \(E = N \+ 1 columns, N from r_ex\) = \(2, 3, 3\)"),
    (5, lambda a: a[..., :-1], r"u_ex must be \[N, B, T, F\] = \(2, 2, 3, 12\)"),
    (3, lambda a: a[None], r"w_bb must be \[F, D\]"),
    (1, lambda a: a.astype(jnp.int32), "r_bb must be a float array"),
])
def test_fused_merge_checks_shapes_forward_and_under_grad(index, value, message):
    args = _merge_inputs()
    assert fused_merge(*args).shape == (2, 3, 8)
    args[index] = value(args[index])
    with pytest.raises(ValueError, match="fused_merge: " + message) as err:
        fused_merge(*args)
    _one_line(err)
    if index != 1:            # no gradient of an integer input; the VJP's forward checks the rest
        with pytest.raises(ValueError, match="fused_merge: " + message):
            jax.grad(lambda *a: fused_merge(*a).sum(), argnums=(0, 4, 5, 6))(*args)


def test_decode_and_generate_check_their_inputs(params):
    prepared = decode.prepare(params, FAST)
    statics = dict(cfg=CFG, fast=FAST, sampling=SamplingConfig(), size=8)
    tokens, pad = _tokens((2, 4)), jnp.zeros((2,), jnp.int32)
    for args, message in (((tokens.astype(jnp.float32), pad), "prefill: tokens must be integer ids"),
                          ((tokens, pad[:1]), r"prefill: pad must be \[B\] = \[2\]"),
                          ((tokens, pad.astype(jnp.float32)), "prefill: pad must be integer counts")):
        with pytest.raises(ValueError, match=message) as err:
            decode.prefill(prepared, *args, jax.random.key(0), **statics)
        _one_line(err)
    with pytest.raises(ValueError, match=r"score: tokens must be \[B, T\]"):
        decode.score(prepared, tokens[0], pad, cfg=CFG, fast=FAST)
    cache = decode.init_cache(prepared, 2, 8, CFG, FAST)
    with pytest.raises(ValueError, match=r"decode_step: token must be \[B\]"):
        decode.decode_step(prepared, cache, tokens, jnp.int32(4), pad, jax.random.key(0), jnp.int32(1),
                           cfg=CFG, fast=FAST, sampling=SamplingConfig())
    with pytest.raises(ValueError, match=rf"generate: token ids must be in \[0, {CFG.vocab_size}\).*"
                                         rf"got 0\.\.{CFG.vocab_size}$"):
        generate(prepared, [[1, 2], [CFG.vocab_size]], CFG, FAST, max_new_tokens=2)


def test_train_and_eval_steps_check_the_batch(params):
    steps = S.make_steps("stage2", CFG, opt=OPT)
    train, frozen = partition(params, METHODS["stage2"])
    state = steps.init_opt(train)
    for bad, message in (({"tokens": _tokens((7,))}, r"tokens must be \[B, T\]"),
                         ({"tokens": _tokens().astype(jnp.float32)}, "tokens must be integer ids")):
        with pytest.raises(ValueError, match=r"batch_metrics: batch\['tokens'\]: " + message) as err:
            steps.train_step(train, frozen, state, bad)
        _one_line(err)
        with pytest.raises(ValueError, match=r"batch_metrics: batch\['tokens'\]: " + message):
            steps.eval_step(params, bad["tokens"])


def test_sharded_steps_check_the_batch_before_placing(params):
    """SpmdStep and MpmdStep are built (nothing compiles) for batch 8 x 16 with a mask."""
    kw = dict(batch_size=8, seq_len=16, masked=True, fast=FAST)
    spmd = SpmdStep.build(params, CFG, OPT, mesh=make_mesh((("dp", 8),)), **kw)
    mpmd = MpmdStep(params, CFG, OPT, distributed.parse_placement("backbone=0-3;experts=4-7"), **kw)
    good = {"tokens": np.asarray(_tokens((8, 17))), "mask": np.ones((8, 16), np.float32)}
    for step, where in ((spmd, r"SPMD mesh \{'dp': 8\}"), (mpmd, "MPMD step")):
        assert step.place_batch(good)["tokens"].shape == (8, 17)
        for bad, message in (({**good, "tokens": good["tokens"][:, :-1]},
                              r"batch\['tokens'\] must be \[B, T \+ 1\] = \(8, 17\)"),
                             ({**good, "tokens": good["tokens"].astype(np.float32)},
                              r"batch\['tokens'\]: tokens must be integer ids"),
                             ({**good, "mask": good["mask"][:4]}, r"batch\['mask'\] must be \[B, T\] = \(8, 16\)"),
                             ({"tokens": good["tokens"]}, "the step was built with a mask, the batch has none")):
            with pytest.raises(ValueError, match=f"{where}: {message}") as err:
                step.place_batch(bad)
            _one_line(err)


def test_checks_add_nothing_to_the_traced_step(params):
    """The jaxpr of fast/'s MoDE loss (forward, fused merge, chunked loss) is the same with
    chex's checks on and off."""
    batch = {"tokens": _tokens((2, 7))}
    assert_checks_not_traced(
        lambda: str(jax.make_jaxpr(fast_train.batch_metrics, static_argnums=(2, 3))(params, batch, CFG, FAST)))
