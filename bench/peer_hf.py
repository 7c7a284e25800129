"""The peer: transformers (+ PEFT LoRA) train-step throughput, for bench/gpu_train.py to compare with.

A SmolLM2-135M-shaped LlamaForCausalLM with random weights (they time the same as
real ones), weights in bf16, SDPA attention, torch.optim.AdamW(fused=True), loss
from `labels=input_ids` (transformers shifts them), batch x seq random tokens. Modes:
  full  every weight trains
  lora  PEFT LoRA r16, alpha 32, on q/k/v/o projections; the rest frozen
each through torch.compile (the comparison's baseline) and, with --eager, without.
Step time is the median of --steps steps, each synchronised, after --warmup steps
(which include the compiles). One JSON line per run goes to stdout (and to --out, overwritten):
  {"peer": "transformers", "mode", "compile", "batch", "seq", "step_ms",
   "tokens_per_s", "compile_s", "loss", "trainable_params", "device", versions...}

Runs on the GPU machine's system python3 (torch 2.11, transformers 5.x, peft):
    python3 bench/peer_hf.py --out /tmp/peer.jsonl          # ~3-5 minutes on an H100
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shapes import SHAPES, hf_kwargs  # noqa: E402  (a sibling file; bench/ is not a package)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--modes", default="full,lora")
    p.add_argument("--eager", action="store_true", help="also time each mode without torch.compile")
    p.add_argument("--out", default=None, help="also write the JSON lines to this file")
    p.add_argument("--small", action="store_true", help="tiny model on CPU: checks the script runs")
    p.add_argument("--shape", default="135m", choices=list(SHAPES), help="model shape (bench/shapes.py)")
    return p.parse_args(argv)


def build_model(mode: str, small: bool, device, shape_name: str = "135m"):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = hf_kwargs(shape_name)
    if small:
        shape = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=8, rope_theta=100000.0)
    cfg = LlamaConfig(**shape, max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(device=device, dtype=torch.bfloat16)
    if mode == "lora":
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    return model, cfg.vocab_size


def time_mode(mode: str, compiled: bool, args, device) -> dict:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model, vocab = build_model(mode, args.small, device, args.shape)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.01, fused=device.type == "cuda")
    forward = torch.compile(model) if compiled else model
    tokens = torch.randint(0, vocab, (args.batch, args.seq), device=device)

    def step():
        loss = forward(input_ids=tokens, labels=tokens).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    start = time.perf_counter()
    for _ in range(args.warmup):
        loss = step()
    sync()
    warmup_s = time.perf_counter() - start
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return {"peer": "transformers", "mode": mode, "compile": compiled, "shape": args.shape,
            "batch": args.batch, "seq": args.seq, "peak_mem_gb": _peak_mem_gb(device),
            "step_ms": 1e3 * seconds, "tokens_per_s": args.batch * args.seq / seconds,
            "compile_s": warmup_s - args.warmup * seconds, "loss": float(loss.detach().float()),
            "trainable_params": sum(p.numel() for p in trainable),
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            **{name: _version(name) for name in ("torch", "transformers", "peft")}}


def _peak_mem_gb(device) -> float | None:
    import torch
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def _version(name: str) -> str | None:
    from importlib import metadata
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() and not args.small else "cpu")
    if args.small:
        args.batch, args.seq, args.steps, args.warmup = 2, 16, 2, 1
    failed = False
    if args.out:
        open(args.out, "w").close()            # this run's lines only
    for mode in [m for m in args.modes.split(",") if m]:
        for compiled in ([False, True] if args.eager else [True]):
            try:
                rec = time_mode(mode, compiled, args, device)
            except Exception as e:   # report and go on: one failing mode must not hide the other
                failed = True
                rec = {"peer": "transformers", "mode": mode, "compile": compiled,
                       "error": f"{type(e).__name__}: {e}"[:500]}
            line = json.dumps(rec)
            print(line, flush=True)
            if args.out:
                with open(args.out, "a") as fh:
                    fh.write(line + "\n")
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
