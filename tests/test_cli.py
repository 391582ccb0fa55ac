"""The ``lockstore`` command line, driven as a real console script in subprocesses (plus ``cli.main`` in-process for
the KEY and VALUE rules, which need no process of their own)."""

from __future__ import annotations

import contextlib
import json
import os
import pty
import re
import select
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import lockstore
from lockstore import cli

pytestmark = pytest.mark.timeout(180)

#: Seconds a test waits for a child to reach a point; generous because the machine may be loaded, never a pace.
DEADLINE = 60.0


def _console_script() -> list[str]:
    script = os.path.join(os.path.dirname(sys.executable), "lockstore")
    return [script] if os.path.exists(script) else [sys.executable, "-m", "lockstore"]


LOCKSTORE = _console_script()


def run(*args: str, cmd: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*(cmd or LOCKSTORE), *args], capture_output=True, text=True, timeout=DEADLINE, check=False)


def ok(*args: str) -> str:
    proc = run(*args)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def read_chunk(fd: int, deadline: float) -> str:
    ready, _, _ = select.select([fd], [], [], deadline)
    assert ready, f"no output within {deadline} s"
    return os.read(fd, 65536).decode(errors="replace")


_HOLD = """
import sys, lockstore
store = lockstore.open(sys.argv[1], default={}, durable=False)
with store.transaction(label=sys.argv[2]) as s:
    s.value["held"] = s.value.get("held", 0) + 1
    print("ready", flush=True)
    sys.stdin.readline()
"""


@contextlib.contextmanager
def holding(path: Path, label: str = "cli-test-holder") -> Iterator[subprocess.Popen[str]]:
    """A child process inside a transaction on ``path`` until the block ends (synchronised through its pipes)."""
    with subprocess.Popen([sys.executable, "-c", _HOLD, str(path), label], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as child:
        try:
            assert child.stdout is not None
            ready, _, _ = select.select([child.stdout], [], [], DEADLINE)
            assert ready and child.stdout.readline().strip() == "ready", child.stderr.read() if child.stderr else ""
            yield child
            _, err = child.communicate("go\n", timeout=DEADLINE)
            assert child.returncode == 0, err
        finally:
            if child.poll() is None:
                child.kill()
                child.communicate(timeout=DEADLINE)


def main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


# --------------------------------------------------------------------------------------------- no lost update
def test_parallel_shell_loops_of_incr_are_exact(tmp_path: Path) -> None:
    f = tmp_path / "counter.json"
    loops, n = 4, 25
    script = 'for i in $(seq "$1"); do "${@:3}" incr "$2" runs || exit 1; done'
    procs = [subprocess.Popen(["bash", "-c", script, "loop", str(n), str(f), *LOCKSTORE], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(loops)]
    printed: list[int] = []
    for p in procs:
        out, err = p.communicate(timeout=DEADLINE * 3)
        assert p.returncode == 0, err
        printed += [int(line) for line in out.split()]
    assert lockstore.read(f) == {"runs": loops * n}
    # Each incr printed the value it wrote: every count from 1 to 100 exactly once.
    assert sorted(printed) == list(range(1, loops * n + 1))


def test_negative_control_get_then_set_loses_an_update(tmp_path: Path) -> None:
    """Read-then-write from the shell is not a transaction: two workers that both read before either writes lose one
    increment (interleaved deterministically here), which is the loss ``incr`` prevents."""
    f = tmp_path / "counter.json"
    ok("set", str(f), "runs", "0")
    a = int(ok("get", str(f), "runs"))
    b = int(ok("get", str(f), "runs"))
    ok("set", str(f), "runs", str(a + 1))
    ok("set", str(f), "runs", str(b + 1))
    assert lockstore.read(f) == {"runs": 1}  # two increments, one survived


# --------------------------------------------------------------------------------------------- commands
def test_commands_end_to_end(tmp_path: Path) -> None:
    f = str(tmp_path / "state.json")
    assert ok("get", f) == "{}\n"  # a missing file reads as {}
    assert ok("incr", f, "stats.runs") == "1\n"
    assert ok("incr", f, "stats.runs", "--by", "5") == "6\n"
    assert ok("incr", f, "stats.load", "--by", "-0.5") == "-0.5\n"
    ok("set", f, "jobs", '[{"state": "new"}, {"state": "new"}]')
    ok("set", f, "jobs.1.state", "done")
    ok("append", f, "jobs", '{"state": "queued"}')
    ok("append", f, "log.lines", "started")
    ok("append", f, "log.lines", "42")
    ok("delete", f, "jobs.0")
    assert json.loads(ok("get", f)) == {
        "stats": {"runs": 6, "load": -0.5},
        "jobs": [{"state": "done"}, {"state": "queued"}],
        "log": {"lines": ["started", 42]},
    }
    assert ok("get", f, "jobs.-1.state") == '"queued"\n'
    assert ok("get", f, "jobs.-1.state", "--raw") == "queued\n"
    assert json.loads(ok("get", f, "log")) == {"lines": ["started", 42]}


@pytest.mark.parametrize(
    ("text", "value"),
    [("42", 42), ("-3", -3), ("1.5", 1.5), ("true", True), ("null", None), ('"42"', "42"), ("[1, 2]", [1, 2]),
     ('{"a": 1}', {"a": 1}), ("hello world", "hello world"), ("NaN", "NaN"), ("Infinity", "Infinity"),
     ("{bad", "{bad"), ("", ""), ("ünïcode", "ünïcode")],
)
def test_value_is_json_else_a_string(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str,
                                     value: object) -> None:
    f = str(tmp_path / "v.json")
    assert main(capsys, "set", f, "k", text)[0] == 0
    assert lockstore.read(f) == {"k": value}


def test_values_starting_with_a_dash(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = str(tmp_path / "v.json")
    assert main(capsys, "set", f, "n", "-5")[0] == 0
    assert main(capsys, "set", f, "s", "--", "-x")[0] == 0
    assert main(capsys, "append", f, "l", "--", "--flag")[0] == 0
    assert lockstore.read(f) == {"n": -5, "s": "-x", "l": ["--flag"]}


def test_key_paths_create_dicts_and_index_lists(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = str(tmp_path / "k.json")
    assert main(capsys, "set", f, "a.b.c", "1")[0] == 0
    assert main(capsys, "append", f, "a.list", "x")[0] == 0
    assert main(capsys, "set", f, "a.list.0", '{"deep": []}')[0] == 0
    assert main(capsys, "append", f, "a.list.0.deep", "y")[0] == 0
    assert main(capsys, "incr", f, "a.list.-1.n")[0] == 0
    assert main(capsys, "set", f, "a.0", "dict key, not an index")[0] == 0
    assert lockstore.read(f) == {"a": {"b": {"c": 1}, "list": [{"deep": ["y"], "n": 1}], "0": "dict key, not an index"}}
    assert main(capsys, "get", f, "a.list.0.deep.0") == (0, '"y"\n', "")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("get", "missing"), "missing: no such key"),
        (("get", "a.nope"), "a.nope: no such key"),
        (("get", "s.x"), "s.x: cannot look inside a str"),
        (("get", "l.5"), "l.5: list index out of range"),
        (("get", "l.x"), "l.x: 'x' is not a list index"),
        (("delete", "missing"), "missing: no such key"),
        (("delete", "l.9"), "l.9: list index out of range"),
        (("incr", "s"), "s: cannot increment a str"),
        (("incr", "t"), "t: cannot increment a bool"),
        (("incr", "s.x"), "s.x: cannot look inside a str"),
        (("append", "s", "x"), "s: cannot append to a str"),
        (("set", "l.-3", "1"), "l.-3: list index out of range"),
        (("set", "l.x.y", "1"), "l.x: 'x' is not a list index"),
    ],
)
def test_key_errors_exit_3_and_write_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                             args: tuple[str, ...], message: str) -> None:
    f = tmp_path / "k.json"
    f.write_text('{"a": {}, "s": "text", "l": [1, 2], "t": true}')
    before = f.read_bytes(), f.stat().st_ino
    code, out, err = main(capsys, args[0], str(f), *args[1:])
    assert (code, out) == (cli.EXIT_KEY, "")
    assert err.startswith(f"lockstore: key error: {message}")
    assert (f.read_bytes(), f.stat().st_ino) == before


def test_delete_missing_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = str(tmp_path / "d.json")
    assert main(capsys, "delete", f, "a.b", "--missing-ok")[0] == 0
    assert lockstore.read(f, default={}) == {}  # nothing to delete: nothing changed
    assert main(capsys, "set", f, "a.b", "1")[0] == 0
    assert main(capsys, "delete", f, "a.c", "--missing-ok")[0] == 0
    assert main(capsys, "delete", f, "a.x.y", "--missing-ok")[0] == 0
    assert main(capsys, "delete", f, "a.b.c", "--missing-ok")[0] == cli.EXIT_KEY  # a wrong type is not "missing"
    assert lockstore.read(f) == {"a": {"b": 1}}


def test_pickle_format(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = str(tmp_path / "p.pickle")
    assert main(capsys, "incr", f, "n", "--format", "pickle", "--no-durable") == (0, "1\n", "")
    assert lockstore.read(f, format="pickle") == {"n": 1}
    assert main(capsys, "get", f, "--format", "pickle") == (0, '{"n": 1}\n', "")


# --------------------------------------------------------------------------------------------- exit codes
def test_corrupt_file_exits_4_and_is_left_untouched(tmp_path: Path) -> None:
    f = tmp_path / "bad.json"
    f.write_bytes(b'{"n": 1')
    for args in (("incr", str(f), "n"), ("get", str(f)), ("set", str(f), "n", "2")):
        proc = run(*args)
        assert proc.returncode == cli.EXIT_DATA == 4
        assert "bad.json: cannot be decoded as json" in proc.stderr
    assert f.read_bytes() == b'{"n": 1'


def test_io_error_exits_5(tmp_path: Path) -> None:
    proc = run("incr", str(tmp_path / "no-such-dir" / "c.json"), "n")
    assert proc.returncode == cli.EXIT_IO == 5
    assert "No such file or directory" in proc.stderr and "no-such-dir" in proc.stderr


@pytest.mark.parametrize(
    "args",
    [(), ("frobnicate", "f"), ("incr",), ("incr", "f"), ("get", "f", "a..b"), ("incr", "f", "n", "--by", "x"),
     ("incr", "f", "n", "-E", "300"), ("set", "f", "k"), ("get", "f", "--format", "yaml")],
)
def test_usage_errors_exit_2(tmp_path: Path, args: tuple[str, ...]) -> None:
    proc = subprocess.run([*LOCKSTORE, *args], capture_output=True, text=True, timeout=DEADLINE, cwd=tmp_path,
                          check=False)
    assert proc.returncode == cli.EXIT_USAGE == 2
    assert "usage: lockstore" in proc.stderr
    assert not (tmp_path / "f").exists()


def test_lock_timeout_names_the_holder_and_uses_the_conflict_exit_code(tmp_path: Path) -> None:
    f = tmp_path / "c.json"
    with holding(f, label="nightly-rollup") as child:
        proc = run("incr", "-w", "0.2", "-E", "7", str(f), "n")
        assert proc.returncode == 7
        assert proc.stdout == ""
        err = proc.stderr
        assert re.match(r"lockstore: timed out after \d+\.\d s waiting for lock on ", err)
        assert f"by pid {child.pid} on host" in err and "(alive)" in err and "[label: nightly-rollup]" in err
        assert "deleting the lock file does not help" in err
        assert err.count("\n") == 1  # one line, though the holder's command line (python -c ...) holds newlines

        busy = run("incr", "-n", str(f), "n")  # -n: one try, default conflict code 1
        assert busy.returncode == cli.EXIT_CONFLICT == 1
        assert f"by pid {child.pid}" in busy.stderr
    assert lockstore.read(f) == {"held": 1}  # neither CLI call wrote
    assert ok("incr", str(f), "n") == "1\n"  # the lock is free again


def test_holder_command(tmp_path: Path) -> None:
    f = tmp_path / "c.json"
    with holding(f, label="rollup") as child:
        text = ok("holder", str(f))
        assert f"pid:      {child.pid}" in text and "alive:    yes" in text and "label:    rollup" in text
        data = json.loads(ok("holder", str(f), "--json"))
        assert data["held"] is True and data["lock_file"] == f"{f}.lock"
        assert data["holder"]["pid"] == child.pid and data["holder"]["alive"] is True
        assert data["holder"]["label"] == "rollup" and data["holder"]["held_for"] >= 0
    assert "free" in ok("holder", str(f))
    assert json.loads(ok("holder", str(f), "--json"))["held"] is False
    f.write_bytes(b"not json at all")  # the holder command never decodes the data file
    assert json.loads(ok("holder", str(f), "--json"))["holder"] is None


def test_waiting_on_a_terminal_is_announced_with_the_holder(tmp_path: Path) -> None:
    f = tmp_path / "c.json"
    master, slave = pty.openpty()
    try:
        with holding(f, label="slow-job") as child:
            waiter = subprocess.Popen([*LOCKSTORE, "incr", "-w", str(DEADLINE), str(f), "n"],
                                      stdout=subprocess.PIPE, stderr=slave, text=True)
            seen = ""
            while "\n" not in seen:
                seen += read_chunk(master, DEADLINE)
            first = seen.split("\n")[0]  # one line, though the holder's command line holds newlines
            assert first.startswith("lockstore: waiting (up to ")
            assert f"by pid {child.pid}" in first and "[label: slow-job]" in first
            assert waiter.poll() is None  # still waiting, for the holder it named
        out, _ = waiter.communicate(timeout=DEADLINE)
        rest = read_chunk(master, 0) if select.select([master], [], [], 0)[0] else ""
        assert (waiter.returncode, out) == (0, "1\n"), rest
    finally:
        os.close(slave)
        os.close(master)


def test_waiting_is_not_announced_without_a_terminal(tmp_path: Path) -> None:
    f = tmp_path / "c.json"
    with holding(f):
        proc = run("incr", "-w", "1.2", str(f), "n")
    assert proc.returncode == 1
    assert re.match(r"lockstore: timed out after \d+\.\d s waiting for lock on ", proc.stderr)
    assert "waiting (" not in proc.stderr


# --------------------------------------------------------------------------------------------- help, start-up
@pytest.mark.parametrize("command", ["get", "set", "incr", "append", "delete", "holder", "demo", None])
def test_help_for_every_command(command: str | None) -> None:
    proc = run(*([command] if command else []), "--help")
    assert proc.returncode == 0 and proc.stderr == ""
    assert proc.stdout.startswith("usage: lockstore" + (f" {command}" if command else ""))
    assert "Exit codes:" in proc.stdout and "130  interrupted" in proc.stdout


def test_exit_code_table_matches_the_docstring() -> None:
    doc = cli.__doc__ or ""
    for code in (cli.EXIT_OK, cli.EXIT_CONFLICT, cli.EXIT_USAGE, cli.EXIT_KEY, cli.EXIT_DATA, cli.EXIT_IO,
                 cli.EXIT_INTERRUPTED):
        assert f"\n  {code:<4} " in doc
    assert len({cli.EXIT_CONFLICT, cli.EXIT_USAGE, cli.EXIT_KEY, cli.EXIT_DATA, cli.EXIT_IO}) == 5


def test_python_dash_m_and_version() -> None:
    proc = run("--version", cmd=[sys.executable, "-m", "lockstore"])
    assert (proc.returncode, proc.stdout) == (0, f"lockstore {lockstore.__version__}\n")


def test_incr_imports_neither_psutil_nor_asyncio(tmp_path: Path) -> None:
    code = (
        "import sys, lockstore.cli\n"
        "assert lockstore.cli.main(['incr', sys.argv[1], 'n']) == 0\n"
        "print(sorted(m for m in ('psutil', 'asyncio') if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "c.json")], capture_output=True, text=True,
                          timeout=DEADLINE, check=True)
    assert proc.stdout.split("\n")[-2] == "[]"


def test_demo_runs(tmp_path: Path) -> None:
    proc = run("demo", "--workers", "2", "--increments", "20")
    assert proc.returncode == 0, proc.stderr
    assert "with store.transaction(): n =    40  (exact" in proc.stdout
