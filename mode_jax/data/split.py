"""Assign each document to train / validation / test by a hash of its text.

    u = first 8 bytes of sha256(utf-8 text), read big-endian, / 2**64   (uniform in [0, 1))
    test        if u < test_fraction
    validation  if u < test_fraction + validation_fraction
    train       otherwise

The split depends on the document alone, never on its position, on which other
documents exist, or on the order they come in: adding, removing or reordering
documents (a new sympy file, more math examples) leaves every other document
where it was, and identical documents always land together, so an exact
duplicate can never straddle train and test.

A recipe may name a *source unit* for each document (split_of_unit): the hash is then
that unit's name, so every document of one unit lands in one split. The Code recipe
uses it so that a module, its tests and generated siblings never straddle train and
test (sources.code_unit).

Fractions are per domain (see DEFAULT_FRACTIONS): a split's token count is
about its fraction of the domain's tokens, and a test set needs a few hundred
thousand tokens for a stable perplexity, so the small English corpus (about 1M
tokens) gives its test split a larger share than Math and Code (about 8-9M
tokens each).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class SplitFractions:
    validation: float  # share of documents (by hash) in the validation split
    test: float        # share in the test split; the rest is train

    def __post_init__(self):
        for name in ("validation", "test"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} fraction {value} must be in [0, 1)")
        if self.validation + self.test >= 1.0:
            raise ValueError(f"validation {self.validation} + test {self.test} leaves no training data")

    def as_dict(self) -> dict[str, float]:
        return {"train": round(1.0 - self.validation - self.test, 12),
                "validation": self.validation, "test": self.test}


DEFAULT_FRACTIONS = {
    "math": SplitFractions(validation=0.01, test=0.03),     # ~8M tokens -> ~250k test
    # Code splits by source unit (a module with its tests) and test documents are capped
    # (build.EVAL_DOC_TOKENS): 8% of ~990 units gives ~130 files, ~290k capped test tokens.
    "code": SplitFractions(validation=0.03, test=0.08),
    "english": SplitFractions(validation=0.05, test=0.20),  # ~1M tokens -> ~200k test
}


def document_digest(text: str) -> bytes:
    """sha256 of the document's UTF-8 bytes (also the key for dropping exact duplicates)."""
    return hashlib.sha256(text.encode("utf-8")).digest()


def hash_unit(digest: bytes) -> float:
    """The document's position in [0, 1): its digest's first 8 bytes, big-endian, / 2**64."""
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_of_digest(digest: bytes, fractions: SplitFractions) -> str:
    u = hash_unit(digest)
    if u < fractions.test:
        return "test"
    if u < fractions.test + fractions.validation:
        return "validation"
    return "train"


def split_of(text: str, fractions: SplitFractions) -> str:
    """"train", "validation" or "test" for this document (see the module docstring)."""
    return split_of_digest(document_digest(text), fractions)


def split_of_unit(unit: str, fractions: SplitFractions) -> str:
    """The split of every document of source unit `unit` (the hash of its name, same rule)."""
    return split_of_digest(hashlib.sha256(unit.encode("utf-8")).digest(), fractions)
