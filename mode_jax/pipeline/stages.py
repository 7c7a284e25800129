"""The workflow's steps, each on its own run directory (paper section 3.1 and 4.1).

    train_expert   stage 1: one expert (N = 1) on one domain, backbone frozen -> expert file
    compose        stage 2: N expert files + a gate of N + 1 outputs on the mixture of their
                   domains; experts and gates train, or (freeze) gates only
    uninit         stage 2 without stage 1: N random experts on the mixture
    finetune       baselines on the same mixture and token budget: full FT, LoRA, block expansion
    evaluate       next-token loss / accuracy per domain (retention included), routing

`prepare` checks every input (domains, data, model, tokenizer) and loads them; it
writes nothing, so a command can call it before creating its run directory.
Every step ends by writing `result.json` (evaluation, parameter counts, timings).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Any

import jax
import numpy as np

from mode_jax.data.mixture import MixtureSampler
from mode_jax.errors import UserError
from mode_jax.fast import steps as fast_steps
from mode_jax.fast.steps import Steps
from mode_jax.pipeline import checkpoint, engine, expert_io, sources
from mode_jax.pipeline.presets import PipelineConfig
from mode_jax.pipeline.runs import RunDir
from mode_jax.ref.config import LoraConfig, OptimConfig
from mode_jax.ref.methods import init_method


@dataclasses.dataclass
class Context:
    cfg: PipelineConfig
    backbone: sources.Backbone
    data: sources.DomainData
    eval_sets: dict[str, np.ndarray]     # domain -> int32 [n, seq_len + 1]
    progress: bool = True
    deadline: float | None = None        # time.time() after which training stops (resumable)
    throttle: float = 0.0                # seconds to sleep after each step (tests of kill/resume)
    parallelism: Any = None              # mode_jax.distributed.Parallelism (--mesh / --placement) or None
    keep_checkpoints: bool = False       # --keep-checkpoints: a finished phase keeps its checkpoints
    separator: int | None = None         # the EOS between packed documents (left out of per-unit counts)
    eval_documents: dict | None = None   # domain -> (document id of every eval target [n, T], unit)
    eval_answers: dict | None = None     # domain -> bool [n, T]: answer targets of question/answer domains

    @property
    def llama(self):
        return self.backbone.config


def check_inputs(cfg: PipelineConfig, domains) -> None:
    """Cheap checks, before anything is loaded or written."""
    sources.check_in_data(cfg, domains)
    if cfg.data.source == "built":
        from mode_jax.data.store import read_manifest, split_entry
        root = sources.data_dir(cfg)
        manifest = read_manifest(root)
        held_out = "validation" if cfg.data.eval_split == "validation" else "test"
        for d in domains:
            for split in ("train", held_out):
                split_entry(manifest, root, d, split)
        from mode_jax.data.subset import check_examples
        for d in cfg.domains.targets:       # a training subset must fit each trained domain
            tokens = split_entry(manifest, root, d, "train")["tokens"]
            for n in (cfg.data.train_examples, cfg.data.stage1_examples):
                check_examples(d, tokens, cfg.data.seq_len, n)
    sources.check_model_available(cfg)
    sources.check_tokenizer_matches(cfg)


def prepare(cfg: PipelineConfig, domains=None, *, progress: bool = True) -> Context:
    """Check inputs and load data + backbone (train domains plus every eval domain)."""
    domains = tuple(dict.fromkeys(tuple(domains or ()) + cfg.eval_domains))
    check_inputs(cfg, domains)
    data = sources.load_data(cfg, domains)
    backbone = sources.load_backbone(cfg, data.vocab_size, progress=progress)
    held_out = sources.eval_streams(cfg, data, cfg.eval_domains)     # data.eval_split: test or validation
    eval_sets = {d: sources.eval_rows(held_out[d], cfg.data.seq_len, cfg.data.eval_sequences, domain=d)
                 for d in cfg.eval_domains}
    from mode_jax.pipeline import eval_units
    separator = eval_units.separator_id(cfg)
    documents = {d: eval_units.document_ids(held_out[d], rows, cfg.data.seq_len, separator)
                 for d, rows in eval_sets.items()}
    from mode_jax.pipeline.answers import eval_answer_masks
    answers = eval_answer_masks(cfg, held_out, eval_sets, separator)
    return Context(cfg, backbone, data, eval_sets, progress, separator=separator, eval_documents=documents,
                   eval_answers=answers)


def optim(cfg: PipelineConfig, lr: float, steps: int) -> OptimConfig:
    t = cfg.train
    return OptimConfig(learning_rate=lr, warmup_steps=min(t.warmup_steps, steps - 1), total_steps=steps,
                       min_lr_ratio=t.min_lr_ratio, weight_decay=t.weight_decay, clip_norm=t.clip_norm)


def lora_config(cfg: PipelineConfig) -> LoraConfig:
    return LoraConfig(rank=cfg.lora.rank, alpha=cfg.lora.alpha, targets=cfg.lora.targets)


def _sampler(ctx: Context, domains, batch_size: int, examples: int = 0) -> MixtureSampler:
    """Batches from the domains' train streams, or (examples > 0) from a fixed subset of
    that many rows of each (data/subset.py), cycled for as many steps as asked."""
    from mode_jax.data.subset import subset_rows
    seq_len = ctx.cfg.data.seq_len
    arrays = {d: subset_rows(ctx.data.train[d], seq_len, examples, domain=d) if examples else ctx.data.train[d]
              for d in domains}
    return MixtureSampler(arrays, batch_size=batch_size, seq_len=seq_len, seed=ctx.cfg.train.seed)


# Top-k gating (mode.gate_top_k) applies where N experts are mixed; stage 1 (one expert) stays dense.
TOP_K_METHODS = ("stage2", "stage2_frozen", "uninit")


def gate_top_k(cfg, method: str) -> int | None:
    """The top-k of `method`'s gate under `cfg` (None: dense, as every other method is)."""
    return (cfg.mode.gate_top_k or None) if method in TOP_K_METHODS else None


def make_steps(ctx: Context, method: str, *, opt: OptimConfig, lora: LoraConfig | None = None,
               params_like: dict | None = None, parallel: bool = True) -> Steps:
    """The steps of `method` as the config and `--mesh` / `--placement` (unless not `parallel`)
    ask for (fast.steps.make_steps picks the backend); a layout that does not fit the model
    is a UserError, raised before anything compiles."""
    cfg = ctx.cfg
    parallelism = ctx.parallelism if parallel else None
    try:
        return fast_steps.make_steps(method, ctx.llama, opt=opt, lora=lora, compute_dtype=cfg.model.compute_dtype,
                                     layer_loop=cfg.model.layer_loop, backend=cfg.model.backend,
                                     expert_layers=cfg.mode.expert_layers, parallelism=parallelism,
                                     params_like=params_like, batch_size=cfg.train.batch_size,
                                     seq_len=cfg.data.seq_len,
                                     gate_top_k=gate_top_k(cfg, method))
    except ValueError as err:
        if parallelism is None:
            raise
        raise UserError(str(err)) from None


def check_parallelism(ctx: Context, method: str, n_experts: int) -> None:
    """Build (not compile) the sharded step `--mesh` / `--placement` ask for, on the shapes of
    a `method` model with `n_experts`, so a layout that does not fit the model is refused
    before a run directory is written. A no-op on one device or for unsharded methods."""
    if ctx.parallelism is None or not fast_steps.shardable(method):
        return
    mode = sources.mode_config(ctx.cfg, n_experts)
    like = jax.eval_shape(lambda b: init_method("uninit", jax.random.key(0), b, ctx.llama, mode=mode),
                          ctx.backbone.params)
    make_steps(ctx, method, opt=OptimConfig(), params_like=like)


def _train(ctx: Context, run: RunDir, *, phase: str, params: dict, method: str, domains, lr: float,
           total_steps: int, lora: LoraConfig | None = None, examples: int = 0) -> engine.TrainOutcome:
    cfg = ctx.cfg
    steps = make_steps(ctx, method, opt=optim(cfg, lr, total_steps), lora=lora, params_like=params)
    if ctx.parallelism is not None and steps.backend not in ("spmd", "mpmd") and ctx.progress:
        print(f"{phase}: {method} trains on one device (--mesh / --placement shard MoDE training)",
              file=sys.stderr)
    sampler = _sampler(ctx, domains, cfg.train.batch_size, examples)
    return engine.train_loop(run, phase=phase, params=params, method=method, steps=steps,
                             batch_fn=sampler.batch, total_steps=total_steps,
                             checkpoint_every=cfg.train.checkpoint_every, log_every=cfg.train.log_every,
                             seed=cfg.train.seed, progress=ctx.progress, deadline=ctx.deadline,
                             throttle=ctx.throttle)


def evaluate_params(ctx: Context, params: dict, *, method: str, desc: str) -> dict[str, Any]:
    lora = lora_config(ctx.cfg) if "lora" in params or "lora_moe" in params else None
    steps = make_steps(ctx, method, opt=OptimConfig(), lora=lora, parallel=False)
    start = time.perf_counter()
    per_domain = engine.evaluate(steps, params, ctx.eval_sets, batch_size=ctx.cfg.data.eval_batch_size,
                                 progress=ctx.progress, desc=desc, separator=ctx.separator,
                                 documents=ctx.eval_documents, answers=ctx.eval_answers)
    return {"domains": per_domain, "eval_seconds": round(time.perf_counter() - start, 2),
            "backend": steps.backend}


def _result(ctx: Context, run: RunDir, *, label: str, method: str, params: dict, outcome, extra=None) -> dict:
    total = engine.param_count(params)
    result = {"label": label, "method": method, "params_total": total,
              "params_trainable": outcome.trainable_params if outcome else 0,
              "params_backbone": engine.param_count(ctx.backbone.params),
              "train_steps": outcome.steps_done if outcome else 0,
              "train_seconds": round(outcome.seconds, 2) if outcome else 0.0,
              "backbone": ctx.backbone.name, "backbone_fingerprint": ctx.backbone.fingerprint,
              "base_model": ctx.backbone.base,
              "mode_defaults_used": dataclasses.asdict(ctx.cfg.mode), **(extra or {})}
    result.update(evaluate_params(ctx, params, method=method, desc=f"eval {label}"))
    run.write_result(result)
    if not ctx.keep_checkpoints:
        # The phase is finished (artifact and result written): its training state is no
        # longer needed to resume, and on a real model it is the bulk of the run's size.
        checkpoint.delete_all(run.checkpoints)
    return result


def _training_info(ctx: Context, method: str, domains, steps: int) -> dict[str, Any]:
    c = ctx.cfg
    return {"method": method, "domains": list(domains), "steps": steps, "batch_size": c.train.batch_size,
            "seq_len": c.data.seq_len, "tokens": steps * c.train.batch_size * c.data.seq_len,
            "seed": c.train.seed}


def train_expert(ctx: Context, run: RunDir, domain: str) -> dict | None:
    """Stage 1 on `domain`; writes <run>/expert-<domain>.safetensors. None if stopped early."""
    cfg = ctx.cfg
    mode = sources.mode_config(cfg, 1)
    params = init_method("stage1", jax.random.key(cfg.train.seed), ctx.backbone.params, ctx.llama, mode=mode)
    out = _train(ctx, run, phase=f"expert-{domain}", params=params, method="stage1", domains=(domain,),
                 lr=cfg.lr.mode, total_steps=cfg.train.stage1_steps, examples=cfg.data.stage1_examples)
    if not out.finished:
        return None
    info = _training_info(ctx, "stage1", (domain,), cfg.train.stage1_steps)
    expert = expert_io.from_stage1(out.params, domain=domain, llama=ctx.llama, mode=mode,
                                   fingerprint=ctx.backbone.fingerprint, training=info, base=ctx.backbone.base)
    path = run.path / f"expert-{domain}.safetensors"
    if run.writer:      # process 0 of a multi-process run writes the files
        expert_io.save_expert(path, expert)
    return _result(ctx, run, label=f"expert-{domain}", method="stage1", params=out.params, outcome=out,
                   extra={"expert_file": path.name, "domain": domain, "routing_columns": ["backbone", domain]})


def compose(ctx: Context, run: RunDir, experts: list[expert_io.Expert], *, freeze: bool) -> dict | None:
    """Stage 2 on the mixture of the experts' domains (gates only if `freeze`)."""
    cfg = ctx.cfg
    method = "stage2_frozen" if freeze else "stage2"
    domains = [e.domain for e in experts]
    stage1 = [e.stage1_model(ctx.backbone.params) for e in experts]
    params = init_method(method, jax.random.key(cfg.train.seed), ctx.backbone.params, ctx.llama,
                         mode=sources.mode_config(cfg, len(experts)), stage1=stage1,
                         gate_from=cfg.mode.stage2_gate_from)
    params = jax.tree.map(jax.numpy.asarray, params)       # expert tensors arrive as numpy
    label = f"mode-{len(experts)}x" + ("-frozen" if freeze else "")
    return _finish_mixture(ctx, run, label, method, params, domains, cfg.lr.mode,
                           {"experts": [str(e.path) if e.path else e.domain for e in experts]})


def uninit(ctx: Context, run: RunDir, domains) -> dict | None:
    """MoDE with N experts trained on the mixture from scratch (no stage 1): random experts
    (the paper's uninit), or with mode.uninit_experts = "copy" copies of the backbone's
    layers, as stage 1 starts from, so that uninit's two changes can be told apart."""
    cfg = ctx.cfg
    n = cfg.mode.n_experts or len(domains)      # mode.n_experts: e.g. 1, the capacity control
    mode = sources.mode_config(cfg, n)
    key = jax.random.key(cfg.train.seed)
    if cfg.mode.uninit_experts == "copy":
        # Same parameter structure (and so the same "uninit" partition), experts copied.
        from mode_jax.ref.mode import init_mode
        params = init_mode(key, ctx.backbone.params, ctx.llama, dataclasses.replace(mode, expert_init="copy"))
        label = f"mode-{n}x-uninit-copied"
    else:
        params = init_method("uninit", key, ctx.backbone.params, ctx.llama, mode=mode)
        label = f"mode-{n}x-uninit"
    # Experts not one per domain (mode.n_experts) are named by position in the routing columns.
    extra = {} if n == len(domains) else {"routing_columns": ["backbone", *(f"expert-{j + 1}" for j in range(n))]}
    return _finish_mixture(ctx, run, label, "uninit", params, domains, cfg.lr.mode, extra)


def finetune(ctx: Context, run: RunDir, method: str) -> dict | None:
    """Baselines on the target mixture: full fine-tuning, LoRA or block expansion."""
    if method == "block_expansion":
        from mode_jax.pipeline import expansion      # LLaMA Pro's new layers (pipeline/expansion.py)
        return expansion.finetune(ctx, run)
    cfg = ctx.cfg
    lora = lora_config(cfg) if method == "lora" else None
    params = init_method(method, jax.random.key(cfg.train.seed), ctx.backbone.params, ctx.llama, lora=lora)
    label = "full-ft" if method == "full" else f"lora-r{cfg.lora.rank}-{cfg.lora.targets}"
    lr = cfg.lr.full if method == "full" else cfg.lr.lora
    return _finish_mixture(ctx, run, label, method, params, cfg.domains.targets, lr, {}, lora=lora)


def _finish_mixture(ctx, run, label, method, params, domains, lr, extra, lora=None):
    cfg = ctx.cfg
    domains = tuple(domains)
    if cfg.train.batch_size % len(domains):
        raise UserError(f"config train.batch_size={cfg.train.batch_size} must be a multiple of the "
                        f"{len(domains)} domains of the mixture")
    out = _train(ctx, run, phase=label, params=params, method=method, domains=domains, lr=lr,
                 total_steps=cfg.train.steps, lora=lora, examples=cfg.data.train_examples)
    if not out.finished:
        return None
    info = {**_training_info(ctx, method, domains, cfg.train.steps), "backbone_fingerprint":
            ctx.backbone.fingerprint, "lora": dataclasses.asdict(lora) if lora else None, "label": label,
            "base_model": ctx.backbone.base}
    if run.writer:
        expert_io.save_model(run.path / "model.safetensors", out.params, method=method, metadata=info)
    cols = extra.get("routing_columns") or (["backbone", *domains] if "blocks" in out.params else None)
    return _result(ctx, run, label=label, method=method, params=out.params, outcome=out,
                   extra={**extra, "model_file": "model.safetensors", "domains_trained": list(domains),
                          "routing_columns": cols})


def evaluate_backbone(ctx: Context, run: RunDir) -> dict:
    params = {"backbone": ctx.backbone.params}
    return _result(ctx, run, label="backbone", method="backbone", params=params, outcome=None)
