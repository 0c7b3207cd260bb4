"""Writes that a crash cannot half-finish: single files, and whole folders replaced as a unit.

A folder is built under a hidden sibling name (`.<name>.cuma-tmp-*`), every file and the folder are fsynced, and
then it takes the name in one step: an atomic exchange (Linux `renameat2(RENAME_EXCHANGE)`) where the file system
has it, else two renames (the old folder first moved to `.<name>.cuma-old-*`) whose gap `recover_folder` repairs on
the next save or load. The previous folder is deleted only once the new one holds the name.

Writers of one name take turns: each holds an exclusive lock (`fcntl.flock` on `.<name>.cuma-lock` beside it) for
the whole write, so a save removes the hidden leftovers of earlier, interrupted saves of the same name, never those
of a save in progress; loads never remove anything. Only names this module makes (with a `.cuma-` marker) are ever
removed: a user's own hidden or `.tmp` files survive every save.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import shutil
import stat
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

_TMP, _OLD = ".cuma-tmp-", ".cuma-old-"  # hidden folders of a replacement: `.<name>.cuma-tmp-*`, `.<name>.cuma-old-*`
_PART = ".cuma-part-"  # a file being written: `.<name>.cuma-part-*`
_LOCK = ".cuma-lock"  # `.<name>.cuma-lock`: held by the writer of <name>
_held = threading.local()  # lock files this thread holds -> nesting depth (a save's steps share its lock)


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
    with exclusive_lock(path):
        prefix = f".{path.name}{_PART}"
        for stale in path.parent.iterdir():  # left by a writer that was killed (compared as text: glob characters)
            if stale.name.startswith(prefix):
                stale.unlink(missing_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix)
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


def is_own_leftover(name: str) -> bool:
    """Whether `name` is one this module makes for a write in progress (a partial file or a lock file): what a save
    may drop; every other name is the user's."""
    return name.startswith(".") and (_PART in name or name.endswith(_LOCK))


@contextlib.contextmanager
def exclusive_lock(path: str | Path) -> Iterator[None]:
    """Hold the lock of the file or folder `path` (`.<name>.cuma-lock` beside it): other processes and threads
    wait; the same thread may enter again (a save's steps share its lock).

    The lock file is deleted by its holder before it lets go. A waiter that then gets the lock on the deleted file
    sees that the name no longer leads to it and starts over, so no two writers ever hold the lock of one name.
    """
    path = Path(os.path.realpath(path))
    lock = path.parent / f".{path.name}{_LOCK}"
    held = _held.__dict__.setdefault("depth", {})
    if held.get(lock):
        held[lock] += 1
        try:
            yield
        finally:
            held[lock] -= 1
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW, 0o644)  # read-only: any user may lock it
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            same = os.fstat(fd)
            now = os.stat(lock, follow_symlinks=False)
            if (same.st_dev, same.st_ino) == (now.st_dev, now.st_ino):
                break
        except FileNotFoundError:  # deleted by the previous holder: start over on a new lock file
            pass
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    held[lock] = 1
    try:
        yield
    finally:
        del held[lock]
        try:
            os.unlink(lock)  # before letting go: see the docstring
        finally:
            os.close(fd)


def resolve_folder(target: str | Path) -> Path:
    """The real path of the folder a save into `target` replaces (a symlink's folder, not the link), or an error
    saying why no save can replace it: a file, a symlink loop, the working folder of this process (or a folder that
    holds it), or a mount point."""
    resolved = Path(os.path.realpath(target))
    if resolved.is_symlink():  # realpath stops where links lead in a circle
        raise OSError(errno.ELOOP, f"cannot save into {target}: it is a symlink loop ({resolved} leads back to "
                                   "itself); remove the link or save into another folder")
    if resolved.exists() and not resolved.is_dir():
        raise NotADirectoryError(f"{target} exists and is not a folder")
    cwd = Path(os.path.realpath(os.getcwd()))
    if resolved == cwd or resolved in cwd.parents:
        raise OSError(errno.EBUSY, f"cannot save into {target}: it is (or holds) this process's working folder "
                                   f"{cwd}, and a save replaces the folder as a unit, which would delete the working "
                                   "folder under the process; save into a subfolder (e.g. 'adapter') or change the "
                                   "working folder first")
    if resolved.is_dir() and os.path.ismount(resolved):
        raise OSError(errno.EBUSY, _mount_point_message(target))
    return resolved


def _mount_point_message(target) -> str:
    return (f"cannot save into {target}: it is a mount point, and a save replaces the folder as a unit by renaming, "
            f"which a mount point cannot be; save into a subfolder of it (e.g. {Path(target) / 'adapter'})")


def replace_folder(target: str | Path, build: Callable[[Path], None], keep: Callable[[str], bool] = lambda n: False,
                   ) -> Path:
    """Build a new `target` folder with `build(tmp_dir)` and put it in place of the old one as a unit.

    Entries of the old folder for which `keep(name)` is true and that `build` did not write are carried into the new
    folder (hard links where possible), so files that share the folder (a tokenizer, say) survive. The new folder
    keeps the old one's permissions. A crash or an exception before the swap leaves the old folder under `target`,
    after it the new one: a failure while tidying up after the swap only warns. Writers of one `target` take turns
    (`exclusive_lock`). Entries that are not regular files, folders or symlinks (FIFOs, sockets, devices) are never
    opened: they are carried as hard links, or the save is refused.
    """
    target = resolve_folder(target)  # a symlink's folder is replaced, not the link
    target.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(target):
        return _replace_locked(target, build, keep)


def _replace_locked(target: Path, build: Callable[[Path], None], keep: Callable[[str], bool]) -> Path:
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
        old = _exchange_or_explain(tmp, target) if target.exists() else os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # the unfinished new folder (gone if it already took the name)
        raise
    try:  # the new folder holds the name: what follows only tidies up
        fsync_path(target.parent)
    except OSError as e:
        warnings.warn(f"saved {target}, but its parent folder could not be flushed to disk: {e}", stacklevel=3)
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


def _exchange_or_explain(new: Path, target: Path) -> Path | None:
    try:
        return _swap_in(new, target)
    except OSError as e:
        if e.errno in (errno.EBUSY, errno.EXDEV):  # a mount point (a bind mount on the same device, say)
            raise OSError(e.errno, f"{_mount_point_message(target)} ({e.strerror})") from e
        raise


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
        except OSError as e:
            if not stat.S_ISREG(os.stat(s).st_mode):  # opening a FIFO or a device for a copy could block forever
                raise OSError(e.errno, f"cannot carry {s} into the new folder: it is {_kind(s)}, which a save never "
                                       f"opens, and it cannot be hard-linked ({e.strerror}); move it out of the "
                                       "folder, or save into another folder") from e
            shutil.copy2(s, d)

    if src.is_dir() and not src.is_symlink():
        shutil.copytree(src, dst, symlinks=True, copy_function=link_or_copy)
    elif src.is_symlink():
        os.symlink(os.readlink(src), dst)
    else:
        link_or_copy(src, dst)


def _kind(path) -> str:
    """'a FIFO', 'a socket', ... : what a path that is not a regular file is, for messages."""
    mode = os.stat(path).st_mode
    for test, kind in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return kind
    return "not a regular file"


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            if stat.S_ISREG(os.lstat(path).st_mode):  # opening a FIFO (carried as a link) would block
                fsync_path(path)
        fsync_path(folder)
