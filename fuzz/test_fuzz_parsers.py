"""Arbitrary input never escapes as anything but the library's own error."""

from __future__ import annotations

import gzip
import json
import math
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from hypothesis import given
from hypothesis import strategies as st

from servescope import ConfigError, RequestError, ServerConfig, load_config
from servescope._generate import _line, _parse, resume
from servescope._http import _decode
from servescope._loadconfig import BACKENDS, read_config_file
from servescope._logscan import LineClassifier, LineKind, LineSplitter
from servescope._responses import parse_chunk, parse_completion, parse_json
from servescope._retry import parse_retry_after
from servescope._sse import Event, SSEDecoder, encode_data
from servescope._transport import MAX_BODY, bad_header
from servescope.backends._base import ProcessConfig
from servescope.backends.custom import CUSTOM_PATTERNS
from servescope.backends.endpoint import EndpointConfig
from servescope.backends.sglang import SGLANG_PATTERNS
from servescope.backends.vllm import VLLM_PATTERNS, VLLMConfig

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@given(st.lists(st.binary(max_size=300), max_size=20), st.integers(8, 200))
def test_line_splitter(chunks: list[bytes], limit: int) -> None:
    splitter = LineSplitter(max_line_bytes=limit)
    lines = [line for chunk in chunks for line in splitter.feed(chunk)]
    lines += splitter.finish()
    assert len(splitter._buffer) <= limit
    assert all("\n" not in line for line in lines)
    assert len(lines) >= b"".join(chunks).count(b"\n")
    for line in lines:
        VLLM_PATTERNS.classify(line)
        SGLANG_PATTERNS.classify(line)


#: Lines shaped like the engines' own records, tracebacks and request logs, mixed.
log_lines = st.lists(
    st.one_of(
        st.text(max_size=120),
        st.sampled_from(["(APIServer pid=1) ", "(EngineCore pid=2) ", "", "\x1b[31m"]).flatmap(
            lambda head: st.builds(
                lambda level, message: f"{head}{level} 11-23 10:00:00 [core.py:1] {message}",
                st.sampled_from(["INFO", "ERROR", "WARNING", "CRITICAL", "DEBUG"]),
                st.text(max_size=80),
            )
        ),
        st.builds(lambda m: f"[2026-11-23 10:00:00 TP0] {m}", st.text(max_size=80)),
        st.sampled_from(
            [
                "Traceback (most recent call last):",
                '  File "x.py", line 1, in f',
                "torch.OutOfMemoryError: CUDA out of memory",
                "EngineCore encountered a fatal error.",
            ]
        ),
    ),
    max_size=30,
)


@given(log_lines, st.booleans())
def test_line_classifier(lines: list[str], ready: bool) -> None:
    """Any sequence of lines, before or after readiness: an event or None, never an
    exception; after readiness a ready line means nothing."""
    for table in (VLLM_PATTERNS, SGLANG_PATTERNS, CUSTOM_PATTERNS):
        classifier = LineClassifier(table)
        for line in lines:
            event = classifier.classify(line, ready=ready)
            if ready and event is not None and event.kind is LineKind.READY:
                raise AssertionError(f"a ready line after readiness: {line!r}")


@given(st.binary(max_size=500) | json_values.map(lambda v: json.dumps(v).encode()))
def test_response_parsing(body: bytes) -> None:
    try:
        parsed = parse_json(body)
        completion = parse_completion(parsed)
    except RequestError:
        return
    assert isinstance(completion.text, str)


chunk_shaped = st.fixed_dictionaries(
    {},
    optional={
        "choices": st.lists(
            st.fixed_dictionaries(
                {},
                optional={
                    "delta": st.dictionaries(
                        st.sampled_from(["content", "reasoning", "reasoning_content", "role"]),
                        json_values,
                    )
                    | json_values,
                    "text": json_values,
                    "finish_reason": json_values,
                    "index": json_values,
                },
            )
            | json_values,
            max_size=2,
        )
        | json_values,
        "usage": json_values,
        "error": json_values,
    },
)


@given(chunk_shaped | json_values.map(lambda v: {"choices": v}))
def test_stream_chunk_parsing(chunk: dict[str, Any]) -> None:
    try:
        parsed = parse_chunk(chunk)
    except RequestError:  # StreamInterrupted for an error member is one too
        return
    assert isinstance(parsed.text, str) and isinstance(parsed.index, int)


@given(
    st.sampled_from([b"[", b'{"a":', b'{"choices":[', b'{"choices":[{"message":{"content":']),
    st.integers(0, 200_000),
    st.sampled_from([b"", b"]", b"}", b"1"]),
)
def test_response_parsing_deep_nesting(opening: bytes, depth: int, closing: bytes) -> None:
    body = opening * depth + closing * depth
    try:
        parse_completion(parse_json(body))
    except RequestError:
        pass


@given(st.text() | st.binary().map(lambda data: data.decode("latin-1")))
def test_retry_after(value: str) -> None:
    seconds = parse_retry_after(value)
    assert seconds is None or (math.isfinite(seconds) and seconds >= 0)


def raw_deflate(data: bytes) -> bytes:
    return zlib.compress(data)[2:-4]


COMPRESSORS: list[Callable[[bytes], bytes]] = [gzip.compress, zlib.compress, raw_deflate]

# Sound compressed bodies, cut anywhere and followed by junk.
compressed = st.builds(
    lambda compress, data, cut, junk: compress(data)[:cut] + junk,
    st.sampled_from(COMPRESSORS),
    st.binary(max_size=500),
    st.integers(0, 600),
    st.binary(max_size=20),
)


@given(
    st.binary(max_size=600) | compressed,
    st.sampled_from([None, "identity", "gzip", "x-gzip", "deflate", " GZIP ", "br", "gzip, br"]),
)
def test_content_decoding(raw: bytes, coding: str | None) -> None:
    try:
        body = _decode(raw, coding)
    except httpx.RemoteProtocolError:
        return
    assert len(body) <= MAX_BODY


@given(
    st.lists(
        st.tuples(st.binary(max_size=30), st.binary(max_size=30))
        | st.tuples(st.just(b"x"), st.text().map(str.encode)),
        max_size=5,
    ),
    st.text(min_size=4, max_size=20).map(lambda text: "\u00a7" + text),
)
def test_bad_header_names_never_values(headers: list[tuple[bytes, bytes]], secret: str) -> None:
    """Which header HTTP cannot carry is said without its value (an API key, perhaps).

    The secret starts with a character no message of ``bad_header`` has of its own.
    """
    headers = [(name, value + secret.encode()) for name, value in headers]
    problem = bad_header(headers)
    if problem is not None:
        assert secret not in problem


@given(
    st.dictionaries(st.text(max_size=20), json_values, max_size=6),
    st.sampled_from([None, "dummy", "vllm", "sglang", "endpoint", "custom", "x", 3]),
)
def test_config_loading(values: dict[str, Any], backend: object) -> None:
    if backend is not None:
        values["backend"] = backend
    try:
        config = load_config(values)
    except ConfigError as exc:
        message = str(exc)
        assert message.startswith(("invalid ", "unknown backend", "pool settings ("))
    else:
        assert isinstance(config, ServerConfig)


@given(st.binary(max_size=300), st.sampled_from([".toml", ".json"]))
def test_config_files(tmp_path_factory: Any, data: bytes, suffix: str) -> None:
    path = Path(tmp_path_factory.mktemp("cfg")) / f"config{suffix}"
    path.write_bytes(data)
    try:
        read_config_file(path)
    except ConfigError:
        pass


#: Every setting of every backend, and values built to hit each check: non-finite and
#: huge numbers, bools and numeric strings, NUL and line breaks, bad URLs, port and host
#: flags, secret-looking names, nesting, types no config file can hold.
FIELD_NAMES = sorted({name for cls in BACKENDS.values() for name in cls.model_fields})
NAMES = st.sampled_from([*FIELD_NAMES, "port", "--port", "host", "--host=::", "api-key"])
hostile_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=12)
    | st.builds(pow, st.just(10), st.integers(4400, 5000))  # past int-to-str's digit limit
    | st.sampled_from(
        [
            2**63,
            "7",
            "sk-1\r\nX: 1",
            "a\x00b",
            "--port",
            "--port=1",
            "--host",
            "--hf-token",
            "http://user:pw@h:70000/v1",
            "http://[::1/v1",
            "https://h/v1",
            "/health",
            "(",
        ]
    )
)


def containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    keys = NAMES | st.text(max_size=8) | st.integers()
    return (
        st.lists(inner, max_size=4)
        | st.tuples(inner, inner)
        | st.dictionaries(keys, inner, max_size=4)
    )


hostile_values = (
    hostile_scalars
    | st.dictionaries(NAMES | st.text(max_size=8), hostile_scalars, max_size=3)
    | st.lists(st.text(max_size=8) | NAMES, max_size=4)
    | st.recursive(
        hostile_scalars | st.sets(st.integers(), max_size=2) | st.binary(max_size=4),
        containers,
        max_leaves=20,
    )
)
MINIMAL: dict[str, dict[str, Any]] = {
    "dummy": {},
    "vllm": {"model": "m"},
    "sglang": {"model": "m"},
    "endpoint": {"model": "m", "url": "http://127.0.0.1:1/v1"},
    "custom": {"script": "s.py"},
}


@given(st.data(), st.sampled_from(sorted(BACKENDS)))
def test_hostile_config_values(data: st.DataObject, backend: str) -> None:
    """A config either fails with a short ``ConfigError`` or can be shown and launched."""
    own = st.sampled_from(sorted(BACKENDS[backend].model_fields))
    values = data.draw(
        st.dictionaries(own | NAMES | st.text(max_size=8), hostile_values, max_size=3)
    )
    check_config({**MINIMAL[backend], **values, "backend": backend})


#: Values of the right type whose content is hostile: most of these configs build.
text = st.text(max_size=12) | st.sampled_from(["a\x00b", "--port", "--host", "::", "0.0.0.0"])
typed_settings = st.fixed_dictionaries(
    {},
    optional={
        "model": text,
        "host": text,
        "python": text,
        "script": text,
        "url": text | st.sampled_from(["http://user:pw@h/v1", "https://[::1]:0", "http://h:x"]),
        "api_key": text,
        "env": st.dictionaries(NAMES | text, text, max_size=3),
        "args": st.dictionaries(NAMES | text, hostile_scalars, max_size=3),
        "extra_args": st.lists(NAMES | text, max_size=4),
        "default_params": st.dictionaries(NAMES | text, hostile_values, max_size=3),
        "health_path": text,
        "max_concurrency": st.integers(),
        "latency": st.floats(),
    },
)


@given(typed_settings, st.sampled_from(sorted(BACKENDS)))
def test_typed_config_values(values: dict[str, Any], backend: str) -> None:
    fields = BACKENDS[backend].model_fields
    own = {key: value for key, value in values.items() if key in fields}
    check_config({**MINIMAL[backend], **own, "backend": backend})


def check_config(values: dict[str, Any]) -> None:
    """``values`` fail with a short ``ConfigError``, or make a config that can be shown
    and launched."""
    try:
        config = load_config(values)
    except ConfigError as exc:
        message = str(exc)
        assert message.startswith("invalid ") and len(message) < 4000
        return
    texts = [repr(config), str(config), config.model_dump_json(), str(config.model_dump())]
    assert all(isinstance(text, str) for text in texts)
    assert all(isinstance(secret, str) for secret in config.secrets())
    if isinstance(config, ProcessConfig):
        spec = config.process_spec(1)
        launcher = len(config.launcher()) if isinstance(config, VLLMConfig) else 1
        assert spec.argv[launcher:].count("--port") == 1  # servescope's, read as a flag
        assert all(isinstance(arg, str) and "\0" not in arg for arg in spec.argv)
        assert all("\0" not in name + value and "=" not in name for name, value in spec.env.items())
        assert spec.connect_host
    elif not isinstance(config, EndpointConfig) or config.ca_bundle is None:
        config.client_options()


@given(
    st.sampled_from([".json", ".toml"]),
    st.sampled_from(["[", "{", '{"a": ', "a = [", "a = { b = ", "x = {y = ["]),
    st.integers(1, 3000),
)
def test_nested_config_files(tmp_path_factory: Any, suffix: str, opening: str, depth: int) -> None:
    path = Path(tmp_path_factory.mktemp("cfg")) / f"config{suffix}"
    closing = {"[": "]", "{": "}", '{"a": ': "}"}.get(opening, "]")
    path.write_text(opening * depth + "1" + closing * depth)
    try:
        load_config(path)
    except ConfigError:
        pass


#: Text with lone surrogates: JSON escapes (``"\\ud800"``) decode to them.
surrogate_text = st.text(st.characters() | st.characters(categories=["Cs"]), max_size=20)
input_lines = (
    st.text(max_size=300)
    | json_values.map(json.dumps)
    | st.tuples(surrogate_text | st.integers(), surrogate_text).map(
        lambda pair: json.dumps({"id": pair[0], "prompt": pair[1]})
    )
    | st.tuples(st.integers(0, 5000), st.sampled_from(["[", '{"a": ', '[{"a": '])).map(
        lambda deep: '{"id": 1, "prompt": "x", "p": ' + deep[1] * deep[0]  # unclosed
    )
    | st.integers(0, 5000).map(lambda n: '{"id": 1, "prompt": "x", "p": ' + "[" * n + "]" * n + "}")
)


@given(input_lines | surrogate_text)
def test_input_lines(text: str) -> None:
    """Any line is a prompt or a ``ValueError`` (never a RecursionError), and whatever
    a prompt holds is written as one valid UTF-8 JSON line that reads back the same."""
    try:
        prompt = _parse(1, text)
    except ValueError:
        return
    assert (prompt.messages is None) != (prompt.prompt is None)
    data = _line({"id": prompt.id, "text": prompt.prompt})
    assert data.endswith(b"\n") and data.count(b"\n") == 1
    assert json.dumps(json.loads(data.decode("utf-8"))["id"]) == json.dumps(prompt.id)


@given(st.binary(max_size=400))
def test_resume_on_any_output_file(tmp_path_factory: Any, data: bytes) -> None:
    path = Path(tmp_path_factory.mktemp("out")) / "out.jsonl"
    path.write_bytes(data)
    try:
        done = resume(path)
    except ConfigError:
        return
    assert path.read_bytes() == data[: path.stat().st_size]  # only a torn tail is cut
    assert len(done) <= data.count(b"\n")


@given(st.binary(max_size=600), st.lists(st.integers(0, 600), max_size=12), st.integers(1, 64))
def test_sse_decoder(stream: bytes, cuts: list[int], cap: int) -> None:
    """Any bytes, split anywhere, under any cap: the same events (or the same error, after
    a prefix of them) as fed whole, never another exception, never more buffered than the cap.
    """

    def run(pieces: list[bytes]) -> tuple[list[Event], bool]:
        decoder, events = SSEDecoder(max_event_bytes=cap), []
        try:
            for piece in pieces:
                events += decoder.feed(piece)
                assert len(decoder._buffer) <= cap
        except RequestError:
            return events, True
        return events, False

    whole, whole_failed = run([stream])
    points = sorted(min(cut, len(stream)) for cut in cuts)
    pieces = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    split, split_failed = run(pieces)
    reference = SSEDecoder(max_event_bytes=1 << 20).feed(stream)
    assert split_failed == whole_failed
    assert split == reference[: len(split)]
    assert whole_failed or split == whole == reference
    for event in split:
        assert encode_data(event.data).endswith(b"\n\n")


@given(st.text(max_size=200))
def test_sse_encoding_round_trips(data: str) -> None:
    events = SSEDecoder().feed(encode_data(data))
    expected = data.replace("\r\n", "\n").replace("\r", "\n")
    assert [event.data for event in events] == [expected.encode("utf-8", "replace").decode()]
