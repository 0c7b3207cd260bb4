"""Writes that a crash cannot half-finish: single files, and whole folders replaced as a unit.

A folder is built under a hidden sibling name (`.<name>.cuma-tmp-*`), every file and the folder are fsynced, and
then it takes the name in one step: an atomic exchange (Linux `renameat2(RENAME_EXCHANGE)`) where the file system
has it, else two renames (the old folder first moved to `.<name>.cuma-old-*`) whose gap `recover_folder` repairs on
the next save or load. The previous folder is deleted only once the new one holds the name. One writer per folder
is assumed: a save removes the hidden leftovers of earlier, interrupted saves of the same name; loads never do.
"""
from __future__ import annotations

import ctypes
import errno
import os
import shutil
import stat
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

_TMP, _OLD = ".cuma-tmp-", ".cuma-old-"


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
    folder (hard links where possible), so files that share the folder (a tokenizer, say) survive. The new folder
    keeps the old one's permissions. A crash or an exception before the swap leaves the old folder under `target`,
    after it the new one: a failure while tidying up after the swap only warns.
    """
    target = Path(os.path.realpath(target))  # a symlink's folder is replaced, not the link
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{target} exists and is not a folder")
    recover_folder(target, clean=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=_hidden(target, _TMP)))
    try:
        build(tmp)
        if target.is_dir():
            for entry in target.iterdir():
                if keep(entry.name) and not (tmp / entry.name).exists():
                    _carry(entry, tmp / entry.name)
        os.chmod(tmp, stat.S_IMODE(target.stat().st_mode) if target.exists() else 0o777 & ~_umask())
        _fsync_tree(tmp)
        old = _swap_in(tmp, target) if target.exists() else os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # the unfinished new folder (gone if it already took the name)
        raise
    try:  # the new folder holds the name: what follows only tidies up
        fsync_path(target.parent)
    except OSError as e:
        warnings.warn(f"saved {target}, but its parent folder could not be flushed to disk: {e}", stacklevel=2)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target


def recover_folder(target: str | Path, clean: bool = False) -> None:
    """Repair what an interrupted `replace_folder` of `target` left: if the name is empty, give it back the old
    folder. With `clean` (the writer, before it saves), also delete the hidden leftovers; a reader never does, since
    they may be another process's save in progress."""
    target = Path(os.path.realpath(target))
    if not target.parent.is_dir():
        return
    olds = sorted(_leftovers(target, _OLD), key=lambda p: p.stat().st_mtime)
    if not target.exists() and olds:
        os.rename(olds.pop(), target)  # the newest old folder is complete: it held the name until the crash
        fsync_path(target.parent)
    if clean:
        for leftover in olds + _leftovers(target, _TMP):
            shutil.rmtree(leftover, ignore_errors=True)


def recover_folders(parent: str | Path, clean: bool = False) -> None:
    """`recover_folder` for every folder of `parent` that an interrupted replacement left behind."""
    parent = Path(parent)
    if not parent.is_dir():
        return
    names = set()
    for p in parent.iterdir():
        for marker in (_TMP, _OLD):
            if p.name.startswith(".") and marker in p.name:
                names.add(p.name[1:p.name.rindex(marker)])
    for name in sorted(names):
        recover_folder(parent / name, clean=clean)


def _hidden(target: Path, marker: str) -> str:
    return f".{target.name}{marker}"


def _leftovers(target: Path, marker: str) -> list[Path]:
    prefix = _hidden(target, marker)  # compared as text: the name may hold glob characters ("run[1]")
    return [p for p in target.parent.iterdir() if p.name.startswith(prefix)]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _swap_in(new: Path, target: Path) -> Path | None:
    """Give `new` the name `target`; returns where the old folder now is (to delete), None if it could not be moved
    out of the way of the next save (a leftover the next save removes)."""
    try:
        _exchange(new, target)
        return new
    except OSError as e:
        if e.errno not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    # no atomic exchange here: two renames, the gap between them repaired by recover_folder
    old = Path(tempfile.mkdtemp(dir=target.parent, prefix=_hidden(target, _OLD)))
    os.rename(target, old)  # rename() replaces the empty placeholder folder
    os.rename(new, target)
    return old


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
