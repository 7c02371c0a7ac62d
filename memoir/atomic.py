"""The one atomic writer: files and folders appear whole or not at all.

Everything memoir writes that a later run reads (saved edits, run checkpoints, caches, result
JSON) goes through here: it is written under a temporary name in the destination's folder,
flushed to disk, then renamed over the destination, so a crash leaves the old version or the new
one, never half of either.
"""
from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import tempfile


def _fsync_dir(path: pathlib.Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(path: pathlib.Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(path)


@contextlib.contextmanager
def atomic_file(path):
    """Yield a temporary path beside ``path``; when the block succeeds it replaces ``path``."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = pathlib.Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def _old_name(path: pathlib.Path) -> pathlib.Path:
    """Where the previous version waits while the new one is renamed in (hidden, memoir's own name)."""
    return path.with_name(f".{path.name}.memoir-old")


def _temp_prefix(path: pathlib.Path, pid: int | None = None) -> str:
    return f".{path.name}.memoir-tmp-{os.getpid() if pid is None else pid}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists (another user's) or cannot tell: leave its folder alone
    return True


def recover_folder(path) -> None:
    """Finish or undo what a killed :func:`atomic_folder` left at ``path``.

    Killed between its two renames, it leaves no ``path`` but the previous version under the old
    name: that version comes back (the save never completed, so it is the last one that did).
    Temporary folders of processes that no longer run are removed.
    """
    path = pathlib.Path(path)
    old = _old_name(path)
    if old.is_dir():
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.rename(path)
            _fsync_dir(path.parent)
    if path.parent.is_dir():
        stem = f".{path.name}.memoir-tmp-"
        for tmp in path.parent.glob(stem + "*"):
            pid = tmp.name[len(stem):].split("-", 1)[0]
            if tmp.is_dir() and pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_folder(path):
    """Yield a temporary folder beside ``path``; when the block succeeds it replaces ``path``
    (an existing ``path`` is swapped out whole, not merged), else it is removed.  Every file and
    the folders are fsynced before the swap; what a killed swap left is repaired first
    (:func:`recover_folder`)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_folder(path)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        _fsync_tree(tmp)
        _replace_dir(tmp, path)
        _fsync_dir(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _replace_dir(tmp: pathlib.Path, path: pathlib.Path) -> None:
    if path.exists():
        old = _old_name(path)
        shutil.rmtree(old, ignore_errors=True)
        path.rename(old)
        tmp.rename(path)
        _fsync_dir(path.parent)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(path)
