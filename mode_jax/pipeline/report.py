"""Table 1 of the paper, again: our numbers and the paper's, side by side (markdown + JSON).

Rows are the methods the paper compares on Math + Code (and the backbone, which the
paper omits, and the stage-1 experts). Columns: parameter count (total and trained),
next-token accuracy (%) per domain, the average over the domains, and the paper's
values where the paper reports that row. The paper's backbone (1.58B, 18 layers,
in-house) is not ours (SmolLM2-135M), so compare directions and gaps, not levels.
"""

from __future__ import annotations

import math
from typing import Any

# docs/MODE.md, Table 1 (Math+Code) and Table 3 (one expert on Code, 3 blocks x 2 layers).
PAPER = {
    "full-ft": {"name": "Full FT", "params": "1.583B", "math": 77.18, "code": 67.89, "english": 47.95, "avg": 64.34},
    "lora": {"name": "LoRA r16 attn", "params": "1.585B", "math": 75.79, "code": 65.71, "english": 49.05, "avg": 63.52},
    "mode-2x-uninit": {"name": "MoDE 2x uninit", "params": "2.376B", "math": 76.87, "code": 67.39,
                       "english": 49.47, "avg": 64.58},
    "mode-2x-frozen": {"name": "MoDE 2x frozen experts", "params": "2.376B", "math": 76.99, "code": 66.94,
                       "english": 49.07, "avg": 64.33},
    "mode-2x": {"name": "MoDE 2x experts", "params": "2.376B", "math": 77.47, "code": 67.83,
                "english": 49.50, "avg": 64.93},
    "expert-code": {"name": "Code expert (Table 3)", "params": "", "math": None, "code": 77.51,
                    "english": 47.95, "avg": None},
}

ROW_NAMES = {"backbone": "Backbone (no adaptation)", "expert-code": "Stage 1: Code expert",
             "expert-math": "Stage 1: Math expert", "mode-2x": "MoDE 2x experts",
             "mode-2x-frozen": "MoDE 2x frozen experts", "mode-2x-uninit": "MoDE 2x uninit",
             "full-ft": "Full FT"}


def paper_key(label: str) -> str | None:
    if label.startswith("lora"):
        return "lora"
    return label if label in PAPER else None


def row_name(label: str) -> str:
    if label.startswith("lora-r"):
        rank, _, targets = label[len("lora-r"):].partition("-")
        return f"LoRA r{rank} {targets}"
    return ROW_NAMES.get(label, label)


def fmt_params(n: int) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def build_table(results: list[dict[str, Any]], domains: list[str]) -> dict[str, Any]:
    """JSON-able table: one row per result, accuracies in %."""
    rows = []
    for r in results:
        acc = {d: 100.0 * r["domains"][d]["accuracy"] for d in domains}
        loss = {d: r["domains"][d]["loss"] for d in domains}
        key = paper_key(r["label"])
        tokens = {d: r["domains"][d]["tokens"] for d in domains}
        # binomial standard error of an accuracy measured on n tokens (tokens are not independent,
        # so this is a lower bound on the noise): the size of a difference worth reading
        se = {d: 100.0 * (acc[d] / 100 * (1 - acc[d] / 100) / max(tokens[d], 1)) ** 0.5 for d in domains}
        rows.append({"label": r["label"], "method": row_name(r["label"]), "params_total": r["params_total"],
                     "params_trainable": r["params_trainable"], "accuracy": acc, "accuracy_se": se,
                     "eval_tokens": tokens, "loss": loss,
                     "avg": sum(acc.values()) / len(acc), "train_steps": r["train_steps"],
                     "train_seconds": r["train_seconds"], "paper": PAPER.get(key) if key else None})
    return {"domains": domains, "rows": rows,
            "note": "accuracy = next-token argmax accuracy (%) on held-out test rows; avg = mean over domains; "
                    "paper = Schafhalter et al. Table 1 (Math+Code; Code expert: Table 3), 1.58B in-house backbone"}


def markdown(table: dict[str, Any]) -> str:
    domains = table["domains"]
    names = [d.capitalize() for d in domains]
    head = (["method", "params", "trained"] + names + ["avg"]
            + ["paper params"] + [f"paper {n}" for n in names] + ["paper avg"])
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join([" --- "] * len(head)) + "|"]
    for r in table["rows"]:
        p = r["paper"] or {}
        cells = [r["method"], fmt_params(r["params_total"]), fmt_params(r["params_trainable"]) if r["params_trainable"] else "0"]
        cells += [f"{r['accuracy'][d]:.2f}" for d in domains] + [f"{r['avg']:.2f}"]
        cells += [p.get("params") or "-"] + [_num(p.get(d)) for d in domains] + [_num(p.get("avg"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def loss_markdown(table: dict[str, Any]) -> str:
    domains = table["domains"]
    lines = ["| method | " + " | ".join(f"{d.capitalize()} loss" for d in domains) + " | steps | train s |",
             "|" + "|".join([" --- "] * (len(domains) + 3)) + "|"]
    for r in table["rows"]:
        lines.append(f"| {r['method']} | " + " | ".join(_num(r['loss'][d], 4) for d in domains)
                     + f" | {r['train_steps']} | {r['train_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def _num(x, digits: int = 2) -> str:
    # None: a value the paper does not report, or a non-finite one (strict JSON stores it as null)
    return "-" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def noise_note(table: dict[str, Any]) -> str:
    ses = [se for r in table["rows"] for se in r["accuracy_se"].values()]
    tokens = sorted({n for r in table["rows"] for n in r["eval_tokens"].values()})
    return (f"Eval: {', '.join(f'{n:,}' for n in tokens)} test tokens per domain; binomial standard error of "
            f"an accuracy {min(ses):.2f}-{max(ses):.2f} points (a lower bound: tokens are correlated).\n")


def write(out_dir, table: dict[str, Any], *, header: str = "") -> str:
    """Write table.md and table.json into out_dir; returns the markdown."""
    from pathlib import Path

    from mode_jax.atomic import write_text_atomic
    from mode_jax.integrity import strict_json
    md = "".join([header + "\n" if header else "", markdown(table), "\n", noise_note(table),
                  "\nLoss (nats/token) and training cost:\n\n", loss_markdown(table)])
    write_text_atomic(Path(out_dir) / "table.md", md)
    write_text_atomic(Path(out_dir) / "table.json", strict_json(table, indent=2, sort_keys=True) + "\n")
    return md
