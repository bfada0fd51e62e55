"""The ``generate`` job without the CLI: hostile input lines, the output lock, the writer.

The job runs against the in-process dummy server; the CLI's end-to-end tests are in
``test_cli.py``.
"""

from __future__ import annotations

import errno
import fcntl
import io
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console

from servescope import ConfigError, DummyConfig, _generate, cli, open_server
from servescope._generate import (
    DONE,
    PENDING,
    SENT,
    Counts,
    IdSet,
    Job,
    _line,
    _parse,
    prepare,
    resume,
    run_job,
)
from servescope._loadconfig import load_pool_config
from servescope._redact import Redactor

SURROGATE = json.loads('"\\ud800"')  # a lone surrogate: not encodable as UTF-8


def nested(depth: int, key: int = 1) -> str:
    return f'{{"id": {key}, "prompt": "x", "p": ' + "[" * depth + "]" * depth + "}"


class Recorder:
    """A ``Progress`` that runs ``hook`` after every update."""

    def __init__(self, hook: Callable[[Counts], None] = lambda counts: None) -> None:
        self.hook = hook
        self.closed = False

    def update(self, counts: Counts) -> None:
        self.hook(counts)

    def close(self, counts: Counts) -> None:
        self.closed = True


def make_job(tmp_path: Path, lines: list[str], **options: Any) -> Job:
    prompts = tmp_path / "in.jsonl"
    prompts.write_text("".join(line + "\n" for line in lines))
    output = tmp_path / "out.jsonl"
    return Job(prompts, output, output.with_name("out.jsonl.errors"), **options)


async def run(job: Job, progress: Recorder | None = None, **config: Any) -> Counts:
    """The job through ``prepare`` and ``run_job`` on the in-process dummy."""
    with anyio.fail_after(30), prepare(job) as prepared:
        counts = prepared.counts()
        async with open_server(DummyConfig(**config)) as server:
            await run_job(server, job, prepared, progress or Recorder(), counts)
    return counts


def check(job: Job) -> None:
    """``prepare`` alone: enter and leave."""
    with prepare(job):
        pass


def records(path: Path) -> list[dict[str, Any]]:
    """Every output line, each checked to be valid UTF-8 JSON."""
    return [json.loads(line) for line in path.read_bytes().decode("utf-8").splitlines()]


@pytest.mark.parametrize("line", [nested(100_000), nested(100_000)[:-1], "[" * 100_000])
def test_deeply_nested_line_is_malformed(line: str) -> None:
    """Too deep for the parser: a RecursionError there, a malformed line here."""
    with pytest.raises(ValueError, match="nested too deeply"):
        _parse(1, line)


def test_resume_refuses_a_deeply_nested_line(tmp_path: Path) -> None:
    output = tmp_path / "out.jsonl"
    output.write_text(nested(100_000) + "\n" + json.dumps({"id": 1}) + "\n")
    with pytest.raises(ConfigError, match=r"out\.jsonl:1 is not a result line"):
        resume(output)


@pytest.mark.parametrize("key", ["[" + "0, " * 100_000 + "0]", '{"a": ' * 100 + "1" + "}" * 100])
def test_bad_id_is_described_briefly(key: str) -> None:
    with pytest.raises(ValueError, match="'id' must be a string or an integer") as caught:
        _parse(1, '{"id": ' + key + ', "prompt": "x"}')
    assert len(str(caught.value)) < 300


def test_lone_surrogates_are_written_as_valid_json_and_resumed(tmp_path: Path) -> None:
    record = {"id": SURROGATE + "x", "text": "a\udfffb", "plain": "é"}
    data = _line(record)
    assert data.endswith(b"\n") and json.loads(data.decode("utf-8")) == record
    assert _line({"id": 1, "text": "é"}) == '{"id": 1, "text": "é"}\n'.encode()  # as before
    output = tmp_path / "out.jsonl"
    output.write_bytes(data + _line({"id": 2}))
    done = resume(output)
    assert len(done) == 2 and SURROGATE + "x" in done and 2 in done and "2" not in done


def test_a_locked_output_is_refused(tmp_path: Path) -> None:
    job = make_job(tmp_path, [json.dumps({"id": 1, "prompt": "x"})])
    job.output.write_text(json.dumps({"id": 0}) + '\n{"id": 1, "te')  # a torn tail
    with job.output.open("ab") as other:  # another job holds the lock
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ConfigError, match="another servescope generate job") as caught:
            check(job)
        assert str(job.output) in str(caught.value)
    assert job.output.read_text().endswith('{"id": 1, "te')  # refused before resume cut it
    with prepare(job) as prepared:  # the lock is held for the whole block
        assert 0 in prepared.ids and prepared.total == 1 and prepared.skipped == 0
        with pytest.raises(ConfigError, match="another servescope generate job"):
            check(job)
    check(job)  # released at the end


def test_no_lock_support_warns_and_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def no_locks(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    job = make_job(tmp_path, [json.dumps({"id": 1, "prompt": "x"})])
    with caplog.at_level(logging.WARNING, "servescope"), prepare(job) as prepared:
        assert prepared.total == 1
    assert "cannot lock" in caplog.text and "out.jsonl" in caplog.text


def unwritable(tmp_path: Path) -> Iterator[tuple[str, Path, Path]]:
    regular = tmp_path / "a-file"
    regular.write_text("")
    output, errors = tmp_path / "out.jsonl", tmp_path / "out.jsonl.errors"
    yield "output", regular / "out.jsonl", errors
    yield "output", tmp_path / "missing" / "out.jsonl", errors
    yield "errors", output, regular / "x.errors"
    yield "errors", output, tmp_path / "missing" / "x.errors"
    yield "errors", output, tmp_path  # a directory


@pytest.mark.parametrize("case", range(5))
def test_unwritable_locations_are_refused(tmp_path: Path, case: int) -> None:
    which, output, errors = list(unwritable(tmp_path))[case]
    prompts = tmp_path / "in.jsonl"
    prompts.write_text(json.dumps({"id": 1, "prompt": "x"}) + "\n")
    with pytest.raises(ConfigError, match=f"cannot write the {which}"):
        check(Job(prompts, output, errors))
    assert not errors.is_file()
    assert not (tmp_path / "out.jsonl").exists()  # nothing made when the errors file fails


def test_a_good_job_makes_no_errors_file(tmp_path: Path) -> None:
    job = make_job(tmp_path, [json.dumps({"id": 1, "prompt": "x"})])
    with prepare(job) as prepared:
        assert len(prepared.ids) == 1 and prepared.left == 1 and job.output.exists()
    assert not job.errors.exists()


@pytest.mark.anyio
async def test_lone_surrogates_in_ids_and_replies(tmp_path: Path) -> None:
    lines = [
        '{"id": "\\ud800", "prompt": "x"}',
        '{"id": "ok\\udfff", "messages": [{"role": "user", "content": "\\ud800"}]}',
        '{"id": 3, "prompt": "y", "stop": ["\\ud800"]}',
    ]
    job = make_job(tmp_path, lines)
    counts = await run(job, text="reply " + SURROGATE)
    assert (counts.succeeded, counts.failed, counts.malformed) == (3, 0, 0)
    written = records(job.output)
    assert {json.dumps(r["id"]) for r in written} == {
        json.dumps(SURROGATE),
        json.dumps("ok\udfff"),
        "3",
    }
    assert {r["text"] for r in written} == {"reply " + SURROGATE}
    again = await run(job, text="reply " + SURROGATE)
    assert again.skipped == 3 and len(records(job.output)) == 3


@pytest.mark.anyio
async def test_hostile_lines_are_errors_file_entries_and_the_job_goes_on(tmp_path: Path) -> None:
    lines = [
        json.dumps({"id": 1, "prompt": "x"}),
        nested(100_000, 2),
        nested(300, 3),  # deep, but within what the parser and the request encoder take
        '{"id": "\\ud800", "prompt": "x", "p": ' + "[" * 100_000,
        json.dumps({"id": 5, "prompt": "x", "self": 1}),  # not a keyword of ours
        json.dumps({"id": 6, "messages": [], "self": 1, "path": "/x", "headers": 3}),
        "\x1c",  # whitespace to str.strip(), not to bytes.strip(): a line all the same
    ]
    job = make_job(tmp_path, lines)
    counts = await run(job)
    assert counts.read == counts.total == 7
    assert (counts.succeeded, counts.failed, counts.malformed) == (3, 1, 3)
    errors = records(job.errors)
    assert [e["line"] for e in errors] == [2, 4, 7]
    assert "nested too deeply" in errors[0]["error"] and "nested" in errors[1]["error"]
    assert all(len(e["text"]) <= 200 for e in errors)
    assert {r["id"] for r in records(job.output)} == {1, 3, 5, 6}


@pytest.mark.anyio
async def test_a_truncated_input_is_noticed(tmp_path: Path) -> None:
    lines = [json.dumps({"id": i, "prompt": f"prompt {i:04d} " + "x" * 80}) for i in range(1000)]
    job = make_job(tmp_path, lines, concurrency=4)

    def truncate(counts: Counts) -> None:
        if counts.done == 5:
            with job.input.open("r+b") as file:  # as another process would
                file.truncate(len(lines[0]) * 3)

    counts = await run(job, Recorder(truncate), latency=0.001)
    assert counts.total == 1000 and 5 <= counts.read < 1000 and counts.input_shrank
    assert counts.malformed <= 1  # the line cut in two, if the cut fell in the buffer
    assert counts.succeeded + counts.malformed == counts.read
    job.input.write_text("".join(line + "\n" for line in lines))  # put back: a rerun finishes
    again = await run(job)
    assert not again.input_shrank and again.skipped == counts.succeeded
    assert sorted(r["id"] for r in records(job.output)) == list(range(1000))


async def generate(argv: list[str]) -> tuple[int, str]:
    """``servescope generate ARGV`` in this process (on this test's event loop)."""
    args = cli._parser().parse_args(["generate", *argv, "--progress", "none"])
    config, _ = load_pool_config(cli._config_values(args))
    shown = io.StringIO()
    code = await cli._generate(args, config, None, Console(file=shown, width=200), Redactor())
    return code, " ".join(shown.getvalue().split())


@pytest.mark.anyio
async def test_a_finished_job_starts_no_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lines = [json.dumps({"id": i, "prompt": f"p{i}"}) for i in range(20)]
    job = make_job(tmp_path, [*lines, "not json", json.dumps({"id": 3, "prompt": "again"})])
    await run(job)
    finished = job.output.read_bytes()
    started: list[object] = []
    serving = cli._serving

    def spy(*args: Any) -> Any:
        started.append(args)
        return serving(*args)

    monkeypatch.setattr(cli, "_serving", spy)
    argv = [str(job.input), "-o", str(job.output)]
    code, shown = await generate(argv)
    assert code == 0 and started == []
    # Line 22 repeats a done id: skipped as done (as before), no longer a duplicate.
    assert "0 left of 22 lines: 21 done, 1 malformed" in shown and "no server started" in shown
    assert "already done (skipped)" in shown and "written ok" in shown  # the usual summary
    assert job.output.read_bytes() == finished
    errors = records(job.errors)  # this run's malformed lines, reported all the same
    assert [e["line"] for e in errors] == [21] and "not JSON" in errors[0]["error"]
    # One line left: now the server starts (the spy sees it), and only that line is sent.
    job.input.write_text(job.input.read_text() + json.dumps({"id": "new", "prompt": "x"}) + "\n")
    code, shown = await generate(argv)
    assert code == 0 and len(started) == 1
    assert sorted(map(str, (r["id"] for r in records(job.output)))) == sorted(
        [*map(str, range(20)), "new"]
    )


def test_ids_set_apart_by_the_last_digest_byte_are_distinct(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Stand-in hashes whose digests of ids ``"a..."`` share all but the last byte, and
    whose bucket is the same for every id: the worst case for the search."""
    monkeypatch.setattr(_generate, "_hash", lambda key: 0)
    monkeypatch.setattr(_generate, "_crc", lambda key: key[-2] << 24)  # the last byte
    ids = IdSet()
    assert ids.add("a", DONE) is None and ids.add("b", PENDING) is None
    assert ids.get("a") == DONE and ids.get("b") == PENDING and ids.get("c") is None
    assert ids.put("b", SENT) == PENDING and ids.get("b") == SENT and len(ids) == 2


def test_a_digest_found_across_two_records_is_no_match(monkeypatch: pytest.MonkeyPatch) -> None:
    record = _generate.RECORD
    ids = IdSet(1_000_000)  # room for more than two records in a bucket
    # Two records whose bytes, read across their boundary, spell a third id's digest.
    first = bytes(range(1, record)) + b"\1"
    second = bytes(range(record, 2 * record - 1)) + b"\1"
    ids._slab[: 2 * record] = first + second
    ids._fill[0] = 2 * record
    needle = (first + second)[5 : 5 + record - 1]
    # pack("<qI", hash, crc)[2:] == needle, in bucket 0
    monkeypatch.setattr(
        _generate, "_hash", lambda key: int.from_bytes(b"\0\0" + needle[:6], "little", signed=True)
    )
    monkeypatch.setattr(_generate, "_crc", lambda key: int.from_bytes(needle[6:], "little"))
    assert ids.get("x") is None
    assert ids.add("x", PENDING) is None and ids.get("x") == PENDING
    assert bytes(ids._slab[: 2 * record]) == first + second and ids._fill[0] == 3 * record


@pytest.mark.parametrize("expected", [0, 100_000])
def test_a_bucket_past_its_slot_goes_on_apart(
    monkeypatch: pytest.MonkeyPatch, expected: int
) -> None:
    """Every id in one bucket (a stand-in hash): the slot fills, the rest spill."""
    ids = IdSet(expected)
    monkeypatch.setattr(_generate, "_hash", lambda key: hash(key) & ~0xFFFF)
    for key in range(100):
        assert ids.add(key, DONE) is None
    assert ids._overflow and len(ids) == 100
    for key in range(100):
        assert ids.put(key, SENT) == DONE and ids.get(key) == SENT
    assert ids.get(100) is None and ids.get("0") is None and len(ids) == 100
    more = IdSet(expected)  # the same through append (an output's ids)
    more.append([b"%d" % key for key in range(100)], DONE)
    assert more._overflow and all(more.get(key) == DONE for key in range(100))


def test_ids_of_different_types_are_distinct() -> None:
    ids = IdSet()
    assert ids.add(1, DONE) is None
    assert ids.get("1") is None and ids.get(True) is None and 1 in ids
    assert ids.add("1", PENDING) is None and ids.get(1) == DONE and ids.get("1") == PENDING
    assert ids.add(True, DONE) is None and len(ids) == 2  # no input id is a bool: not kept
    assert ids.add([1], DONE) is None and ids.add(1.0, DONE) is None and len(ids) == 2
    assert ids.add(SURROGATE, DONE) is None and SURROGATE in ids and SURROGATE + "x" not in ids


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.one_of(st.integers(), st.text(max_size=5)),
            st.sampled_from([None, DONE, PENDING, SENT]),
            st.booleans(),
        )
    )
)
def test_ids_set_is_a_mapping(operations: list[tuple[str | int, int | None, bool]]) -> None:
    """Against a dict: ``put`` (replace or not) answers the state before, as a dict would."""
    ids, model = IdSet(), dict[str, int]()
    for key, state, replace in operations:
        name = json.dumps(key)
        assert ids.put(key, state, replace=replace) == model.get(name)
        if state is not None and (replace or name not in model):
            model[name] = state
        assert len(ids) == len(model)
    assert all(ids.get(json.loads(name)) == state for name, state in model.items())


@pytest.mark.anyio
async def test_duplicates_are_reported_and_sent_once(tmp_path: Path) -> None:
    lines = [json.dumps({"id": i % 5, "prompt": f"p{i}"}) for i in range(8)]  # 5..7 repeat
    lines.append(json.dumps({"prompt": "no id: its line number, 9"}))
    lines.append(json.dumps({"id": 9, "prompt": "the same id as line 9's"}))
    job = make_job(tmp_path, lines)
    counts = await run(job)
    assert (counts.succeeded, counts.malformed, counts.skipped) == (6, 4, 0)
    assert sorted(r["id"] for r in records(job.output)) == [0, 1, 2, 3, 4, 9]
    assert [e["line"] for e in records(job.errors)] == [6, 7, 8, 10]
    assert all("duplicate id" in e["error"] for e in records(job.errors))
    again = await run(job)  # a repeat of a done id is skipped as done, as before
    assert (again.succeeded, again.malformed, again.skipped) == (0, 0, 10)
    assert len(records(job.output)) == 6


@pytest.mark.anyio
async def test_a_half_done_job_sends_only_the_rest(tmp_path: Path) -> None:
    lines = [json.dumps({"id": f"k{i}", "prompt": f"p{i}"}) for i in range(300)]
    job = make_job(tmp_path, lines)
    job.output.write_text("".join(json.dumps({"id": f"k{i}"}) + "\n" for i in range(0, 300, 2)))
    with prepare(job) as prepared:
        assert (prepared.total, prepared.left, prepared.skipped) == (300, 150, 150)
        assert len(prepared.send) <= 300 // 8 + 4097  # a bit a line
    counts = await run(job)
    assert (counts.succeeded, counts.skipped, counts.read) == (150, 150, 300)
    assert sorted(r["id"] for r in records(job.output)) == sorted(f"k{i}" for i in range(300))


def as_json_loads(text: str | bytes) -> tuple[str, object]:
    """What ``json.loads`` makes of ``text``: ("value", it) or ("error", what is wrong)."""
    try:
        return "value", json.loads(text)
    except ValueError as exc:
        return "error", str(exc)
    except RecursionError:
        return "error", "nested too deeply"


def as_fast(read: Callable[[Any], object], text: str | bytes) -> tuple[str, object]:
    try:
        return "value", read(text)
    except ValueError as exc:
        return "error", str(exc).removeprefix("not JSON: ")
    except RecursionError:
        return "error", "nested too deeply"


def as_record(text: str) -> tuple[str, object]:
    """What ``_record`` should make of ``text``: what json.loads does, objects only."""
    kind, value = as_json_loads(text)
    if kind == "value" and not isinstance(value, dict):
        return "error", f"expected a JSON object, got {type(value).__name__}"
    return kind, value


TRICKY = [
    '{"id": 1}\n', '{"id": 1} \t\r\n', ' {"id": 1}', '{"id": 1} x', '{"id": 1}{}', "",
    " ", "\ufeff{}", "1 2", '{"a": NaN}', " " + "[" * 100_000, "[" * 100_000 + "]",
    '{"id": "\\ud800"}', "{}\n\n", "{}\x0c", '{"id": 1', '{"a": 1, "a": 2}', "[1, 2]",
]  # fmt: skip


@pytest.mark.parametrize("text", TRICKY)
def test_input_lines_read_as_json_loads_reads_them(text: str) -> None:
    kind, got = as_fast(_generate._record, text)
    assert (kind, got) == as_record(text) or "nested too deeply" in str(got)


@pytest.mark.parametrize("raw", [t.encode("utf-8", "surrogatepass") for t in TRICKY])
def test_output_lines_read_as_json_loads_reads_them(raw: bytes) -> None:
    assert as_fast(_generate._load_result, raw) == as_json_loads(raw)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=' {}[]"\\:,0123456789.eE+-nultrfasx\n\t\ud800é', max_size=30))
def test_any_text_reads_as_json_loads_reads_it(text: str) -> None:
    assert as_fast(_generate._record, text) == as_record(text)
    raw = text.encode("utf-8", "surrogatepass")
    assert as_fast(_generate._load_result, raw) == as_json_loads(raw)


@pytest.mark.anyio
async def test_an_input_changed_after_the_plan_sends_no_id_twice(tmp_path: Path) -> None:
    """The run checks each line it sends again: lines rewritten between the plan and the
    run to hold a done id, or one sent already, are not sent (a new id is)."""
    lines = [json.dumps({"id": i, "prompt": f"p{i}"}) for i in range(6)]
    job = make_job(tmp_path, lines)
    job.output.write_text(json.dumps({"id": 0}) + "\n")
    with anyio.fail_after(30), prepare(job) as prepared:
        assert prepared.left == 5
        new = json.dumps({"id": 9, "prompt": "x"})
        changed = [lines[0], lines[0], lines[1], lines[1], "{", new]
        job.input.write_text("".join(line + "\n" for line in changed))
        counts = prepared.counts()
        async with open_server(DummyConfig()) as server:
            await run_job(server, job, prepared, Recorder(), counts)
    assert sorted(r["id"] for r in records(job.output)) == [0, 1, 9]
    assert (counts.succeeded, counts.skipped, counts.malformed) == (2, 2, 2)
    assert [e["line"] for e in records(job.errors)] == [4, 5]
