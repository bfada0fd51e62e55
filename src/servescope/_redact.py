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
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = [
    "MASK",
    "Redactor",
    "argv_secrets",
    "looks_secret",
    "masked",
    "masked_argv",
    "secret_values",
    "without_userinfo",
]

MASK = "**********"
#: Names of settings, variables and flags whose values are secrets. ``tokens`` and
#: ``tokenizer`` are not: ``max_tokens``, ``--tokenizer``, ``TOKENIZERS_PARALLELISM``.
_SECRET_NAME = re.compile(
    r"(?i)token(?!s|i[sz])|secret|passw(or)?d|api[-_]?key|private[-_]?key|credential"
)
#: The ``user:password@`` of a URL (anchored on ``://``: linear on any text).
_USERINFO = re.compile(r"://([^/?#\s]*)@")
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

    def add(self, secrets: Iterable[str]) -> None:
        """Blank these too from now on (a replica that joined a pool with its own key)."""
        unique = {*self._secrets, *(s for s in secrets if len(s) >= MIN_SECRET_LENGTH)}
        self._secrets = sorted(unique, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        """``text`` with every known secret replaced by ``MASK``."""
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        return text


def without_userinfo(text: str) -> str:
    """``text`` with the ``user:password@`` of every URL in it masked."""
    return _USERINFO.sub(f"://{MASK}@", text)


def masked(value: Any, *, secret: bool = False) -> Any:
    """A copy of ``value`` (mappings and lists nested in each other) with every value
    under a secret-looking key replaced by ``MASK``, and the passwords of URLs masked:
    what a repr or a dump may show."""
    if isinstance(value, Mapping):
        return {key: masked(item, secret=secret or _secret_key(key)) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(masked(item, secret=secret) for item in value)
    if secret and _text(value):
        return MASK
    return without_userinfo(value) if isinstance(value, str) else value


def secret_values(value: Any) -> list[str]:
    """Every secret in ``value`` (mappings and lists nested in each other, cycles
    included), as text: values under a secret-looking key, values of secret-looking flags
    in lists (``["--hf-token", X]``), passwords of URLs (``http://user:X@proxy``)."""
    found: list[str] = []
    seen: set[int] = set()
    stack: list[tuple[Any, bool]] = [(value, False)]
    while stack:
        item, secret = stack.pop()
        if isinstance(item, Mapping | list | tuple):
            if id(item) in seen:
                continue
            seen.add(id(item))
            if isinstance(item, Mapping):
                stack += [(v, secret or _secret_key(k)) for k, v in item.items()]
            else:
                if not secret:
                    found += argv_secrets([_text(arg) for arg in item])  # non-text: ""
                stack += [(v, secret) for v in item]
        elif secret and (text := _text(item)):
            found.append(text)
        elif isinstance(item, str) and "@" in item:
            found += _url_passwords(item)
    return found


def _url_passwords(text: str) -> list[str]:
    passwords = (match.group(1).partition(":")[2] for match in _USERINFO.finditer(text))
    return [password for password in passwords if password]


def masked_argv(argv: Sequence[str]) -> list[str]:
    """``argv`` with the value of each secret-looking flag (``--hf-token X``,
    ``--password=X``) replaced by ``MASK``."""
    return _split_argv(argv)[0]


def argv_secrets(argv: Sequence[str]) -> list[str]:
    """The values of the secret-looking flags in ``argv``."""
    return _split_argv(argv)[1]


def _split_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    shown: list[str] = []
    secrets: list[str] = []
    value_next = False
    for arg in argv:
        if value_next and not arg.startswith("--"):
            shown.append(MASK)
            secrets += [arg] if arg else []
            value_next = False
            continue
        name, equals, value = arg.partition("=")
        value_next = arg.startswith("-") and looks_secret(name) and not equals
        if arg.startswith("-") and looks_secret(name) and equals:
            shown.append(f"{name}={MASK}")
            secrets += [value] if value else []
        else:
            shown.append(arg)
    return shown, secrets


def _secret_key(key: object) -> bool:
    return isinstance(key, str) and looks_secret(key)


def _text(value: object) -> str:
    """Text and numbers as text (a secret's form in a message); anything else (a flag's
    ``True``, ``None``, a list) is no secret: empty."""
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        return ""
    if isinstance(value, int) and value.bit_length() > 4096:
        return ""  # past int-to-str's digit limit: too long to be echoed anywhere anyway
    return str(value)
