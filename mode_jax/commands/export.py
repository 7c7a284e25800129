"""`mode-jax export`: a run's trained model in the formats other tools load.

    mode-jax export --run runs/lora --to peft out/adapter    # a LoRA run -> PEFT adapter
    mode-jax export --run runs/full --to hf out/model        # a full fine-tuning run -> transformers
    mode-jax export --run runs/lora --to hf out/merged       # a LoRA run, merged into its base

In Python (transformers, peft):

    base = AutoModelForCausalLM.from_pretrained(BASE_DIR)   # the run's --model directory
    model = PeftModel.from_pretrained(base, "out/adapter")
    model = AutoModelForCausalLM.from_pretrained("out/model")

A MoDE run (train-expert, compose) has no PEFT or transformers form: it stays in
mode-jax's format; load it with `mode_jax.export.load_run(DIR)`. OUT is written whole or
not at all; an existing non-empty OUT is refused unless --force.
"""

from __future__ import annotations

import argparse

from mode_jax.export import FORMATS


def register(sub) -> None:
    p = sub.add_parser("export", help="a LoRA run as a PEFT adapter, a full fine-tuning run as a transformers "
                                      "directory", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, metavar="DIR", help="a finished finetune run directory")
    p.add_argument("--to", required=True, choices=FORMATS, help="peft (LoRA runs) or hf (full FT, or LoRA merged)")
    p.add_argument("out", metavar="OUT", help="the directory to write")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists and is not empty")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args) -> int:
    from mode_jax.export import export_run
    out = export_run(args.run, args.to, args.out, force=args.force, progress=not args.quiet)
    print(f"wrote {out} ({'PEFT adapter' if args.to == 'peft' else 'transformers model'})")
    return 0
