"""Write a checkpoint directory so that a kill at any point leaves a loadable one, and verify it on read.

The protocol (:func:`atomic_directory`):

1. stale siblings of earlier killed saves (``.<name>.tmp-*``, ``.<name>.old-*``) are removed
   (after a crash between the two renames of step 4 the complete one is first moved back to
   ``<name>``, see :func:`recover_directory`);
2. the caller writes every file into a fresh sibling ``.<name>.tmp-<pid>-<random>``;
3. :data:`MANIFEST_NAME` is written last: the SHA-256 and size of every file (each file and the
   directory are fsynced before), so a directory with a manifest is complete;
4. the new directory takes the place of ``<name>``: on Linux with one atomic
   ``renameat2(RENAME_EXCHANGE)`` (``<name>`` always holds one complete checkpoint, old or new),
   elsewhere (or on a file system without it) with two renames, ``<name>`` -> ``.<name>.old-*``
   then ``tmp`` -> ``<name>``; a kill between the two leaves both complete copies as siblings and
   the next save or load moves the newest back (:func:`recover_directory`);
5. the old directory is removed.

Readers call :func:`verify_directory`: every file of the manifest must exist with its size and
SHA-256, so a truncated file, a flipped bit or an edited JSON is refused with a ``ValueError``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import secrets
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "MANIFEST_NAME",
    "atomic_directory",
    "recover_directory",
    "remove_stale_siblings",
    "sha256_file",
    "verify_directory",
]

MANIFEST_NAME = "drlora_manifest.json"
MANIFEST_FORMAT = 1
_CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_path(path: Path) -> None:
    """fsync a file or a directory (directories: POSIX only; a no-op where they cannot be opened)."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if path.is_dir() else os.O_RDONLY
    try:
        fd = os.open(path, flags)
    except (PermissionError, IsADirectoryError):  # Windows cannot open directories
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_manifest(directory: Path) -> None:
    files: dict[str, Any] = {}
    for path in sorted(directory.rglob("*")):
        if not path.is_file():
            continue
        rel = path.relative_to(directory).as_posix()
        if rel == MANIFEST_NAME:
            continue
        _fsync_path(path)
        files[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    manifest = json.dumps({"format": MANIFEST_FORMAT, "files": files}, indent=1, sort_keys=True)
    with open(directory / MANIFEST_NAME, "w") as fh:
        fh.write(manifest + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    _fsync_path(directory)


def verify_directory(directory: str | os.PathLike) -> dict[str, Any]:
    """Check every file listed in ``directory``'s manifest (size and SHA-256); return the manifest.

    Raises:
        ValueError: no manifest, an unreadable manifest, or a file missing, resized or changed.
    """
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise ValueError(
            f"{directory} has no {MANIFEST_NAME}: not a complete checkpoint (written by an "
            "older version, or a save that was interrupted)"
        )
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        if manifest.get("format") != MANIFEST_FORMAT or not isinstance(files, dict):
            raise ValueError(f"unsupported manifest format {manifest.get('format')!r}")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"corrupted checkpoint manifest {path}: {exc}") from None
    for name, entry in files.items():
        file = directory / name
        if not file.is_file():
            raise ValueError(
                f"checkpoint {directory} is missing {name} (listed in {MANIFEST_NAME})"
            )
        size = file.stat().st_size
        if size != entry.get("bytes"):
            raise ValueError(
                f"checkpoint {directory}: {name} has {size} bytes, the manifest says {entry.get('bytes')} "
                "(truncated or replaced)"
            )
        digest = sha256_file(file)
        if digest != entry.get("sha256"):
            raise ValueError(
                f"checkpoint {directory}: SHA-256 of {name} is {digest[:16]}..., the manifest says "
                f"{str(entry.get('sha256'))[:16]}... (the file was corrupted or edited)"
            )
    return manifest


def _is_complete(directory: Path) -> bool:
    try:
        verify_directory(directory)
    except (ValueError, OSError):
        return False
    return True


def _siblings(target: Path, kind: str) -> list[Path]:
    prefix = f".{target.name}.{kind}-"
    if not target.parent.is_dir():
        return []
    return [p for p in target.parent.iterdir() if p.name.startswith(prefix)]


def _writer_alive(path: Path) -> bool:
    """Whether the process that named ``.<name>.tmp-<pid>-<token>`` is still running (not us)."""
    pid_text = path.name.rsplit("-", 2)[-2] if path.name.count("-") >= 2 else ""
    if not pid_text.isdigit() or int(pid_text) == os.getpid():
        return False
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def recover_directory(target: str | os.PathLike) -> bool:
    """Finish a swap that a kill interrupted: if ``target`` is missing, move the newest complete copy back.

    Only the two-rename fallback of :func:`atomic_directory` can leave ``target`` missing (the
    new copy in ``.<name>.tmp-*`` and the old one in ``.<name>.old-*/d``, both complete).

    Returns:
        Whether a copy was moved back to ``target``.
    """
    target = Path(target)
    if target.exists():
        return False
    candidates = [p for p in _siblings(target, "tmp") if not _writer_alive(p)]
    candidates += [p / "d" for p in _siblings(target, "old")]
    complete = [p for p in candidates if p.is_dir() and _is_complete(p)]
    if not complete:
        return False
    newest = max(complete, key=lambda p: (p / MANIFEST_NAME).stat().st_mtime_ns)
    os.replace(newest, target)
    _fsync_path(target.parent)
    return True


def remove_stale_siblings(target: str | os.PathLike) -> list[Path]:
    """Remove what killed saves left beside ``target`` (after :func:`recover_directory`).

    Temporary directories of a writer that is still running (another process, same host) are kept.

    Returns:
        The removed paths.
    """
    target = Path(target)
    recover_directory(target)
    removed = []
    for path in _siblings(target, "tmp") + _siblings(target, "old"):
        if path.name.startswith(f".{target.name}.tmp-") and _writer_alive(path):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _renameat2_exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``); ``False`` if unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    rc = fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
        return False  # the file system (or kernel) cannot exchange: use the two renames
    raise OSError(err, os.strerror(err), str(a))


def _exchange(a: Path, b: Path) -> bool:
    return _renameat2_exchange(a, b)


def _install(tmp: Path, target: Path) -> None:
    """Make the complete directory ``tmp`` the one at ``target`` (see the module docstring, step 4-5)."""
    if not target.exists():
        os.replace(tmp, target)
        _fsync_path(target.parent)
        return
    if _exchange(tmp, target):  # target is now the new copy, tmp holds the old one
        _fsync_path(target.parent)
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = target.parent / f".{target.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
    old.mkdir()
    os.replace(target, old / "d")
    os.replace(tmp, target)
    _fsync_path(target.parent)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, marker: str) -> Iterator[Path]:
    """Yield a temporary directory to fill; on success it replaces ``target`` whole, on error it is removed.

    On exit the manifest (SHA-256 of every file) is written last, then the directory is swapped
    in (module docstring). ``target`` may already exist only if it is empty or holds ``marker``
    (a file this writer owns), so a directory with someone else's files is never replaced.

    Raises:
        ValueError: ``target`` exists and is not ours.
    """
    target = Path(target)
    remove_stale_siblings(target)
    if target.exists() and (
        not target.is_dir() or (any(target.iterdir()) and not (target / marker).exists())
    ):
        raise ValueError(f"refusing to overwrite {target}: it exists and holds no {marker}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        yield tmp
        _write_manifest(tmp)
        _install(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
