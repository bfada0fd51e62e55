"""After readiness: what kills a serving server, and what must not.

A 40-hour job must not die because a document quotes an error message: request logs
echo prompts and answers, so after readiness only the engine's own error records and
tracebacks count (``servescope._logscan``). And a server that stops answering — frozen
by SIGSTOP, or accepting connections and never replying — must fail the scope within
``unhealthy_after`` seconds, not after every request's timeout (``servescope._health``).
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import anyio
import anyio.abc
import pytest

import servescope
from servescope import ServerCrashed, open_server
from servescope._health import HealthWatch, Probe, judge
from servescope._logscan import LineClassifier, LineKind, PatternTable
from servescope.backends.custom import CUSTOM_PATTERNS
from servescope.backends.sglang import SGLANG_PATTERNS
from servescope.backends.vllm import VLLM_PATTERNS

from .conftest import dummy_process
from .test_backends import TRANSCRIPTS, sglang, vllm

#: One line an engine really prints for each of its patterns (fatal, death, retry).
VLLM_EXAMPLES = [
    "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 GiB",
    "Failed to load model - not enough GPU memory",
    "ValueError: No available memory for the cache blocks. Try increasing gpu_memory_utilization",
    "ValueError: To serve at least one request (4.38 GiB KV cache) is needed, which is larger "
    "than the available KV cache memory (2.10 GiB).",
    "ValueError: World size (8) is larger than the number of available GPUs (1) in this node.",
    "ValueError: The number of required GPUs exceeds the total number of available GPUs in the "
    "placement group. Required number of devices: 4. Total number of devices: 1.",
    "Cannot provide a placement group requiring 4 GPUs within 1800 seconds.",
    "Worker proc VllmWorker-1 died unexpectedly (exit code: -9), shutting down executor.",
    "Engine core process EngineCore_DP0 died unexpectedly, shutting down client.",
    "Engine core proc EngineCore_DP1 died unexpectedly, shutting down client.",
    "RayWorkerProc rank=[1] died unexpectedly, shutting down executor.",
    "EngineCore failed to start.",
    "RuntimeError: Engine core initialization failed. See root cause above.",
    "RuntimeError: Frontend process failed during engine core initialization",
    "EngineCore encountered a fatal error.",
    "AsyncLLM output_handler failed.",
    "vllm.v1.engine.exceptions.EngineDeadError: EngineCore encountered an issue.",
    "OSError: [Errno 98] Address already in use",
]
SGLANG_EXAMPLES = [
    "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 1.16 GiB.",
    "RuntimeError: Not enough memory. Please try to increase --mem-fraction-static.",
    "Subprocess scheduler_0 (pid=5301) crashed with exit code -9. Triggering SIGQUIT for cleanup",
    "RuntimeError: Rank 0 scheduler died during initialization (exit code: -9).",
    "Scheduler hit an exception: Traceback (most recent call last):",
    "DetokenizerManager hit an exception: Traceback (most recent call last):",
    "TokenizerManager hit an exception: Traceback (most recent call last):",
    "DataParallelController hit an exception: Traceback (most recent call last):",
    "MultiTokenizerRouter hit an exception: Traceback (most recent call last):",
    "Initialization failed. warmup error: last_traceback=...",
    "Received sigquit from a child process. It usually means the child failed.",
    "SIGQUIT received. signum=None, frame=None. It usually means one child failed.",
    "[Errno 98] error while attempting to bind on address ('127.0.0.1', 30000): "
    "address already in use",
]
CUSTOM_EXAMPLES = [
    "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB",
    "RuntimeError: CUDA error: an illegal memory access was encountered",
    "ImportError: cannot import name 'foo' from 'bar'",
    "ModuleNotFoundError: No module named 'flash_attn'",
    "OSError: [Errno 98] Address already in use",
]


@pytest.mark.parametrize(
    ("table", "examples"),
    [
        (VLLM_PATTERNS, VLLM_EXAMPLES),
        (SGLANG_PATTERNS, SGLANG_EXAMPLES),
        (CUSTOM_PATTERNS, CUSTOM_EXAMPLES),
    ],
)
def test_every_pattern_has_an_example(table: PatternTable, examples: list[str]) -> None:
    """Keeps the quoting tests below complete: a new pattern needs an example here."""
    for pattern in (*table.fatal, *table.death, *table.retry):
        found = [text for text in examples if pattern.search(text.split(": ", 1)[-1])]
        found += [text for text in examples if pattern.search(text)]
        assert found, f"no example line for {pattern.pattern!r}"


def vllm_request_log(n: int, text: str) -> list[str]:
    """How vLLM echoes a prompt and an answer (entrypoints/logger.py RequestLogger)."""
    where = f"(APIServer pid=4101) INFO 11-23 10:02:{n % 60:02d} [logger.py:49]"
    return [
        f"{where} Received request chatcmpl-{n}: prompt: {text!r}, params: SamplingParams("
        "n=1, temperature=0.7, max_tokens=64), prompt_token_ids: None, lora_request: None.",
        f"(APIServer pid=4101) DEBUG 11-23 10:02:00 [logger.py:60] Request chatcmpl-{n} "
        f"details: prompt: {text!r}, prompt_token_ids: [1, 2, 3], prompt_embeds shape: None.",
        f"{where} Generated response chatcmpl-{n}: output: {text!r}, output_token_ids: [7], "
        "finish_reason: stop",
        f"(APIServer pid=4101) ERROR 11-23 10:02:00 [serving.py:323] Error in preprocessing "
        f"prompt inputs: {text!r}",
        f"(APIServer pid=4101) WARNING 11-23 10:02:00 [side.py:12] metrics exporter: {text}",
    ]


def sglang_request_log(n: int, text: str) -> list[str]:
    """How SGLang echoes a request (--log-requests: ``Receive:`` / ``Finish:``)."""
    obj = f"GenerateReqInput(text={text!r}, sampling_params={{'max_new_tokens': 64}})"
    return [
        f"[2026-11-23 10:02:00] Receive: obj={obj}",
        f"[2026-11-23 10:02:00] Finish: obj={obj}, out={{'text': {text!r}}}",
        f"Receive: obj={obj}",  # newer SGLang: request loggers print the message alone
        f"[2026-11-23 10:02:00] WARNING side.py:12: side component: {text}",
    ]


def test_quoted_patterns_are_not_fatal_after_ready() -> None:
    for table, examples, echo in (
        (VLLM_PATTERNS, VLLM_EXAMPLES, vllm_request_log),
        (SGLANG_PATTERNS, SGLANG_EXAMPLES, sglang_request_log),
    ):
        classifier = LineClassifier(table)
        for n, text in enumerate(examples):
            for line in echo(n, text):
                event = classifier.classify(line, ready=True)
                assert event is None or event.kind is LineKind.CAUSE, (line, event)


@pytest.mark.parametrize(
    ("lines", "kinds"),
    [
        # vLLM's own death records, with the process decoration and without.
        (
            [
                "(EngineCore pid=4312) ERROR 11-23 10:01:13 [core.py:1586] EngineCore "
                "encountered a fatal error."
            ],
            [LineKind.FATAL],
        ),
        (["ERROR 11-23 10:01:13 [core.py:1586] EngineCore encountered a fatal error."], ["F"]),
        (["ERROR 11-23 10:01:13 core.py:1586] AsyncLLM output_handler failed."], ["F"]),
        (
            ["\x1b[31mERROR\x1b[0m 11-23 10:01:13 [core.py:1] Worker proc W-1 died unexpectedly"],
            ["F"],
        ),
        # The cause inside an error record explains; it kills nothing by itself.
        (
            [
                "(EngineCore pid=1) ERROR 11-23 10:01:13 [core.py:1] "
                "torch.OutOfMemoryError: CUDA out of memory"
            ],
            ["C"],
        ),
        # The same words at INFO, or bare (not vLLM's record): nothing.
        (
            [
                "(EngineCore pid=1) INFO 11-23 10:01:13 [core.py:1] "
                "EngineCore encountered a fatal error."
            ],
            [None],
        ),
        (["EngineCore encountered a fatal error."], [None]),
        (["INFO:     Application startup complete."], [None]),  # ready lines mean nothing now
        (["OSError: [Errno 98] Address already in use"], [None]),  # no retry once serving
        # A raw traceback: its last line is an error message.
        (
            [
                "Traceback (most recent call last):",
                '  File "x.py", line 1, in <module>',
                "torch.OutOfMemoryError: CUDA out of memory",
                "torch.OutOfMemoryError: CUDA out of memory",  # a second one, outside it
            ],
            [None, None, "C", None],
        ),
    ],
)
def test_vllm_lines_after_ready(lines: list[str], kinds: list[LineKind | str | None]) -> None:
    short = {"F": LineKind.FATAL, "C": LineKind.CAUSE}
    classifier = LineClassifier(VLLM_PATTERNS)
    for line, kind in zip(lines, kinds, strict=True):
        event = classifier.classify(line, ready=True)
        expected = short.get(kind, kind) if isinstance(kind, str) else kind
        assert (event.kind if event else None) is expected, (line, event)


@pytest.mark.parametrize(
    ("lines", "last"),
    [
        (["Traceback (most recent call last):", "  File 'a'", "ImportError: no x"], LineKind.FATAL),
        (["Traceback (most recent call last):", "ImportError: no x"], LineKind.FATAL),
        (
            [
                "Traceback (most recent call last):",
                "  File 'a'",
                "",
                "  code",
                "RuntimeError: CUDA error: x",
            ],
            LineKind.FATAL,
        ),
        (["ImportError: no x"], None),
        (
            ["INFO: prompt=Traceback (most recent call last):", "ImportError: quoted"],
            LineKind.FATAL,
        ),
        (["Traceback (most recent call last):", "  File 'a'", "printed ImportError: x"], None),
        (
            [
                "Traceback (most recent call last):",
                "  File 'a'",
                "KeyError: 'x'",
                "ImportError: no",
            ],
            None,
        ),
    ],
)
def test_custom_lines_after_ready(lines: list[str], last: LineKind | None) -> None:
    """A custom server's format is unknown: only a traceback's last line is an error."""
    classifier = LineClassifier(CUSTOM_PATTERNS)
    events = [classifier.classify(line, ready=True) for line in lines]
    assert all(event is None for event in events[:-1]), events
    assert (events[-1].kind if events[-1] else None) is last


def test_user_patterns_match_anywhere_after_ready() -> None:
    table = CUSTOM_PATTERNS.extended(fatal=[r"^FATAL: engine \d+ lost$"])
    classifier = LineClassifier(table)
    event = classifier.classify("FATAL: engine 3 lost", ready=True)
    assert event is not None and event.kind is LineKind.FATAL


def quoting_transcript(tmp_path: Path, name: str, quotes: list[str], death: list[str]) -> Path:
    """The ready transcript, then request-log lines quoting every pattern, then a death."""
    ready = (TRANSCRIPTS / name).read_text().replace("@hang", "")
    path = tmp_path / f"quoting_{name}"
    # Requests (and so their log lines) come once the server is ready: after its probe.
    parts = [ready, "@sleep 1", "@stdout", *quotes, "@stderr", *quotes, "@sleep 0.5", *death]
    path.write_text("\n".join([*parts, "@hang", ""]))
    return path


VLLM_DEATH = [
    "@stdout",
    "(EngineCore pid=4312) ERROR 11-23 10:05:13 [core.py:1586] "
    "EngineCore encountered a fatal error.",
    "(EngineCore pid=4312) ERROR 11-23 10:05:13 [core.py:1586] Traceback (most recent call last):",
    '(EngineCore pid=4312) ERROR 11-23 10:05:13 [core.py:1586]   File "core.py", line 1570',
    "(EngineCore pid=4312) ERROR 11-23 10:05:13 [core.py:1586] torch.OutOfMemoryError: CUDA out "
    "of memory. Tried to allocate 8.00 GiB",
]
SGLANG_DEATH = [
    "@stderr",
    "[2026-11-23 10:05:40] Subprocess detokenizer (pid=5302) crashed with exit code -9. "
    "Triggering SIGQUIT for cleanup...",
    "[2026-11-23 10:05:40] SIGQUIT received. signum=None, frame=None.",
]


@pytest.mark.anyio
@pytest.mark.parametrize("backend", ["vllm", "sglang"])
async def test_engines_survive_quoted_fatal_lines_and_still_see_their_death(
    tmp_path: Path, backend: str
) -> None:
    """Every fatal, death and retry pattern quoted by the engine's request log (prompts
    and answers) on both streams: the server serves on; then its real death is caught,
    and the line reported is the engine's own (the cause, for vLLM), not a quote."""
    if backend == "vllm":
        quotes = [
            line for n, text in enumerate(VLLM_EXAMPLES) for line in vllm_request_log(n, text)
        ]
        transcript = quoting_transcript(tmp_path, "vllm_ready.log", quotes, VLLM_DEATH)
        config: servescope.ServerConfig = vllm(tmp_path, transcript)
        expected = VLLM_DEATH[-1]
    else:
        quotes = [
            line for n, text in enumerate(SGLANG_EXAMPLES) for line in sglang_request_log(n, text)
        ]
        transcript = quoting_transcript(tmp_path, "sglang_sigquit.log", quotes, SGLANG_DEATH)
        # sglang_sigquit.log dies by itself after its ready line: keep only up to it.
        text = transcript.read_text()
        cut = text.index("@sleep 1\n@stderr\n[2026-11-23 10:01:40]")
        quotes_at = text.index("@sleep 1\n@stdout\n" + quotes[0])
        transcript.write_text(text[:cut] + text[quotes_at:])
        config = sglang(tmp_path, str(transcript))
        expected = SGLANG_DEATH[1]
    with anyio.fail_after(30), pytest.raises(ServerCrashed) as caught:
        async with open_server(config) as server:
            await server.wait_ready()
            await anyio.sleep(30)
    assert caught.value.matched_line == expected, caught.value


# -- a hung server --------------------------------------------------------------------------

HUNG = {"health_interval": 0.2, "health_timeout": 0.5, "unhealthy_after": 1.5}


@pytest.mark.parametrize(
    ("status", "dead", "outcome"),
    [
        (200, None, Probe.ANSWERED),
        (404, None, Probe.ANSWERED),
        (401, None, Probe.ANSWERED),
        (None, None, Probe.MISSED),
        (500, None, Probe.MISSED),
        (503, None, Probe.MISSED),
        (503, 503, Probe.DEAD),
        (502, 503, Probe.MISSED),
    ],
)
def test_judge(status: int | None, dead: int | None, outcome: Probe) -> None:
    assert judge(status, dead) is outcome


def test_health_watch_fails_on_silence_not_on_a_count() -> None:
    watch = HealthWatch(unhealthy_after=10, timeout=4, dead_status=None, last_answer=100.0)
    assert watch.probe_timeout(100.0) == 4
    assert watch.record(None, 104.0) is Probe.MISSED
    assert watch.silent_for(104.0) is None
    assert watch.probe_timeout(108.0) == 2  # never past the moment it counts as hung
    assert watch.record(200, 108.0) is Probe.ANSWERED and watch.misses == 0
    for now in (112.0, 116.0):
        watch.record(502, now)
    assert watch.silent_for(117.9) is None
    assert watch.silent_for(118.0) == 10
    assert "for 10 s" in watch.describe("/health", 10) and "502" in watch.describe("/health", 10)


async def hung_after_ready(config: servescope.ServerConfig, freeze: bool = True) -> float:
    """Open ``config``; once ready, SIGSTOP the server (if ``freeze``) and send a request;
    return how long after that the scope failed with the hang."""
    with anyio.fail_after(30), pytest.raises(ServerCrashed, match="not answering") as caught:
        async with open_server(config) as server, anyio.create_task_group() as tg:
            await server.wait_ready()
            if freeze:
                assert server.pid is not None
                os.kill(server.pid, signal.SIGSTOP)
            frozen_at = time.monotonic()
            tg.start_soon(server.chat, [{"role": "user", "content": "hi"}])
            await anyio.sleep(30)
    assert "hangs" in caught.value.reason
    return time.monotonic() - frozen_at


@pytest.mark.anyio
async def test_frozen_custom_server_fails_within_unhealthy_after() -> None:
    elapsed = await hung_after_ready(dummy_process(request_timeout=600, **HUNG))
    assert 1.2 < elapsed < 4.0, elapsed


@pytest.mark.anyio
async def test_frozen_vllm_engine_fails_within_unhealthy_after(tmp_path: Path) -> None:
    """vLLM frozen after ready: /health never answers (only a 503 counted before)."""
    config = vllm(tmp_path, "vllm_ready.log", request_timeout=600, **HUNG)
    elapsed = await hung_after_ready(config)
    assert 1.2 < elapsed < 4.0, elapsed


class SilentAfter:
    """An HTTP server on 127.0.0.1 that answers ``answers`` requests, then accepts
    connections and never replies (a hung endpoint)."""

    def __init__(self, answers: int) -> None:
        self.answers = answers

    async def handle(self, client: anyio.abc.SocketStream) -> None:
        async with client:
            while True:
                try:
                    data = await client.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    return
                if self.answers <= 0 or not re.search(rb"\r\n\r\n", data):
                    continue  # swallow it, answer nothing
                self.answers -= 1
                body = b'{"object": "list", "data": []}'
                head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                await client.send(head + b"content-length: %d\r\n\r\n" % len(body) + body)


@pytest.mark.anyio
async def test_hung_endpoint_fails_the_scope() -> None:
    silent = SilentAfter(answers=1)  # the start check, then silence
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    async with listener, anyio.create_task_group() as tg:
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        tg.start_soon(listener.serve, silent.handle)
        config = servescope.EndpointConfig(url=f"http://127.0.0.1:{port}/v1", model="m", **HUNG)
        elapsed = await hung_after_ready(config, freeze=False)
        assert elapsed < 4.0, elapsed
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_slow_but_answering_health_is_not_a_hang() -> None:
    """Probes answered within ``health_timeout`` — here after 0.3 s each — keep it alive."""
    config = dummy_process(
        "--ready-after", "0.2", health_interval=0.1, health_timeout=0.8, unhealthy_after=1.0
    )
    with anyio.fail_after(20):
        async with open_server(config) as server:
            await server.wait_ready()
            assert server.pid is not None
            for _ in range(8):  # freeze for 0.3 s at a time: probes are late, not lost
                os.kill(server.pid, signal.SIGSTOP)
                await anyio.sleep(0.3)
                os.kill(server.pid, signal.SIGCONT)
                await anyio.sleep(0.1)
            out = await server.chat([{"role": "user", "content": "still here?"}])
            assert out.text


@pytest.mark.parametrize("table", [VLLM_PATTERNS, SGLANG_PATTERNS, CUSTOM_PATTERNS])
def test_hostile_lines_are_classified_without_backtracking(table: PatternTable) -> None:
    """Every line a server prints is classified on the event loop: a 64 KiB line built to
    make a pattern backtrack (it took 1.6 s once) must cost milliseconds, not seconds.
    The bound is 100 times what it costs here, for a shared machine."""
    n = 64 * 1024
    hostile = [
        "(" + "pid=1 " * (n // 6),
        "(x pid=1) " * (n // 10),
        "a." * (n // 2),
        "A." * (n // 2) + "Error",
        "\x1b[0;" * (n // 4),
        "ERROR 11-23 10:00:00 " * (n // 21),
        "[" + "2026-11-23 10:00:00 " * (n // 20),
        "Traceback (most recent call last):" * (n // 34),
    ]
    classifier = LineClassifier(table)
    started = time.perf_counter()
    for line in hostile:
        for ready in (False, True):
            classifier.classify(line, ready=ready)
    assert time.perf_counter() - started < 1.0
