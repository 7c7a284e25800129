"""Write files so a reader never sees a half-written one.

Everything is written to a temporary name in the destination's own directory
(so the final `os.replace` is a rename on one filesystem, which POSIX makes
atomic), flushed to disk with fsync, then renamed over the final name. An
interrupted write leaves at most a `.<name>.tmp-*` file that no later run
trusts, never a truncated file under the real name.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

FILE_MODE = 0o644   # every file mode-jax writes: readable by all, writable by its owner


@contextlib.contextmanager
def atomic_path(final_path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `final_path`; on normal exit it is fsynced and
    renamed to `final_path`, on an exception it is deleted and `final_path` is untouched.

        with atomic_path("data/train.bin") as tmp:
            np.save(tmp, array)   # anything that writes a file at `tmp`
    """
    final = Path(final_path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.tmp-", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"nothing was written to the temporary file {tmp} for {final}")
        # mkstemp makes the file owner-only (0600), and a writer may have replaced it with a
        # file of its own (safetensors does): set the mode of an ordinary file on what is there.
        os.chmod(tmp, FILE_MODE)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def write_bytes_atomic(final_path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `final_path` atomically."""
    with atomic_path(final_path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(final_path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    """Write `text` to `final_path` atomically."""
    write_bytes_atomic(final_path, text.encode(encoding))


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not every platform lets a directory be opened.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
