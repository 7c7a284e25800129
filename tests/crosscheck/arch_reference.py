"""The transformers side of tests/test_crosscheck_arch.py and tests/test_export.py: run under
Python 3.11 with torch, transformers, peft and gguf.

    python3.11 arch_reference.py REQUEST.json OUT_DIR

Request keys (each list may be empty or absent):

  make: [{name, model_type ("llama" | "qwen2"), config (kwargs of transformers' config class),
          seed, dir, shard_size (or null), gguf, tokens [[int]], prompt [int], new_tokens}]
      transformers creates a random-weight model from the config, saves it to `dir`
      (sharded with an index when shard_size is given) and writes, to OUT_DIR:
        <name>.npy            float32 logits [B, T, V] of `tokens`
        <name>_gguf.npy       the same logits from transformers reading the GGUF (below)
      and in results.json its greedy continuation of `prompt`. It also writes the same
      weights as a GGUF file at `gguf`, the way llama.cpp's convert_hf_to_gguf.py does
      (the gguf package's own tensor-name table; q/k rows permuted for llama, not for qwen2;
      Llama 3's scaling as a rope_freqs tensor of per-frequency divisors).
  load: [{name, kind ("hf" | "peft"), dir, base (peft: the base model's directory), tokens, text}]
      loads an exported directory (AutoModelForCausalLM, or PeftModel.from_pretrained on
      the base) and writes <name>.npy, its float32 logits; with `text` and a tokenizer.json
      in `dir`, results.json gets AutoTokenizer's ids of it.

This file imports nothing from mode_jax (it runs in another interpreter).
"""

import json
import math
import sys
from pathlib import Path


def _randomize(model, seed: int) -> None:
    """Weights large enough that attention is far from uniform, so RoPE and the biases
    matter: matrices N(0, 0.2), biases N(0, 1), norms U(0.5, 1.5)."""
    import torch
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))


def _permute(w, n_head: int, n_head_kv: int):
    """llama.cpp's LlamaModel.permute: rotate-half rows -> interleaved pairs, per head."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama3_rope_factors(cfg) -> list:
    """llama.cpp's LlamaModel.generate_extra_tensors for rope_type llama3."""
    import torch
    rope = getattr(cfg, "rope_parameters", None) or cfg.rope_scaling
    base, dim = rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)), cfg.head_dim
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old = rope["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old / low, old / high
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return out


def write_gguf(model, model_type: str, path: str) -> None:
    import gguf
    import numpy as np
    cfg = model.config
    arch = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}[model_type]
    names = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
    w = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[arch])
    w.add_name(f"tiny-{model_type}")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    rope = getattr(cfg, "rope_parameters", None) or {}
    w.add_rope_freq_base(float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    # A stand-in vocabulary: transformers' GGUF reader wants one; the tests compare logits only.
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"<t{i}>" for i in range(cfg.vocab_size)])
    w.add_token_types([1] * cfg.vocab_size)
    w.add_token_merges([])
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        data = t.detach().float().numpy()
        if model_type == "llama" and name.endswith("q_proj.weight"):
            data = _permute(data, cfg.num_attention_heads, cfg.num_attention_heads)
        elif model_type == "llama" and name.endswith("k_proj.weight"):
            data = _permute(data, cfg.num_attention_heads, cfg.num_key_value_heads)
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise ValueError(f"the gguf package has no name for {name}")
        w.add_tensor(new, np.ascontiguousarray(data, dtype=np.float32))
    if model_type == "llama" and (rope.get("rope_type") or "default") == "llama3":
        w.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight",
                     np.array(_llama3_rope_factors(cfg), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _greedy(model, prompt: list, new_tokens: int) -> list:
    """Greedy continuation by full forwards of the growing sequence (no cache)."""
    import torch
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(new_tokens):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def _logits(model, tokens):
    import torch
    with torch.no_grad():
        return model(input_ids=torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()


def make(spec: dict, out: Path, results: dict) -> None:
    import numpy as np
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    config_class = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[spec["model_type"]]
    model_class = {"llama": transformers.LlamaForCausalLM, "qwen2": transformers.Qwen2ForCausalLM}[spec["model_type"]]
    torch.manual_seed(spec["seed"])
    model = model_class(config_class(**spec["config"])).float().eval()
    _randomize(model, spec["seed"])
    kwargs = {"max_shard_size": spec["shard_size"]} if spec.get("shard_size") else {}
    model.save_pretrained(spec["dir"], **kwargs)
    np.save(out / f"{spec['name']}.npy", _logits(model, spec["tokens"]))
    results[spec["name"]] = {"greedy": _greedy(model, spec["prompt"], spec["new_tokens"]),
                             "files": sorted(p.name for p in Path(spec["dir"]).iterdir())}
    write_gguf(model, spec["model_type"], spec["gguf"])
    gguf_path = Path(spec["gguf"])
    from_gguf = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                     dtype=torch.float32).eval()
    np.save(out / f"{spec['name']}_gguf.npy", _logits(from_gguf, spec["tokens"]))


def load(spec: dict, out: Path, results: dict) -> None:
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    if spec["kind"] == "peft":
        from peft import PeftModel
        base = AutoModelForCausalLM.from_pretrained(spec["base"], dtype=torch.float32)
        model = PeftModel.from_pretrained(base, spec["dir"]).eval()
    else:
        model = AutoModelForCausalLM.from_pretrained(spec["dir"], dtype=torch.float32).eval()
    np.save(out / f"{spec['name']}.npy", _logits(model, spec["tokens"]))
    results[spec["name"]] = {"class": type(model).__name__}
    if spec.get("text") is not None and (Path(spec["dir"]) / "tokenizer.json").is_file():
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(spec["dir"])
        results[spec["name"]]["ids"] = tok(spec["text"], add_special_tokens=False)["input_ids"]


def main(request_path: str, out_dir: str) -> None:
    import torch
    torch.set_num_threads(1)     # 2 shared cores: extra threads only wait on each other
    request = json.loads(Path(request_path).read_text())
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    for spec in request.get("make", []):
        make(spec, out, results)
    for spec in request.get("load", []):
        load(spec, out, results)
    import transformers
    results["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__}
    (out / "results.json").write_text(json.dumps(results))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: arch_reference.py REQUEST.json OUT_DIR")
    main(sys.argv[1], sys.argv[2])
