"""The one way pvae writes a file: a uniquely named temporary file in the target's folder,
flushed and fsynced, then renamed over the target. A reader never sees half a file, two
writers never share a temporary name, and a failed write leaves the old file in place."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

PathLike = str | os.PathLike[str]


def atomic_write(path: PathLike, write: Callable[[IO[bytes]], Any]) -> Path:
    """Call ``write(stream)`` on a new temporary file next to ``path``, flush it to disk, then
    rename it over ``path`` (creating the parent folder); on failure, remove it.

    :returns: ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text(path: PathLike, text: str | bytes) -> Path:
    """Write ``text`` (str as UTF-8, or bytes) to ``path`` atomically."""
    data = text.encode() if isinstance(text, str) else text
    return atomic_write(path, lambda stream: stream.write(data))


def save_torch(obj: Any, path: PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` atomically."""
    import torch

    return atomic_write(path, lambda stream: torch.save(obj, stream))
