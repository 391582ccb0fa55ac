"""Mutation check of the acquire, release and write paths: remove or reorder each cleanup and ordering step, one at
a time, and show that some test fails.

Not collected by pytest (run it by hand: ``python tests/mutation_check.py [--only NAME ...]``, about 15 minutes). Each
mutation is an exact text change in a copy of ``lockstore/`` (the change must apply exactly once), then the tests
that should catch it run against the copy; a mutation that no test catches is reported as SURVIVED and the script
exits 1. The table it prints is the evidence quoted in the CHANGELOG and the closing notes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIGNALS = "tests/test_signals.py"
EDGES = "tests/test_edges.py"
REPROS = "tests/test_repros.py"


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]


M = Mutation
MUTATIONS = [
    M("flock recorded only after the flock call", "_sidecar.py",
      "                fd = slot.flocked = slot.fds[0]  # recorded first: release() undoes it whatever happens next\n"
      "                try:\n                    flock(fd, LOCK_NB)\n",
      "                fd = slot.fds[0]\n                try:\n                    flock(fd, LOCK_NB)\n"
      "                    slot.flocked = fd\n", (SIGNALS,)),
    M("no unlock at release", "_sidecar.py", "                        flock(fd, LOCK_UN)\n",
      "                        pass\n", ("tests/test_lock.py", EDGES)),
    M("the slot not given back at release", "_sidecar.py",
      "                    try:\n                        slot.give(held.ticket)\n                    finally:\n",
      "                    try:\n                        pass\n                    finally:\n", ("tests/test_store.py",)),
    M("a call between forgetting the flock and the unlock", "_sidecar.py",
      "                fd, slot.flocked = slot.flocked, None\n",
      "                fd, slot.flocked = slot.flocked, None\n                time.monotonic()\n", (SIGNALS,)),
    # Not listed: "the record blanked without holding the flock" (``if slot.flocked is not None and ...`` in
    # _let_go). It is equivalent since each release takes its turn's area and record length once: a release that
    # does not hold the flock finds neither, so the guard no longer changes what is written.
    M("release unlocks a request it does not hold", "_sidecar.py",
      "        if not slot.held_by(held.ticket):\n            slot.give(held.ticket)  # withdraw a queued request\n"
      "            return\n", "", ("tests/test_store.py", "tests/test_lock.py", SIGNALS)),
    M("no release after a timeout", "_sidecar.py",
      "        except _TimedOut:\n            self.release(held)\n            raise self.timeout_error(",
      "        except _TimedOut:\n            raise self.timeout_error(", ("tests/test_lock.py", "tests/test_holder.py")),
    M("a replaced lock file is not noticed", "_sidecar.py", "            if self._still_the_lock_file(slot):\n",
      "            if True:\n", ("tests/test_lock.py",)),
    M("announcements not withdrawn", "_sidecar.py",
      "            if announcement is not None:\n                _queue.withdraw(announcement)\n",
      "            pass\n", ("tests/test_queue.py", "tests/test_stats.py", "tests/test_holder.py")),
    M("an announcement dropped before it is withdrawn", "_sidecar.py",
      "            announcement = held.announced[-1]\n            if announcement is not None:\n"
      "                _queue.withdraw(announcement)\n            held.announced.pop()\n",
      "            announcement = held.announced.pop()\n            if announcement is not None:\n"
      "                _queue.withdraw(announcement)\n", (SIGNALS + "::test_interrupt_anywhere_in_announcing_or_withdrawing_a_wait_leaves_no_announcement",)),
    M("a timed-out request stays queued", "_owners.py",
      "                if deadline is not None and time.monotonic() >= deadline:\n"
      "                    self._remove(ticket)\n", "                if deadline is not None and time.monotonic() >= deadline:\n",
      ("tests/test_owners.py", "tests/test_lock.py", "tests/test_concurrency.py", SIGNALS)),
    M("no hand-over to the next waiting thread", "_owners.py", "            nxt = self._queue.popleft()\n"
      "            self.ticket = nxt\n            nxt.wake.release()\n",
      "            self.ticket = None\n", ("tests/test_concurrency.py", EDGES)),
    M("the end of a transaction not retried", "_txn.py",
      "            try:\n                self._end()\n            except BaseException:\n"
      "                self._end()  # an interrupt cut the first call short\n                raise\n\n",
      "            self._end()\n\n", (SIGNALS,)),
    M("the Store given back before the storage", "_txn.py",
      "        try:\n            if self.held is not None:\n                core.storage.release(self.held)\n"
      "        finally:\n            if core.active is self:\n                core.active = None\n"
      "            ticket = self.guard_ticket\n            if ticket is not None:\n                core.guard.give(ticket)\n",
      "        try:\n            if core.active is self:\n                core.active = None\n"
      "            ticket = self.guard_ticket\n            if ticket is not None:\n                core.guard.give(ticket)\n"
      "        finally:\n            if self.held is not None:\n                core.storage.release(self.held)\n",
      (EDGES,)),
    M("no release when entering fails", "_txn.py",
      "                    self._set_aside_done(storage.set_aside(self.held), corrupt)\n        except BaseException:\n"
      "            self.entered = False\n"
      "            try:\n                self._end()\n            except BaseException:\n"
      "                self._end()  # an interrupt cut the first call short\n                raise\n            raise\n",
      "                    self._set_aside_done(storage.set_aside(self.held), corrupt)\n        except BaseException:\n"
      "            self.entered = False\n            raise\n", ("tests/test_store.py", "tests/reliability/test_bad_input.py", SIGNALS)),
    M("no rollback when the block raises", "_txn.py",
      "            if exc_type is not None:\n                self._rollback()\n                return\n",
      "            if exc_type is not None:\n                return\n", ("tests/test_store.py",)),
    M("a forked child writes through the inherited transaction", "_txn.py",
      "        if self.generation != FORKS[0]:\n            self._forked_exit()\n            return\n        try:\n"
      "            if exc_type is not None:\n                self._rollback()\n",
      "        try:\n            if exc_type is not None:\n                self._rollback()\n", (EDGES,)),
    M("commit encodes before taking the lock", "_store.py",
      "        with Transaction(core, core.timeout, blocking=True, label=None, kind=COMMIT):\n            pass\n",
      "        data = core.encode(self.value)\n"
      "        with Transaction(core, core.timeout, blocking=True, label=None, kind=COMMIT):\n"
      "            core.store.value = core.format.decode(data)\n", (EDGES,)),
    M("reload does not wait for another thread's transaction", "_store.py",
      "            core.take_guard(ticket, core.timeout)\n            try:\n                self.value = core.accept(",
      "            try:\n                self.value = core.accept(", (EDGES,)),
    M("the temp file not removed on a failed write", "_atomic.py",
      "        if self.temp is not None and self.fds and not self.in_place():\n"
      "            with contextlib.suppress(FileNotFoundError):\n                os.unlink(self.temp)\n",
      "        pass\n", ("tests/test_atomic.py", "tests/reliability/test_faults.py")),
    M("the new file's descriptor not closed on a failed write", "_atomic.py",
      "        finally:\n            close_all(into)\n", "        finally:\n            pass\n", (SIGNALS, "tests/test_atomic.py")),
    M("the previous pin never closed", "_file.py",
      "                    close_all(self._retired)\n            finally:\n",
      "                    pass\n            finally:\n", (EDGES, SIGNALS)),
    M("a thread that timed out closes the holder's descriptors", "_file.py", "                if held.rotated:\n",
      "                if True:\n", (EDGES,)),
    M("an ended wait writes the previous turn's area", "_sidecar.py", "            head, slot.head = slot.head, None\n",
      "            head = slot.head\n", (REPROS,)),
    M("the statistics' fast path used on an area another process wrote", "_sidecar.py",
      "        if (out is not None and mine_area is not None and head.startswith(mine_area, _AREA_AT) and not slot.timed_out\n",
      "        if (out is not None and mine_area is not None and not slot.timed_out\n", ("tests/test_stats.py",)),
    M("an area another process wrote not checked whole", "_sidecar.py",
      "        mine = out is not None and mine_area is not None and area == mine_area\n",
      "        mine = out is not None and mine_area is not None\n",
      ("tests/test_stats.py",)),
    # Not listed: "a newer format's statistics area counted into" (``if cold >= 0:`` in _counted). Equivalent since
    # the release counts in place: a newer area kept as ``slot.out`` would come with ``slot.cold`` -1, and count()
    # returns the ``cold`` it is given, so the release takes the slow path, which leaves the lock file's area alone
    # (test_a_newer_format_in_a_lock_file_is_left_alone_by_every_transaction checks the bytes either way).
    M("a transaction holding the lock gives up at once on another thread's reload", "_txn.py",
      "        core.take_guard(ticket, timeout if timeout < 0 or timeout >= GUARD_GRACE else GUARD_GRACE)\n",
      "        core.take_guard(ticket, timeout)\n", (EDGES,)),
    M("a wait for the Store's turn held by this very thread", "_txn.py",
      "        if other is not None and conflicts(other, ticket.owner):\n",
      "        if other is not None and sys.modules['lockstore._owners'].blocks_this_loop(other):\n", (EDGES,)),
    M("a waiter's slot written without claiming it", "_queue.py", "            if claimed is False:\n",
      "            if False:\n", ("tests/test_queue.py",)),
    M("a dead waiter's timeout mark taken over before it is counted", "_queue.py",
      "        if \"timed_out\" in raw:\n            return False\n", "", ("tests/test_queue.py",)),
    M("a torn statistics area not read again", "_sidecar.py",
      "            if parsed is not None or not area.startswith(_stats.MAGIC):\n",
      "            if True:\n", ("tests/test_stats.py",)),
    M("an interrupted announcement not given back", "_queue.py",
      "    except BaseException:\n        if index >= 0:\n", "    except BaseException:\n        if False:\n",
      (SIGNALS + "::test_interrupt_anywhere_in_announcing_or_withdrawing_a_wait_leaves_no_announcement",)),
    M("marks taken by a holder that will not count them", "_sidecar.py",
      "        if marked and slot.head is not None and not _stats.newer(head[_stats.OFFSET : _stats.OFFSET + _stats.SIZE]):\n",
      "        if marked:\n", ("tests/test_queue.py",)),
    M("a stale oldest wait never repaired", "_sidecar.py",
      "                        live = _queue.repair_oldest(slot.fds[0], unless=slot.handed_to_nobody)\n",
      "                        live = slot.handed_to_nobody\n",
      (REPROS, "tests/test_queue.py::test_a_stale_oldest_wait_handed_the_lock_in_vain_is_repaired_for_every_process")),
    M("a waiter left in the kernel not adopted", "_sidecar.py",
      "                slot.waiters.extend(filter(None, map(_waiter.adopt, (slot.key,))))\n",
      "                pass\n", (REPROS,)),
    M("a waiter in the kernel stopped instead of parked", "_waiter.py",
      "            if self._busy and not self._closing:\n", "            if False:\n", (REPROS,)),
    M("a switched symlink's new target not re-locked", "_file.py",
      "            if self._sidecar(target) is not lock:\n", "            if False:\n", (EDGES,)),
    M("a fresh Store's lock object made twice by racing threads", "_file.py",
      "            lock = self._native.setdefault(lock_file, made)\n",
      "            lock = self._native[lock_file] = made\n", (EDGES,)),
    M("an earlier target's lock given back twice by two threads", "_file.py",
      "            lock = self._native.pop(lock_file, None)  # None: another thread of this Store gave it back first\n",
      "            lock = self._native.pop(lock_file)\n", (EDGES,)),
    M("close() does not wait for another thread's transaction", "_store.py",
      "            core.take_guard(ticket, core.timeout)\n            core.storage.close()\n",
      "            core.storage.close()\n", (EDGES,)),
    M("a slot given up is still used by a thread that had it in hand", "_sidecar.py",
      "        if slot.state != _slots.LIVE:\n            return False\n", "", (EDGES,)),
    # Not listed: "a slot's drop decided without marking it first". Without the mark, a thread taking the slot in
    # the few instructions between the check and DROPPED would use it; no test forces that window yet.
    M("a symlink at the lock path followed", "_sidecar.py",
      "        if stat.S_ISLNK(st.st_mode):\n            raise OSError(errno.ELOOP,",
      "        if False:\n            raise OSError(errno.ELOOP,", (EDGES,)),
    M("a dropped transaction forgotten before its release", "_txn.py",
      "            core.storage.release(held, abandoned=claim)\n            del _RELEASING[0]\n",
      "            del _RELEASING[0]\n            core.storage.release(held, abandoned=claim)\n", (SIGNALS,)),
    M("the heir of a dropped transaction not recorded before it takes over", "_sidecar.py",
      "            held.heirs.append(Ticket(current_owner(), abandoned))\n            heir = held.heirs[-1]\n",
      "            heir = Ticket(current_owner(), abandoned)\n", (SIGNALS,)),
    M("a transaction left at the start of its __exit__ joined as if running", "_txn.py",
      "            if frame is not None and not running(frame, txn.entry):\n",
      "            if frame is not None and False:\n", (SIGNALS,)),
    M("a running outer transaction ended as if dropped", "_txn.py",
      "            if frame is not None and not running(frame, txn.entry):\n",
      "            if frame is not None:\n", (SIGNALS,)),
    M("the frame of a manual __enter__ kept (a cycle that keeps a dropped transaction's lock)", "_txn.py",
      "        if entered_by_with(frame):\n", "        if True:\n", (SIGNALS,)),
    M("a probe's descriptor not closed by the collector after its cleanup was cut short", "_os.py",
      'io.FileIO, mode="r", closefd=True)', 'io.FileIO, mode="r", closefd=False)', (SIGNALS,)),
    M("the waiter's latest request not withdrawn at release", "_sidecar.py",
      "                slot.waiters[0].withdraw()  # a grant still to come for a wait given up is dropped, not kept\n",
      "                pass\n", (REPROS,)),
    M("a signal handler's transaction joins one being entered", "_txn.py",
      "            if not (txn.entered and txn.in_block):\n", "            if False:\n", (SIGNALS,)),
    M("the same with statement entered again does not end the dropped one", "_txn.py",
      "            _entered_here(self, frame)\n", "            pass\n", (SIGNALS,)),
    M("savepoints through the format", "_txn.py",
      "        self.savepoint = Savepoint(store.value)\n",
      "        self.savepoint = Savepoint(self.core.format.decode(self.core.format.encode(store.value)))\n",
      (EDGES, "tests/test_store.py")),
    # The seventh review's fixes.
    M("the sweep of dropped transactions iterates the set other threads change", "_txn.py",
      "            for watch in [w for w in watches.copy() if w() is None]:\n",
      "            for watch in [w for w in watches if w() is None]:\n",
      ("tests/test_stats.py::test_e2e_threads_with_short_timeouts_count_every_timeout",)),
    M("pending timeouts added without their lock", "_stats.py",
      "        with self.lock:\n            batch = self.batch\n", "        if True:\n            batch = self.batch\n",
      ("tests/test_stats.py::test_pending_timeouts_of_threads_are_never_lost",
       "tests/test_stats.py::test_e2e_threads_with_short_timeouts_count_every_timeout")),
    M("timeouts beyond the newest 64 dropped, not folded", "_stats.py",
      "                    _fold(batch.folded, batch.items.popleft())\n", "                    batch.items.popleft()\n",
      ("tests/test_stats.py::test_e2e_many_timeouts_of_one_process_are_all_counted",)),
    M("counted timeouts kept after their write landed", "_stats.py",
      "            while self.sealed and self.sealed[0].landed:\n                del self.sealed[0]",
      "            while False:\n                del self.sealed[0]",
      ("tests/test_stats.py::test_e2e_many_timeouts_of_one_process_are_all_counted",
       "tests/test_stats.py::test_e2e_a_reset_drops_timeouts_from_before_it")),
    M("a write's landing recorded after it, not by it", "_sidecar.py",
      "                        landed.extend(map(os.pwrite, (slot.fds[0],), (out,), (0,)))\n",
      "                        os.pwrite(slot.fds[0], out, 0)\n                        landed.append(0)\n",
      (SIGNALS + "::test_interrupt_anywhere_in_a_release_that_counts_pending_timeouts_loses_none",)),
    M("a try that finds the lock taken leaves no mark", "_sidecar.py",
      "                            self._give_up(held, fd, start, label)\n", "                            pass\n",
      ("tests/test_queue.py::test_a_try_that_finds_the_lock_taken_is_counted_when_its_process_exits_at_once",)),
    M("pending timeouts dropped with the file's slot", "_slots.py",
      "    return Pending() if key == (0, 0) else PENDING.setdefault(key, Pending())\n", "    return Pending()\n",
      ("tests/test_queue.py::test_a_timeout_is_counted_after_every_store_on_the_file_was_closed",)),
    M("the header's oldest wait rewritten with the waits handed the lock in vain", "_queue.py",
      "        starts = [s for s in remaining if s and not among(s, unless)]\n",
      "        starts = [s for s in remaining if s]\n",
      ("tests/test_queue.py::test_after_a_hand_over_nobody_took_later_waiters_are_still_handed_the_lock",)),
    M("a reset keeps this process's earlier timeouts", "_sidecar.py",
      "                        landed = []\n                        slot.timed_out.begin(landed)\n                        out =",
      "                        landed = []\n                        out =",
      ("tests/test_stats.py::test_e2e_a_reset_drops_timeouts_from_before_it",)),
    M("a mark recognised by the bare word, which a label can hold", "_queue.py",
      "_MARK: Final = b\'\"timed_out\": [\'\n", "_MARK: Final = b\'\"timed_out\"\'\n",
      ("tests/test_queue.py::test_a_waiter_whose_label_reads_like_a_mark_is_listed_and_never_collected",)),
    M("a hand-over nobody took not remembered", "_sidecar.py",
      "                    slot.handed_to_nobody = [*slot.handed_to_nobody[-_queue.SLOTS:], since]\n",
      "                    pass\n",
      ("tests/test_queue.py::test_a_waiter_that_never_takes_the_lock_is_handed_it_once_not_at_every_release",)),
    M("an announcement's claim not consulted", "_queue.py",
      "                    and (fd is None or not _unclaimed(fd, index))):\n", "                    ):\n",
      ("tests/test_queue.py::test_a_killed_waiter_of_another_pid_namespace_is_not_listed_and_not_handed_the_lock",)),
    M("the announcement appended outside the try that withdraws it", "_sidecar.py",
      "        try:\n            if slot.writable:\n",
      "        if slot.writable:\n            held.announced.extend(map(_queue.announce, (fd,), (label,), (timeout,)))\n"
      "        try:\n            if False:\n",
      ("tests/test_signals.py::test_interrupt_at_every_point_of_the_wait_itself_leaves_no_announcement",)),
    # The ninth review's fixes.
    M("an asyncio wait that gives up leaves no mark", "_aio.py",
      "            lock.mark_aside(held.lock_held, start, timeout, label)\n", "            pass\n",
      ("tests/test_queue.py::test_asyncio_timeouts_and_tries_are_counted_when_their_process_exits_at_once",)),
    M("a wait behind another thread of the process leaves no mark", "_sidecar.py",
      "                    self.mark_aside(held, start, timeout if blocking else 0.0, label)\n",
      "                    pass\n",
      ("tests/test_queue.py::test_a_wait_behind_another_thread_is_counted_when_its_process_exits_at_once",)),
    M("waits handed the lock in vain remembered only 8 at a time", "_sidecar.py",
      "                    slot.handed_to_nobody = [*slot.handed_to_nobody[-_queue.SLOTS:], since]\n",
      "                    slot.handed_to_nobody = [*slot.handed_to_nobody[-7:], since]\n",
      ("tests/test_queue.py::test_more_waiters_that_never_take_the_lock_than_were_remembered_are_each_handed_it_once",)),
    M("a reset drops pending timeouts before its write lands", "_sidecar.py",
      "                        landed = []\n                        slot.timed_out.begin(landed)\n",
      "                        slot.timed_out.begin([0])\n",
      (SIGNALS + "::test_interrupt_anywhere_in_a_statistics_reset_keeps_or_drops_timeouts_with_it",)),
    # The leaner release and lookup (this session).
    M("the slot used last reused without a look at the path", "_sidecar.py",
      "        it holds it, while the file at the path is free.\"\"\"\n        try:\n",
      "        it holds it, while the file at the path is free.\"\"\"\n"
      "        if self._box[0] is not None and self._box[0].fds:\n            return self._box[0]\n        try:\n",
      ("tests/test_lock.py::test_a_deleted_lock_file_held_by_a_stuck_process_does_not_block_the_path_s_lock_file",)),
    M("the resolved leaf kept when a symlinked directory is switched", "_file.py",
      "                self.real, self.leaf, self.key = ((real, os.path.join(real, self.base), key) if same else\n",
      "                self.real, self.leaf, self.key = ((real, self.leaf, key) if same else\n",
      (EDGES + "::test_a_directory_link_switched_inside_a_transaction_leaves_its_write_in_the_locked_directory",)),
    M("a replaced lock file's descriptors closed after the slot passes on", "_sidecar.py",
      "            self._let_go(held, slot, close=True)\n",
      "            self._let_go(held, slot)\n            slot.close_files()\n",
      (EDGES + "::test_threads_sharing_a_lock_file_that_is_replaced_again_and_again_see_no_closed_descriptor",)),
    M("a timeout believed marked when its mark did not fit", "_sidecar.py",
      "            held.counted = marked  # else (no room for the mark, or a failed write) this process counts it\n",
      "            held.counted = True\n",
      ("tests/test_queue.py::test_a_timeout_whose_mark_does_not_fit_its_slot_is_still_counted",)),
    M("a record cut by characters only", "_holder.py",
      "    while text and len(json.dumps(text)) > limit * _JSON_PER_CHAR:\n",
      "    while False:\n",
      ("tests/test_holder.py::test_a_record_of_wide_characters_stays_within_its_4_kib_and_spares_the_statistics",)),
    # The tenth review's fix.
    M("a timeout through a Store that has not used the lock file dropped", "_sidecar.py",
      "                    pending = _slots.pending((st.st_dev, st.st_ino))\n", "                    pass\n",
      ("tests/test_queue.py::test_an_asyncio_timeout_through_a_store_that_never_took_the_lock_is_counted",)),
]


def copy_project(work: str) -> None:
    """The project (package, tests, configuration) into ``work``, where the tests run against its package."""
    for name in ("lockstore", "tests"):
        shutil.copytree(os.path.join(ROOT, name), os.path.join(work, name),
                        ignore=shutil.ignore_patterns("__pycache__", ".mypy_cache"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), work)


def run(mutation: Mutation, work: str) -> tuple[bool, str]:
    """Apply ``mutation`` to a fresh copy of lockstore/ in ``work``; True when some test failed (caught).

    The tests run in ``work`` itself: ``python -m pytest`` puts the working directory first on ``sys.path``, so
    run from the repository they would import the unchanged package."""
    package = os.path.join(work, "lockstore")
    shutil.rmtree(package, ignore_errors=True)
    shutil.copytree(os.path.join(ROOT, "lockstore"), package, ignore=shutil.ignore_patterns("__pycache__"))
    path = os.path.join(package, mutation.file)
    with open(path) as f:
        text = f.read()
    count = text.count(mutation.old)
    if count != 1:
        return False, f"does not apply ({count} matches): update the mutation"
    with open(path, "w") as f:
        f.write(text.replace(mutation.old, mutation.new))
    env = dict(os.environ, PYTHONPATH=work)
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "--timeout", "60",
                               *mutation.tests], cwd=work, env=env, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        return True, "the tests hung (killed after 900 s)"
    failed = [line for line in proc.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
    return proc.returncode != 0, failed[0] if failed else proc.stdout.strip().splitlines()[-1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="run the mutations whose names contain any of these words")
    args = parser.parse_args()
    chosen = [m for m in MUTATIONS if not args.only or any(w in m.name for w in args.only)]
    survived = 0
    with tempfile.TemporaryDirectory() as work:
        copy_project(work)
        for mutation in chosen:
            started = time.monotonic()
            caught, detail = run(mutation, work)
            survived += not caught
            verdict = "caught" if caught else "SURVIVED"
            print(f"{verdict:8}  {mutation.name}  ({time.monotonic() - started:.0f} s): {detail}", flush=True)
    print(f"{len(chosen) - survived} of {len(chosen)} mutations caught")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
