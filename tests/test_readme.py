"""The README's examples run as written, and its quickstart demo reports an exact count."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_readme_has_examples() -> None:
    assert len(BLOCKS) >= 4


def _on_test_servers(source: str, request: pytest.FixtureRequest) -> str:
    """An example that names a PostgreSQL or Redis server runs against the test session's own servers: its URLs'
    server parts are replaced (the keys after ``#`` are kept; Redis keys get this test's prefix)."""
    if "postgresql://" in source:
        url = request.getfixturevalue("pg_url")
        source = re.sub(r"postgresql://[^#\"]*", url.partition("#")[0], source)
    if "redis://" in source:
        url, prefix = request.getfixturevalue("redis_url"), request.getfixturevalue("redis_key")
        source = re.sub(r"redis://[^#\"]*#", f"{url.partition('#')[0]}#{prefix}", source)
    return source


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                             request: pytest.FixtureRequest) -> None:
    monkeypatch.chdir(tmp_path)
    code = compile(_on_test_servers(BLOCKS[index], request), f"README.md example {index + 1}", "exec")
    exec(code, {"__name__": f"readme_example_{index}"})  # the README's own examples


def test_quickstart_demo_is_exact_and_shows_lost_updates() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "lockstore", "demo", "--workers", "4", "--increments", "50"],
        capture_output=True, text=True, timeout=240, check=True,
    ).stdout
    assert "n =   200  (exact" in out
    lost = re.search(r"commit\(\):\s+n =\s+(\d+)", out)
    assert lost is not None and int(lost.group(1)) <= 200


def test_quickstart_commands_are_first() -> None:
    text = README.read_text(encoding="utf-8")
    commands = re.findall(r"```sh\n(.*?)```", text, flags=re.S)
    assert "lockstore demo" in commands[0]
    assert "tox" in commands[1]
    assert "tox" in Path(README.parent, ".ci", "run").read_text(encoding="utf-8")
