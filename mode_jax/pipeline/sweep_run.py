"""Running a sweep's grid (sweep.py): each run through the pipeline's stages, results appended.

    <out>/grid.toml                  the grid file of the latest call
    <out>/results.jsonl              one line per finished run (sweep.append_result)
    <out>/cells/<id>/run/            the run's directory (config, metrics.jsonl, checkpoints)
    <out>/experts/<key>/expert-<d>/  stage-1 experts, shared by every expert / mode / mode-frozen
                                     run whose stage-1 settings (and seed) are equal
    <out>/loras/<key>/lora-<d>/      per-domain LoRAs, shared likewise by lora-moe / lora-moe-frozen
                                     runs (pipeline/lora_moe.py)

A run killed mid-way continues from its directory's last checkpoint on the next call;
runs already in results.jsonl are skipped. Once a run is recorded its model and
checkpoints are deleted (unless keep_models): a grid of full fine-tunings would
otherwise fill the disk; experts are kept, later runs may compose them.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

from mode_jax.atomic import write_text_atomic
from mode_jax.errors import UserError
from mode_jax.pipeline import presets
from mode_jax.pipeline.sweep import GATED, Cell, Grid, append_result, identity, read_results, recorded_ids


def expert_config(cfg: presets.PipelineConfig) -> presets.PipelineConfig:
    """`cfg` with every key stage 1 does not read set to its default, so that runs which
    differ only in those share their experts (and the experts' run directories resume).
    An expert is trained on its own domain alone, so the mixture (domains.targets) is one
    of those keys: a Math+Code MoDE run and a Code-only expert run share the Code expert."""
    return dataclasses.replace(cfg, lora=presets.LoraSection(), domains=dataclasses.replace(cfg.domains, targets=()),
                               lr=dataclasses.replace(presets.LrSection(), mode=cfg.lr.mode),
                               train=dataclasses.replace(cfg.train, steps=presets.TrainSection().steps),
                               data=dataclasses.replace(cfg.data, train_examples=0),
                               mode=dataclasses.replace(cfg.mode, uninit_experts="random", gate_top_k=0, n_experts=0),
                               expansion=presets.ExpansionSection())


def _key(cfg: presets.PipelineConfig) -> str:
    return hashlib.sha256(json.dumps(_identity_with_dir(cfg), sort_keys=True).encode()).hexdigest()[:16]


def _identity_with_dir(cfg: presets.PipelineConfig) -> dict:
    # As before LATER_DEFAULTS existed (data.dir kept), so stage-1 experts already trained keep their key.
    config = identity(cfg)
    config["data"]["dir"] = cfg.data.dir
    return config


def check(grid: Grid) -> None:
    """Cheap checks of every run's inputs (data built, model fetched), before anything runs."""
    from mode_jax.pipeline import sources, stages
    seen = set()
    for cell in grid.cells:
        key = (cell.cfg.data, cell.cfg.model, cell.cfg.domains)
        if key not in seen:
            seen.add(key)
            cfg = sources.resolve_domains(cell.cfg)
            stages.check_inputs(cfg, cfg.eval_domains)


def run_grid(grid: Grid, out: Path, *, progress: bool = True, deadline: float | None = None,
             throttle: float = 0.0, keep_models: bool = False) -> tuple[int, int]:
    """Run every cell of `grid` not yet in <out>/results.jsonl. Returns (finished, total);
    finished < total when the deadline stopped it (rerun the same command to go on)."""
    from tqdm.auto import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "grid.toml", grid.path.read_text(encoding="utf-8"))
    done = set().union(*(recorded_ids(r) for r in read_results(out)))
    todo = [c for c in grid.cells if c.id not in done]
    finished = len(grid.cells) - len(todo)
    with tqdm(total=len(grid.cells), initial=finished, desc="cells", unit="run", disable=not progress,
              position=0, dynamic_ncols=True) as bar:
        for cell in todo:
            if deadline is not None and time.time() > deadline:
                break
            bar.set_postfix_str(f"{cell.name} seed {cell.seed}", refresh=True)
            record = run_cell(cell, out, progress=progress, deadline=deadline, throttle=throttle)
            if record is None:
                break
            append_result(out, record)
            gc.collect()            # the run's arrays (cycles included) go before the next one's
            if not keep_models:
                _drop_models(out / "cells" / cell.id)
            finished += 1
            bar.update(1)
    return finished, len(grid.cells)


def run_cell(cell: Cell, out: Path, *, progress: bool = True, deadline: float | None = None,
             throttle: float = 0.0) -> dict | None:
    """Train and evaluate one run; its record for results.jsonl, or None if the deadline stopped it.
    With cell.gate_analysis (not None), a gated run's gate analysis goes in its record."""
    from mode_jax.pipeline import expert_io, sources, stages

    cfg = sources.resolve_domains(cell.cfg)      # empty domains.targets: the data's domains
    began = time.time()
    ctx = stages.prepare(cfg, cfg.domains.targets, progress=progress)
    ctx.deadline, ctx.throttle = deadline, throttle
    targets = list(cfg.domains.targets)
    run_path = out / "cells" / cell.id / "run"
    done_before = (run_path / "result.json").is_file()      # finished by an earlier call, not recorded
    phases = {}
    if cell.method == "expert" and len(targets) != 1:
        raise UserError(f"{cell.name} (seed {cell.seed}): method expert trains one expert; set "
                        f"domains.targets to one domain (it is {targets})")
    if cell.method in ("expert", "mode", "mode-frozen"):
        ecfg = expert_config(cfg)
        ectx = dataclasses.replace(ctx, cfg=ecfg)
        edir = out / "experts" / _key(ecfg)
        for d in targets:
            res = _phase(ectx, edir / f"expert-{d}", "expert", lambda run, d=d: stages.train_expert(ectx, run, d))
            if res is None:
                return None
            phases[f"expert-{d}"] = res
        if cell.method == "expert":
            run_path = edir / f"expert-{targets[0]}"
            return _record(cell, cfg, phases.pop(f"expert-{targets[0]}"), phases, run_path.relative_to(out), began)
        files = [edir / f"expert-{d}" / f"expert-{d}.safetensors" for d in targets]
        experts = expert_io.load_compatible(files, llama=ctx.llama, mode=sources.mode_config(cfg, 1),
                                            fingerprint=ctx.backbone.fingerprint)
        main = _phase(ctx, run_path, cell.method,
                      lambda run: stages.compose(ctx, run, experts, freeze=cell.method == "mode-frozen"))
    elif cell.method == "btx":
        from mode_jax.pipeline import btx          # per-domain MLP branches (shared under <out>/branches/), then stage 2
        main = btx.sweep_cell(ctx, out, run_path, phases)
    elif cell.method in ("lora-moe", "lora-moe-frozen"):
        from mode_jax.pipeline import lora_moe     # per-domain LoRAs (shared under <out>/loras/), then stage 2
        main = lora_moe.sweep_cell(ctx, cell.method, out, run_path, phases)
    elif cell.method == "backbone":
        main = _phase(ctx, run_path, "backbone", lambda run: stages.evaluate_backbone(ctx, run))
    elif cell.method == "uninit":
        main = _phase(ctx, run_path, "uninit", lambda run: stages.uninit(ctx, run, targets))
    else:
        main = _phase(ctx, run_path, cell.method, lambda run: stages.finetune(ctx, run, cell.method))
    if main is None:
        return None
    from mode_jax.pipeline import sweep_gates
    gates = None
    if cell.gate_analysis is not None and cell.method in GATED:
        # in this process, on its context, while the run's model is still there (dropped once recorded)
        # a run an earlier call finished (its trace waited for this call) never waits again: progress
        gates = sweep_gates.analyse_cell(ctx, run_path, main, every=cell.gate_analysis,
                                         deadline=None if done_before else deadline)
        if gates is None:
            return None
    record = _record(cell, cfg, main, phases, run_path.relative_to(out), began)
    return record if gates is None else {**record, "gate_analysis": gates}


def _record(cell: Cell, cfg, main: dict, phases: dict, run_dir: Path, began: float) -> dict:
    return {"cell": cell.id, "name": cell.name, "method": cell.method, "seed": cell.seed,
            "settings": dict(cell.settings), "config": cfg.to_dict(), "label": main["label"],
            "result": main, "phases": phases, "run_dir": str(run_dir), "seconds": round(time.time() - began, 2)}


def _phase(ctx, path: Path, kind: str, fn):
    """A finished phase's result, or run it (continuing from its checkpoint if it was started)."""
    from mode_jax.pipeline import checkpoint, runs
    sub = runs.RunDir(path)
    if sub.is_done():
        return sub.result()
    if ctx.progress:
        print(f"== {path.parent.name}/{path.name} ({kind})", file=sys.stderr)
    resume = (path / runs.CONFIG).is_file()
    sub = runs.RunDir.create(path, ctx.cfg, kind=kind, resume=resume,
                             info={"sweep_phase": kind, "backbone_fingerprint": ctx.backbone.fingerprint})
    if resume and checkpoint.latest(sub.checkpoints) is None:
        # Killed before its first checkpoint: it starts again from step 0, so the lines it
        # logged are stale (train_loop trims them only when it restores a checkpoint).
        (sub.path / runs.METRICS).unlink(missing_ok=True)
    return fn(sub)


def _drop_models(cell_dir: Path) -> None:
    for path in cell_dir.rglob("*.safetensors"):
        path.unlink(missing_ok=True)
    for ckpt in cell_dir.rglob("checkpoints"):
        shutil.rmtree(ckpt, ignore_errors=True)
