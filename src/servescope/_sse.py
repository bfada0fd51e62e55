"""Server-sent events, sans I/O: bytes in (split anywhere), events out; one event out as bytes.

A streamed completion (``"stream": true``) comes back as ``text/event-stream``: lines
of ``field: value``, an event ended by a blank line. ``SSEDecoder`` follows the WHATWG
rules: lines end with ``\\n``, ``\\r\\n`` or ``\\r`` (a ``\\r\\n`` split across two
feeds is one line end), ``data`` lines of one event are joined with ``\\n``, ``event``
names it (``message`` by default), ``id`` sets the last event id (kept across events),
lines starting with ``:`` are comments, unknown fields are ignored, a leading UTF-8 BOM
is dropped, and an event the stream ends in the middle of is discarded. Bytes that are
not UTF-8 are decoded with replacement characters, as the spec says.

What a server sends is foreign: one event (its unfinished line plus the data gathered
so far) may hold at most ``max_event_bytes`` (4 MiB by default); past that the decoder
raises ``RequestError`` instead of buffering without end. Nothing here does I/O.

``encode_data`` builds one ``data:`` event (an HTTP front uses it to report an error
inside a stream that has already begun).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ._errors import RequestError

__all__ = ["MAX_EVENT_BYTES", "Event", "SSEDecoder", "encode_data"]

MAX_EVENT_BYTES = 4 * 1024 * 1024
_LINE_END = re.compile(rb"\r\n|\r|\n")
_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class Event:
    """One dispatched event: its ``data`` (lines joined by ``\\n``), type and last id."""

    data: str
    event: str = "message"
    id: str = ""


class SSEDecoder:
    """Feeds of bytes in, events out; ``max_event_bytes`` bounds what one event may buffer."""

    def __init__(self, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        self.max_event_bytes = max_event_bytes
        self._buffer = bytearray()  # the unfinished line
        self._skip_lf = False  # the last feed ended in "\r": a "\n" next is part of it
        self._started = False  # the BOM check is done
        self._data: list[str] = []
        self._data_size = 0
        self._event = ""
        self._last_id = ""

    def feed(self, data: bytes) -> list[Event]:
        """The events that ``data`` completes (``RequestError`` if one grows too large)."""
        if not data:
            return []
        if self._skip_lf:
            self._skip_lf = False
            if data[:1] == b"\n":
                data = data[1:]
        buffer = self._buffer
        start = len(buffer)
        buffer += data
        if not self._started:
            if len(buffer) < len(_BOM) and _BOM.startswith(bytes(buffer)):
                return []  # maybe a BOM still arriving
            self._started = True
            if buffer.startswith(_BOM):
                del buffer[: len(_BOM)]
            start = 0
        events: list[Event] = []
        # A line end can start one byte before the new data only as "\r" + "\n", and a
        # "\r" ending the old buffer would already have ended its line: scan the new part.
        position = 0
        for match in _LINE_END.finditer(buffer, start):
            end = match.end()
            if match.group() == b"\r" and end == len(buffer):
                self._skip_lf = True
            event = self._line(bytes(buffer[position : match.start()]))
            position = end
            if event is not None:
                events.append(event)
        del buffer[:position]
        if len(buffer) + self._data_size > self.max_event_bytes:
            self._too_large()
        return events

    def _line(self, raw: bytes) -> Event | None:
        if not raw:
            return self._dispatch()
        if len(raw) + self._data_size > self.max_event_bytes:
            self._too_large()
        line = raw.decode("utf-8", "replace")
        if line.startswith(":"):
            return None
        field, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if field == "data":
            self._data.append(value)
            self._data_size += len(raw) + 1
            if self._data_size > self.max_event_bytes:
                self._too_large()
        elif field == "event":
            self._event = value
        elif field == "id" and "\0" not in value:
            self._last_id = value
        return None  # "retry" and unknown fields: nothing a client of one request needs

    def _dispatch(self) -> Event | None:
        data, event = self._data, self._event
        self._data, self._data_size, self._event = [], 0, ""
        if not data:
            return None
        return Event("\n".join(data), event or "message", self._last_id)

    def _too_large(self) -> None:
        self._buffer = bytearray()
        self._data, self._data_size = [], 0
        raise RequestError(
            f"a server-sent event is over {self.max_event_bytes} bytes (an endless line?)"
        )


def encode_data(data: str) -> bytes:
    """One event whose data is ``data`` (a line per line of it), ending with a blank line."""
    lines = re.split(r"\r\n|\r|\n", data)
    return b"".join(b"data: " + line.encode("utf-8", "replace") + b"\n" for line in lines) + b"\n"
