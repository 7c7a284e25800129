"""PNG figures of a reproduce run (matplotlib, Agg backend: no display needed).

    loss_curves.png        training loss per step of every method (stage 1 dashed)
    accuracy.png           next-token accuracy per domain and method, the backbone as a line
    routing.png            what the gates learned: per MoDE model, per block, the mean routing
                           weight of the backbone and each expert on each evaluation domain
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def available() -> bool:
    """Whether matplotlib can be imported (a GPU box may lack it; the table is written anyway)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def loss_curves(curves: dict[str, list[tuple[int, float]]], path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, points in curves.items():
        if not points:
            continue
        steps, losses = zip(*points)
        ax.plot(steps, losses, label=label, linestyle="--" if label.startswith("expert-") else "-", lw=1.4)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats/token)")
    ax.set_title("Training loss (stage 1: own domain; the others: Math+Code mixture)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def accuracy_bars(table: dict[str, Any], path: Path) -> Path:
    plt = _plt()
    domains, rows = table["domains"], [r for r in table["rows"] if r["label"] != "backbone"]
    base = next((r for r in table["rows"] if r["label"] == "backbone"), None)
    fig, axes = plt.subplots(1, len(domains), figsize=(4.2 * len(domains), 4.5), sharey=False)
    axes = np.atleast_1d(axes)
    colors = plt.cm.tab10(np.arange(len(rows)) % 10)
    for ax, d in zip(axes, domains):
        vals = [r["accuracy"][d] for r in rows]
        errs = [r.get("accuracy_se", {}).get(d, 0.0) for r in rows]
        ax.bar(range(len(rows)), vals, color=colors, yerr=errs, capsize=3, error_kw={"lw": 0.8})
        if base is not None:
            ax.axhline(base["accuracy"][d], color="black", ls="--", lw=1, label="backbone")
            ax.legend(fontsize=8, loc="lower right")
        lo = min(vals + ([base["accuracy"][d]] if base else []))
        hi = max(vals + ([base["accuracy"][d]] if base else []))
        pad = max(1.0, 0.15 * (hi - lo))
        ax.set_ylim(max(0.0, lo - pad), min(100.0, hi + pad))
        ax.set_xticks(range(len(rows)), [r["method"] for r in rows], rotation=40, ha="right", fontsize=8)
        ax.set_title(f"{d.capitalize()}" + (" (retention)" if d == "english" else ""))
        ax.set_ylabel("next-token accuracy (%), ± s.e. (by document)")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def routing(results: list[dict[str, Any]], path: Path) -> Path | None:
    """One row of panels per MoDE model, one panel per eval domain: stacked bars per block."""
    models = [r for r in results if any("routing" in v for v in r["domains"].values())]
    if not models:
        return None
    plt = _plt()
    domains = list(models[0]["domains"])
    fig, axes = plt.subplots(len(models), len(domains), figsize=(3.6 * len(domains), 2.6 * len(models)),
                             squeeze=False)
    palette = {}                                        # one colour per column name, across models
    for i, r in enumerate(models):
        columns = r.get("routing_columns") or [f"e{j}" for j in range(len(r["domains"][domains[0]]["routing"][0]))]
        for j, d in enumerate(domains):
            ax = axes[i, j]
            weights = np.asarray(r["domains"][d]["routing"])          # [n_blocks, E]
            bottom = np.zeros(weights.shape[0])
            for e in range(weights.shape[1]):
                name = columns[e] if e < len(columns) else f"e{e}"
                color = palette.setdefault(name, plt.cm.Set2(len(palette) % 8))
                ax.bar(np.arange(weights.shape[0]), weights[:, e], bottom=bottom,
                       label=name if e == 0 else f"{name} expert", color=color)
                bottom += weights[:, e]
            ax.set_ylim(0, 1)
            ax.set_xticks(range(weights.shape[0]), [f"block {b}" for b in range(weights.shape[0])], fontsize=8)
            ax.set_title(f"{r['label']} on {d}", fontsize=9)
            if j == 0:
                ax.set_ylabel("mean gate weight")
            if j == len(domains) - 1:
                ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle("What the gate learned: mean routing weight per block, per evaluation domain", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
