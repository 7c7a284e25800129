"""`mode-jax compose --experts A.safetensors B.safetensors ...`: stage 2, N experts and their gates.

The experts (stage-1 files from `train-expert`, possibly trained in separate runs
by other people) are placed side by side in every block, with a gate of N + 1
outputs (paper section 3.1; initialised from the stage-1 gates unless
mode.stage2_gate_from = "fresh"), and trained on a mixture of the experts'
domains with equal rows per domain. Experts and gates train (the paper's best);
--freeze-experts trains the gates only. --uninit skips stage 1: N random experts,
one per --domains entry, trained from scratch on the mixture.

Every expert must match the backbone in use: the same backbone fingerprint, width
and shape, and the same block layout (mode.n_blocks, mode.expert_layers);
otherwise compose refuses, naming the differing field, before writing anything.

    mode-jax compose --experts runs/expert-code/expert-code.safetensors \\
                     runs/expert-math/expert-math.safetensors --out runs/mode-2x
    mode-jax compose --uninit --domains math code --out runs/mode-2x-uninit
"""

from __future__ import annotations

import argparse

from mode_jax.errors import UserError
from mode_jax.pipeline import cliargs


def register(sub) -> None:
    p = sub.add_parser("compose", help="stage 2: compose N experts with gates on the domain mixture",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", nargs="+", default=None, metavar="FILE", help="expert files from train-expert")
    p.add_argument("--freeze-experts", action="store_true", help="train the gates only (experts frozen)")
    p.add_argument("--uninit", action="store_true", help="random experts, no stage 1 (give --domains)")
    p.add_argument("--domains", nargs="+", default=None, help="with --uninit: one random expert per domain")
    cliargs.add_steps_arg(p)
    cliargs.add_config_args(p)
    cliargs.add_run_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from mode_jax.pipeline import expert_io, sources, stages

    if bool(args.experts) == bool(args.uninit):
        raise UserError("give either --experts FILE ... or --uninit --domains D ...")
    if args.uninit and not args.domains:
        raise UserError("--uninit needs --domains (one random expert per domain)")
    if args.uninit and args.freeze_experts:
        raise UserError("--freeze-experts with --uninit would train gates over random experts; drop one")
    cfg = cliargs.config_from_args(args)
    deadline = cliargs.deadline(args)
    if args.uninit:
        sources.check_domains(args.domains)
        experts, domains = None, list(dict.fromkeys(args.domains))
    else:
        experts = [expert_io.load_expert(p) for p in args.experts]   # format checks before any loading
        domains = [e.domain for e in experts]
    ctx = stages.prepare(cfg, domains, progress=not args.quiet)
    cliargs.start(ctx, args, deadline)
    stages.check_parallelism(ctx, "uninit" if args.uninit else ("stage2_frozen" if args.freeze_experts else "stage2"),
                             len(domains))
    if experts is not None:
        experts = expert_io.load_compatible(args.experts, llama=ctx.llama, mode=sources.mode_config(cfg, 1),
                                            fingerprint=ctx.backbone.fingerprint, base=ctx.backbone.base)
    kind = "compose-uninit" if args.uninit else "compose"
    run_dir = cliargs.open_run(args, cfg, ctx, kind=kind, out_name=f"{kind}-{'-'.join(domains)}",
                               info={"experts": args.experts, "domains": domains,
                                     "freeze_experts": args.freeze_experts})
    if run_dir is None:
        return 0
    if args.uninit:
        result = stages.uninit(ctx, run_dir, domains)
    else:
        result = stages.compose(ctx, run_dir, experts, freeze=args.freeze_experts)
    return cliargs.report(run_dir, result, "model_file")
