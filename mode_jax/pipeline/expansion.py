"""The block-expansion baseline (LLaMA Pro, ref/expansion.py) as a pipeline phase.

One stage, like the full / LoRA baselines: identity-initialised new layers after every
`expansion.every`-th backbone layer, trained alone on the mixture of the target domains
for train.steps steps at lr.expansion; the model file holds the new layers only
(`expert_io.save_model`: the backbone stays where it came from, its fingerprint recorded),
and evaluation, `eval --run`, `load_run` and the sweep read it back like any other run.

    mode-jax finetune --method block_expansion --preset cpu --out runs/expansion
"""

from __future__ import annotations

import jax

from mode_jax.errors import UserError
from mode_jax.ref.expansion import ExpansionConfig, expansion_param_count

METHOD = "block_expansion"


def config(ctx) -> ExpansionConfig:
    """The run's ExpansionConfig, checked against the loaded backbone (a one-line UserError,
    naming the key and the divisors that would do, when `every` does not divide its depth)."""
    expansion = ExpansionConfig(every=ctx.cfg.expansion.every)
    try:
        expansion.check_backbone(ctx.llama)
    except ValueError as err:
        raise UserError(f"config {err}") from None
    return expansion


def finetune(ctx, run) -> dict | None:
    """Train the new layers on the target mixture; the phase's result (None if stopped early)."""
    from mode_jax.pipeline import stages
    from mode_jax.ref.methods import init_method

    cfg = ctx.cfg
    expansion = config(ctx)
    params = init_method(METHOD, jax.random.key(cfg.train.seed), ctx.backbone.params, ctx.llama,
                         expansion=expansion)
    n_new = len(params["expansion"]["layers"])
    extra = {"expansion": {"every": expansion.every, "new_layers": n_new,
                           "after_backbone_layers": [(j + 1) * expansion.every - 1 for j in range(n_new)],
                           "params_new": expansion_param_count(ctx.llama, expansion)}}
    return stages._finish_mixture(ctx, run, f"block-expansion-k{expansion.every}", METHOD, params,
                                  cfg.domains.targets, cfg.lr.expansion, extra)
