"""Benchmarks: the figures every benchmark of the run recorded, as one table at the end."""

from __future__ import annotations

import pytest

from tests.bench.figures import RECORDED, table


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not RECORDED:
        return
    terminalreporter.section("benchmark figures of this run (each peer measured beside ours)")
    for line in table(RECORDED):
        terminalreporter.write_line(line)
