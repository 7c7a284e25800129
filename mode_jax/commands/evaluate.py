"""`mode-jax eval`: next-token accuracy and loss per domain, retention set included.

Evaluates on held-out test rows of every domain in domains.targets and
domains.retention (data.eval_sequences rows of data.seq_len tokens per domain):
  (nothing)            the backbone's own score, before any adaptation
  --run DIR            the model a train-expert / compose / finetune run produced
                       (its config is used unless --preset / --config is given)
  --experts FILE ...   expert files composed as they are (stage-1 gates, no training)
For MoDE models it also reports the gate's mean routing weight per block and domain.

    mode-jax eval --preset cpu                       # the backbone
    mode-jax eval --run runs/mode-2x
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from mode_jax.errors import UserError
from mode_jax.pipeline import cliargs


def register(sub) -> None:
    p = sub.add_parser("eval", help="next-token accuracy / loss per domain (backbone, a run, or experts)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_mutually_exclusive_group()
    what.add_argument("--run", default=None, metavar="DIR", help="a finished training run directory")
    what.add_argument("--experts", nargs="+", default=None, metavar="FILE", help="expert files to compose as is")
    cliargs.add_config_args(p)
    p.add_argument("--out", default=None, metavar="DIR", help="where result.json goes (default runs/eval-<time>)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args) -> int:
    import jax

    from mode_jax.pipeline import expert_io, runs, sources, stages
    from mode_jax.ref.methods import init_method

    source_run = None
    if args.run:
        source_run = runs.RunDir(args.run)
        if not source_run.path.is_dir():
            raise UserError(f"--run: run directory {args.run} does not exist")
        if not source_run.is_done():
            raise UserError(f"{args.run} is not a finished run (no result.json): finish it with --resume first")
        if not args.preset and not args.config:
            args.config = str(source_run.path / runs.CONFIG)
    cfg = cliargs.config_from_args(args)
    experts = [expert_io.load_expert(p) for p in args.experts] if args.experts else None
    ctx = stages.prepare(cfg, progress=not args.quiet)
    label, method = "backbone", "backbone"
    params = {"backbone": ctx.backbone.params}
    if experts:
        experts = expert_io.load_compatible(args.experts, llama=ctx.llama, mode=sources.mode_config(cfg, 1),
                                            fingerprint=ctx.backbone.fingerprint, base=ctx.backbone.base)
        stage1 = [e.stage1_model(ctx.backbone.params) for e in experts]
        method = "stage2" if len(experts) > 1 else "stage1"
        params = stage1[0] if len(experts) == 1 else init_method(
            "stage2", jax.random.key(0), ctx.backbone.params, ctx.llama,
            mode=sources.mode_config(cfg, len(experts)), stage1=stage1, gate_from=cfg.mode.stage2_gate_from)
        label = "experts-" + "-".join(e.domain for e in experts)
    elif source_run is not None:
        params, method, label = _load_run(source_run, ctx)
    out = args.out or runs.default_out("eval", label)
    run_dir = runs.RunDir.create(out, cfg, kind="eval", info={"evaluated": label, "run": args.run,
                                                               "experts": args.experts})
    result = {"label": label, "method": method, "params_total": _count(params), **stages.evaluate_params(
        ctx, params, method=method if method != "backbone" else "full", desc=f"eval {label}")}
    run_dir.write_result(result)
    print(f"{'domain':10s} {'accuracy':>9s} {'loss':>8s}")
    for d, v in result["domains"].items():
        print(f"{d:10s} {100 * v['accuracy']:8.2f}% {v['loss']:8.4f}")
        if v.get("answers", {}).get("tokens"):      # a question/answer domain: its answer tokens alone
            print(f"{'  answers':10s} {100 * v['answers']['accuracy']:8.2f}% {'':>8s}")
    return 0


def _count(params) -> int:
    from mode_jax.pipeline.engine import param_count
    return param_count(params)


def _load_run(source_run, ctx):
    from mode_jax.pipeline import expert_io
    path = source_run.path
    experts = sorted(path.glob("expert-*.safetensors"))
    if experts:
        e = expert_io.load_expert(experts[0])
        expert_io.check_compatible(e, llama=ctx.llama, mode=dataclasses.replace(
            e.mode, n_blocks=ctx.cfg.mode.n_blocks, expert_layers=ctx.cfg.mode.expert_layers),
            fingerprint=ctx.backbone.fingerprint, base=ctx.backbone.base)
        return e.stage1_model(ctx.backbone.params), "stage1", f"expert-{e.domain}"
    model = Path(path) / "model.safetensors"
    if not model.is_file():
        raise UserError(f"{path} holds neither an expert file nor model.safetensors")
    params, method, info = expert_io.load_model(model, ctx.backbone.params, fingerprint=ctx.backbone.fingerprint)
    return params, method, info.get("label", method)
