"""Several "hosts" on one machine for cross-host tests (root only).

``with hosts(3) as hs:`` builds, for this one ``with`` block:

* a bridge namespace ``lsbr-<tag>`` holding a Linux bridge ``br0`` (the root namespace is left alone: it gets no
  interface, address or route, so nothing from these hosts can leave the machine);
* per host a network namespace ``ls<i>-<tag>`` with ``lo`` and ``eth0`` (address ``10.A.B.<10+i>/24``, one random
  /24 per ``with`` block), linked by a veth pair to the bridge. There is no default route: a host reaches the other
  hosts and its own loopback, nothing else;
* per host a host name ``lshost<i>-<tag>``: every command run through ``Host.popen``/``Host.run``/``Host.prefix``
  runs in a new UTS namespace with that name, so ``os.uname().nodename`` (and ``socket.gethostname()``) differ
  per host. The file system, users and pids are shared with the test process.

``Host.link_down()`` takes the bridge side of the host's veth down: a cable pull. The host keeps its address and
routes, and packets to or from it are silently lost (clients see time-outs or EHOSTUNREACH, not a refusal), until
``link_up()``. Existing TCP connections survive a short partition.

Servers from ``_servers.py`` run on a host with ``prefix=host.prefix, bind=[host.addr]``; the test process still
reaches them through their Unix sockets, the other hosts at ``host.addr``.

Everything is removed in ``finally``: every process still running in one of the namespaces is SIGKILLed (found by
its ``/proc/PID/ns/net``), then the namespaces are deleted, which deletes the veths and the bridge with them.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

__all__ = ["Host", "hosts", "why_no_hosts"]

_NETNS_DIR = Path("/run/netns")
_HOSTNAME_SCRIPT = 'hostname "$0" && exec "$@"'


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and res.returncode:
        raise RuntimeError(f"ip {' '.join(args)} failed ({res.returncode}): {res.stderr.strip()}")
    return res


def why_no_hosts() -> str | None:
    """None when ``hosts()`` can work here (root, ip, unshare, hostname), else the reason."""
    if os.geteuid() != 0:
        return "needs root: builds network namespaces, veths and a bridge (ip netns)"
    for tool in ("ip", "unshare", "hostname"):
        if shutil.which(tool) is None:
            return f"{tool} not found (apt-get install iproute2 util-linux hostname)"
    return None


@dataclass
class Host:
    """One namespace "host". ``name``: its host name; ``addr``: its IPv4 address; ``netns``: the namespace."""

    index: int
    name: str
    addr: str
    netns: str
    _bridge_ns: str
    _bridge_port: str
    _procs: list[subprocess.Popen[Any]] = field(default_factory=list, repr=False)

    @property
    def prefix(self) -> list[str]:
        """argv prefix that runs a command on this host (its network namespace, its host name); the command
        execs in place, so the pid of a ``Popen`` of ``[*prefix, *argv]`` is the command's own."""
        return ["ip", "netns", "exec", self.netns, "unshare", "--uts", "sh", "-c", _HOSTNAME_SCRIPT, self.name]

    def popen(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """``subprocess.Popen`` of ``argv`` on this host (killed by ``hosts()`` at the end if still running)."""
        kw.setdefault("stdin", subprocess.DEVNULL)
        proc: subprocess.Popen[Any] = subprocess.Popen([*self.prefix, *argv], **kw)
        self._procs.append(proc)
        return proc

    def run(self, argv: Sequence[str], *, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` on this host to completion: its exit code, stdout and stderr (text)."""
        proc = self.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def link_down(self) -> None:
        """Partition this host: its link to the bridge goes down (packets lost both ways)."""
        _ip("-n", self._bridge_ns, "link", "set", self._bridge_port, "down")

    def link_up(self) -> None:
        """Heal the partition (the bridge forwards at once: STP is off)."""
        _ip("-n", self._bridge_ns, "link", "set", self._bridge_port, "up")


def _netns_inode(name: str) -> tuple[int, int] | None:
    try:
        st = (_NETNS_DIR / name).stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _kill_in_namespaces(names: Sequence[str], timeout: float = 10.0) -> None:
    """SIGKILL every process whose network namespace is one of ``names`` and wait until they are gone."""
    wanted = {ino for n in names if (ino := _netns_inode(n)) is not None}
    if not wanted:
        return
    deadline = time.monotonic() + timeout
    while True:
        victims = []
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):  # gone, or a zombie (its ns links are unreadable)
                st = os.stat(f"/proc/{entry.name}/ns/net")
                if (st.st_dev, st.st_ino) in wanted:
                    victims.append(int(entry.name))
        if not victims:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes {victims} in namespaces {list(names)} survived SIGKILL")
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.02)


@contextlib.contextmanager
def hosts(n: int) -> Iterator[list[Host]]:
    """``n`` hosts on one bridge (see the module doc); skips the test when this machine cannot build them."""
    if reason := why_no_hosts():
        pytest.skip(reason)
    if not 1 <= n <= 200:
        raise ValueError("1 to 200 hosts")
    tag = secrets.token_hex(3)
    net = f"10.{secrets.randbelow(190) + 64}.{secrets.randbelow(256)}"
    bridge_ns = f"lsbr-{tag}"
    created: list[str] = []
    made: list[Host] = []
    try:
        res = _ip("netns", "add", bridge_ns, check=False)
        if res.returncode:
            pytest.skip(f"ip netns add does not work here: {res.stderr.strip()}")
        created.append(bridge_ns)
        _ip("-n", bridge_ns, "link", "add", "br0", "type", "bridge", "stp_state", "0", "forward_delay", "0")
        _ip("-n", bridge_ns, "link", "set", "br0", "up")
        for i in range(n):
            host = Host(i, f"lshost{i}-{tag}", f"{net}.{10 + i}", f"ls{i}-{tag}", bridge_ns, f"p{i}")
            _ip("netns", "add", host.netns)
            created.append(host.netns)
            _ip("-n", bridge_ns, "link", "add", host._bridge_port, "type", "veth", "peer", "name", "eth0", "netns",
                host.netns)  # fmt: skip
            _ip("-n", bridge_ns, "link", "set", host._bridge_port, "master", "br0", "up")
            _ip("-n", host.netns, "addr", "add", f"{host.addr}/24", "dev", "eth0")
            _ip("-n", host.netns, "link", "set", "eth0", "up")
            _ip("-n", host.netns, "link", "set", "lo", "up")
            made.append(host)
        yield made
    finally:
        try:
            for host in made:
                for proc in host._procs:
                    if proc.poll() is None:
                        proc.kill()
            _kill_in_namespaces(created)
            for host in made:
                for proc in host._procs:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(10)
        finally:
            for name in reversed(created):
                _ip("netns", "del", name, check=False)
