"""``generate`` at scale under arbitrary input: ids read a block at a time agree with the
full parser; compressed files, Parquet files and shard files never escape as anything
but ``ConfigError``; shard specs parse or are refused."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pytest
import zstandard
from hypothesis import given
from hypothesis import strategies as st

from servescope import ConfigError
from servescope._generate import _check, _record, resume
from servescope._inputs import Fields, blocks, count_lines, parquet_rows
from servescope._merge import merge
from servescope._outputs import _line, raw_key, scan_results
from servescope._scan import InputShape, input_keys, line_key, output_keys
from servescope._shards import parse_shard

ids = st.one_of(
    st.integers(-(10**20), 10**20),
    st.text(max_size=6),
    st.sampled_from(["id", "\ud800", 'a"b', "a\\b", "é", "\u0069d"]),
    st.none(),
    st.booleans(),
    st.floats(allow_nan=False),
)
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=5))
records = st.fixed_dictionaries(
    {},
    optional={
        "id": ids,
        "prompt": st.one_of(st.text(max_size=8), st.integers()),
        "messages": st.lists(st.dictionaries(st.text(max_size=3), scalars, max_size=2), max_size=2),
        "max_tokens": scalars,
        "x": st.lists(scalars, max_size=2),
    },
)


def encodings(record: dict[str, Any]) -> st.SearchStrategy[str]:
    """A record written as json.dumps writes it, compactly, ASCII-only, reordered."""
    reordered = dict(reversed(list(record.items())))
    return st.sampled_from(
        [
            json.dumps(record),
            json.dumps(record, ensure_ascii=False),
            json.dumps(record, separators=(",", ":")),
            json.dumps(reordered),
            json.dumps(record) + " ",
        ]
    )


#: Lines: records in several spellings, their pieces, a few hand-made traps, junk.
lines = st.one_of(
    records.flatmap(encodings),
    records.flatmap(encodings).flatmap(lambda text: st.just(text[: len(text) // 2])),
    st.sampled_from(
        [
            '{"id": 1, "prompt": "a", "id": 2}',
            '{"id": 1, "prompt": "a", "\\u0069d": 2}',
            '{"id": 01, "prompt": "a"}',
            '{"id": -0, "prompt": "a"}',
            '{"id": 1, "prompt": "a"} x',
            '{"prompt": "a"',
            "{}",
            "   ",
            '{"id": 1, "prompt": "\\ud800"}',
            '{"id": "\\u00e9", "prompt": "a"}',
            '{"id": 1e2, "prompt": "a"}',
        ]
    ),
    st.text(alphabet='{}[]":, 0123456789idpromtesag\\u\t', max_size=30),
)


def parsed_key(text: str, number: int) -> tuple[bool, bytes | None]:
    """The full parser's view of one line: (a valid prompt?, its id's key or None)."""
    try:
        record = _record(text)
    except ValueError:
        return False, None
    try:
        key = _check(record)
    except ValueError:
        found = record.get("id")
        return False, raw_key(number if found is None else found)
    return True, raw_key(number if key is None else key)


@given(st.lists(lines, min_size=1, max_size=8), st.integers(1, 10**6))
def test_block_ids_agree_with_the_parser(texts: list[str], first: int) -> None:
    raws = [text.encode("utf-8", "surrogatepass") for text in texts]
    block = b"".join(raw + b"\n" for raw in raws)
    keys = input_keys(block, first)
    shape = InputShape("prompt", "messages")
    for offset, raw in enumerate(raws):
        number = first + offset
        text = raw.decode("utf-8", "replace")
        valid, key = parsed_key(text, number)
        quick = line_key(raw, number)
        if quick is not None and key is not None:
            assert quick == key  # an id read from the line's start is the parser's
        if quick is not None and keys is not None:
            assert keys[offset] == quick
        if shape.valid(raw):
            assert valid  # a line of the common shape is a valid prompt


@given(st.lists(records, min_size=1, max_size=8))
def test_output_ids_agree_with_the_parser(written: list[dict[str, Any]]) -> None:
    block = b"".join(_line({**record, "text": "t"}) for record in written)
    keys = output_keys(block)
    if keys is not None:
        assert keys == [raw_key(json.loads(raw)["id"]) for raw in block.splitlines()]


@given(st.binary(max_size=300))
def test_output_keys_on_any_bytes(data: bytes) -> None:
    block = data.replace(b"\n", b" ") + b"\n"
    keys = output_keys(block)
    if keys is not None:
        assert len(keys) == 1 and block.startswith(b'{"id": ')


def compressed(kind: str) -> st.SearchStrategy[bytes]:
    """Whole members (frames) of result lines, cut, joined or damaged."""
    compress = gzip.compress if kind == "gzip" else zstandard.ZstdCompressor().compress
    member = st.lists(st.integers(0, 50), min_size=1, max_size=5).map(
        lambda keys: compress(b"".join(b'{"id": %d}\n' % key for key in keys))
    )
    return st.one_of(
        st.lists(member, max_size=3).map(b"".join),
        st.tuples(st.lists(member, max_size=3), st.binary(max_size=40)).map(
            lambda parts: b"".join(parts[0]) + parts[1]
        ),
        st.tuples(member, st.integers(0, 200)).map(lambda cut: cut[0][: cut[1]]),
        st.binary(max_size=100),
    )


@given(
    st.sampled_from(["gzip", "zstd"]).flatmap(
        lambda kind: st.tuples(st.just(kind), compressed(kind))
    )
)
def test_compressed_files_in_and_out(tmp_path_factory: Any, case: tuple[str, bytes]) -> None:
    kind, data = case
    path = Path(tmp_path_factory.mktemp("z")) / (
        "out.jsonl.gz" if kind == "gzip" else "out.jsonl.zst"
    )
    path.write_bytes(data)
    try:
        for _ in blocks(path):
            pass
    except ConfigError:
        pass
    try:
        good, size = scan_results(path, lambda keys: None)
    except ConfigError:
        return
    assert 0 <= good <= size == len(data)
    done = resume(path)
    assert path.read_bytes() == data[:good] and len(done) <= data.count(b"\n") + 250


@given(
    st.text(max_size=12),
    st.dictionaries(
        st.sampled_from(["SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN"]),
        st.text(max_size=4),
    ),
)
def test_shard_specs(text: str, environ: dict[str, str]) -> None:
    for spec in (text, "auto"):
        try:
            shard = parse_shard(spec, environ)
        except ConfigError:
            continue
        assert 0 <= shard.index < shard.count


def _parquet_bytes() -> bytes:
    pyarrow = pytest.importorskip("pyarrow")
    parquet = pytest.importorskip("pyarrow.parquet")
    sink = pyarrow.BufferOutputStream()
    table = pyarrow.table({"id": list(range(50)), "prompt": [f"p{i}" for i in range(50)]})
    parquet.write_table(table, sink, row_group_size=10)
    return bytes(sink.getvalue().to_pybytes())


@given(st.data())
def test_parquet_files_cut_or_damaged(tmp_path_factory: Any, data: st.DataObject) -> None:
    """A Parquet file cut short or with bytes changed: its rows, or ``ConfigError``."""
    whole = _parquet_bytes()
    cut = data.draw(st.integers(0, len(whole)))
    damaged = bytearray(whole[:cut])
    for _ in range(data.draw(st.integers(0, 3))):
        if damaged:
            at = data.draw(st.integers(0, len(damaged) - 1))
            damaged[at] = data.draw(st.integers(0, 255))
    path = Path(tmp_path_factory.mktemp("pq")) / "in.parquet"
    path.write_bytes(bytes(damaged))
    try:
        count_lines(path)
        for _number, row in parquet_rows(path, Fields()):
            assert isinstance(row, dict)
    except ConfigError:
        pass


@given(st.lists(st.binary(max_size=80), min_size=2, max_size=2), st.binary(max_size=200))
def test_merge_on_any_shard_files(
    tmp_path_factory: Any, shards: list[bytes], prompts: bytes
) -> None:
    """Shard files and input of any bytes: a merge, or ``ConfigError`` (nothing written)."""
    directory = Path(tmp_path_factory.mktemp("merge"))
    source = directory / "in.jsonl"
    source.write_bytes(prompts)
    output = directory / "out.jsonl"
    for index, content in enumerate(shards):
        (directory / f"out.shard-{index}-of-2.jsonl").write_bytes(content)
    try:
        merge(source, output, 2)
    except ConfigError:
        assert not output.exists()
        return
    assert output.read_bytes() == b"".join(shards)
