"""The Branch-Train-MiX baseline in the pipeline (ref/btx.py): per-domain MLP branches, then
a top-2 mixture of MLP experts in every layer.

    stage 1   `train_branch`: the backbone with every layer's MLP a trainable copy (method
              btx_branch), trained on one domain alone for train.stage1_steps steps (on
              data.stage1_examples rows, where set) at lr.full (the copies are pretrained
              weights, fine-tuned as full fine-tuning fine-tunes them); writes
              <run>/model.safetensors (expert_io's integrity-checked model format, method
              "btx_branch", its domain in the metadata)
    stage 2   `compose_branches`: per layer the seed MLP and the N branch MLPs as experts with
              a top-2 router (ref.btx.init_mix), trained on the mixture of the branches'
              domains for train.steps steps at lr.full; experts and routers train (method btx),
              the load-balancing loss (alpha 0.01) joins the objective

`load_branches` checks the files before anything trains: each a btx_branch model of this
backbone (fingerprint), of one domain, no two on the same domain. `sweep_cell` runs both
stages for `mode-jax sweep`'s btx cells, sharing each branch between cells (and reruns)
whose stage-1 settings are equal, as MoDE's experts are shared (<out>/branches/<key>/).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp

from mode_jax.errors import UserError
from mode_jax.pipeline import expert_io, presets, stages
from mode_jax.ref.methods import init_method


@dataclasses.dataclass
class Branch:
    domain: str
    btx: dict                # ref/btx.py's {"layers": [{"mlps": [{"w_gate", "w_up", "w_down"}]}] * L}
    path: Path


def branch_domains(paths) -> list[str]:
    """Each branch file's one domain, read from its checked metadata before the backbone is
    loaded (`load_branches` checks the rest)."""
    infos = [(path, *expert_io.model_info(path)) for path in paths]
    bad = next(((p, m, i.get("domains")) for p, m, i in infos if m != "btx_branch" or len(i.get("domains") or []) != 1),
               None)
    if bad:
        raise UserError(f"{bad[0]} is not a BTX branch of one domain (method {bad[1]!r}, domains {bad[2]}): "
                        "train one per domain with `mode-jax btx branch --domain D`")
    return [i["domains"][0] for _, _, i in infos]


def load_branches(paths, ctx: stages.Context) -> list[Branch]:
    """Read and check branch files (see the module docstring); UserError names the file."""
    out = []
    for path in map(Path, paths):
        params, method, info = expert_io.load_model(path, ctx.backbone.params, fingerprint=ctx.backbone.fingerprint)
        domains = info.get("domains") or []
        if method != "btx_branch" or len(domains) != 1:
            raise UserError(f"{path} is a {method} model of domains {domains}, not a BTX branch of one domain")
        layers = params["btx"]["layers"]
        if len(layers) != ctx.llama.n_layers:
            raise UserError(f"{path} holds {len(layers)} MLP layers, the backbone has {ctx.llama.n_layers}")
        out.append(Branch(domains[0], params["btx"], path))
    seen = [b.domain for b in out]
    dup = sorted({d for d in seen if seen.count(d) > 1})
    if dup:
        raise UserError(f"two BTX branches for the same domain {dup[0]!r}: compose one branch per domain")
    return out


def branch_config(cfg: presets.PipelineConfig, domain: str) -> presets.PipelineConfig:
    """The config a branch trains with: `domain` alone, train.stage1_steps steps on
    data.stage1_examples rows (where set); every key stage 1 does not read at its default
    (MoDE's stage-1 rule, `sweep_run.expert_config`, with lr.full kept instead of lr.mode)."""
    from mode_jax.pipeline.sweep_run import expert_config
    base = expert_config(cfg)
    return dataclasses.replace(
        base, lr=dataclasses.replace(presets.LrSection(), full=cfg.lr.full),
        domains=dataclasses.replace(base.domains, targets=(domain,)),
        data=dataclasses.replace(base.data, train_examples=cfg.data.stage1_examples),
        train=dataclasses.replace(base.train, steps=cfg.train.stage1_steps))


def train_branch(ctx: stages.Context, run, domain: str) -> dict | None:
    """Stage 1 on `domain` (ctx.cfg as `branch_config` makes it, or as given); writes
    model.safetensors and result.json. None if stopped early (resumable)."""
    params = init_method("btx_branch", jax.random.key(ctx.cfg.train.seed), ctx.backbone.params, ctx.llama)
    return stages._finish_mixture(ctx, run, f"btx-branch-{domain}", "btx_branch", params, [domain],
                                  ctx.cfg.lr.full, {"domain": domain})


def compose_branches(ctx: stages.Context, run, branches: list[Branch]) -> dict | None:
    """Stage 2 on the mixture of the branches' domains; writes model.safetensors and
    result.json (routing columns: seed, then the domains). None if stopped early."""
    cfg = ctx.cfg
    stage1 = [{"btx": jax.tree.map(jnp.asarray, b.btx)} for b in branches]   # tensors arrive as numpy
    params = init_method("btx", jax.random.key(cfg.train.seed), ctx.backbone.params, ctx.llama, stage1=stage1)
    domains = [b.domain for b in branches]
    return stages._finish_mixture(ctx, run, f"btx-{len(branches)}x", "btx", params, domains, cfg.lr.full,
                                  {"branches": [str(b.path) for b in branches], "routing_columns": ["seed", *domains]})


# ----------------------------------------------------------------------------- sweeps

def sweep_cell(ctx: stages.Context, out: Path, run_path: Path, phases: dict) -> dict | None:
    """A sweep's btx run: the branches under <out>/branches/<key>/btx-<domain>/ (trained once,
    shared), then stage 2 in `run_path`. Each stage-1 result goes into `phases`. None if the
    deadline stopped it."""
    from mode_jax.pipeline.sweep_run import _key, _phase

    files = []
    for d in ctx.cfg.domains.targets:
        bcfg = branch_config(ctx.cfg, d)
        bctx = dataclasses.replace(ctx, cfg=bcfg)
        where = Path(out) / "branches" / _key(bcfg)
        res = _phase(bctx, where / f"btx-{d}", "btx-branch", lambda run, d=d, bctx=bctx: train_branch(bctx, run, d))
        if res is None:
            return None
        phases[f"btx-branch-{d}"] = res
        files.append(where / f"btx-{d}" / "model.safetensors")
    branches = load_branches(files, ctx)
    return _phase(ctx, run_path, "btx", lambda run: compose_branches(ctx, run, branches))
