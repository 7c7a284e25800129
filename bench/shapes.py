"""Model shapes the train-step benchmarks run at (random weights time the same as real ones).

Plain dicts in Hugging Face's LlamaConfig names, so bench/peer_hf.py (torch, no mode-jax)
and bench/gpu_train.py (JAX) build the same model. `mode_blocks` is the MoDE block count
used at that shape: it must divide the layer count (2 experts x 2 layers per block).
Shapes from the SmolLM2 model cards' config.json files.
"""

SHAPES = {
    "135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                 num_attention_heads=9, num_key_value_heads=3, head_dim=64, rope_theta=100000.0,
                 mode_blocks=3),
    "360m": dict(vocab_size=49152, hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
                 num_attention_heads=15, num_key_value_heads=5, head_dim=64, rope_theta=100000.0,
                 mode_blocks=4),
    "1.7b": dict(vocab_size=49152, hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                 num_attention_heads=32, num_key_value_heads=32, head_dim=64, rope_theta=130000.0,
                 mode_blocks=3),
}


def hf_kwargs(name: str) -> dict:
    """The shape as transformers.LlamaConfig keyword arguments."""
    return {k: v for k, v in SHAPES[name].items() if k != "mode_blocks"}
