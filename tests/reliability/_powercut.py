"""Simulated power loss on a loop-mounted file system image; run as root inside its own mount namespace:

    unshare --mount --propagation private  sys.executable _powercut.py WORKDIR FS CUTS SEED

FS is ext4, ext4-noauto_da_alloc or xfs. Each cut: mount the image, fork a writer running a transaction loop that
acknowledges every committed counter through a pipe, kill it at a random moment, then shut the file system down
WITHOUT flushing its log (``xfs_io -x -c shutdown``, the FS_IOC_SHUTDOWN ioctl; it works on ext4 too) as a power
cut would, unmount, mount again and check: the file decodes, its self-check hash matches, and it holds the last
acknowledged counter or the one after (no acknowledged commit lost). Run under eatmydata (LD_PRELOAD) the same
harness must report violations. Prints one JSON line: {"cuts": N, "violations": [...]} or {"skip": reason}.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lockstore
from reliability._harness import bump, check_value, make_value

SIZES = {"ext4": "64M", "ext4-noauto_da_alloc": "64M", "xfs": "320M"}
PAD = 1024


def sh(*cmd: str) -> str:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=120, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {proc.stderr.strip()}")
    return proc.stdout


def writer(path: str, ack_fd: int) -> None:
    """The forked writer: transactions forever, each acknowledged after it returned."""
    try:
        store = lockstore.open(path, default=make_value(0, PAD))
        while True:
            with store.transaction() as s:
                s.value = bump(s.value, PAD)
                n = s.value["n"]
            os.write(ack_fd, f"{n}\n".encode())
    finally:
        os._exit(3)


def own_mount(mnt: Path, loop: str) -> None:
    """Refuse to shut down anything but our own loop mount."""
    st, parent = os.stat(mnt), os.stat(mnt.parent)
    if st.st_dev == parent.st_dev or st.st_dev != os.stat(loop).st_rdev:
        raise RuntimeError(f"{mnt} is not the mount of {loop}: refusing to shut it down")


def main(workdir: Path, fs: str, cuts: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    image, mnt = workdir / f"{fs}.img", workdir / f"{fs}.mnt"
    mnt.mkdir()
    sh("truncate", "-s", SIZES[fs], str(image))
    if fs == "xfs":
        sh("mkfs.xfs", "-q", "-f", str(image))
    else:
        sh("mkfs.ext4", "-q", "-F", str(image))
    options = ["-o", "noauto_da_alloc"] if fs == "ext4-noauto_da_alloc" else []
    try:
        loop = sh("losetup", "--find", "--show", str(image)).strip()
    except RuntimeError as exc:
        return {"skip": f"no loop device: {exc}"}
    data = str(mnt / "counter.json")
    acked, violations, done = 0, [], 0
    try:
        for i in range(cuts):
            sh("mount", *options, loop, str(mnt))
            own_mount(mnt, loop)
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(r)
                writer(data, w)
            os.close(w)
            reader = os.fdopen(r, "rb", buffering=0)
            line = b""
            for _ in range(rng.randint(1, 4)):
                line = reader.readline()
                if not line:
                    break
                acked = int(line)
            # Randomness, not a guess at speed: land somewhere inside the next transaction or two.
            time.sleep(rng.uniform(0, 0.004))
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            for rest in reader.read().split():
                acked = int(rest)
            reader.close()
            own_mount(mnt, loop)
            sh("xfs_io", "-x", "-c", "shutdown", str(mnt))
            sh("umount", str(mnt))
            sh("mount", *options, loop, str(mnt))
            own_mount(mnt, loop)
            try:
                n = check_value(lockstore.read(data))
                if n not in (acked, acked + 1):
                    violations.append(f"cut {i}: file holds {n}, last acknowledged {acked}")
                acked = n
            except Exception as exc:
                violations.append(f"cut {i}: {exc!r} (last acknowledged {acked})")
                for leftover in (data, data + ".lock"):
                    if os.path.lexists(leftover):
                        os.unlink(leftover)
                store = lockstore.open(data, default=make_value(acked, PAD), lock=False)
                store.commit()
                store.close()
            sh("umount", str(mnt))
            done += 1
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)
        subprocess.run(["losetup", "-d", loop], capture_output=True, check=False)
    return {"cuts": done, "violations": violations, "last": acked}


if __name__ == "__main__":
    result = main(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    print(json.dumps(result), flush=True)
