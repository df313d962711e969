"""Writing a file so that it is either the old one or the whole new one, never half of either."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator


@contextmanager
def atomic_writer(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Open a temporary file beside ``path`` for writing; when the block ends without an error it is flushed to
    disk and renamed over ``path`` (atomic on POSIX); on an error it is removed and ``path`` is left as it was."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_atomically(path: str | os.PathLike, text: str) -> None:
    with atomic_writer(path) as fh:
        fh.write(text)


def default_cache_dir() -> Path:
    """Where sftlab keeps what it builds once: the converted bundled model, tokenized data, native kernels
    (``$SFTLAB_CACHE``, else ~/.cache/sftlab)."""
    return Path(os.environ.get("SFTLAB_CACHE", Path.home() / ".cache" / "sftlab"))
