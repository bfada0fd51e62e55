"""datatrove 0.10.1's own ``InferenceRunner`` and servescope's drop-in, side by side.

* throughput: one ``python -m servescope.dummy`` process serves every run (both runners
  reach it as ``server_type="endpoint"`` on ``http://127.0.0.1:PORT``: datatrove posts
  with its ``make_request`` path, a new connection per request, servescope with its
  client); the same documents (one chat request each), the runners interleaved round
  after round, at several ``max_concurrent_generations``. Each run is a real pipeline
  (``LocalPipelineExecutor``, ``JsonlReader``, the runner, ``JsonlWriter``) in a fresh
  process; it reports documents/s and its own CPU time (user + system) per 1,000
  requests, both around ``executor.run()``.
* failures: the same custom server (``python -m servescope.dummy`` as the script) under
  each runner: (a) prints a CUDA OOM line and hangs; (b) exits after 0.5 s, leaving a
  child in its own session; (c) hangs starting, it and its child ignoring SIGTERM, with a
  1.5 s readiness window. Reported: what the runner raised and when (from the fatal
  line, from the exit, from the pipeline's start), and the processes of the run still
  alive once it returned (with their parent pid: 1 is an orphan), killed afterwards.
  A run that has not returned after ``--deadline`` seconds is killed there.

Usage (with the datatrove extra installed):
    python benchmarks/bench_datatrove.py [--docs N] [--rounds R] [--levels 8,64,256]
        [--out bench-results/datatrove.json]
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import psutil
from benchlib import revision

import servescope
import servescope.dummy

DUMMY = Path(servescope.dummy.__file__)
RUNNERS = ("datatrove", "servescope")
OOM = "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 GiB (at {time})"
#: The custom server of each failure scenario: model_kwargs (the dummy's flags) and
#: InferenceConfig fields.
SCENARIOS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "a: CUDA OOM line, then hangs": ({"never-ready": True, "print": f"0.5:stderr:{OOM}"}, {}),
    "b: exits, its child lives on": (
        {
            "never-ready": True,
            "child": "new-group",
            "print": "0.4:stderr:exiting at {time}",
            "exit-after": 0.5,
        },
        {},
    ),
    "c: hangs, ignores SIGTERM (1.5 s window)": (
        {"never-ready": True, "ignore-sigterm": True, "child": "ignore-sigterm"},
        {
            "server_start_timeout_sec": 0.5,
            "server_ready_max_attempts": 1,
            "server_ready_delay_sec": 1.0,
            "server_start_max_retries": 0,
        },
    ),
}


# --------------------------------------------------------------------------- one run


async def rollout(document: Any, generate: Any) -> str:
    messages = [{"role": "user", "content": document.text}]
    result = await generate({"messages": messages, "max_tokens": 16})
    return str(result.text)


def run_once(spec: dict[str, Any]) -> dict[str, Any]:
    """One pipeline, in this process: what it did, raised, took and cost."""
    from datatrove.executor.local import LocalPipelineExecutor  # type: ignore[import-not-found, import-untyped, unused-ignore]
    from datatrove.pipeline.readers import JsonlReader  # type: ignore[import-not-found, import-untyped, unused-ignore]
    from datatrove.pipeline.writers import JsonlWriter  # type: ignore[import-not-found, import-untyped, unused-ignore]

    # The one line a user changes: which module the runner and its config come from.
    module = importlib.import_module(
        "servescope.integrations.datatrove"
        if spec["runner"] == "servescope"
        else "datatrove.pipeline.inference.run_inference"
    )
    from loguru import logger  # type: ignore[import-not-found, import-untyped, unused-ignore]

    logger.remove()  # both runners log through loguru: keep the terminal for the table
    work = Path(spec["work"])
    config = module.InferenceConfig(**spec["config"])
    executor = LocalPipelineExecutor(
        pipeline=[
            JsonlReader(str(work / "input")),
            module.InferenceRunner(
                rollout, config, JsonlWriter(str(work / "output"), compression=None)
            ),
        ],
        tasks=1,
        workers=1,
        logging_dir=str(work / "logs"),
        skip_completed=False,
    )
    before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.time()
    error = None
    try:
        executor.run()
    except BaseException as exc:  # what the runner raised is the measurement
        error = f"{type(exc).__module__}.{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    ended = time.time()
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    written = sum(len(path.read_text().splitlines()) for path in (work / "output").glob("*.jsonl"))
    return {"started": started, "ended": ended, "cpu_s": cpu, "written": written, "error": error}


# --------------------------------------------------------------------------- driver


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def write_docs(folder: Path, count: int) -> None:
    folder.mkdir(parents=True)
    with (folder / "docs.jsonl").open("w") as file:
        for i in range(count):
            text = f"Document {i}: summarise the following paragraph about item {i}."
            file.write(json.dumps({"id": f"doc-{i}", "text": text}) + "\n")


def tagged(token: str, run: int, own: list[str]) -> list[tuple[psutil.Process, str]]:
    """Live processes whose environment carries this run's token, each described as
    ``pid ppid=N command``; not the run's own (``run``, and the manager process datatrove's
    executor forks from it: its command line ``own``)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.pid in (os.getpid(), run) or proc.status() == psutil.STATUS_ZOMBIE:
                continue
            if proc.environ().get("BENCH_DATATROVE_RUN") == token and proc.cmdline() != own:
                command = " ".join(proc.cmdline()[1:]).replace("\n", " ")
                found.append((proc, f"{proc.pid} ppid={proc.ppid()} {command[:100]}"))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def launch(spec: dict[str, Any], deadline: float) -> tuple[dict[str, Any] | None, list[str]]:
    """Run ``spec`` in a fresh process (its own session) for at most ``deadline`` seconds:
    its report (``None`` if killed at the deadline) and the processes it started still
    alive when it returned, or at the deadline (``pid ppid=N command``), all killed then."""
    token = uuid.uuid4().hex
    env = {**os.environ, "BENCH_DATATROVE_RUN": token}
    command = [sys.executable, __file__, "--run", json.dumps(spec)]
    with subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, text=True, start_new_session=True
    ) as child:
        try:
            out, _ = child.communicate(timeout=deadline)
            report = json.loads(out.strip().splitlines()[-1])
        except subprocess.TimeoutExpired:
            report = None
            left = tagged(token, child.pid, command)  # at the deadline: what the run started
            os.killpg(child.pid, signal.SIGKILL)
            child.communicate()
        else:
            time.sleep(0.2)  # a process exiting as the runner returned: not a leftover
            left = tagged(token, child.pid, command)
    for proc, _ in left:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    return report, [described for _, described in left]


def throughput(docs: int, rounds: int, levels: list[int], root: Path) -> dict[str, Any]:
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, str(DUMMY), "--port", str(port), "--completion-tokens", "16"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        write_docs(root / "input", docs)
        samples: dict[tuple[str, int], list[dict[str, float]]] = {}
        run = 0
        for round_ in range(rounds):
            for level in levels:
                order = RUNNERS if (round_ + level) % 2 == 0 else RUNNERS[::-1]
                for runner in order:
                    run += 1
                    work = root / f"run-{run}"
                    work.mkdir()
                    (work / "input").symlink_to(root / "input")
                    config = {
                        "server_type": "endpoint",
                        "model_name_or_path": "dummy",
                        "endpoint_url": f"http://127.0.0.1:{port}",
                        "max_concurrent_generations": level,
                        "metric_interval": 3600,
                    }
                    spec = {"runner": runner, "work": str(work), "config": config}
                    report, left = launch(spec, deadline=600)
                    if report is None or report["error"] or report["written"] != docs:
                        raise SystemExit(
                            f"throughput run failed: {runner} {level}: {report} {left}"
                        )
                    wall = report["ended"] - report["started"]
                    samples.setdefault((runner, level), []).append(
                        {"docs_per_s": docs / wall, "cpu_ms_per_1000": report["cpu_s"] / docs * 1e6}
                    )
    finally:
        server.kill()
        server.wait()
    results: dict[str, Any] = {}
    for (runner, level), values in samples.items():
        rates = [value["docs_per_s"] for value in values]
        cpus = [value["cpu_ms_per_1000"] for value in values]
        results[f"{runner} | {level}"] = {
            "runner": runner,
            "concurrency": level,
            "docs_per_s": statistics.median(rates),
            "docs_per_s_min_max": [min(rates), max(rates)],
            "cpu_ms_per_1000_requests": statistics.median(cpus),
            "cpu_ms_min_max": [min(cpus), max(cpus)],
        }
    return results


def stamp(logs: Path, marker: str) -> float | None:
    """The time the dummy printed after ``marker`` in the run's server log."""
    for path in logs.glob("*.log"):
        for line in path.read_text(errors="replace").splitlines():
            if marker in line and not line.startswith("[servescope]"):
                tail = line.rsplit(marker, 1)[1].strip().rstrip(")")
                try:
                    return float(tail.split()[0])
                except (ValueError, IndexError):
                    continue
    return None


def failures(deadline: float, root: Path) -> dict[str, Any]:
    results: dict[str, Any] = {}
    (root / "fail-input").mkdir()
    write_docs(root / "fail-input" / "docs", 20)
    run = 0
    for name, (kwargs, fields) in SCENARIOS.items():
        for runner in RUNNERS:
            run += 1
            work = root / f"fail-{run}"
            work.mkdir()
            (work / "input").symlink_to(root / "fail-input" / "docs")
            config = {
                "server_type": "custom",
                "model_name_or_path": "dummy",
                "model_kwargs": {"server_script": str(DUMMY), **kwargs},
                "server_log_folder": str(work / "server-logs"),
                **fields,
            }
            spec = {"runner": runner, "work": str(work), "config": config}
            began = time.time()
            report, left = launch(spec, deadline)
            entry: dict[str, Any] = {"scenario": name, "runner": runner, "left": left}
            entry["left_at"] = "its return" if report is not None else "the deadline"
            if report is None:
                entry["raised"] = f"nothing within {deadline:g} s (killed there)"
            else:
                entry["raised"] = report["error"] or "nothing: the run ended normally"
                ended = report["ended"]
                entry["error_after_pipeline_start_s"] = ended - report["started"]
                logs = work / "server-logs"
                oom = stamp(logs, "(at ")
                exiting = stamp(logs, "exiting at")
                if name.startswith("a") and oom is not None:
                    entry["error_after_fatal_line_s"] = ended - oom
                if name.startswith("b") and exiting is not None:
                    entry["error_after_exit_s"] = ended - exiting - 0.1
            entry["wall_s"] = time.time() - began
            results[f"{runner} | {name}"] = entry
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--levels", default="8,64,256", help="max_concurrent_generations")
    parser.add_argument("--deadline", type=float, default=20.0)
    parser.add_argument("--out", type=Path, default=Path("bench-results/datatrove.json"))
    parser.add_argument("--run", help=argparse.SUPPRESS)  # one run, in a child process
    options = parser.parse_args()
    if options.run is not None:
        print(json.dumps(run_once(json.loads(options.run))))
        return
    levels = [int(level) for level in options.levels.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench-datatrove-") as tmp:
        root = Path(tmp)
        speed = throughput(options.docs, options.rounds, levels, root)
        failed = failures(options.deadline, root)
    print(f"\n{'runner | max_concurrent_generations':<40} {'docs/s':>9} {'CPU ms/1000 req':>16}")
    for key, stats in speed.items():
        print(f"{key:<40} {stats['docs_per_s']:>9.0f} {stats['cpu_ms_per_1000_requests']:>16.0f}")
    for level in levels:
        ours, theirs = speed[f"servescope | {level}"], speed[f"datatrove | {level}"]
        ratio = ours["docs_per_s"] / theirs["docs_per_s"]
        cpu = ours["cpu_ms_per_1000_requests"] / theirs["cpu_ms_per_1000_requests"]
        print(f"  at {level}: drop-in {ratio:.2f}x the documents/s, {cpu:.2f}x the CPU")
    print()
    for entry in failed.values():
        timings = {key: value for key, value in entry.items() if key.endswith("_s")}
        shown = ", ".join(f"{key} {value:.2f}" for key, value in timings.items())
        print(f"{entry['runner']:<11} {entry['scenario']}")
        print(f"    raised: {entry['raised']}")
        print(f"    {shown}")
        print(f"    processes alive at {entry['left_at']}: {len(entry['left'])} {entry['left']}")
    payload = {
        "revision": revision(),
        "datatrove": importlib.metadata.version("datatrove"),
        "python": sys.version.split()[0],
        "docs": options.docs,
        "rounds": options.rounds,
        "cpus": os.cpu_count(),
        "throughput": speed,
        "failures": failed,
    }
    options.out.parent.mkdir(parents=True, exist_ok=True)
    options.out.write_text(json.dumps(payload, indent=2))
    print(f"\nwritten to {options.out}")


if __name__ == "__main__":
    main()
