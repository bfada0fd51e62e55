"""The ``netnodes`` fixture: two network-namespace nodes per test (see ``netns.py``).

Where namespaces cannot be made (not root, no CAP_SYS_ADMIN) the test is skipped, and the
end of the run says how many were, and why, so that a skip is never silent.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

from .netns import SKIPPED, NetNodes, NetnsUnavailable, net_nodes, skip_unavailable
from .scenario import FIGURES, PEAK_RSS


@pytest.fixture
def netnodes() -> Iterator[NetNodes]:
    """A head node (10.250.0.1) and a worker node (10.250.0.2) in their own namespaces;
    every process left in them is SIGKILLed, and they are deleted, at the test's end."""
    with contextlib.ExitStack() as stack:
        try:
            nodes = stack.enter_context(net_nodes())
        except NetnsUnavailable as exc:
            skip_unavailable(exc)
        yield nodes


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The measured times; how many multi-node tests were skipped for want of
    namespaces, and why."""
    if FIGURES:
        terminalreporter.write_sep("-", "multi-node figures (seconds)")
        for name, values in FIGURES.items():
            shown = ", ".join(f"{value:.2f}" for value in values)
            terminalreporter.write_line(f"{name}: {shown}")
        for name, gib in PEAK_RSS.items():
            terminalreporter.write_line(f"peak RSS of both nodes, {name}: {gib:.2f} GiB")
    if SKIPPED:
        reasons = sorted(set(SKIPPED))
        terminalreporter.write_line(
            f"multinode: {len(SKIPPED)} tests skipped: {'; '.join(reasons)}", yellow=True
        )
