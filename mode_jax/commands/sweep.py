"""`mode-jax sweep GRID.toml`: a grid of runs (methods x settings x seeds) in one process;
`mode-jax sweep report DIR`: its table with 95% intervals and paired differences, and plots.

The grid format is in docs/sweep.md (examples: configs/sweeps/*.toml). Every run's config
is built and checked before anything runs; a finished run is appended to
<out>/results.jsonl with its config and per-document results; the same command again
skips finished runs and continues an interrupted one from its last checkpoint.

    mode-jax sweep configs/sweeps/smoke.toml --out runs/sweep-smoke
    mode-jax sweep report runs/sweep-smoke --baseline full
    mode-jax sweep report runs/sweep-figure3-examples --x data.train_examples,data.stage1_examples
    mode-jax sweep report runs/sweep-main --grid configs/sweeps/table1-gpu.toml   # one grid of a shared --out
"""

from __future__ import annotations

import argparse
import sys
import time
import tomllib
from pathlib import Path

from mode_jax.errors import UserError


def register(sub) -> None:
    p = sub.add_parser("sweep", help="a grid of runs (methods x settings x seeds), resumable; "
                       "`sweep report DIR`: table with intervals and plots",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("grid", metavar="GRID.toml", help="the grid file, or `report` to report on DIR")
    p.add_argument("dir", nargs="?", default=None, metavar="DIR", help="(report) the sweep's output directory")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="output directory (default runs/sweep-<grid name>); rerun with the same one to resume")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a config key for every run, e.g. --set data.dir=/data (repeatable; over sweep.set, "
                        "under the cells' own keys)")
    p.add_argument("--compile-cache", default=None, metavar="DIR",
                   help="JAX persistent compilation cache (default <out>/jax-cache)")
    p.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                   help="stop cleanly (checkpoint written) after this many seconds; rerun to go on")
    p.add_argument("--keep-models", action="store_true",
                   help="keep each run's model and checkpoints (default: deleted once its result is recorded)")
    p.add_argument("--dry-run", action="store_true", help="list the runs and exit")
    p.add_argument("--baseline", action="append", default=None, metavar="CELL",
                   help="(report) a cell the others are compared with, paired (repeatable; default: the "
                        "grid's sweep.baseline)")
    p.add_argument("--n-boot", type=int, default=None, metavar="N", help="(report) bootstrap replicates (default 2000)")
    p.add_argument("--x", default=None, metavar="KEY",
                   help="(report) also curves.md and curves.png: accuracy against config KEY, one line per "
                        "series (the cell name without KEY's setting), e.g. data.train_examples, lora.rank, "
                        "mode.expert_layers; several comma-separated (a cell's x is the first it varies); "
                        "`params`: trained parameters (series: names without their numeric settings)")
    p.add_argument("--avg", default=None, metavar="DOMAINS",
                   help="(report) the avg column over these evaluated domains, comma-separated (default: "
                        "every evaluated domain), e.g. math,code,english: the paper's average")
    p.add_argument("--grid", dest="grid_file", default=None, metavar="GRID.toml",
                   help="(report) only this grid's runs (by run id, named as it names them; --set as when "
                        "it ran), written to DIR/report-<grid name>/: grids that share runs run into one "
                        "--out and report apart")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    p.add_argument("--throttle", type=float, default=0.0, help=argparse.SUPPRESS)   # kill/resume tests
    p.set_defaults(func=run)


def run(args) -> int:
    if args.grid == "report":
        return _report(args)
    if args.dir is not None:
        raise UserError(f"unexpected argument {args.dir!r} (did you mean `mode-jax sweep report {args.dir}`?)")
    from mode_jax.pipeline import sweep, sweep_run

    grid = sweep.load_grid(args.grid, args.overrides)
    if args.time_limit is not None and args.time_limit <= 0:
        raise UserError(f"--time-limit must be > 0 seconds, got {args.time_limit}")
    if args.dry_run:
        for cell in grid.cells:
            print(f"{cell.id}  {cell.name}  seed {cell.seed}")
        print(f"{len(grid.cells)} runs", file=sys.stderr)
        return 0
    sweep_run.check(grid)
    out = Path(args.out or Path("runs") / f"sweep-{Path(args.grid).stem}")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    _compile_cache(Path(args.compile_cache) if args.compile_cache else out / "jax-cache")
    deadline = None if args.time_limit is None else time.time() + args.time_limit
    started = time.time()
    done, total = sweep_run.run_grid(grid, out, progress=not args.quiet, deadline=deadline,
                                     throttle=args.throttle, keep_models=args.keep_models)
    if done < total:
        print(f"INCOMPLETE: {done} of {total} runs in {out / sweep.RESULTS}; rerun the same command to go on",
              file=sys.stderr)
    else:
        print(f"done: {total} runs in {out / sweep.RESULTS} ({time.time() - started:.0f} s this call); "
              f"`mode-jax sweep report {out}` writes the table", file=sys.stderr)
    return 0


def _compile_cache(path: Path) -> None:
    """Compiled executables persist across processes (a resumed sweep, the next session's
    call on a warm machine): here, at the command level, never at import."""
    import jax
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))


def _report(args) -> int:
    from mode_jax.pipeline import sweep, sweep_report

    if args.dir is None:
        raise UserError("`mode-jax sweep report` needs the sweep's output directory: mode-jax sweep report DIR")
    out = Path(args.dir)
    if not out.is_dir():
        raise UserError(f"sweep directory {out} does not exist")
    if args.n_boot is not None and args.n_boot < 100:
        raise UserError(f"--n-boot must be >= 100, got {args.n_boot}")
    baseline, records, dest = args.baseline, None, out
    if args.grid_file is not None:
        grid = sweep.load_grid(args.grid_file, args.overrides)
        records = sweep_report.for_grid(sweep.read_results(out), grid)
        if not records:
            raise UserError(f"{out} holds no finished run of {args.grid_file}'s {len(grid.cells)} runs")
        dest = out / f"report-{grid.path.stem}"
        dest.mkdir(exist_ok=True)
        baseline = baseline if baseline is not None else grid.baseline
    elif baseline is None and (out / "grid.toml").is_file():
        baseline = tomllib.loads((out / "grid.toml").read_text(encoding="utf-8")).get("sweep", {}).get("baseline")
    avg = None if args.avg is None else [d.strip() for d in args.avg.split(",") if d.strip()]
    md = sweep_report.write(dest, baseline=baseline, x=args.x, records=records, avg=avg,
                            **({"n_boot": args.n_boot} if args.n_boot else {}))
    print(md)
    print(f"wrote {dest / 'table.md'}" + (f" and {dest / 'curves.md'}" if args.x is not None else ""), file=sys.stderr)
    return 0
