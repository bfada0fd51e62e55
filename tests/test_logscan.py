"""The log scanner: byte chunks → lines → events, without processes."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from servescope._logscan import LineKind, LineSplitter, PatternTable, compile_patterns
from servescope.backends.custom import CUSTOM_PATTERNS


def split_all(chunks: list[bytes], max_line_bytes: int = 64) -> list[str]:
    splitter = LineSplitter(max_line_bytes=max_line_bytes)
    lines = [line for chunk in chunks for line in splitter.feed(chunk)]
    return lines + splitter.finish()


@pytest.mark.parametrize(
    ("chunks", "expected"),
    [
        ([b"a\nb\n"], ["a", "b"]),
        ([b"a", b"b\n", b"c"], ["ab", "c"]),
        ([b"\n\n"], ["", ""]),
        ([b"crlf\r\n"], ["crlf"]),
        ([b"10%\r50%\r100%\n"], ["100%"]),
        ([b"bad \xff\xfe utf8\n"], ["bad \ufffd\ufffd utf8"]),
        ([b"split \xe2\x82", b"\xac euro\n"], ["split \u20ac euro"]),
        ([b""], []),
        (
            [b"x" * 70 + b"\nnext\n"],
            ["x" * 64 + " [... 6 more bytes of this line dropped]", "next"],
        ),
        (
            [b"x" * 60, b"y" * 10, b"z\n"],
            ["x" * 60 + "yyyy" + " [... 7 more bytes of this line dropped]"],
        ),
        ([b"tail without newline"], ["tail without newline"]),
    ],
)
def test_line_splitter(chunks: list[bytes], expected: list[str]) -> None:
    assert split_all(chunks) == expected


def test_giant_line_memory_is_bounded() -> None:
    splitter = LineSplitter(max_line_bytes=1024)
    for _ in range(10):  # 10 MB without a newline
        assert splitter.feed(b"x" * 1_000_000) == []
        assert len(splitter._buffer) <= 1024
    (line,) = splitter.feed(b"\n")
    assert line.startswith("x" * 1024)
    assert line.endswith(f"[... {10_000_000 - 1024} more bytes of this line dropped]")


@given(st.lists(st.binary(max_size=40), max_size=20), st.data())
def test_chunking_does_not_change_lines(parts: list[bytes], data: st.DataObject) -> None:
    stream = b"".join(parts)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    assert split_all(chunks, max_line_bytes=16) == split_all([stream], max_line_bytes=16)


@given(st.binary(max_size=2000))
def test_any_bytes_give_bounded_lines(stream: bytes) -> None:
    for line in split_all([stream], max_line_bytes=32):
        assert "\n" not in line
        assert len(line.encode()) <= 32 * 3 + 60  # replacement chars + the dropped note


CUSTOM_CASES = [
    ("INFO:     Application startup complete.", LineKind.READY),
    ("INFO:     Uvicorn running on http://0.0.0.0:8000 (Press CTRL+C to quit)", LineKind.READY),
    ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", LineKind.FATAL),
    ("RuntimeError: CUDA error: an illegal memory access was encountered", LineKind.FATAL),
    ("ImportError: cannot import name 'foo' from 'bar'", LineKind.FATAL),
    ("ModuleNotFoundError: No module named 'flash_attn'", LineKind.FATAL),
    ("OSError: [Errno 98] Address already in use", LineKind.RETRY),
    (
        "ERROR:    [Errno 98] error while attempting to bind on address: address already in use",
        LineKind.RETRY,
    ),
    ('INFO:     127.0.0.1:5555 - "GET /v1/models HTTP/1.1" 200 OK', None),
    ("RuntimeError: shape mismatch", None),
    ("", None),
]


@pytest.mark.parametrize(("line", "kind"), CUSTOM_CASES)
def test_custom_patterns(line: str, kind: LineKind | None) -> None:
    event = CUSTOM_PATTERNS.classify(line)
    assert (event.kind if event else None) is kind
    if event:
        assert event.line == line


def test_retry_wins_over_fatal_and_user_patterns_extend() -> None:
    table = PatternTable.build(ready=["up"], fatal=["boom", "in use"], retry=["in use"])
    event = table.classify("port in use, boom")
    assert event is not None and event.kind is LineKind.RETRY
    extended = table.extended(ready=[r"^READY$"], fatal=[r"engine \d+ died"])
    event = extended.classify("engine 3 died")
    assert event is not None and event.kind is LineKind.FATAL
    event = extended.classify("READY")
    assert event is not None and event.kind is LineKind.READY
    assert table.classify("READY") is None


def test_invalid_pattern_is_named() -> None:
    with pytest.raises(re.error, match=r"invalid pattern '\(unclosed'"):
        compile_patterns(["ok", "(unclosed"])
