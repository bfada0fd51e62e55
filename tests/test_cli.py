"""The ``servescope`` console script, end to end in a subprocess, on the dummy backend."""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from .conftest import DUMMY_SCRIPT

SCRIPT = Path(sys.executable).with_name("servescope")


def run(
    *args: str, timeout: float = 60, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=None if env is None else {**os.environ, **env},
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


def wait_for_output(out: Path, size: int, job: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (not out.exists() or out.stat().st_size < size):
        assert job.poll() is None, job.communicate()
        time.sleep(0.01)


@pytest.fixture
def refused_url() -> Iterator[str]:
    """An endpoint URL nothing listens at: a server start there fails at once (exit 1)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"


def test_truncated_input_exits_3_and_a_rerun_finishes(tmp_path: Path) -> None:
    prompts, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    ids = write_prompts(prompts, 2000)
    command = [str(SCRIPT), "generate", str(prompts), "-o", str(out), "--progress", "none"]
    job = subprocess.Popen(
        [*command, "--concurrency", "4", "--set", "latency=0.02"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_output(out, 500, job)
        with prompts.open("r+b") as file:  # another process cuts the input short
            file.truncate(300)
    finally:
        _, stderr = job.communicate(timeout=60)
    assert job.returncode == 3, stderr
    found = re.search(r"read (\d+) of the 2000 lines", stderr.replace("\n", " "))
    assert found and 0 < int(found[1]) < 2000, stderr
    assert "rerun" in stderr and "Traceback" not in stderr
    partial = output_ids(out)
    assert 0 < len(partial) < 2000 and set(partial.values()) == {1}
    write_prompts(prompts, 2000)
    rerun = run(*command[1:])
    assert rerun.returncode == 0, rerun.stderr
    counts = output_ids(out)
    assert set(counts) == {json.dumps(i) for i in ids} and set(counts.values()) == {1}


def test_second_job_on_the_same_output_is_refused(tmp_path: Path) -> None:
    prompts, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_prompts(prompts, 2000)  # ~25 s: still running when SIGINT comes
    command = [str(SCRIPT), "generate", str(prompts), "-o", str(out), "--progress", "none"]
    command += ["--concurrency", "4", "--set", "latency=0.05"]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_output(out, 100, first)
        second = run(*command[1:])
    finally:
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=30)
    assert second.returncode == 2, second.stderr
    assert first.returncode == 130  # still running when the second was refused
    assert f"{out} is being written by another servescope generate job" in second.stderr.replace(
        "\n", " "
    )
    assert "Traceback" not in second.stderr
    counts = output_ids(out)
    assert 0 < len(counts) < 2000 and set(counts.values()) == {1}


def test_a_locked_output_is_refused_before_the_server_starts(
    tmp_path: Path, refused_url: str
) -> None:
    prompts, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_prompts(prompts, 3)
    with out.open("ab") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        done = run(
            "generate", str(prompts), "-o", str(out), "--backend", "endpoint",
            "--url", refused_url, "--model", "m",
        )  # fmt: skip
    assert done.returncode == 2, done.stderr  # not 1: the endpoint was never tried
    assert "another servescope generate job" in done.stderr
    assert out.read_bytes() == b""


@pytest.mark.parametrize("where", ["output under a file", "output dir missing", "errors dir"])
def test_unwritable_output_or_errors_file_is_refused_before_the_server_starts(
    tmp_path: Path, refused_url: str, where: str
) -> None:
    prompts, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_prompts(prompts, 3)
    (tmp_path / "a-file").write_text("")
    flags = {
        "output under a file": ["-o", str(tmp_path / "a-file" / "out.jsonl")],
        "output dir missing": ["-o", str(tmp_path / "no" / "out.jsonl")],
        "errors dir": ["-o", str(out), "--errors", str(tmp_path / "no" / "x.errors")],
    }[where]
    done = run(
        "generate", str(prompts), *flags, "--backend", "endpoint", "--url", refused_url,
        "--model", "m",
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    which = "errors file" if where == "errors dir" else "output"
    assert f"cannot write the {which}" in done.stderr.replace("\n", " ")
    assert "Traceback" not in done.stderr
    assert not out.exists()


def test_lone_surrogates_in_ids_and_replies_are_written_and_resumed(tmp_path: Path) -> None:
    prompts, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_prompts(prompts, 4, extra=('{"id": "\\ud800", "prompt": "x"}',))
    command = ["generate", str(prompts), "-o", str(out), "--set", 'text="\\udfffreply"']
    done = run(*command)
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in out.read_bytes().decode().splitlines()]
    assert len(records) == 5 and {r["text"] for r in records} == {"\udfffreply"}
    assert json.dumps("\ud800") in output_ids(out)
    again = run(*command)
    assert again.returncode == 0, again.stderr
    assert set(output_ids(out).values()) == {1} and len(output_ids(out)) == 5


def test_deeply_nested_line_is_reported_and_skipped(tmp_path: Path) -> None:
    prompts, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    deep = '{"id": 9, "prompt": "x", "p": ' + "[" * 100_000 + "]" * 100_000 + "}"
    write_prompts(prompts, 3, extra=(deep, json.dumps({"id": 10, "prompt": "y"})))
    done = run("generate", str(prompts), "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert "in.jsonl:4:" in done.stderr and "nested" in done.stderr
    assert "Traceback" not in done.stderr
    assert set(output_ids(out)) == {"0", '"q1"', "2", "10"}
    errors = [json.loads(line) for line in (tmp_path / "out.jsonl.errors").read_text().splitlines()]
    assert [e["line"] for e in errors] == [4] and len(errors[0]["text"]) == 200


def test_concurrency_help_is_true_for_each_command() -> None:
    generate, serve = run("generate", "--help"), run("serve", "--help")
    assert "(default 64)" in " ".join(generate.stdout.split())
    assert "(default 500)" in " ".join(serve.stdout.split())


class EchoesTheKey(BaseHTTPRequestHandler):
    """A broken endpoint whose error pages quote the request's Authorization header:
    ``GET /v1/models`` answers 500, or with ``models_ok`` 200 and then every request 400."""

    models_ok = False

    def do_GET(self) -> None:
        if self.models_ok:
            self.answer(200, json.dumps({"object": "list", "data": [{"id": "m"}]}))
        else:
            self.answer(500, f"internal error; you sent {self.headers['Authorization']}")

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.answer(400, f"bad request; you sent {self.headers['Authorization']}")

    def answer(self, status: int, text: str) -> None:
        body = text.encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        return None


class ModelsOk(EchoesTheKey):
    models_ok = True


@pytest.fixture(params=[EchoesTheKey, ModelsOk], ids=["fails-to-start", "requests-fail"])
def echoing_endpoint(request: pytest.FixtureRequest) -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), request.param)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


KEY = "sk-test-7f3a9c-never-printed"


def test_the_api_key_is_never_printed_or_written(tmp_path: Path, echoing_endpoint: str) -> None:
    """Not in an error message, a log line, or an error written to the results."""
    prompts, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_prompts(prompts, 3)
    done = run(
        "generate", str(prompts), "-o", str(out), "--backend", "endpoint", "--url",
        echoing_endpoint, "--model", "m", "--log-level", "DEBUG",
        env={"SERVESCOPE_API_KEY": KEY},
    )  # fmt: skip
    assert KEY not in done.stderr + done.stdout + out.read_text()
    if done.returncode == 1:  # the start check failed
        assert "answered 500" in done.stderr and "you sent Bearer **********" in done.stderr
    else:
        assert done.returncode == 0, done.stderr
        messages = {json.loads(line)["error"]["message"] for line in out.read_text().splitlines()}
        assert messages and all(m.endswith("you sent Bearer **********") for m in messages)


def test_the_api_key_is_never_printed_when_the_config_fails(tmp_path: Path) -> None:
    prompts = tmp_path / "in.jsonl"
    write_prompts(prompts, 1)
    done = run(
        "generate", str(prompts), "-o", str(tmp_path / "out"), "--backend", "endpoint",
        "--url", f"ftp://{KEY}@example", "--model", "m", env={"SERVESCOPE_API_KEY": KEY},
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "must start with http://" in done.stderr and "**********" in done.stderr
    assert KEY not in done.stderr + done.stdout


def test_generate_with_replicas_survives_replicas_crashing(tmp_path: Path) -> None:
    """``--replicas 2``: both fake engines exit by themselves mid-job (every 1.5 s of
    their life); the pool re-sends their requests and restarts them, and the job
    finishes with every id exactly once and exit 0 (one server would have stopped it)."""
    started = time.monotonic()
    prompts, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    ids = write_prompts(prompts, 400)  # ~2.5 s at 16 in flight: each replica dies twice
    config = tmp_path / "pool.json"
    config.write_text(
        json.dumps(
            {
                "backend": "custom",
                "script": str(DUMMY_SCRIPT),
                "extra_args": ["--latency", "0.1", "--exit-after", "1.0"],
                "replicas": 2,
                "restart_backoff": 0.05,
                "max_restarts": 50,
                "shutdown_grace": 1,
            }
        )
    )
    done = run(
        "generate",
        str(prompts),
        "-o",
        str(out),
        "--config",
        str(config),
        "--concurrency",
        "8",
        "--progress",
        "none",
        timeout=60,  # ~4 s; a breaker opened by every crash made it ~120 s
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert output_ids(out) == Counter(json.dumps(i) for i in ids)
    assert not any("error" in json.loads(line) for line in out.read_text().splitlines())
    assert time.monotonic() - started > 2.5  # it did outlive its replicas' lives


def test_serve_with_replicas_prints_each_replica(tmp_path: Path) -> None:
    command = [str(SCRIPT), "serve", "--replicas", "2", "--set", "routing=round_robin"]
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as server:
        try:
            assert server.stdout is not None
            lines = [server.stdout.readline() for _ in range(2)]
            urls = [line.split()[0] for line in lines]
            assert [line.split()[-1] for line in lines] == ["replica=0", "replica=1"], lines
            message = [{"role": "user", "content": "hi"}]
            for url in urls:
                body = {"model": "dummy", "messages": message}
                assert httpx.post(f"{url}/chat/completions", json=body).status_code == 200
            server.send_signal(signal.SIGTERM)
            assert server.wait(timeout=20) == 0
        finally:
            server.kill()


def test_pool_settings_without_a_pool_are_refused_by_load_config(tmp_path: Path) -> None:
    import servescope

    with pytest.raises(servescope.ConfigError, match="load_pool_config"):
        servescope.load_config({"backend": "dummy", "replicas": 3})
    config, pool = servescope.load_pool_config({"backend": "dummy", "replicas": 3})
    assert (type(config).__name__, pool.replicas) == ("DummyConfig", 3)
    bad = run("generate", str(tmp_path / "x.jsonl"), "-o", str(tmp_path / "o"), "--replicas", "0")
    assert bad.returncode == 2 and "replicas" in bad.stderr


def test_route_fronts_a_config_of_replicas_and_a_worker_then_stops_on_sigterm(
    tmp_path: Path,
) -> None:
    """``route --config`` launches replicas, ``--worker-url`` adds someone else's server;
    one endpoint answers for both; SIGTERM stops everything it started."""
    worker = subprocess.Popen(
        [str(SCRIPT), "serve", "--set", 'text="from-worker"'],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    config = tmp_path / "pool.toml"
    config.write_text('backend = "dummy"\ntext = "from-replica"\nreplicas = 1\n')
    router = None
    try:
        assert worker.stdout is not None
        worker_url = worker.stdout.readline().split()[0]
        router = subprocess.Popen(
            [
                str(SCRIPT), "route", "--config", str(config), "--worker-url", worker_url,
                "--port", "0", "--routing", "round_robin", "--min-ready", "2",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        assert router.stdout is not None
        url, model = router.stdout.readline().split()
        assert model == "model=dummy" and url.endswith("/v1")
        front = url.removesuffix("/v1")
        deadline = time.monotonic() + 30
        while httpx.get(front + "/readiness").status_code != 200:
            assert time.monotonic() < deadline, "the front never became ready"
            time.sleep(0.05)
        texts = set()
        for _ in range(4):
            answer = httpx.post(
                url + "/chat/completions",
                json={"model": "dummy", "messages": [{"role": "user", "content": "hi"}]},
                timeout=10,
            )
            texts.add(answer.json()["choices"][0]["message"]["content"])
        assert texts == {"from-worker", "from-replica"}
    finally:
        for process in (router, worker):
            if process is not None:
                process.send_signal(signal.SIGTERM)
                process.communicate(timeout=30)
    assert router is not None and router.returncode == 0
    assert worker.returncode == 0


def test_route_refuses_what_cannot_work() -> None:
    exposed = run("route", "--model", "m", "--host", "0.0.0.0", env={"SERVESCOPE_ADMIN_TOKEN": ""})
    assert exposed.returncode == 2 and "needs an admin token" in exposed.stderr
    nothing = run("route")
    assert nothing.returncode == 2 and "needs --model" in nothing.stderr
    secret = "admin-token-that-must-not-show"
    bad = run("route", "--model", "m", "--set", "queue_size=-1", "--admin-token", secret)
    assert bad.returncode == 2 and "queue_size" in bad.stderr and secret not in bad.stderr


def test_serve_refuses_a_front_url_it_cannot_use_before_starting() -> None:
    bad = run("serve", "--register-with", "router:8000")
    assert bad.returncode == 2 and "--register-with must start with http://" in bad.stderr
    lonely = run("serve", "--advertise-url", "http://10.0.0.1:8000")
    assert lonely.returncode == 2 and "--register-with" in lonely.stderr


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_a_big_job_is_planned_stops_the_plan(tmp_path: Path, signum: int) -> None:
    """The plan is synchronous work (seconds at millions of lines): Ctrl-C or SIGTERM
    stops it where it is (it used to run to its end first), exit 128 + signal, no
    traceback, no output file left behind."""
    prompts = tmp_path / "big.jsonl"
    prompts.write_text("".join(f'{{"id": {i}, "prompt": "p"}}\n' for i in range(1_000_000)))
    output = tmp_path / "out.jsonl"
    # SIGINT restored to its default first: a suite started in the background of a
    # non-interactive shell (nohup ... &) hands SIG_IGN down, and an ignored SIGINT is
    # rightly ignored by the job.
    sigint_default = "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
    sigint_default += "os.execv(sys.argv[1], sys.argv[1:])"
    command = [str(SCRIPT), "generate", str(prompts), "-o", str(output)]
    job = subprocess.Popen(
        [sys.executable, "-c", sigint_default, *command],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(0.8)  # the interpreter is up; the plan reads 1,000,000 lines (seconds)
    job.send_signal(signum)
    _, err = job.communicate(timeout=60)
    assert job.returncode == 128 + signum, err
    assert "Traceback" not in err
    name = signal.Signals(signum).name
    if "while planning the run" in err:  # (a slow start may still be importing: Ctrl-C)
        assert f"stopped by {name} while planning the run; rerun the same command" in err
    else:
        assert signum == signal.SIGINT and "interrupted; rerun the same command" in err
    assert not output.exists()


def test_the_plan_gives_the_event_loop_its_signal_handlers_back(tmp_path: Path) -> None:
    """After the plan, SIGINT and SIGTERM are the run's again (a graceful stop that writes
    what is done), and an ignored SIGINT stays ignored through the plan."""
    from servescope._generate import Job
    from servescope.cli import _planned

    prompts = tmp_path / "in.jsonl"
    write_prompts(prompts, 3)
    job = Job(input=prompts, output=tmp_path / "out.jsonl", errors=tmp_path / "errors")
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        term = signal.getsignal(signal.SIGTERM)
        with _planned(job) as prepared:
            assert prepared.left == 3
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) is term
    finally:
        signal.signal(signal.SIGINT, before)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "no node roles for a multi-node server"),
        ({"NNODES": "2", "NODE_RANK": "1"}, "incomplete node roles from torchrun"),
        ({"NNODES": "2", "NODE_RANK": "0", "MASTER_ADDR": "127.0.0.1"}, "needs a token shared"),
        (
            {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "h", "SLURM_NNODES": "3",
             "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "n[1-3]"},
            "the node roles disagree",
        ),
    ],
)  # fmt: skip
def test_nodes_without_usable_roles_is_a_clear_error(
    tmp_path: Path, env: dict[str, str], message: str
) -> None:
    """``--nodes`` reads the roles from the environment: missing, incomplete or
    disagreeing ones (or no token) stop serve and generate at once, exit 2, no traceback."""
    prompts = tmp_path / "in.jsonl"
    write_prompts(prompts, 1)
    clean = {name: "" for name in ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")}
    clean |= {"SLURM_NNODES": "", "SLURM_NODEID": "", "SLURM_JOB_NODELIST": ""}
    clean |= {"DATATROVE_NODE_RANK": "", "DATATROVE_NODE_IPS": "", "SERVESCOPE_NODE_TOKEN": ""}
    flags = ["--backend", "vllm", "--model", "m", "--nodes"]
    for command in (["serve"], ["generate", str(prompts), "-o", str(tmp_path / "o")]):
        done = run(*command, *flags, env={**clean, **env}, timeout=30)
        assert done.returncode == 2, done.stderr
        assert message in done.stderr.replace("\n", " ")
        assert "Traceback" not in done.stderr
    assert not (tmp_path / "o").exists()
