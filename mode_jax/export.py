"""What a run trained, in the formats other tools load; and any run back in one call.

    mode-jax export --run runs/lora --to peft out/adapter   # PeftModel.from_pretrained(base, "out/adapter")
    mode-jax export --run runs/full --to hf out/model       # AutoModelForCausalLM.from_pretrained("out/model")

    from mode_jax.export import load_run
    run = load_run("runs/mode-2x")          # any finished run: MoDE, LoRA, full FT, one expert
    logits = run.logits(tokens)             # tokens int [B, T] -> float32 [B, T, V]

* A LoRA run becomes a PEFT adapter directory: `adapter_config.json` (r, lora_alpha,
  target_modules, base_model_name_or_path) and `adapter_model.safetensors` with PEFT's
  key names (`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight` [R, in],
  `...lora_B.weight` [out, R]). Ours computes x W + (alpha / r) (x A) B with A [in, R],
  B [R, out]; PEFT computes W x + (lora_alpha / r) B' A' x, so A' = A^T, B' = B^T and the
  scaling carries over unchanged. `--to hf` on a LoRA run writes the merged model instead.
* A full fine-tuning run becomes a transformers directory: config.json + model.safetensors
  (`hf_loader.save_hf_dir`: LlamaForCausalLM, or Qwen2ForCausalLM for a Qwen2 backbone),
  plus the backbone's tokenizer files when it came from a Hugging Face directory, or its
  tokenizer.json when it came from a GGUF file.
* A MoDE model (experts and gates beside a frozen backbone) has no PEFT or transformers
  form: it stays in mode-jax's documented format (the run's expert-*.safetensors or
  model.safetensors, see pipeline/expert_io.py) and `load_run` loads it.
* A block-expansion run (LLaMA Pro, ref/expansion.py) is a plain Llama of L + n layers:
  `--to hf` writes that deeper model (`ref.expansion.as_llama`); it has no adapter form.

The output appears whole or not at all: it is written into a temporary directory beside
OUT and renamed; an existing non-empty OUT is refused unless `force`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from mode_jax.errors import UserError
from mode_jax.ref.config import LlamaConfig, LoraConfig

FORMATS = ("peft", "hf")
# Our projection names -> where Hugging Face's Llama / Qwen2 keep them (under model.layers.{i}.).
HF_MODULES = {"wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj",
              "wo": "self_attn.o_proj", "w_gate": "mlp.gate_proj", "w_up": "mlp.up_proj",
              "w_down": "mlp.down_proj"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja",
                   "generation_config.json")


@dataclasses.dataclass
class LoadedRun:
    """A finished run's model, ready to use (`mode_jax.ref` layout)."""

    params: dict                 # {"backbone", ["lora"], ["blocks"]} (ref.methods)
    config: LlamaConfig
    method: str                  # full, lora, stage1, stage2, stage2_frozen, uninit
    lora: LoraConfig | None
    label: str
    backbone: Any                # pipeline.sources.Backbone: name, kind, fingerprint, tokenizer hash
    source: str                  # the run's model.source ("tiny", a model name, a path)
    gate_top_k: int | None = None  # a MoDE run's top-k gate (its mode.gate_top_k; None: dense)

    def logits(self, tokens) -> np.ndarray:
        """tokens int [B, T] -> float32 logits [B, T, V] (`ref.methods.apply`, jitted)."""
        import jax
        import jax.numpy as jnp

        from mode_jax.ref.methods import apply
        fn = jax.jit(apply, static_argnames=("cfg", "lora", "gate_top_k"))
        return np.asarray(fn(self.params, jnp.asarray(tokens, jnp.int32), cfg=self.config, lora=self.lora,
                             gate_top_k=self.gate_top_k))


def _run_dir(run_dir):
    from mode_jax.pipeline import runs
    run = runs.RunDir(run_dir)
    if not run.path.is_dir():
        raise UserError(f"--run: run directory {run_dir} does not exist")
    if not (run.path / runs.CONFIG).is_file():
        raise UserError(f"--run: {run_dir} is not a run directory (no {runs.CONFIG})")
    if not run.is_done():
        raise UserError(f"{run_dir} is not a finished run (no result.json): finish it with --resume first")
    return run


def load_run(run_dir: str | os.PathLike, *, progress: bool = False) -> LoadedRun:
    """Any finished train-expert / compose / finetune run, with its backbone, as `eval --run`
    loads it: the run's config.toml names the model and data, the run's files the rest."""
    from mode_jax.commands.evaluate import _load_run
    from mode_jax.pipeline import stages

    run = _run_dir(run_dir)
    cfg = run.config()
    ctx = stages.prepare(cfg, progress=progress)
    params, method, label = _load_run(run, ctx)
    lora = stages.lora_config(cfg) if method in ("lora", "lora_moe", "lora_moe_frozen") else None
    top_k = stages.gate_top_k(cfg, method)
    return LoadedRun(params=params, config=ctx.llama, method=method, lora=lora, label=label,
                     backbone=ctx.backbone, source=cfg.model.source, gate_top_k=top_k)


def _method_of(run) -> str:
    """The run's method from its files, without loading anything."""
    from safetensors import safe_open
    if any(run.path.glob("expert-*.safetensors")):
        return "stage1"
    model = run.path / "model.safetensors"
    if not model.is_file():
        raise UserError(f"{run.path} holds neither an expert file nor model.safetensors: nothing to export")
    try:
        with safe_open(str(model), framework="numpy") as f:
            return (f.metadata() or {}).get("method", "?")
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
        raise UserError(f"{model} is not a readable model file ({type(err).__name__}: {err})") from None


def check_exportable(method: str, to: str, run_dir) -> None:
    """Raise UserError if a `method` run has no `to` form, saying what to do instead."""
    if to not in FORMATS:
        raise UserError(f"--to must be one of {', '.join(FORMATS)}, got {to!r}")
    if method == "block_expansion" and to == "peft":
        raise UserError(f"{run_dir} is a block-expansion run: it adds whole layers, so there is no adapter "
                        f"to export; use --to hf (a Llama with the new layers in its stack)")
    if method not in ("lora", "full", "block_expansion"):
        what = "a PEFT adapter" if to == "peft" else "a transformers model"
        kind = "a LoRA-MoE" if method.startswith("lora_moe") else "a BTX" if method.startswith("btx") else "a MoDE"
        raise UserError(f"{run_dir} is {kind} run (method {method}): it has no form as {what}; it stays "
                        f"in mode-jax's format (the run's .safetensors files): load it in one call with "
                        f"mode_jax.export.load_run({str(run_dir)!r})")
    if method == "full" and to == "peft":
        raise UserError(f"{run_dir} is a full fine-tuning run: every weight changed, so there is no "
                        f"adapter to export; use --to hf")


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"output directory {out} exists and is not empty: pass --force to replace it")


def export_run(run_dir: str | os.PathLike, to: str, out: str | os.PathLike, *, force: bool = False,
               progress: bool = False) -> Path:
    """Export a finished LoRA (to 'peft' or 'hf', merged) or full fine-tuning run (to 'hf')
    into the directory `out`; returns it. Every refusal is a one-line UserError."""
    out = Path(out)
    run = _run_dir(run_dir)
    check_exportable(_method_of(run), to, run_dir)
    _check_out(out, force)
    loaded = load_run(run_dir, progress=progress)
    check_exportable(loaded.method, to, run_dir)
    with _atomic_dir(out) as tmp:
        if to == "peft":
            write_peft(tmp, loaded.params["lora"], loaded.lora, base=_base_name(loaded))
        else:
            write_hf(tmp, loaded)
    return out


def _base_name(loaded: LoadedRun) -> str:
    """What adapter_config.json names as the base: the model directory or file, absolute."""
    if loaded.backbone.kind in ("hf", "gguf"):
        return str(Path(loaded.source).resolve())
    return loaded.source


def peft_tensors(adapters: dict) -> dict[str, np.ndarray]:
    """Our LoRA tree {"layers": [{name: {"a": [in, R], "b": [R, out]}}]} -> PEFT's state dict."""
    out = {}
    for i, layer in enumerate(adapters["layers"]):
        for name, ab in layer.items():
            stem = f"base_model.model.model.layers.{i}.{HF_MODULES[name]}"
            out[f"{stem}.lora_A.weight"] = np.ascontiguousarray(np.asarray(ab["a"], np.float32).T)   # [R, in]
            out[f"{stem}.lora_B.weight"] = np.ascontiguousarray(np.asarray(ab["b"], np.float32).T)   # [out, R]
    return out


def peft_config(lora: LoraConfig, *, base: str | None) -> dict[str, Any]:
    """adapter_config.json: plain LoRA (no rsLoRA, no DoRA, no dropout, no bias), scaling alpha / r."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
            "r": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": 0.0,
            "target_modules": sorted(HF_MODULES[m].split(".")[-1] for m in lora.matrices),
            "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
            "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
            "layers_to_transform": None, "layers_pattern": None, "revision": None}


def write_peft(path: Path, adapters: dict, lora: LoraConfig, *, base: str | None) -> None:
    from safetensors.numpy import save_file
    save_file(peft_tensors(adapters), str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    (path / "adapter_config.json").write_text(json.dumps(peft_config(lora, base=base), indent=2) + "\n")


def write_hf(path: Path, loaded: LoadedRun) -> None:
    """The whole model (a LoRA run's adapters merged in, a block-expansion run's new layers in
    its stack) as a transformers directory."""
    from mode_jax.model_io.hf_loader import save_hf_dir
    from mode_jax.ref.lora import lora_merge

    backbone, config = loaded.params["backbone"], loaded.config
    if loaded.method == "lora":
        backbone = lora_merge(backbone, loaded.params["lora"], loaded.lora)
    if loaded.method == "block_expansion":
        from mode_jax.ref.expansion import as_llama
        backbone, config = as_llama(loaded.params, loaded.config)
    save_hf_dir(backbone, config, path)
    _write_tokenizer(path, loaded)


def _write_tokenizer(path: Path, loaded: LoadedRun) -> None:
    """The backbone's tokenizer beside the weights, when it has one (not the random 'tiny')."""
    kind = loaded.backbone.kind
    if kind == "hf":
        for name in TOKENIZER_FILES:
            src = Path(loaded.source) / name
            if src.is_file():
                shutil.copyfile(src, path / name)
    elif kind in ("gguf", "fetched"):
        from mode_jax.pipeline.sources import model_path_for
        from mode_jax.model_io.tokenizer import model_tokenizer
        tok = model_tokenizer(model_path_for(loaded.source))
        tok.backend.save(str(path / "tokenizer.json"))
        special = {"bos_token": tok.token(tok.bos_id), "eos_token": tok.token(tok.eos_id)}
        (path / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "PreTrainedTokenizerFast", **special}, indent=2) + "\n")


@contextlib.contextmanager
def _atomic_dir(out: Path):
    """A temporary directory beside `out`, renamed to `out` on success (replacing what was
    there), removed on failure; `out` is never seen half-written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
