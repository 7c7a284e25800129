"""A sweep's gate analysis (grid option `sweep.gate_analysis`, docs/sweep.md): each gated run
analysed in the sweep's own process, right after it finishes, and the report over seeds.

    analyse_cell   after a mode / mode-frozen / uninit run (any gate_top_k): gate_analysis.analyse_run
                   on the run's prepared context -> <run>/gate_analysis.json and the record's
                   "gate_analysis" (entropy, own-top and backbone-top share per block and domain,
                   selection shares, mean routing, sparse-dispatch FLOPs, and with N > 0 the stage-2
                   trace every N steps)
    write          (sweep_report.write, when a record holds one) gates.md: per cell and domain, each
                   statistic per block, mean over seeds [min, max over seeds]; gates.png: entropy and
                   own-top share per block, and each domain's weight on its own expert (retention
                   domains: on the backbone) against the stage-2 step, mean over seeds

The trace replays stage 2 (gate_analysis.trace): it costs about the run's own stage-2 training
again, so `gate_analysis = 0` keeps the statistics alone.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from mode_jax.atomic import atomic_path, write_text_atomic
from mode_jax.integrity import strict_json

FILE = "gate_analysis.json"
STATS = (("entropy", "Routing entropy (nats; 0: one stack takes every token, ln(N + 1): uniform)"),
         ("own_top_share", "Share of tokens whose largest expert weight (backbone left out) is the domain's own "
                           "expert (retention domains have none: -)"),
         ("backbone_top", "Share of tokens whose largest gate weight of all is the backbone's"))


# ---------------------------------------------------------------------------- per run

def analyse_cell(ctx, run_dir: Path, result: dict, *, every: int, deadline: float | None = None) -> dict | None:
    """The gate analysis of a finished gated run (`result` its phase's result), for its record;
    written to <run_dir>/gate_analysis.json. A json already there from this same setting (the
    sweep killed before recording the run) is reused. None when the trace would run past
    `deadline` (its estimate: the run's own stage-2 training time): the record waits for the
    next call, which finds the phase done and its model still there."""
    from mode_jax.pipeline import gate_analysis
    path = Path(run_dir) / FILE
    if path.is_file():
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            saved = None
        if isinstance(saved, dict) and saved.get("trace_every") == every:
            return saved
    if every and deadline is not None and time.time() + float(result.get("train_seconds", 0.0)) > deadline:
        return None
    report = gate_analysis.analyse_run(ctx, run_dir, result, trace_every=every)
    write_text_atomic(path, strict_json(report, indent=1) + "\n")
    return report


# ---------------------------------------------------------------------------- report

def summarise(records: list[dict]) -> list[dict]:
    """Per cell name with a gate analysis and domain: each statistic per block over seeds
    (mean, min, max; None where the domain has no own expert), and the mean trace of each
    domain's weight on its own column (retention: the backbone) per block, over the seeds whose
    trace has the same steps as the first's."""
    from mode_jax.pipeline.sweep_report import _groups
    rows = []
    for name, by_seed in _groups([r for r in records if r.get("gate_analysis")]).items():
        seeds = sorted(by_seed)
        reports = [by_seed[s]["gate_analysis"] for s in seeds]
        columns = reports[0]["columns"]
        # the gate's domains in column order, then the others (results.jsonl sorts its keys)
        for d in sorted(reports[0]["domains"], key=lambda d: (d not in columns, columns.index(d) if d in columns
                                                              else 0, d)):
            row = {"name": name, "domain": d, "seeds": seeds, "column": columns.index(d) if d in columns[1:] else 0}
            for key, _ in STATS:
                values = [r["domains"][d][key] for r in reports]
                if any(v is None for v in values):
                    row[key] = None
                    continue
                a = np.asarray(values, np.float64)          # [seeds, blocks]
                row[key] = {"mean": a.mean(0).tolist(), "min": a.min(0).tolist(), "max": a.max(0).tolist()}
            row["trace"] = _mean_trace(reports, d, row["column"])
            rows.append(row)
    return rows


def _mean_trace(reports: list[dict], domain: str, column: int) -> dict | None:
    traced = [r["trace"] for r in reports if r.get("trace")]
    if not traced:
        return None
    steps = [p["step"] for p in traced[0]]
    same = [t for t in traced if [p["step"] for p in t] == steps]
    w = np.asarray([[np.asarray(p["routing"][domain])[:, column] for p in t] for t in same])   # [seeds, steps, blocks]
    return {"steps": steps, "seeds": len(same), "weight": w.mean(0).T.tolist()}              # [blocks][steps]


def _cell(stat: dict | None, block: int) -> str:
    if stat is None:
        return "-"
    if block >= len(stat["mean"]):
        return ""
    return f"{stat['mean'][block]:.3f} [{stat['min'][block]:.3f}, {stat['max'][block]:.3f}]"


def markdown(rows: list[dict]) -> str:
    blocks = max(len(r["entropy"]["mean"]) for r in rows)
    head = ["cell", "domain", "seeds"] + [f"block {b}" for b in range(blocks)]
    text = ["Gate analysis of each gated run (sweep.gate_analysis), on its evaluation rows: per block, "
            "mean over seeds [min, max over seeds].", ""]
    for key, title in STATS:
        text += [f"**{title}**", "", "| " + " | ".join(head) + " |", "|" + "|".join([" --- "] * len(head)) + "|"]
        for r in rows:
            cells = [r["name"], r["domain"], str(len(r["seeds"]))] + [_cell(r[key], b) for b in range(blocks)]
            text.append("| " + " | ".join(cells) + " |")
        text.append("")
    traced = [r for r in rows if r["trace"]]
    if traced:
        text += ["**Stage 2**: each domain's mean gate weight on its own expert (retention domains: on the "
                 "backbone) on 4 of its eval rows, at the trace's first and last step, per block; mean over "
                 "seeds (gates.png draws every step).", "",
                 "| cell | domain | on | seeds | steps | " + " | ".join(f"block {b}" for b in range(blocks)) + " |",
                 "|" + "|".join([" --- "] * (5 + blocks)) + "|"]
        for r in traced:
            t = r["trace"]
            on = "own" if r["column"] else "backbone"
            cells = [f"{w[0]:.3f} -> {w[-1]:.3f}" for w in t["weight"]] + [""] * (blocks - len(t["weight"]))
            text.append(f"| {r['name']} | {r['domain']} | {on} | {t['seeds']} | {t['steps'][0]}-{t['steps'][-1]} | "
                        + " | ".join(cells) + " |")
        text.append("")
    return "\n".join(text)


def write(out: Path, records: list[dict]) -> str:
    """gates.md and gates.json (and, with matplotlib, gates.png) in `out`; the markdown."""
    from mode_jax.pipeline import plots
    rows = summarise(records)
    md = markdown(rows)
    write_text_atomic(Path(out) / "gates.md", md)
    write_text_atomic(Path(out) / "gates.json", strict_json(rows, indent=1, sort_keys=True) + "\n")
    if plots.available():
        plot(rows, Path(out) / "gates.png")
    return md


def plot(rows: list[dict], path: Path) -> Path:
    """Row 1: entropy per block, one panel per domain, a line per cell; row 2: own-top share (a
    cell with no expert of the domain's own, holding it out or without per-domain experts: its
    backbone-top share, dashed); then one panel per traced cell: each domain's weight on its own
    expert (retention: backbone) per block against the stage-2 step."""
    from mode_jax.pipeline.plots import _plt
    plt = _plt()
    domains = list(dict.fromkeys(r["domain"] for r in rows))
    traced = list(dict.fromkeys(r["name"] for r in rows if r["trace"]))
    ncols = max(len(domains), min(len(traced), 4), 1)
    nrows = 2 + -(-len(traced) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.4 * nrows), squeeze=False)
    for j, d in enumerate(domains):
        for r in (r for r in rows if r["domain"] == d):
            x = np.arange(len(r["entropy"]["mean"]))
            axes[0][j].errorbar(x, r["entropy"]["mean"], yerr=_spread(r["entropy"]), marker="o", capsize=3,
                                label=r["name"])
            no_own = not r["own_top_share"]        # held out, or a cell without per-domain experts
            share = r["backbone_top"] if no_own else r["own_top_share"]
            axes[1][j].errorbar(x, share["mean"], yerr=_spread(share), marker="o", capsize=3,
                                ls="--" if no_own else "-",
                                label=r["name"] + (" (no own expert: backbone on top)" if no_own else ""))
        own = [bool(r["own_top_share"]) for r in rows if r["domain"] == d]
        mixed = any(own) and not all(own)       # a domain some cells have an expert for and others not
        what = ("own expert on top\n(dashed: no own expert, backbone on top)" if mixed
                else "own expert on top" if all(own) else "backbone on top")
        ticks = np.arange(max(len(r["entropy"]["mean"]) for r in rows))
        axes[0][j].set(title=f"{d}: routing entropy (nats)", xlabel="block", xticks=ticks)
        axes[1][j].set(title=f"{d}: {what}", xlabel="block", ylabel="share of tokens", xticks=ticks,
                       ylim=(-0.02, 1.02))
        axes[0][j].legend(fontsize=6)
        if mixed:
            axes[1][j].legend(fontsize=6)
    for k, name in enumerate(traced):
        ax = axes[2 + k // ncols][k % ncols]
        for i, r in enumerate(r for r in rows if r["name"] == name and r["trace"]):
            for b, w in enumerate(r["trace"]["weight"]):
                ax.plot(r["trace"]["steps"], w, color=f"C{i}", ls=["-", "--", ":", "-."][b % 4],
                        label=f"{r['domain']} -> {'own' if r['column'] else 'backbone'}, block {b}")
        ax.set(title=f"{name}: stage 2 (mean over seeds)", xlabel="step", ylabel="mean gate weight", ylim=(-0.02, 1.02))
        ax.legend(fontsize=6)
    for ax in axes.flat:
        if not ax.has_data():
            ax.set_axis_off()
    fig.suptitle("Gate analysis: mean over seeds, bars min-max over seeds", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return Path(path)


def _spread(stat: dict) -> np.ndarray:
    mean = np.asarray(stat["mean"])
    return np.stack([mean - np.asarray(stat["min"]), np.asarray(stat["max"]) - mean])
