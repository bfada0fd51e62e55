"""tests/datatrove: each module skips where datatrove (the ``datatrove`` extra) cannot be
imported — unless ``SERVESCOPE_REQUIRE_DATATROVE`` is set (its nox session), where that
is an error instead of a silent skip."""

from __future__ import annotations

import os

if os.environ.get("SERVESCOPE_REQUIRE_DATATROVE"):
    try:
        import servescope.integrations.datatrove  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(
            "SERVESCOPE_REQUIRE_DATATROVE is set but the datatrove drop-in cannot be "
            f"imported: {exc}"
        ) from exc
