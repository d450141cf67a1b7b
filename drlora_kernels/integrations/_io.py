"""Write a directory atomically: build it in a temporary sibling, then swap it in whole."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, marker: str) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces ``target``, on error it is removed.

    ``target`` may already exist only if it is empty or holds ``marker`` (a file this writer
    owns), so a directory with someone else's files is never replaced.

    Raises:
        ValueError: ``target`` exists and is not ours.
    """
    target = Path(target)
    if target.exists() and (
        not target.is_dir() or (any(target.iterdir()) and not (target / marker).exists())
    ):
        raise ValueError(f"refusing to overwrite {target}: it exists and holds no {marker}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / "d")
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
