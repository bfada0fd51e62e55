"""The ``servescope`` console script, end to end in a subprocess, on the dummy backend."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from .conftest import DUMMY_SCRIPT

SCRIPT = Path(sys.executable).with_name("servescope")


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def write_prompts(path: Path, count: int, *, extra: tuple[str, ...] = ()) -> list[object]:
    ids: list[object] = []
    with path.open("w") as file:
        for i in range(count):
            record: dict[str, object]
            if i % 2:
                record = {"id": f"q{i}", "messages": [{"role": "user", "content": f"hi {i}"}]}
            else:
                record = {"id": i, "prompt": f"once upon {i}", "max_tokens": 3}
            ids.append(record["id"])
            file.write(json.dumps(record) + "\n")
        for line in extra:
            file.write(line + "\n")
    return ids


def output_ids(path: Path) -> Counter[str]:
    """Every output line is valid JSON with an id; the ids, counted."""
    counts: Counter[str] = Counter()
    for line in path.read_text().splitlines():
        record = json.loads(line)
        counts[json.dumps(record["id"])] += 1
    return counts


def test_full_run(tmp_path: Path) -> None:
    prompts, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    extra = (
        "this is not json",
        json.dumps({"prompt": "no id, so its line number"}),
        json.dumps({"id": "bad", "messages": []}),  # the server answers 400: BadRequest
        json.dumps({"id": "both", "prompt": "x", "messages": []}),
        json.dumps({"id": 2, "prompt": "duplicate id"}),
    )
    ids = write_prompts(prompts, 50, extra=extra)
    done = run("generate", str(prompts), "-o", str(out), "--max-tokens", "5")
    assert done.returncode == 0, done.stderr
    counts = output_ids(out)
    assert set(counts) == {json.dumps(i) for i in [*ids, 52, "bad"]}
    assert set(counts.values()) == {1}
    records = {json.dumps(r["id"]): r for r in map(json.loads, out.read_text().splitlines())}
    assert records["52"]["id_from_line_number"] is True
    assert records['"bad"']["error"]["type"] == "BadRequest"
    assert records['"q1"']["text"] and records['"q1"']["usage"]["completion_tokens"] == 5
    assert records["0"]["usage"]["completion_tokens"] == 3  # the line's own max_tokens wins
    errors = [json.loads(line) for line in (tmp_path / "out.jsonl.errors").read_text().splitlines()]
    assert [e["line"] for e in errors] == [51, 54, 55]
    assert "not JSON" in errors[0]["error"] and "duplicate id 2" in errors[2]["error"]
    assert "written ok" in done.stderr  # the summary table
    assert "in.jsonl:51: not JSON" in done.stderr  # malformed lines are reported as they come
    # Run again: everything is skipped, nothing is written twice.
    again = run("generate", str(prompts), "-o", str(out))
    assert again.returncode == 0, again.stderr
    assert output_ids(out) == counts


def interrupted_then_resumed(tmp_path: Path, how: signal.Signals) -> subprocess.Popen[str]:
    prompts, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    ids = write_prompts(prompts, 400)
    command = [str(SCRIPT), "generate", str(prompts), "-o", str(out), "--concurrency", "8"]
    command += ["--progress", "none"]
    if how == signal.SIGTERM:  # a server process too: the leak check sees it torn down
        extra = json.dumps(["--latency", "0.02"])
        command += ["--backend", "custom", "--script", str(DUMMY_SCRIPT)]
        command += ["--set", f"extra_args={extra}", "--set", "shutdown_grace=2"]
    else:
        command += ["--set", "latency=0.02"]
    job = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (not out.exists() or out.stat().st_size < 2000):
        time.sleep(0.02)
    job.send_signal(how)
    job.communicate(timeout=30)
    partial = output_ids(out) if how != signal.SIGKILL else None
    if partial is not None:
        assert 0 < len(partial) < 400 and set(partial.values()) == {1}
    rerun = run(*command[1:], timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    counts = output_ids(out)
    assert set(counts) == {json.dumps(i) for i in ids}
    assert set(counts.values()) == {1}, "an id was written twice"
    return job


@pytest.mark.parametrize(
    ("how", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGKILL, -9)]
)
def test_interrupted_job_resumes_without_duplicates(
    tmp_path: Path, how: signal.Signals, code: int
) -> None:
    job = interrupted_then_resumed(tmp_path, how)
    assert job.returncode == code


def test_torn_last_line_is_cut_off(tmp_path: Path) -> None:
    prompts, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    ids = write_prompts(prompts, 10)
    out.write_text(json.dumps({"id": 0, "text": "x"}) + '\n{"id": 1, "te')
    done = run("generate", str(prompts), "-o", str(out))
    assert done.returncode == 0, done.stderr
    counts = output_ids(out)
    assert set(counts) == {json.dumps(i) for i in ids} and set(counts.values()) == {1}


def test_foreign_output_file_is_refused(tmp_path: Path) -> None:
    prompts, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_prompts(prompts, 3)
    out.write_text("not ours\n" + json.dumps({"id": 0}) + "\n")
    done = run("generate", str(prompts), "-o", str(out))
    assert done.returncode == 2
    assert "out.jsonl:1 is not a result line" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("config", "flags", "message"),
    [
        ('backend = "dummy"\nlatncy = 0.1\n', [], "unknown key 'latncy' (did you mean 'latency'?)"),
        ('backend = "vllm"\ntp = "two"\n', [], "tp: Input should be a valid integer"),
        ('backend = "tgi"\n', [], "unknown backend 'tgi'; allowed: custom, dummy, endpoint"),
        ("latency = [unclosed\n", [], "is not valid TOML"),
        ('backend = "dummy"\n', ["--set", "nonsense"], "--set needs KEY=VALUE"),
        ('backend = "vllm"\n', [], "model: required"),
    ],
)
def test_bad_config_is_a_clear_error(
    tmp_path: Path, config: str, flags: list[str], message: str
) -> None:
    prompts, path = tmp_path / "in.jsonl", tmp_path / "config.toml"
    write_prompts(prompts, 1)
    path.write_text(config)
    done = run("generate", str(prompts), "-o", str(tmp_path / "o"), "--config", str(path), *flags)
    assert done.returncode == 2
    assert message in done.stderr.replace("\n", " ")
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "o").exists()


def test_flags_override_the_config_file(tmp_path: Path) -> None:
    prompts, path, out = tmp_path / "in.jsonl", tmp_path / "c.json", tmp_path / "out.jsonl"
    write_prompts(prompts, 2)
    path.write_text(json.dumps({"backend": "dummy", "text": "from the file", "model": "a"}))
    done = run("generate", str(prompts), "-o", str(out), "--config", str(path), "--set", 'text="B"')
    assert done.returncode == 0, done.stderr
    assert {json.loads(line)["text"] for line in out.read_text().splitlines()} == {"B"}


def test_crashed_server_stops_the_job_with_finished_lines_on_disk(tmp_path: Path) -> None:
    prompts, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_prompts(prompts, 2000)
    extra = json.dumps(["--exit-after", "2", "--latency", "0.02"])
    done = run(
        "generate", str(prompts), "-o", str(out), "--backend", "custom",
        "--script", str(DUMMY_SCRIPT), "--set", f"extra_args={extra}", "--concurrency", "4",
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert "server failed" in done.stderr and "exited with code 1" in done.stderr
    counts = output_ids(out)
    assert 0 < len(counts) < 2000 and set(counts.values()) == {1}


def test_serve_prints_its_url_and_stops_cleanly_on_sigterm() -> None:
    server = subprocess.Popen(
        [str(SCRIPT), "serve", "--set", 'text="served"'],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        url, model = line.split()
        assert model == "model=dummy"
        answer = httpx.post(
            url + "/chat/completions",
            json={"model": "dummy", "messages": [{"role": "user", "content": "hi"}]},
            timeout=10,
        )
        assert answer.json()["choices"][0]["message"]["content"] == "served"
    finally:
        server.send_signal(signal.SIGTERM)
        server.communicate(timeout=30)
    assert server.returncode == 0


def test_progress_lines_when_not_a_terminal(tmp_path: Path) -> None:
    prompts, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_prompts(prompts, 40)
    done = run(
        "generate", str(prompts), "-o", str(out), "--set", "latency=0.01",
        "--concurrency", "4", "--progress-interval", "0.02",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("servescope generate:")]
    assert lines, done.stderr
    assert "/40 done" in lines[-1] and "req/s" in lines[-1] and "ETA" in lines[-1]


def test_version_and_usage_errors() -> None:
    version = run("--version")
    assert version.returncode == 0 and version.stdout.startswith("servescope ")
    usage = run("generate")  # no input, no output
    assert usage.returncode == 2 and "required" in usage.stderr
