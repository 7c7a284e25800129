"""`mode-jax sweep report`: the adaptation / retention trade-off of every cell, as one picture.

The paper's claim is a trade-off: adapt to the target domains while keeping the general one.
Per cell this takes the mean accuracy over the cell's own target domains (what it adapted to)
and the mean over its own retention domains (what it should keep), each with a 95% bootstrap
interval over seeds and test documents (stats.average_over_domains: one draw of seeds shared
by the domains, documents drawn per domain). When the sweep has a `backbone` cell, both are also
taken as paired differences from it (same seeds, same documents, the cell's own domains): the
gain on the targets and the change on retention, whose intervals leave out the test documents'
shared difficulty and so are several times tighter. Writes

    tradeoff.md    cell, seeds, targets, retention, the two means and the two differences [interval]
    tradeoff.png   retention against targets, one labelled point per cell with both intervals:
                   the differences from the backbone (0, 0 = the backbone) when every cell has
                   them, else the means; labels placed off each other and the points (place_labels)

A cell's targets and retention are its own (`domains.targets` / `domains.retention` of its
config, as evaluated), so grids whose cells adapt to different domains (every permutation
of three domains: permutations-gpu.toml) put each method's held-out retention on one axis.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mode_jax.atomic import atomic_path, write_text_atomic
from mode_jax.pipeline import stats

BACKBONE = "backbone"


def _sides(run: dict) -> tuple[list[str], list[str]]:
    """(targets, retention) of a run, as evaluated: retention leaves out the run's targets."""
    evaluated = run["result"]["domains"]
    domains = run["config"]["domains"]
    targets = [d for d in domains["targets"] if d in evaluated]
    retention = [d for d in domains["retention"] if d in evaluated and d not in targets]
    return targets, retention


def build(records: list[dict], n_boot: int = stats.N_BOOT) -> list[dict[str, Any]]:
    """One row per cell with both sides evaluated: name, method, seeds, targets, retention, the
    two averages and, given a backbone cell, the two paired differences from it (Interval.to_dict();
    None where the backbone was not measured on the same seeds and documents)."""
    from mode_jax.pipeline.sweep_report import _groups, average
    groups = _groups(records)
    base = next((by_seed for by_seed in groups.values()
                 if next(iter(by_seed.values()))["method"] == BACKBONE), None)
    rows = []
    for name, by_seed in groups.items():
        runs = [by_seed[s] for s in sorted(by_seed)]
        targets, retention = _sides(runs[0])
        if not targets or not retention:
            continue
        row = {"name": name, "method": runs[0]["method"], "seeds": sorted(by_seed),
               "targets": targets, "retention": retention}
        # paired on the seeds both have; not the backbone with itself
        seeds = [s for s in sorted(by_seed) if base is not None and s in base and by_seed[s] is not base[s]]
        for side, domains in (("target", targets), ("retained", retention)):
            row[side] = average(runs, domains, n_boot)
            row[side + "_vs_backbone"] = None if not seeds else average(
                [by_seed[s] for s in seeds], domains, n_boot, base=[base[s] for s in seeds])
        rows.append(row)
    return rows


def _pct(v: dict | None, sign: str = "") -> str:
    if v is None:
        return "-"
    return f"{100 * v['estimate']:{sign}.2f} [{100 * v['low']:{sign}.2f}, {100 * v['high']:{sign}.2f}]"


def markdown(rows: list[dict]) -> str:
    lines = ["Adaptation against retention: per cell, the mean next-token accuracy (%) over its target "
             "domains and over its retention domains, and their paired differences (points) from the "
             "backbone (same seeds and documents; - where there is none) [95% bootstrap interval over "
             "seeds and test documents; the domains share each draw of seeds].", "",
             "| cell | seeds | targets | retention | targets mean | retention mean | targets - backbone "
             "| retention - backbone |",
             "| --- | ---: | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['name']} | {len(r['seeds'])} | {', '.join(r['targets'])} | "
                     f"{', '.join(r['retention'])} | {_pct(r['target'])} | {_pct(r['retained'])} | "
                     f"{_pct(r['target_vs_backbone'], '+')} | {_pct(r['retained_vs_backbone'], '+')} |")
    return "\n".join(lines) + "\n"


MARKERS = "osD^v<>pPX*h"


def axes(rows: list[dict]) -> tuple[tuple[str, str], list[dict]]:
    """What the picture draws: (x key, y key) and the rows drawn. The differences from the backbone,
    without the backbone's own row, if every other cell has them (a cell measured on other
    documents would silently drop out otherwise); else the means of every row."""
    others = [r for r in rows if r["method"] != BACKBONE]
    if others and all(r["target_vs_backbone"] and r["retained_vs_backbone"] for r in others):
        return ("target_vs_backbone", "retained_vs_backbone"), others
    return ("target", "retained"), rows


LABEL_PT = 7                                    # label font size, points
DPI = 120


def place_labels(points: list[tuple[float, float]], sizes: list[tuple[float, float]],
                 obstacles: list[tuple[float, float, float, float]] = (),
                 bounds: tuple[float, float, float, float] | None = None,
                 gap: float = 5.0) -> list[tuple[float, float]]:
    """Offsets (points, from each point to its label's lower left corner) for labels that keep
    off each other, off every point and inside `bounds` (a box: x, y, width, height; the axes)
    wherever they can, greedily in the order given. `points` and `sizes` (width, height of each
    label) are in points on the page. Each label tries right and left of its point at rising
    heights; among the positions that collide least with labels, points and the edge, the one
    nearest its point, crossing the fewest `obstacles` (boxes: error bars, which a label may cross)."""
    def overlap(a, b):
        w = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
        h = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
        return w * h if w > 0 and h > 0 else 0.0

    markers = [(x - 3.0, y - 3.0, 6.0, 6.0) for x, y in points]
    placed, offsets = [], []
    for (x, y), (w, h) in zip(points, sizes):
        best = None
        for dy in (1.0, -h - 1.0, h + 4.0, -2 * h - 4.0, 2 * h + 7.0, -3 * h - 7.0):
            for side, dx in enumerate((gap, -gap - w)):
                box = (x + dx, y + dy, w, h)
                hard = sum(overlap(box, o) for o in placed + markers)
                if bounds is not None:
                    hard += w * h - overlap(box, bounds)
                soft = 0.1 * sum(overlap(box, o) for o in obstacles) + 0.5 * abs(dy) + side
                if best is None or (hard, soft) < best[0]:
                    best = ((hard, soft), (dx, dy), box)
        placed.append(best[2])
        offsets.append(best[1])
    return offsets


def plot(rows: list[dict], path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys, shown = axes(rows)
    paired = keys[0] != "target"
    fig, ax = plt.subplots(figsize=(9.0, 6.5), dpi=DPI)   # text measured at the dpi it is saved at
    # per cell, ((x, low, high), (y, low, high)) in points of accuracy
    spans = [[[100 * r[k][q] for q in ("estimate", "low", "high")] for k in keys] for r in shown]
    for i, ((x, lo_x, hi_x), (y, lo_y, hi_y)) in enumerate(spans):
        ax.errorbar([x], [y], xerr=[[x - lo_x], [hi_x - x]], yerr=[[y - lo_y], [hi_y - y]],
                    fmt=MARKERS[i % len(MARKERS)], capsize=3, lw=1.0, color=f"C{i % 10}")
    if paired:
        ax.axvline(0.0, color="grey", ls="--", lw=0.8)
        ax.axhline(0.0, color="grey", ls="--", lw=0.8)
        ax.set_xlabel("gain on the cell's target domains over the backbone (points, paired)")
        ax.set_ylabel("change on the cell's retention domains from the backbone (points, paired)")
        title = "Adaptation against retention: paired differences from the backbone, 95% intervals"
    else:
        ax.set_xlabel("mean accuracy on the cell's target domains (%)")
        ax.set_ylabel("mean accuracy on the cell's retention domains (%)")
        title = "Adaptation against retention, 95% intervals"
    ax.set_title(title + " (seeds in brackets)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.margins(x=0.3, y=0.08)           # room for the labels beside the points
    fig.tight_layout()
    fig.canvas.draw()                   # the axes' limits are final: labels placed where they land

    def pt(pixels):                     # pixels -> points on the page
        return pixels * 72.0 / fig.dpi

    def on_page(x, y):                  # data -> points on the page
        return tuple(pt(ax.transData.transform([[x, y]])[0]))

    page, bars, labels = [], [], []
    for i, (r, ((x, lo_x, hi_x), (y, lo_y, hi_y))) in enumerate(zip(shown, spans)):
        (px, py), (x0, y0), (x1, y1) = on_page(x, y), on_page(lo_x, lo_y), on_page(hi_x, hi_y)
        page.append((px, py))
        bars += [(x0, py - 2.0, x1 - x0, 4.0), (px - 2.0, y0, 4.0, y1 - y0)]
        labels.append(ax.annotate(f"{r['name']} ({len(r['seeds'])})", (x, y), textcoords="offset points",
                                  xytext=(0, 0), fontsize=LABEL_PT, color=f"C{i % 10}"))   # moved below
    renderer = fig.canvas.get_renderer()
    sizes = [(pt(1.03 * e.width), pt(e.height))                        # 3%: rounding, hinting
             for e in (t.get_window_extent(renderer) for t in labels)]
    (ax0, ay0), (ax1, ay1) = pt(ax.transAxes.transform([[0, 0], [1, 1]]))
    for label, off in zip(labels, place_labels(page, sizes, bars, (ax0, ay0, ax1 - ax0, ay1 - ay0))):
        label.xyann = off
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    plt.close(fig)
    return path


def write(out: Path, records: list[dict], n_boot: int = stats.N_BOOT) -> str:
    """tradeoff.md and (with matplotlib) tradeoff.png in `out`; returns the markdown ('' when no
    cell has both target and retention domains)."""
    from mode_jax.pipeline import plots
    rows = build(records, n_boot=n_boot)
    if not rows:
        return ""
    md = markdown(rows)
    write_text_atomic(Path(out) / "tradeoff.md", md)
    if plots.available():
        plot(rows, Path(out) / "tradeoff.png")
    return md
