"""`mode-jax compose-lora --loras A/model.safetensors B/model.safetensors ...`: LoRA-MoE stage 2.

The baseline a mixture of LoRA experts gives MoDE (mode_jax/pipeline/lora_moe.py,
ref/lora_moe.py): stage 1 is one LoRA per domain, `finetune --method lora` on that domain
alone; stage 2 places the N LoRAs side by side on every adapted projection and mixes them
per token with one softmax router per layer (zero at the start: a uniform mix), trained on
the mixture of the LoRAs' domains at lr.lora for train.steps steps. LoRAs and routers
train; --freeze-loras trains the routers only.

Every file must be a LoRA of the backbone in use (its fingerprint), trained on one domain,
no two on the same domain, with the [lora] shape (rank, alpha, targets) of the config;
otherwise compose-lora refuses, naming the file and the field, before writing anything.

    mode-jax finetune --method lora --set 'domains.targets=["math"]' --out runs/lora-math
    mode-jax finetune --method lora --set 'domains.targets=["code"]' --out runs/lora-code
    mode-jax compose-lora --loras runs/lora-math/model.safetensors runs/lora-code/model.safetensors \\
                          --out runs/lora-moe-2x
"""

from __future__ import annotations

import argparse

from mode_jax.pipeline import cliargs


def register(sub) -> None:
    p = sub.add_parser("compose-lora", help="LoRA-MoE: per-domain LoRAs mixed by a per-token router per layer",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--loras", nargs="+", required=True, metavar="FILE",
                   help="per-domain LoRA model files (model.safetensors of finetune --method lora runs)")
    p.add_argument("--freeze-loras", action="store_true", help="train the routers only (LoRAs frozen)")
    cliargs.add_steps_arg(p)
    cliargs.add_config_args(p)
    cliargs.add_run_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from mode_jax.pipeline import lora_moe, sharded, stages

    if args.mesh or args.placement:
        sharded.check_method("lora_moe")     # LoRA-MoE trains on one device: refused, naming it
    cfg = cliargs.config_from_args(args)
    deadline = cliargs.deadline(args)
    domains = lora_moe.lora_domains(args.loras)          # format and integrity, before any loading
    ctx = stages.prepare(cfg, domains, progress=not args.quiet)
    cliargs.start(ctx, args, deadline)
    loras = lora_moe.load_loras(args.loras, ctx)
    run_dir = cliargs.open_run(args, cfg, ctx, kind="compose-lora", out_name=f"lora-moe-{'-'.join(domains)}",
                               info={"loras": args.loras, "domains": domains, "freeze_loras": args.freeze_loras})
    if run_dir is None:
        return 0
    result = lora_moe.compose_loras(ctx, run_dir, loras, freeze=args.freeze_loras)
    return cliargs.report(run_dir, result, "model_file")
