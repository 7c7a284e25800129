"""`mode-jax reproduce --preset NAME`: the paper's Table 1 in one command.

Runs, each in its own sub-directory of --out (a run directory of its own):
  backbone          the backbone's own score, before any adaptation (the paper omits it)
  expert-<domain>   stage 1, one expert per target domain (train-expert)
  mode-2x           stage 2: both experts + gates on the mixture (compose)
  mode-2x-frozen    stage 2, gates only (compose --freeze-experts)
  mode-2x-uninit    stage 2 from random experts, no stage 1 (compose --uninit)
  full-ft           full fine-tuning on the mixture (finetune --method full)
  lora-r16-attn     LoRA rank 16 on the attention projections (finetune --method lora)
then writes table.md / table.json (parameter counts, accuracy per domain, average,
the paper's numbers beside ours) and loss_curves.png, accuracy.png, routing.png.

Presets (configs/*.toml): smoke (tiny random model, synthetic data, < 2 min on CPU),
cpu (SmolLM2-135M, <= 20 min on 2 cores), gpu (SmolLM2-135M, bf16, < 15 min on an H100).

Resumable: a finished phase is skipped, an interrupted one continues from its last
checkpoint. --time-limit stops cleanly (checkpoint written) so a long preset can be
split into several calls of the same command with --resume.

    mode-jax reproduce --preset cpu --out runs/table1-cpu
    mode-jax reproduce --preset gpu --out runs/gpu --time-limit 500            # call 1
    mode-jax reproduce --preset gpu --out runs/gpu --time-limit 500 --resume   # call 2, ...
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from mode_jax.errors import UserError
from mode_jax.pipeline import cliargs


def register(sub) -> None:
    p = sub.add_parser("reproduce", help="the whole Table 1: backbone, experts, compositions, baselines, "
                       "table and plots", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=None, metavar="PHASES",
                   help="comma-separated phases to run now (default all; the table covers those done)")
    cliargs.add_config_args(p)
    cliargs.add_run_args(p)
    p.set_defaults(func=run)


def phases(cfg) -> list[tuple[str, str]]:
    """(label, kind) in running order; labels are sub-directory names and table rows."""
    n = len(cfg.domains.targets)
    out = [("backbone", "backbone")] + [(f"expert-{d}", "expert") for d in cfg.domains.targets]
    out += [(f"mode-{n}x", "compose"), (f"mode-{n}x-frozen", "compose-frozen"), (f"mode-{n}x-uninit", "uninit"),
            ("full-ft", "full"), (f"lora-r{cfg.lora.rank}-{cfg.lora.targets}", "lora")]
    return out


def run(args) -> int:
    from mode_jax.pipeline import expert_io, runs, stages

    started = time.time()
    cfg = cliargs.config_from_args(args)
    deadline = cliargs.deadline(args)
    plan = phases(cfg)
    only = None
    if args.only:
        only = [x.strip() for x in args.only.split(",") if x.strip()]
        unknown = [x for x in only if x not in dict(plan)]
        if unknown:
            raise UserError(f"unknown phase {unknown[0]!r}; phases are {', '.join(label for label, _ in plan)}")
    preset = args.preset or (None if args.config else args.default_preset)
    out = Path(args.out or runs.default_out("reproduce", preset or "config"))
    ctx = stages.prepare(cfg, cfg.domains.targets, progress=not args.quiet)
    cliargs.start(ctx, args, deadline)
    for method, n_experts in (("stage1", 1), ("stage2", len(cfg.domains.targets))):
        stages.check_parallelism(ctx, method, n_experts)
    root = runs.RunDir.create(out, cfg, kind="reproduce", resume=args.resume,
                              info={"preset": preset, "backbone": ctx.backbone.name,
                                    "backbone_fingerprint": ctx.backbone.fingerprint,
                                    "phases": [label for label, _ in plan]})
    results, stopped = {}, None
    for label, kind in plan:
        sub = runs.RunDir(out / label)
        if sub.is_done():
            results[label] = sub.result()
            continue
        if only is not None and label not in only:
            continue
        if deadline is not None and time.time() > deadline:
            stopped = label
            break
        print(f"== {label}", file=sys.stderr)
        sub = runs.RunDir.create(sub.path, cfg, kind=kind, resume=(sub.path / runs.CONFIG).is_file(),
                                 info={"phase": label, "backbone_fingerprint": ctx.backbone.fingerprint})
        result = _run_phase(ctx, sub, kind, cfg, out, expert_io, stages)
        if result is None:
            stopped = label
            break
        results[label] = result
    done = [label for label, _ in plan if label in results]
    md = _report(out, cfg, plan, results, root)
    _write_timing(out, started, done, stopped)
    if md:
        print(md)
    if stopped or len(done) < len(plan):
        print(f"INCOMPLETE: {len(done)} of {len(plan)} phases done"
              + (f" (stopped in {stopped} at the time limit)" if stopped else "")
              + f"; continue with the same command plus --resume (--out {out})", file=sys.stderr)
    else:
        print(f"done in {time.time() - started:.0f} s: {out / 'table.md'}", file=sys.stderr)
    return 0


def _run_phase(ctx, sub, kind, cfg, out, expert_io, stages):
    targets = list(cfg.domains.targets)
    if kind == "backbone":
        return stages.evaluate_backbone(ctx, sub)
    if kind == "expert":
        return stages.train_expert(ctx, sub, sub.path.name.removeprefix("expert-"))
    if kind in ("compose", "compose-frozen"):
        files = [out / f"expert-{d}" / f"expert-{d}.safetensors" for d in targets]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise UserError(f"phase {sub.path.name} needs the stage-1 experts; {missing[0]} is missing "
                            f"(run the expert phases first)")
        experts = expert_io.load_compatible(files, llama=ctx.llama, mode=_mode1(ctx),
                                            fingerprint=ctx.backbone.fingerprint, base=ctx.backbone.base)
        return stages.compose(ctx, sub, experts, freeze=kind == "compose-frozen")
    if kind == "uninit":
        return stages.uninit(ctx, sub, targets)
    return stages.finetune(ctx, sub, kind)


def _mode1(ctx):
    from mode_jax.pipeline.sources import mode_config
    return mode_config(ctx.cfg, 1)


def _report(out: Path, cfg, plan, results: dict, root) -> str | None:
    from mode_jax.pipeline import plots, report, runs

    ordered = [results[label] for label, _ in plan if label in results]
    if not ordered:
        return None
    domains = list(cfg.eval_domains)
    table = report.build_table(ordered, domains)
    table["config"] = cfg.to_dict()
    table["backbone"] = ordered[0].get("backbone")
    header = (f"Table 1 (Math+Code), ours on {table['backbone']} beside the paper's "
              f"(1.58B in-house backbone). Next-token accuracy, %.\n")
    md = report.write(out, table, header=header)
    curves = {}
    for label, _ in plan:
        metrics = runs.RunDir(out / label).metrics()
        pts = [(m["step"], m["loss"]) for m in metrics if m.get("phase") == label and "loss" in m]
        if pts:
            curves[label] = pts
    if plots.available():
        plots.loss_curves(curves, out / "loss_curves.png")
        plots.accuracy_bars(table, out / "accuracy.png")
        plots.routing(ordered, out / "routing.png")
    else:
        print("matplotlib is not installed: plots skipped (install it and rerun with --resume to draw them)",
              file=sys.stderr)
    root.write_result({"table": "table.json", "phases_done": [r["label"] for r in ordered]})
    return md


def _write_timing(out: Path, started: float, done, stopped) -> None:
    from mode_jax.atomic import write_text_atomic
    from mode_jax.integrity import strict_json
    path = out / "timing.json"
    calls = json.loads(path.read_text())["calls"] if path.is_file() else []
    calls.append({"seconds": round(time.time() - started, 1), "argv": sys.argv, "phases_done": done,
                  "stopped_in": stopped})
    write_text_atomic(path, strict_json({"calls": calls, "total_seconds": round(sum(c["seconds"] for c in calls), 1)},
                                         indent=2) + "\n")
