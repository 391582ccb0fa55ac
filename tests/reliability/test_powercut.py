"""Simulated power loss (root tier): a writer killed at a random moment, then the file system shut down without
flushing its log, on loop-mounted ext4, ext4 -o noauto_da_alloc and XFS images (see ``_powercut.py``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ._harness import CHILD, add, child_env, need_root, need_tool, report

FILE_SYSTEMS = ["ext4", "ext4-noauto_da_alloc", "xfs"]
HARNESS = str(Path(CHILD).with_name("_powercut.py"))


def power_cuts(tmp_path: Path, fs: str, cuts: int, *, seed: int, eatmydata: bool = False) -> dict[str, Any]:
    need_root()
    for tool in ("unshare", "losetup", "mount", "umount", "xfs_io", "truncate",
                 "mkfs.xfs" if fs == "xfs" else "mkfs.ext4"):
        need_tool(tool)
    if fs.split("-")[0] not in Path("/proc/filesystems").read_text().split():
        pytest.skip(f"the kernel does not support {fs}")
    # Its own mount namespace: every mount vanishes with the harness even if it is killed; the loop device is
    # detached by the harness's finally.
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", sys.executable, HARNESS, str(tmp_path),
                           fs, str(cuts), str(seed)],
                          capture_output=True, text=True, timeout=280, env=child_env(eatmydata=eatmydata), check=False)
    if proc.returncode != 0 or not proc.stdout.strip():
        if "unshare failed" in proc.stderr or "Operation not permitted" in proc.stderr:
            pytest.skip(f"cannot make a mount namespace here: {proc.stderr.strip()[-200:]}")
        raise AssertionError(f"power-cut harness failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    if "skip" in result:
        pytest.skip(str(result["skip"]))
    if not eatmydata:
        add(f"power cuts: {fs}", int(result["cuts"]))
        add("processes", int(result["cuts"]))  # one forked writer per cut
        add("transactions checked", int(result["cuts"]))  # one read-back check per cut
    return result


@pytest.mark.root
@pytest.mark.timeout(120)
@pytest.mark.parametrize("fs", FILE_SYSTEMS)
def test_power_cut(tmp_path: Path, fs: str) -> None:
    result = power_cuts(tmp_path, fs, 10, seed=1)
    report(result["violations"])
    assert result["violations"] == []


@pytest.mark.root
@pytest.mark.stress
@pytest.mark.timeout(280)
@pytest.mark.parametrize("fs", FILE_SYSTEMS)
def test_hundreds_of_power_cuts(tmp_path: Path, fs: str) -> None:
    result = power_cuts(tmp_path, fs, 250, seed=2)
    report(result["violations"])
    assert result["violations"] == []


@pytest.mark.root
@pytest.mark.timeout(120)
@pytest.mark.parametrize("fs", FILE_SYSTEMS)
def test_negative_control_power_cut_under_eatmydata(tmp_path: Path, fs: str) -> None:
    """With fsync turned into a no-op the same harness must find lost acknowledged commits."""
    result = power_cuts(tmp_path, fs, 3, seed=3, eatmydata=True)
    report(result["violations"], negative=True)
    assert result["violations"], f"{fs}: 3 power cuts without fsync lost nothing: the harness may have no teeth"
