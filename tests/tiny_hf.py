"""A user's own world in miniature, for the own-domain and model-source tests: two corpora in
the forms `mode-jax data build --domain` reads (a JSON-lines file, a folder of text files),
a byte-level BPE tokenizer trained on them with `tokenizers`, and a tiny random Llama saved
as a Hugging Face directory (config.json, model.safetensors, tokenizer.json,
tokenizer_config.json) by mode_jax.model_io.hf_loader's writer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

EOS = "<|endoftext|>"
CONDITIONS = ("clear", "cloudy", "rainy", "foggy", "stormy", "sunny")
WINDS = ("north", "south", "east", "west")


def recipes(n: int = 120) -> list[str]:
    rng = np.random.default_rng(11)
    return [f"Recipe {i}: mix {rng.integers(1, 9)} cups of flour with {rng.integers(1, 6)} eggs, "
            f"bake for {rng.integers(10, 90)} minutes at {rng.integers(150, 250)} degrees." for i in range(n)]


def forecasts(n: int = 120) -> list[str]:
    rng = np.random.default_rng(12)
    return [f"Forecast for day {i}: {CONDITIONS[rng.integers(6)]} skies, high of {rng.integers(10, 35)}, "
            f"low of {rng.integers(-5, 10)}, wind {rng.integers(0, 60)} km/h from the {WINDS[rng.integers(4)]}."
            for i in range(n)]


def write_corpora(root: Path) -> tuple[Path, Path]:
    """recipes.jsonl (text in the field "body", plus an unrelated "id") and weather/day-NNN.txt."""
    root.mkdir(parents=True, exist_ok=True)
    jsonl = root / "recipes.jsonl"
    jsonl.write_text("".join(json.dumps({"id": i, "body": t}) + "\n" for i, t in enumerate(recipes())),
                     encoding="utf-8")
    folder = root / "weather"
    folder.mkdir(exist_ok=True)
    for i, t in enumerate(forecasts()):
        (folder / f"day-{i:03d}.txt").write_text(t, encoding="utf-8")
    return jsonl, folder


def train_tokenizer(texts, vocab_size: int = 320):
    """A byte-level BPE (GPT-2 alphabet, EOS special) trained on `texts` -> tokenizers.Tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts), trainer)
    return tok


def write_model_dir(path: Path, tokenizer, *, seed: int = 0, vocab_size: int | None = None) -> Path:
    """A tiny random Llama (4 layers, width 32) as a Hugging Face directory with `tokenizer`.
    `vocab_size` (default the tokenizer's) sets the embedding rows."""
    import jax

    from mode_jax.model_io.hf_loader import save_hf_dir
    from mode_jax.ref.config import LlamaConfig
    from mode_jax.ref.llama import init_llama
    cfg = LlamaConfig.tiny(vocab_size=vocab_size or tokenizer.get_vocab_size(), d_model=32, n_layers=4,
                           n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64, max_seq_len=512)
    save_hf_dir(init_llama(jax.random.key(seed), cfg), cfg, path)
    tokenizer.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": EOS}), encoding="utf-8")
    return path


def make_world(root: Path) -> dict:
    """Both corpora, the tokenizer trained on them and a model directory using it, under `root`."""
    jsonl, folder = write_corpora(root / "src")
    tok = train_tokenizer(recipes() + forecasts())
    return {"root": root, "jsonl": jsonl, "folder": folder, "tok": tok, "model": write_model_dir(root / "model", tok)}
