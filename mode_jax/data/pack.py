"""Tokenize documents and pack them into one flat token stream per split (uint16 or uint32).

Layout on disk: the tokens of document 1, EOS, the tokens of document 2, EOS, ...
(one EOS after every document, none before the first), as a 1-D array of the
smallest unsigned type that holds every id of the tokenizer (`token_dtype`).
The stream is stored flat rather than cut into rows so that the sequence length
is chosen at training time: `rows(tokens, seq_len)` views it as rows of
`seq_len + 1` tokens that overlap by one (inputs `row[:-1]`, targets `row[1:]`),
so every token after the first is a target exactly once per pass; the last
`(len - 1) % seq_len` tokens, less than one row, are not used.
Sequences cross document boundaries: the EOS tells the model a new document
starts (standard LM packing; no attention masking between documents).

uint16 holds ids below 65,536 (SmolLM2's vocabulary has 49,152); larger vocabularies
(Llama 3: 128,256, Qwen 2.5: 151,665) are stored as uint32. The manifest records which.
"""

from __future__ import annotations

from typing import Iterable, Protocol, Sequence

import numpy as np

TOKEN_DTYPE = np.uint16        # the default, and what manifests without a "dtype" hold
MAX_VOCAB = int(np.iinfo(TOKEN_DTYPE).max) + 1          # 65,536 ids fit uint16
STORE_DTYPES = ("uint16", "uint32")


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id (< vocab_size) fits it, else uint32."""
    if vocab_size > int(np.iinfo(np.uint32).max) + 1:
        raise ValueError(f"{vocab_size=} does not fit uint32 token ids")
    return np.dtype(np.uint16 if vocab_size <= MAX_VOCAB else np.uint32)


class TextTokenizer(Protocol):
    """What packing needs from a tokenizer (mode_jax.model_io.tokenizer.Tokenizer fits).
    `encode` must add no BOS/EOS; an `encode_batch(texts)` method is used when present."""
    eos_id: int
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...


class ByteTokenizer:
    """A stand-in tokenizer for tests and quick builds: one token per UTF-8 byte
    (id = byte + 3), ids 0/1/2 = pad/BOS/EOS, vocabulary 259."""
    name = "bytes"
    pad_id, bos_id, eos_id = 0, 1, 2
    offset = 3
    vocab_size = 256 + offset

    def encode(self, text: str) -> list[int]:
        return [b + self.offset for b in text.encode("utf-8")]

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i - self.offset for i in ids if i >= self.offset).decode("utf-8", errors="replace")

    def vocab(self) -> dict[str, int]:
        """Spellings for `tokenizer.vocab_hash`: <pad>, <bos>, <eos>, then <0x00> ... <0xFF>."""
        return {"<pad>": 0, "<bos>": 1, "<eos>": 2} | {f"<0x{b:02X}>": b + self.offset for b in range(256)}


def encode_documents(tokenizer: TextTokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text (batched when the tokenizer can)."""
    batch = getattr(tokenizer, "encode_batch", None)
    if batch is not None:
        return [list(ids) for ids in batch(list(texts))]
    return [tokenizer.encode(text) for text in texts]


def pack(token_lists: Iterable[Sequence[int]], *, eos_id: int, dtype=TOKEN_DTYPE) -> np.ndarray:
    """Concatenate documents with an EOS after each one -> 1-D array of `dtype` (uint16 / uint32).

    Raises ValueError for an id that does not fit `dtype` or an EOS inside a document
    (it would be read as a document boundary)."""
    dtype = np.dtype(dtype)
    limit = int(np.iinfo(dtype).max) + 1
    pieces = []
    for ids in token_lists:
        doc = np.asarray(ids, dtype=np.int64)
        if doc.size and (doc.min() < 0 or doc.max() >= limit):
            raise ValueError(f"token id {int(doc.max()) if doc.max() >= limit else int(doc.min())} "
                             f"does not fit {dtype.name}")
        if np.any(doc == eos_id):
            raise ValueError(f"a document's own tokens contain the EOS id {eos_id}")
        pieces.append(doc.astype(dtype))
        pieces.append(np.array([eos_id], dtype=dtype))
    if not pieces:
        return np.zeros((0,), dtype=dtype)
    return np.concatenate(pieces)


def num_rows(n_tokens: int, seq_len: int) -> int:
    """How many rows of seq_len + 1 tokens (overlapping by one) fit in n_tokens."""
    if seq_len < 1:
        raise ValueError(f"{seq_len=} must be >= 1")
    return max(0, (n_tokens - 1) // seq_len)


def rows(tokens: np.ndarray, seq_len: int) -> np.ndarray:
    """Read-only view [num_rows, seq_len + 1]: row i is tokens[i*seq_len : i*seq_len + seq_len + 1]."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tokens.shape}")
    n = num_rows(tokens.shape[0], seq_len)
    step = tokens.strides[0]
    return np.lib.stride_tricks.as_strided(tokens, shape=(n, seq_len + 1), strides=(seq_len * step, step),
                                           writeable=False)
