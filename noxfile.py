"""Every check runs through nox: ``nox`` runs the default set (tests, lint, typecheck).

``nox -s bench`` runs the benchmarks; ``session.posargs`` pass through to the tool.
"""

from __future__ import annotations

import nox

nox.options.sessions = ["tests", "lint", "typecheck"]
nox.options.error_on_missing_interpreters = True

PYPROJECT = nox.project.load_toml("pyproject.toml")


def install(session: nox.Session, *groups: str, editable: bool = False) -> None:
    """Install the package (unless no group asks for it) and the named dependency groups."""
    requirements = [
        req for group in groups for req in nox.project.dependency_groups(PYPROJECT, group)
    ]
    package = ["-e", "."] if editable else ["."]
    session.install(*package, *requirements)


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite, every async test on asyncio and trio."""
    install(session, "test")
    session.run("pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff: lint rules (ASYNC, B, UP, I, ...) and formatting."""
    session.install(*nox.project.dependency_groups(PYPROJECT, "lint"))
    session.run("ruff", "check", *(session.posargs or ["."]))
    session.run("ruff", "format", "--check", *(session.posargs or ["."]))


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict over src, tests and benchmarks."""
    install(session, "typecheck", editable=True)
    session.run("mypy", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks: printed as a table and as JSON (``bench-results/``)."""
    install(session, "test")
    session.run("python", "benchmarks/bench_core.py", *session.posargs)
    session.run("python", "benchmarks/bench_pool.py")
