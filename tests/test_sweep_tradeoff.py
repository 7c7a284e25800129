"""The adaptation / retention trade-off of `mode-jax sweep report` (pipeline/sweep_tradeoff.py) on
hand-made records: each cell's own targets and retention, means that match pooled accuracies
computed by hand, intervals that hold them, cells without a retention domain left out, a real PNG."""

from __future__ import annotations

import numpy as np
import pytest

from mode_jax.cli import main
from mode_jax.pipeline import sweep, sweep_tradeoff
from tests.tolerances import APPROX_FLOAT64

IDS, TOKENS = (0, 1, 2, 3), (12, 30, 7, 21)      # uneven documents: pooling is not the mean of rates


def _record(name, seed, method, targets, retention, correct):
    """A run evaluated on every domain in `correct` ({domain: per-document correct counts})."""
    domains = {d: {"per_document": {"unit": "document", "ids": list(IDS), "correct": list(c),
                                    "tokens": list(TOKENS)}} for d, c in correct.items()}
    return {"cell": f"{name}-{seed}", "name": name, "method": method, "seed": seed,
            "config": {"data": {"source": "built"}, "domains": {"targets": targets, "retention": retention}},
            "result": {"params_trainable": 5, "domains": domains}}


def _draw(rng):
    return {d: rng.integers(0, np.array(TOKENS) + 1) for d in ("math", "code", "english", "modern")}


def _pooled(runs, domain):
    """The pooled accuracy of `domain`, mean over seeds (each seed: sum correct / sum tokens)."""
    return np.mean([sum(r["result"]["domains"][domain]["per_document"]["correct"]) / sum(TOKENS) for r in runs])


def test_each_cell_its_own_sides(tmp_path):
    rng = np.random.default_rng(7)
    cells = {   # name: (method, targets, retention); the permutation cell adapts to other domains
        "backbone": ("backbone", ["math", "code"], ["english", "modern"]),
        "mode-2x": ("mode", ["math", "code"], ["english", "modern"]),
        "full math+english": ("full", ["math", "english"], ["code", "modern"]),
        "expert math": ("expert", ["math"], ["math", "english"]),          # its target listed as retention too
        "targets only": ("full", ["math"], []),
    }
    records = [_record(n, s, m, t, r, _draw(rng)) for n, (m, t, r) in cells.items() for s in (0, 1)]
    for r in records:
        sweep.append_result(tmp_path, r)
    assert main(["sweep", "report", str(tmp_path), "--n-boot", "300"]) == 0
    rows = {r["name"]: r for r in sweep_tradeoff.build(sweep.read_results(tmp_path), n_boot=300)}
    assert "targets only" not in rows                                   # nothing to retain: left out
    assert rows["full math+english"]["retention"] == ["code", "modern"]
    assert rows["expert math"]["retention"] == ["english"]              # a target is never its own retention
    for name, row in rows.items():
        runs = [r for r in records if r["name"] == name]
        for side, domains in (("target", row["targets"]), ("retained", row["retention"])):
            want = np.mean([_pooled(runs, d) for d in domains])
            v = row[side]
            assert v["estimate"] == pytest.approx(want, **APPROX_FLOAT64)
            assert v["low"] <= v["estimate"] <= v["high"] and v["high"] - v["low"] > 0
            # paired with the backbone on the same seeds and documents, on this cell's own domains
            d = row[side + "_vs_backbone"]
            if name == "backbone":
                assert d is None
                continue
            base = [r for r in records if r["name"] == "backbone"]
            assert d["estimate"] == pytest.approx(want - np.mean([_pooled(base, x) for x in domains]),
                                                  **APPROX_FLOAT64)
            assert d["low"] <= d["estimate"] <= d["high"]
    md = (tmp_path / "tradeoff.md").read_text()
    assert md.count("\n| ") == 2 + len(rows)                          # head, rule, one line a cell
    e, g = rows["full math+english"]["retained"], rows["full math+english"]["target_vs_backbone"]
    assert f"| {100 * e['estimate']:.2f} [{100 * e['low']:.2f}, {100 * e['high']:.2f}] |" in md
    assert f"| {100 * g['estimate']:+.2f} [{100 * g['low']:+.2f}, {100 * g['high']:+.2f}] |" in md
    assert (tmp_path / "tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the picture: differences from the backbone for every other cell
    keys, shown = sweep_tradeoff.axes(list(rows.values()))
    assert keys == ("target_vs_backbone", "retained_vs_backbone") and "backbone" not in {r["name"] for r in shown}
    # one cell measured on other documents: no pairing for it, so the picture falls back to the means
    other = [_record("elsewhere", s, "full", ["math", "code"], ["english", "modern"], _draw(rng)) for s in (0, 1)]
    for r in other:
        r["result"]["domains"]["math"]["per_document"]["ids"] = [9, 8, 7, 6]
    mixed = sweep_tradeoff.build(records + other, n_boot=100)
    assert next(r for r in mixed if r["name"] == "elsewhere")["target_vs_backbone"] is None
    keys, shown = sweep_tradeoff.axes(mixed)
    assert keys == ("target", "retained") and len(shown) == len(mixed)
    # a cell evaluated on a domain the backbone never saw: no pairing on that side, no KeyError
    new = [_record("new domain", s, "full", ["math", "code"], ["french"], {**_draw(rng), "french": [1, 2, 3, 4]})
           for s in (0, 1)]
    (row,) = [r for r in sweep_tradeoff.build(records + new, n_boot=100) if r["name"] == "new domain"]
    assert row["target_vs_backbone"] is not None and row["retained_vs_backbone"] is None


def test_paired_differences_are_tighter_when_cells_share_difficulty(tmp_path):
    """Documents of very different difficulty, a cell that is the backbone plus a little: the
    absolute means carry the documents' spread, the paired differences do not."""
    rng = np.random.default_rng(11)
    hard = {d: np.array(TOKENS) * np.array([0.1, 0.9, 0.2, 0.8]) for d in ("math", "code", "english", "modern")}
    for s in (0, 1, 2):
        base = {d: np.floor(v).astype(int) for d, v in hard.items()}
        cell = {d: np.minimum(v + rng.integers(0, 3, len(IDS)), TOKENS) for d, v in base.items()}
        sweep.append_result(tmp_path, _record("backbone", s, "backbone", ["math", "code"], ["english", "modern"], base))
        sweep.append_result(tmp_path, _record("tuned", s, "full", ["math", "code"], ["english", "modern"], cell))
    (row,) = [r for r in sweep_tradeoff.build(sweep.read_results(tmp_path), n_boot=400) if r["name"] == "tuned"]
    for side in ("target", "retained"):
        width = lambda v: v["high"] - v["low"]      # noqa: E731
        assert width(row[side + "_vs_backbone"]) < 0.5 * width(row[side])
        assert row[side + "_vs_backbone"]["low"] > 0        # the cell is never below the backbone


def test_no_retention_no_files(tmp_path):
    rng = np.random.default_rng(3)
    for s in (0, 1):
        sweep.append_result(tmp_path, _record("a", s, "full", ["math"], [], _draw(rng)))
    assert main(["sweep", "report", str(tmp_path), "--n-boot", "100"]) == 0
    assert (tmp_path / "table.md").exists() and not (tmp_path / "tradeoff.md").exists()


def _boxes_overlap(a, b):
    """Two (x, y, width, height) boxes share area (touching edges do not count)."""
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def test_labels_of_a_cluster_keep_off_each_other_and_the_points():
    rng = np.random.default_rng()                   # fresh points: the layout must hold for any cluster
    for _ in range(20):
        n = int(rng.integers(2, 7))
        centre = rng.uniform(100, 500, size=2)
        points = [tuple(centre + rng.uniform(-8, 8, size=2)) for _ in range(n)]   # closer than a label's height
        sizes = [(float(rng.uniform(40, 160)), 8.4) for _ in range(n)]
        offsets = sweep_tradeoff.place_labels(points, sizes)
        boxes = [(x + dx, y + dy, w, h) for (x, y), (dx, dy), (w, h) in zip(points, offsets, sizes)]
        markers = [(x - 3, y - 3, 6, 6) for x, y in points]
        for i, b in enumerate(boxes):
            assert not any(_boxes_overlap(b, o) for o in boxes[:i] + boxes[i + 1:]), (points, sizes, offsets)
            assert not any(_boxes_overlap(b, m) for m in markers), (points, sizes, offsets)


def test_a_label_sits_beside_its_point_on_the_side_without_an_error_bar():
    (dx, dy), = sweep_tradeoff.place_labels([(200.0, 300.0)], [(80.0, 8.4)])
    assert dx > 3 and -3 < dy < 3                   # right of the point, level with it
    bar = (202.0, 298.0, 120.0, 4.0)                # the right half of a wide horizontal error bar
    (dx, dy), = sweep_tradeoff.place_labels([(200.0, 300.0)], [(80.0, 8.4)], [bar])
    assert dx < -80 and -3 < dy < 3                 # left of the point, level with it: crossing nothing
    boxed = [(120.0, 290.0, 160.0, 20.0)]           # the point's whole row taken: the label moves up or down
    (dx, dy), = sweep_tradeoff.place_labels([(200.0, 300.0)], [(80.0, 8.4)], boxed)
    assert not _boxes_overlap((200.0 + dx, 300.0 + dy, 80.0, 8.4), boxed[0])


def test_a_label_at_the_right_edge_goes_left_of_its_point():
    axes = (0.0, 0.0, 400.0, 300.0)
    (dx, dy), = sweep_tradeoff.place_labels([(380.0, 150.0)], [(90.0, 8.4)], bounds=axes)
    box = (380.0 + dx, 150.0 + dy, 90.0, 8.4)
    assert box[0] >= 0.0 and box[0] + box[2] <= 400.0 and dx < 0
