"""What every benchmark here shares: the revision measured, and the processes a run left."""

from __future__ import annotations

import subprocess

import psutil

__all__ = ["leftover_children", "revision"]


def revision() -> str:
    """The commit measured, and whether src/ differed from it."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "src"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" + uncommitted changes in src/" if dirty else "")


def leftover_children() -> list[str]:
    """Processes this run started that are still alive (killed here, and named)."""
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            found.append(f"{child.pid} {' '.join(child.cmdline())}")
            child.kill()
        except psutil.NoSuchProcess:
            pass
    return found
