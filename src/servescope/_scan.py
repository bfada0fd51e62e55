"""Fast reading of JSONL lines a block at a time: the ids, and the common valid shapes.

Resuming a big job reads every output line (the ids done) and every input line (their
ids) before anything is sent; parsing each line as JSON made that ~130,000 lines a
second. Here a regular expression goes over a whole block of lines in C and hands back
the id of each, and only what the plan still needs is looked at further:

- **An id is read from the start of a line**: ``{"id": ID`` with ``ID`` an integer of up
  to 18 digits in its own canonical form or a string without escapes, in a block of
  valid UTF-8 where ``"id"`` occurs exactly once a line and no ``\\u0069`` or ``\\u0064``
  (an escaped ``i`` or ``d``, which could spell another ``"id"`` key; any ``\\u006``,
  for one search) occurs at all. That
  id is the one a JSON parser reads: a later ``"id"`` key would take its place, and
  there is none. A block with no ``"id"`` at all (and no such escape) holds lines whose
  id is their line number, if each looks like an object (``{`` first, ``}`` last). Any
  other block goes line by line, and any other line is parsed in full.
- **An input line whose id is done is skipped on its id alone**, as a done line always
  was: it is not checked again (it was a valid prompt when it was sent). Every other
  input line is checked in full before it counts: by ``InputShape`` (an object of
  scalars with its prompt, or its messages as a list of objects of scalars: exactly the
  lines a full parse reads as valid prompts), else by the full parser.
- **An output line is recognised by its shape**: ``{"id": ID}``, or ``{"id": ID, `` then
  ``"text"``, ``"error"`` or ``"id_from_line_number"``, up to a final ``}`` — the lines
  the job writes. A line of that shape that breaks JSON in between is not noticed (any
  other line is parsed in full, and one that is not a result refuses the file).

Keys come back as the ``IdSet`` takes them (``raw_key``): an integer id's digits, a
string id's UTF-8 in double quotes (``1`` and ``"1"`` apart), a line number's digits.
"""

from __future__ import annotations

import json
import re

__all__ = ["InputShape", "input_keys", "line_key", "output_keys"]

STRING = rb'"[^"\\\x00-\x1f]*(?:\\(?:["\\/bfnrt]|u[0-9a-fA-F]{4})[^"\\\x00-\x1f]*)*"'
NUMBER = rb"-?(?:0|[1-9][0-9]{0,99})(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?"
SCALAR = rb"(?:" + STRING + rb"|" + NUMBER + rb"|true|false|null)"
KEY = rb'"[^"\\\x00-\x1f]*"'
#: An id as read from the start of a line: an integer that is its own canonical text, a
#: string with no escape (its bytes are its UTF-8).
ID = rb'(0|-?[1-9][0-9]{0,17}|"[^"\\\x00-\x1f]*")'
COMMA, COLON = rb", ?", rb": ?"
MEMBER = KEY + COLON + SCALAR
OBJECT = rb"\{(?:" + MEMBER + rb"(?:" + COMMA + MEMBER + rb")*)?\}"
MESSAGES = rb"\[(?:" + OBJECT + rb"(?:" + COMMA + OBJECT + rb")*)?\]"

_OUTPUT = re.compile(
    rb'(?m)^\{"id": ' + ID + rb'(?:\}|, "(?:text|error|id_from_line_number)": [^\n]*\})\n'
)
_INPUT = re.compile(rb'(?m)^\{"id"' + COLON + ID + rb"[,}]")
_INPUT_LINE = re.compile(rb'\{"id"' + COLON + ID + rb"[,}]")
#: ``"id"``, and the start of an escaped ``i`` (``\\u0069``) or ``d`` (``\\u0064``).
_ID, _ESCAPED = b'"id"', b"\\u006"


def _utf8(block: bytes) -> bool:
    if block.isascii():
        return True
    try:
        block.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _plain(block: bytes) -> bool:
    """No escaped ``i`` or ``d`` (nor any character from ``\\u0060`` to ``\\u006f``, one
    search for them all), and valid UTF-8."""
    return _ESCAPED not in block and _utf8(block)


def output_keys(block: bytes) -> list[bytes] | None:
    """The keys of the ids of every line of ``block`` (whole lines, each ending with a
    newline), or ``None`` if any line is not of a result line's shape."""
    lines = block.count(b"\n")
    if block.count(_ID) != lines or not _plain(block):
        return None
    found = _OUTPUT.findall(block)
    return found if len(found) == lines else None


def input_keys(block: bytes, first: int) -> list[bytes] | None:
    """The keys of every line of ``block`` (whole lines, the first numbered ``first``),
    or ``None`` if any line needs a look of its own (a blank line, an id not read from
    the start, a line that does not look like an object, ...)."""
    lines = block.count(b"\n")
    ids = block.count(_ID)
    if (ids != lines and ids != 0) or not _plain(block):
        return None
    if ids == 0:
        starts = block.count(b"\n{") + (block[:1] == b"{")
        if starts != lines or block.count(b"}\n") != lines:
            return None
        return [b"%d" % number for number in range(first, first + lines)]
    found = _INPUT.findall(block)
    return found if len(found) == lines else None


def line_key(line: bytes, number: int) -> bytes | None:
    """One line's key as ``input_keys`` reads it, or ``None``: parse it in full."""
    if line[:1] != b"{" or line.rstrip(b" \t\r")[-1:] != b"}" or not _plain(line):
        return None
    ids = line.count(_ID)
    if ids == 0:
        return b"%d" % number
    match = _INPUT_LINE.match(line) if ids == 1 else None
    return None if match is None else match.group(1)


class InputShape:
    """The shape of a common valid input line, for the given prompt and messages fields:
    a line of it is a valid prompt; a line not of it is parsed in full."""

    def __init__(self, prompt: str, messages: str) -> None:
        names = [json.dumps(name, ensure_ascii=False) for name in ("id", prompt, messages)]
        self.usable = not any("\\" in name for name in names)
        quoted = [re.escape(name.encode()) for name in names]
        other = rb"(?!(?:" + b"|".join(quoted) + rb"))" + MEMBER
        body = (
            rb'\{(?:"id"' + COLON + ID + COMMA + rb")?"
            rb"(?:" + other + COMMA + rb")*"
            rb"(?:" + quoted[1] + COLON + STRING + rb"|" + quoted[2] + COLON + MESSAGES + rb")"
            rb"(?:" + COMMA + other + rb")*\}\r?"
        )
        self._line = re.compile(body)

    def valid(self, line: bytes) -> bool:
        """``line`` (without its newline) is a valid prompt of the common shape."""
        return self.usable and self._line.fullmatch(line) is not None and _utf8(line)
