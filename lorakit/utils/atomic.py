"""Atomic file writes: write to a temporary file in the same folder, fsync, then rename over the target.

An interrupted save never leaves a half-written file under the final name, and the previous file stays as it was
until the new one is complete. The temporary file is removed on every failure (exceptions, Ctrl-C). A full disk or a
folder that cannot be written becomes a UserError naming the folder (and the space needed), not a library's bare
I/O message. Saved files get the usual permissions (0666 minus the umask), not mkstemp's 0600.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from lorakit.errors import UserError


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()
FILE_MODE = 0o666 & ~_UMASK
DIR_MODE = 0o777 & ~_UMASK

_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG}
_DENIED_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS}
# how libraries word a failed write when they do not raise OSError: safetensors (Rust io::Error), torch.save (C++)
_FULL_TEXT = ("no space left", "storagefull", "disk quota", "code: 28,", "file too large")
_IO_TEXT = ("file write failed", "ioerror", "io error", "error while serializing", "unexpected pos", "write failed")


def human_bytes(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000.0
    return str(n)


def free_bytes(folder: str | os.PathLike) -> int | None:
    """Free space for this user on the disk holding `folder` (its nearest existing parent), or None if unknown."""
    p = Path(folder)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def is_disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS:
        return True
    text = str(exc).lower()
    return any(t in text for t in _FULL_TEXT)


_WRITE_ERRNOS = _FULL_ERRNOS | _DENIED_ERRNOS | {errno.EIO, errno.ENOTDIR, errno.EEXIST, errno.EISDIR,
                                                 errno.ENAMETOOLONG}


def is_io_failure(exc: BaseException) -> bool:
    """An error raised while writing that means "the file could not be written" (not a bug in the caller, nor a
    missing input file the caller was reading)."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc.errno in _WRITE_ERRNOS
    text = str(exc).lower()
    return any(t in text for t in _FULL_TEXT + _IO_TEXT)


def write_error(exc: BaseException, target: str | os.PathLike, needed: int | None = None,
                what: str = "file") -> UserError:
    """The UserError for a failed save of `target`: a full disk (with the space needed), a folder that cannot be
    written, or another I/O failure; each names the folder and says that the previous file is untouched."""
    target = Path(target)
    folder = target.parent
    kept = f" The previous {target.name} (if any) is unchanged." if what == "file" else ""
    free = free_bytes(folder)
    need = f"about {human_bytes(needed)} are needed" if needed else "more space is needed"
    has = f", {human_bytes(free)} are free" if free is not None else ""
    if is_disk_full(exc) or (needed and free is not None and free < needed and is_io_failure(exc)):
        return UserError(f"the disk holding {folder} is full: saving {target.name} failed ({need}{has}). Free some "
                         f"space there or save to a folder on another disk.{kept}")
    if isinstance(exc, OSError) and exc.errno in _DENIED_ERRNOS:
        why = "it is read-only" if exc.errno == errno.EROFS else "permission denied"
        return UserError(f"cannot write {target.name} into {folder} ({why}). Fix the folder's permissions or choose "
                         f"another folder.{kept}")
    if isinstance(exc, (NotADirectoryError, FileExistsError)) or (
            isinstance(exc, OSError) and exc.errno in (errno.ENOTDIR, errno.EEXIST)):
        return UserError(f"cannot save {target}: a file stands where a folder is needed ({exc.strerror or exc}). "
                         "Choose another folder or move that file away.")
    text = str(exc).strip()
    detail = getattr(exc, "strerror", None) or (text.splitlines()[0] if text else type(exc).__name__)
    return UserError(f"could not write {target.name} into {folder} ({detail}).{kept}")


def make_dir(folder: str | os.PathLike, flag: str | None = None) -> Path:
    """mkdir -p with errors that name the folder (and the flag it came from)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in [folder, *folder.parents] if p.exists() and not p.is_dir()), folder)
        name = f"{flag} {folder}" if flag else f"the folder {folder}"
        raise UserError(f"{name} cannot be created: {blocker} is a file. Choose another folder or move that file "
                        "away.") from None
    except OSError as exc:
        name = f"{flag} {folder}" if flag else f"the folder {folder}"
        why = "permission denied" if exc.errno in _DENIED_ERRNOS else (exc.strerror or str(exc))
        raise UserError(f"{name} cannot be created ({why}). Choose a folder you can write to.") from None
    if not folder.is_dir():
        raise UserError(f"{flag + ' ' if flag else ''}{folder} is not a folder.")
    return folder


def check_writable_dir(folder: str | os.PathLike, flag: str | None = None) -> Path:
    """Create `folder` if needed and prove that a file can be written in it (a probe file, removed again); errors
    name the folder and the flag it came from. Catches a read-only folder or one whose parent is a file before any
    work is done, instead of at the first save."""
    folder = make_dir(folder, flag)
    name = f"{flag} {folder}" if flag else f"the folder {folder}"
    try:
        fd, probe = tempfile.mkstemp(prefix=".lorakit-write-test-", dir=folder)
        try:
            os.write(fd, b"ok")
        finally:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(probe)
    except OSError as exc:
        if is_disk_full(exc):
            raise UserError(f"{name}: the disk is full (writing a test file failed). Free some space or choose "
                            "another folder.") from None
        why = "it is read-only" if exc.errno == errno.EROFS else (
            "permission denied" if exc.errno in _DENIED_ERRNOS else (exc.strerror or str(exc)))
        raise UserError(f"{name} is not writable ({why}). Fix its permissions or choose another folder.") from None
    return folder


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, size_hint: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success it is renamed to `target`, on any error (Ctrl-C included)
    removed. `size_hint`: the bytes about to be written, for the disk-full message."""
    target = Path(target)
    make_dir(target.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
    except OSError as exc:
        raise write_error(exc, target, size_hint) from None
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, FILE_MODE)  # after the write: some writers (safetensors) recreate the file as 0600
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        if isinstance(exc, Exception) and not isinstance(exc, UserError) and is_io_failure(exc):
            raise write_error(exc, target, size_hint) from None
        raise


def write_bytes_atomic(target: str | os.PathLike, data: bytes) -> None:
    with atomic_path(target, size_hint=len(data)) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(target: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    write_bytes_atomic(target, text.encode(encoding))


def tensors_nbytes(tensors: dict) -> int:
    return sum(int(t.numel()) * int(t.element_size()) for t in tensors.values())


def save_safetensors_atomic(tensors: dict, target: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    # header: about 150 bytes of JSON per tensor plus the metadata
    needed = tensors_nbytes(tensors) + 150 * len(tensors) + sum(len(k) + len(v) for k, v in (metadata or {}).items())
    with atomic_path(target, size_hint=needed) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


__all__ = ["atomic_path", "write_bytes_atomic", "write_text_atomic", "save_safetensors_atomic", "make_dir",
           "check_writable_dir",
           "write_error", "free_bytes", "human_bytes", "is_disk_full", "tensors_nbytes", "FILE_MODE", "DIR_MODE"]
