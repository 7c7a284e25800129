"""Greedy generation on the real SmolLM2 against transformers' `generate` (its KV cache, its
GGUF reader): 5 prompts x 32 new tokens, token for token, by fast/ (the 5 prompts as one
left-padded batch, float32) and by ref/ (one of them). The transformers side runs in the
Python 3.11 environment (tests/crosscheck_setup.py says how it is made); fails, never skips,
without it."""

import json
import os
import subprocess

import jax
import numpy as np
import pytest

from mode_jax.fast import decode as fdecode
from mode_jax.fast.config import FastConfig
from mode_jax.fast.generate import generate
from mode_jax.fast.params import to_fast
from mode_jax.ref import decode as rdecode
from tests.crosscheck_setup import REPO, py311, smollm2_gguf, smollm2_model, smollm2_tokenizer  # noqa: F401

pytestmark = pytest.mark.slow

NEW = 32
PROMPTS = [
    "The capital of France is",
    "<|im_start|>user\nWhat is the boiling point of water in Celsius?<|im_end|>\n<|im_start|>assistant\n",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Solve 3*x + 5 = 11 for x.\n",
    "Once upon a time, in a small village by the sea,",
]


@pytest.fixture(scope="module")
def transformers_greedy(py311, smollm2_gguf, smollm2_tokenizer, tmp_path_factory):
    tok = smollm2_tokenizer
    prompts = [tok.encode(p) for p in PROMPTS]
    work = tmp_path_factory.mktemp("generate")
    (work / "request.json").write_text(json.dumps({"gguf": str(smollm2_gguf), "prompts": prompts,
                                                   "max_new_tokens": NEW, "eos_id": tok.eos_id}))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([str(py311), str(REPO / "tests" / "crosscheck" / "hf_generate.py"),
                           str(work / "request.json"), str(work / "out.json")],
                          capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode != 0:
        pytest.fail(f"hf_generate.py failed with exit {proc.returncode}:\n{proc.stderr[-4000:]}", pytrace=False)
    return prompts, json.loads((work / "out.json").read_text())


def _report(tok, ours, theirs):
    for p, a, b in zip(PROMPTS, ours, theirs):
        print(f"\n{p[-30:]!r} -> ours {tok.decode(a)!r}\n{'':34s}transformers {tok.decode(b)!r}")


def test_fast_batched_greedy_equals_transformers(transformers_greedy, smollm2_model, smollm2_tokenizer):
    prompts, hf = transformers_greedy
    params, cfg = smollm2_model
    fast = FastConfig.exact()
    out = generate(fdecode.prepare(to_fast({"backbone": params}), fast), prompts, cfg, fast, max_new_tokens=NEW,
                   eos_id=smollm2_tokenizer.eos_id)
    _report(smollm2_tokenizer, out.tokens, hf["generated"])
    assert [len(p) for p in prompts] != [len(prompts[0])] * len(prompts)     # a ragged batch
    assert sum(map(len, hf["generated"])) >= 3 * NEW                          # real continuations
    assert out.tokens == hf["generated"]
    assert smollm2_tokenizer.decode(out.tokens[0]).startswith(" Paris")


def test_ref_greedy_equals_transformers(transformers_greedy, smollm2_model, smollm2_tokenizer):
    prompts, hf = transformers_greedy
    params, cfg = smollm2_model
    for i in (3,):
        out = rdecode.generate(params, np.array([prompts[i]]), cfg, max_new_tokens=NEW,
                               eos_id=smollm2_tokenizer.eos_id, key=jax.random.key(0))
        assert out.tokens[0] == hf["generated"][i], i
