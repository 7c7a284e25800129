"""The GGUF-metadata tokenizer: a tiny synthetic vocabulary, bad metadata, and pinned ids
of the real SmolLM2 vocabulary (the full comparison with transformers is in
test_crosscheck_transformers.py)."""

import numpy as np
import pytest

from mode_jax.model_io.gguf_loader import ModelFileError, write_gguf
from mode_jax.ref.config import LlamaConfig
from mode_jax.model_io.tokenizer import (REQUIRED_FIELDS, TOKEN_CONTROL, TOKEN_NORMAL, Tokenizer, bytes_to_unicode,
                                load_tokenizer, tokenizer_from_metadata)
from tests.crosscheck_setup import smollm2_gguf, smollm2_tokenizer  # noqa: F401 (fixtures)

B2U = bytes_to_unicode()
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _spell(text: str) -> str:
    return "".join(B2U[b] for b in text.encode("utf-8"))


def tiny_metadata(pre="smollm"):
    """All 256 byte symbols, so any text round-trips, plus a few merges."""
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("1", "2"), ("Ġ", "Ġ"), ("i", "n"), ("Ġ", "in")]
    tokens = SPECIAL + [B2U[b] for b in range(256)] + ["".join(m) for m in merges]
    return {
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.merges": [" ".join(m) for m in merges],
        "tokenizer.ggml.token_type": [TOKEN_CONTROL] * 3 + [TOKEN_NORMAL] * (len(tokens) - 3),
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.padding_token_id": 0,
    }


@pytest.fixture(scope="module")
def tiny():
    return tokenizer_from_metadata(tiny_metadata())


def test_interface(tiny):
    assert isinstance(tiny, Tokenizer)
    ids = tiny.encode("the theme")
    assert isinstance(ids, list) and all(isinstance(i, int) for i in ids)
    assert isinstance(tiny.decode(ids), str)
    assert (tiny.bos_id, tiny.eos_id, tiny.pad_id, tiny.vocab_size) == (1, 2, 0, 3 + 256 + 7)


def test_merges_are_applied(tiny):
    assert [tiny.token(i) for i in tiny.encode(" the in")] == ["Ġthe", "Ġin"]


@pytest.mark.parametrize("text", [
    "plain ascii", "  leading spaces", "tabs\tand\r\nCRLF\n", "emoji 🤗👍🏽👨‍👩‍👧", "CJK 中文 日本語 한국어",
    "e\u0301 combining", "digits 1234567890123", "\x00\x04 control bytes", "∀x∈ℝ", "",
])
def test_round_trip(tiny, text):
    assert tiny.decode(tiny.encode(text)) == text


def test_digit_split_pre_tokenizer(tiny):
    # "12" is a merge, but smollm's pre-tokenizer cuts digits apart first.
    assert [tiny.token(i) for i in tiny.encode("12")] == ["1", "2"]
    # and a whitespace run before a digit stays one piece ("ĠĠ" merges) ...
    assert [tiny.token(i) for i in tiny.encode("=  4")] == ["=", "ĠĠ", "4"]
    # ... while GPT-2's regex alone gives the last space to the digit's piece.
    gpt2 = tokenizer_from_metadata(tiny_metadata(pre="gpt2"))
    assert [gpt2.token(i) for i in gpt2.encode("12")] == ["12"]
    assert [gpt2.token(i) for i in gpt2.encode("=  4")] == ["=", "Ġ", "Ġ", "4"]


def test_qwen2_pre_tokenizer_splits_single_digits():
    # Qwen2's regex is Llama 3's with \p{N} for \p{N}{1,3}: "1234" is four pieces before BPE
    # (so the "12" merge cannot apply), where Llama 3 cuts "123" | "4" and merges "12" + "3".
    qwen2 = tokenizer_from_metadata(tiny_metadata(pre="qwen2"))
    llama3 = tokenizer_from_metadata(tiny_metadata(pre="llama3"))
    assert [qwen2.token(i) for i in qwen2.encode("in 1234")] == ["in", "Ġ", "1", "2", "3", "4"]
    assert [llama3.token(i) for i in llama3.encode("in 1234")] == ["in", "Ġ", "12", "3", "4"]
    # A space run before a digit: the regex's \s+(?!\S) takes all but the last space, then \s+ it.
    assert [qwen2.token(i) for i in qwen2.encode("=  4")] == ["=", "Ġ", "Ġ", "4"]
    assert qwen2.decode(qwen2.encode("x = 12345\n")) == "x = 12345\n"


def test_pre_tokenizer_override(tiny):
    meta = tiny_metadata(pre="smollm")
    assert tokenizer_from_metadata(meta, pre_tokenizer="gpt2").pre_tokenizer == "gpt2"


def test_special_tokens_are_matched_whole(tiny):
    assert tiny.encode("<|im_start|>hi<|im_end|>") == [1] + tiny.encode("hi") + [2]
    assert tiny.decode([0]) == "<|endoftext|>"


def test_encode_batch_matches_encode(tiny):
    texts = ["a b c", "the 12 themes", "🤗"]
    assert tiny.encode_batch(texts) == [tiny.encode(t) for t in texts]


def test_load_from_gguf_file(tmp_path):
    cfg = LlamaConfig.tiny(vocab_size=3 + 256 + 7, d_model=32, head_dim=8, n_layers=1)
    from mode_jax.ref.llama import init_llama
    import jax

    params = jax.tree_util.tree_map(np.asarray, init_llama(jax.random.PRNGKey(0), cfg))
    path = write_gguf(tmp_path / "t.gguf", params, cfg, tokenizer=tiny_metadata())
    tok = load_tokenizer(path)
    assert tok.vocab_size == cfg.vocab_size and tok.pre_tokenizer == "smollm"
    assert tok.decode(tok.encode("Hello, wörld 42!")) == "Hello, wörld 42!"


# ----------------------------------------------------------------------------- bad metadata

@pytest.mark.parametrize("field", REQUIRED_FIELDS)
def test_missing_field_is_named(field):
    meta = tiny_metadata()
    del meta[field]
    with pytest.raises(ModelFileError, match=f"missing {field}"):
        tokenizer_from_metadata(meta)


def test_gguf_without_tokenizer_names_file_and_fields(tmp_path):
    cfg = LlamaConfig.tiny(d_model=32, head_dim=8, n_layers=1)
    from mode_jax.ref.llama import init_llama
    import jax

    params = jax.tree_util.tree_map(np.asarray, init_llama(jax.random.PRNGKey(0), cfg))
    path = write_gguf(tmp_path / "no-tok.gguf", params, cfg)
    with pytest.raises(ModelFileError, match=r"no-tok\.gguf.*missing tokenizer\.ggml\.model"):
        load_tokenizer(path)


@pytest.mark.parametrize("key,value,message", [
    ("tokenizer.ggml.model", "llama", "unsupported tokenizer model 'llama'"),
    ("tokenizer.ggml.pre", "klingon", "unsupported pre-tokenizer 'klingon'"),
    ("tokenizer.ggml.bos_token_id", 100000, "bos_token_id=100000 is outside"),
    ("tokenizer.ggml.token_type", [1, 1, 1], "token_type has 3 entries"),
    ("tokenizer.ggml.merges", ["Ġ t", "q zz"], "merges entry 'q zz'"),
])
def test_bad_field_is_named(key, value, message):
    meta = tiny_metadata()
    meta[key] = value
    with pytest.raises(ModelFileError, match=message):
        tokenizer_from_metadata(meta)


def test_duplicate_token_is_refused():
    meta = tiny_metadata()
    meta["tokenizer.ggml.tokens"] = meta["tokenizer.ggml.tokens"][:-1] + ["a"]
    with pytest.raises(ModelFileError, match="lists 'a' twice"):
        tokenizer_from_metadata(meta)


def test_load_tokenizer_missing_file(tmp_path):
    with pytest.raises(ModelFileError, match="does not exist"):
        load_tokenizer(tmp_path / "none.gguf")


# ----------------------------------------------------------------------------- the real vocabulary

# Ids from transformers 5.23's GGUF tokenizer for the same file (identical where no
# whitespace run precedes a digit; the last case is where the file's digit split matters).
PINNED = {
    "Hello world": [19556, 905],
    "x = 12345678901 + 3.14": [104, 446, 216, 33, 34, 35, 36, 37, 38, 39, 40, 41, 32, 33, 1232, 216, 35, 30, 33, 36],
    " leading": [2899],
    "日本語 🤗 café\r\n\tend": [23274, 115, 40993, 179, 120, 248, 15107, 114, 241, 37366, 2738, 197, 486],
    "<|im_start|>user\nhi<|im_end|>": [1, 4093, 198, 6004, 2],
    "Let x =  42.": [4239, 1792, 446, 256, 36, 34, 30],
}


def test_smollm2_pinned_ids(smollm2_tokenizer):
    tok = smollm2_tokenizer
    assert (tok.bos_id, tok.eos_id, tok.vocab_size, tok.pre_tokenizer) == (1, 2, 49152, "smollm")
    for text, ids in PINNED.items():
        assert tok.encode(text) == ids, text
        assert tok.decode(ids) == text


# ----------------------------------------------------------------------------- tokenizer.json and vocab_hash

def test_vocab_hash_by_hand(tmp_path):
    import hashlib
    import json

    from tokenizers import Tokenizer as Backend
    from tokenizers import models

    from mode_jax.model_io.tokenizer import vocab_hash
    tok = Tokenizer(Backend(models.WordLevel(vocab={"b": 1, "a": 0, "é": 2}, unk_token="a")), bos_id=0, eos_id=1)
    assert vocab_hash(tok) == hashlib.sha256('[[0,"a"],[1,"b"],[2,"é"]]'.encode()).hexdigest()
    other = Tokenizer(Backend(models.WordLevel(vocab={"b": 0, "a": 1, "é": 2}, unk_token="a")), bos_id=0, eos_id=1)
    assert vocab_hash(other) != vocab_hash(tok)            # same spellings, other ids
    assert json.dumps(sorted(tok.vocab().items())) == '[["a", 0], ["b", 1], ["\\u00e9", 2]]'


def _hf_dir(tmp_path, tiny, **configs):
    import json
    tiny.backend.save(str(tmp_path / "tokenizer.json"))
    for name, value in configs.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(value))
    return tmp_path


def test_tokenizer_json_agrees_with_the_gguf_metadata(tiny, tmp_path):
    from mode_jax.model_io.tokenizer import load_hf_tokenizer, model_tokenizer, vocab_hash
    path = _hf_dir(tmp_path, tiny, config={"eos_token_id": [2, 0], "bos_token_id": 1, "vocab_size": 300})
    hf = load_hf_tokenizer(path)
    assert (hf.eos_id, hf.bos_id, hf.vocab_size) == (2, 1, tiny.vocab_size)
    assert vocab_hash(hf) == vocab_hash(tiny) and model_tokenizer(path).eos_id == 2
    for text in ("the 12 thin  in", "x =  42\n<|im_end|>", "ünïcode ∂"):
        assert hf.encode(text) == tiny.encode(text)


def test_tokenizer_config_names_the_eos(tiny, tmp_path):
    from mode_jax.model_io.tokenizer import load_hf_tokenizer
    path = _hf_dir(tmp_path, tiny, tokenizer_config={"eos_token": {"content": "<|im_end|>"}})
    assert load_hf_tokenizer(path / "tokenizer.json").eos_id == 2


@pytest.mark.parametrize("configs, message", [
    ({}, "no EOS token"),
    ({"tokenizer_config": {"eos_token": "</s>"}}, "names eos_token '</s>', which"),
    ({"config": {"eos_token_id": 2, "vocab_size": 100}}, "does not fit the model's embedding"),
])
def test_hf_tokenizer_errors(tiny, tmp_path, configs, message):
    from mode_jax.model_io.tokenizer import load_hf_tokenizer
    with pytest.raises(ModelFileError, match=message):
        load_hf_tokenizer(_hf_dir(tmp_path, tiny, **configs))


def test_unreadable_or_missing_tokenizer_json(tmp_path):
    from mode_jax.model_io.tokenizer import load_hf_tokenizer
    with pytest.raises(ModelFileError, match="has no tokenizer.json"):
        load_hf_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelFileError, match="not a readable tokenizer.json"):
        load_hf_tokenizer(tmp_path)
