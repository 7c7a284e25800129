"""Which evaluated targets are the answer of a question/answer document (Math's answer accuracy).

A Math document is one problem, "question\\nanswer" (data/mathgen.py: the answer is at most
30 characters and holds no newline), packed as document, EOS, document, EOS, ... (data/pack.py).
Only about a tenth of a Math row's targets are answer tokens; the rest is the question, which
the model can only guess. So beside the accuracy on all targets, evaluation reports the
accuracy on the answer's tokens alone.

The answer's tokens are read off the token stream, deterministically: in each document,
the targets after the document's last token whose text holds a newline, up to (not
including) the separator that closes the document. A document without a newline token
has no answer tokens (it is not a question/answer pair, or its evaluation copy was cut
before the answer). The newline tokens are those whose decoded text contains "\\n", so
a tokenizer that merges "?\\n" into one token is handled like one that keeps "\\n" apart.

Which domains are question/answer pairs is data, not a name: built data whose manifest
says the domain came from the math generator (mathematics-dataset), and the synthetic
"math" domain ("What is a + b?\\nvalue").
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from mode_jax.pipeline.eval_units import row_offsets


def answer_positions(stream: np.ndarray, separator: int, newline_ids: np.ndarray) -> np.ndarray:
    """bool [len(stream)]: which stream positions hold an answer token (see the module docstring)."""
    stream = np.asarray(stream)
    is_sep = stream == separator
    is_nl = np.isin(stream, newline_ids) & ~is_sep
    doc = np.cumsum(is_sep) - is_sep                         # document index; its closing separator included
    nl_before = np.cumsum(is_nl)                             # newline tokens up to and including p
    start = np.concatenate([[0], np.flatnonzero(is_sep) + 1])[doc]     # first position of p's document
    nl_upto = nl_before - np.concatenate([[0], nl_before])[start]      # newline tokens in p's document up to p
    total = np.bincount(doc, weights=is_nl, minlength=int(doc[-1]) + 1 if doc.size else 0)[doc]
    return (total > 0) & (nl_upto == total) & ~is_nl & ~is_sep


def answer_mask(stream: np.ndarray, rows: np.ndarray, seq_len: int, separator: int | None,
                newline_ids: np.ndarray) -> np.ndarray | None:
    """bool [n, seq_len]: which targets of the eval `rows` are answer tokens; None when the rows
    cannot be placed in `stream` or the data has no separator."""
    if separator is None:
        return None
    offsets = row_offsets(stream, rows, seq_len)
    if offsets is None:
        return None
    targets = offsets[:, None] + 1 + np.arange(seq_len)[None, :]             # [n, seq_len] stream positions
    return answer_positions(stream, separator, newline_ids)[targets]


def answer_counts(correct: np.ndarray, mask: np.ndarray, documents: tuple[np.ndarray, str] | None
                  ) -> dict[str, Any]:
    """Accuracy on the answer targets (`mask`, [n, T]) and its counts per document (only the
    documents with an answer token in the eval rows), as engine.evaluate's per_document."""
    from mode_jax.pipeline.engine import document_counts
    counted = int(mask.sum())
    return {"accuracy": float((correct & mask).sum() / counted) if counted else None, "tokens": counted,
            "per_document": document_counts(correct, mask, documents)}


def newline_ids(tokenizer, vocab_size: int) -> np.ndarray:
    """int64 ids whose decoded text contains a newline."""
    return np.array([i for i in range(vocab_size) if "\n" in tokenizer.decode([i])], np.int64)


@functools.lru_cache(maxsize=4)
def _model_newlines(path: str, vocab_size: int) -> np.ndarray:
    from mode_jax.model_io.tokenizer import model_tokenizer
    return newline_ids(model_tokenizer(path), vocab_size)


def qa_setup(cfg, domains) -> tuple[list[str], np.ndarray | None]:
    """(the `domains` that are question/answer pairs, the data tokenizer's newline ids); no
    domains when the data's tokenizer cannot be had (built data under a "tiny" model that
    was not built with the byte tokenizer)."""
    from mode_jax.data.pack import ByteTokenizer
    if cfg.data.source == "synthetic":
        qa = [d for d in domains if d == "math"]
        return qa, newline_ids(ByteTokenizer(), ByteTokenizer.vocab_size) if qa else None
    from mode_jax.data.mathgen import PACKAGE
    from mode_jax.data.store import read_manifest
    from mode_jax.pipeline import sources
    manifest = read_manifest(sources.data_dir(cfg))
    qa = [d for d in domains if manifest.get("domains", {}).get(d, {}).get("source", {}).get("package") == PACKAGE]
    if not qa:
        return [], None
    tok = manifest.get("tokenizer", {})
    if tok.get("kind") == "bytes":
        return qa, newline_ids(ByteTokenizer(), ByteTokenizer.vocab_size)
    if cfg.model.source == "tiny":
        return [], None
    return qa, _model_newlines(str(sources.model_path(cfg)), int(tok.get("vocab_size", 0)))


def eval_answer_masks(cfg, held_out: dict, eval_sets: dict, separator: int | None) -> dict[str, np.ndarray]:
    """domain -> answer mask of its eval rows, for the question/answer domains among them."""
    qa, newlines = qa_setup(cfg, list(eval_sets))
    out = {}
    for d in qa:
        mask = answer_mask(held_out[d], eval_sets[d], cfg.data.seq_len, separator, newlines)
        if mask is not None:
            out[d] = mask
    return out
