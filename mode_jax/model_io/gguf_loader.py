"""Load a llama.cpp GGUF file into the reference Llama param tree (`mode_jax.ref.llama`).

    params, cfg = load_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")
    logits = llama_forward(params, tokens, cfg)

What the conversion does, tensor by tensor:

* GGUF lists a tensor's dims fastest-first (ggml's `ne`), so a weight with
  `ne = [in, out]` is a numpy array [out, in] (PyTorch's `nn.Linear` layout);
  the reference stores [in, out] so that `x @ w` applies it, hence a transpose.
* Quantized blocks (Q4_1, Q8_0, K-quants, ...) are dequantized to float32 by
  `gguf.quants.dequantize` (numpy), one tensor at a time.
* llama.cpp's converter permutes the rows of `attn_q` and `attn_k` within each
  head so that RoPE rotates adjacent pairs (2i, 2i+1) ("interleaved"); the
  reference, like Hugging Face, rotates dims (i, i + H/2) ("rotate half").
  `unpermute_qk` undoes it.
* The model shape comes from the `<arch>.*` metadata keys; a file without an
  `output.weight` ties the LM head to the embedding.
* Architectures `llama` and `qwen2`. Qwen2 files carry `attn_{q,k,v}.bias`
  tensors and are not permuted (llama.cpp runs Qwen2 with rotate-half RoPE,
  so its converter leaves q/k rows alone). A Llama 3 file's RoPE frequency
  scaling is the `rope_freqs.weight` tensor, one divisor per frequency, taken
  as it is (`LlamaConfig.rope_freq_factors`).

`write_gguf` goes the other way (used by tests to make small files, and to
export a tree for llama.cpp).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from mode_jax.atomic import atomic_path
from mode_jax.errors import UserError
from mode_jax.integrity import check_finite
from mode_jax.ref.config import LlamaConfig
from mode_jax.ref.llama import check_params, rope_freq_factors


class ModelFileError(UserError, ValueError):
    """A model file (GGUF, safetensors, config) that is missing, damaged or not supported.

    A `UserError`, so the CLI prints it as one line, and a `ValueError` for library callers."""


SUPPORTED_ARCHITECTURES = ("llama", "qwen2")
ROPE_FREQS = "rope_freqs.weight"

# Weight formats this loader accepts: gguf.quants can dequantize all of these to
# float32 (F64 is converted directly). Integer tensors and formats gguf cannot
# dequantize are refused by name before any tensor is read.
SUPPORTED_TENSOR_TYPES = (
    "F32", "F16", "BF16", "F64",
    "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
    "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_NL", "IQ4_XS",
    "TQ1_0", "TQ2_0", "MXFP4",
)

# GGUF tensor name -> reference param key, per layer.
LAYER_TENSORS = {
    "attn_norm": "attn_norm", "attn_q": "wq", "attn_k": "wk", "attn_v": "wv",
    "attn_output": "wo", "ffn_norm": "mlp_norm", "ffn_gate": "w_gate", "ffn_up": "w_up",
    "ffn_down": "w_down",
}
BIAS_TENSORS = {"attn_q": "bq", "attn_k": "bk", "attn_v": "bv"}     # qwen2: "blk.{i}.attn_q.bias"


def _gguf():
    try:
        import gguf
    except ImportError as err:  # pragma: no cover - gguf is a declared dependency
        raise UserError("reading GGUF files needs the `gguf` package: pip install gguf") from err
    return gguf


# ----------------------------------------------------------------------------- reading

def open_gguf(path: str | os.PathLike):
    """Parse a GGUF file's header with `gguf.GGUFReader` (tensor data stays memory-mapped).

    Raises ModelFileError for a missing file, a file that is not GGUF, or one whose
    header or tensor table is truncated or corrupted. Parsing SmolLM2's 49k-token
    vocabulary takes seconds, so readers are reused while the file is unchanged."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"GGUF file {str(path)!r} does not exist")
    stat = path.stat()
    return _open_gguf(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _open_gguf(path_str: str, size: int, mtime_ns: int):
    gguf = _gguf()
    path = Path(path_str)
    if size < 24:
        raise ModelFileError(f"{path} is not a GGUF file: only {size} bytes (truncated?)")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelFileError(f"{path} is not a GGUF file: it starts with {magic!r}, not b'GGUF'")
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError, TypeError, OverflowError, UnicodeDecodeError,
            MemoryError, AssertionError) as err:
        raise ModelFileError(f"{path} is truncated or corrupted: the GGUF reader failed with "
                             f"{type(err).__name__}: {err}") from err
    # The reader memory-maps tensor data lazily; a file cut inside the data section
    # can still parse, so check every tensor lies inside the file.
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size or t.data.nbytes != int(t.n_bytes):
            raise ModelFileError(f"{path} is truncated: tensor {t.name!r} needs bytes up to "
                                 f"{end}, the file has {size}")
    return reader


def gguf_metadata(reader, *, skip_arrays_over: int | None = 1024) -> dict[str, Any]:
    """The file's key/value metadata as Python values.

    Arrays longer than `skip_arrays_over` (the tokenizer's 49k strings) are left out
    unless `skip_arrays_over` is None; read those with `gguf_field`."""
    gguf = _gguf()
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        if (skip_arrays_over is not None and field.types and field.types[0] == gguf.GGUFValueType.ARRAY
                and len(field.data) > skip_arrays_over):
            continue
        meta[key] = _field_value(field, key)
    return meta


def gguf_field(reader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else _field_value(field, key)


def _field_value(field, key: str) -> Any:
    try:
        return field.contents()
    except (ValueError, UnicodeDecodeError, IndexError) as err:
        raise ModelFileError(f"GGUF metadata field {key!r} is corrupted: {err}") from err


def config_from_metadata(meta: Mapping[str, Any], *, vocab_size: int, tie_embeddings: bool,
                         rope_freqs: tuple[float, ...] | None = None) -> LlamaConfig:
    """A LlamaConfig from GGUF metadata (`<arch>.block_count` etc.); `rope_freqs` is the
    file's `rope_freqs.weight` tensor, if it has one (Llama 3)."""
    arch = meta.get("general.architecture")
    if arch is None:
        raise ModelFileError("GGUF metadata has no general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelFileError(f"unsupported model architecture {arch!r}: this loader reads "
                             f"{', '.join(SUPPORTED_ARCHITECTURES)} (general.architecture)")

    def get(key: str, default: Any = KeyError):
        full = f"{arch}.{key}"
        if full in meta:
            return meta[full]
        if default is KeyError:
            raise ModelFileError(f"GGUF metadata is missing {full!r}")
        return default

    scaling = get("rope.scaling.type", "none")
    if scaling not in ("none", None):
        raise ModelFileError(f"unsupported RoPE scaling {scaling!r} ({arch}.rope.scaling.type): "
                             "the reference model implements plain RoPE and Llama 3's rope_freqs")
    if rope_freqs is not None and arch != "llama":
        raise ModelFileError(f"unsupported: a {ROPE_FREQS} tensor in a {arch!r} file (only llama files have one)")
    d_model, n_heads = int(get("embedding_length")), int(get("attention.head_count"))
    head_dim = int(get("attention.key_length", d_model // n_heads))
    if int(get("attention.value_length", head_dim)) != head_dim:
        raise ModelFileError(f"unsupported: {arch}.attention.value_length differs from key_length")
    rope_dims = int(get("rope.dimension_count", head_dim))
    if rope_dims != head_dim:
        raise ModelFileError(f"unsupported partial RoPE: {arch}.rope.dimension_count={rope_dims} "
                             f"but the head dim is {head_dim}")
    try:
        return LlamaConfig(
            vocab_size=int(vocab_size), d_model=d_model, n_layers=int(get("block_count")),
            n_heads=n_heads, n_kv_heads=int(get("attention.head_count_kv", n_heads)),
            head_dim=head_dim, d_ff=int(get("feed_forward_length")),
            rope_theta=_float32_value(get("rope.freq_base", 10000.0)),
            norm_eps=_float32_value(get("attention.layer_norm_rms_epsilon")),
            tie_embeddings=bool(tie_embeddings), max_seq_len=int(get("context_length", 2048)),
            qkv_bias=arch == "qwen2", rope_freq_factors=rope_freqs)
    except (ValueError, TypeError) as err:
        raise ModelFileError(f"GGUF metadata describes an invalid model: {err}") from err


def _float32_value(x) -> float:
    """GGUF stores these as float32: 1e-5 comes back as 9.99999974e-06. Take the shortest
    decimal that rounds to the same float32 (1e-05), which is what the writer meant; the
    forward pass computes in float32, where the two are the same number."""
    return float(repr(np.float32(x)).removeprefix("np.float32(").removesuffix(")"))


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation: w [heads * H, ...] rows in interleaved
    RoPE order -> rotate-half order.

    Within each head llama.cpp stores row 2i + j (j in {0, 1}) for what Hugging Face
    calls row j * H/2 + i; so gather the even rows, then the odd ones."""
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise ModelFileError(f"q/k weight with {rows} rows does not split into {n_heads} heads of even size")
    head_dim = rows // n_heads
    w = w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:])   # [heads, i, j, ...]
    return np.swapaxes(w, 1, 2).reshape(rows, *w.shape[3:])  # [heads, j, i, ...] -> [heads * H, ...]


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of `unpermute_qk`: rotate-half rows -> llama.cpp's interleaved rows."""
    rows = w.shape[0]
    head_dim = rows // n_heads
    w = w.reshape(n_heads, 2, head_dim // 2, *w.shape[1:])   # [heads, j, i, ...]
    return np.swapaxes(w, 1, 2).reshape(rows, *w.shape[3:])


def _expected_tensors(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """GGUF tensor name -> numpy shape ([out, in] for matrices)."""
    d, f, v = cfg.d_model, cfg.d_ff, cfg.vocab_size
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    per_layer = {"attn_norm": (d,), "attn_q": (q, d), "attn_k": (kv, d), "attn_v": (kv, d),
                 "attn_output": (d, q), "ffn_norm": (d,), "ffn_gate": (f, d), "ffn_up": (f, d),
                 "ffn_down": (d, f)}
    out = {"token_embd.weight": (v, d), "output_norm.weight": (d,)}
    if not cfg.tie_embeddings:
        out["output.weight"] = (v, d)
    if cfg.rope_freq_factors is not None:
        out[ROPE_FREQS] = (cfg.head_dim // 2,)
    for i in range(cfg.n_layers):
        out.update({f"blk.{i}.{name}.weight": shape for name, shape in per_layer.items()})
        if cfg.qkv_bias:
            out.update({f"blk.{i}.{name}.bias": (per_layer[name][0],) for name in BIAS_TENSORS})
    return out


def _numpy_shape(tensor) -> tuple[int, ...]:
    return tuple(int(n) for n in reversed(tensor.shape.tolist()))


def _dequantize(tensor) -> np.ndarray:
    """One tensor's data as float32, in numpy order."""
    gguf = _gguf()
    kind = tensor.tensor_type
    if kind == gguf.GGMLQuantizationType.F64:
        out = np.asarray(tensor.data, dtype=np.float32)
    else:
        out = gguf.quants.dequantize(tensor.data, kind)
    out = np.asarray(out, dtype=np.float32).reshape(_numpy_shape(tensor))
    check_finite(out, f"tensor {tensor.name!r} ({kind.name})", error=ModelFileError, why="the file is corrupted")
    return out


def read_gguf(path: str | os.PathLike, *, progress: bool = False) -> tuple[dict, LlamaConfig]:
    """GGUF file -> (param tree of float32 numpy arrays, LlamaConfig).

    Everything is validated (architecture, tensor names, shapes and types) before
    any tensor is dequantized, so a bad file fails fast with its problem named."""
    gguf = _gguf()
    path = Path(path)
    reader = open_gguf(path)
    meta = gguf_metadata(reader)
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise ModelFileError(f"{path}: no tensor 'token_embd.weight' (is this a llama-family model?)")
    vocab_size = _numpy_shape(tensors["token_embd.weight"])[0]
    rope_freqs = None
    if ROPE_FREQS in tensors:
        if len(_numpy_shape(tensors[ROPE_FREQS])) != 1:
            raise ModelFileError(f"{path}: tensor {ROPE_FREQS!r} has shape {_numpy_shape(tensors[ROPE_FREQS])}, "
                                 "expected one divisor per RoPE frequency")
        rope_freqs = tuple(float(f) for f in _dequantize(tensors[ROPE_FREQS]))
    cfg = config_from_metadata(meta, vocab_size=vocab_size, tie_embeddings="output.weight" not in tensors,
                               rope_freqs=rope_freqs)
    arch = meta["general.architecture"]

    expected = _expected_tensors(cfg)
    for name in tensors:
        if name not in expected:
            raise ModelFileError(f"{path}: unsupported tensor {name!r} (this loader reads llama and "
                                 f"qwen2 weights: no other biases, no extra modules)")
    for name, shape in expected.items():
        if name not in tensors:
            raise ModelFileError(f"{path}: tensor {name!r} is missing")
        t = tensors[name]
        if _numpy_shape(t) != shape:
            raise ModelFileError(f"{path}: tensor {name!r} has shape {_numpy_shape(t)}, the metadata "
                                 f"implies {shape}")
        kind = gguf.GGMLQuantizationType(t.tensor_type)
        if kind.name not in SUPPORTED_TENSOR_TYPES:
            raise ModelFileError(f"{path}: tensor {name!r} has type {kind.name}, which this loader "
                                 f"cannot dequantize (supported: {', '.join(SUPPORTED_TENSOR_TYPES)})")

    bar = _progress_bar(len(expected) - (ROPE_FREQS in expected), f"dequantizing {path.name}", enabled=progress)
    try:
        def load(name: str) -> np.ndarray:
            out = _dequantize(tensors[name])
            bar.update(1)
            return out

        params: dict = {"embed": load("token_embd.weight"), "layers": []}
        for i in range(cfg.n_layers):
            layer = {}
            for gguf_name, key in LAYER_TENSORS.items():
                w = load(f"blk.{i}.{gguf_name}.weight")
                if arch == "llama" and gguf_name == "attn_q":
                    w = unpermute_qk(w, cfg.n_heads)
                elif arch == "llama" and gguf_name == "attn_k":
                    w = unpermute_qk(w, cfg.n_kv_heads)
                layer[key] = w if w.ndim == 1 else np.ascontiguousarray(w.T)   # [out, in] -> [in, out]
            if cfg.qkv_bias:
                layer.update({key: load(f"blk.{i}.{name}.bias") for name, key in BIAS_TENSORS.items()})
            params["layers"].append(layer)
        params["final_norm"] = load("output_norm.weight")
        if not cfg.tie_embeddings:
            params["lm_head"] = np.ascontiguousarray(load("output.weight").T)   # [D, V]
    finally:
        bar.close()
    check_params(params, cfg)
    return params, cfg


def load_gguf(path: str | os.PathLike, *, dtype=None, progress: bool = True) -> tuple[dict, LlamaConfig]:
    """GGUF file -> (param tree of jax arrays, LlamaConfig), ready for `llama_forward`.

    `dtype` (default float32) is what the dequantized weights are cast to."""
    import jax.numpy as jnp

    params, cfg = read_gguf(path, progress=progress)
    dtype = jnp.float32 if dtype is None else dtype
    import jax
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype=dtype), params), cfg


def _progress_bar(total: int, desc: str, *, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="tensor", disable=not enabled, leave=False)


# ----------------------------------------------------------------------------- writing

def write_gguf(path: str | os.PathLike, params: Mapping, cfg: LlamaConfig, *, tensor_type: str = "F32",
               tokenizer: Mapping[str, Any] | None = None, name: str = "mode-jax") -> Path:
    """Write a reference param tree as a GGUF file (atomically), as llama.cpp's converter
    would: architecture `qwen2` for a model with q/k/v biases (rows as they are), `llama`
    otherwise (q/k rows permuted; Llama 3 scaling as a `rope_freqs.weight` tensor).

    Matrices are stored as `tensor_type` (any type gguf.quants can quantize: F32,
    F16, BF16, Q8_0, Q4_0, ...), norms and biases as F32 as llama.cpp does. `tokenizer`,
    if given, maps `tokenizer.ggml.*` keys (model, pre, tokens, merges, token_type,
    bos_token_id, eos_token_id, ...) to values written as metadata."""
    gguf = _gguf()
    check_params(params, cfg)
    arch = "qwen2" if cfg.qkv_bias else "llama"
    freqs = rope_freq_factors(cfg)
    if arch == "qwen2" and freqs is not None:
        raise ValueError("no GGUF architecture holds q/k/v biases and Llama 3 RoPE scaling together")
    try:
        qtype = gguf.GGMLQuantizationType[tensor_type]
    except KeyError:
        raise ValueError(f"unknown GGUF tensor type {tensor_type!r}") from None
    path = Path(path)
    with atomic_path(path) as tmp:
        w = gguf.GGUFWriter(tmp, arch)
        w.add_name(name)
        w.add_block_count(cfg.n_layers)
        w.add_context_length(cfg.max_seq_len)
        w.add_embedding_length(cfg.d_model)
        w.add_feed_forward_length(cfg.d_ff)
        w.add_head_count(cfg.n_heads)
        w.add_head_count_kv(cfg.n_kv_heads)
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
        w.add_rope_dimension_count(cfg.head_dim)
        w.add_rope_freq_base(cfg.rope_theta)
        w.add_layer_norm_rms_eps(cfg.norm_eps)
        w.add_vocab_size(cfg.vocab_size)
        for key, value in (tokenizer or {}).items():
            _add_tokenizer_field(w, gguf, key, value)

        def add(tensor_name: str, array, quantize: bool = True):
            a = np.asarray(array, dtype=np.float32)
            if quantize and a.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
                w.add_tensor(tensor_name, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
            else:
                w.add_tensor(tensor_name, np.ascontiguousarray(a))

        add("token_embd.weight", params["embed"])                                   # [V, D]
        for i, layer in enumerate(params["layers"]):
            for gguf_name, key in LAYER_TENSORS.items():
                a = np.asarray(layer[key], dtype=np.float32)
                if a.ndim == 2:
                    a = a.T                                                          # [in, out] -> [out, in]
                if arch == "llama" and gguf_name == "attn_q":
                    a = permute_qk(a, cfg.n_heads)
                elif arch == "llama" and gguf_name == "attn_k":
                    a = permute_qk(a, cfg.n_kv_heads)
                add(f"blk.{i}.{gguf_name}.weight", a)
            for gguf_name, key in BIAS_TENSORS.items():
                if key in layer:
                    add(f"blk.{i}.{gguf_name}.bias", layer[key])
        add("output_norm.weight", params["final_norm"])
        if freqs is not None:
            add(ROPE_FREQS, np.asarray(freqs, np.float32))
        if not cfg.tie_embeddings:
            add("output.weight", np.asarray(params["lm_head"]).T)                 # [V, D]
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return path


def _add_tokenizer_field(writer, gguf, key: str, value: Any) -> None:
    if not key.startswith("tokenizer."):
        raise ValueError(f"tokenizer metadata key {key!r} must start with 'tokenizer.'")
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, (list, tuple)):
        writer.add_array(key, list(value))
    else:
        raise ValueError(f"cannot write tokenizer metadata {key!r} of type {type(value).__name__}")
