"""Other backbones against transformers: Llama 3 RoPE scaling and Qwen2.

transformers itself (Python 3.11 env, tests/crosscheck/arch_reference.py, one subprocess
for every case) creates tiny random-weight models from a LlamaConfig with llama3
rope scaling (saved sharded, with model.safetensors.index.json) and a Qwen2Config (tied
head, q/k/v biases), saves them, and writes a GGUF of the same weights as llama.cpp's
converter would. We load both with our loaders: float32 logits within the tolerance table,
greedy tokens equal. transformers' own reading of each GGUF checks the file's conventions
(its GGUF loader ignores rope_freqs, so for Llama 3 it is compared without the scaling).
Fails (never skips) without the environment: `bash .ci/prepare_crosscheck.sh`.
"""

import json
import os
import subprocess
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mode_jax.fast import model as fast_model
from mode_jax.fast import params as fast_params
from mode_jax.fast.config import FastConfig
from mode_jax.model_io.gguf_loader import read_gguf
from mode_jax.model_io.hf_loader import read_hf_dir, save_hf_dir
from mode_jax.ref.config import LlamaConfig, RopeScaling
from mode_jax.ref.llama import init_llama, llama_forward
from tests.crosscheck_setup import py311  # noqa: F401 (fixture)
from tests.tolerances import assert_close

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parent / "crosscheck" / "arch_reference.py"
# head_dim 16, theta 1e4: wavelengths 2 pi 1e4^(i/8) = 6.3 ... 19869; with original 256, high 4
# and low 1 three frequencies are kept (< 64), one interpolated and four divided by 8 (> 256).
LLAMA3_RULE = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 256}
SHAPE = {"vocab_size": 128, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "intermediate_size": 96, "max_position_embeddings": 512}
CASES = {
    "llama3": ("llama", {**SHAPE, "head_dim": 16, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
                         "rope_scaling": {"rope_type": "llama3", "rope_theta": 10000.0, **LLAMA3_RULE}}, "40KB"),
    "qwen2": ("qwen2", {**SHAPE, "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "rope_theta": 1e6}, None),
}
PROMPT, NEW_TOKENS = [5, 17, 3, 99, 42], 8


def run_reference(python, request: dict, work: Path) -> dict:
    """Run arch_reference.py on `request` (written to work/request.json), its outputs in
    work/out; returns results.json. Fails the test with the script's stderr if it fails."""
    (work / "request.json").write_text(json.dumps(request))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([str(python), str(SCRIPT), str(work / "request.json"), str(work / "out")],
                          capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"{SCRIPT.name} failed with exit {proc.returncode}:\n{proc.stderr[-4000:]}", pytrace=False)
    return json.loads((work / "out" / "results.json").read_text())


@pytest.fixture(scope="session")
def arch(py311, tmp_path_factory):  # noqa: F811
    """Run the transformers side once: {name: {dir, gguf, tokens, logits, gguf_logits, greedy, files}}."""
    work = tmp_path_factory.mktemp("arch")
    tokens = np.random.default_rng(0).integers(0, SHAPE["vocab_size"], (2, 24)).tolist()
    make = [{"name": name, "model_type": kind, "config": config, "seed": i, "dir": str(work / name),
             "shard_size": shard, "gguf": str(work / "gguf" / name / f"{name}.gguf"), "tokens": tokens,
             "prompt": PROMPT, "new_tokens": NEW_TOKENS}
            for i, (name, (kind, config, shard)) in enumerate(CASES.items())]
    for spec in make:
        Path(spec["gguf"]).parent.mkdir(parents=True)
    # The other way round: directories our save_hf_dir writes, for transformers to load.
    ours = {name: _our_dir(work / f"ours_{name}", cfg, seed) for seed, (name, cfg) in enumerate(OURS.items())}
    load = [{"name": f"ours_{name}", "kind": "hf", "dir": str(path), "tokens": tokens} for name, (path, _) in ours.items()]
    results = run_reference(py311, {"make": make, "load": load}, work)
    out = {spec["name"]: {**spec, **results[spec["name"]], "tokens": np.array(tokens, np.int32),
                          "logits": np.load(work / "out" / f"{spec['name']}.npy"),
                          "gguf_logits": np.load(work / "out" / f"{spec['name']}_gguf.npy")}
           for spec in make}
    out["ours"] = {name: {"params": params, "cfg": OURS[name], "class": results[f"ours_{name}"]["class"],
                          "tokens": np.array(tokens, np.int32), "logits": np.load(work / "out" / f"ours_{name}.npy")}
                   for name, (_, params) in ours.items()}
    return out


OURS = {"llama3": LlamaConfig.tiny(vocab_size=128, tie_embeddings=False, rope_scaling=RopeScaling(
            original_max_position_embeddings=64)),
        "qwen2": LlamaConfig.tiny(vocab_size=128, qkv_bias=True, rope_theta=1e6)}


def _our_dir(path: Path, cfg: LlamaConfig, seed: int):
    """Random params (5x init's, so RoPE and biases matter) written by save_hf_dir."""
    params = jax.tree.map(lambda a: 5.0 * np.asarray(a), init_llama(jax.random.key(seed), cfg))
    return save_hf_dir(params, cfg, path), params


def _ref_logits(params, tokens, cfg):
    return np.asarray(jax.jit(llama_forward, static_argnums=2)(jax.tree.map(jnp.asarray, params),
                                                                jnp.asarray(tokens), cfg))


def test_directories_read_as_the_right_config(arch):
    _, cfg = read_hf_dir(arch["llama3"]["dir"])
    assert cfg.rope_scaling == RopeScaling(**LLAMA3_RULE) and not cfg.qkv_bias and not cfg.tie_embeddings
    assert "model.safetensors.index.json" in arch["llama3"]["files"]          # really sharded
    assert sum(f.endswith(".safetensors") for f in arch["llama3"]["files"]) > 2
    params, cfg = read_hf_dir(arch["qwen2"]["dir"])
    assert cfg.qkv_bias and cfg.tie_embeddings and cfg.rope_theta == 1e6 and cfg.rope_scaling is None
    assert cfg.head_dim == 16 and np.abs(params["layers"][1]["bk"]).max() > 0.5


@pytest.mark.parametrize("name", sorted(CASES))
def test_hf_logits_match_transformers(arch, name):
    case = arch[name]
    params, cfg = read_hf_dir(case["dir"])
    theirs = case["logits"]
    assert theirs.shape == (2, 24, SHAPE["vocab_size"]) and np.abs(theirs).max() > 1.0
    assert_close(_ref_logits(params, case["tokens"], cfg), theirs)
    # The fast path (stacked scan, fused q|k|v with bias) in float32 too.
    fast = jax.jit(fast_model.logits, static_argnums=(2, 3))(
        fast_params.to_fast({"backbone": jax.tree.map(jnp.asarray, params)}), jnp.asarray(case["tokens"]), cfg,
        FastConfig.exact())
    assert_close(fast, theirs)


@pytest.mark.parametrize("name", sorted(CASES))
def test_greedy_tokens_match_transformers(arch, name):
    case = arch[name]
    params, cfg = read_hf_dir(case["dir"])
    ids = list(PROMPT)
    for _ in range(NEW_TOKENS):
        ids.append(int(_ref_logits(params, np.array([ids], np.int32), cfg)[0, -1].argmax()))
    assert ids[len(PROMPT):] == case["greedy"]
    assert len(set(case["greedy"])) > 1          # not one token repeated: the comparison has teeth


@pytest.mark.parametrize("name", sorted(CASES))
def test_gguf_logits_match_transformers(arch, name):
    case = arch[name]
    params, cfg = read_gguf(case["gguf"])
    assert cfg.qkv_bias == (name == "qwen2")
    assert (cfg.rope_freq_factors is not None) == (name == "llama3")
    assert_close(_ref_logits(params, case["tokens"], cfg), case["logits"])


def test_transformers_reads_the_ggufs_as_we_do(arch):
    """The GGUF files follow llama.cpp's conventions, by transformers' own GGUF reader: Qwen2
    gives the same logits; for Llama 3 transformers drops rope_freqs, so does this check
    (q/k permutation still exercised), and the scaling is seen to matter."""
    qwen = arch["qwen2"]
    assert_close(qwen["gguf_logits"], qwen["logits"])
    llama = arch["llama3"]
    params, cfg = read_gguf(llama["gguf"])
    unscaled = cfg.__class__(**{**cfg.__dict__, "rope_freq_factors": None})
    assert_close(_ref_logits(params, llama["tokens"], unscaled), llama["gguf_logits"])
    assert np.abs(llama["gguf_logits"] - llama["logits"]).max() > 0.1


@pytest.mark.parametrize("name", sorted(OURS))
def test_transformers_reads_what_we_write(arch, name):
    """save_hf_dir's config.json (llama3 scaling in both transformers forms; Qwen2's fields) and
    tensors, loaded by AutoModelForCausalLM: the same float32 logits."""
    ours = arch["ours"][name]
    assert ours["class"] == ("Qwen2ForCausalLM" if name == "qwen2" else "LlamaForCausalLM")
    want = _ref_logits(ours["params"], ours["tokens"], ours["cfg"])
    # 4 layers of 5x-init weights, logits up to 11: float32 rounding alone moves a few of them
    # by 5e-5 (measured against a float64 forward: ours 6.4e-5, transformers' 5.1e-5), so
    # eight times the table's float32 tolerance (still 5e-6 of the logits' scale).
    assert_close(want, ours["logits"], scale=8)
    # Teeth: without the scaling or the biases the logits are far off.
    plain = LlamaConfig.tiny(vocab_size=128, tie_embeddings=ours["cfg"].tie_embeddings, rope_theta=ours["cfg"].rope_theta)
    params = {**ours["params"], "layers": [{k: v for k, v in l.items() if not k.startswith("b")}
                                           for l in ours["params"]["layers"]]}
    assert np.abs(_ref_logits(params, ours["tokens"], plain) - ours["logits"]).max() > 0.05
