"""GGUF loading on small synthetic files: round trips, the q/k permutation, and bad input.

The real SmolLM2 file is checked against transformers in test_crosscheck_transformers.py;
here every file is written on the spot with gguf.GGUFWriter.
"""

import os
from pathlib import Path

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mode_jax.model_io.gguf_loader import (LAYER_TENSORS, ModelFileError, load_gguf, permute_qk, read_gguf,
                                  unpermute_qk, write_gguf)
from mode_jax.errors import UserError
from mode_jax.ref.config import LlamaConfig, RopeScaling
from mode_jax.ref.llama import apply_rope, init_llama, llama_forward, rope_freq_factors, rope_tables
from tests.tolerances import STORAGE_ROUND_TRIP, assert_close, assert_trees_equal

# Q8_0 and friends quantize rows in blocks of 32, so every in-dimension is a multiple of 32.
CFG = LlamaConfig.tiny(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                       d_ff=64, rope_theta=1000.0, norm_eps=1e-5, max_seq_len=128)


def _params(cfg=CFG, seed=0):
    params = jax.tree_util.tree_map(np.asarray, init_llama(jax.random.PRNGKey(seed), cfg))
    rng = np.random.default_rng(seed)
    for layer in params["layers"]:     # non-unit norms so a swapped norm would show
        layer["attn_norm"] = rng.uniform(0.5, 1.5, cfg.d_model).astype(np.float32)
        layer["mlp_norm"] = rng.uniform(0.5, 1.5, cfg.d_model).astype(np.float32)
    return params


def _raw_tensors(params, cfg):
    """GGUF tensor name -> numpy array [out, in], q/k permuted the llama.cpp way."""
    out = {"token_embd.weight": np.asarray(params["embed"]), "output_norm.weight": params["final_norm"]}
    for i, layer in enumerate(params["layers"]):
        for name, key in LAYER_TENSORS.items():
            a = np.asarray(layer[key], np.float32)
            a = a.T if a.ndim == 2 else a
            if name == "attn_q":
                a = permute_qk(a, cfg.n_heads)
            if name == "attn_k":
                a = permute_qk(a, cfg.n_kv_heads)
            out[f"blk.{i}.{name}.weight"] = np.ascontiguousarray(a)
    if not cfg.tie_embeddings:
        out["output.weight"] = np.ascontiguousarray(np.asarray(params["lm_head"]).T)
    return out


def write_raw(path, tensors, *, cfg=CFG, arch="llama", meta=None, raw_types=None):
    """A GGUF file with exactly these tensors (float32 unless raw_types names a (bytes, type))."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.n_layers)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.d_model)
    w.add_feed_forward_length(cfg.d_ff)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    for key, value in (meta or {}).items():
        w.add_string(key, value)
    for name, array in tensors.items():
        if raw_types and name in raw_types:
            w.add_tensor(name, array, raw_dtype=raw_types[name])
        else:
            array = np.asarray(array)
            w.add_tensor(name, array if array.dtype.kind == "i" else array.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


def _leaves(params):
    return jax.tree_util.tree_leaves_with_path(params)


# ----------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("tie", [True, False])
def test_f32_round_trip_is_exact(tmp_path, tie):
    cfg = LlamaConfig(**{**CFG.__dict__, "tie_embeddings": tie})
    params = _params(cfg)
    path = write_gguf(tmp_path / "m.gguf", params, cfg, tensor_type="F32")
    loaded, got_cfg = read_gguf(path)
    assert got_cfg == cfg
    assert_trees_equal(loaded, params)


@pytest.mark.parametrize("kind", ["F16", "BF16", "Q8_0"])
def test_quantized_round_trip(tmp_path, kind):
    params = _params()
    loaded, cfg = read_gguf(write_gguf(tmp_path / f"m-{kind}.gguf", params, CFG, tensor_type=kind))
    assert cfg == CFG
    for (kp, a), (_, b) in zip(_leaves(params), _leaves(loaded)):
        a, b = np.asarray(a), np.asarray(b)
        name = jax.tree_util.keystr(kp)
        assert b.dtype == np.float32 and b.shape == a.shape, name
        if a.ndim == 1:                      # norms stay F32, as llama.cpp writes them
            np.testing.assert_array_equal(a, b, err_msg=name)
        elif kind in STORAGE_ROUND_TRIP:
            np.testing.assert_allclose(b, a, **STORAGE_ROUND_TRIP[kind], err_msg=name)
        else:
            # Q8_0: blocks of 32 along the in-dimension share one scale, max|block| / 127,
            # and each value is off by half a step plus 127 times the scale's f16 rounding (2^-11).
            rows = a.T if name != "['embed']" else a        # GGUF rows: [out, in]
            step = np.abs(rows.reshape(rows.shape[0], -1, 32)).max(-1, keepdims=True) / 127
            err = np.abs((b.T if name != "['embed']" else b) - rows).reshape(step.shape[0], -1, 32)
            assert (err <= 0.57 * step + 1e-12).all(), name


def test_loaded_model_computes_the_same_logits(tmp_path):
    params = _params()
    jparams, cfg = load_gguf(write_gguf(tmp_path / "m.gguf", params, CFG), progress=False)
    assert all(a.dtype == jnp.float32 for a in jax.tree_util.tree_leaves(jparams))
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, CFG.vocab_size, (2, 12)), jnp.int32)
    np.testing.assert_array_equal(llama_forward(jparams, tokens, cfg),
                                  llama_forward(jax.tree_util.tree_map(jnp.asarray, params), tokens, CFG))


def test_load_gguf_casts_to_dtype(tmp_path):
    params, _ = load_gguf(write_gguf(tmp_path / "m.gguf", _params(), CFG), dtype=jnp.bfloat16, progress=False)
    assert {a.dtype for a in jax.tree_util.tree_leaves(params)} == {jnp.dtype(jnp.bfloat16)}


# ----------------------------------------------------------------------------- q/k permutation

def _unpermute_loops(w, n_heads):
    """Straight from the definition: in each head, llama.cpp row 2i + j is rotate-half row j*H/2 + i."""
    head_dim = w.shape[0] // n_heads
    out = np.empty_like(w)
    for h in range(n_heads):
        for i in range(head_dim // 2):
            for j in range(2):
                out[h * head_dim + j * head_dim // 2 + i] = w[h * head_dim + 2 * i + j]
    return out


@pytest.mark.parametrize("n_heads,head_dim,cols", [(1, 2, 1), (3, 8, 5), (9, 64, 7), (4, 16, 1)])
def test_unpermute_matches_loop_definition(n_heads, head_dim, cols):
    w = np.random.default_rng(n_heads).normal(size=(n_heads * head_dim, cols)).astype(np.float32)
    np.testing.assert_array_equal(unpermute_qk(w, n_heads), _unpermute_loops(w, n_heads))
    np.testing.assert_array_equal(permute_qk(unpermute_qk(w, n_heads), n_heads), w)
    np.testing.assert_array_equal(unpermute_qk(w[:, 0], n_heads), _unpermute_loops(w, n_heads)[:, 0])


def test_unpermute_qk_rejects_odd_head_dim():
    with pytest.raises(ModelFileError, match="heads"):
        unpermute_qk(np.zeros((9, 4)), 3)


def _rope_interleaved(x, pos, theta):
    """llama.cpp's RoPE: pair (2i, 2i+1) rotated by pos * theta^(-2i/H). x [T, heads, H]."""
    h = x.shape[-1]
    out = x.copy()
    for t in range(x.shape[0]):
        for i in range(h // 2):
            ang = pos[t] * theta ** (-2.0 * i / h)
            a, b = x[t, :, 2 * i], x[t, :, 2 * i + 1]
            out[t, :, 2 * i] = a * np.cos(ang) - b * np.sin(ang)
            out[t, :, 2 * i + 1] = b * np.cos(ang) + a * np.sin(ang)
    return out


def test_unpermuted_weights_give_the_same_attention_scores_under_rotate_half_rope():
    """What the permutation is for: llama.cpp's interleaved RoPE on its rows equals the
    reference's rotate-half RoPE on the unpermuted rows, dim for dim after reordering."""
    rng = np.random.default_rng(0)
    n_heads, head_dim, d, t, theta = 3, 8, 12, 6, 100.0
    w_gguf = rng.normal(size=(n_heads * head_dim, d))          # [out, in], llama.cpp row order
    x = rng.normal(size=(t, d))
    q_gguf = _rope_interleaved((x @ w_gguf.T).reshape(t, n_heads, head_dim), np.arange(t), theta)
    w_ref = unpermute_qk(w_gguf, n_heads).T                   # [in, out], rotate-half order
    q = (x @ w_ref).reshape(1, t, n_heads, head_dim)
    cos, sin = rope_tables(jnp.arange(t), head_dim=head_dim, theta=theta)
    q_ref = np.asarray(apply_rope(jnp.asarray(q, jnp.float32), cos, sin))[0]
    # Reorder llama.cpp's interleaved dims (i, j) -> rotate-half (j, i), then compare.
    q_gguf_as_ref = q_gguf.reshape(t, n_heads, head_dim // 2, 2).swapaxes(-1, -2).reshape(t, n_heads, head_dim)
    assert_close(q_ref, q_gguf_as_ref)
    # And so q.k scores, which is all attention sees, agree too (sums of head_dim products
    # of the float32 q above: 10x its tolerance).
    assert_close(np.einsum("thd,shd->hts", q_ref, q_ref), np.einsum("thd,shd->hts", q_gguf, q_gguf), scale=10)


# ----------------------------------------------------------------------------- bad input

@pytest.fixture
def good_file(tmp_path):
    return write_gguf(tmp_path / "good.gguf", _params(), CFG)


def test_errors_are_user_and_value_errors():
    assert issubclass(ModelFileError, UserError) and issubclass(ModelFileError, ValueError)


def test_missing_file(tmp_path):
    with pytest.raises(ModelFileError, match="does not exist"):
        read_gguf(tmp_path / "nope.gguf")


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "x.gguf"
    path.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(ModelFileError, match="not a GGUF file"):
        read_gguf(path)


@pytest.mark.parametrize("fraction", [0.001, 0.01, 0.3, 0.6, 0.999])
def test_truncated_file(good_file, tmp_path, fraction):
    data = good_file.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:max(5, int(len(data) * fraction))])
    with pytest.raises(ModelFileError, match="truncated|not a GGUF"):
        read_gguf(cut)


def test_corrupted_header(good_file, tmp_path):
    data = bytearray(good_file.read_bytes())
    # The first key's length (right after magic, version, tensor and kv counts): make it absurd.
    data[24:32] = (2**62).to_bytes(8, "little")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="truncated or corrupted"):
        read_gguf(bad)


def test_corrupted_tensor_type_field(tmp_path):
    params = _params()
    tensors = _raw_tensors(params, CFG)
    path = write_raw(tmp_path / "t.gguf", tensors)
    data = bytearray(path.read_bytes())
    # Find the first tensor's info (name, n_dims, dims, type) and put an undefined type id there.
    name = b"token_embd.weight"
    at = data.index(name) + len(name)
    n_dims = int.from_bytes(data[at:at + 4], "little")
    type_at = at + 4 + 8 * n_dims
    data[type_at:type_at + 4] = (9999).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="truncated or corrupted"):
        read_gguf(path)


def test_corrupted_tensor_data_is_caught_when_not_finite(tmp_path):
    params = _params()
    path = write_gguf(tmp_path / "m.gguf", params, CFG, tensor_type="F16")
    reader = gguf.GGUFReader(path)
    target = next(t for t in reader.tensors if t.name == "blk.1.ffn_up.weight")
    data = bytearray(path.read_bytes())
    data[target.data_offset + 10:target.data_offset + 12] = b"\xff\x7f"   # an f16 NaN
    del reader
    path.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="blk.1.ffn_up.weight.*NaN"):
        read_gguf(path)


def test_wrong_architecture(tmp_path):
    path = write_raw(tmp_path / "a.gguf", _raw_tensors(_params(), CFG), arch="gpt2")
    with pytest.raises(ModelFileError, match="unsupported model architecture 'gpt2'"):
        read_gguf(path)


def test_integer_tensor_type_is_named(tmp_path):
    tensors = _raw_tensors(_params(), CFG)
    tensors["blk.0.attn_q.weight"] = np.zeros(tensors["blk.0.attn_q.weight"].shape, np.int32)
    with pytest.raises(ModelFileError, match=r"blk\.0\.attn_q\.weight.*type I32"):
        read_gguf(write_raw(tmp_path / "i.gguf", tensors))


def test_quant_type_gguf_cannot_dequantize_is_named(tmp_path):
    # Q8_K (llama.cpp's intermediate format, 256-value blocks) has no dequantizer in gguf.
    cfg = LlamaConfig(**{**CFG.__dict__, "d_ff": 256})
    qtype = gguf.GGMLQuantizationType.Q8_K
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    tensors = _raw_tensors(_params(cfg), cfg)
    tensors["blk.0.ffn_down.weight"] = np.zeros((cfg.d_model, cfg.d_ff // block * size), np.uint8)
    path = write_raw(tmp_path / "q.gguf", tensors, cfg=cfg, raw_types={"blk.0.ffn_down.weight": qtype})
    with pytest.raises(ModelFileError, match=r"blk\.0\.ffn_down\.weight.*type Q8_K"):
        read_gguf(path)


def test_missing_tensor_is_named(tmp_path):
    tensors = _raw_tensors(_params(), CFG)
    del tensors["blk.1.ffn_gate.weight"]
    with pytest.raises(ModelFileError, match=r"'blk\.1\.ffn_gate\.weight' is missing"):
        read_gguf(write_raw(tmp_path / "m.gguf", tensors))


def test_shape_disagreeing_with_metadata_is_named(tmp_path):
    tensors = _raw_tensors(_params(), CFG)
    tensors["blk.0.ffn_up.weight"] = np.zeros((CFG.d_ff + 32, CFG.d_model), np.float32)
    with pytest.raises(ModelFileError, match=r"blk\.0\.ffn_up\.weight.*shape \(96, 32\).*\(64, 32\)"):
        read_gguf(write_raw(tmp_path / "m.gguf", tensors))


def test_unexpected_tensor_is_named(tmp_path):
    tensors = _raw_tensors(_params(), CFG)
    tensors["blk.0.attn_q.bias"] = np.zeros(CFG.n_heads * CFG.head_dim, np.float32)
    with pytest.raises(ModelFileError, match=r"unsupported tensor 'blk\.0\.attn_q\.bias'"):
        read_gguf(write_raw(tmp_path / "m.gguf", tensors))


def test_rope_scaling_is_refused(tmp_path):
    path = write_raw(tmp_path / "m.gguf", _raw_tensors(_params(), CFG), meta={"llama.rope.scaling.type": "yarn"})
    with pytest.raises(ModelFileError, match="RoPE scaling 'yarn'"):
        read_gguf(path)


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    def boom(self, *a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        write_gguf(tmp_path / "m.gguf", _params(), CFG)
    assert os.listdir(tmp_path) == []


def test_finite_corruption_is_caught_by_the_pinned_hash(tmp_path):
    """A flipped bit in quantized data still parses and stays finite: only a hash can tell.
    fetch installs a file only if its sha256 is the pinned one."""
    from mode_jax.model_io.fetch import HashMismatchError, ModelSource, fetch_model, sha256_file

    good = write_gguf(tmp_path / "good.gguf", _params(), CFG, tensor_type="Q8_0")
    source = ModelSource(name="tiny", package="unused", version="0", wheel="unused.whl", wheel_sha256="0" * 64,
                         member="tiny/tiny.gguf", sha256=sha256_file(good))
    data = bytearray(good.read_bytes())
    data[-100] ^= 0x01              # a low mantissa bit of output_norm, the last (F32) tensor
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    read_gguf(bad)                                       # loads without complaint
    with pytest.raises(HashMismatchError, match="hash mismatch"):
        fetch_model(source, cache_dir=tmp_path / "cache", source_file=bad, progress=False)
    assert not (tmp_path / "cache" / "models" / "tiny" / "tiny.gguf").exists()
    assert fetch_model(source, cache_dir=tmp_path / "cache", source_file=good, progress=False).is_file()


def test_every_supported_type_has_a_dequantizer():
    from mode_jax.model_io.gguf_loader import SUPPORTED_TENSOR_TYPES

    for name in SUPPORTED_TENSOR_TYPES:
        qtype = gguf.GGMLQuantizationType[name]
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        if name == "F64":
            continue                                  # converted by the loader itself
        raw = np.zeros((2, 256 // block * size), np.uint8) if block > 1 else np.zeros((2, 256 * size), np.uint8)
        out = gguf.quants.dequantize(raw, qtype)
        assert out.shape == (2, 256) and out.dtype == np.float32, name


# ----------------------------------------------------------------------------- other backbones
# Files from transformers-made models, written the way llama.cpp's converter does, are
# checked against transformers in tests/test_crosscheck_arch.py.

QWEN2 = LlamaConfig(**{**CFG.__dict__, "qkv_bias": True, "rope_theta": 1e6})
# original 64: head_dim 8 and theta 1000 put frequencies in all three branches of the rule.
LLAMA3 = LlamaConfig(**{**CFG.__dict__, "rope_scaling": RopeScaling(original_max_position_embeddings=64)})


def test_qwen2_round_trip_keeps_rows_and_biases(tmp_path):
    params = _params(QWEN2)
    path = write_gguf(tmp_path / "q.gguf", params, QWEN2, tensor_type="Q8_0")
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.architecture"].contents() == "qwen2"
    raw = {t.name: t for t in reader.tensors}
    # llama.cpp runs Qwen2 with rotate-half RoPE: its q rows are stored as they are (F32 for the check).
    f32 = {t.name: np.asarray(t.data).reshape(tuple(reversed(t.shape.tolist())))
           for t in gguf.GGUFReader(write_gguf(tmp_path / "f.gguf", params, QWEN2)).tensors}
    np.testing.assert_array_equal(f32["blk.0.attn_q.weight"], params["layers"][0]["wq"].T)
    assert raw["blk.1.attn_k.bias"].tensor_type == gguf.GGMLQuantizationType.F32
    loaded, cfg = read_gguf(path)
    assert cfg == QWEN2
    for i, layer in enumerate(params["layers"]):
        for b in ("bq", "bk", "bv"):
            np.testing.assert_array_equal(loaded["layers"][i][b], layer[b])     # biases stay F32
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, CFG.vocab_size, (2, 12)), jnp.int32)
    exact, _ = read_gguf(write_gguf(tmp_path / "e.gguf", params, QWEN2))
    np.testing.assert_array_equal(llama_forward(jax.tree_util.tree_map(jnp.asarray, exact), tokens, cfg),
                                  llama_forward(jax.tree_util.tree_map(jnp.asarray, params), tokens, QWEN2))


def test_llama3_rope_freqs_tensor_round_trip(tmp_path):
    params = _params(LLAMA3)
    path = write_gguf(tmp_path / "l3.gguf", params, LLAMA3)
    table = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(path).tensors}["rope_freqs.weight"]
    want = np.array(rope_freq_factors(LLAMA3), np.float32)
    assert want.min() == 1.0 and want.max() == 8.0 and 1.0 < want[1] < 8.0     # all three branches
    np.testing.assert_array_equal(table, want)
    loaded, cfg = read_gguf(path)
    assert cfg.rope_freq_factors == tuple(float(f) for f in want) and cfg.rope_scaling is None
    assert cfg == LlamaConfig(**{**LLAMA3.__dict__, "rope_scaling": None, "rope_freq_factors": tuple(want)})
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, CFG.vocab_size, (2, 40)), jnp.int32)
    jp = jax.tree_util.tree_map(lambda a: 5 * jnp.asarray(a), loaded)        # 5x: RoPE matters
    want_logits = llama_forward(jp, tokens, LLAMA3)
    assert_close(llama_forward(jp, tokens, cfg), want_logits)
    plain = LlamaConfig(**{**LLAMA3.__dict__, "rope_scaling": None})
    assert np.abs(np.asarray(llama_forward(jp, tokens, plain) - want_logits)).max() > 1e-2


def test_other_backbone_file_errors(tmp_path):
    tensors = {**_raw_tensors(_params(), CFG), "rope_freqs.weight": np.ones(4, np.float32)}
    with pytest.raises(ModelFileError, match="rope_freqs.weight tensor in a 'qwen2' file"):
        read_gguf(write_raw(tmp_path / "q.gguf", tensors, arch="qwen2"))
    tensors["rope_freqs.weight"] = np.ones(3, np.float32)
    with pytest.raises(ModelFileError, match="rope_freq_factors has 3 entries, head_dim=8 needs 4"):
        read_gguf(write_raw(tmp_path / "l.gguf", tensors))
    qwen = _raw_tensors(_params(QWEN2), QWEN2)      # no biases: a qwen2 file needs them
    with pytest.raises(ModelFileError, match=r"'blk\.0\.attn_q\.bias' is missing"):
        read_gguf(write_raw(tmp_path / "n.gguf", qwen, arch="qwen2"))
    with pytest.raises(ValueError, match="biases and Llama 3 RoPE scaling"):
        write_gguf(tmp_path / "x.gguf", _params(QWEN2), LlamaConfig(**{**QWEN2.__dict__, "rope_scaling": RopeScaling()}))
