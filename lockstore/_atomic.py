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
import stat
from typing import Any

from atomicwrites import AtomicWriter

from ._error import DurabilityUnknownError
from ._os import O_CLOEXEC, O_DIRECTORY, O_NOFOLLOW, close_all, open_into, with_path

_TEMP_SUFFIX = ".tmp"
_TOKEN_BYTES = 4


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


class _Temp:
    """The temp file as atomicwrites' hooks see it: its descriptor, which the writer's ``fds`` list owns (closing
    this object closes nothing). Lighter than a file object, and nothing for the garbage collector to close."""

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def fileno(self) -> int:
        return self.fd

    def __enter__(self) -> _Temp:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


class _Writer(AtomicWriter):  # type: ignore[misc]  # atomicwrites ships no types
    """atomicwrites' writer with a store's defaults (see the module docstring).

    Signal safety: the temp file's descriptor is opened straight into the caller's list (``fds``) and only ever
    closed from there (the file object wrapping it does not own it), and the rename is recorded as about to happen
    before it happens, so that a rollback after an interrupt can tell whether the temp file is still there to
    remove.
    """

    def __init__(self, target: str, *, durable: bool, like: os.stat_result | None, fds: list[int], name: str,
                 scratch: list[int], prefix: str | None) -> None:
        super().__init__(target, mode="wb", overwrite=True)
        self.target = target
        self.prefix = prefix
        self.name = name
        self.scratch = scratch
        self.durable = durable
        self.like = like
        self.fds = fds
        self.temp: str | None = None
        self.renaming = False
        self.renamed = False

    def get_fileobject(self, **_: Any) -> _Temp:
        prefix = self.prefix or temp_prefix(self.target)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | O_CLOEXEC | O_NOFOLLOW
        while True:
            self.temp = prefix + os.urandom(_TOKEN_BYTES).hex() + _TEMP_SUFFIX  # secrets.token_hex, without its frames
            try:
                fd = open_into(self.fds, self.temp, flags, 0o666)
            except FileExistsError:  # pragma: no cover - 32 random bits collided
                continue
            break
        if self.like is not None:
            self._copy_metadata(fd, self.like)
        return _Temp(fd)

    @staticmethod
    def _copy_metadata(fd: int, like: os.stat_result) -> None:
        new = os.fstat(fd)
        if (new.st_uid, new.st_gid) != (like.st_uid, like.st_gid):
            with contextlib.suppress(PermissionError):
                os.fchown(fd, like.st_uid, like.st_gid)
        if stat.S_IMODE(new.st_mode) != stat.S_IMODE(like.st_mode):
            os.fchmod(fd, stat.S_IMODE(like.st_mode))

    def sync(self, f: _Temp) -> None:
        if self.durable:
            os.fsync(f.fileno())

    def commit(self, f: _Temp) -> None:
        assert self.temp is not None
        self.renaming = True
        os.replace(self.temp, self.target)
        self.renamed = True
        if self.durable:
            sync_directory(os.path.dirname(self.target) or ".", self.name, self.scratch)

    def in_place(self) -> bool:
        """Whether the new file replaced the target (also when an interrupt came right after the rename)."""
        return self.renamed or (self.renaming and self.temp is not None and not os.path.lexists(self.temp))

    def rollback(self, f: _Temp | None) -> None:
        if self.temp is not None and self.fds and not self.in_place():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.temp)


def sync_directory(directory: str, target: str, dfds: list[int]) -> None:
    """fsync ``directory`` so that a rename into it survives a power loss; raise DurabilityUnknownError if not.

    The directory's descriptor goes into ``dfds``, a list the caller owns and empties again if an interrupt cuts
    this short."""
    try:
        dfd = open_into(dfds, directory, os.O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        os.fsync(dfd)
    except OSError as exc:
        # Some file systems cannot sync a directory and say EINVAL; there is nothing more to do there.
        if exc.errno != errno.EINVAL or not dfds:
            raise DurabilityUnknownError(target, exc) from exc
    finally:
        # The rename is done (and synced, unless DurabilityUnknownError is on its way): a failing close of the
        # directory changes nothing on disk, so it must not turn a completed write into a plain OSError.
        close_all(dfds)


def write(target: str, data: bytes, *, durable: bool, like: os.stat_result | None, into: list[int],
          scratch: list[int], name: str | None = None, prefix: str | None = None) -> None:
    """Atomically replace ``target`` (already resolved: see :func:`resolve_target`) with ``data``.

    ``like`` is the stat of the file being replaced (its mode, owner and group are kept), or None for a new file.
    ``into`` is an empty list that receives the new file's open descriptor, owned by the caller from then on (it
    pins the new inode for change detection). On an error before the rename the old file is untouched, the temp
    file is gone and ``into`` is empty again; the OSError names ``name`` (default: ``target``), the path the caller
    knows. DurabilityUnknownError means the new file is in place (its descriptor is in ``into``) but its directory
    could not be synced. ``scratch`` is an empty list for a passing descriptor (the directory's), which the caller
    empties with ``close_all`` should an interrupt leave one there. ``prefix``: ``temp_prefix(target)``, when the
    caller keeps it.
    """
    writer = _Writer(target, durable=durable, like=like, fds=into, name=name or target, scratch=scratch,
                     prefix=prefix)
    try:
        with writer.open() as f:
            view = memoryview(data)
            while view:
                view = view[os.write(f.fileno(), view) :]
    except BaseException as exc:
        if isinstance(exc, DurabilityUnknownError):
            raise
        try:
            writer.rollback(None)  # atomicwrites' own rollback ran, unless an interrupt cut it short
        finally:
            close_all(into)
        if not isinstance(exc, OSError):
            raise
        named = with_path(exc, name or target)
        if named is exc:
            raise
        raise named from exc


def sweep(target: str) -> list[str]:
    """Remove temp files that killed writers left beside ``target`` (resolved); only while holding its lock."""
    prefix = temp_prefix(target)
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


__all__ = ["resolve_target", "sweep", "sync_directory", "temp_prefix", "write"]
