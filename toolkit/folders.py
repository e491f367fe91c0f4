"""Whole-folder safety: make a folder (clear error when a file is in the way), replace one atomically, lock one.

`staged_folder(final)` yields a sibling temp folder; when the block ends without error its files are fsynced and
it is swapped in place of `final` (an atomic exchange where the kernel offers it, else rename old aside → rename
new in → delete old), so `final` is always either the complete old folder or the complete new one. A crash
between the two renames leaves `.tmp-<name>.old-*` beside a missing `final`; `recover_folder` (every loader
calls it) renames it back. `lock_folder(folder)` takes a non-blocking `flock` on `.<name>.lock` beside the folder
and records who holds it, so a second writer fails at once with an error naming the holder.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import json
import os
import shutil
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from toolkit.errors import CheckpointError, FolderLockedError

TMP_PREFIX = ".tmp-"
"""Names starting with this are temporaries: never listed, never loaded."""
_OLD, _NEW = ".old-", ".new-"


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems do not allow opening directories
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dir(path: str | os.PathLike, what: str = "output folder") -> Path:
    """`mkdir -p path`, or CheckpointError naming the file that stands where a folder is needed."""
    path = Path(path).expanduser()
    for p in (path, *path.parents):
        if p.exists() and not p.is_dir():
            raise CheckpointError(f"{what} {path}: {p} is a file, not a folder; remove it or choose another path")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as e:
        raise CheckpointError(f"{what} {path}: cannot create it ({e}); a file stands where a folder is needed") from e
    return path


def _asides(final: Path, kind: str) -> list[Path]:
    prefix = f"{TMP_PREFIX}{final.name}{kind}"
    return sorted(p for p in final.parent.glob(prefix + "*") if p.is_dir()) if final.parent.is_dir() else []


def recover_folder(final: str | os.PathLike) -> Path:
    """If a swap crashed between its two renames (`final` gone, its old copy set aside), put the old copy back."""
    final = Path(final)
    if not final.exists():
        old = _asides(final, _OLD)
        if old:
            os.rename(old[-1], final)
            fsync_dir(final.parent)
    return final


def fsync_tree(folder: Path) -> None:
    """fsync every file under `folder`, then each folder, so a rename of `folder` publishes durable contents."""
    for root, _dirs, files in os.walk(folder):
        for name in files:
            with open(Path(root) / name, "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(root))


def _exchange(a: Path, b: Path) -> bool:
    """Atomically exchange two paths with renameat2(RENAME_EXCHANGE); False where the kernel or libc lacks it."""
    if sys.platform != "linux":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    if ctypes.get_errno() in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(ctypes.get_errno(), f"cannot exchange {a} and {b}")


def swap_in(new: Path, final: Path) -> None:
    """Put the complete folder `new` in place of `final` (which may not exist); the old one is deleted after."""
    if not final.exists():
        os.rename(new, final)
        fsync_dir(final.parent)
        return
    old = final.parent / f"{TMP_PREFIX}{final.name}{_OLD}{os.getpid()}-{uuid.uuid4().hex[:6]}"
    if _exchange(new, final):
        os.rename(new, old)  # `new` now holds the old contents
    else:
        os.rename(final, old)
        try:
            os.rename(new, final)
        except BaseException:
            os.rename(old, final)
            raise
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def _clean_stale(final: Path) -> None:
    """Delete temp folders of earlier crashed writes of `final` (called by the lock holder only)."""
    for p in _asides(final, _NEW) + (_asides(final, _OLD) if final.exists() else []):
        shutil.rmtree(p, ignore_errors=True)


@contextmanager
def staged_folder(final: str | os.PathLike, *, keep: tuple[str, ...] = ()) -> Iterator[Path]:
    """Yield an empty sibling temp folder to fill; on success it replaces `final` whole, on error it is deleted.

    The caller should hold `lock_folder(final)`. `keep` names entries of the old folder carried over (hard links,
    else copies) when the new one does not write them.
    """
    final = Path(final)
    make_dir(final.parent)
    recover_folder(final)
    if final.exists() and not final.is_dir():
        raise CheckpointError(f"{final}: is a file, not a folder; remove it or choose another path")
    _clean_stale(final)
    tmp = final.parent / f"{TMP_PREFIX}{final.name}{_NEW}{os.getpid()}-{uuid.uuid4().hex[:6]}"
    tmp.mkdir()
    try:
        yield tmp
        for name in keep:
            src, dst = final / name, tmp / name
            if src.exists() and not dst.exists():
                shutil.copytree(src, dst, copy_function=_link_or_copy) if src.is_dir() else _link_or_copy(src, dst)
        fsync_tree(tmp)
        swap_in(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _link_or_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def lock_path(folder: str | os.PathLike) -> Path:
    """The lock file of `folder`: `.<name>.lock` beside it (outside, so swaps and emptiness checks ignore it)."""
    folder = Path(folder).expanduser()
    return folder.parent / f".{folder.name}.lock"


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, json.JSONDecodeError):
        return "another process (its lock file is unreadable)"
    return (f"pid {info.get('pid', '?')} on host {info.get('host', '?')}, running {info.get('command', '?')!r} "
            f"since {info.get('since', '?')}")


class FolderLock:
    """A held lock on a folder (see `lock_folder`); `release()` (or garbage collection) lets it go."""

    def __init__(self, folder: Path, what: str) -> None:
        self._fd: int | None = None
        self.folder, self.path = folder, lock_path(folder)
        make_dir(self.path.parent, what)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FolderLockedError(f"{what} {folder} is being written by {_holder(self.path)}; wait for it to "
                                    f"finish or choose another folder (lock file {self.path})") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv)[:300] or sys.executable,
                "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Let the lock go (idempotent)."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        self.release()

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_folder(folder: str | os.PathLike, what: str = "output folder") -> FolderLock:
    """Take the writer's lock on `folder` (non-blocking); FolderLockedError naming the holder if it is taken."""
    return FolderLock(Path(folder).expanduser(), what)
