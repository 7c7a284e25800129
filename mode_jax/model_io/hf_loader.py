"""Load (and save) a Hugging Face style directory: `config.json` + `*.safetensors`.

    params, cfg = load_hf_dir("path/to/SmolLM2-135M")     # what most checkpoints look like
    save_hf_dir(params, cfg, "out/")                       # readable by transformers

Model types: `llama` (Llama 1-3, SmolLM2, ...; Llama 3's `rope_type: llama3`
frequency scaling included) and `qwen2` (Qwen2 / Qwen2.5: q/k/v biases, no
sliding window). config.json is read in both the transformers 4 form
(`rope_theta`, `rope_scaling`) and the 5 form (`rope_parameters`).

Hugging Face's Llama and Qwen2 already use the reference's rotate-half RoPE
layout, so the only conversion is the transpose of every matrix: `nn.Linear`
stores [out, in], the reference stores [in, out] so that `x @ w` applies it.
Every tensor's shape is checked against `config.json` before anything is
converted, and a disagreement names the tensor.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from mode_jax.atomic import atomic_path, write_text_atomic
from mode_jax.model_io.gguf_loader import ModelFileError
from mode_jax.integrity import check_finite
from mode_jax.ref.config import LlamaConfig, RopeScaling
from mode_jax.ref.llama import check_params

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "llama3")
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")

# Hugging Face name (under model.layers.{i}.) -> reference key.
LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm",
    "self_attn.q_proj.weight": "wq",
    "self_attn.k_proj.weight": "wk",
    "self_attn.v_proj.weight": "wv",
    "self_attn.o_proj.weight": "wo",
    "post_attention_layernorm.weight": "mlp_norm",
    "mlp.gate_proj.weight": "w_gate",
    "mlp.up_proj.weight": "w_up",
    "mlp.down_proj.weight": "w_down",
}
BIAS_NAMES = {"self_attn.q_proj.bias": "bq", "self_attn.k_proj.bias": "bk", "self_attn.v_proj.bias": "bv"}
# Buffers some old checkpoints saved; they carry no parameters.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
_SAVE_DTYPES = ("float32", "float16", "bfloat16")


def _rope_from_hf(config: Mapping[str, Any]) -> tuple[Any, RopeScaling | None]:
    """(rope_theta, Llama 3 scaling or None) from either config.json form: transformers 5's
    `rope_parameters` (theta inside) or 4's `rope_theta` + `rope_scaling` (older files say
    "type" for "rope_type")."""
    spec: dict = {}
    for key in ("rope_scaling", "rope_parameters"):
        value = config.get(key)
        if value is not None and not isinstance(value, Mapping):
            raise ModelFileError(f"config.json: {key} must be an object, got {value!r}")
        spec.update(value or {})
    rope_type = spec.get("rope_type", spec.get("type", "default"))
    theta = spec.get("rope_theta", config.get("rope_theta", 10000.0))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ModelFileError(f"unsupported RoPE scaling {rope_type!r} in config.json "
                             f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
    if rope_type == "default":
        return theta, None
    missing = [k for k in _LLAMA3_KEYS if k not in spec]
    if missing:
        raise ModelFileError(f"config.json: llama3 RoPE scaling is missing {', '.join(map(repr, missing))}")
    try:
        return theta, RopeScaling(**{k: spec[k] for k in _LLAMA3_KEYS})
    except (ValueError, TypeError) as err:
        raise ModelFileError(f"config.json: invalid llama3 RoPE scaling: {err}") from err


def config_from_hf(config: Mapping[str, Any]) -> LlamaConfig:
    """A LlamaConfig from a `config.json` dict; unsupported variants are refused by name."""
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelFileError(f"unsupported model_type {model_type!r} in config.json "
                             f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise ModelFileError(f"unsupported hidden_act {act!r} in config.json: the reference MLP is SwiGLU (silu)")
    # Llama's attention_bias puts a bias on o_proj too; only Qwen2's q/k/v biases are implemented.
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag):
            raise ModelFileError(f"unsupported {flag}=true in config.json (only qwen2's q/k/v biases are supported)")
    if model_type == "qwen2":
        sliding = [t for t in config.get("layer_types") or () if t != "full_attention"]
        if config.get("use_sliding_window") or sliding:
            raise ModelFileError("unsupported sliding-window attention in config.json "
                                 "(use_sliding_window / layer_types): only full attention is implemented")
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        if key not in config:
            raise ModelFileError(f"config.json is missing {key!r}")
    d, n_heads = config["hidden_size"], config["num_attention_heads"]
    theta, scaling = _rope_from_hf(config)
    try:
        return LlamaConfig(
            vocab_size=config["vocab_size"], d_model=d, n_layers=config["num_hidden_layers"],
            n_heads=n_heads, n_kv_heads=config.get("num_key_value_heads") or n_heads,
            head_dim=config.get("head_dim") or d // n_heads, d_ff=config["intermediate_size"],
            rope_theta=float(theta), norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            max_seq_len=config.get("max_position_embeddings", 2048),
            qkv_bias=model_type == "qwen2", rope_scaling=scaling)
    except (ValueError, TypeError) as err:
        raise ModelFileError(f"config.json describes an invalid model: {err}") from err


def hf_config_dict(cfg: LlamaConfig, *, dtype: str = "float32") -> dict[str, Any]:
    """The `config.json` that transformers needs for `cfg`: LlamaForCausalLM, or
    Qwen2ForCausalLM for a model with q/k/v biases. Llama 3 scaling is written in both
    transformers' forms (4's `rope_scaling`, 5's `rope_parameters`)."""
    if cfg.rope_freq_factors is not None:
        raise ModelFileError("this model's RoPE frequencies come from a GGUF rope_freqs table, which "
                             "config.json cannot state (only Llama 3's rule); load it from config.json instead")
    scaling = None
    if cfg.rope_scaling is not None:
        scaling = {"rope_type": "llama3", **{k: getattr(cfg.rope_scaling, k) for k in _LLAMA3_KEYS}}
    qwen2 = cfg.qkv_bias
    out = {
        "architectures": ["Qwen2ForCausalLM" if qwen2 else "LlamaForCausalLM"],
        "model_type": "qwen2" if qwen2 else "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim, "intermediate_size": cfg.d_ff, "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta, "rope_scaling": scaling,
        "max_position_embeddings": cfg.max_seq_len, "tie_word_embeddings": cfg.tie_embeddings,
        "torch_dtype": dtype,
    }
    if scaling is not None:
        out["rope_parameters"] = {**scaling, "rope_theta": cfg.rope_theta}
    if qwen2:
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layers)
    else:
        out.update(attention_bias=False, mlp_bias=False)
    return out


def _expected(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Hugging Face tensor name -> shape ([out, in] for matrices)."""
    d, f, v = cfg.d_model, cfg.d_ff, cfg.vocab_size
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    layer = {"input_layernorm.weight": (d,), "self_attn.q_proj.weight": (q, d),
             "self_attn.k_proj.weight": (kv, d), "self_attn.v_proj.weight": (kv, d),
             "self_attn.o_proj.weight": (d, q), "post_attention_layernorm.weight": (d,),
             "mlp.gate_proj.weight": (f, d), "mlp.up_proj.weight": (f, d), "mlp.down_proj.weight": (d, f)}
    if cfg.qkv_bias:
        layer.update({"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,)})
    out = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = (v, d)
    for i in range(cfg.n_layers):
        out.update({f"model.layers.{i}.{k}": s for k, s in layer.items()})
    return out


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as err:
            raise ModelFileError(f"{index} is not a valid safetensors index: {err}") from err
        files = sorted({path / name for name in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelFileError(f"{index} lists {', '.join(missing)}, which is missing")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelFileError(f"{path} has no *.safetensors files")
    return files


def _layer_names(cfg: LlamaConfig) -> dict[str, str]:
    """Hugging Face name (under model.layers.{i}.) -> reference key, for `cfg`."""
    return {**LAYER_NAMES, **(BIAS_NAMES if cfg.qkv_bias else {})}


def read_hf_dir(path: str | os.PathLike) -> tuple[dict, LlamaConfig]:
    """A Hugging Face directory (llama or qwen2) -> (params, cfg).

    params: the reference param tree (`mode_jax.ref.llama`'s layout, Qwen2's biases
    included) of float32 numpy arrays; cfg: its LlamaConfig, from config.json. Weights are
    one `*.safetensors` file or shards listed by `model.safetensors.index.json`. The
    tokenizer is not read here: it is `tokenizer.json` beside config.json
    (`mode_jax.model_io.tokenizer`). Every problem is a one-line ModelFileError (a UserError)."""
    import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, for bf16 checkpoints)
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_dir():
        raise ModelFileError(f"{str(path)!r} is not a directory")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelFileError(f"{path} has no config.json")
    try:
        config = json.loads(config_file.read_text())
    except ValueError as err:
        raise ModelFileError(f"{config_file} is not valid JSON: {err}") from err
    cfg = config_from_hf(config)
    expected = _expected(cfg)

    handles, where = [], {}
    try:
        for file in _safetensors_files(path):
            try:
                handle = safe_open(file, framework="numpy")
            except (SafetensorError, OSError, ValueError) as err:
                raise ModelFileError(f"{file} is not a readable safetensors file: {err}") from err
            handles.append(handle)
            for name in handle.keys():
                if name in where:
                    raise ModelFileError(f"tensor {name!r} appears in both {where[name][0].name} and {file.name}")
                where[name] = (file, handle)
        # Check names and shapes of everything before converting anything.
        for name, (file, _) in where.items():
            if name in expected or name.endswith(_IGNORED_SUFFIXES):
                pass
            elif name == "lm_head.weight" and cfg.tie_embeddings:
                pass   # some tied checkpoints save the head anyway; the embedding is used
            else:
                raise ModelFileError(f"{file.name}: unexpected tensor {name!r} (this loader reads Llama and "
                                     "Qwen2 weights: no other biases or extra modules)")
        for name, shape in expected.items():
            if name not in where:
                raise ModelFileError(f"{path}: tensor {name!r} is missing")
            got = tuple(where[name][1].get_slice(name).get_shape())
            if got != shape:
                raise ModelFileError(f"{where[name][0].name}: tensor {name!r} has shape {got}, "
                                     f"config.json implies {shape}")

        def get(name: str) -> np.ndarray:
            try:
                a = where[name][1].get_tensor(name)
            except (SafetensorError, ValueError, TypeError) as err:
                raise ModelFileError(f"{where[name][0].name}: cannot read tensor {name!r}: {err}") from err
            a = np.asarray(a, dtype=np.float32)
            check_finite(a, f"{where[name][0].name}: tensor {name!r}", error=ModelFileError)
            return a

        params: dict = {"embed": get("model.embed_tokens.weight"), "layers": []}
        for i in range(cfg.n_layers):
            layer = {}
            for hf_name, key in _layer_names(cfg).items():
                a = get(f"model.layers.{i}.{hf_name}")
                layer[key] = a if a.ndim == 1 else np.ascontiguousarray(a.T)   # [out, in] -> [in, out]
            params["layers"].append(layer)
        params["final_norm"] = get("model.norm.weight")
        if not cfg.tie_embeddings:
            params["lm_head"] = np.ascontiguousarray(get("lm_head.weight").T)   # [D, V]
    finally:
        handles.clear()
    check_params(params, cfg)
    return params, cfg


def load_hf_dir(path: str | os.PathLike, *, dtype=None) -> tuple[dict, LlamaConfig]:
    """`read_hf_dir`, with the params as jax arrays in `dtype` (default float32): (params, LlamaConfig)."""
    import jax
    import jax.numpy as jnp

    params, cfg = read_hf_dir(path)
    dtype = jnp.float32 if dtype is None else dtype
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype=dtype), params), cfg


def save_hf_dir(params: Mapping, cfg: LlamaConfig, path: str | os.PathLike, *, dtype: str = "float32") -> Path:
    """Write `params` as `config.json` + `model.safetensors` (each file atomically)."""
    import ml_dtypes
    from safetensors.numpy import save_file

    if dtype not in _SAVE_DTYPES:
        raise ValueError(f"dtype must be one of {_SAVE_DTYPES}, got {dtype!r}")
    check_params(params, cfg)
    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)

    def conv(a, transpose: bool = False) -> np.ndarray:
        a = np.asarray(a, dtype=np.float32)
        return np.ascontiguousarray((a.T if transpose else a).astype(np_dtype))

    tensors = {"model.embed_tokens.weight": conv(params["embed"]), "model.norm.weight": conv(params["final_norm"])}
    if not cfg.tie_embeddings:
        tensors["lm_head.weight"] = conv(params["lm_head"], transpose=True)
    for i, layer in enumerate(params["layers"]):
        for hf_name, key in _layer_names(cfg).items():
            tensors[f"model.layers.{i}.{hf_name}"] = conv(layer[key], transpose=np.ndim(layer[key]) == 2)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    with atomic_path(path / "model.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    write_text_atomic(path / "config.json", json.dumps(hf_config_dict(cfg, dtype=dtype), indent=2) + "\n")
    return path
