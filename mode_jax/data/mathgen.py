"""Deterministic question/answer pairs from DeepMind's `mathematics_dataset` (the Math domain).

`mathematics-dataset==1.0.1` (Saxton et al., 2019) is a generator, not a data
file: each of its 56 training modules (`algebra__linear_1d`, ...) is a function
that samples one `Problem(question, answer)` from Python's `random`, numpy's
global `np.random` and sympy's own `sympy.core.random` generator. Written for
Python 3.6, numpy 1.x and an older sympy, it needs these compatibility patches
here (`install_compat_patches`), each of which keeps the generator's output
distribution unchanged:

1. sympy 1.14 moved `base_solution_linear` out of `sympy.solvers.diophantine`;
   re-export it there (the import shim in docs/RESOURCES.md).
2. numpy 2 removed `ndarray.itemset` and `np.object`. `sample/polynomials.py`
   uses both, which breaks 22 of the 56 modules whenever they draw a polynomial
   (the polynomial and differentiation modules at once, the `*_composed` ones
   sooner or later: within 200 samples for all of them). Its arrays become an
   `ndarray` subclass with `itemset(index, value)` = `self[index] = value`, and
   `np.object` = `object`, in that one module only.
3. Python 3.12's `random.randint` refuses integral floats, which
   `numbers__round_number*` pass (`-10**k / 2`); convert them to `int` first,
   as Python <= 3.11 did.
4. Two places iterate a `set` before a random choice, so the same seed gives
   different problems in different processes: `Context.pop` picks a variable
   name from a set of letters (order depends on PYTHONHASHSEED) and
   `expand_entities` shuffles a set of `Entity` objects (order depends on memory
   addresses). Both now iterate in a fixed order (sorted letters; first-seen
   entities) before the same random call.

With the patches all 56 modules generate, and each chunk of examples is a pure
function of (seed, module, chunk index): every chunk reseeds the three
generators. Chunks run in worker processes started with PYTHONHASHSEED=0 as a
second guard against set-order effects inside sympy.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import random
import sys
from dataclasses import dataclass
from typing import Iterator

import numpy as np

PACKAGE = "mathematics-dataset"
VERSION = "1.0.1"
EXAMPLES_PER_CHUNK = 250  # one worker task; small enough to balance slow and fast modules

_PATCHED = False


@dataclass(frozen=True)
class ChunkTask:
    module: str   # e.g. "algebra__linear_1d"
    index: int    # chunk number within the module
    count: int    # examples to draw
    seed: int     # the build seed


def require_mathematics_dataset() -> None:
    """Raise ImportError with an install hint unless the pinned generator is importable."""
    from importlib import metadata

    try:
        version = metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        raise ImportError(f"the Math domain needs {PACKAGE}=={VERSION}: "
                          f"pip install '{PACKAGE}=={VERSION}' (or the project's `data` extra)") from None
    if version != VERSION:
        raise ImportError(f"the Math domain is pinned to {PACKAGE}=={VERSION}, found {version}: "
                          f"pip install '{PACKAGE}=={VERSION}'")


def install_compat_patches() -> None:
    """Apply the four patches of the module docstring (idempotent)."""
    global _PATCHED
    if _PATCHED:
        return
    import sympy.solvers.diophantine  # noqa: F401  (patch 1)

    sys.modules["sympy.solvers.diophantine"].base_solution_linear = importlib.import_module(
        "sympy.solvers.diophantine.diophantine").base_solution_linear

    from mathematics_dataset.modules import numbers as numbers_module
    from mathematics_dataset.sample import polynomials as sample_polynomials
    from mathematics_dataset.util import composition

    sample_polynomials.np = _NumpyWithItemset()                 # patch 2
    numbers_module.random = _RandomWithIntegralFloats()         # patch 3
    composition.Context.pop = _context_pop                      # patch 4
    composition.expand_entities = _make_expand_entities(composition)
    _PATCHED = True


class _ItemsetArray(np.ndarray):
    def itemset(self, index, value):
        self[index] = value


class _NumpyWithItemset:
    """numpy, except that `zeros`/`empty` return arrays with numpy 1's `itemset`."""
    object = object

    def __getattr__(self, name):
        return getattr(np, name)

    @staticmethod
    def zeros(*args, **kwargs):
        return np.zeros(*args, **kwargs).view(_ItemsetArray)

    @staticmethod
    def empty(*args, **kwargs):
        return np.empty(*args, **kwargs).view(_ItemsetArray)


class _RandomWithIntegralFloats:
    """Python's `random`, except that `randint` accepts integral floats like Python <= 3.11."""

    def __getattr__(self, name):
        return getattr(random, name)

    @staticmethod
    def randint(a, b):
        return random.randint(_as_int(a), _as_int(b))


def _as_int(x):
    if isinstance(x, float):
        if x != int(x):
            raise ValueError(f"non-integer {x} passed to randint")
        return int(x)
    return x


def _context_pop(self):
    # Same as composition.Context.pop, with `sorted` in place of `list` on the set of letters.
    from mathematics_dataset.util import composition

    allowed = (composition._ALLOWED_SYMBOLS.difference(self._relation_symbols)
               .difference(self._self_symbols).difference(self._child_symbols))
    if not allowed:
        raise ValueError("Ran out of symbols")
    symbol = composition.random.choice(sorted(allowed))
    self._self_symbols.add(symbol)
    return symbol


def _make_expand_entities(composition):
    def expand_entities(context, **kwargs):
        # Same as composition.expand_entities, with an insertion-ordered dict in place of
        # a set of (id-hashed) entities before the shuffle.
        kwargs = kwargs.copy()
        entities = dict.fromkeys(context.child_entities)
        for key, maybe_entity in kwargs.items():
            if isinstance(maybe_entity, composition.Entity):
                entities[maybe_entity] = None
                kwargs[key] = maybe_entity.handle
        entities = list(entities)
        composition.random.shuffle(entities)
        descriptions = []
        for entity in entities:
            descriptions.append(entity.child_description)
            if not entity.expression_used:
                descriptions.append(entity.description)
        return " ".join(s for s in descriptions if s), kwargs
    return expand_entities


def train_modules() -> dict[str, object]:
    """All training modules by flat name (`algebra__linear_1d`, ...), at the full 'train'
    difficulty range (generate.py's `train` regime: entropy range unchanged)."""
    from mathematics_dataset.modules import modules

    flat: dict[str, object] = {}

    def add(tree, prefix):
        for key, value in tree.items():
            name = f"{prefix}__{key}" if prefix else key
            if isinstance(value, dict):
                add(value, name)
            else:
                flat[name] = value
    add(modules.train(lambda entropy_range: entropy_range), "")
    return dict(sorted(flat.items()))


def plan_chunks(module_names: list[str], n_examples: int, seed: int) -> list[ChunkTask]:
    """Split `n_examples` evenly over the modules (the first `n % len` get one more), in
    chunks of EXAMPLES_PER_CHUNK, ordered chunk-major so slow modules spread over workers."""
    per_module, extra = divmod(n_examples, len(module_names))
    counts = {name: per_module + (i < extra) for i, name in enumerate(module_names)}
    n_chunks = -(-max(counts.values(), default=0) // EXAMPLES_PER_CHUNK)
    tasks = []
    for index in range(n_chunks):
        for name in module_names:
            count = min(EXAMPLES_PER_CHUNK, counts[name] - index * EXAMPLES_PER_CHUNK)
            if count > 0:
                tasks.append(ChunkTask(name, index, count, seed))
    return tasks


def _chunk_seed(task: ChunkTask) -> int:
    digest = hashlib.sha256(f"mathgen:{task.seed}:{task.module}:{task.index}".encode()).digest()
    return int.from_bytes(digest[:4], "big")  # np.random.seed wants < 2**32


_MODULES: dict[str, object] | None = None


def generate_chunk(task: ChunkTask) -> tuple[list[str], int, int]:
    """The chunk's documents ("question\\nanswer"), how many samples were dropped for
    exceeding the generator's own length limits (as generate.py's `sample_from_module`),
    and how many the generator rejected with an AssertionError of its own.

    Those assertions are internal consistency checks that fail for rare draws (e.g.
    `integers_with_sum`'s `assert entropy == 0` when `np.random.dirichlet` with alpha
    1e-9 returns a tiny non-zero value such as 2e-231 instead of 0: once in about 7000
    `linear_2d_composed` problems); the original generator would crash there. The
    sample is skipped and drawing goes on from the same random state, so the chunk
    stays a pure function of its seed."""
    global _MODULES
    install_compat_patches()
    if _MODULES is None:
        _MODULES = train_modules()
    import sympy.core.random
    from mathematics_dataset import generate_settings

    seed = _chunk_seed(task)
    random.seed(seed)
    np.random.seed(seed)
    sympy.core.random.seed(seed)
    module = _MODULES[task.module]
    docs, dropped, rejected = [], 0, 0
    while len(docs) < task.count:
        try:
            problem = module()
        except AssertionError:
            rejected += 1
            if rejected > 100 + task.count:
                raise RuntimeError(f"math module {task.module} failed its own checks {rejected} times "
                                   f"for {len(docs)} good samples") from None
            continue
        question, answer = str(problem.question), str(problem.answer)
        if (len(question) > generate_settings.MAX_QUESTION_LENGTH
                or len(answer) > generate_settings.MAX_ANSWER_LENGTH):
            dropped += 1
            continue
        docs.append(f"{question}\n{answer}")
    return docs, dropped, rejected


def generate(tasks: list[ChunkTask], *, workers: int) -> Iterator[tuple[ChunkTask, list[str], int, int]]:
    """Run the chunks in `workers` spawned processes; yields results in task order."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    saved = os.environ.get("PYTHONHASHSEED")
    os.environ["PYTHONHASHSEED"] = "0"   # read by the spawned interpreters at start-up
    try:
        pool = context.Pool(processes=max(1, workers))
    finally:
        if saved is None:
            del os.environ["PYTHONHASHSEED"]
        else:
            os.environ["PYTHONHASHSEED"] = saved
    with pool:
        for task, (docs, dropped, rejected) in zip(tasks, pool.imap(generate_chunk, tasks, chunksize=1)):
            yield task, docs, dropped, rejected
