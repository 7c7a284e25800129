"""Command-line options shared by the training and evaluation commands.

Every command takes its configuration as a preset or a TOML file plus flags;
the convenience flags (--steps, --lr, ...) are shorthands for `--set` overrides,
so one mechanism resolves them all.
"""

from __future__ import annotations

import argparse
import sys
import time

from mode_jax import distributed
from mode_jax.pipeline import presets

CONFIG_HELP = """configuration: --preset NAME (configs/NAME.toml: smoke, cpu, gpu) or --config FILE,
then --set section.key=value overrides (see configs/*.toml for every key)."""


def add_config_args(p: argparse.ArgumentParser, *, default_preset: str | None = "cpu") -> None:
    g = p.add_argument_group("configuration")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--preset", default=None,
                     help=f"a preset from configs/ (smoke, cpu, gpu){f'; default {default_preset}' if default_preset else ''}")
    src.add_argument("--config", default=None, metavar="FILE", help="a TOML config file (e.g. a run's config.toml)")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key, e.g. --set train.steps=20 (repeatable)")
    g.add_argument("--data-dir", default=None, help="built data directory (= --set data.dir=...)")
    g.add_argument("--model", default=None, help="backbone: a fetched model name, a .gguf path, a Hugging Face directory "
                        "(config.json, *.safetensors, tokenizer.json), or 'tiny'")
    g.add_argument("--seed", type=int, default=None, help="= --set train.seed=N")
    p.set_defaults(default_preset=default_preset)


def add_steps_arg(p: argparse.ArgumentParser, key: str = "train.steps") -> None:
    """`--steps N`, the same as `--set KEY=N` (config_from_args applies it)."""
    p.add_argument("--steps", type=int, default=None, help=f"training steps (= --set {key}=N)")
    p.set_defaults(steps_key=key)


def add_run_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run directory")
    g.add_argument("--out", default=None, metavar="DIR",
                   help="run directory (default runs/<command>-<time>); holds config.toml, metrics.jsonl, "
                        "checkpoints/ and the results")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint (same config, except the "
                        "learning rates and other optimizer settings, which may change)")
    g.add_argument("--keep-checkpoints", action="store_true",
                   help="keep a phase's checkpoints once its artifact is written (default: deleted then; "
                        "while it trains only the newest is kept)")
    g.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                   help="stop training after this many seconds, with a checkpoint; rerun with --resume to go on")
    g.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    # Testing kill-and-resume: sleep after each training step so a test can kill mid-run.
    g.add_argument("--throttle", type=float, default=0.0, help=argparse.SUPPRESS)
    distributed.add_mesh_args(p)      # --mesh / --placement (see `parallelism`)


def parallelism(args):
    """What --mesh / --placement (and the multi-process flags) ask for: None (the default:
    one device) or a `mode_jax.distributed.Parallelism`. Starts jax.distributed when asked.
    Bad flags raise UserError before anything is loaded."""
    asked = [getattr(args, k, None) for k in ("mesh", "placement", "coordinator")]
    if not any(asked):
        return None
    from mode_jax.errors import UserError
    try:
        return distributed.mesh_from_args(args)
    except ValueError as err:
        raise UserError(str(err)) from None


def start(ctx, args, deadline) -> None:
    """The run-time settings of a training command's context: time limit, throttle, parallelism."""
    ctx.deadline, ctx.throttle = deadline, args.throttle
    ctx.keep_checkpoints = args.keep_checkpoints
    ctx.parallelism = parallelism(args)
    if ctx.parallelism is not None and not args.quiet:
        print(f"parallelism: {ctx.parallelism.describe()}", file=sys.stderr)


def start_processes(args) -> None:
    """jax.distributed for a multi-process run (--coordinator, or the environment): it must
    start before anything touches a device, and loading the backbone does, so every
    command calls this first (through config_from_args). A no-op for one process."""
    from mode_jax import distributed
    from mode_jax.errors import UserError
    try:
        distributed.initialize(getattr(args, "coordinator", None), getattr(args, "num_processes", None),
                               getattr(args, "process_id", None))
    except ValueError as err:
        raise UserError(str(err)) from None


def config_from_args(args) -> presets.PipelineConfig:
    start_processes(args)
    overrides = list(args.overrides)
    if getattr(args, "data_dir", None):
        overrides.append(f"data.dir={presets._toml_value(args.data_dir)}")
    if getattr(args, "model", None):
        overrides.append(f"model.source={presets._toml_value(args.model)}")
    if getattr(args, "seed", None) is not None:
        overrides.append(f"train.seed={args.seed}")
    if getattr(args, "steps_key", None) and args.steps is not None:
        overrides.append(f"{args.steps_key}={args.steps}")
    preset = args.preset or (None if args.config else args.default_preset)
    cfg = presets.load_config(preset=preset, config=args.config, overrides=overrides)
    from mode_jax.pipeline.sources import resolve_domains   # empty domains.targets: the data's domains
    return resolve_domains(cfg)


def deadline(args) -> float | None:
    limit = getattr(args, "time_limit", None)
    if limit is None:
        return None
    if limit <= 0:
        from mode_jax.errors import UserError
        raise UserError(f"--time-limit must be > 0 seconds, got {limit}")
    return time.time() + limit


def open_run(args, cfg, ctx, *, kind: str, out_name: str, info: dict):
    """The command's run directory (--out, else runs/<out_name>-<time>), its info plus
    the backbone's name and fingerprint; None when it already holds a finished run, whose
    summary is then printed."""
    from mode_jax.pipeline import runs
    run_dir = runs.RunDir.create(args.out or runs.default_out(out_name), cfg, kind=kind, resume=args.resume,
                                 info={**info, "backbone": ctx.backbone.name,
                                       "backbone_fingerprint": ctx.backbone.fingerprint})
    if run_dir.is_done():
        print(summary(run_dir.result()))
        return None
    return run_dir


def summary(result: dict) -> str:
    """One line: the run's label and accuracy/loss per evaluated domain."""
    parts = [f"{d} acc {100 * v['accuracy']:.2f}% loss {v['loss']:.3f}" for d, v in result["domains"].items()]
    return f"{result['label']}: " + ", ".join(parts)


def report(run_dir, result: dict | None, file_key: str, *, command: str | None = None) -> int:
    """End of a training command: the summary and the artifact's path, or, when the time
    limit stopped the run (result None), how to continue it (`command`, or else the
    same command line)."""
    if result is None:
        how = f"continue with: {command}" if command else "rerun the same command with"
        print(f"stopped at the time limit; {how} --out {run_dir.path} --resume", file=sys.stderr)
        return 0
    print(summary(result))
    print(run_dir.path / result[file_key])
    return 0
