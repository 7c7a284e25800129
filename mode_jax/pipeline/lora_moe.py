"""The LoRA-MoE baseline in the pipeline (ref/lora_moe.py): per-domain LoRAs, then a router.

    stage 1   one LoRA per domain: `finetune --method lora` on that domain alone
              (domains.targets = [D], train.stage1_steps steps in a sweep); its model.safetensors
              is the per-domain LoRA (expert_io's integrity-checked model format, method "lora")
    stage 2   `compose_loras`: the N LoRAs side by side on every adapted projection, one
              softmax router per layer (zero: a uniform mix at the start), trained on the
              mixture of their domains for train.steps steps at lr.lora; LoRAs and routers
              train (method lora_moe), or with `freeze` the routers only (lora_moe_frozen)

`load_loras` checks the files before anything trains: each is a LoRA model of this backbone
(fingerprint), trained on one domain, no two on the same domain, all with the LoRA shape
(rank, alpha, targets) the config's [lora] section names. `sweep_cell` runs both stages for
`mode-jax sweep`'s lora-moe / lora-moe-frozen cells, sharing each per-domain LoRA between the
cells (and seeds' reruns) whose stage-1 settings are equal, as MoDE's experts are shared.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp

from mode_jax.errors import UserError
from mode_jax.pipeline import expert_io, presets, stages
from mode_jax.ref.config import LoraConfig
from mode_jax.ref.methods import init_method


@dataclasses.dataclass
class DomainLora:
    domain: str
    adapters: dict           # ref/lora.py's {"layers": [{name: {"a": [in, R], "b": [R, out]}}] * L}
    lora: LoraConfig
    path: Path


def load_loras(paths, ctx: stages.Context) -> list[DomainLora]:
    """Read and check per-domain LoRA model files (see the module docstring); UserError names
    the file and what is wrong."""
    want = stages.lora_config(ctx.cfg)
    out = []
    for path in map(Path, paths):
        params, method, info = expert_io.load_model(path, ctx.backbone.params, fingerprint=ctx.backbone.fingerprint)
        if method != "lora":
            raise UserError(f"{path} is a {method} model, not a LoRA: train one per domain with "
                            f"`mode-jax finetune --method lora --set 'domains.targets=[\"D\"]'`")
        domains = info.get("domains") or []
        if len(domains) != 1:
            raise UserError(f"{path} is a LoRA trained on {len(domains)} domains {domains}; LoRA-MoE composes "
                            f"LoRAs trained on one domain each")
        lora = LoraConfig(**info["lora"])
        if lora != want:
            field = next(f for f in ("rank", "alpha", "targets") if getattr(lora, f) != getattr(want, f))
            raise UserError(f"{path}: lora.{field} is {getattr(lora, field)!r} in the file, "
                            f"{getattr(want, field)!r} in the config: set --set lora.{field}=... to match")
        out.append(DomainLora(domains[0], params["lora"], lora, path))
    seen = [d.domain for d in out]
    dup = sorted({d for d in seen if seen.count(d) > 1})
    if dup:
        raise UserError(f"two LoRAs for the same domain {dup[0]!r}: compose one LoRA per domain")
    return out


def lora_domains(paths) -> list[str]:
    """Each file's one domain, read from its checked metadata before the backbone is loaded
    (`load_loras` checks the rest)."""
    import json
    domains = []
    for path in map(Path, paths):
        if not path.is_file():
            raise UserError(f"LoRA file {path} does not exist")
        meta, _ = expert_io._read_checked(path, expert_io.MODEL_FORMAT, "a mode-jax model file")
        found = json.loads(meta.get("domains", "[]")) if meta.get("method") == "lora" else []
        if len(found) != 1:
            raise UserError(f"{path} is not a LoRA trained on one domain (method {meta.get('method')!r}, "
                            f"domains {found}): train one per domain with `mode-jax finetune --method lora`")
        domains.append(found[0])
    return domains


def compose_loras(ctx: stages.Context, run, loras: list[DomainLora], *, freeze: bool) -> dict | None:
    """Stage 2 on the mixture of the LoRAs' domains; writes model.safetensors and result.json.
    None if stopped early (resumable)."""
    cfg = ctx.cfg
    method = "lora_moe_frozen" if freeze else "lora_moe"
    lora = stages.lora_config(cfg)
    stage1 = [{"backbone": ctx.backbone.params, "lora": jax.tree.map(jnp.asarray, d.adapters)} for d in loras]
    params = init_method(method, jax.random.key(cfg.train.seed), ctx.backbone.params, ctx.llama, lora=lora,
                         stage1=stage1)
    label = f"lora-moe-{len(loras)}x" + ("-frozen" if freeze else "")
    return stages._finish_mixture(ctx, run, label, method, params, [d.domain for d in loras], cfg.lr.lora,
                                  {"loras": [str(d.path) for d in loras],
                                   "router_columns": [d.domain for d in loras]}, lora=lora)


# ----------------------------------------------------------------------------- sweeps

def stage1_config(cfg: presets.PipelineConfig) -> presets.PipelineConfig:
    """`cfg` with every key a per-domain LoRA does not read at its default, so that runs
    differing only in those share their stage-1 LoRAs (MoDE's layout, the other learning
    rates, the mixture and its step count)."""
    data = cfg.data
    if hasattr(data, "train_examples"):         # the mixture's subset is stage 2's, not stage 1's
        data = dataclasses.replace(data, train_examples=0)
    return dataclasses.replace(cfg, mode=presets.ModeSection(), data=data,
                               domains=dataclasses.replace(cfg.domains, targets=()),
                               lr=dataclasses.replace(presets.LrSection(), lora=cfg.lr.lora),
                               train=dataclasses.replace(cfg.train, steps=presets.TrainSection().steps))


def domain_config(cfg: presets.PipelineConfig, domain: str) -> presets.PipelineConfig:
    """The config `finetune --method lora` trains `domain`'s stage-1 LoRA with: that domain
    alone, for train.stage1_steps steps (on data.stage1_examples rows, where set)."""
    base = stage1_config(cfg)
    data = base.data
    if hasattr(data, "stage1_examples"):
        data = dataclasses.replace(data, train_examples=data.stage1_examples)
    return dataclasses.replace(base, data=data, domains=dataclasses.replace(base.domains, targets=(domain,)),
                               train=dataclasses.replace(base.train, steps=base.train.stage1_steps))


def sweep_cell(ctx: stages.Context, method: str, out: Path, run_path: Path, phases: dict) -> dict | None:
    """A sweep's lora-moe / lora-moe-frozen run: the per-domain LoRAs under
    <out>/loras/<key>/lora-<domain>/ (trained once, shared), then stage 2 in `run_path`. Each
    stage-1 result goes into `phases`. None if the deadline stopped it."""
    from mode_jax.pipeline.sweep_run import _key, _phase

    root = Path(out) / "loras" / _key(stage1_config(ctx.cfg))
    files = []
    for d in ctx.cfg.domains.targets:
        dctx = dataclasses.replace(ctx, cfg=domain_config(ctx.cfg, d))
        res = _phase(dctx, root / f"lora-{d}", "lora", lambda run, dctx=dctx: stages.finetune(dctx, run, "lora"))
        if res is None:
            return None
        phases[f"lora-{d}"] = res
        files.append(root / f"lora-{d}" / "model.safetensors")
    loras = load_loras(files, ctx)
    return _phase(ctx, run_path, method,
                  lambda run: compose_loras(ctx, run, loras, freeze=method == "lora-moe-frozen"))
