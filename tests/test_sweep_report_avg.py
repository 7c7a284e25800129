"""`mode-jax sweep report --avg DOMAINS`: the avg column and the paired avg differences over the
chosen domains only (the paper's average is Math, Code, English), against hand computations; a
domain not evaluated in every run is refused before anything is written."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mode_jax.cli import main
from mode_jax.pipeline import sweep
from tests.test_sweep_tradeoff import _draw, _pooled, _record
from tests.tolerances import APPROX_FLOAT64


def _records(seed=4):
    rng = np.random.default_rng(seed)
    return [_record(name, s, method, ["math", "code"], ["english", "modern"], _draw(rng))
            for name, method in (("backbone", "backbone"), ("tuned", "full")) for s in (0, 1, 2)]


def test_avg_over_chosen_domains(tmp_path):
    records = _records()
    for r in records:
        sweep.append_result(tmp_path, r)
    assert main(["sweep", "report", str(tmp_path), "--avg", "math,code,english", "--baseline", "backbone",
                 "--n-boot", "300"]) == 0
    table = json.loads((tmp_path / "table.json").read_text())
    chosen = ["math", "code", "english"]
    assert table["avg_domains"] == chosen and table["domains"] == ["math", "code", "english", "modern"]
    runs = {n: [r for r in records if r["name"] == n] for n in ("backbone", "tuned")}
    rows = {r["name"]: r for r in table["rows"]}
    for name, rs in runs.items():
        want = np.mean([_pooled(rs, d) for d in chosen])
        assert rows[name]["avg"]["estimate"] == pytest.approx(want, **APPROX_FLOAT64)
        assert want != pytest.approx(np.mean([_pooled(rs, d) for d in table["domains"]]), abs=1e-9)
    (diff,) = [e for e in table["differences"] if e["name"] == "tuned"]
    by_hand = np.mean([_pooled(runs["tuned"], d) - _pooled(runs["backbone"], d) for d in chosen])
    assert diff["avg"]["estimate"] == pytest.approx(by_hand, **APPROX_FLOAT64)
    assert diff["avg"]["low"] <= diff["avg"]["estimate"] <= diff["avg"]["high"]
    md = (tmp_path / "table.md").read_text()
    assert "| avg (Math, Code, English) |" in md and "| avg (Math, Code, English) - baseline |" in md
    # without --avg: every evaluated domain, and the plain header
    assert main(["sweep", "report", str(tmp_path), "--n-boot", "300"]) == 0
    plain = json.loads((tmp_path / "table.json").read_text())
    assert plain["avg_domains"] == plain["domains"] and "| avg |" in (tmp_path / "table.md").read_text()


@pytest.mark.parametrize("avg, needle", [("math,french", "not evaluated in every run: french"),
                                         (",", "names no domain")])
def test_avg_refused(tmp_path, capsys, avg, needle):
    for r in _records():
        sweep.append_result(tmp_path, r)
    assert main(["sweep", "report", str(tmp_path), "--avg", avg]) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "table.md").exists()
