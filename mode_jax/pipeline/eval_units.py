"""Which test document each evaluated target token belongs to: the unit that intervals resample.

The test split is one packed token stream (mode_jax/data/pack.py): document, EOS,
document, EOS, ... and eval rows are windows of `seq_len + 1` tokens at offsets that
are multiples of `seq_len` (sources.eval_rows). A target at stream position p belongs
to the document numbered by the count of EOS tokens before p; the EOS that closes a
document is that document's target (and is marked as a separator, excluded from the
per-row / per-document accuracy, since predicting the end of a document is not what a
domain's accuracy is meant to measure).

Rows are located in the stream by their content (not by re-deriving how eval_rows picked
them), so this stays right if the choice of rows changes. If a row cannot be found
(the rows did not come from that stream), every row becomes its own unit and
`unit` says "row".
"""

from __future__ import annotations

import numpy as np

from mode_jax.data.pack import rows as stream_rows

_CHUNK_ROWS = 4096      # stream rows fingerprinted at a time (bounds the uint64 temporary)


def separator_id(cfg) -> int | None:
    """The document separator of the configured data: the tokenizer's EOS (pack.py puts one
    after every document), or None when the data does not say."""
    if cfg.data.source == "synthetic":
        from mode_jax.data.pack import ByteTokenizer
        return ByteTokenizer.eos_id
    from mode_jax.data.store import read_manifest
    from mode_jax.pipeline.sources import data_dir
    eos = read_manifest(data_dir(cfg)).get("tokenizer", {}).get("eos_id")
    return None if eos is None else int(eos)


def _fingerprints(block: np.ndarray, weights: np.ndarray) -> np.ndarray:
    return (block.astype(np.uint64) * weights[None, :]).sum(axis=1)


def row_offsets(stream: np.ndarray, rows: np.ndarray, seq_len: int) -> np.ndarray | None:
    """Stream offset of each row of `rows` [n, seq_len + 1] (aligned to seq_len), or None if
    some row is not a window of `stream`. Equal windows: the first one is taken."""
    view = stream_rows(stream, seq_len)                                      # [m, seq_len + 1]
    if rows.ndim != 2 or rows.shape[1] != seq_len + 1 or view.shape[0] == 0:
        return None
    # A row's fingerprint: a wrapping uint64 dot product with fixed random odd multipliers.
    weights = np.random.default_rng(0).integers(1, 2**63, size=seq_len + 1, dtype=np.uint64) | np.uint64(1)
    want = _fingerprints(np.asarray(rows), weights)
    wanted = {int(k): [] for k in want}
    for i, k in enumerate(want):
        wanted[int(k)].append(i)
    out = np.full(rows.shape[0], -1, np.int64)
    for start in range(0, view.shape[0], _CHUNK_ROWS):
        block = np.asarray(view[start:start + _CHUNK_ROWS])
        for j in np.flatnonzero(np.isin(_fingerprints(block, weights), want)):
            for i in wanted[int(_fingerprints(block[j:j + 1], weights)[0])]:
                if out[i] < 0 and np.array_equal(block[j], rows[i]):
                    out[i] = (start + j) * seq_len
    return None if (out < 0).any() else out


def document_ids(stream: np.ndarray, rows: np.ndarray, seq_len: int, separator: int | None
                 ) -> tuple[np.ndarray, str]:
    """([n, seq_len] int64 document index of every target of `rows`, unit): unit "document"
    when the rows were found in `stream` and the data has a separator, else "row" (the
    row index, repeated along the row)."""
    n = rows.shape[0]
    offsets = None if separator is None else row_offsets(stream, rows, seq_len)
    if offsets is None:
        return np.repeat(np.arange(n, dtype=np.int64)[:, None], seq_len, axis=1), "row"
    eos_positions = np.flatnonzero(np.asarray(stream) == separator)
    targets = offsets[:, None] + 1 + np.arange(seq_len)[None, :]            # [n, seq_len] stream positions
    return np.searchsorted(eos_positions, targets, side="left").astype(np.int64), "document"
