"""`mode-jax sweep`: grids refused before anything runs, grid expansion, and a tiny grid end
to end on the smoke preset (two cells, two seeds) with a SIGKILL mid-sweep, a resume that
skips the finished runs, and the report checked against the recorded counts."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from mode_jax.cli import main
from mode_jax.pipeline import checkpoint, presets, sweep, sweep_report
from tests.helpers import assert_refused
from tests.tolerances import APPROX_FLOAT64

GRID = """
[sweep]
base = "smoke"
seeds = [0, 1]
baseline = "full"
set = {{ "train.steps" = 6, "train.stage1_steps" = 4, "train.checkpoint_every" = 2 }}
{cells}
"""
TWO_CELLS = """
[[sweep.cell]]
method = "full"

[[sweep.cell]]
method = "lora"
lr = 3e-3
"""


def _grid(tmp_path, cells=TWO_CELLS, name="grid.toml", **fmt):
    path = tmp_path / name
    path.write_text(GRID.format(cells=cells, **fmt))
    return path


@pytest.mark.parametrize("cells,needle", [
    ('[[sweep.cell]]\nmethod = "full"\ntrain.stepz = 3\n', "unknown key 'train.stepz'"),
    ('[[sweep.cell]]\nmethod = "full"\nlr = [1e-3, 2.0]\n', "lr.full must be in"),
    ('[[sweep.cell]]\nmethod = "lora"\n"lora.rank" = []\n', "lora.rank is an empty axis"),
    ('[[sweep.cell]]\nmethod = "fine"\n', "method must be one of"),
    ('[[sweep.cell]]\nmethod = "backbone"\nlr = 1e-3\n', "takes no lr"),
    ('[[sweep.cell]]\nmethod = "full"\n[[sweep.cell]]\nmethod = "full"\n', "is the same run as"),
    ('[[sweep.cell]]\nmethod = "full"\n[[sweep.cell]]\nmethod = "full"\nlr = 1e-3\n', "are both named 'full'"),
    ('[[sweep.cell]]\nmethod = "expert"\n"domains.targets" = ["math", "code"]\n', "trains one expert"),
])
def test_bad_grid_is_refused_before_anything_runs(tmp_path, capsys, cells, needle):
    out = tmp_path / "out"
    assert_refused(capsys, ["sweep", str(_grid(tmp_path, cells)), "--out", str(out)], out, needle)


def test_bad_sweep_table_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    path = tmp_path / "g.toml"
    path.write_text('[sweep]\nbase = "smoke"\nseeds = []\n[[sweep.cell]]\nmethod = "full"\n')
    assert_refused(capsys, ["sweep", str(path), "--out", str(out)], out, "sweep.seeds is an empty axis")
    path.write_text('[sweep]\nbase = "smoke"\nrepeat = 2\n[[sweep.cell]]\nmethod = "full"\n')
    assert_refused(capsys, ["sweep", str(path), "--out", str(out)], out, "unknown key sweep.repeat")
    path.write_text('[sweep]\nbase = "smoke"\nbaseline = "ful"\n[[sweep.cell]]\nmethod = "full"\n')
    assert_refused(capsys, ["sweep", str(path), "--out", str(out)], out, "sweep.baseline 'ful'")
    path.write_text('[sweep]\nbase = "smoke"\n[[sweep.cell]]\nmethod = "full"\n')
    assert_refused(capsys, ["sweep", str(path), "--out", str(out), "--set", "train.stepz=3"], out,
                   "unknown key 'train.stepz'")
    assert_refused(capsys, ["sweep", str(path), "--out", str(out), "--set", "train.steps=0"], out,
                   "train.steps must be")


def test_grid_expansion(tmp_path):
    cells = ('[[sweep.cell]]\nmethod = "full"\nlr = [1e-3, 5e-5]\ntrain.warmup_steps = 2\n'
             '[[sweep.cell]]\nname = "mode-2x"\nmethod = "mode"\n"mode.gate_margin" = 4.0\n')
    path = _grid(tmp_path, cells)
    path.write_text(path.read_text().replace('baseline = "full"', 'baseline = "full lr=5e-05"'))
    grid = sweep.load_grid(path)
    base = presets.load_config(preset="smoke")
    got = [(c.name, c.seed, c.cfg.lr.full, c.cfg.train.warmup_steps, c.cfg.train.steps) for c in grid.cells]
    warm, lr = base.train.warmup_steps, base.lr.full
    # seed-major: a sweep stopped part-way holds whole seeds
    assert got == [("full lr=0.001", 0, 1e-3, 2, 6), ("full lr=5e-05", 0, 5e-5, 2, 6), ("mode-2x", 0, lr, warm, 6),
                   ("full lr=0.001", 1, 1e-3, 2, 6), ("full lr=5e-05", 1, 5e-5, 2, 6), ("mode-2x", 1, lr, warm, 6)]
    assert [c.cfg.train.seed for c in grid.cells] == [0, 0, 0, 1, 1, 1]
    assert grid.cells[2].cfg.mode.gate_margin == 4.0 and grid.cells[0].cfg.mode.gate_margin == base.mode.gate_margin
    ids = [c.id for c in grid.cells]
    assert len(set(ids)) == 6 and ids == [c.id for c in sweep.load_grid(grid.path).cells]
    # --set: over sweep.set, under the cells; where the data lies is not part of a run's identity
    moved = sweep.load_grid(path, ['data.dir="/elsewhere"', "train.warmup_steps=3", "train.steps=7"])
    assert [c.cfg.data.dir for c in moved.cells] == ["/elsewhere"] * 6
    assert [c.cfg.train.warmup_steps for c in moved.cells] == [2, 2, 3, 2, 2, 3]
    assert moved.cells[0].cfg.train.steps == 7 and moved.cells[0].id != ids[0]
    assert [c.id for c in sweep.load_grid(path, ['data.dir="/elsewhere"']).cells] == ids
    # how often a run checkpoints and logs is not what it computes: same runs
    assert [c.id for c in sweep.load_grid(path, ["train.checkpoint_every=0", "train.log_every=5"]).cells] == ids


def test_run_recorded_under_an_older_identity_still_counts(tmp_path):
    """A record stored under the id of an older identity (checkpoint_every and log_every were in
    it) answers to today's id through its stored config: resumed sweeps skip it, reports find it."""
    grid = sweep.load_grid(_grid(tmp_path, TWO_CELLS))
    cell = grid.cells[0]
    config = cell.cfg.to_dict()
    old = {**config, "data": {k: v for k, v in config["data"].items() if k != "dir"}}
    for key, default in sweep.LATER_DEFAULTS.items():          # as the old identity dropped them
        section, name = key.split(".")
        if old.get(section, {}).get(name) == default:
            old[section] = {k: v for k, v in old[section].items() if k != name}
    old = {k: v for k, v in old.items() if v != {}}
    old_id = hashlib.sha256(json.dumps({"method": cell.method, "config": old}, sort_keys=True).encode()).hexdigest()[:16]
    assert old_id != cell.id                    # the old identity hashed the checkpoint cadence
    record = {"cell": old_id, "method": cell.method, "config": config, "seed": cell.seed}
    assert sweep.recorded_ids(record) == {old_id, cell.id}
    assert [r["name"] for r in sweep_report.for_grid([record], grid)] == [cell.name]
    assert sweep.recorded_ids({"cell": "x", "method": cell.method}) == {"x"}     # no config: its stored id


def _env(tmp_path):
    return {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


def _lines(out):
    path = out / "results.jsonl"
    return path.read_text().splitlines() if path.is_file() else []


@pytest.mark.slow
def test_sweep_kill_resume_and_report(tmp_path):
    grid = _grid(tmp_path)
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "mode_jax.cli", "sweep", str(grid), "--out", str(out), "--quiet"]
    ids = [c.id for c in sweep.load_grid(grid).cells]
    proc = subprocess.Popen(cmd + ["--throttle", "0.3"], env=_env(tmp_path), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 240
    # Kill once one run is recorded and the next has a checkpoint: a finished run to skip
    # and an interrupted one to continue.
    while time.time() < deadline:
        done = {json.loads(x)["cell"] for x in _lines(out)}
        if done and any(checkpoint.latest(out / "cells" / i / "run" / "checkpoints") is not None
                        for i in ids if i not in done):
            break
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail("the sweep never got to a recorded run and a checkpoint of the next one")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    before = _lines(out)
    assert 1 <= len(before) < len(ids)
    finished = [json.loads(x)["cell"] for x in before]
    # Were a finished run re-run, its directory would come back.
    (out / "cells" / finished[0] / "run" / "result.json").unlink()

    subprocess.run(cmd, check=True, env=_env(tmp_path), timeout=300)
    after = _lines(out)
    assert after[:len(before)] == before
    assert not (out / "cells" / finished[0] / "run" / "result.json").exists()
    records = [json.loads(x) for x in after]
    assert sorted(r["cell"] for r in records) == sorted(ids)
    for r in records:
        assert r["config"]["train"]["seed"] == r["seed"] and r["result"]["train_steps"] == 6
        steps = [m["step"] for m in map(json.loads, (out / r["run_dir"] / "metrics.jsonl").read_text().splitlines())
                 if m.get("phase") == r["label"]]
        assert steps == list(range(1, 7))                   # the interrupted run resumed, no step twice
        assert not list((out / "cells" / r["cell"]).rglob("*.safetensors"))    # models dropped once recorded
    assert main(["sweep", str(grid), "--out", str(out), "--quiet"]) == 0     # nothing left: runs nothing
    assert _lines(out) == after

    assert main(["sweep", "report", str(out), "--n-boot", "500"]) == 0
    table = json.loads((out / "table.json").read_text())
    assert table["domains"] == ["math", "code", "english"] and table["baseline"] == "full"
    for row in table["rows"]:
        runs = sorted((r for r in records if r["name"] == row["name"]), key=lambda r: r["seed"])
        assert row["seeds"] == [0, 1]
        for d in table["domains"]:
            docs = [r["result"]["domains"][d]["per_document"] for r in runs]
            expected = np.mean([sum(x["correct"]) / sum(x["tokens"]) for x in docs])
            cell = row["domains"][d]
            assert cell["estimate"] == pytest.approx(expected, **APPROX_FLOAT64)
            assert cell["per_seed"] == pytest.approx([sum(x["correct"]) / sum(x["tokens"]) for x in docs],
                                                     **APPROX_FLOAT64)
            assert cell["low"] <= cell["estimate"] <= cell["high"] and cell["high"] > cell["low"]
            assert cell["unit"] == "document" and not cell["shared_documents"]   # synthetic: per-seed test set
    (diff,) = table["differences"]
    lora = next(r for r in table["rows"] if r["name"] == "lora")
    full = next(r for r in table["rows"] if r["name"] == "full")
    for d in table["domains"]:
        v = diff["domains"][d]
        assert v["estimate"] == pytest.approx(lora["domains"][d]["estimate"] - full["domains"][d]["estimate"],
                                             **APPROX_FLOAT64)
        assert v["excludes_zero"] == (v["low"] > 0 or v["high"] < 0)
    md = (out / "table.md").read_text()
    assert "| lora |" in md and "Paired differences against **full**" in md
    assert (out / "accuracy.png").stat().st_size > 0 and (out / "differences.png").stat().st_size > 0


@pytest.mark.slow
def test_mode_cells_share_their_experts(tmp_path):
    cells = ('[[sweep.cell]]\nmethod = "mode"\n[[sweep.cell]]\nmethod = "mode-frozen"\n"train.steps" = 3\n'
             '[[sweep.cell]]\nmethod = "expert"\n"domains.targets" = ["code"]\n')
    grid = _grid(tmp_path, cells)
    doc = grid.read_text().replace("seeds = [0, 1]", "seeds = [0]").replace('baseline = "full"', 'baseline = "mode"')
    grid.write_text(doc)
    out = tmp_path / "sweep"
    assert main(["sweep", str(grid), "--out", str(out), "--quiet", "--keep-models"]) == 0
    records = [json.loads(x) for x in _lines(out)]
    assert [r["method"] for r in records] == ["mode", "mode-frozen", "expert"]
    # a kept composed run loads in one call, its experts named by the domains they were trained on
    import mode_jax
    assert mode_jax.load("tiny", run=str(out / records[0]["run_dir"])).expert_names == ["backbone", "math", "code"]
    assert len(list((out / "experts").iterdir())) == 1                 # trained once, used three times
    expert = records.pop()
    assert expert["label"] == "expert-code" and expert["phases"] == {}
    assert expert["result"] == records[0]["phases"]["expert-code"]     # the same run, not a retrained one
    for r in records:
        assert set(r["phases"]) == {"expert-math", "expert-code"}
        assert r["phases"]["expert-math"]["train_steps"] == 4
        assert r["result"]["routing_columns"] == ["backbone", "math", "code"]
    assert records[1]["result"]["params_trainable"] < records[0]["result"]["params_trainable"]


@pytest.mark.slow
def test_time_limit_then_resume_and_seeds_reuse_compiled_steps(tmp_path, monkeypatch):
    """--time-limit stops inside a run (checkpoint written, nothing recorded); the same
    command again finishes it, and a later seed's run compiles nothing new (same shapes and
    static configs: jit's cache serves it). Seed 1 may compile once more: seed 0 resumed
    from a checkpoint, whose restored arrays can be laid out unlike freshly made ones."""
    import jax

    from mode_jax.pipeline import sweep_run

    cells = '[[sweep.cell]]\nmethod = "full"\n'
    grid = _grid(tmp_path, cells)
    grid.write_text(grid.read_text().replace("seeds = [0, 1]", "seeds = [0, 1, 2]"))
    out = tmp_path / "sweep"
    argv = ["sweep", str(grid), "--out", str(out), "--quiet"]
    assert main(argv + ["--time-limit", "1.5", "--throttle", "0.5"]) == 0
    assert _lines(out) == []
    (first,) = list((out / "cells").iterdir())
    assert checkpoint.latest(first / "run" / "checkpoints") is not None

    compiles, per_cell = [], {}
    listener = lambda name, secs, **kw: compiles.append(name) if "backend_compile" in name else None  # noqa: E731
    run_cell = sweep_run.run_cell

    def counted(cell, out, **kw):
        before = len(compiles)
        record = run_cell(cell, out, **kw)
        per_cell[cell.seed] = len(compiles) - before
        return record

    monkeypatch.setattr(sweep_run, "run_cell", counted)
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        assert main(argv) == 0
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    records = [json.loads(x) for x in _lines(out)]
    assert [r["seed"] for r in records] == [0, 1, 2] and records[0]["cell"] == first.name
    steps = [m["step"] for m in map(json.loads, (first / "run" / "metrics.jsonl").read_text().splitlines())
             if m.get("phase") == "full-ft"]
    assert steps == list(range(1, 7))
    assert per_cell[2] == 0 < per_cell[0], per_cell


def _record(name, seed, correct, ids=(0, 1, 2), tokens=(10, 10, 10), source="built"):
    docs = {"unit": "document", "ids": list(ids), "correct": list(correct), "tokens": list(tokens)}
    return {"cell": f"{name}-{seed}", "name": name, "method": "full", "seed": seed,
            "config": {"data": {"source": source}, "domains": {"targets": ["math"], "retention": []}},
            "result": {"params_trainable": 5, "domains": {"math": {"per_document": docs}}}}


def test_report_on_recorded_counts(tmp_path):
    """The report from hand-made records: estimates by hand, paired differences against two
    baselines mirror each other (same draws), other documents are not paired."""
    records = [_record("a", 0, [6, 7, 8]), _record("a", 1, [5, 7, 9]), _record("b", 0, [4, 7, 8]),
               _record("b", 1, [5, 6, 6]), _record("c", 0, [1, 2], ids=(0, 5), tokens=(10, 10)),
               _record("c", 1, [1, 2], ids=(0, 5), tokens=(10, 10))]
    for r in records:
        sweep.append_result(tmp_path, r)
    assert [json.loads(x) for x in _lines(tmp_path)] == records
    assert main(["sweep", "report", str(tmp_path), "--baseline", "a", "--baseline", "b", "--n-boot", "400"]) == 0
    table = json.loads((tmp_path / "table.json").read_text())
    rows = {r["name"]: r["domains"]["math"] for r in table["rows"]}
    assert rows["a"]["estimate"] == pytest.approx((21 / 30 + 21 / 30) / 2, **APPROX_FLOAT64)
    assert rows["b"]["estimate"] == pytest.approx((19 / 30 + 17 / 30) / 2, **APPROX_FLOAT64)
    assert rows["a"]["shared_documents"] and rows["a"]["per_seed"] == pytest.approx([0.7, 0.7], **APPROX_FLOAT64)
    diff = {(e["name"], e["baseline"]): e["domains"]["math"] for e in table["differences"]}
    ab, ba = diff[("b", "a")], diff[("a", "b")]
    assert ab["estimate"] == pytest.approx(-ba["estimate"], **APPROX_FLOAT64)
    assert ab["estimate"] == pytest.approx(-(0.7 - 0.6), **APPROX_FLOAT64)
    assert (ab["low"], ab["high"]) == pytest.approx((-ba["high"], -ba["low"]), **APPROX_FLOAT64)
    assert diff[("c", "a")] is None and diff[("c", "b")] is None
    # one domain: the average is that domain, and so is its paired difference
    full = {r["name"]: r for r in table["rows"]}
    assert {k: full["a"]["avg"][k] for k in ("estimate", "low", "high")} == \
        {k: rows["a"][k] for k in ("estimate", "low", "high")}
    avg = {(e["name"], e["baseline"]): e["avg"] for e in table["differences"]}
    assert avg[("b", "a")]["estimate"] == pytest.approx(ab["estimate"], **APPROX_FLOAT64) and avg[("c", "a")] is None
    md = (tmp_path / "table.md").read_text()
    assert md.count("Paired differences against") == 2 and "not paired" in md
    assert (tmp_path / "differences.png").stat().st_size > 0


def test_report_of_one_grid_in_a_shared_out(tmp_path, capsys):
    """Two grids that share runs (same configs, same run ids) in one --out: `report --grid`
    reports each grid's runs alone, named as that grid names them, into DIR/report-<grid>/."""
    a = _grid(tmp_path, TWO_CELLS, name="a.toml")
    b = tmp_path / "b.toml"     # the same full runs under another name, and a run a lacks
    b.write_text(GRID.format(cells='[[sweep.cell]]\nname = "ft"\nmethod = "full"\n'
                                   '[[sweep.cell]]\nname = "ft-fast"\nmethod = "full"\nlr = 1e-2\n')
                 .replace('baseline = "full"', 'baseline = "ft"'))
    grid_a, grid_b = sweep.load_grid(a), sweep.load_grid(b)
    full_a = {c.seed: c.id for c in grid_a.cells if c.name == "full"}
    assert full_a == {c.seed: c.id for c in grid_b.cells if c.name == "ft"}        # shared runs
    out = tmp_path / "out"
    counts = {"full": ([6, 7, 8], [5, 7, 9]), "lora": ([4, 7, 8], [5, 6, 6]), "ft-fast": ([9, 9, 8], [8, 9, 9])}
    for cell in grid_a.cells + tuple(c for c in grid_b.cells if c.name != "ft"):
        record = _record(cell.name, cell.seed, counts[cell.name][cell.seed])
        sweep.append_result(out, {**record, "cell": cell.id})
    assert main(["sweep", "report", str(out), "--grid", str(b), "--n-boot", "400"]) == 0
    table = json.loads((out / "report-b" / "table.json").read_text())
    rows = {r["name"]: r["domains"]["math"]["per_seed"] for r in table["rows"]}
    assert sorted(rows) == ["ft", "ft-fast"]
    assert rows["ft"] == pytest.approx([21 / 30, 21 / 30], **APPROX_FLOAT64)
    assert rows["ft-fast"] == pytest.approx([26 / 30, 26 / 30], **APPROX_FLOAT64)
    assert table["baselines"] == ["ft"] and not (out / "table.md").exists()
    assert main(["sweep", "report", str(out), "--grid", str(a), "--n-boot", "400"]) == 0
    rows = {r["name"] for r in json.loads((out / "report-a" / "table.json").read_text())["rows"]}
    assert rows == {"full", "lora"}
    other = tmp_path / "c.toml"
    other.write_text(GRID.format(cells='[[sweep.cell]]\nmethod = "lora"\nlr = 1e-2\n').replace('"full"', '"lora"'))
    capsys.readouterr()
    assert_refused(capsys, ["sweep", "report", str(out), "--grid", str(other)], out / "report-c",
                   "holds no finished run of")
