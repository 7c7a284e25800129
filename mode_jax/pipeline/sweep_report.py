"""`mode-jax sweep report DIR`: a sweep's results.jsonl -> table.md, table.json and plots.

Per cell name (a method with its settings) and evaluation domain: the accuracy (mean over
seeds of the pooled accuracy on the test set, document separators left out) with a 95%
bootstrap interval over seeds and test documents (stats.bootstrap_accuracy); and, against
a baseline cell, the paired difference (same seeds, same documents) with its interval and
whether it excludes zero (stats.paired_difference).

    table.md / table.json    the two tables
    accuracy.png             accuracy per domain and cell, with the intervals as error bars
    differences.png          paired differences against the baseline, with their intervals
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mode_jax.atomic import write_text_atomic
from mode_jax.errors import UserError
from mode_jax.integrity import strict_json
from mode_jax.pipeline import stats
from mode_jax.pipeline.sweep import read_results, recorded_ids


def _groups(records: list[dict]) -> dict[str, dict[int, dict]]:
    """name -> seed -> record (the last record wins if a seed ran twice)."""
    out: dict[str, dict[int, dict]] = {}
    for r in records:
        out.setdefault(r["name"], {})[int(r["seed"])] = r
    return out


ANSWERS = ":answers"    # a column "math:answers": Math's answer tokens only (pipeline/answers.py)


def _units(run: dict, domain: str) -> dict:
    name, answers, _ = domain.partition(ANSWERS)
    entry = run["result"]["domains"][name]
    return entry["answers"]["per_document"] if answers else entry["per_document"]


def _label(column: str) -> str:
    name, answers, _ = column.partition(ANSWERS)
    return name.capitalize() + (" answers" if answers else "")


def _split(run: dict) -> str:
    return run["config"]["data"].get("eval_split", "test")


def _counts(runs: list[dict], domain: str):
    """Per seed: correct and token counts per test unit; and whether every seed was evaluated
    on the same units (built data: the test split is fixed; synthetic data is drawn per seed)."""
    docs = [_units(r, domain) for r in runs]
    ys = [np.asarray(d["correct"], np.float64) for d in docs]
    ns = [np.asarray(d["tokens"], np.float64) for d in docs]
    shared = runs[0]["config"]["data"]["source"] != "synthetic" and all(
        (d["ids"], d["tokens"]) == (docs[0]["ids"], docs[0]["tokens"]) for d in docs)
    return ys, ns, shared, docs[0]["unit"]


def _measured(run: dict, domain: str) -> bool:
    """Whether `run` was evaluated on `domain` (an answers column: and has its answer counts)."""
    name, answers, _ = domain.partition(ANSWERS)
    entry = run["result"]["domains"].get(name)
    return entry is not None and (not answers or "answers" in entry)


def _same_units(a: list[dict], b: list[dict], domain: str) -> bool:
    """Paired only if, seed by seed, both were measured on `domain` and on the same test units."""
    key = lambda r: (_units(r, domain)["unit"], _units(r, domain)["ids"], _units(r, domain)["tokens"])  # noqa: E731
    return all(_measured(x, domain) and _measured(y, domain) and key(x) == key(y) for x, y in zip(a, b))


def average(runs: list[dict], domains: list[str], n_boot: int, base: list[dict] | None = None) -> dict | None:
    """The mean over `domains` of `runs`' accuracy [95% interval] (stats.average_over_domains), or,
    given `base` (runs on the same seeds, in the same order), of the paired difference runs - base;
    None where `base` was not measured on the same units."""
    if base is not None and not all(_same_units(runs, base, d) for d in domains):
        return None
    ca = [_counts(runs, d) for d in domains]
    cb = None if base is None else [_counts(base, d)[:2] for d in domains]
    return stats.average_over_domains([c[:2] for c in ca], cb, n_boot=n_boot,
                                      shared_documents=all(c[2] for c in ca)).to_dict()


def _as_list(baseline) -> list[str]:
    return [] if baseline is None else [baseline] if isinstance(baseline, str) else list(baseline)


def for_grid(records: list[dict], grid) -> list[dict]:
    """The records of `grid`'s runs (matched by run id), named as `grid` names its cells: grids
    that share runs (table1-gpu.toml and baselines-gpu.toml) run into one --out and report apart."""
    cells = {cell.id: cell for cell in grid.cells}
    out = []
    for r in records:
        match = sorted(recorded_ids(r) & cells.keys())
        if match:
            cell = cells[match[0]]
            out.append({**r, "cell": cell.id, "name": cell.name, "settings": dict(cell.settings)})
    return out


def build(out: Path, *, baseline: str | list[str] | None = None, n_boot: int = stats.N_BOOT,
          records: list[dict] | None = None, avg: list[str] | None = None) -> dict[str, Any]:
    """The table as JSON-able data; `baseline`: one cell name or several (one comparison each);
    `records`: these runs instead of <out>/results.jsonl's; `avg`: the domains the avg column
    averages (default: every evaluated domain)."""
    records = read_results(out) if records is None else records
    if not records:
        raise UserError(f"{out} holds no finished sweep runs ({out / 'results.jsonl'} is missing or empty)")
    groups = _groups(records)
    baselines = _as_list(baseline)
    for base in baselines:
        if base not in groups:
            raise UserError(f"baseline {base!r} has no finished runs in {out} (cells with results: "
                            f"{', '.join(groups)})")
    order = records[0]["config"]["domains"]
    # the domains every run was evaluated on, in the first run's order (targets, then retention)
    domains = [d for d in dict.fromkeys(order["targets"] + order["retention"])
               if all(d in r["result"]["domains"] for r in records)]
    if avg is not None:
        unknown = [d for d in avg if d not in domains]
        if not avg or unknown:
            what = "names no domain" if not avg else "not evaluated in every run: " + ", ".join(unknown)
            raise UserError(f"--avg {','.join(avg)}: {what} (the evaluated domains: {', '.join(domains)})")
    averaged = list(dict.fromkeys(avg)) if avg is not None else domains
    # answer-token columns of the question/answer domains every run has them for (not in avg)
    answer_columns = [d + ANSWERS for d in domains if all(
        r["result"]["domains"][d].get("answers", {}).get("tokens") for r in records)]
    rows, diffs = [], []
    for name, by_seed in groups.items():
        runs = [by_seed[s] for s in sorted(by_seed)]
        row = {"name": name, "method": runs[0]["method"], "seeds": sorted(by_seed),
               "params_trainable": runs[0]["result"].get("params_trainable", 0), "domains": {},
               "eval_split": "/".join(sorted({_split(r) for r in runs}))}
        for d in domains + answer_columns:
            ys, ns, shared, unit = _counts(runs, d)
            row["domains"][d] = {**stats.bootstrap_accuracy(ys, ns, shared_documents=shared, n_boot=n_boot).to_dict(),
                                 "unit": unit, "shared_documents": shared,
                                 "per_seed": [float(y.sum() / n.sum()) for y, n in zip(ys, ns)]}
        row["avg"] = average(runs, averaged, n_boot)
        rows.append(row)
    for base in baselines:
        diffs += [_paired(name, by_seed, base, groups[base], domains, n_boot, answer_columns, averaged)
                  for name, by_seed in groups.items() if name != base]
    return {"domains": domains, "answer_columns": answer_columns, "rows": rows, "avg_domains": averaged,
            "eval_split": "/".join(sorted({_split(r) for r in records})),
            "baseline": baselines[0] if baselines else None,
            "baselines": baselines, "differences": diffs,
            "n_boot": n_boot, "level": stats.LEVEL,
            "note": "accuracy: mean over seeds of next-token accuracy on the test documents, separators "
                    "excluded; [low, high]: 95% percentile bootstrap over seeds and test documents"}


def _paired(name, by_seed, base, base_by_seed, domains, n_boot, extra=(), averaged=None) -> dict[str, Any]:
    """`name` - `base` per domain (and `extra` column) on the seeds both have (None where not
    on the same documents); the average is over `averaged` (default: `domains`)."""
    averaged = list(domains) if averaged is None else averaged
    seeds = sorted(set(by_seed) & set(base_by_seed))
    entry = {"name": name, "baseline": base, "seeds": seeds, "domains": {}}
    a, b = [by_seed[s] for s in seeds], [base_by_seed[s] for s in seeds]
    for d in list(domains) + list(extra):
        if not seeds or not _same_units(a, b, d):
            entry["domains"][d] = None      # not measured on the same seeds and documents
            continue
        ya, na, shared, _ = _counts(a, d)
        yb, nb, _, _ = _counts(b, d)
        entry["domains"][d] = stats.paired_difference(ya, na, yb, nb, shared_documents=shared,
                                                      n_boot=n_boot).to_dict()
    entry["avg"] = None
    if averaged and all(entry["domains"][d] is not None for d in averaged):
        entry["avg"] = average(a, averaged, n_boot, base=b)
    return entry


def _interval_pct(v: dict) -> str:
    return f"{100 * v['estimate']:.2f} [{100 * v['low']:.2f}, {100 * v['high']:.2f}]"


def markdown(table: dict[str, Any]) -> str:
    domains = table["domains"]
    columns = domains + table.get("answer_columns", [])
    split = table.get("eval_split", "test")
    mixed = "/" in split           # runs evaluated on different splits: each row says which
    avg = "avg" if table.get("avg_domains", domains) == domains else \
        "avg (" + ", ".join(_label(d) for d in table["avg_domains"]) + ")"
    head = ["cell", "seeds", "trained"] + (["split"] if mixed else []) + [_label(d) for d in columns] + [avg]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join([" --- "] * len(head)) + "|"]
    for r in table["rows"]:
        cells = [r["name"], str(len(r["seeds"])), f"{r['params_trainable']:,}"] + ([r["eval_split"]] if mixed else [])
        cells += [_interval_pct(r["domains"][d]) for d in columns]
        lines.append("| " + " | ".join(cells + [_interval_pct(r["avg"])]) + " |")
    units = sorted({f"{_label(d)}: {r['domains'][d]['n_units']} {r['domains'][d]['unit']}s"
                    for r in table["rows"][:1] for d in columns})
    where = "each row's split (see the split column)" if mixed else f"the {split} split"
    text = [f"Accuracy, % (mean over seeds), evaluated on {where} [95% bootstrap interval over seeds and "
            f"{'validation' if split == 'validation' else 'test'} units; " + "; ".join(units) + "]."
            + (" Answers: next-token accuracy on the answer tokens alone (not in avg)." if columns != domains else ""),
            "", *lines, ""]
    for base in table["baselines"]:
        head = ["cell"] + [f"{_label(d)} - baseline" for d in columns] + [f"{avg} - baseline"]
        text += [f"Paired differences against **{base}** (same seeds, same documents), "
                 "points [95% interval]; * = the interval excludes zero.", "",
                 "| " + " | ".join(head) + " |", "|" + "|".join([" --- "] * len(head)) + "|"]
        for e in (e for e in table["differences"] if e["baseline"] == base):
            cells = [e["name"]]
            for v in [e["domains"][d] for d in columns] + [e["avg"]]:
                cells.append("not paired" if v is None else f"{100 * v['estimate']:+.2f} [{100 * v['low']:+.2f}, "
                             f"{100 * v['high']:+.2f}]" + (" *" if v["excludes_zero"] else ""))
            text.append("| " + " | ".join(cells) + " |")
        text.append("")
    return "\n".join(text)


def write(out: Path, *, baseline: str | list[str] | None = None, n_boot: int = stats.N_BOOT,
          x: str | None = None, records: list[dict] | None = None, avg: list[str] | None = None) -> str:
    """table.md, table.json and (with matplotlib) the two plots in `out`; returns the markdown.
    With `x` (a config key, several comma-separated, or `params`): also curves.md and
    curves.png (pipeline/sweep_curves.py), and their markdown after the table's. Cells with
    target and retention domains: also tradeoff.md and tradeoff.png (pipeline/sweep_tradeoff.py). `records`:
    report these runs (for_grid's) instead of <out>/results.jsonl's. Runs with a gate analysis
    (sweep.gate_analysis): also gates.md, gates.json and gates.png (pipeline/sweep_gates.py)."""
    from mode_jax.pipeline import plots, sweep_curves, sweep_tradeoff
    out = Path(out)
    # a bad --x key is refused before anything is written
    records = read_results(out) if records is None else records
    curve_plan = sweep_curves.plan(records, x) if x is not None else None
    table = build(out, baseline=baseline, n_boot=n_boot, records=records, avg=avg)
    md = markdown(table)
    write_text_atomic(out / "table.md", md)
    write_text_atomic(out / "table.json", strict_json(table, indent=2, sort_keys=True) + "\n")
    if plots.available():
        _error_bars(table, out / "accuracy.png")
        if table["differences"]:
            _difference_bars(table, out / "differences.png")
    tradeoff = sweep_tradeoff.write(out, records, n_boot=n_boot)
    if tradeoff:
        md += "\n" + tradeoff
    if curve_plan is not None:
        md += "\n" + sweep_curves.write(out, table, curve_plan)
    if any(r.get("gate_analysis") for r in records):
        from mode_jax.pipeline import sweep_gates
        md += "\n" + sweep_gates.write(out, records)
    return md


def _panels(table, rows, value, title, ylabel, path, zero_line=False, label=lambda r: r["name"]):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    domains = table["domains"]
    fig, axes = plt.subplots(1, len(domains), figsize=(4.2 * len(domains), 4.5), squeeze=False)
    for ax, d in zip(axes[0], domains):
        kept = [(label(r), value(r, d)) for r in rows if value(r, d) is not None]
        est = np.array([100 * v["estimate"] for _, v in kept])
        err = np.array([[100 * (v["estimate"] - v["low"]) for _, v in kept],
                        [100 * (v["high"] - v["estimate"]) for _, v in kept]])
        ax.errorbar(np.arange(len(kept)), est, yerr=err, fmt="o", capsize=4, lw=1.2)
        if zero_line:
            ax.axhline(0.0, color="black", lw=0.8, ls="--")
        ax.set_xticks(range(len(kept)), [name for name, _ in kept], rotation=40, ha="right", fontsize=8)
        ax.set_title(d.capitalize())
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _error_bars(table, path):
    _panels(table, table["rows"], lambda r, d: r["domains"][d], "Accuracy with 95% bootstrap intervals "
            "(seeds x test documents)", "next-token accuracy (%)", path)


def _difference_bars(table, path):
    many = len(table["baselines"]) > 1
    _panels(table, table["differences"], lambda e, d: e["domains"][d],
            f"Paired difference against {' / '.join(table['baselines'])} (same seeds and documents), 95% intervals",
            "difference (points)", path, zero_line=True,
            label=lambda e: f"{e['name']} - {e['baseline']}" if many else e["name"])
