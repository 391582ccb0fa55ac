"""Statistics, the machine description, tables (terminal and markdown) and the throughput plot."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from importlib import metadata


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def quantile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def spread(xs: list[float]) -> float:
    """(max - min) / median, in percent: how noisy the repeats were."""
    if len(xs) < 2:
        return 0.0
    m = median(xs)
    return 100.0 * (max(xs) - min(xs)) / m if m else float("nan")


def paired_ratio(a: list[float], b: list[float]) -> float:
    """Median over repeats of a[r] / b[r]: both measured in the same round, so slow drifts cancel."""
    return median([x / y for x, y in zip(a, b, strict=False) if y])


def fmt_rate(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def fmt_time(seconds: float) -> str:
    if seconds != seconds:
        return "n/a"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} us"


@dataclass
class Section:
    title: str
    header: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def text(self) -> str:
        widths = [max(len(str(r[i])) for r in [self.header, *self.rows]) for i in range(len(self.header))]
        lines = [f"\n== {self.title} =="]
        lines.append("  ".join(h.ljust(w) for h, w in zip(self.header, widths, strict=True)))
        lines.append("  ".join("-" * w for w in widths))
        for row in self.rows:
            lines.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def markdown(self) -> str:
        lines = [f"### {self.title}", "", "| " + " | ".join(self.header) + " |"]
        lines.append("|" + "|".join(" --- " for _ in self.header) + "|")
        for row in self.rows:
            lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |")
        if self.notes:
            lines.append("")
            lines += [f"- {n}" for n in self.notes]
        return "\n".join(lines) + "\n"


@dataclass
class Target:
    what: str
    target: str
    measured: str
    met: bool | None  # None: information only

    def row(self) -> list[str]:
        return [self.what, self.target, self.measured, {True: "met", False: "NOT MET", None: "-"}[self.met]]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _filesystem(path: str) -> str:
    """The file system type and mount options of the mount holding ``path`` (longest mount point prefix)."""
    real = os.path.realpath(path)
    best = ("", "unknown", "")
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                mnt = parts[1].replace("\\040", " ")
                if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best[0]):
                    best = (mnt, parts[2], f"{parts[0]}, {parts[3]}")
    except OSError:
        pass
    return f"{best[1]} (mounted on {best[0]}: {best[2]})"


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine(bench_dir: str) -> list[tuple[str, str]]:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=here).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "lockstore"], capture_output=True, text=True,
                               cwd=os.path.dirname(here)).stdout.strip()
        git += " (lockstore/ has uncommitted changes)" if dirty else ""
    except OSError:
        git = ""
    try:
        import lockstore

        where = os.path.dirname(lockstore.__file__)
    except ImportError:
        where = "not importable"
    return [
        ("CPU", _cpu_model()),
        ("cores", str(os.cpu_count())),
        ("kernel", f"{platform.system()} {platform.release()}"),
        ("file system of the bench dir", _filesystem(bench_dir)),
        ("bench dir", bench_dir),
        ("python", sys.version.split()[0]),
        ("sqlite", __import__("sqlite3").sqlite_version),
        ("versions", ", ".join(f"{d} {_version(d)}" for d in
                               ("lockstore", "filelock", "atomicwrites", "atomic_store", "diskcache", "psycopg",
                                "redis"))),
        ("lockstore commit", git or "unknown"),
        ("lockstore under test", where),
        ("load average at start", " ".join(f"{x:.2f}" for x in load)),
    ]


def plot(series: dict[str, tuple[list[int], list[float], bool]], out: str, title: str) -> str | None:
    """Throughput against processes, one line per competitor (dashed: loses updates); None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(11, 5.5), dpi=100)
    colors = plt.get_cmap("tab20")  # a listed colormap: an int picks one of its 20 colours
    for i, (label, (xs, ys, correct)) in enumerate(series.items()):
        ours = label.startswith("lockstore")
        ax.plot(xs, ys, marker="o", linestyle="-" if correct else "--", linewidth=3 if ours else 1.5,
                color="black" if label.startswith("floor") and "no fsync" not in label else colors((2 * i) % 20),
                label=label + ("" if correct else " (LOSES UPDATES)"))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(sorted({x for xs, _, _ in series.values() for x in xs}))
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("processes")
    ax.set_ylabel("increments per second (all processes, median)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
