"""`mode-jax demo`: MoDE end to end on a tiny random backbone, in about a minute on CPU.

Two synthetic "domains" (token sequences with different arithmetic rules) stand
in for real ones: stage 1 trains one expert per domain, stage 2 composes both
with fresh-from-stage-1 gates on the mixture, and the losses are printed. It
shows the whole workflow and needs no downloads.
"""

from __future__ import annotations

import argparse
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from mode_jax.ref.config import LlamaConfig, ModeConfig, OptimConfig
from mode_jax.ref.llama import init_llama
from mode_jax.ref.methods import METHODS, init_method, partition, merge
from mode_jax.ref.optim import adamw_init
from mode_jax.ref.train import eval_step, train_step

DOMAINS = {"count-by-3": 3, "count-by-7": 7}


def domain_batch(rng: np.random.Generator, stride: int, batch: int, seq: int, vocab: int) -> dict:
    """Sequences start, start + stride, start + 2 stride, ... (mod vocab), with 10% noise."""
    start = rng.integers(0, vocab, size=(batch, 1))
    tokens = (start + stride * np.arange(seq + 1)[None, :]) % vocab
    noise = rng.random(tokens.shape) < 0.1
    tokens = np.where(noise, rng.integers(0, vocab, size=tokens.shape), tokens)
    return {"tokens": jnp.asarray(tokens, jnp.int32)}


def register(sub) -> None:
    p = sub.add_parser("demo", help="tiny end-to-end MoDE run on a random backbone (no downloads)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60, help="training steps per stage (default 60)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def train(params, method, batches, opt, cfg, log_every, label):
    t, f = partition(params, METHODS[method])
    state = adamw_init(t)
    for step, batch in enumerate(batches):
        t, state, m = train_step(t, f, state, batch, cfg=cfg, opt=opt)
        if step % log_every == 0 or step == len(batches) - 1:
            print(f"  {label} step {step:3d}  loss {float(m['loss']):.3f}  acc {float(m['accuracy']):.3f}")
    return merge(t, f)


def run(args) -> int:
    if args.steps < 1:
        from mode_jax.errors import UserError
        raise UserError(f"--steps must be >= 1, got {args.steps}")
    cfg = LlamaConfig.tiny(vocab_size=64, n_layers=4)
    # A random backbone knows nothing worth keeping, so the gate starts less biased
    # towards it than ModeConfig's default (made for pretrained backbones).
    mode = ModeConfig(n_blocks=2, expert_layers=1, n_experts=1, expert_init="copy", gate_margin=2.0)
    opt = OptimConfig(learning_rate=3e-3, warmup_steps=5, total_steps=args.steps)
    rng = np.random.default_rng(args.seed)
    backbone = init_llama(jax.random.key(args.seed), cfg)
    log_every = max(args.steps // 4, 1)
    evals = {d: domain_batch(np.random.default_rng(1000 + s), s, 16, 32, cfg.vocab_size) for d, s in DOMAINS.items()}

    def report(label, params):
        accs = {d: float(eval_step(params, b, cfg=cfg)["accuracy"]) for d, b in evals.items()}
        print(f"{label:28s} " + "  ".join(f"{d} acc {a:.3f}" for d, a in accs.items()))

    report("backbone (random, frozen)", {"backbone": backbone})
    stage1 = []
    for i, (domain, stride) in enumerate(DOMAINS.items()):
        print(f"stage 1: expert for {domain}")
        batches = [domain_batch(rng, stride, 8, 32, cfg.vocab_size) for _ in range(args.steps)]
        params = init_method("stage1", jax.random.key(i + 1), backbone, cfg, mode=mode)
        stage1.append(train(params, "stage1", batches, opt, cfg, log_every, domain))
        report(f"after stage 1 ({domain})", stage1[-1])
    print("stage 2: compose both experts on the mixture")
    mixture = [domain_batch(rng, list(DOMAINS.values())[s % 2], 8, 32, cfg.vocab_size) for s in range(args.steps)]
    composed = init_method("stage2", jax.random.key(9), backbone, cfg,
                           mode=dataclasses.replace(mode, n_experts=2), stage1=stage1)
    composed = train(composed, "stage2", mixture, opt, cfg, log_every, "mixture")
    report("after stage 2 (composed)", composed)
    return 0
