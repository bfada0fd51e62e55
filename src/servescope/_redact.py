"""Keeping secrets out of what servescope prints: one rule for what looks secret, one
``Redactor`` that blanks known secret values out of text.

A config knows its secrets (an API key, an ``env`` entry named like ``HF_TOKEN``, a
``--hf-token`` flag in ``args``); ``ServerConfig.secrets()`` lists them. Every place
where foreign or configured text goes into a message, a log line or an error — a
server's log, a response body quoted in an error, a command line — passes it through
the scope's ``Redactor`` first.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["MASK", "Redactor", "looks_secret"]

MASK = "**********"
#: Names of settings, variables and flags whose values are secrets.
_SECRET_NAME = re.compile(r"(?i)token|secret|passw(or)?d|api[-_]?key|private[-_]?key|credential")
#: Shorter values are not searched for: blanking "1" everywhere would wreck the text.
MIN_SECRET_LENGTH = 4


def looks_secret(name: str) -> bool:
    """Whether a setting, variable or flag called ``name`` holds a secret
    (``api_key``, ``HF_TOKEN``, ``--hf-token``, ``AWS_SECRET_ACCESS_KEY``, ...)."""
    return bool(_SECRET_NAME.search(name))


class Redactor:
    """Replaces each of a set of secret values in a text with ``MASK``."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        unique = {secret for secret in secrets if len(secret) >= MIN_SECRET_LENGTH}
        # Longest first: a secret that contains another is blanked whole.
        self._secrets = sorted(unique, key=len, reverse=True)

    def __bool__(self) -> bool:
        return bool(self._secrets)

    def __call__(self, text: str) -> str:
        """``text`` with every known secret replaced by ``MASK``."""
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        return text
