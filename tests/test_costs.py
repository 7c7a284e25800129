"""ref/costs.py: trained-parameter counts against the param trees ref.methods.init_method builds,
the parameter-matched pairs on SmolLM2-135M's shape worked by hand, and FLOPs by hand."""

import dataclasses

import jax
import numpy as np
import pytest

from mode_jax.ref import costs
from mode_jax.ref.config import LlamaConfig, LoraConfig, ModeConfig
from mode_jax.ref.llama import init_llama
from mode_jax.ref.methods import METHODS, init_method, partition
from tests.tolerances import APPROX_FLOAT64

TINY = LlamaConfig.tiny()                       # D 32, F 64, 4 layers, q width 32, kv width 16, V 97
SMOL = LlamaConfig.smollm2_135m()


def _count(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def tree_counts(cfg, method, *, mode=None, lora=None) -> tuple[int, int]:
    """(trained, total) parameters of init_method's tree, built as shapes only (jax.eval_shape)."""
    def build():
        backbone = init_llama(jax.random.key(0), cfg)
        stage1 = None
        if method in ("stage2", "stage2_frozen"):
            one = dataclasses.replace(mode, n_experts=1)
            stage1 = [init_method("stage1", jax.random.key(i), backbone, cfg, mode=one) for i in range(mode.n_experts)]
        return init_method(method, jax.random.key(9), backbone, cfg, mode=mode, lora=lora, stage1=stage1)
    params = jax.eval_shape(build)
    return _count(partition(params, METHODS[method])[0]), _count(params)


@pytest.mark.parametrize("cfg", [TINY, dataclasses.replace(TINY, qkv_bias=True, tie_embeddings=False)])
@pytest.mark.parametrize("method, mode, lora", [
    ("full", None, None),
    ("lora", None, LoraConfig(rank=3, targets="attn")),
    ("lora", None, LoraConfig(rank=5, targets="attn_mlp")),
    ("stage1", ModeConfig(n_blocks=2, expert_layers=2, n_experts=3), None),
    ("stage2", ModeConfig(n_blocks=2, expert_layers=1, n_experts=2), None),
    ("stage2_frozen", ModeConfig(n_blocks=4, expert_layers=1, n_experts=3), None),
    ("uninit", ModeConfig(n_blocks=1, expert_layers=3, n_experts=2), None),
    ("uninit", ModeConfig(n_blocks=2, expert_layers=2, n_experts=1), None),      # the capacity control
])
def test_trained_params_match_init_method(cfg, method, mode, lora):
    trained, total = tree_counts(cfg, method, mode=mode, lora=lora)
    assert costs.trained_params(method, cfg, mode=mode, lora=lora) == trained
    if method == "full":
        assert costs.backbone_params(cfg) == total


def test_smollm2_pairs_by_hand():
    # One SmolLM2 layer: wq, wo 576 x 576; wk, wv 576 x 192; three 576 x 1536 MLP matrices; two norms:
    # 2 * 331,776 + 2 * 110,592 + 3 * 884,736 + 2 * 576 = 3,540,096.
    assert costs.layer_params(SMOL) == 3_540_096
    mode2x = ModeConfig()                                     # 3 blocks x 2 expert layers
    # MoDE 2x: 2 experts x 3 blocks x 2 layers x 3,540,096 = 42,481,152, plus gates 3 x 577 x 3 = 5,193.
    want = 42_481_152 + 5_193
    assert costs.trained_params("stage2", SMOL, mode=dataclasses.replace(mode2x, n_experts=2)) == want
    assert tree_counts(SMOL, "stage2", mode=dataclasses.replace(mode2x, n_experts=2))[0] == want
    # LoRA r16 on attention: 16 x 30 layers x (1152 + 768 + 768 + 1152) = 1,843,200.
    lora16 = LoraConfig(rank=16, targets="attn")
    assert costs.trained_params("lora", SMOL, lora=lora16) == 1_843_200 == tree_counts(SMOL, "lora", lora=lora16)[0]
    # LoRA on attention + MLP: per rank 30 x (3840 + 2 x 2112 + 2112) = 305,280; 42,486,345 / 305,280
    # = 139.17, so rank 139 (42,433,920 parameters) matches MoDE 2x.
    assert costs.match_lora_rank(SMOL, want, targets="attn_mlp") == (139, 139 * 305_280)
    assert tree_counts(SMOL, "lora", lora=LoraConfig(rank=139, targets="attn_mlp"))[0] == 139 * 305_280
    # On attention alone: per rank 115,200; 368.8 -> rank 369.
    assert costs.match_lora_rank(SMOL, want, targets="attn")[0] == 369
    # The smallest MoDE with two experts (1 block, 1 expert layer): 2 x 3,540,096 + 577 x 3 = 7,081,923,
    # still 3.8x LoRA r16's count: no MoDE layout of whole layers comes closer.
    layout, count = costs.match_mode_layout(SMOL, 1_843_200, n_experts=2)
    assert (layout.n_blocks, layout.expert_layers, count) == (1, 1, 7_081_923)


def test_capacity_control_matches_mode_2x_but_a_gate_column():
    one = costs.trained_params("uninit", SMOL, mode=ModeConfig(n_blocks=3, expert_layers=4, n_experts=1))
    two = costs.trained_params("uninit", SMOL, mode=ModeConfig(n_blocks=3, expert_layers=2, n_experts=2))
    assert two - one == 3 * 577


def test_layer_and_dispatch_flops_by_hand():
    # Tiny layer matmuls: 2 x (wq 32x32 + wk, wv 32x16 each + wo 32x32 + 3 x 32x64) = 2 x 9,216 = 18,432;
    # attention at T = 7: (7 + 1) / 2 = 4 keys per token, 4 x 32 x 4 = 512. Total 18,944.
    assert costs.layer_flops(TINY, 7) == 18_944
    mode = ModeConfig(n_blocks=2, expert_layers=1, n_experts=2, gate_top_k=1)
    # Stacks per block: backbone 2 layers, experts 1 each -> [37,888, 18,944, 18,944]; head 2 x 32 x 97 =
    # 6,208; gates 2 blocks x 2 x 32 x 3 = 384. Dense: 6,592 + 2 x 75,776 = 158,144.
    # Block 0 keeps the backbone for every token, block 1 the backbone for half and each expert for a
    # quarter: sparse = 6,592 + 37,888 + (0.5 x 37,888 + 0.25 x 18,944 x 2) = 6,592 + 37,888 + 28,416 = 72,896.
    out = costs.dispatch_flops(TINY, mode, 7, selected=[[1.0, 0.0, 0.0], [0.5, 0.25, 0.25]])
    assert out["dense"] == 158_144 and out["sparse"] == 72_896 and out["saved"] == 158_144 - 72_896
    assert out["saved_fraction"] == pytest.approx((158_144 - 72_896) / 158_144, **APPROX_FLOAT64)
    # Skipped layer evaluations: block 0 both experts (2), block 1 half the backbone (1) and 3/4 of each expert.
    assert out["skipped_layers"] == 2 + 1 + 1.5
    # Default selection: backbone always kept, k - 1 = 1 place spread over 2 experts (top-2 here).
    top2 = costs.dispatch_flops(TINY, dataclasses.replace(mode, gate_top_k=2), 7)
    assert top2["sparse"] == 6_592 + 2 * (37_888 + 0.5 * 18_944 * 2)
    dense = costs.dispatch_flops(TINY, dataclasses.replace(mode, gate_top_k=None), 7)
    assert dense["saved"] == 0.0 and dense["skipped_layers"] == 0.0
    with pytest.raises(ValueError, match="selected must be"):
        costs.dispatch_flops(TINY, mode, 7, selected=[[1.0, 0.0]])
