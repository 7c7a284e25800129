"""`mode-jax train-expert --domain DOMAIN`: stage 1, one expert on one domain, backbone frozen.

MoDE with N = 1 (paper section 3.1): beside each of the backbone's n_blocks blocks
runs a stack of expert_layers new transformer layers, and a per-token gate of two
outputs mixes backbone and expert. Only the expert layers and the gates train.
The result is a standalone expert file, <out>/expert-<domain>.safetensors (layers,
stage-1 gate, domain, config, backbone fingerprint), that `compose` accepts from any
run on the same backbone.

    mode-jax train-expert --domain code --preset cpu --out runs/expert-code
    mode-jax train-expert --domain code --out runs/expert-code --resume   # after a crash
"""

from __future__ import annotations

import argparse

from mode_jax.pipeline import cliargs


def register(sub) -> None:
    p = sub.add_parser("train-expert", help="stage 1: train one expert on one domain (backbone frozen)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--domain", required=True, help="a domain of the data (`mode-jax data info` lists them)")
    cliargs.add_steps_arg(p, "train.stage1_steps")
    cliargs.add_config_args(p)
    cliargs.add_run_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from mode_jax.pipeline import sources, stages

    sources.check_domains([args.domain])
    cfg = cliargs.config_from_args(args)
    deadline = cliargs.deadline(args)
    ctx = stages.prepare(cfg, [args.domain], progress=not args.quiet)
    cliargs.start(ctx, args, deadline)
    stages.check_parallelism(ctx, "stage1", 1)
    run_dir = cliargs.open_run(args, cfg, ctx, kind="train-expert", out_name=f"expert-{args.domain}",
                               info={"domain": args.domain})
    if run_dir is None:
        return 0
    result = stages.train_expert(ctx, run_dir, args.domain)
    return cliargs.report(run_dir, result, "expert_file",
                          command=f"mode-jax train-expert --domain {args.domain}")
