"""Hugging Face style directories (config.json + safetensors): round trips and bad input.
transformers itself reads what save_hf_dir writes in test_crosscheck_transformers.py."""

import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from mode_jax.model_io.gguf_loader import ModelFileError
from mode_jax.model_io.hf_loader import config_from_hf, hf_config_dict, load_hf_dir, read_hf_dir, save_hf_dir
from mode_jax.ref.config import LlamaConfig, RopeScaling
from mode_jax.ref.llama import init_llama, llama_forward
from tests.tolerances import STORAGE_ROUND_TRIP, assert_trees_close, assert_trees_equal

CFG = LlamaConfig.tiny(tie_embeddings=False, norm_eps=1e-6)


def _params(cfg=CFG, seed=0):
    params = jax.tree_util.tree_map(np.asarray, init_llama(jax.random.PRNGKey(seed), cfg))
    rng = np.random.default_rng(seed)
    for layer in params["layers"]:
        layer["attn_norm"] = rng.uniform(0.5, 1.5, cfg.d_model).astype(np.float32)
    return params


@pytest.mark.parametrize("tie", [True, False])
def test_round_trip_is_exact(tmp_path, tie):
    cfg = LlamaConfig.tiny(tie_embeddings=tie)
    params = _params(cfg)
    loaded, got = read_hf_dir(save_hf_dir(params, cfg, tmp_path / "m"))
    assert got == cfg
    assert_trees_equal(loaded, params)
    names = set(load_file(tmp_path / "m" / "model.safetensors"))
    assert ("lm_head.weight" in names) == (not tie)
    assert "model.layers.0.self_attn.q_proj.weight" in names


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_round_trip(tmp_path, dtype):
    params = _params()
    loaded, _ = read_hf_dir(save_hf_dir(params, CFG, tmp_path / "m", dtype=dtype))
    assert {b.dtype for b in jax.tree.leaves(loaded)} == {np.dtype(np.float32)}
    assert_trees_close(loaded, params, tol=STORAGE_ROUND_TRIP[dtype])


def test_loaded_model_computes_the_same_logits(tmp_path):
    params = _params()
    jparams, cfg = load_hf_dir(save_hf_dir(params, CFG, tmp_path / "m"))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 9)), jnp.int32)
    np.testing.assert_array_equal(llama_forward(jparams, tokens, cfg),
                                  llama_forward(jax.tree_util.tree_map(jnp.asarray, params), tokens, CFG))


def test_sharded_checkpoint_with_index(tmp_path):
    params = _params()
    src = save_hf_dir(params, CFG, tmp_path / "one")
    tensors = load_file(src / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    out = tmp_path / "sharded"
    out.mkdir()
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, out / file)
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: f for f, keys in shards.items() for k in keys}}))
    (out / "config.json").write_text((src / "config.json").read_text())
    loaded, _ = read_hf_dir(out)
    assert_trees_equal(loaded, params)


def test_bf16_checkpoint_from_elsewhere(tmp_path):
    """A bf16 file not written by us (names, inv_freq buffer, transformers-5 rope_parameters)."""
    cfg = LlamaConfig.tiny(tie_embeddings=True, rope_theta=500.0)
    params = _params(cfg)
    src = save_hf_dir(params, cfg, tmp_path / "src")
    tensors = {k: v.astype(ml_dtypes.bfloat16) for k, v in load_file(src / "model.safetensors").items()}
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(4, np.float32)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]      # saved although tied
    out = tmp_path / "bf16"
    out.mkdir()
    save_file(tensors, out / "model.safetensors")
    config = hf_config_dict(cfg)
    del config["rope_theta"]
    config["rope_parameters"] = {"rope_theta": 500.0, "rope_type": "default"}
    (out / "config.json").write_text(json.dumps(config))
    loaded, got = read_hf_dir(out)
    assert got == cfg
    np.testing.assert_allclose(loaded["embed"], params["embed"], **STORAGE_ROUND_TRIP["bfloat16"])


# ----------------------------------------------------------------------------- bad input

@pytest.fixture
def good_dir(tmp_path):
    return save_hf_dir(_params(), CFG, tmp_path / "good")


def _edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def test_shapes_disagreeing_with_config_are_named(good_dir):
    _edit_config(good_dir, intermediate_size=CFG.d_ff + 2)
    with pytest.raises(ModelFileError, match=r"'model\.layers\.0\.mlp\.gate_proj\.weight' has shape "
                                             r"\(64, 32\), config\.json implies \(66, 32\)"):
        read_hf_dir(good_dir)


def test_layer_count_disagreeing_with_config(good_dir):
    _edit_config(good_dir, num_hidden_layers=CFG.n_layers + 1)
    with pytest.raises(ModelFileError, match=r"'model\.layers\.4\.input_layernorm\.weight' is missing"):
        read_hf_dir(good_dir)


def test_unexpected_tensor_is_named(good_dir):
    tensors = load_file(good_dir / "model.safetensors")
    tensors["model.layers.0.self_attn.q_proj.bias"] = np.zeros(32, np.float32)
    save_file(tensors, good_dir / "model.safetensors")
    with pytest.raises(ModelFileError, match=r"unexpected tensor 'model\.layers\.0\.self_attn\.q_proj\.bias'"):
        read_hf_dir(good_dir)


def test_truncated_safetensors(good_dir):
    data = (good_dir / "model.safetensors").read_bytes()
    (good_dir / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="model.safetensors"):
        read_hf_dir(good_dir)


def test_nan_weights_are_refused(good_dir):
    tensors = load_file(good_dir / "model.safetensors")
    tensors["model.norm.weight"][3] = np.nan
    save_file(tensors, good_dir / "model.safetensors")
    with pytest.raises(ModelFileError, match=r"'model\.norm\.weight' holds NaN"):
        read_hf_dir(good_dir)


@pytest.mark.parametrize("changes,message", [
    ({"model_type": "gpt2"}, r"unsupported model_type 'gpt2' in config.json \(supported: llama, qwen2\)"),
    ({"hidden_act": "gelu"}, "unsupported hidden_act 'gelu'"),
    ({"attention_bias": True}, "attention_bias"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "unsupported RoPE scaling"),
    ({"num_key_value_heads": 3}, "n_heads=4 must be a multiple of n_kv_heads=3"),
])
def test_unsupported_config(good_dir, changes, message):
    _edit_config(good_dir, **changes)
    with pytest.raises(ModelFileError, match=message):
        read_hf_dir(good_dir)


def test_missing_pieces(tmp_path, good_dir):
    with pytest.raises(ModelFileError, match="not a directory"):
        read_hf_dir(tmp_path / "nothing")
    os.remove(good_dir / "model.safetensors")
    with pytest.raises(ModelFileError, match=r"no \*\.safetensors"):
        read_hf_dir(good_dir)
    os.remove(good_dir / "config.json")
    with pytest.raises(ModelFileError, match="no config.json"):
        read_hf_dir(good_dir)


def test_config_missing_key():
    config = hf_config_dict(CFG)
    del config["hidden_size"]
    with pytest.raises(ModelFileError, match="missing 'hidden_size'"):
        config_from_hf(config)


def test_failed_save_leaves_no_partial_file(tmp_path, monkeypatch):
    import safetensors.numpy

    def boom(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.numpy, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_hf_dir(_params(), CFG, tmp_path / "m")
    assert os.listdir(tmp_path / "m") == []


# ----------------------------------------------------------------------------- other backbones
# transformers itself writes and reads these in tests/test_crosscheck_arch.py.

QWEN2 = LlamaConfig.tiny(qkv_bias=True, rope_theta=1e6, norm_eps=1e-6)
LLAMA3 = LlamaConfig.tiny(tie_embeddings=False, rope_scaling=RopeScaling(
    factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64))


@pytest.mark.parametrize("cfg", [QWEN2, LLAMA3], ids=["qwen2", "llama3"])
def test_other_backbones_round_trip_exactly(tmp_path, cfg):
    params = _params(cfg)
    path = save_hf_dir(params, cfg, tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    names = set(load_file(path / "model.safetensors"))
    if cfg.qkv_bias:
        assert config["model_type"] == "qwen2" and config["architectures"] == ["Qwen2ForCausalLM"]
        assert {"model.layers.3.self_attn.q_proj.bias", "model.layers.3.self_attn.v_proj.bias"} <= names
    else:
        assert config["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
        assert not any(n.endswith(".bias") for n in names)
    loaded, got = read_hf_dir(path)
    assert got == cfg
    assert_trees_equal(loaded, params)


@pytest.mark.parametrize("form", ["transformers5", "transformers4", "old_type_key"])
def test_llama3_scaling_in_every_config_form(form):
    """config.json states the same scaling three ways, depending on who wrote it."""
    config = hf_config_dict(LlamaConfig.tiny(rope_theta=5e5))
    rule = {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    del config["rope_theta"], config["rope_scaling"]
    if form == "transformers5":
        config["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 5e5, **rule}
    else:
        config["rope_theta"] = 5e5
        config["rope_scaling"] = {("rope_type" if form == "transformers4" else "type"): "llama3", **rule}
    cfg = config_from_hf(config)
    assert cfg.rope_theta == 5e5 and cfg.rope_scaling == RopeScaling(**rule) and not cfg.qkv_bias


def test_qwen2_config_as_transformers_writes_it():
    """Fields of a Qwen2.5 config.json (transformers 4 form), read as LlamaConfig."""
    config = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
              "hidden_size": 896, "intermediate_size": 4864, "num_attention_heads": 14,
              "num_hidden_layers": 24, "num_key_value_heads": 2, "max_position_embeddings": 32768,
              "max_window_layers": 21, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000.0,
              "sliding_window": 32768, "use_sliding_window": False, "tie_word_embeddings": True,
              "vocab_size": 151936, "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151643}
    assert config_from_hf(config) == LlamaConfig(
        vocab_size=151936, d_model=896, n_layers=24, n_heads=14, n_kv_heads=2, head_dim=64, d_ff=4864,
        rope_theta=1e6, norm_eps=1e-6, tie_embeddings=True, max_seq_len=32768, qkv_bias=True)


@pytest.mark.parametrize("changes,message", [
    ({"use_sliding_window": True}, "unsupported sliding-window attention"),
    ({"layer_types": ["full_attention", "sliding_attention"] * 2}, "unsupported sliding-window attention"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "llama3 RoPE scaling is missing 'low_freq_factor'"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}},
     r"unsupported RoPE scaling 'dynamic' in config.json \(supported: default, llama3\)"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0,
                       "original_max_position_embeddings": 64}}, "invalid llama3 RoPE scaling"),
    ({"rope_scaling": "llama3"}, "rope_scaling must be an object"),
])
def test_other_backbones_bad_config(tmp_path, changes, message):
    path = save_hf_dir(_params(QWEN2), QWEN2, tmp_path / "q")
    _edit_config(path, **changes)
    with pytest.raises(ModelFileError, match=message):
        read_hf_dir(path)


def test_qwen2_missing_bias_is_named(tmp_path):
    path = save_hf_dir(_params(QWEN2), QWEN2, tmp_path / "q")
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.2.self_attn.k_proj.bias"]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(ModelFileError, match=r"'model\.layers\.2\.self_attn\.k_proj\.bias' is missing"):
        read_hf_dir(path)


def test_gguf_frequency_table_has_no_config_json_form():
    with pytest.raises(ModelFileError, match="rope_freqs table"):
        hf_config_dict(LlamaConfig.tiny(rope_freq_factors=(1.0, 2.0, 3.0, 4.0)))
