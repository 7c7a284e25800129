"""`mode-jax btx branch --domain D` and `mode-jax btx compose --branches F ...`: Branch-Train-MiX.

The FFN-expert baseline (mode_jax/pipeline/btx.py, ref/btx.py). `branch` is stage 1: the
backbone with every layer's MLP a trainable copy, trained on one domain alone (attention,
norms and embeddings frozen) for train.stage1_steps steps at lr.full. `compose` is stage 2:
in every layer the seed model's MLP and the N branch MLPs become experts of a per-token
top-2 router (renormalised softmax over the two largest logits; router N(0, 0.02)), trained
with BTX's load-balancing loss (alpha 0.01) on the mixture of the branches' domains for
train.steps steps at lr.full; experts and routers train. Every expert runs (dense); the
result's routing shows each layer's mean top-2 weights (columns: seed, then the domains).

Every branch file must be a btx_branch model of the backbone in use (its fingerprint), of
one domain, no two on the same domain; otherwise compose refuses, naming the file.

    mode-jax btx branch --domain math --out runs/btx-math
    mode-jax btx branch --domain code --out runs/btx-code
    mode-jax btx compose --branches runs/btx-math/model.safetensors runs/btx-code/model.safetensors \\
                         --out runs/btx-2x
"""

from __future__ import annotations

import argparse

from mode_jax.pipeline import cliargs


def register(sub) -> None:
    p = sub.add_parser("btx", help="Branch-Train-MiX: per-domain MLP branches, then a top-2 MLP mixture",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    stage = p.add_subparsers(dest="btx_stage", required=True, metavar="{branch,compose}")
    b = stage.add_parser("branch", help="stage 1: train a copy of every MLP on one domain",
                         description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("--domain", required=True, help="a domain of the data (`mode-jax data info` lists them)")
    cliargs.add_steps_arg(b, "train.stage1_steps")
    c = stage.add_parser("compose", help="stage 2: the branches' MLPs as top-2 routed experts in every layer",
                         description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("--branches", nargs="+", required=True, metavar="FILE",
                   help="branch model files (model.safetensors of `btx branch` runs)")
    cliargs.add_steps_arg(c)
    for q in (b, c):
        cliargs.add_config_args(q)
        cliargs.add_run_args(q)
        q.set_defaults(func=run)


def run(args) -> int:
    from mode_jax.pipeline import btx, sharded, sources, stages

    if args.mesh or args.placement:
        sharded.check_method("btx")          # BTX trains on one device: refused, naming it
    branch = args.btx_stage == "branch"
    cfg = cliargs.config_from_args(args)
    deadline = cliargs.deadline(args)
    if branch:
        sources.check_domains([args.domain])
        cfg = btx.branch_config(cfg, args.domain)
        domains = [args.domain]
    else:
        domains = btx.branch_domains(args.branches)     # format and integrity, before any loading
    ctx = stages.prepare(cfg, domains, progress=not args.quiet)
    cliargs.start(ctx, args, deadline)
    branches = None if branch else btx.load_branches(args.branches, ctx)
    kind = "btx-branch" if branch else "btx-compose"
    run_dir = cliargs.open_run(args, cfg, ctx, kind=kind, out_name=f"{kind}-{'-'.join(domains)}",
                               info={"domains": domains, **({} if branch else {"branches": args.branches})})
    if run_dir is None:
        return 0
    result = btx.train_branch(ctx, run_dir, args.domain) if branch else btx.compose_branches(ctx, run_dir, branches)
    return cliargs.report(run_dir, result, "model_file")
