"""Writes that a crash cannot half-finish: single files, and whole folders replaced as a unit.

A folder is built under a hidden sibling name (`.<name>.tmp-*`), every file and the folder are fsynced, and then it
takes the name in one step: an atomic exchange (Linux `renameat2(RENAME_EXCHANGE)`) where the file system has it,
else two renames whose crash window `recover_folder` repairs on the next save or load. The previous folder is
deleted only once the new one holds the name. One writer per folder is assumed: a save removes the hidden leftovers
of earlier, interrupted saves of the same name.
"""
from __future__ import annotations

import ctypes
import errno
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

_TMP, _OLD = ".tmp-", ".old-"


def fsync_path(path: str | Path) -> None:
    """Flush a file or a folder (its entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to a temp file in the same folder, fsync it, rename it over `path`, fsync the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a writer that was killed
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_path(path.parent)


def replace_folder(target: str | Path, build: Callable[[Path], None], keep: Callable[[str], bool] = lambda n: False,
                   ) -> Path:
    """Build a new `target` folder with `build(tmp_dir)` and put it in place of the old one as a unit.

    Entries of the old folder for which `keep(name)` is true and that `build` did not write are carried into the new
    folder (hard links where possible), so files that share the folder (a tokenizer, say) survive.
    A crash or an exception at any point leaves the old or the new folder, complete, under `target`.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{target} exists and is not a folder")
    recover_folder(target)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}{_TMP}"))
    try:
        build(tmp)
        if target.is_dir():
            for entry in target.iterdir():
                if keep(entry.name) and not (tmp / entry.name).exists():
                    _carry(entry, tmp / entry.name)
        _fsync_tree(tmp)
        if target.exists():
            _swap_in(tmp, target)  # tmp now holds the old folder
            shutil.rmtree(tmp)
        else:
            os.rename(tmp, target)
            fsync_path(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def recover_folder(target: str | Path) -> None:
    """Repair what an interrupted `replace_folder` of `target` left: restore the old folder if the name is empty,
    then delete the hidden leftovers."""
    target = Path(target)
    if not target.parent.is_dir():
        return
    olds = sorted(target.parent.glob(f".{target.name}{_OLD}*"), key=lambda p: p.stat().st_mtime)
    if not target.exists() and olds:
        os.rename(olds.pop(), target)  # the newest old folder is complete: it held the name until the crash
        fsync_path(target.parent)
    for leftover in olds + list(target.parent.glob(f".{target.name}{_TMP}*")):
        shutil.rmtree(leftover, ignore_errors=True)


def recover_folders(parent: str | Path) -> None:
    """`recover_folder` for every folder of `parent` that an interrupted replacement left behind."""
    parent = Path(parent)
    if not parent.is_dir():
        return
    names = set()
    for p in parent.glob(".*"):
        for marker in (_TMP, _OLD):
            if marker in p.name:
                names.add(p.name[1:p.name.rindex(marker)])
    for name in sorted(names):
        recover_folder(parent / name)


def _swap_in(new: Path, target: Path) -> None:
    """Give `new` the name `target`; afterwards the old folder sits at `new`'s path."""
    try:
        _exchange(new, target)
    except OSError as e:
        if e.errno not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
        # no atomic exchange here: two renames, the gap between them repaired by recover_folder
        old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}{_OLD}"))
        os.rename(target, old)  # rename() replaces the empty placeholder folder
        os.rename(new, target)
        os.rename(old, new)
    fsync_path(target.parent)


_RENAME_EXCHANGE, _AT_FDCWD = 2, -100


def _exchange(a: Path, b: Path) -> None:
    """Atomically swap two paths (Linux >= 3.15, glibc >= 2.28); OSError(ENOSYS) where unavailable."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available")
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(a), None, str(b))


def _carry(src: Path, dst: Path) -> None:
    def link_or_copy(s, d):
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    if src.is_dir() and not src.is_symlink():
        shutil.copytree(src, dst, symlinks=True, copy_function=link_or_copy)
    elif src.is_symlink():
        os.symlink(os.readlink(src), dst)
    else:
        link_or_copy(src, dst)


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                fsync_path(path)
        fsync_path(folder)
