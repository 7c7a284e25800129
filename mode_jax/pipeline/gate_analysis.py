"""What the MoDE gate learned, beyond the mean routing weights (issue #13's gate analysis).

From an evaluation pass (every block's per-token gate weights on each domain's eval rows):

    entropy          per block: the mean over tokens of -sum_e a_e ln a_e (nats; 0 = one stack
                     takes all, ln(N + 1) = uniform)
    own_top_share    per block: the share of tokens whose largest expert weight (the backbone
                     column left out) is the domain's own expert; None for a domain without one
                     (retention domains)
    backbone_top     per block: the share of tokens whose largest weight of all is the backbone's
    selected         per block and stack [n_blocks, E]: the share of tokens whose top-k keeps the
                     stack (k = the gate's top-k, else 1): what a sparse dispatch would run
                     (ref.costs.dispatch_flops)
    mean_routing     per block and stack: the mean gate weight (as result.json's "routing")

and, with `trace`, how routing moves during stage 2: the phase re-run with the same config and
seed (a deterministic replay of the run's training), the gate evaluated on a few eval rows per
domain every `every` steps (cheap: a forward of those rows). `plot` draws both.

    python -m mode_jax.pipeline.gate_analysis RUN_DIR [--trace-every 50] [--out DIR]

reads a finished compose / uninit run (its config.toml, result.json and model.safetensors) and
writes gate_analysis.json (with each domain's sparse-dispatch FLOPs, ref.costs.dispatch_flops on
its measured selection) and gate_analysis.png into DIR (default: the run directory).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from mode_jax.atomic import write_text_atomic
from mode_jax.integrity import strict_json

# ---------------------------------------------------------------------------- statistics


def gate_stats(probs: list[np.ndarray], *, own: int | None, top_k: int | None = None) -> dict:
    """The statistics of one domain from each block's gate weights probs[i] [tokens, E]
    (column 0 the backbone; `own` the domain's expert column, 1..N, or None)."""
    out = {"entropy": [], "own_top_share": None if own is None else [], "backbone_top": [], "selected": [],
           "mean_routing": []}
    for p in probs:
        p = np.asarray(p, np.float64)
        e = p.shape[-1]
        k = min(top_k or 1, e)
        with np.errstate(divide="ignore", invalid="ignore"):
            plogp = np.where(p > 0, p * np.log(p), 0.0)           # 0 ln 0 = 0 (top-k zeros)
        out["entropy"].append(float(np.mean(-plogp.sum(-1))))
        if own is not None:
            out["own_top_share"].append(float(np.mean(np.argmax(p[:, 1:], axis=-1) + 1 == own)))
        out["backbone_top"].append(float(np.mean(np.argmax(p, axis=-1) == 0)))
        kept = np.argsort(-p, axis=-1, kind="stable")[:, :k]     # each token's k largest
        out["selected"].append([float(np.mean(np.any(kept == j, axis=-1))) for j in range(e)])
        out["mean_routing"].append(p.mean(0).tolist())
    return out


@functools.lru_cache(maxsize=None)
def _probs_fn(cfg, fast, gate_top_k):
    """One jitted forward per (configs, top-k): the trace calls it many times."""
    from mode_jax.fast.model import mode_hidden
    return jax.jit(lambda p, t: mode_hidden(p, t, cfg, fast, return_probs=True, gate_top_k=gate_top_k)[1])


def gate_probs(params_fast: dict, rows: np.ndarray, cfg, fast, *, batch_size: int, gate_top_k=None) -> list[np.ndarray]:
    """Each block's gate weights [tokens, E] over eval rows [n, T + 1] (their inputs, T tokens each)."""
    fn = _probs_fn(cfg, fast, gate_top_k)
    per_block = None
    for i in range(0, rows.shape[0], batch_size):
        probs = fn(params_fast, jnp.asarray(rows[i:i + batch_size, :-1]))
        flat = [np.asarray(p, np.float64).reshape(-1, p.shape[-1]) for p in probs]
        per_block = flat if per_block is None else [np.concatenate([a, b]) for a, b in zip(per_block, flat)]
    return per_block


def analyse(params_fast: dict, eval_sets: dict, columns: list[str], cfg, fast, *, batch_size: int,
            gate_top_k=None) -> dict:
    """{domain: gate_stats} over every eval domain; `columns` names the gate's columns
    (["backbone", domain, ...]), which says each domain's own expert."""
    return {d: gate_stats(gate_probs(params_fast, rows, cfg, fast, batch_size=batch_size, gate_top_k=gate_top_k),
                          own=columns.index(d) if d in columns[1:] else None, top_k=gate_top_k)
            for d, rows in eval_sets.items()}


# ---------------------------------------------------------------------------- stage-2 trace

def trace(ctx, params: dict, method: str, domains, *, every: int, rows_per_domain: int = 4) -> list[dict]:
    """Re-run stage 2 (`method` from `params`, the run's config and seed: the same batches and
    steps) and every `every` steps record each domain's mean routing [n_blocks, E] on its first
    `rows_per_domain` eval rows. [{"step", "routing": {domain: [[...]]}}], step 0 included."""
    from mode_jax.fast.config import FastConfig
    from mode_jax.pipeline import stages
    cfg = ctx.cfg
    steps = stages.make_steps(ctx, method, opt=stages.optim(cfg, cfg.lr.mode, cfg.train.steps), params_like=params,
                              parallel=False)
    fast = FastConfig(compute_dtype=cfg.model.compute_dtype)
    top_k = stages.gate_top_k(cfg, method)
    probe = {d: rows[:rows_per_domain] for d, rows in ctx.eval_sets.items()}
    sampler = stages._sampler(ctx, tuple(domains), cfg.train.batch_size, cfg.data.train_examples)
    backend = steps.to_backend(params)
    trainable, frozen = steps.split(backend, _trainable(method))
    opt_state = steps.init_opt(trainable)
    frozen = steps.prepare_frozen(frozen)
    points = []

    def record(step):
        model = steps.join(trainable, frozen)
        points.append({"step": step, "routing": {
            d: [np.mean(p, 0).tolist() for p in gate_probs(model, r, ctx.llama, fast, batch_size=r.shape[0],
                                                           gate_top_k=top_k)] for d, r in probe.items()}})

    record(0)
    for step in range(cfg.train.steps):
        trainable, opt_state, _ = steps.train_step(trainable, frozen, opt_state,
                                                   {"tokens": jnp.asarray(sampler.batch(step))})
        if (step + 1) % every == 0 or step + 1 == cfg.train.steps:
            record(step + 1)
    return points


def _trainable(method: str) -> str:
    from mode_jax.ref.methods import METHODS
    return METHODS[method]


# ---------------------------------------------------------------------------- plot

def plot(analysis: dict, columns: list[str], path: Path, trace_points: list[dict] | None = None) -> Path:
    """Entropy and own-expert share per block and domain; with a trace, each domain's weight on
    its own expert (or, for a retention domain, on the backbone) per block during stage 2."""
    from mode_jax.pipeline.plots import _plt
    plt = _plt()
    panels = 3 if trace_points else 2
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4))
    domains = list(analysis)
    n_blocks = len(next(iter(analysis.values()))["entropy"])
    width = 0.8 / len(domains)
    for j, d in enumerate(domains):
        x = np.arange(n_blocks) + j * width
        axes[0].bar(x, analysis[d]["entropy"], width, label=d)
        if analysis[d]["own_top_share"] is not None:
            axes[1].bar(x, analysis[d]["own_top_share"], width, label=d)
    axes[0].axhline(np.log(len(columns)), color="grey", lw=0.8, ls=":")
    axes[0].set(title="routing entropy (nats; dotted: uniform)", xlabel="block", xticks=np.arange(n_blocks))
    axes[1].set(title="share of tokens whose top expert is the domain's", xlabel="block",
                xticks=np.arange(n_blocks), ylim=(0, 1))
    for ax in axes[:2]:
        ax.legend(fontsize=8)
    if trace_points:
        steps = [p["step"] for p in trace_points]
        for d in domains:
            col = columns.index(d) if d in columns[1:] else 0
            for b in range(n_blocks):
                axes[2].plot(steps, [p["routing"][d][b][col] for p in trace_points], lw=1.2,
                             label=f"{d} -> {columns[col]}, block {b}")
        axes[2].set(title="routing during stage 2", xlabel="step", ylabel="mean gate weight", ylim=(0, 1))
        axes[2].legend(fontsize=6)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


# ---------------------------------------------------------------------------- command

def run_analysis(run_dir: Path, out: Path, *, trace_every: int = 0, progress: bool = False) -> dict:
    """Analyse a finished compose / uninit run; writes gate_analysis.json and .png into `out`."""
    from mode_jax.errors import UserError
    from mode_jax.pipeline import presets, sources, stages
    run_dir, out = Path(run_dir), Path(out)
    result_path, model_path = run_dir / "result.json", run_dir / "model.safetensors"
    if not result_path.is_file() or not model_path.is_file():
        raise UserError(f"{run_dir} is not a finished MoDE run (needs result.json and model.safetensors)")
    result = json.loads(result_path.read_text())
    cfg = sources.resolve_domains(presets.load_config(config=str(run_dir / "config.toml")))
    ctx = stages.prepare(cfg, result.get("domains_trained") or cfg.domains.targets, progress=progress)
    report = {"run": str(run_dir), **analyse_run(ctx, run_dir, result, trace_every=trace_every)}
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "gate_analysis.json", strict_json(report, indent=1) + "\n")
    plot(report["domains"], report["columns"], out / "gate_analysis.png", report.get("trace"))
    return report


def analyse_run(ctx, run_dir: Path, result: dict, *, trace_every: int = 0) -> dict:
    """The gate analysis of the finished compose / uninit run in `run_dir` (its
    model.safetensors; `result` its result.json), on an already prepared `ctx` (stages.prepare
    of the run's config: its eval sets, backbone and, for the trace, its training data):
    {"method", "columns", "gate_top_k", "trace_every", "domains": {domain: gate_stats},
    "sparse_dispatch": {domain: ...}} and, with trace_every > 0, "trace" (`trace`'s points).
    Writes nothing."""
    from mode_jax.errors import UserError
    from mode_jax.fast.config import FastConfig
    from mode_jax.fast.params import to_fast
    from mode_jax.pipeline import expert_io, sources, stages
    cfg = ctx.cfg
    params, method, _ = expert_io.load_model(Path(run_dir) / "model.safetensors", ctx.backbone.params,
                                             fingerprint=ctx.backbone.fingerprint)
    if "blocks" not in params:
        raise UserError(f"{run_dir} holds a {method} model: the gate analysis needs a MoDE run")
    columns = result.get("routing_columns") or ["backbone", *result["domains_trained"]]
    top_k = stages.gate_top_k(cfg, method)
    fast = FastConfig(compute_dtype=cfg.model.compute_dtype)
    params = jax.tree.map(jnp.asarray, params)
    report = {"method": method, "columns": columns, "gate_top_k": top_k, "trace_every": trace_every,
              "domains": analyse(to_fast(params, expert_layers=cfg.mode.expert_layers), ctx.eval_sets, columns,
                                 ctx.llama, fast, batch_size=cfg.data.eval_batch_size, gate_top_k=top_k)}
    del params
    # What a sparse dispatch would save per token, each domain's measured top-k selection (top-1
    # of the dense weights for a dense run: what a top-1 dispatch of this gate would run).
    from mode_jax.ref.costs import dispatch_flops
    layout = sources.mode_config(cfg, len(columns) - 1)
    report["sparse_dispatch"] = {d: dispatch_flops(ctx.llama, layout, cfg.data.seq_len, selected=stats["selected"])
                                 for d, stats in report["domains"].items()}
    if trace_every:
        start = _stage2_start(ctx, result, method)
        report["trace"] = trace(ctx, start, method, result["domains_trained"], every=trace_every)
    return report


def _stage2_start(ctx, result: dict, method: str) -> dict:
    """The params stage 2 started from: the run's expert files composed (compose), or the
    uninit initialisation (its config and seed)."""
    from mode_jax.pipeline import expert_io, sources
    from mode_jax.ref.methods import init_method
    cfg = ctx.cfg
    if method == "uninit":
        # As stages.uninit builds it (random experts, or copies with mode.uninit_experts = "copy").
        n = cfg.mode.n_experts or len(result["domains_trained"])
        mode = sources.mode_config(cfg, n)
        key = jax.random.key(cfg.train.seed)
        if cfg.mode.uninit_experts == "copy":
            from mode_jax.ref.mode import init_mode
            return init_mode(key, ctx.backbone.params, ctx.llama, dataclasses.replace(mode, expert_init="copy"))
        return init_method("uninit", key, ctx.backbone.params, ctx.llama, mode=mode)
    experts = expert_io.load_compatible(result["experts"], llama=ctx.llama, mode=sources.mode_config(cfg, 1),
                                        fingerprint=ctx.backbone.fingerprint)
    stage1 = [e.stage1_model(ctx.backbone.params) for e in experts]
    params = init_method(method, jax.random.key(cfg.train.seed), ctx.backbone.params, ctx.llama,
                         mode=sources.mode_config(cfg, len(experts)), stage1=stage1, gate_from=cfg.mode.stage2_gate_from)
    return jax.tree.map(jnp.asarray, params)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mode_jax.pipeline.gate_analysis", description=__doc__.split("\n")[0])
    p.add_argument("run", help="a finished compose / uninit run directory")
    p.add_argument("--out", help="where gate_analysis.json / .png go (default: the run directory)")
    p.add_argument("--trace-every", type=int, default=0, help="re-run stage 2, routing every N steps (0: no trace)")
    args = p.parse_args(argv)
    from mode_jax.errors import UserError
    try:
        if args.trace_every < 0:
            raise UserError(f"--trace-every must be >= 0, got {args.trace_every}")
        run_analysis(Path(args.run), Path(args.out or args.run), trace_every=args.trace_every)
    except UserError as err:
        print(f"error: {err}")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
