"""Arbitrary input never escapes as anything but the library's own error."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from servescope import ConfigError, RequestError, ServerConfig, load_config
from servescope._generate import _line, _parse, resume
from servescope._loadconfig import read_config_file
from servescope._logscan import LineSplitter
from servescope._responses import parse_completion, parse_json
from servescope._retry import parse_retry_after
from servescope.backends.sglang import SGLANG_PATTERNS
from servescope.backends.vllm import VLLM_PATTERNS

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


@given(st.binary(max_size=500) | json_values.map(lambda v: json.dumps(v).encode()))
def test_response_parsing(body: bytes) -> None:
    try:
        parsed = parse_json(body)
        completion = parse_completion(parsed)
    except RequestError:
        return
    assert isinstance(completion.text, str)


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
        assert message.startswith(("invalid ", "unknown backend"))
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
