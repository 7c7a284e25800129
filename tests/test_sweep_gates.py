"""sweep.gate_analysis (pipeline/sweep_gates.py): bad values refused, run ids unchanged, the
report's means and spreads on hand-made records, a deferred trace, and a tiny smoke sweep (a
MoDE cell and a full cell, two seeds) whose records' gate statistics equal a float64 NumPy
recomputation from ref/'s gate probabilities of the saved models, and whose gates.md shows the
records' means over seeds."""

from __future__ import annotations

import json
import time

import jax
import numpy as np
import pytest

from mode_jax.cli import main
from mode_jax.pipeline import sweep, sweep_gates
from tests.helpers import assert_refused
from tests.tolerances import APPROX_FLOAT64, ARGMAX_TIE_MARGIN, assert_close

GRID = """
[sweep]
base = "smoke"
seeds = [0, 1]
{option}
set = {{ "train.steps" = 4, "train.stage1_steps" = 2, "train.checkpoint_every" = 2 }}

[[sweep.cell]]
name = "mode-2x"
method = "mode"

[[sweep.cell]]
method = "full"
"""


def _grid(tmp_path, option="gate_analysis = 2", name="grid.toml"):
    path = tmp_path / name
    path.write_text(GRID.format(option=option))
    return path


@pytest.mark.parametrize("value", ["-1", '"yes"', "true", "1.5"])
def test_bad_value_is_refused(tmp_path, capsys, value):
    out = tmp_path / "out"
    assert_refused(capsys, ["sweep", str(_grid(tmp_path, f"gate_analysis = {value}")), "--out", str(out)], out,
                   "sweep.gate_analysis must be an integer >= 0")


def test_option_leaves_run_ids_alone(tmp_path):
    plain = sweep.load_grid(_grid(tmp_path, "", name="plain.toml"))
    for option, want in (("gate_analysis = 0", 0), ("gate_analysis = 50", 50)):
        grid = sweep.load_grid(_grid(tmp_path, option))
        assert grid.gate_analysis == want
        assert [c.id for c in grid.cells] == [c.id for c in plain.cells]
    assert plain.gate_analysis is None


def test_a_cell_overrides_the_grids_gate_analysis(tmp_path, capsys):
    """A cell's own gate_analysis (a trace for one cell, statistics for the rest) wins over the
    grid's, reaches run_cell, and leaves the run ids alone; a bad one is refused."""
    path = _grid(tmp_path, "gate_analysis = 0")
    path.write_text(path.read_text().replace('method = "mode"\n', 'method = "mode"\ngate_analysis = 25\n'))
    grid = sweep.load_grid(path)
    assert {(c.name, c.gate_analysis) for c in grid.cells} == {("mode-2x", 25), ("full", 0)}
    assert [c.id for c in grid.cells] == [c.id for c in sweep.load_grid(_grid(tmp_path, "", "plain.toml")).cells]
    path.write_text(path.read_text().replace("gate_analysis = 25", "gate_analysis = -3"))
    out = tmp_path / "out"
    assert_refused(capsys, ["sweep", str(path), "--out", str(out)], out, "cell 1: gate_analysis must be an integer >= 0")


def _report(entropy, own, top, trace=None):
    """One seed's gate analysis: 2 blocks, columns backbone/math/code, domains math, english."""
    return {"columns": ["backbone", "math", "code"], "trace": trace, "domains": {
        "math": {"entropy": entropy, "own_top_share": own, "backbone_top": top},
        "english": {"entropy": [e + 0.5 for e in entropy], "own_top_share": None, "backbone_top": top[::-1]}}}


def _trace(scale):
    # routing[domain][block][column]: math's own column 1, english's backbone column 0
    return [{"step": s, "routing": {"math": [[0.0, scale * s, 0.1], [0.0, 0.2 * s, 0.1]],
                                    "english": [[0.9 - 0.1 * s, 0.0, 0.0], [0.5, 0.0, 0.0]]}} for s in (0, 2)]


def test_report_of_hand_made_records(tmp_path):
    seed0 = _report([0.2, 0.4], [0.5, 0.75], [0.1, 0.3], _trace(0.1))
    seed1 = _report([0.4, 0.6], [0.25, 1.0], [0.3, 0.5], _trace(0.3))
    records = [{"name": "mode-2x", "seed": 0, "gate_analysis": seed0},
               {"name": "mode-2x", "seed": 1, "gate_analysis": seed1}, {"name": "full", "seed": 0}]
    md = sweep_gates.write(tmp_path, records)
    rows = {r["domain"]: r for r in json.loads((tmp_path / "gates.json").read_text())}
    assert set(rows) == {"math", "english"} and rows["math"]["seeds"] == [0, 1]
    m = rows["math"]
    assert m["entropy"]["mean"] == pytest.approx([0.3, 0.5], **APPROX_FLOAT64)
    assert (m["own_top_share"]["min"], m["own_top_share"]["max"]) == ([0.25, 0.75], [0.5, 1.0])
    assert rows["english"]["own_top_share"] is None
    assert rows["english"]["backbone_top"]["mean"] == pytest.approx([0.4, 0.2], **APPROX_FLOAT64)
    # trace: math on its own column (block 0: 0.1 s and 0.3 s -> mean 0.2 s), english on the backbone
    assert m["trace"]["steps"] == [0, 2] and m["trace"]["seeds"] == 2
    for got, want in ((m, [[0.0, 0.4], [0.0, 0.4]]), (rows["english"], [[0.9, 0.7], [0.5, 0.5]])):
        assert [pytest.approx(w, **APPROX_FLOAT64) for w in want] == got["trace"]["weight"]
    assert "| mode-2x | math | 2 | 0.300 [0.200, 0.400] | 0.500 [0.400, 0.600] |" in md
    assert "| mode-2x | english | 2 | - | - |" in md
    assert "| mode-2x | english | backbone | 2 | 0-2 | 0.900 -> 0.700 | 0.500 -> 0.500 |" in md
    assert (tmp_path / "gates.md").read_text() == md and (tmp_path / "gates.png").stat().st_size > 0


def test_trace_past_the_deadline_waits(tmp_path):
    """No time left for a trace (estimated as the run's training time): nothing computed,
    nothing written, the record waits for the next call."""
    got = sweep_gates.analyse_cell(None, tmp_path, {"train_seconds": 30.0}, every=10, deadline=time.time() + 5)
    assert got is None and not (tmp_path / sweep_gates.FILE).exists()
    # An analysis saved with the same setting (a sweep killed before recording the run) is reused.
    saved = _report([0.2, 0.4], [0.5, 0.75], [0.1, 0.3])
    (tmp_path / sweep_gates.FILE).write_text(json.dumps({**saved, "trace_every": 10}))
    assert sweep_gates.analyse_cell(None, tmp_path, {"train_seconds": 30.0}, every=10,
                                    deadline=time.time() + 5) == {**saved, "trace_every": 10}


def _ref_stats(run_dir, result):
    """float64 NumPy statistics from ref/'s gate probabilities of the saved model, on the
    run's evaluation rows: {domain: [(entropy, own_top, backbone_top, expert_ties, top_ties)] per
    block},
    and each domain's mean routing on its first 4 rows (the trace's probe)."""
    from mode_jax.pipeline import expert_io, presets, sources, stages
    from mode_jax.ref.mode import mode_hidden
    cfg = sources.resolve_domains(presets.load_config(config=str(run_dir / "config.toml")))
    ctx = stages.prepare(cfg, cfg.domains.targets, progress=False)
    params, _, _ = expert_io.load_model(run_dir / "model.safetensors", ctx.backbone.params,
                                        fingerprint=ctx.backbone.fingerprint)
    params = jax.tree.map(np.asarray, params)
    columns = result["routing_columns"]
    margin = float(ARGMAX_TIE_MARGIN[np.dtype(np.float32)])
    out, probe = {}, {}
    for d, rows in ctx.eval_sets.items():
        _, probs = mode_hidden(params, rows[:, :-1], ctx.llama, return_probs=True)
        stats = []
        for p in probs:                                          # [n, T, E] per block
            p = np.asarray(p, np.float64).reshape(-1, p.shape[-1])
            ent = float(np.mean([-sum(x * np.log(x) for x in row if x > 0) for row in p]))
            own = columns.index(d) if d in columns[1:] else None
            # tokens whose two largest (expert; any) weights tie within float32 may go either way
            experts, every = np.sort(p[:, 1:], axis=-1), np.sort(p, axis=-1)
            ties = float(np.mean(experts[:, -1] - experts[:, -2] < margin)) if p.shape[1] > 2 else 0.0
            top_ties = float(np.mean(every[:, -1] - every[:, -2] < margin))
            stats.append((ent, None if own is None else float(np.mean(p[:, 1:].argmax(-1) + 1 == own)),
                          float(np.mean(p.argmax(-1) == 0)), ties, top_ties))
        out[d] = stats
        probe[d] = [np.asarray(p[:4], np.float64).mean((0, 1)) for p in probs]
    return out, probe


@pytest.mark.slow
def test_sweep_records_gate_analysis(tmp_path, capsys):
    out = tmp_path / "sweep"
    grid = _grid(tmp_path)
    assert main(["sweep", str(grid), "--out", str(out), "--quiet", "--keep-models"]) == 0
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted((r["name"], r["seed"]) for r in records) == [("full", 0), ("full", 1), ("mode-2x", 0),
                                                              ("mode-2x", 1)]
    assert [r["cell"] for r in records] == [c.id for c in sweep.load_grid(_grid(tmp_path, "", "plain.toml")).cells]
    for r in records:
        if r["method"] == "full":
            assert "gate_analysis" not in r
            continue
        run_dir = out / r["run_dir"]
        gates = r["gate_analysis"]
        assert json.loads((run_dir / sweep_gates.FILE).read_text()) == gates
        assert gates["columns"] == ["backbone", "math", "code"] and gates["trace_every"] == 2
        want, probe = _ref_stats(run_dir, r["result"])
        assert set(gates["domains"]) == set(want) == {"math", "code", "english"}
        for d, blocks in want.items():
            got = gates["domains"][d]
            # float32 gate weights from two forwards (fast path, ref/): float32's tolerance
            assert_close(got["entropy"], [b[0] for b in blocks], dtype=np.float32)
            for g, (_, own, top, ties, top_ties) in zip(got["backbone_top"], blocks):
                assert abs(g - top) <= top_ties + APPROX_FLOAT64["abs"]
            if d == "english":
                assert got["own_top_share"] is None
            else:
                for g, (_, own, _, ties, _) in zip(got["own_top_share"], blocks):
                    assert abs(g - own) <= ties + APPROX_FLOAT64["abs"]
        # the trace replays stage 2: steps 0, 2, 4, ending at the saved model's routing
        assert [p["step"] for p in gates["trace"]] == [0, 2, 4]
        for d in want:
            assert_close(np.asarray(gates["trace"][-1]["routing"][d]), np.asarray(probe[d]))
    capsys.readouterr()
    assert main(["sweep", "report", str(out), "--n-boot", "200"]) == 0
    md = (out / "gates.md").read_text()
    mode = [r["gate_analysis"] for r in records if r["method"] == "mode"]
    for key in ("entropy", "backbone_top"):
        for d in ("math", "english"):
            v = np.array([g["domains"][d][key] for g in mode])           # [seeds, blocks]
            cells = " | ".join(f"{m:.3f} [{lo:.3f}, {hi:.3f}]" for m, lo, hi in zip(v.mean(0), v.min(0), v.max(0)))
            assert f"| mode-2x | {d} | 2 | {cells} |" in md
    assert "full" not in md and (out / "gates.png").stat().st_size > 0
