"""Fixtures of the reliability suite and its end-of-run scorecard."""

from __future__ import annotations

import pytest

from ._harness import ROWS, SCORE


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, exitstatus: int, config: pytest.Config) -> None:
    """Print the scorecard when any reliability test ran (counts from harness children are booked by the tests)."""
    if not SCORE:
        return
    tr = terminalreporter
    tr.section("lockstore reliability scorecard")
    width = max(len(r) for r in ROWS)
    for row in ROWS:
        if row == "processes":
            continue
        if row == "transactions checked":
            pxt = f"{SCORE.get('processes', 0)} x {SCORE.get(row, 0)}"
            tr.write_line(f"{'processes x transactions checked':<{width}}  {pxt:>12}")
            continue
        tr.write_line(f"{row:<{width}}  {SCORE.get(row, 0):>12}")
    extra = sorted(set(SCORE) - set(ROWS))
    for row in extra:
        tr.write_line(f"{row:<{width}}  {SCORE[row]:>12}")
    if SCORE.get("violations", 0):
        tr.write_line("VIOLATIONS FOUND: see the failed tests above", red=True, bold=True)
