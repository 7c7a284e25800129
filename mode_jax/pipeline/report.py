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
        se, se_kind = {}, {}
        for d in domains:
            se[d], se_kind[d] = _standard_error(r["domains"][d], acc[d], tokens[d])
        rows.append({"label": r["label"], "method": row_name(r["label"]), "params_total": r["params_total"],
                     "params_trainable": r["params_trainable"], "accuracy": acc, "accuracy_se": se,
                     "accuracy_se_kind": se_kind,
                     "eval_tokens": tokens, "loss": loss,
                     "avg": sum(acc.values()) / len(acc), "train_steps": r["train_steps"],
                     "train_seconds": r["train_seconds"], "paper": PAPER.get(key) if key else None})
    return {"domains": domains, "rows": rows,
            "note": "accuracy = next-token argmax accuracy (%) on held-out test rows; avg = mean over domains; "
                    "paper = Schafhalter et al. Table 1 (Math+Code; Code expert: Table 3), 1.58B in-house backbone"}


def _standard_error(entry: dict[str, Any], acc: float, n_tokens: int) -> tuple[float, str]:
    """(standard error in points, its kind) of one domain's accuracy. Tokens of one document
    are correlated, so the SE clusters by test document (stats.clustered_se) where the result
    holds per-document counts; older results without them get the binomial SE over tokens,
    a lower bound on the noise (3-6x too small on our test sets), and say so."""
    from mode_jax.pipeline.stats import clustered_se
    docs = entry.get("per_document") or {}
    if len(docs.get("correct") or []) >= 2:
        return 100.0 * clustered_se(docs["correct"], docs["tokens"]), "document"
    return 100.0 * (acc / 100 * (1 - acc / 100) / max(n_tokens, 1)) ** 0.5, "binomial"


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
    kinds = {k for r in table["rows"] for k in r.get("accuracy_se_kind", {}).values()} or {"binomial"}
    what = ("standard error clustered by test document" if kinds == {"document"} else
            "binomial standard error (a lower bound: tokens are correlated)" if kinds == {"binomial"} else
            "standard error clustered by test document, binomial where a result has no per-document counts")
    return (f"Eval: {', '.join(f'{n:,}' for n in tokens)} test tokens per domain; one seed; {what} of an "
            f"accuracy {min(ses):.2f}-{max(ses):.2f} points. Multi-seed intervals and paired differences: "
            f"`mode-jax sweep` (docs/sweep.md).\n")


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
