"""Fuzz targets: hypothesis drives the parsers with arbitrary input.

``FUZZ_EXAMPLES`` sets how many inputs each target gets (default 300: a few seconds,
what CI runs; ``nox -s fuzz -- ...`` or ``FUZZ_EXAMPLES=100000`` for a long run).
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "fuzz",
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("fuzz")
