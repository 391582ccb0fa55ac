"""Shared helpers for the repros: a foreign flock holder in a child process, driven by pipes."""
import fcntl, os, subprocess, sys, threading

HOLDER = r"""
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o666)
for line in sys.stdin:
    cmd = line.strip()
    if cmd == "hold":
        fcntl.flock(fd, fcntl.LOCK_EX)
        print("held", flush=True)
    elif cmd == "release":
        fcntl.flock(fd, fcntl.LOCK_UN)
        print("released", flush=True)
"""


class Foreign:
    """A process that takes and releases an exclusive flock on ``lock_file`` when told (like flock(1))."""

    def __init__(self, lock_file):
        self.p = subprocess.Popen([sys.executable, "-c", HOLDER, lock_file], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)

    def _say(self, cmd, expect):
        self.p.stdin.write(cmd + "\n")
        self.p.stdin.flush()
        got = self.p.stdout.readline().strip()
        assert got == expect, got

    def hold(self):
        self._say("hold", "held")

    def release(self):
        self._say("release", "released")

    def close(self):
        self.p.stdin.close()
        self.p.wait(10)


def lock_free(lock_file):
    fd = os.open(lock_file, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def fds():
    return len(os.listdir("/proc/self/fd"))


def waiter_threads():
    return sum(t.name.startswith("lockstore-waiter") for t in threading.enumerate())
