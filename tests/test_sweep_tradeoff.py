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
