"""The shape and dtype checks (chex) at the public functions of ref/: a wrong input is a
ValueError naming the function and what it expects, and the checks are static (they read
shapes while tracing), so a jitted step holds no trace of them."""

import jax
import jax.numpy as jnp
import pytest

from mode_jax.ref.config import LlamaConfig, LoraConfig, ModeConfig
from mode_jax.ref.llama import init_llama
from mode_jax.ref.lora import init_lora, lora_merge
from mode_jax.ref.methods import apply
from mode_jax.ref.mode import gate_logits, init_mode, mode_forward
from mode_jax.ref.train import batch_metrics, next_token_metrics
from tests.helpers import assert_checks_not_traced

CFG = LlamaConfig.tiny(n_layers=2)
MODE = ModeConfig(n_blocks=2, expert_layers=1, n_experts=2, expert_init="random")


@pytest.fixture(scope="module")
def params():
    return init_mode(jax.random.key(0), init_llama(jax.random.key(1), CFG), CFG, MODE)


def _tokens(shape=(2, 5)):
    return jax.random.randint(jax.random.key(2), shape, 0, CFG.vocab_size)


@pytest.mark.parametrize("tokens, message", [
    (jnp.zeros((2, 5), jnp.float32), r"mode_hidden: tokens must be integer ids"),
    (jnp.zeros((5,), jnp.int32), r"mode_hidden: tokens must be \[B, T\]"),
])
def test_mode_forward_checks_tokens(params, tokens, message):
    with pytest.raises(ValueError, match=message):
        mode_forward(params, tokens, CFG)


def test_apply_checks_tokens(params):
    with pytest.raises(ValueError, match=r"apply: tokens must be \[B, T\]"):
        apply(params, _tokens((1, 2, 5)), CFG)


def test_gate_logits_checks_the_gate(params):
    block = params["blocks"][0]
    x = jax.random.normal(jax.random.key(3), (2, 5, CFG.d_model))
    assert gate_logits(block, x).shape == (2, 5, MODE.n_experts + 1)
    with pytest.raises(ValueError, match=r"gate_w must be \[D, E\]"):
        gate_logits({**block, "gate_w": block["gate_w"][:-1]}, x)
    with pytest.raises(ValueError, match=r"gate_b must be \[E\]"):
        gate_logits({**block, "gate_b": block["gate_b"][:-1]}, x)
    with pytest.raises(ValueError, match=r"x must be \[B, T, D\]"):
        gate_logits(block, x[0])


def test_lora_merge_checks_adapter_shapes():
    backbone = init_llama(jax.random.key(1), CFG)
    lora = LoraConfig(rank=4, targets="attn")
    adapters = init_lora(jax.random.key(0), backbone, lora)
    lora_merge(backbone, adapters, lora)
    with pytest.raises(ValueError, match=r"lora_merge: the adapter of wq must be a \[32, 8\]"):
        lora_merge(backbone, adapters, LoraConfig(rank=8, targets="attn"))


def test_checks_add_nothing_to_the_traced_step(params):
    """The jaxpr of the MoDE loss (forward and metrics) is the same with chex's checks on and off."""
    batch = {"tokens": _tokens((2, 6))}
    assert_checks_not_traced(lambda: str(jax.make_jaxpr(batch_metrics, static_argnums=2)(params, batch, CFG)))


def test_next_token_metrics_checks_its_inputs():
    logits = jax.random.normal(jax.random.key(4), (2, 5, 7))
    targets = _tokens((2, 5)) % 7
    assert float(next_token_metrics(logits, targets)["tokens"]) == 10.0
    with pytest.raises(ValueError, match=r"logits must be \[B, T, V\]"):
        next_token_metrics(logits[0], targets)
    with pytest.raises(ValueError, match=r"targets must be \[B, T\]"):
        next_token_metrics(logits, targets[:, :4])
    with pytest.raises(ValueError, match="targets must be integer ids"):
        next_token_metrics(logits, targets.astype(jnp.float32))
    with pytest.raises(ValueError, match=r"mask must be \[B, T\]"):
        next_token_metrics(logits, targets, jnp.ones((2, 4)))


def test_batch_metrics_checks_the_tokens(params):
    with pytest.raises(ValueError, match=r"batch_metrics: batch\['tokens'\]: tokens must be \[B, T\]"):
        batch_metrics(params, {"tokens": _tokens((2, 5))[0]}, CFG)
