"""The SSE decoder: the spec's line and field rules, any split of the bytes, a size cap."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from servescope import RequestError
from servescope._sse import Event, SSEDecoder, encode_data


def decode(data: bytes, max_event_bytes: int = 1 << 20) -> list[Event]:
    return SSEDecoder(max_event_bytes).feed(data)


@pytest.mark.parametrize(
    ("stream", "events"),
    [
        (b"data: hi\n\n", [Event("hi")]),
        (b"data: a\ndata: b\n\n", [Event("a\nb")]),
        (b"data:no space\n\n", [Event("no space")]),
        (b"data:  two spaces\n\n", [Event(" two spaces")]),
        (b"data\n\n", [Event("")]),
        (b"data:\ndata:\n\n", [Event("\n")]),
        (b"data: a\r\n\r\ndata: b\r\r", [Event("a"), Event("b")]),
        (b"data: a\r\ndata: b\rdata: c\n\n", [Event("a\nb\nc")]),
        (b": a comment\ndata: x\n: another\n\n", [Event("x")]),
        (b"event: error\ndata: {}\n\n", [Event("{}", "error")]),
        (b"id: 7\ndata: a\n\ndata: b\n\n", [Event("a", id="7"), Event("b", id="7")]),
        (b"id: 1\0\ndata: a\n\n", [Event("a")]),  # an id with NUL is ignored
        (b"event: e\n\ndata: a\n\n", [Event("a")]),  # an event without data is not sent
        (b"retry: 10\nfoo: bar\ndata: a\n\n", [Event("a")]),
        (b"\xef\xbb\xbfdata: bom\n\n", [Event("bom")]),
        (b"data: \xff\xfe\n\n", [Event("\ufffd\ufffd")]),
        (b"data: unfinished\n", []),  # the stream ends mid-event: discarded
        (b"data: [DONE]\n\n", [Event("[DONE]")]),
        ("data: ünï €\n\n".encode(), [Event("ünï €")]),
    ],
)
def test_decoding(stream: bytes, events: list[Event]) -> None:
    assert decode(stream) == events
    byte_by_byte = SSEDecoder()
    assert [e for i in range(len(stream)) for e in byte_by_byte.feed(stream[i : i + 1])] == events


def test_crlf_split_across_feeds_is_one_line_end() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\r") == []
    assert decoder.feed(b"\n") == []  # not a second (blank) line
    assert decoder.feed(b"\r") == [Event("a")]
    assert decoder.feed(b"\ndata: b\n\n") == [Event("b")]


def test_bom_only_at_the_start() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"\xef") == []
    assert decoder.feed(b"\xbb\xbfdata: a\n\n\xef\xbb\xbfdata: b\n\n") == [Event("a")]


@pytest.mark.parametrize(
    "chunks",
    [
        [b"data: " + b"x" * 5000],  # one endless line
        [b"data: " + b"x" * 100 for _ in range(60)],  # fed in pieces
        [b"data: xxxxxxxxxx\n" * 500],  # many data lines, no blank line
        [b": " + b"c" * 5000 + b"\n"],  # a comment is a line too
    ],
)
def test_an_event_over_the_cap_is_an_error(chunks: list[bytes]) -> None:
    decoder = SSEDecoder(max_event_bytes=4096)
    with pytest.raises(RequestError, match="over 4096 bytes"):
        for chunk in chunks:
            decoder.feed(chunk)


def test_events_under_the_cap_pass_and_the_cap_is_per_event() -> None:
    decoder = SSEDecoder(max_event_bytes=100)
    event = b"data: " + b"x" * 80 + b"\n\n"
    assert decoder.feed(event * 50) == [Event("x" * 80)] * 50


@pytest.mark.parametrize("data", ["x", "", '{"error": {"message": "a\\nb"}}', "a\nb\r\nc\rd", " x"])
def test_encode_data_round_trips(data: str) -> None:
    assert decode(encode_data(data)) == [Event(data.replace("\r\n", "\n").replace("\r", "\n"))]


streams = st.lists(
    st.sampled_from(
        [
            b"data: x",
            b"data:y",
            b"data",
            b"event: e",
            b"id: 3",
            b": c",
            b"",
            b"\xff",
            "ü".encode(),
            b"field: v",
        ]
    ),
    max_size=20,
).flatmap(
    lambda lines: st.lists(
        st.sampled_from([b"\n", b"\r\n", b"\r"]), min_size=len(lines), max_size=len(lines)
    ).map(lambda ends: b"".join(line + end for line, end in zip(lines, ends, strict=True)))
)


@settings(max_examples=300, deadline=None)
@given(streams, st.data())
def test_any_split_gives_the_same_events(stream: bytes, data: st.DataObject) -> None:
    whole = decode(stream)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    decoder = SSEDecoder(1 << 20)
    pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    assert [event for piece in pieces for event in decoder.feed(piece)] == whole
