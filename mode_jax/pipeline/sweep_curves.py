"""`mode-jax sweep report DIR --x KEY`: accuracy against a numeric setting, as curves.

The paper's Figure 3 (accuracy against trained parameters and against training examples),
Figure 5 (against stage-2 mixture examples) and Table 3 (blocks x expert layers) are grids
whose cells vary one number. This groups a sweep's cells into series and writes

    curves.md    series, x, cell, seeds, and per evaluation column the accuracy [95% interval]
    curves.png   one panel per evaluation column, one line per series with the intervals as
                 error bars (log x when the values span more than 10x)

KEY is a config key `section.name` that some cells vary (an axis of the grid), several
comma-separated (a cell's x is the first of them it varies: `data.train_examples,
data.stage1_examples` puts LoRA's and a stage-1 expert's examples on one axis), or `params`,
the run's trained parameters (the table's "trained" column). A series is the cell's name
with that key's setting removed ("lora train_examples=160" -> "lora"); for `params`, with
every numeric setting removed except learning rates (the size knobs go, so
"lora rank=8 targets=attn" -> "lora targets=attn"). A cell that does not vary the key
(full FT beside LoRA ranks) is a reference: a dashed horizontal line with its interval.

The y values are the table's own (sweep_report.build: stats.bootstrap_accuracy), never
recomputed here. data.train_examples / data.stage1_examples = 0 means every training row:
it is labelled "all"; results.jsonl holds no training row count, so it is drawn one
average step to the right of the largest value (one ratio step on a log axis).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mode_jax.atomic import atomic_path, write_text_atomic
from mode_jax.errors import UserError
from mode_jax.pipeline.sweep import _fmt, setting_label
from mode_jax.pipeline.sweep_report import _label

PARAMS = "params"
ALL_ROWS = ("data.train_examples", "data.stage1_examples")    # 0 = all of the domain's training rows


def parse_keys(text: str) -> list[str]:
    keys = [k.strip() for k in text.split(",") if k.strip()]
    if not keys:
        raise UserError(f"--x {text!r} names no key (a config key such as data.train_examples, or params)")
    if PARAMS in keys and len(keys) > 1:
        raise UserError(f"--x {text}: params is plotted alone, not with config keys")
    return keys


def _without(name: str, settings: dict) -> str:
    for key, value in settings.items():
        token = " " + setting_label(key, value)
        at = name.rfind(token)
        if at >= 0:
            name = name[:at] + name[at + len(token):]
    return name


def _lookup(config: dict, key: str):
    section, _, name = key.partition(".")
    return config.get(section, {}).get(name) if isinstance(config.get(section), dict) else None


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def plan(records: list[dict], text: str) -> dict[str, Any]:
    """Which cell goes in which series, at which x. Raises UserError (one line) for a key no
    run has, one no cell varies, or one whose values are not numbers."""
    keys = parse_keys(text)
    first: dict[str, dict] = {}
    for r in records:
        first.setdefault(r["name"], r)
    varied = sorted({k for r in first.values() for k in r.get("settings", {})})
    hint = f"(the cells vary: {', '.join(varied + [PARAMS])})"
    for key in [] if keys == [PARAMS] or not records else keys:     # no records: the table says so
        if not any(_lookup(r["config"], key) is not None for r in first.values()):
            raise UserError(f"--x {key}: no run in the results has this config key {hint}")
        if key not in varied:
            raise UserError(f"--x {key}: no cell varies it, so there is no curve to draw {hint}")
        bad = sorted({repr(r["settings"][key]) for r in first.values()
                      if key in r.get("settings", {}) and not _number(r["settings"][key])})
        if bad:
            raise UserError(f"--x {key}: its values are not numbers ({', '.join(bad)}); --x takes a numeric key")
    cells = []      # (series, cell name, x or None, all_rows)
    for name, r in first.items():
        settings = r.get("settings", {})
        if keys == [PARAMS]:
            size = {k: v for k, v in settings.items() if _number(v) and not k.startswith("lr.")}
            cells.append((_without(name, size), name, "params", False))
            continue
        key = next((k for k in keys if k in settings), None)
        if key is None:
            cells.append((name, name, None, False))         # a reference: it does not vary the key
            continue
        x = _lookup(r["config"], key)
        cells.append((_without(name, {key: settings[key]}), name, x, key in ALL_ROWS and x == 0))
    return {"keys": keys, "cells": cells}


def build(table: dict[str, Any], curve_plan: dict[str, Any]) -> dict[str, Any]:
    """The series with the table's numbers: [{name, reference, points: [{cell, x, all_rows,
    seeds, domains: {column: {estimate, low, high}}}]}], points in x order ("all" last)."""
    rows = {r["name"]: r for r in table["rows"]}
    columns = table["domains"] + table.get("answer_columns", [])
    series: dict[tuple, list] = {}
    for name, cell, x, all_rows in curve_plan["cells"]:
        row = rows[cell]
        if x == "params":
            x = row["params_trainable"]
        point = {"cell": cell, "x": x, "all_rows": all_rows, "seeds": len(row["seeds"]),
                 "domains": {d: {k: row["domains"][d][k] for k in ("estimate", "low", "high")} for d in columns}}
        series.setdefault((name, x is None), []).append(point)
    names = [n for n, _ in series]
    out = []
    for (name, reference), points in series.items():
        points.sort(key=lambda p: (p["all_rows"], p["x"] if p["x"] is not None else 0))
        shown = name + " (fixed)" if reference and names.count(name) > 1 else name
        out.append({"name": shown, "reference": reference, "points": points})
    keys = curve_plan["keys"]
    return {"keys": keys, "columns": columns, "series": out,
            "xlabel": "trained parameters" if keys == [PARAMS] else " / ".join(keys)}


def _x_text(p: dict) -> str:
    if p["x"] is None:
        return "—"
    return "all" if p["all_rows"] else f"{p['x']:,}" if isinstance(p["x"], int) else _fmt(p["x"])


def markdown(curves: dict[str, Any]) -> str:
    head = ["series", curves["xlabel"], "cell", "seeds"] + [_label(d) for d in curves["columns"]]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join([" --- "] * len(head)) + "|"]
    for s in curves["series"]:
        for p in s["points"]:
            cells = [s["name"], _x_text(p), p["cell"], str(p["seeds"])]
            cells += [f"{100 * v['estimate']:.2f} [{100 * v['low']:.2f}, {100 * v['high']:.2f}]"
                      for v in (p["domains"][d] for d in curves["columns"])]
            lines.append("| " + " | ".join(cells) + " |")
    notes = [f"Accuracy, % (mean over seeds) against {curves['xlabel']} [95% bootstrap interval over seeds "
             "and test units], the numbers of table.md; a series is a cell name without the x setting; "
             "x \"—\": the cell does not vary it (a dashed reference line in curves.png)."]
    if any(p["all_rows"] for s in curves["series"] for p in s["points"]):
        notes.append("x \"all\" (0): every training row; the results hold no row count, so curves.png "
                     "draws it one step right of the largest value.")
    return "\n".join([" ".join(notes), "", *lines, ""])


def _axis(curves: dict[str, Any]) -> tuple[bool, float | None, list[float]]:
    """Log x when the plotted values span more than 10x (and none is <= 0); where "all" goes;
    the distinct plotted values."""
    lines = [p for s in curves["series"] if len(s["points"]) > 1 for p in s["points"] if not p["all_rows"]]
    singles = [s["points"][0]["x"] for s in curves["series"] if len(s["points"]) == 1 and s["points"][0]["x"]]
    xs = sorted({float(p["x"]) for p in lines} | {float(x) for x in singles if x > 0})
    log = bool(xs) and xs[0] > 0 and all(p["x"] > 0 for p in lines) and xs[-1] / xs[0] > 10
    if not any(p["all_rows"] for s in curves["series"] for p in s["points"]):
        return log, None, xs
    if len(xs) < 2:
        return log, 2 * xs[-1] if xs else 1.0, xs
    # one average step beyond the largest value: a ratio on a log axis, a difference on a linear one
    step = (xs[-1] / xs[0]) ** (1 / (len(xs) - 1)) if log else (xs[-1] - xs[0]) / (len(xs) - 1)
    return log, xs[-1] * step if log else xs[-1] + step, xs


def plot(curves: dict[str, Any], path: Path) -> Path:
    from matplotlib.ticker import EngFormatter, NullFormatter

    from mode_jax.pipeline.plots import _plt
    plt = _plt()
    columns = curves["columns"]
    log, all_x, xs = _axis(curves)
    lines = [i for i, s in enumerate(curves["series"]) if s["points"][0]["x"] is not None]
    # Series sharing an x are shifted sideways by a hair so one's error bar does not hide
    # another's; the ticks stay at the true values.
    width = 0.0 if len(lines) < 2 or len(xs) < 2 else min(0.012, 0.06 / len(lines)) * (
        np.log10(xs[-1] / xs[0]) if log else xs[-1] - xs[0])
    fig, axes = plt.subplots(1, len(columns), figsize=(4.6 * len(columns), 4.4), squeeze=False)
    positions = set()
    for ax, d in zip(axes[0], columns):
        for i, s in enumerate(curves["series"]):
            color, pts = f"C{i % 10}", s["points"]
            v = [p["domains"][d] for p in pts]
            if len(pts) == 1 and (pts[0]["x"] is None or (log and pts[0]["x"] <= 0)):
                ax.axhline(100 * v[0]["estimate"], color=color, ls="--", lw=1.2, label=s["name"])
                ax.axhspan(100 * v[0]["low"], 100 * v[0]["high"], color=color, alpha=0.12, lw=0)
                continue
            x = np.array([all_x if p["all_rows"] else p["x"] for p in pts], np.float64)
            positions.update(x.tolist())
            shift = width * (lines.index(i) - (len(lines) - 1) / 2)
            x = x * 10 ** shift if log else x + shift
            y = np.array([100 * e["estimate"] for e in v])
            err = [[100 * (e["estimate"] - e["low"]) for e in v], [100 * (e["high"] - e["estimate"]) for e in v]]
            measured = np.array([not p["all_rows"] for p in pts])
            ax.errorbar(x, y, yerr=err, fmt="o" if len(pts) > 1 else "s", color=color, capsize=3, ms=4,
                        label=s["name"])
            ax.plot(x[measured], y[measured], color=color, lw=1.3)
            if measured.any() and not measured.all():
                # "all" is not a measured distance along the axis: a dotted link to it
                last = np.flatnonzero(measured)[-1]
                ax.plot([x[last], x[-1]], [y[last], y[-1]], color=color, lw=1.0, ls=":")
        if log:
            ax.set_xscale("log")
        if curves["keys"] == [PARAMS]:
            ax.xaxis.set_major_formatter(EngFormatter())
        elif 0 < len(positions) <= 12:
            # the grid's own values as ticks ("all" where it is drawn), not the axis' round numbers
            ticks = sorted(positions)
            ax.set_xticks(ticks, ["all" if t == all_x else _fmt(t) for t in ticks], fontsize=8)
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(_label(d))
        ax.set_xlabel(curves["xlabel"])
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("next-token accuracy (%), 95% interval")
    axes[0][0].legend(fontsize=7, loc="best")
    fig.suptitle(f"Accuracy against {curves['xlabel']} (mean over seeds; bootstrap over seeds x test documents)",
                 fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return path


def write(out: Path, table: dict[str, Any], curve_plan: dict[str, Any]) -> str:
    """curves.md and (with matplotlib) curves.png in `out`; returns the markdown."""
    from mode_jax.pipeline import plots
    curves = build(table, curve_plan)
    md = markdown(curves)
    write_text_atomic(Path(out) / "curves.md", md)
    if plots.available():
        plot(curves, Path(out) / "curves.png")
    return md
