"""Writing bytes to a file atomically and durably; the only importer of atomicwrites.

The recipe is atomicwrites' (temp file in the target's own directory, write, fsync, rename, fsync the directory,
roll back on error), with its defaults fixed for a store:

- the temp file is created ``O_EXCL`` with the mode of the file it replaces (``0o666 & ~umask`` for a new file)
  and, where permitted, its owner and group; atomicwrites would leave every replaced file ``0600``;
- a symlink is written through: its target gets the new content and the link stays a link;
- fsync is optional (``durable=False``) and an fsync error is never retried: a failure before the rename aborts
  the write, a failure of the directory fsync after it raises :class:`DurabilityUnknownError`;
- temp names are short enough for a 250-byte data file name and recognisable, so a writer holding the lock can
  sweep those left behind by a killed writer.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
import stat
from typing import IO, Any

from atomicwrites import AtomicWriter

from ._error import DurabilityUnknownError

_TEMP_SUFFIX = ".tmp"
_TOKEN_BYTES = 4
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def temp_prefix(target: str) -> str:
    """Return the path prefix of every temp file written for ``target`` (the token and ``.tmp`` follow it)."""
    directory, name = os.path.split(target)
    if len(os.fsencode(name)) > 200:
        # NAME_MAX is 255 bytes: keep a readable head and make it unique with a hash of the whole name.
        digest = hashlib.sha1(os.fsencode(name)).hexdigest()[:12]
        # 60 bytes of the name, not characters: 60 four-byte characters would overflow NAME_MAX again.
        name = os.fsencode(name)[:60].decode("utf-8", "ignore") + "~" + digest
    return os.path.join(directory, f".{name}.")


def resolve_target(path: str) -> str:
    """Return the file a write to ``path`` must replace: ``path`` itself, or the end of its symlink chain."""
    try:
        if not stat.S_ISLNK(os.lstat(path).st_mode):
            return path
    except FileNotFoundError:
        return path
    return os.path.realpath(path)


def with_path(exc: OSError, path: str) -> OSError:
    """Return ``exc`` naming ``path``: a new error of the same errno-mapped class when it named another file
    (a temp file that no longer exists means nothing to the caller) or nothing."""
    if exc.filename == path:
        return exc
    reason = exc.strerror or os.strerror(exc.errno or errno.EIO)
    if exc.filename is not None:
        reason += f" (on the temp file {os.path.basename(os.fsdecode(exc.filename))})"
    return OSError(exc.errno, reason, path)


class _Writer(AtomicWriter):  # type: ignore[misc]  # atomicwrites ships no types
    """atomicwrites' writer with a store's defaults (see the module docstring)."""

    def __init__(self, target: str, *, durable: bool, like: os.stat_result | None) -> None:
        super().__init__(target, mode="wb", overwrite=True)
        self.target = target
        self.durable = durable
        self.like = like
        self.temp: str | None = None
        self.fd: int | None = None  # a duplicate of the written file's descriptor, kept open for the caller
        self.renamed = False

    def get_fileobject(self, **_: Any) -> IO[bytes]:
        prefix = temp_prefix(self.target)
        while True:
            temp = prefix + secrets.token_hex(_TOKEN_BYTES) + _TEMP_SUFFIX
            try:
                fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_CLOEXEC | _O_NOFOLLOW, 0o666)
            except FileExistsError:  # pragma: no cover - 32 random bits collided
                continue
            break
        self.temp = temp
        try:
            if self.like is not None:
                self._copy_metadata(fd, self.like)
            return os.fdopen(fd, "wb", buffering=0)
        except BaseException:
            os.close(fd)
            os.unlink(temp)
            raise

    @staticmethod
    def _copy_metadata(fd: int, like: os.stat_result) -> None:
        new = os.fstat(fd)
        if (new.st_uid, new.st_gid) != (like.st_uid, like.st_gid):
            with contextlib.suppress(PermissionError):
                os.fchown(fd, like.st_uid, like.st_gid)
        if stat.S_IMODE(new.st_mode) != stat.S_IMODE(like.st_mode):
            os.fchmod(fd, stat.S_IMODE(like.st_mode))

    def sync(self, f: IO[bytes]) -> None:
        fd = f.fileno()
        if self.durable:
            os.fsync(fd)
        self.fd = os.dup(fd)

    def commit(self, f: IO[bytes]) -> None:
        assert self.temp is not None
        os.replace(self.temp, self.target)
        self.renamed = True
        if self.durable:
            sync_directory(os.path.dirname(self.target) or ".", self.target)

    def rollback(self, f: IO[bytes] | None) -> None:
        if self.fd is not None and not self.renamed:
            os.close(self.fd)
            self.fd = None
        if self.temp is not None and not self.renamed:
            os.unlink(self.temp)


def sync_directory(directory: str, target: str) -> None:
    """fsync ``directory`` so that a rename into it survives a power loss; raise DurabilityUnknownError if not."""
    try:
        dfd = os.open(directory, os.O_RDONLY | _O_DIRECTORY | _O_CLOEXEC)
    except OSError as exc:
        raise DurabilityUnknownError(target, exc) from exc
    try:
        os.fsync(dfd)
    except OSError as exc:
        # Some file systems cannot sync a directory and say EINVAL; there is nothing more to do there.
        if exc.errno != errno.EINVAL:
            raise DurabilityUnknownError(target, exc) from exc
    finally:
        # The rename is done (and synced, unless DurabilityUnknownError is on its way): a failing close of the
        # directory changes nothing on disk, so it must not turn a completed write into a plain OSError.
        with contextlib.suppress(OSError):
            os.close(dfd)


def write(path: str, data: bytes, *, durable: bool, like: os.stat_result | None) -> int:
    """Atomically replace ``path`` (or its symlink target) with ``data``; return an open descriptor of the new file.

    ``like`` is the stat of the file being replaced (its mode, owner and group are kept), or None for a new file.
    On an error before the rename the old file is untouched and the temp file is gone; the OSError names the path.
    The caller owns the returned descriptor (it pins the new inode for change detection).
    """
    target = resolve_target(path)
    writer = _Writer(target, durable=durable, like=like)
    try:
        with writer.open() as f:
            view = memoryview(data)
            while view:
                view = view[os.write(f.fileno(), view) :]
    except BaseException as exc:
        if writer.renamed and writer.fd is not None:  # the new file is in place; nobody will take the descriptor
            os.close(writer.fd)
        if not isinstance(exc, OSError) or isinstance(exc, DurabilityUnknownError):
            raise
        named = with_path(exc, path)
        if named is exc:
            raise
        raise named from exc
    assert writer.fd is not None
    return writer.fd


def sweep(path: str) -> list[str]:
    """Remove temp files that killed writers left beside ``path``; call only while holding the store's lock."""
    prefix = temp_prefix(resolve_target(path))
    directory, head = os.path.split(prefix)
    removed: list[str] = []
    try:
        entries = os.scandir(directory or ".")
    except OSError:
        return removed
    # Best effort: a leftover temp file costs only space, so failing to sweep must not fail the caller's write.
    with entries, contextlib.suppress(OSError):
        for entry in entries:
            name = entry.name
            token = name[len(head) : -len(_TEMP_SUFFIX)]
            if name.startswith(head) and name.endswith(_TEMP_SUFFIX) and len(token) == 2 * _TOKEN_BYTES:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    removed.append(entry.path)
    return removed


__all__ = ["resolve_target", "sweep", "sync_directory", "temp_prefix", "with_path", "write"]
