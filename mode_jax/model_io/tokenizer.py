"""The backbone's tokenizer, rebuilt from a GGUF file's metadata or read from a Hugging Face
`tokenizer.json`, both with `tokenizers`.

    tok = load_tokenizer("SmolLM2-135M-Instruct.Q4_1.gguf")
    tok = load_hf_tokenizer("path/to/hf_model_dir")     # tokenizer.json (+ its EOS from the configs)
    tok = model_tokenizer(path)                         # either, by what `path` is
    vocab_hash(tok)                                     # what a data manifest and an expert record
    ids = tok.encode("Solve 3*x + 5 = 11 for x.")      # no BOS/EOS added
    text = tok.decode(ids)
    tok.bos_id, tok.eos_id, tok.vocab_size

A GGUF has no `tokenizer.json`; it carries the pieces under llama.cpp's keys
(`tokenizer.ggml.model`, `.pre`, `.tokens`, `.merges`, `.token_type`,
`.bos_token_id`, `.eos_token_id`). For `model = gpt2` (byte-level BPE) the
vocabulary is already spelled in GPT-2's byte alphabet, so the tokens and merges
go straight into a `tokenizers` BPE model. Tokens marked CONTROL (type 3) become
special tokens, matched whole in the text.

The pre-tokenizer (how text is cut before BPE) is named by `tokenizer.ggml.pre`
and must match the one the vocabulary was trained with, or encodings drift from
what the model saw in training. SmolLM2's `smollm` cuts every digit apart and
then applies GPT-2's regex (llama.cpp: `\\p{N}` then the GPT-2 pattern; Hugging
Face's original `tokenizer.json`: `Digits(individual_digits=True)` then
`ByteLevel`). Note that transformers' GGUF loader (5.x) ignores `pre = smollm`
and uses the GPT-2 regex alone, which differs where a run of whitespace comes
before a digit ("x =  42": `ĠĠ 4 2` here and in training, `Ġ Ġ 4 2` there);
`pre_tokenizer="gpt2"` reproduces that behaviour for comparisons.

A tokenizer's identity is `vocab_hash`: a sha256 over its (id, token) pairs. Two tokenizers
with the same hash give ids the same meaning, whichever file they came from (SmolLM2's GGUF
and its tokenizer.json agree), so built data is checked against a model by this hash.

SmolLM2's vocabulary lacks 21 of the 256 byte symbols (e.g. 0x04, 0xf1); like
every other implementation of it, encoding drops such bytes silently, so text
containing them does not round-trip.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from mode_jax.model_io.gguf_loader import ModelFileError, gguf_field, open_gguf

# llama.cpp token types (tokenizer.ggml.token_type).
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

# tokenizer.ggml.pre values whose pre-tokenizer splits digits one by one before the GPT-2 regex
# (llama.cpp's llama-vocab.cpp groups exactly these together).
DIGIT_SPLIT_PRE = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")
# ... and those that use the GPT-2 regex alone.
GPT2_PRE = ("gpt2", "default", "mpt", "olmo", "jais")
# ... and those that use Llama 3's regex (digits in groups of up to three).
LLAMA3_PRE = ("llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx")
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# ... and Qwen2's: Llama 3's regex with single digits (`\p{N}` for `\p{N}{1,3}`), as its tokenizer.json.
QWEN2_PRE = ("qwen2",)
_QWEN2_REGEX = _LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")
SUPPORTED_PRE = DIGIT_SPLIT_PRE + GPT2_PRE + LLAMA3_PRE + QWEN2_PRE

# The metadata a byte-level BPE tokenizer needs.
REQUIRED_FIELDS = ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.merges",
                   "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id")


class Tokenizer:
    """Byte-level BPE tokenizer: `encode(text) -> list[int]` (no BOS/EOS added),
    `decode(ids) -> str`, and the ids of the special tokens."""

    def __init__(self, backend, *, bos_id: int, eos_id: int, pad_id: int | None = None,
                 pre_tokenizer: str = "gpt2"):
        self.backend = backend            # the `tokenizers.Tokenizer`
        self.bos_id = int(bos_id)
        self.eos_id = int(eos_id)
        self.pad_id = None if pad_id is None else int(pad_id)
        self.pre_tokenizer = pre_tokenizer
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special-token strings such as <|im_end|> map to their ids."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` of each text, run in parallel by `tokenizers`."""
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, special tokens included, exactly as encoded."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=False)

    def vocab(self) -> dict[str, int]:
        """token spelling -> id, added and special tokens included."""
        return self.backend.get_vocab(with_added_tokens=True)

    def token(self, token_id: int) -> str | None:
        """The vocabulary entry (in byte-alphabet spelling) of one id."""
        return self.backend.id_to_token(int(token_id))

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_id={self.eos_id}, "
                f"pre_tokenizer={self.pre_tokenizer!r})")


def load_tokenizer(gguf_path: str | os.PathLike, *, pre_tokenizer: str | None = None) -> Tokenizer:
    """The tokenizer a GGUF file describes. `pre_tokenizer` overrides the file's
    `tokenizer.ggml.pre` (e.g. "gpt2" to match transformers' GGUF loader)."""
    reader = open_gguf(gguf_path)
    meta = {key: gguf_field(reader, key) for key in reader.fields if key.startswith("tokenizer.ggml.")}
    try:
        return tokenizer_from_metadata(meta, pre_tokenizer=pre_tokenizer)
    except ModelFileError as err:
        raise ModelFileError(f"{gguf_path}: {err}") from None


def tokenizer_from_metadata(meta: Mapping[str, Any], *, pre_tokenizer: str | None = None) -> Tokenizer:
    """Build the tokenizer from `tokenizer.ggml.*` metadata values (see module docstring)."""
    from tokenizers import AddedToken, decoders, models
    from tokenizers import Tokenizer as Backend

    missing = [key for key in REQUIRED_FIELDS if meta.get(key) is None]
    if missing:
        raise ModelFileError(f"tokenizer metadata is missing {', '.join(missing)}")
    model = meta["tokenizer.ggml.model"]
    if model != "gpt2":
        raise ModelFileError(f"unsupported tokenizer model {model!r} (tokenizer.ggml.model): "
                             "only 'gpt2' (byte-level BPE) is supported")
    pre = pre_tokenizer or meta.get("tokenizer.ggml.pre") or "default"
    if pre not in SUPPORTED_PRE:
        raise ModelFileError(f"unsupported pre-tokenizer {pre!r} (tokenizer.ggml.pre); "
                             f"supported: {', '.join(SUPPORTED_PRE)}")
    tokens = list(meta["tokenizer.ggml.tokens"])
    token_types = list(meta.get("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens))
    if len(token_types) != len(tokens):
        raise ModelFileError(f"tokenizer.ggml.token_type has {len(token_types)} entries, "
                             f"tokenizer.ggml.tokens has {len(tokens)}")
    vocab = {}
    for index, token in enumerate(tokens):
        # A duplicated spelling would silently shadow an id; refuse it.
        if vocab.setdefault(token, index) != index:
            raise ModelFileError(f"tokenizer.ggml.tokens lists {token!r} twice (ids {vocab[token]} and {index})")
    merges = []
    for line in meta["tokenizer.ggml.merges"]:
        pair = line.split(" ")
        if len(pair) != 2 or pair[0] not in vocab or pair[1] not in vocab or pair[0] + pair[1] not in vocab:
            raise ModelFileError(f"tokenizer.ggml.merges entry {line!r} is not a merge of two "
                                 "vocabulary tokens into a third")
        merges.append((pair[0], pair[1]))
    special = {}
    for name in ("bos", "eos", "padding"):
        value = meta.get(f"tokenizer.ggml.{name}_token_id")
        if value is not None and not 0 <= int(value) < len(tokens):
            raise ModelFileError(f"tokenizer.ggml.{name}_token_id={value} is outside the "
                                 f"vocabulary of {len(tokens)} tokens")
        special[name] = value

    backend = Backend(models.BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                                 end_of_word_suffix="", fuse_unk=False, byte_fallback=False))
    backend.pre_tokenizer = _pre_tokenizer(pre)
    backend.decoder = decoders.ByteLevel()
    byte_alphabet = set(bytes_to_unicode().values())
    # Control tokens (<|endoftext|>, <|im_start|>, ...) are matched whole. One spelled outside the
    # byte alphabet cannot be a byte-level token at all (a llama.cpp mislabel): leave it alone.
    backend.add_special_tokens([AddedToken(tok, special=True, normalized=False)
                                for tok, kind in zip(tokens, token_types)
                                if kind == TOKEN_CONTROL and set(tok) <= byte_alphabet])
    user = [AddedToken(tok, special=False, normalized=False)
            for tok, kind in zip(tokens, token_types) if kind == TOKEN_USER_DEFINED]
    if user:
        backend.add_tokens(user)
    if backend.get_vocab_size(with_added_tokens=True) != len(tokens):
        raise ModelFileError("tokenizer vocabulary size changed while adding special tokens")
    return Tokenizer(backend, bos_id=special["bos"], eos_id=special["eos"], pad_id=special["padding"],
                     pre_tokenizer=pre)


def _pre_tokenizer(pre: str):
    from tokenizers import Regex, pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in DIGIT_SPLIT_PRE:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in LLAMA3_PRE + QWEN2_PRE:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3_REGEX if pre in LLAMA3_PRE else _QWEN2_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    return byte_level


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte alphabet: each byte as a printable character (printable latin-1
    bytes stand for themselves, the other 68 are shifted to U+0100 and up)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    mapping, shifted = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + shifted)
            shifted += 1
    return mapping


# ----------------------------------------------------------------------------- identity

def vocab_hash(tokenizer) -> str:
    """sha256 hex of the tokenizer's vocabulary as JSON `[[id, token], ...]` in id order.

    Anything with `vocab() -> {token: id}` works (Tokenizer, data.pack.ByteTokenizer)."""
    pairs = sorted((int(i), str(t)) for t, i in tokenizer.vocab().items())
    return hashlib.sha256(json.dumps(pairs, ensure_ascii=False, separators=(",", ":")).encode("utf-8")).hexdigest()


# ----------------------------------------------------------------------------- Hugging Face

def load_hf_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """The tokenizer of a Hugging Face model directory (its `tokenizer.json`), or of a lone
    `tokenizer.json` file whose directory holds the configs naming the EOS token.

    The EOS id comes from tokenizer_config.json's `eos_token`, else config.json's or
    generation_config.json's `eos_token_id` (the first, when a list). A directory's
    config.json `vocab_size` must hold every id of the tokenizer (else the model's
    embedding has no row for some tokens)."""
    from tokenizers import Tokenizer as Backend

    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    folder = file.parent
    if not file.is_file():
        raise ModelFileError(f"{folder} has no tokenizer.json (a Hugging Face model directory needs "
                             "config.json, *.safetensors and tokenizer.json)")
    try:
        backend = Backend.from_file(str(file))
    except Exception as err:  # noqa: BLE001 - tokenizers raises its own Exception type for bad files
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ModelFileError(f"{file} is not a readable tokenizer.json ({first})") from None
    configs = {name: _json_or_empty(folder / name)
               for name in ("tokenizer_config.json", "config.json", "generation_config.json")}
    eos_id = _hf_eos_id(backend, configs, file)
    bos = configs["tokenizer_config.json"].get("bos_token")
    bos_id = backend.token_to_id(bos.get("content") if isinstance(bos, dict) else bos) if bos else None
    if bos_id is None:
        bos_id = _first_id(configs["config.json"].get("bos_token_id"))
    tok = Tokenizer(backend, bos_id=eos_id if bos_id is None else bos_id, eos_id=eos_id,
                    pre_tokenizer="tokenizer.json")
    ids = tok.vocab().values()
    model_vocab = configs["config.json"].get("vocab_size")
    if isinstance(model_vocab, int) and ids and max(ids) >= model_vocab:
        raise ModelFileError(f"{file} has token ids up to {max(ids)}, but config.json's vocab_size is "
                             f"{model_vocab}: the tokenizer's vocabulary does not fit the model's embedding")
    return tok


def _json_or_empty(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ModelFileError(f"{path} is not valid JSON ({err})") from None
    return value if isinstance(value, dict) else {}


def _first_id(value):
    if isinstance(value, list):
        value = value[0] if value else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _hf_eos_id(backend, configs: dict, file: Path) -> int:
    eos = configs["tokenizer_config.json"].get("eos_token")
    if isinstance(eos, dict):
        eos = eos.get("content")
    if isinstance(eos, str):
        eos_id = backend.token_to_id(eos)
        if eos_id is None:
            raise ModelFileError(f"tokenizer_config.json names eos_token {eos!r}, which {file} does not have")
        return eos_id
    for name in ("config.json", "generation_config.json"):
        eos_id = _first_id(configs[name].get("eos_token_id"))
        if eos_id is not None:
            return eos_id
    raise ModelFileError(f"no EOS token for {file}: none of tokenizer_config.json (eos_token), config.json or "
                         "generation_config.json (eos_token_id) beside it names one")


@functools.lru_cache(maxsize=4)
def _model_tokenizer_cached(path: str, mtime_ns: int) -> Tokenizer:
    p = Path(path)
    if p.is_dir() or p.name.endswith(".json"):
        return load_hf_tokenizer(p)
    return load_tokenizer(p)


def model_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """The tokenizer of a model file or directory: a .gguf file (its metadata), a Hugging Face
    directory or a tokenizer.json file. Cached per path and modification time."""
    p = Path(path).resolve()
    if not p.exists():
        raise ModelFileError(f"{path} does not exist")
    return _model_tokenizer_cached(str(p), p.stat().st_mtime_ns)
