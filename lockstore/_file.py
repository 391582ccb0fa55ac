"""The file storage: one value in one data file, written by atomic replace, locked through a sidecar lock file.

- Reads without the lock open the path (through a symlink) and see a whole old or new file.
- Under the lock, the data path is resolved again and the transaction reads and writes that resolved file only.
  With ``lock=True`` the lock file sits beside the resolved file (``<target>.lock``), so a Store opened through a
  symlink and one opened on its target share one lock; if the link is switched to another file while a process
  waits for the old file's lock, the process lets go and locks the new file's lock instead. Reads, writes and the
  lock therefore always refer to the same file, whenever the link moves.
- Versions are (device, inode, size, mtime, ctime). The storage keeps a descriptor open on the file it last read
  or wrote, so that its inode number cannot be reused by another file while it is the version we compare with.
"""

from __future__ import annotations

import os
import stat
import time
import weakref
from typing import TYPE_CHECKING, Any

from . import _atomic, _lock
from ._backend import Stored
from ._os import O_CLOEXEC, close_all, open_into, with_path
from ._sidecar import SidecarLock

if TYPE_CHECKING:
    from filelock import BaseFileLock

    from ._error import LockTimeout
    from ._holder import Holder
    from ._lock import Lock
    from ._stats_report import LockStats

_Sig = tuple[int, int, int, int, int]


def _sig(st: os.stat_result) -> _Sig:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class _Resolver:
    """The file a path names now: through symlinked directories (``current -> releases/42``) and a symlinked file.

    The directory's real path is kept, keyed by the directory's identity (one ``stat`` per call tells whether a
    link on the way was switched), so that the usual case costs a ``stat`` and an ``lstat``, not a ``realpath``.
    """

    __slots__ = ("base", "directory", "key", "leaf", "path", "real")

    def __init__(self, path: str) -> None:
        self.path = path
        self.directory, self.base = os.path.split(path)
        self.key: tuple[int, int] | None = None
        self.real = self.directory
        self.leaf = path  # os.path.join(self.real, self.base) once key is known, set with them

    def __call__(self) -> tuple[str, os.stat_result | None]:
        """(the file's path with every symlink resolved, its stat or None when missing)."""
        path = self.path
        try:
            st = os.stat(self.directory or ".")
            key = (st.st_dev, st.st_ino)
            if key != self.key:
                real = os.path.realpath(self.directory or ".")
                try:
                    found = os.stat(real)
                    same = (found.st_dev, found.st_ino) == key
                except OSError:  # e.g. a process that entered the directory, then lost the right to reach it
                    same = False
                # One tuple assignment, no call in between: an interrupt never leaves them out of step.
                self.real, self.leaf, self.key = ((real, os.path.join(real, self.base), key) if same else
                                                  (self.directory, os.path.join(self.directory, self.base), key))
            leaf = self.leaf
            st = os.lstat(leaf)
        except FileNotFoundError:
            return (self.leaf if self.key else path), None
        except OSError as exc:
            raise with_path(exc, path) from None
        if not stat.S_ISLNK(st.st_mode):
            return leaf, st
        target = os.path.realpath(leaf)
        try:
            return target, os.stat(target)
        except FileNotFoundError:
            return target, None
        except OSError as exc:
            raise with_path(exc, path) from None


class FileHeld:
    """One acquisition of a file store's lock."""

    __slots__ = ("holder", "like", "lock", "lock_held", "owner", "rotated", "target", "turn")

    def __init__(self, owner: object, holder: object) -> None:
        self.owner = owner
        self.holder = weakref.ref(holder) if holder is not None else None  # weakly, as the lock's ticket does
        self.lock: Lock | None = None
        self.lock_held: object = None
        self.target = ""
        self.like: os.stat_result | None = None  # the target's stat, as found under the lock
        self.turn: Any = None  # asyncio: this loop's turn for the lock file, held while the lock is
        self.rotated = False  # this acquisition read or wrote under the lock: it closes the retired pin


class FileStorage:
    """A data file and its lock (see the module docstring)."""

    cheap_versions = True

    def __init__(self, path: str, *, lock: object, durable: bool, poll_interval: float) -> None:
        self.path = self.target = path
        self.durable = durable
        self.poll_interval = poll_interval
        self.native = lock is True
        if isinstance(lock, (str, os.PathLike)) and os.path.realpath(lock) == os.path.realpath(path):
            raise ValueError(f"{path}: lock= names the data file itself; lockstore writes into its lock file")
        self._fixed = None if self.native else _lock.build(lock, path)
        self._resolve = _Resolver(path)
        self._native: dict[str, SidecarLock] = {}  # lock=True: the sidecar of each target seen (normally one)
        self._last_target: str | None = None
        self._pins: list[int] = []  # a descriptor of the file our version describes
        self._next: list[int] = []  # a descriptor being opened or written, becoming the pin
        self._retired: list[int] = []  # the previous pin, closed when the lock is let go (see _rotate)
        self._scratch: list[int] = []  # a passing descriptor (the directory's, for its fsync)
        self._swept: set[str] = set()
        self._prefixes: dict[str, str] = {}  # temp_prefix() of each target written
        self._filelock: BaseFileLock | None = None

    @property
    def locked(self) -> bool:
        return self.native or self._fixed is not None

    @property
    def lock_name(self) -> str | None:
        lock = self._current_lock()
        return None if lock is None else lock.lock_file

    def _sidecar(self, target: str) -> SidecarLock:
        lock_file = target + ".lock"
        lock = self._native.get(lock_file)
        if lock is None:
            made = SidecarLock(lock_file, data_path=self.path)
            # One C call: threads of this Store that found no lock at once all get the one that landed first (a
            # lock replaced in the table would make its holder let go and take the lock again).
            lock = self._native.setdefault(lock_file, made)
            if lock is not made:
                made.close()
        return lock

    def _forget_other_targets(self, target: str) -> None:
        """The symlink now names ``target``: the lock files of earlier targets are given back (a transaction still
        waiting for one of them keeps using its slot until it lets go)."""
        keep = target + ".lock"
        for lock_file in [name for name in list(self._native) if name != keep]:  # list(): threads add meanwhile
            lock = self._native.pop(lock_file, None)  # None: another thread of this Store gave it back first
            if lock is not None:
                lock.close()

    def _current_lock(self) -> Lock | None:
        if not self.native:
            return self._fixed
        target = self._last_target
        if target is None:
            target = self._last_target = self._resolve()[0]
        return self._sidecar(target)

    # ------------------------------------------------------------------------------------------- reading
    def _rotate(self) -> None:
        """The descriptor just opened becomes the pin; the old pin is retired, to be closed once the lock is let
        go: closing the last descriptor of a replaced file frees its inode, which costs the file system more than
        the rest of a small transaction's bookkeeping, and must not keep the lock busy."""
        self._pins, self._next, self._retired = self._next, self._retired, self._pins
        if self._next:
            close_all(self._next)  # left over by an interrupted operation

    def _read(self, path: str, name: str) -> Stored:
        close_all(self._next)
        try:
            fd = open_into(self._next, path, os.O_RDONLY | O_CLOEXEC)
        except FileNotFoundError:
            close_all(self._pins)
            return Stored(None, None)
        except OSError as exc:
            raise with_path(exc, name) from None
        try:
            st = os.fstat(fd)
            chunks = []
            while chunk := os.read(fd, max(st.st_size + 1, 65536)):
                chunks.append(chunk)
        except OSError as exc:
            close_all(self._next)
            raise with_path(exc, name) from None
        except BaseException:
            close_all(self._next)
            raise
        self._rotate()
        return Stored(b"".join(chunks), _sig(st))

    def load(self) -> Stored:
        try:
            return self._read(self.path, self.path)
        finally:
            close_all(self._retired)  # no lock to keep short here

    def fetch(self, held: object, known: object) -> Stored | None:
        assert isinstance(held, FileHeld)
        st = held.like
        if st is None:
            close_all(self._pins)
            return None if known is None else Stored(None, None)
        if known is not None and _sig(st) == known and self._pins:
            return None
        held.rotated = True
        return self._read(held.target, self.path)

    # ------------------------------------------------------------------------------------------- writing
    def _write(self, target: str, data: bytes, like: os.stat_result | None) -> object:
        # Descriptors an interrupt left in our lists last time are closed now (each list is only ever ours).
        if self._next or self._scratch:
            close_all(self._next)
            close_all(self._scratch)
        prefix = self._prefixes.get(target)
        if prefix is None:
            prefix = self._prefixes[target] = _atomic.temp_prefix(target)
        _atomic.write(target, data, durable=self.durable, like=like, into=self._next, scratch=self._scratch,
                      name=self.path, prefix=prefix)
        fd = self._next[0]
        self._rotate()
        try:
            return _sig(os.fstat(fd))
        except OSError:
            # The new value is in place: without its stat the store only cannot recognise the file next time, so
            # the version is unknown (the next transaction re-reads) instead of the completed write reported failed.
            return None

    def save(self, held: object, data: bytes, *, last: bool = False) -> object:
        assert isinstance(held, FileHeld)
        held.rotated = True
        return self._write(held.target, data, held.like)

    def put(self, data: bytes) -> object:
        target, st = self._resolve()
        try:
            return self._write(target, data, st)
        finally:
            close_all(self._retired)  # no lock to keep short here

    def set_aside(self, held: object) -> str | None:
        assert isinstance(held, FileHeld)
        target = held.target
        stamp = time.strftime("%Y%m%dT%H%M%S")
        aside = f"{target}.corrupt-{stamp}"
        n = 0
        while os.path.lexists(aside):
            n += 1
            aside = f"{target}.corrupt-{stamp}-{n}"
        try:
            os.rename(target, aside)
        except OSError as exc:
            raise with_path(exc, self.path) from None
        close_all(self._pins)
        held.like = None
        return aside

    # ------------------------------------------------------------------------------------------- locking
    def held(self, owner: object, holder: object) -> FileHeld:
        return FileHeld(owner, holder)

    def acquire(self, held: object, *, timeout: float, blocking: bool, label: str | None) -> None:
        assert isinstance(held, FileHeld)
        start = time.monotonic()
        while True:
            lock = self.lock_to_take()
            held.lock = lock
            held.lock_held = lock.held(held.owner, held.holder and held.holder())
            stale = lock.acquire(held.lock_held, timeout=timeout, poll_interval=self.poll_interval,
                                 blocking=blocking, label=label, start=start)
            if self.settle(held, lock):
                break
        self.swept(held, stale)

    def swept(self, held: FileHeld, stale: bool) -> None:
        """Holding the lock: remove temp files of killed writers, once per Store and after a stale record."""
        if stale or held.target not in self._swept:
            self._swept.add(held.target)
            _atomic.sweep(held.target)

    def lock_to_take(self) -> Lock:
        lock = self._current_lock()
        assert lock is not None
        return lock

    def settle(self, held: FileHeld, lock: Lock) -> bool:
        """Holding ``lock``: resolve the data path now. False when a switched symlink means that this is no longer
        the lock of the file the path names (the lock was let go; take the new one)."""
        target, st = self._resolve()
        if self.native:
            # Compared every time, not only when the target differs from the last one seen: threads of this Store
            # share _last_target, and one of them may already have noticed the switch for itself.
            if target != self._last_target:
                self._forget_other_targets(target)
            self._last_target = target
            if self._sidecar(target) is not lock:
                lock.release(held.lock_held)
                return False
        held.target, held.like = target, st
        return True

    def release(self, held: object, *, abandoned: object = None) -> None:
        assert isinstance(held, FileHeld)
        try:
            if held.lock is not None and held.lock_held is not None:
                if abandoned is not None and isinstance(held.lock, SidecarLock):
                    held.lock.release(held.lock_held, abandoned=abandoned)
                else:
                    held.lock.release(held.lock_held)
        finally:
            try:
                # Only by the acquisition that rotated the descriptors, which holds the lock: the lists belong to
                # whoever holds it, and a thread whose wait for this Store's turn timed out must not touch them
                # while the holder writes (it would close the descriptor being written).
                if held.rotated:
                    held.rotated = False
                    close_all(self._retired)
            finally:
                if held.turn is not None:
                    from ._aio import give_turn

                    give_turn(held)

    # ------------------------------------------------------------------------------------------- diagnostics
    def holder(self) -> Holder | None:
        lock = self._current_lock()
        return None if lock is None else lock.holder()

    def waiters(self) -> list[Holder]:
        lock = self._current_lock()
        return [] if lock is None else lock.waiters()

    def timeout_error(self, waited: float) -> LockTimeout:
        lock = self._current_lock()
        assert lock is not None
        return lock.timeout_error(waited)

    def stats(self) -> LockStats | None:
        """The lock file's statistics (None for a caller's filelock instance, which keeps none)."""
        lock = self._current_lock()
        return lock.stats() if isinstance(lock, SidecarLock) else None

    def reset_stats(self, owner: object, *, timeout: float) -> None:
        lock = self._current_lock()
        if not isinstance(lock, SidecarLock):
            raise TypeError(f"{self.path}: a caller's filelock lock keeps no statistics")
        lock.reset_stats(owner, timeout=timeout, poll_interval=self.poll_interval)

    def filelock(self, timeout: float) -> Any:
        """``store.lock``: a FileLock on the current lock file, or the caller's instance, or None."""
        if self._fixed is not None:
            return self._fixed.lock if isinstance(self._fixed, _lock.FileLockAdapter) else None
        if not self.native:
            return None
        lock = self._current_lock()
        assert isinstance(lock, SidecarLock)
        if self._filelock is None or self._filelock.lock_file != lock.lock_file:
            self._filelock = lock.filelock(timeout)  # the symlink was switched: the current target's lock file
        return self._filelock

    def close(self) -> None:
        close_all(self._retired)
        close_all(self._next)
        close_all(self._scratch)
        close_all(self._pins)
        for lock in self._native.values():
            lock.close()
        if self._fixed is not None:
            self._fixed.close()

    # ------------------------------------------------------------------------------------------- asyncio
    async def aload(self) -> Stored:
        from ._aio import in_thread

        return await in_thread(self.load)

    async def aacquire(self, held: object, *, timeout: float, blocking: bool, label: str | None) -> None:
        from ._aio import acquire_file

        assert isinstance(held, FileHeld)
        await acquire_file(self, held, timeout=timeout, blocking=blocking, label=label)

    async def afetch(self, held: object, known: object) -> Stored | None:
        from ._aio import in_thread

        return await in_thread(self.fetch, held, known)

    async def asave(self, held: object, data: bytes, *, last: bool = False) -> object:
        from ._aio import in_thread

        return await in_thread(self.save, held, data)

    async def aset_aside(self, held: object) -> str | None:
        from ._aio import in_thread

        return await in_thread(self.set_aside, held)

    async def arelease(self, held: object) -> None:
        self.release(held)  # nothing that could block the loop: a pwrite of blanks and an unlock


__all__ = ["FileHeld", "FileStorage"]
