"""`mode-jax finetune --method full|lora|block_expansion`: baselines, on the same mixture and budget.

Each trains on the mixture of the target domains (domains.targets, equal rows per
domain) for train.steps steps of train.batch_size rows, the budget of `compose`'s stage 2
(a composed MoDE has also seen its experts' stage-1 tokens; the sweep's token-matched
budget gives the baselines those too):
  full   every backbone weight (embedding and LM head included), learning rate lr.full
  lora   low-rank adapters W + (alpha / rank) A B on the attention projections
         (lora.targets = "attn", rank lora.rank = 16: the paper's best), lr.lora
  block_expansion  LLaMA Pro: a new layer after every expansion.every-th backbone layer (default
         5), a copy of the layer below with its attention output and MLP down projections
         zeroed (the model starts as the backbone); only the new layers train, lr.expansion

    mode-jax finetune --method lora --preset cpu --out runs/lora
"""

from __future__ import annotations

import argparse

from mode_jax.pipeline import cliargs


def register(sub) -> None:
    p = sub.add_parser("finetune", help="baselines: full fine-tuning, LoRA or block expansion on the same mixture",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", required=True, choices=("full", "lora", "block_expansion"))
    cliargs.add_steps_arg(p)
    cliargs.add_config_args(p)
    cliargs.add_run_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from mode_jax.pipeline import sharded, stages

    if args.mesh or args.placement:
        sharded.check_method(args.method)
    cfg = cliargs.config_from_args(args)
    deadline = cliargs.deadline(args)
    ctx = stages.prepare(cfg, cfg.domains.targets, progress=not args.quiet)
    if args.method == "block_expansion":
        from mode_jax.pipeline import expansion
        expansion.config(ctx)           # expansion.every must divide the backbone's depth: refused before any file
    cliargs.start(ctx, args, deadline)
    run_dir = cliargs.open_run(args, cfg, ctx, kind=f"finetune-{args.method}", out_name=f"finetune-{args.method}",
                               info={"method": args.method})
    if run_dir is None:
        return 0
    result = stages.finetune(ctx, run_dir, args.method)
    return cliargs.report(run_dir, result, "model_file")
