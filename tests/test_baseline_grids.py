"""The #13 sweep grids (configs/sweeps/baselines-gpu.toml, permutations-gpu.toml, per-domain-gpu.toml)
parse and expand (`mode-jax sweep`'s grid validation, nothing run), and say what their comments
claim: the parameter-matched pairs on SmolLM2's shape (ref/costs.py), the capacity control, top-k,
and every domain permutation with its held-out domain."""

from __future__ import annotations

from pathlib import Path

import pytest

from mode_jax.errors import UserError
from mode_jax.pipeline import sources, sweep
from mode_jax.ref import costs
from mode_jax.ref.config import LlamaConfig, LoraConfig

REPO = Path(__file__).resolve().parents[1]
SMOL = LlamaConfig.smollm2_135m()
DOMAINS = {"math", "code", "english"}


def grid(name):
    return sweep.load_grid(REPO / "configs" / "sweeps" / name)


def one(cells, name):
    return next(c for c in cells if c.name == name and c.seed == 0)


def test_baselines_grid():
    g = grid("baselines-gpu.toml")
    assert {c.seed for c in g.cells} == {0, 1, 2}
    names = {c.name for c in g.cells}
    mode2x = costs.trained_params("stage2", SMOL, mode=sources.mode_config(one(g.cells, "mode-2x").cfg, 2))
    assert mode2x == 42_486_345
    # top-k: the same experts (stage-1 settings equal), gate_top_k 1 and 2.
    for k in (1, 2):
        assert one(g.cells, f"mode-2x gate_top_k={k}").cfg.mode.gate_top_k == k
    # top-1 from an even start: margin 0 (the default 4.0 elsewhere), the same parameter count.
    even = one(g.cells, "mode-2x top-1 margin-0").cfg.mode
    assert (even.gate_top_k, even.gate_margin) == (1, 0.0)
    assert one(g.cells, "mode-2x").cfg.mode.gate_margin in (None, 4.0)
    # Capacity control: one 4-layer expert, on the mixture, within one gate column per block of mode-2x.
    for steps in (400, 1200):
        cap = one(g.cells, f"capacity-1x4 steps={steps}")
        assert cap.method == "uninit" and cap.cfg.mode.n_experts == 1 and cap.cfg.train.steps == steps
        cap_params = costs.trained_params("uninit", SMOL, mode=sources.mode_config(cap.cfg, 1))
        assert mode2x - cap_params == cap.cfg.mode.n_blocks * (SMOL.d_model + 1)
    # LoRA matched to mode-2x: the rank match_lora_rank finds, within 0.2% of its count.
    lora = one(g.cells, "lora-attn_mlp-r139 steps=400").cfg.lora
    assert (lora.rank, lora.targets) == (costs.match_lora_rank(SMOL, mode2x, targets="attn_mlp")[0], "attn_mlp")
    lora_params = costs.trained_params("lora", SMOL, lora=LoraConfig(rank=lora.rank, targets=lora.targets))
    assert abs(lora_params - mode2x) / mode2x < 2e-3
    # The MoDE closest to LoRA r16 (the "lora" cells' default rank and targets).
    r16 = one(g.cells, "lora steps=400").cfg.lora
    target = costs.trained_params("lora", SMOL, lora=LoraConfig(rank=r16.rank, targets=r16.targets))
    small = one(g.cells, "mode-small").cfg.mode
    layout, _ = costs.match_mode_layout(SMOL, target, n_experts=2)
    assert (small.n_blocks, small.expert_layers) == (layout.n_blocks, layout.expert_layers)
    # The other helpers' methods, each where the sweep knows it.
    for method, name in (("lora-moe", "lora-moe-2x"), ("btx", "btx-2x"), ("block_expansion", "block-expansion steps=400")):
        assert (method in sweep.METHODS) == (name in names)
    for base in g.baseline:
        assert base in names


def test_permutations_grid():
    g = grid("permutations-gpu.toml")
    pairs = set()
    backbone = [c for c in g.cells if c.method == "backbone"]
    # Table 1's backbone run (the same id in table1-gpu.toml), evaluated on every domain
    assert {c.id for c in backbone} == {c.id for c in grid("table1-gpu.toml").cells if c.method == "backbone"}
    assert all(set(c.cfg.eval_domains) == DOMAINS | {"english-modern"} for c in backbone)
    for c in g.cells:
        if c.method == "backbone":
            continue
        targets, retention = set(c.cfg.domains.targets), set(c.cfg.domains.retention)
        assert len(targets) == 2 and not targets & retention
        held_out = DOMAINS - targets
        assert retention == held_out | {"english-modern"}, c.name
        pairs.add((c.method, frozenset(targets)))
    # MoDE, full FT and LoRA on each of the three pairs.
    assert pairs == {(m, frozenset(p)) for m in ("mode", "full", "lora")
                     for p in ({"math", "code"}, {"math", "english"}, {"code", "english"})}
    assert len(g.cells) == 3 * (1 + 3 + 3 * 2 * 2)


def test_per_domain_grid():
    g = grid("per-domain-gpu.toml")
    got = {(c.method, c.cfg.domains.targets) for c in g.cells if c.method != "backbone"}
    assert sum(c.method == "backbone" for c in g.cells) == 3           # one a seed, on every domain
    mixture = ("math", "code", "english")
    assert got == {(m, (d,)) for m in ("expert", "full", "lora") for d in DOMAINS} | {
        (m, mixture) for m in ("full", "lora", "mode")}
    for c in g.cells:
        assert set(c.cfg.eval_domains) == DOMAINS | {"english-modern"}
        if c.method == "backbone":
            continue
        steps = c.cfg.train.stage1_steps if c.method == "expert" else c.cfg.train.steps
        if len(c.cfg.domains.targets) == 1:     # every method the same 400 steps on its one domain
            assert (steps, c.cfg.train.batch_size) == (400, 16)
        else:                                   # the three-domain mixture: the same rows, 6 of each a step
            assert c.cfg.train.batch_size % 3 == 0 and abs(steps * c.cfg.train.batch_size - 400 * 16) < 18
    # MoDE 3x: each expert reads a per-domain expert's rows; one expert and one gate column a block
    # more than MoDE 2x, counted here from SmolLM2's shape (a layer: attention, SwiGLU MLP, two norms).
    mode3x = one(g.cells, "mode-3x math+code+english").cfg
    assert abs(mode3x.train.stage1_steps * mode3x.train.batch_size - 400 * 16) < 18
    d, q, kv = SMOL.d_model, SMOL.n_heads * SMOL.head_dim, SMOL.n_kv_heads * SMOL.head_dim
    layer = 2 * d * q + 2 * d * kv + 3 * d * SMOL.d_ff + 2 * d
    m = mode3x.mode
    assert costs.trained_params("stage2", SMOL, mode=sources.mode_config(mode3x, 3)) == (
        42_486_345 + m.n_blocks * m.expert_layers * layer + m.n_blocks * (d + 1))



@pytest.mark.parametrize("cell, needle", [
    ('method = "full"\n"mode.gate_top_k" = 1\n', "method full does not read mode.gate_top_k"),
    ('method = "expert"\n"mode.gate_top_k" = 2\n', "method expert does not read mode.gate_top_k"),
    ('method = "mode"\n"mode.n_experts" = 1\n', "method mode does not read mode.n_experts"),
    ('method = "uninit"\n"mode.gate_top_k" = -1\n', "mode.gate_top_k must be in"),
])
def test_top_k_and_n_experts_refused_where_unread(tmp_path, cell, needle):
    path = tmp_path / "grid.toml"
    path.write_text('[sweep]\nbase = "smoke"\n[[sweep.cell]]\n' + cell)
    with pytest.raises(UserError, match=needle):
        sweep.load_grid(path)
