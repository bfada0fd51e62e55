"""A real datatrove pipeline (LocalPipelineExecutor, JsonlReader, the drop-in runner,
JsonlWriter) on servescope's servers, and the failures datatrove's own runner does not
survive: each an error within a second, with nothing left running."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

pytest.importorskip("servescope.integrations.datatrove", exc_type=ImportError)
from datatrove.executor.local import LocalPipelineExecutor  # type: ignore[import-not-found, import-untyped, unused-ignore]
from datatrove.pipeline.readers import JsonlReader  # type: ignore[import-not-found, import-untyped, unused-ignore]
from datatrove.pipeline.writers import JsonlWriter  # type: ignore[import-not-found, import-untyped, unused-ignore]

import servescope
from servescope._supervisor import CRASH_GRACE
from servescope.integrations.datatrove import InferenceConfig, InferenceRunner

from ..conftest import DUMMY_SCRIPT

OOM = "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 GiB (at {time})"


@pytest.fixture(autouse=True)
def datatrove_env() -> Iterator[None]:
    """datatrove's executor writes DATATROVE_* into os.environ: put it back."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


async def rollout(document: Any, generate: Any) -> str:
    messages = [{"role": "user", "content": document.text}]
    result = await generate({"messages": messages, "max_tokens": 8})
    return str(result.text)


def write_input(folder: Path, count: int, files: int = 1) -> list[str]:
    folder.mkdir(parents=True)
    ids = [f"doc-{i}" for i in range(count)]
    for part in range(files):
        with (folder / f"input-{part}.jsonl").open("w") as file:
            for doc_id in ids[part::files]:
                file.write(json.dumps({"id": doc_id, "text": f"text of {doc_id}"}) + "\n")
    return ids


def run_pipeline(
    tmp_path: Path, config: Any, count: int = 20, tasks: int = 1, **runner: Any
) -> list[str]:
    """Run the pipeline on ``count`` documents (a file per task, ``tasks`` tasks at once);
    the ids written."""
    write_input(tmp_path / "input", count, files=tasks)
    executor = LocalPipelineExecutor(
        pipeline=[
            JsonlReader(str(tmp_path / "input")),
            InferenceRunner(
                rollout, config, JsonlWriter(str(tmp_path / "output"), compression=None), **runner
            ),
        ],
        tasks=tasks,
        workers=tasks,
        # not datatrove's default forkserver: its daemon and resource tracker would live
        # as long as the test process (and fail the leak check)
        start_method="fork",
        logging_dir=str(tmp_path / "logs"),
        skip_completed=False,
    )
    executor.run()
    out = tmp_path / "output"
    written = []
    for path in sorted(out.glob("*.jsonl")) if out.exists() else []:
        for line in path.read_text().splitlines():
            document = json.loads(line)
            assert document["metadata"]["rollout_results"], document
            assert all(
                isinstance(text, str) and text for text in document["metadata"]["rollout_results"]
            )
            written.append(document["id"])
    return written


def failing(tmp_path: Path, config: Any, **runner: Any) -> tuple[servescope.ServerError, float]:
    """Run a pipeline that must fail: the error and when it came out."""
    with pytest.raises(servescope.ServerError) as info:
        run_pipeline(tmp_path, config, count=100, **runner)
    return info.value, time.time()


def custom(tmp_path: Path, **model_kwargs: Any) -> Any:
    """A custom server: ``python -m servescope.dummy``'s script, flags from model_kwargs."""
    return InferenceConfig(
        server_type="custom",
        model_name_or_path="dummy",
        model_kwargs={"server_script": str(DUMMY_SCRIPT), **model_kwargs},
        server_log_folder=str(tmp_path / "server-logs"),
    )


def gone(pid_file: Path) -> None:
    """Every process the server's pid file names is gone now (not in a second)."""
    pids = json.loads(pid_file.read_text())
    for pid in [pids["server"], *pids["children"]]:
        try:
            status = psutil.Process(pid).status()
        except psutil.NoSuchProcess:
            continue
        assert status == psutil.STATUS_ZOMBIE, f"pid {pid} still running ({status})"


def test_every_document_through_the_dummy(tmp_path: Path) -> None:
    config = InferenceConfig(
        server_type="dummy", model_name_or_path="dummy", max_concurrent_generations=16
    )
    ids = run_pipeline(tmp_path, config, count=200)
    assert sorted(ids) == sorted(f"doc-{i}" for i in range(200))


def test_tasks_in_parallel_each_their_server(tmp_path: Path) -> None:
    """Two tasks in two worker processes (datatrove pickles the runner): each runs its
    own server (rank 0 and 1) and writes its shard."""
    config = InferenceConfig(server_type="dummy", model_name_or_path="dummy")
    ids = run_pipeline(tmp_path, config, count=60, tasks=2)
    assert sorted(ids) == sorted(f"doc-{i}" for i in range(60))
    assert sorted(path.name for path in (tmp_path / "output").iterdir()) == [
        "00000.jsonl",
        "00001.jsonl",
    ]


def test_dp_runs_a_pool_of_replicas(tmp_path: Path) -> None:
    config = InferenceConfig(server_type="dummy", model_name_or_path="dummy", dp=2)
    ids = run_pipeline(tmp_path, config, count=50)
    assert sorted(ids) == sorted(f"doc-{i}" for i in range(50))


def test_overloaded_answers_are_retried(tmp_path: Path) -> None:
    """A third of the answers are 503s: servescope retries them (jittered backoff, no slot
    held) and every document gets its answer. datatrove's own servers fail the document
    on a 503 (they retry only connection errors, sleeping 5 s, 10 s, ... in their slot)."""
    config = InferenceConfig(
        server_type="dummy",
        model_name_or_path="dummy",
        model_kwargs={"faults": ["status=503"], "fault_rate": 0.3, "fault_seed": 7},
    )
    ids = run_pipeline(tmp_path, config, count=100)
    assert sorted(ids) == sorted(f"doc-{i}" for i in range(100))


def test_custom_server_process_and_its_log(tmp_path: Path) -> None:
    pid_file = tmp_path / "pids.json"
    ids = run_pipeline(tmp_path, custom(tmp_path, **{"pid-file": str(pid_file)}), count=30)
    assert sorted(ids) == sorted(f"doc-{i}" for i in range(30))
    gone(pid_file)
    # datatrove's log file name (node -1: its single-node mode), with the server's output
    log = tmp_path / "server-logs" / "server_rank_00000_node_-1.log"
    assert "Application startup complete" in log.read_text()


def test_bad_requests_are_datatrove_errors(tmp_path: Path) -> None:
    from datatrove.pipeline.inference.types import InferenceError  # type: ignore[import-not-found, import-untyped, unused-ignore]

    config = InferenceConfig(
        server_type="dummy",
        model_name_or_path="dummy",
        model_kwargs={"faults": ["status=400"], "fault_rate": 1.0},
    )
    with pytest.raises(InferenceError, match="BadRequestError"):
        run_pipeline(tmp_path / "strict", config)
    # skip_bad_requests skips them, as with datatrove's servers
    assert run_pipeline(tmp_path / "skip", config, skip_bad_requests=True) == []


def test_a_fatal_line_while_hanging_fails_within_a_second(tmp_path: Path) -> None:
    """(a) datatrove: a custom server printing CUDA OOM then hanging raises nothing in 20 s."""
    pid_file = tmp_path / "pids.json"
    config = custom(
        tmp_path, **{"never-ready": True, "print": f"0.5:stderr:{OOM}", "pid-file": str(pid_file)}
    )
    error, at = failing(tmp_path, config)
    assert isinstance(error, servescope.ServerStartError)
    assert error.matched_line is not None and "CUDA out of memory" in error.matched_line
    printed = float(error.matched_line.rsplit("(at ", 1)[1].rstrip(")"))
    assert at - printed < 1.0, f"{at - printed:.2f} s from the fatal line to the error"
    gone(pid_file)


def test_a_server_whose_child_outlives_it(tmp_path: Path) -> None:
    """(b) datatrove: a server that exits leaves its child (own session) running."""
    pid_file = tmp_path / "pids.json"
    config = custom(
        tmp_path,
        **{
            "never-ready": True,
            "child": "new-group",
            "print": "0.4:stderr:exiting at {time}",
            "exit-after": 0.5,
            "pid-file": str(pid_file),
        },
    )
    error, at = failing(tmp_path, config)
    assert isinstance(error, servescope.ServerStartError)
    assert error.exit_code == 1
    exiting = next(line for line in error.log_tail if line.startswith("exiting at"))
    printed = float(exiting.rsplit(" ", 1)[1])
    assert at - printed < 1.0, f"{at - printed:.2f} s from the exit to the error"
    gone(pid_file)


def test_a_crash_mid_run_fails_within_a_second(tmp_path: Path) -> None:
    """A server that served for a while and exits: the task fails at once (datatrove:
    its requests fail, each retried with 5 s, 10 s, ... sleeps)."""
    pid_file = tmp_path / "pids.json"
    config = custom(
        tmp_path,
        **{
            "latency": 0.1,
            "print": "1.4:stderr:exiting at {time}",
            "exit-after": 1.5,
            "pid-file": str(pid_file),
        },
    )
    config.max_concurrent_generations = 2
    error, at = failing(tmp_path, config)
    assert isinstance(error, servescope.ServerCrashed)
    assert error.exit_code == 1
    exiting = next(line for line in error.log_tail if line.startswith("exiting at"))
    assert at - float(exiting.rsplit(" ", 1)[1]) < 1.1, "from the exit (0.1 s after the line)"
    gone(pid_file)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_requests_outside_the_scope_are_refused(backend: str) -> None:
    import anyio

    from servescope.integrations._datatrove_config import ServerPlan
    from servescope.integrations.datatrove import ServescopeServer

    server = ServescopeServer(ServerPlan(servescope.DummyConfig()), rank=0, node=-1)

    async def main() -> None:
        with pytest.raises(servescope.ServerClosed, match="not running"):
            await server.make_request({"messages": []})
        async with server:
            answer = await server.make_request({"messages": [{"role": "user", "content": "hi"}]})
            assert answer["choices"][0]["message"]["content"]
        with pytest.raises(servescope.ServerClosed):
            await server.make_request({"messages": []})

    anyio.run(main, backend=backend)


@pytest.mark.parametrize("grace", [None, 0.2])
def test_a_hung_server_ignoring_sigterm(tmp_path: Path, grace: float | None) -> None:
    """(c) datatrove: a server that hangs starting and ignores SIGTERM, its child too: its
    cleanup SIGKILLs the server after 10 s and the child stays, with parent 1. Here the
    start-up deadline (datatrove's readiness window: 0.5 + 1 x 1.0 s) ends it, the whole
    tree is SIGKILLed after the CRASH_GRACE a failed server gets (or a shorter
    shutdown_grace), and the error follows."""
    pid_file = tmp_path / "pids.json"
    config = custom(
        tmp_path,
        **{
            "never-ready": True,
            "ignore-sigterm": True,
            "child": "ignore-sigterm",
            "pid-file": str(pid_file),
        },
    )
    config.server_start_timeout_sec = 0.5
    config.server_ready_max_attempts = 1
    config.server_ready_delay_sec = 1.0
    config.server_start_max_retries = 0
    settings = {} if grace is None else {"servescope_settings": {"shutdown_grace": grace}}
    began = time.time()
    error, at = failing(tmp_path, config, **settings)
    assert isinstance(error, servescope.ServerStartError)
    assert "not ready within startup_timeout=1.5 s" in error.reason
    gone(pid_file)
    # From the pipeline's start (an upper bound on the server's): the deadline, the
    # grace, and less than a second more.
    late = at - began - 1.5 - (CRASH_GRACE if grace is None else grace)
    assert late < 1.0, f"the error came {late:.2f} s after the deadline and the grace"
