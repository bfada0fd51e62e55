"""``generate`` at scale: compressed and Parquet inputs, compressed outputs resumed after
a kill, other prompt fields, shards for job arrays and ``servescope merge``, and the
block-at-a-time reading of ids (``_scan``) against the full parser.

Jobs run in this process on the in-process dummy (``cli._generate``, as in
``test_generate.py``); the commands' exit codes and messages through ``cli.main``.
"""

from __future__ import annotations

import fcntl
import gzip
import io
import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import pytest
import zstandard
from rich.console import Console

from servescope import ConfigError, DummyConfig, _generate, _outputs, cli, open_server
from servescope._generate import Counts, IdSet, Job, prepare, resume, run_job
from servescope._inputs import Fields
from servescope._loadconfig import load_pool_config
from servescope._outputs import FRAME_LINES, FrameWriter, scan_results
from servescope._redact import Redactor
from servescope._scan import InputShape, input_keys, line_key, output_keys
from servescope._shards import Shard, parse_shard, shard_path


@pytest.fixture
def parquet() -> tuple[Any, Any]:
    """pyarrow and pyarrow.parquet (the test group installs them)."""
    return pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")


def compress(data: bytes, kind: str | None) -> bytes:
    if kind == "gzip":
        return gzip.compress(data)
    if kind == "zstd":
        return zstandard.ZstdCompressor().compress(data)
    return data


SUFFIX = {"gzip": ".gz", "zstd": ".zst", None: ""}


def prompts(count: int, field: str = "prompt") -> list[str]:
    return [json.dumps({"id": i, field: f"p{i}"}) for i in range(count)]


def write(path: Path, lines: list[str], kind: str | None = None) -> Path:
    path.write_bytes(compress("".join(line + "\n" for line in lines).encode(), kind))
    return path


def read_output(path: Path) -> list[dict[str, Any]]:
    data = path.read_bytes()
    if path.suffix == ".gz":
        data = gzip.decompress(data)
    elif path.suffix == ".zst":
        reader = zstandard.ZstdDecompressor().stream_reader(
            io.BytesIO(data), read_across_frames=True
        )
        data = reader.read()
    return [json.loads(line) for line in data.decode().splitlines()]


async def generate(*argv: str) -> tuple[int, str]:
    """``servescope generate ARGV`` in this process (on this test's event loop)."""
    args = cli._parser().parse_args(["generate", *argv, "--progress", "none"])
    config, _ = load_pool_config(cli._config_values(args))
    shown = io.StringIO()
    code = await cli._generate(args, config, None, Console(file=shown, width=200), Redactor())
    return code, " ".join(shown.getvalue().split())


def command(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """``servescope ARGV`` through ``cli.main``: its exit code and what it printed."""
    with pytest.raises(SystemExit) as exited:
        cli.main(list(argv))
    captured = capsys.readouterr()
    return int(exited.value.code or 0), " ".join((captured.out + captured.err).split())


# -- inputs ------------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["gzip", "zstd"])
async def test_compressed_inputs_and_outputs(tmp_path: Path, kind: str) -> None:
    lines = prompts(30)
    source = write(tmp_path / f"in.jsonl{SUFFIX[kind]}", lines[:20], kind)
    output = tmp_path / f"out.jsonl{SUFFIX[kind]}"
    code, _ = await generate(str(source), "-o", str(output))
    assert code == 0 and sorted(r["id"] for r in read_output(output)) == list(range(20))
    # More lines in a second member (as a job appending): read as one stream, resumed.
    source.write_bytes(
        source.read_bytes() + compress(("\n".join(lines[20:]) + "\n").encode(), kind)
    )
    code, shown = await generate(str(source), "-o", str(output))
    assert code == 0 and "already done (skipped) │ 20" in shown
    assert sorted(r["id"] for r in read_output(output)) == list(range(30))
    code, shown = await generate(str(source), "-o", str(output))
    assert code == 0 and "no server started" in shown


@pytest.mark.parametrize(
    ("name", "data", "message"),
    [
        ("in.jsonl.gz", b"not gzip at all\n", "is not gzip data"),
        ("in.jsonl.zst", b"not zstd at all\n", "is not zstd data"),
        ("in.jsonl.gz", gzip.compress(b'{"id": 1, "prompt": "x"}\n' * 500)[:-30], "truncated"),
        ("in.jsonl.zst", compress(b'{"id": 1, "prompt": "x"}\n' * 500, "zstd")[:-6], "truncated"),
        ("in.jsonl.gz", gzip.compress(b"{}\n") + b"trailing junk", "after its last whole member"),
        ("in.jsonl.gz", b"\x1f\x8b" + bytes(range(200)), "corrupt"),
        ("in.jsonl.zst", compress(b"x" * 5000, "zstd") + bytes(100), "not zstd data at byte"),
        ("in.jsonl.zst", compress(b"abc" * 999, "zstd")[:8] + b"\xff" * 60, "corrupt"),
    ],
)
def test_bad_compressed_input_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, data: bytes, message: str
) -> None:
    source = tmp_path / name
    source.write_bytes(data)
    output = tmp_path / "out.jsonl"
    code, shown = command(capsys, "generate", str(source), "-o", str(output))
    assert code == 2 and message in shown and name in shown and "Traceback" not in shown
    assert not output.exists()  # no empty output left behind


@pytest.mark.anyio
async def test_parquet_input_with_other_field_names(
    tmp_path: Path, parquet: tuple[Any, Any]
) -> None:
    pa, pq = parquet
    source = tmp_path / "in.parquet"
    table = pa.table(
        {
            "id": [f"doc-{i}" for i in range(12)],
            "question": [f"q{i}" if i != 3 else None for i in range(12)],
            "chat": [None if i != 3 else [{"role": "user", "content": "hi"}] for i in range(12)],
            "extra": list(range(12)),  # not read
        }
    )
    pq.write_table(table, source, row_group_size=5)
    output = tmp_path / "out.jsonl"
    argv = [str(source), "-o", str(output), "--prompt-field", "question"]
    code, _ = await generate(*argv, "--messages-field", "chat")
    assert code == 0
    assert sorted(r["id"] for r in read_output(output)) == sorted(f"doc-{i}" for i in range(12))
    code, shown = await generate(*argv, "--messages-field", "chat")
    assert code == 0 and "no server started" in shown and "12 done" in shown
    # Without --messages-field, row 4 has neither: malformed, named by its row.
    code, shown = await generate(*argv)
    assert code == 0 and "11 done, 1 malformed" in shown
    errors = (tmp_path / "out.jsonl.errors").read_text()
    assert '"line": 4' in errors and "doc-3" in errors


def test_parquet_errors(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    parquet: tuple[Any, Any],
) -> None:
    pa, pq = parquet
    source = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": [1], "text": ["x"]}), source)
    output = tmp_path / "out.jsonl"
    code, shown = command(capsys, "generate", str(source), "-o", str(output))
    assert code == 2 and "has no column 'prompt' or 'messages'" in shown
    assert "its columns: 'id', 'text'" in shown and "--prompt-field" in shown
    not_parquet = tmp_path / "bad.parquet"
    not_parquet.write_text('{"id": 1, "prompt": "x"}\n')
    code, shown = command(capsys, "generate", str(not_parquet), "-o", str(output))
    assert code == 2 and "is not a Parquet file" in shown and "Traceback" not in shown
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if not installed
    code, shown = command(capsys, "generate", str(source), "-o", str(output))
    assert code == 2 and "pip install 'servescope[parquet]'" in shown
    assert not output.exists()


@pytest.mark.anyio
async def test_prompt_and_messages_fields_for_jsonl(tmp_path: Path) -> None:
    lines = [
        json.dumps({"id": 1, "question": "q"}),
        json.dumps({"id": 2, "conversation": [{"role": "user", "content": "c"}], "temperature": 0}),
        json.dumps({"id": 3, "prompt": "the default name is a parameter now"}),
        json.dumps({"id": 4, "question": 5}),
    ]
    source = write(tmp_path / "in.jsonl", lines)
    output = tmp_path / "out.jsonl"
    code, _ = await generate(
        str(source),
        "-o",
        str(output),
        "--prompt-field",
        "question",
        "--messages-field",
        "conversation",
    )
    assert code == 0 and sorted(r["id"] for r in read_output(output)) == [1, 2]
    errors = [json.loads(line) for line in (tmp_path / "out.jsonl.errors").read_text().splitlines()]
    assert [e["line"] for e in errors] == [3, 4]
    assert "'conversation' (a list) or 'question' (a string)" in errors[0]["error"]
    assert "'question' must be a string" in errors[1]["error"]


@pytest.mark.parametrize(
    ("prompt", "messages", "message"),
    [("id", "messages", "other than 'id'"), ("x", "x", "both name 'x'"), ("", "m", "other than")],
)
def test_bad_field_names(prompt: str, messages: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Fields(prompt, messages)


# -- compressed outputs ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["gzip", "zstd"])
def test_a_compressed_output_resumes_after_a_torn_member(tmp_path: Path, kind: str) -> None:
    output = tmp_path / f"out.jsonl{SUFFIX[kind]}"
    with output.open("ab") as file:
        writer = FrameWriter(file, kind)
        for i in range(FRAME_LINES + 10):  # one whole member, then 10 lines gathered
            writer.write({"id": i, "text": "t"})
        size = output.stat().st_size
        writer.close()  # a second member
    whole = output.read_bytes()
    for cut in (len(whole) - 1, size + 5, size + 1):  # killed while writing the second
        output.write_bytes(whole[:cut])
        ids = resume(output)
        assert output.stat().st_size == size and len(ids) == FRAME_LINES
        assert ids.get(FRAME_LINES - 1) == _generate.DONE and ids.get(FRAME_LINES) is None
    output.write_bytes(whole[: size // 2])  # killed while writing the first: nothing kept
    assert len(resume(output)) == 0 and output.stat().st_size == 0


@pytest.mark.parametrize("kind", ["gzip", "zstd"])
def test_a_compressed_output_that_is_not_ours_is_refused(tmp_path: Path, kind: str) -> None:
    output = tmp_path / f"out.jsonl{SUFFIX[kind]}"
    good = compress(b'{"id": 1}\n', kind)
    for data, message in [
        (good + compress(b'{"prompt": "x"}\n', kind) + good, "is not a result line"),
        (good + compress(b'{"id": 2}', kind) + good, "ends in the middle of a line"),
        (good + b"junk" + good, "after its last whole"),
    ]:
        output.write_bytes(data)
        with pytest.raises(ConfigError, match=message):
            resume(output)
        assert output.read_bytes() == data


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["gzip", "zstd"])
async def test_a_compressed_output_is_exactly_once_after_kills(tmp_path: Path, kind: str) -> None:
    """Runs stopped at random points, each leaving a torn member: every id exactly once."""
    count = 2 * FRAME_LINES + 300
    job = Job(
        write(tmp_path / "in.jsonl", prompts(count)),
        tmp_path / f"out.jsonl{SUFFIX[kind]}",
        tmp_path / "out.errors",
        concurrency=16,
    )

    class Stopper:
        def __init__(self, scope: anyio.CancelScope, after: int) -> None:
            self.scope, self.after = scope, after

        def update(self, counts: Counts) -> None:
            if counts.succeeded >= self.after:
                self.scope.cancel()

        def close(self, counts: Counts) -> None:
            pass

    for stop_after in (700, 1500, 10**9):
        with anyio.fail_after(60), prepare(job) as prepared, anyio.CancelScope() as scope:
            counts = prepared.counts()

            with pytest.MonkeyPatch.context() as patch:  # a kill: the gathered lines lost
                if stop_after < count:
                    patch.setattr(FrameWriter, "close", lambda self: self.lines.clear())
                async with open_server(DummyConfig()) as server:
                    await run_job(server, job, prepared, Stopper(scope, stop_after), counts)
        data = job.output.read_bytes()
        job.output.write_bytes(data + compress(b'{"id": "torn"}\n', kind)[:-4])  # cut short
    resume(job.output)  # the last torn member cut off
    ids = Counter(r["id"] for r in read_output(job.output))
    assert sorted(ids.elements()) == list(range(count))


# -- shards ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "environ", "shard"),
    [
        ("0/1", {}, Shard(0, 1)),
        (" 3 / 8 ", {}, Shard(3, 8)),
        ("auto", {"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "4"}, Shard(2, 4)),
        (
            "auto",
            {
                "SLURM_ARRAY_TASK_ID": "5",
                "SLURM_ARRAY_TASK_COUNT": "4",
                "SLURM_ARRAY_TASK_MIN": "3",
            },
            Shard(2, 4),
        ),
    ],
)
def test_shard_specs(text: str, environ: dict[str, str], shard: Shard) -> None:
    assert parse_shard(text, environ) == shard


@pytest.mark.parametrize(
    ("text", "environ", "message"),
    [
        ("5/3", {}, "K must be 0 to 2"),
        ("3/3", {}, "K must be 0 to 2"),
        ("0/0", {}, "N >= 1"),
        ("-1/3", {}, "takes K/N"),
        ("garbage", {}, "takes K/N"),
        ("1/2/3", {}, "takes K/N"),
        ("auto", {}, "needs SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT"),
        ("auto", {"SLURM_ARRAY_TASK_ID": "1"}, "needs SLURM_ARRAY_TASK_COUNT"),
        ("auto", {"SLURM_ARRAY_TASK_ID": "x", "SLURM_ARRAY_TASK_COUNT": "2"}, "not a whole"),
        ("auto", {"SLURM_ARRAY_TASK_ID": "8", "SLURM_ARRAY_TASK_COUNT": "4"}, "contiguous array"),
    ],
)
def test_bad_shard_specs_are_clear_errors(text: str, environ: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_shard(text, environ)


@pytest.mark.parametrize(
    ("name", "sharded"),
    [
        ("out.jsonl", "out.shard-1-of-4.jsonl"),
        ("out.jsonl.zst", "out.shard-1-of-4.jsonl.zst"),
        ("out.v2.JSONL.gz", "out.v2.shard-1-of-4.JSONL.gz"),
        ("results", "results.shard-1-of-4"),
        (".jsonl", ".jsonl.shard-1-of-4"),
    ],
)
def test_shard_paths(name: str, sharded: str) -> None:
    assert shard_path(Path("/d") / name, Shard(1, 4)) == Path("/d") / sharded


def test_bad_shard_flag_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = write(tmp_path / "in.jsonl", prompts(3))
    code, shown = command(
        capsys, "generate", str(source), "-o", str(tmp_path / "o"), "--shard", "5/3"
    )
    assert code == 2 and "K must be 0 to 2" in shown and "Traceback" not in shown
    assert list(tmp_path.iterdir()) == [source]


@pytest.mark.anyio
async def test_shards_cover_the_input_once_and_merge(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = [json.dumps({"id": f"k{i % 290}", "prompt": "x"}) for i in range(300)]  # 10 repeat
    lines += [json.dumps({"prompt": f"no id {i}"}) for i in range(20)] + ["not json"]
    source = write(tmp_path / "in.jsonl", lines)
    output = tmp_path / "out.jsonl.gz"
    totals = Counter[str]()
    for index in range(3):
        code, shown = await generate(str(source), "-o", str(output), "--shard", f"{index}/3")
        assert code == 0
        path = shard_path(output, Shard(index, 3))
        assert path.exists() and not output.exists()
        totals.update(str(r["id"]) for r in read_output(path))
    assert len(totals) == 310 and max(totals.values()) == 1  # every id once, across shards
    errors = [tmp_path / f"out.shard-{i}-of-3.jsonl.gz.errors" for i in range(3)]
    reported = sorted(
        e["line"]
        for path in errors
        if path.exists()
        for e in map(json.loads, path.read_text().splitlines())
    )
    assert reported == [*range(291, 301), 321]  # the repeats and the garbage, once each
    code, shown = command(capsys, "merge", str(source), "-o", str(output))
    assert code == 0 and "3 shards cover" in shown and "310 results" in shown
    assert Counter(str(r["id"]) for r in read_output(output)) == totals
    merged_errors = (tmp_path / "out.jsonl.gz.errors").read_text().splitlines()
    assert sorted(json.loads(e)["line"] for e in merged_errors) == reported
    # A rerun of a shard is a finished job; the merge is the same again.
    code, shown = await generate(str(source), "-o", str(output), "--shard", "1/3")
    assert code == 0 and "no server started" in shown and "(shard 1/3)" in shown
    assert "│ shard │ 1/3 │" in shown and " of 321 │" in shown  # the summary
    assert command(capsys, "merge", str(source), "-o", str(output), "--shards", "3")[0] == 0


@pytest.mark.anyio
async def test_merge_names_what_is_missing_repeated_or_foreign(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = write(tmp_path / "in.jsonl", prompts(40))
    output = tmp_path / "out.jsonl"
    for index in range(2):
        assert (await generate(str(source), "-o", str(output), "--shard", f"{index}/2"))[0] == 0
    first, second = shard_path(output, Shard(0, 2)), shard_path(output, Shard(1, 2))
    kept = first.read_bytes()
    lines = kept.splitlines(keepends=True)
    lost = json.loads(lines[0])["id"]
    first.write_bytes(b"".join(lines[1:]))
    code, shown = command(capsys, "merge", str(source), "-o", str(output))
    assert code == 2 and "1 input lines have no result" in shown
    assert f"line {lost + 1} (id {lost}, shard 0/2)" in shown and "nothing written" in shown
    first.write_bytes(kept + lines[0] + b'{"id": "stranger"}\n')
    code, shown = command(capsys, "merge", str(source), "-o", str(output))
    assert code == 2 and f"1 results repeat an id: id {lost}" in shown
    assert "1 results are for ids not in" in shown and "'stranger'" in shown
    assert not output.exists()
    first.write_bytes(kept + b'{"id": 99, "te')  # killed mid-line, not rerun
    code, shown = command(capsys, "merge", str(source), "-o", str(output))
    assert code == 2 and "ends with a torn result" in shown
    first.write_bytes(kept)
    with second.open("ab") as other:  # a shard still running
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        code, shown = command(capsys, "merge", str(source), "-o", str(output))
        assert code == 2 and "still being written" in shown
    second.unlink()
    code, shown = command(capsys, "merge", str(source), "-o", str(output), "--shards", "2")
    assert code == 2 and "1 of the 2 shards have no results file" in shown
    code, shown = command(capsys, "merge", str(source), "-o", str(output))
    assert code == 2 and "1 of the 2 shards have no results file" in shown  # N from shard 0
    assert not output.exists()


def test_merge_finds_no_shards(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = write(tmp_path / "in.jsonl", prompts(2))
    code, shown = command(capsys, "merge", str(source), "-o", str(tmp_path / "out.jsonl"))
    assert code == 2 and "no shard files" in shown and "out.shard-0-of-2.jsonl" in shown


# -- reading ids a block at a time -------------------------------------------------------


def test_a_block_of_the_common_shapes_is_read_at_once() -> None:
    block = b'{"id": 1, "prompt": "a"}\n{"id": "x", "messages": []}\n{"id":-7,"prompt":"b"}\n'
    assert input_keys(block, 1) == [b"1", b'"x"', b"-7"]
    assert input_keys(b'{"prompt": "a"}\n{"messages": []}\n', 10) == [b"10", b"11"]
    for block in [
        b'{"id": 1, "prompt": "a"}\n\n',  # a blank line
        b'{"prompt": "a", "id": 1}\n',  # the id elsewhere
        b'{"id": 1, "prompt": "a", "id": 2}\n',  # a later id wins
        b'{"id": 1, "prompt": "\\u0069"}\n',  # an escaped i: could spell "id"
        b'{"id": 01, "prompt": "a"}\n',  # not JSON
        b'{"id": "\\ud800", "prompt": "a"}\n',  # an escape in the id
        b'{"id": 1, "prompt": "\xff"}\n',  # not UTF-8
        b"not json\n",
    ]:
        assert input_keys(block, 1) is None
    assert line_key(b'{"prompt": "a"}', 5) == b"5" and line_key(b"[1]", 5) is None
    assert output_keys(b'{"id": 1}\n{"id": "a", "text": "x"}\n') == [b"1", b'"a"']
    assert output_keys(b'{"id": 1, "prompt": "x"}\n') is None
    shape = InputShape("prompt", "messages")
    assert shape.valid(b'{"id": 1, "prompt": "a", "max_tokens": 3}')
    assert not shape.valid(b'{"id": 1, "prompt": 3}')
    assert not InputShape("a\\b", "messages").usable


def test_ids_from_blocks_and_from_objects_agree() -> None:
    ids = IdSet()
    ids.append([b"1", b'"1"', b'"\xc3\xa9"'], _generate.DONE)
    assert ids.get(1) == ids.get("1") == ids.get("é") == _generate.DONE
    assert ids.get(True) is None and ids.get("2") is None


def test_scan_results_hands_on_every_id(tmp_path: Path) -> None:
    output = tmp_path / "out.jsonl"
    lines = [json.dumps({"id": i, "text": "t"}) for i in range(20_000)]
    output.write_text("\n".join(lines) + "\n" + '{"id": 1, "text": "torn')
    keys: list[bytes] = []
    good, size = scan_results(output, keys.extend)
    assert keys == [b"%d" % i for i in range(20_000)] and size - good == len(
        '{"id": 1, "text": "torn'
    )


@pytest.mark.anyio
async def test_a_done_line_is_skipped_on_its_id_alone(tmp_path: Path) -> None:
    """A line whose id is done is not checked again; any other line is, in full."""
    lines = [json.dumps({"id": 1, "prompt": 5}), json.dumps({"id": 2, "prompt": 5}), "{"]
    source = write(tmp_path / "in.jsonl", lines)
    output = tmp_path / "out.jsonl"
    output.write_text('{"id": 1}\n')
    code, shown = await generate(str(source), "-o", str(output))
    assert code == 0 and "0 left of 3 lines: 1 done, 2 malformed" in shown


def test_the_plan_of_a_resumed_job_keeps_every_state(tmp_path: Path) -> None:
    """A job resumed at any point plans the same lines as one line by line would."""
    lines = [json.dumps({"id": i % 700, "prompt": "x"}) for i in range(1000)]
    lines[10] = "garbage"
    lines[20] = "   "
    source = write(tmp_path / "in.jsonl", lines)
    output = tmp_path / "out.jsonl"
    output.write_text("".join(json.dumps({"id": i}) + "\n" for i in range(0, 700, 3)))
    job = Job(source, output, tmp_path / "errors")
    with prepare(job) as prepared:
        done = len(range(0, 700, 3))  # 234
        assert prepared.lines == prepared.total == 999  # the blank line is no line
        assert prepared.left == 700 - done  # ids 10 and 20: their second lines (711, 721)
        assert prepared.skipped == done + 100 and prepared.malformed == 1 + 198
        sent = [n for n in range(1, 1001) if prepared.to_send(n)]
        assert all(json.loads(lines[n - 1])["id"] % 3 for n in sent)


@pytest.mark.parametrize("kind", ["gzip", "zstd"])
def test_a_huge_member_is_read_as_it_comes(
    tmp_path: Path, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A member far bigger than a job's own (a file compressed whole): its ids are handed
    on as read; whole, it resumes; cut short, it cannot be cut off safely: refused."""
    monkeypatch.setattr(_outputs, "MEMBER_KEYS", 100)
    output = tmp_path / f"out.jsonl{SUFFIX[kind]}"
    member = compress(b"".join(b'{"id": %d, "text": "t"}\n' % i for i in range(20_000)), kind)
    output.write_bytes(member)
    assert len(resume(output)) == 20_000
    output.write_bytes(member[: len(member) - 8])
    with pytest.raises(ConfigError, match="too big to cut off safely"):
        resume(output)


@pytest.mark.anyio
async def test_shard_errors_files_and_parquet_shards(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], parquet: tuple[Any, Any]
) -> None:
    pa, pq = parquet
    source = tmp_path / "in.parquet"
    rows = [f"q{i}" if i % 10 else None for i in range(60)]  # every tenth: no prompt
    pq.write_table(pa.table({"id": list(range(60)), "prompt": rows}), source)
    output, errors = tmp_path / "out.jsonl", tmp_path / "bad.jsonl"
    for index in range(2):
        argv = [str(source), "-o", str(output), "--errors", str(errors), "--shard", f"{index}/2"]
        assert (await generate(*argv))[0] == 0
    reported = [  # a row with no id to go by: reported by shard (row - 1) mod 2
        json.loads(line)["line"]
        for line in (tmp_path / "bad.shard-0-of-2.jsonl").read_text().splitlines()
    ]
    assert reported == list(range(1, 61, 10))
    assert not (tmp_path / "bad.shard-1-of-2.jsonl").exists()
    code, shown = command(capsys, "merge", str(source), "-o", str(output))
    assert code == 0 and "54 results (6 malformed input lines)" in shown


@pytest.mark.anyio
async def test_shard_auto_from_a_slurm_array(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    source = write(tmp_path / "in.jsonl", prompts(50))
    output = tmp_path / "out.jsonl"
    for task in (4, 5):  # --array=4-5
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", str(task))
        monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "4")
        monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
        assert (await generate(str(source), "-o", str(output), "--shard", "auto"))[0] == 0
    code, shown = command(capsys, "merge", str(source), "-o", str(output))
    assert code == 0 and "2 shards cover" in shown and "50 results" in shown
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID")
    with pytest.raises(ConfigError, match="--shard auto needs SLURM_ARRAY_TASK_ID"):
        await generate(str(source), "-o", str(output), "--shard", "auto")


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["gzip", "zstd"])
async def test_a_stopped_job_writes_its_gathered_chunk(tmp_path: Path, kind: str) -> None:
    """Ctrl-C, SIGTERM, a crash: the results gathered for the next member are written."""
    job = Job(
        write(tmp_path / "in.jsonl", prompts(500)),
        tmp_path / f"out.jsonl{SUFFIX[kind]}",
        tmp_path / "out.errors",
        concurrency=8,
    )

    class Stopper:
        def __init__(self, scope: anyio.CancelScope) -> None:
            self.scope = scope

        def update(self, counts: Counts) -> None:
            if counts.succeeded >= 123:
                self.scope.cancel()

        def close(self, counts: Counts) -> None:
            pass

    with anyio.fail_after(30), prepare(job) as prepared, anyio.CancelScope() as scope:
        counts = prepared.counts()
        async with open_server(DummyConfig()) as server:
            await run_job(server, job, prepared, Stopper(scope), counts)
    written = read_output(job.output)
    assert len(written) == counts.succeeded >= 123 and len({r["id"] for r in written}) == len(
        written
    )


@pytest.mark.parametrize("kind", ["gzip", "zstd"])
def test_sigkilled_jobs_with_a_compressed_output_write_every_id_once(
    tmp_path: Path, kind: str
) -> None:
    """The console script SIGKILLed three times mid-job (its dummy in-process), then run
    to the end: every id exactly once in a valid compressed file."""
    source = write(tmp_path / "in.jsonl.gz", prompts(3000), "gzip")
    output = tmp_path / f"out.jsonl{SUFFIX[kind]}"
    script = Path(sys.executable).with_name("servescope")
    command = [str(script), "generate", str(source), "-o", str(output), "--concurrency", "16"]
    command += ["--progress", "none", "--set", "latency=0.002"]
    sizes = []
    for _ in range(3):
        job = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        start = output.stat().st_size if output.exists() else 0
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (
            not output.exists() or output.stat().st_size <= start
        ):
            time.sleep(0.01)  # a member written: the job is under way
        time.sleep(0.05)
        job.kill()
        job.communicate(timeout=30)
        sizes.append(output.stat().st_size)
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    ids = Counter(r["id"] for r in read_output(output))
    assert sorted(ids.elements()) == list(range(3000))
    assert 0 < sizes[0] < output.stat().st_size  # killed with work left
