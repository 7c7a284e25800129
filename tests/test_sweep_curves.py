"""`mode-jax sweep report DIR --x KEY` (pipeline/sweep_curves.py) on hand-made results.jsonl
records: which cell goes in which series at which x, y values that are the table's own and
match a pooled accuracy computed by hand, 0 -> "all", refused keys, and a real PNG."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mode_jax.cli import main
from mode_jax.pipeline import sweep, sweep_curves
from tests.helpers import assert_refused
from tests.test_sweep import _record
from tests.tolerances import APPROX_FLOAT64

TOKENS = (10, 20, 30)     # uneven documents: the pooled accuracy is not the mean of per-document rates


def _cell(name, seed, correct, settings=(), fixed=(), params=5):
    """A record as the sweep writes it: `settings` are the keys the cell varies (also in its
    resolved config), `fixed` other resolved config keys."""
    r = _record(name, seed, correct, tokens=TOKENS)
    r["settings"] = dict(settings)
    for key, value in {**dict(fixed), **dict(settings)}.items():
        section, key = key.split(".")
        r["config"].setdefault(section, {})[key] = value
    r["result"]["params_trainable"] = params
    return r


EXAMPLES = [
    _cell("lora train_examples=480", 0, [7, 8, 9], {"data.train_examples": 480}),
    _cell("lora train_examples=160", 0, [6, 7, 8], {"data.train_examples": 160}),
    _cell("lora train_examples=0", 0, [8, 8, 9], {"data.train_examples": 0}),
    _cell("code expert stage1_examples=160", 0, [3, 4, 5], {"data.stage1_examples": 160}),
    _cell("code expert stage1_examples=160", 1, [4, 9, 6], {"data.stage1_examples": 160}),
    _cell("code expert stage1_examples=0", 0, [9, 9, 9], {"data.stage1_examples": 0}),
    _cell("full", 0, [5, 5, 6], fixed={"data.train_examples": 0}),
]


def _write(tmp_path, records):
    for r in records:
        sweep.append_result(tmp_path, r)


def _md_rows(path):
    """curves.md's table: (series, x, cell, seeds, Math) per row."""
    lines = [x for x in path.read_text().splitlines() if x.startswith("| ")][2:]   # past the head and its rule
    return [tuple(c.strip() for c in x.strip("|").split("|")) for x in lines]


def test_series_x_and_the_tables_numbers(tmp_path):
    _write(tmp_path, EXAMPLES)
    argv = ["sweep", "report", str(tmp_path), "--x", "data.train_examples,data.stage1_examples", "--n-boot", "200"]
    assert main(argv) == 0
    rows = _md_rows(tmp_path / "curves.md")
    # series: the name without the x setting, in x order with "all" last; full does not vary it
    assert [r[:4] for r in rows] == [
        ("lora", "160", "lora train_examples=160", "1"), ("lora", "480", "lora train_examples=480", "1"),
        ("lora", "all", "lora train_examples=0", "1"),
        ("code expert", "160", "code expert stage1_examples=160", "2"),
        ("code expert", "all", "code expert stage1_examples=0", "1"), ("full", "—", "full", "1")]
    # one seed: the pooled accuracy by hand, sum(correct) / sum(tokens), not the mean of the documents' rates
    assert rows[0][4].startswith(f"{100 * 21 / 60:.2f} [") and rows[1][4].startswith(f"{100 * 24 / 60:.2f} [")
    assert 100 * np.mean(np.array([6, 7, 8]) / TOKENS) != pytest.approx(100 * 21 / 60, abs=0.01)
    # every number is the table's own for the same cell (table.json, the same bootstrap)
    table = json.loads((tmp_path / "table.json").read_text())
    by_name = {r["name"]: r["domains"]["math"] for r in table["rows"]}
    for _, _, cell, _, math in rows:
        v = by_name[cell]
        assert math == f"{100 * v['estimate']:.2f} [{100 * v['low']:.2f}, {100 * v['high']:.2f}]"
    assert by_name["code expert stage1_examples=160"]["estimate"] == pytest.approx(
        (12 / 60 + 19 / 60) / 2, **APPROX_FLOAT64)
    curves = sweep_curves.build(table, sweep_curves.plan(sweep.read_results(tmp_path), "data.train_examples,"
                                                                                        "data.stage1_examples"))
    lora = curves["series"][0]["points"]
    assert [(p["x"], p["all_rows"]) for p in lora] == [(160, False), (480, False), (0, True)]
    assert lora[2]["domains"]["math"] == {k: by_name["lora train_examples=0"][k] for k in ("estimate", "low", "high")}
    assert [s["reference"] for s in curves["series"]] == [False, False, True]
    # "all": no row count in the records, one average step right of the largest value (linear: 160, 480 -> 800)
    assert sweep_curves._axis(curves)[:2] == (False, 800.0)
    png = (tmp_path / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image
    image = matplotlib.image.imread(tmp_path / "curves.png")
    assert image.shape[1] > image.shape[0] > 100 and image[..., :3].std() > 0.05


def test_all_on_a_log_axis(tmp_path):
    """160..4800 spans 30x: log x, and "all" one ratio step beyond 4800: 4800 * (4800/160)^(1/2)."""
    records = [_cell(f"lora train_examples={n}", 0, [6, 7, 8], {"data.train_examples": n}) for n in (160, 480, 4800, 0)]
    table = {"domains": ["math"], "answer_columns": [],
             "rows": [{"name": r["name"], "seeds": [0], "params_trainable": 5,
                       "domains": {"math": {"estimate": 0.5, "low": 0.4, "high": 0.6}}} for r in records]}
    curves = sweep_curves.build(table, sweep_curves.plan(records, "data.train_examples"))
    log, all_x, xs = sweep_curves._axis(curves)
    assert log and xs == [160.0, 480.0, 4800.0]
    assert all_x == pytest.approx(4800 * 30 ** 0.5, **APPROX_FLOAT64)


def test_series_names_match_the_grids_names(tmp_path):
    """Cells named by sweep.load_grid itself: the setting's token comes off the real name, for a
    config key, a learning rate, and `params` (numeric settings go, strings and lr stay)."""
    grid = tmp_path / "grid.toml"
    grid.write_text('[sweep]\nbase = "smoke"\nseeds = [0]\n\n[[sweep.cell]]\nmethod = "lora"\n'
                    '"lora.rank" = [4, 8]\n"lora.targets" = ["attn", "attn_mlp"]\n\n'
                    '[[sweep.cell]]\nmethod = "full"\nlr = [1e-3, 3e-3]\n')
    records = [{"name": c.name, "settings": dict(c.settings), "config": c.cfg.to_dict()}
               for c in sweep.load_grid(grid).cells]
    by_rank = {(s, c, x) for s, c, x, _ in sweep_curves.plan(records, "lora.rank")["cells"]}
    assert by_rank == {("lora targets=attn", "lora rank=4 targets=attn", 4),
                       ("lora targets=attn", "lora rank=8 targets=attn", 8),
                       ("lora targets=attn_mlp", "lora rank=4 targets=attn_mlp", 4),
                       ("lora targets=attn_mlp", "lora rank=8 targets=attn_mlp", 8),
                       ("full lr=0.001", "full lr=0.001", None), ("full lr=0.003", "full lr=0.003", None)}
    by_lr = {(s, x) for s, _, x, _ in sweep_curves.plan(records, "lr.full")["cells"]}
    assert ("full", 0.001) in by_lr and ("full", 0.003) in by_lr
    by_params = {s for s, _, _, _ in sweep_curves.plan(records, "params")["cells"]}
    assert by_params == {"lora targets=attn", "lora targets=attn_mlp", "full lr=0.001", "full lr=0.003"}


def test_params_takes_the_trained_column(tmp_path):
    records = [_cell("lora rank=8 targets=attn", 0, [6, 7, 8], {"lora.rank": 8, "lora.targets": "attn"}, params=300),
               _cell("lora rank=64 targets=attn", 0, [7, 7, 8], {"lora.rank": 64, "lora.targets": "attn"}, params=2400),
               _cell("backbone", 0, [5, 6, 7], params=0)]
    _write(tmp_path, records)
    assert main(["sweep", "report", str(tmp_path), "--x", "params", "--n-boot", "200"]) == 0
    rows = _md_rows(tmp_path / "curves.md")
    assert [r[:3] for r in rows] == [("lora targets=attn", "300", "lora rank=8 targets=attn"),
                                     ("lora targets=attn", "2,400", "lora rank=64 targets=attn"),
                                     ("backbone", "0", "backbone")]
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("key, needle", [
    ("lora.rnk", "no run in the results has this config key"),
    ("lora.rank", "no cell varies it"),                    # in every resolved config, varied by none
    ("lora.targets", "not numbers"),
])
def test_bad_key_is_refused_before_anything_is_written(tmp_path, capsys, key, needle):
    records = [_cell("lora targets=attn", 0, [6, 7, 8], {"lora.targets": "attn"}, fixed={"lora.rank": 16}),
               _cell("lora targets=mlp", 0, [6, 7, 9], {"lora.targets": "mlp"}, fixed={"lora.rank": 16})]
    _write(tmp_path, records)
    assert_refused(capsys, ["sweep", "report", str(tmp_path), "--x", key], tmp_path / "curves.md", key, needle)
    assert not (tmp_path / "table.md").exists()
