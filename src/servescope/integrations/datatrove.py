"""datatrove's ``InferenceRunner``, its servers servescope's: change one import.

::

    # from datatrove.pipeline.inference.run_inference import InferenceConfig, InferenceRunner
    from servescope.integrations.datatrove import InferenceConfig, InferenceRunner

The runner is datatrove's own (readers, rollouts, checkpoints, writers, stats unchanged)
except where it picks its server (``_init_server``): there the same ``InferenceConfig``
becomes a servescope config (``_datatrove_config.map_config``: every field mapped, kept
by the runner, or refused with a ``ConfigError`` naming it) run by ``open_server`` —
or, with ``dp`` > 1, ``open_pool`` of ``dp`` replicas; with several hosts in
``DATATROVE_NODE_IPS``, servescope's multi-node vLLM / SGLang server (one scope per node,
tied by its liveness channel: ``SERVESCOPE_NODE_TOKEN`` must be set on every node).
So a fatal line, an exit or a start-up timeout cancels the task and comes out as
servescope's ``ServerStartError`` / ``ServerCrashed`` (``PoolFailed``), the whole
process tree is gone when it does, and requests go over servescope's client
(keep-alive, retries with jittered backoff that hold no slot, classified errors).
Needs datatrove (``pip install 'servescope[datatrove]'``).

A request's own failure is datatrove's ``InferenceError``, as datatrove's runner
expects: a refused request (``BadRequest``) says ``BadRequestError`` (so
``skip_bad_requests`` skips it), one that failed through every retry carries
servescope's reason; neither is retried again by the runner.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from contextlib import AsyncExitStack
from pathlib import Path
from types import TracebackType
from typing import Any

from .._errors import BadRequest, RequestError, ServerClosed
from .._pool import Pool, open_pool
from .._server import Server, WorkerNode, open_server
from ._datatrove_config import DatatroveConfig, ServerPlan, map_config

try:
    from datatrove.pipeline.inference.run_inference import (  # type: ignore[import-not-found, import-untyped, unused-ignore]
        InferenceConfig,
    )
    from datatrove.pipeline.inference.run_inference import (  # type: ignore[import-not-found, import-untyped, unused-ignore]
        InferenceRunner as _DatatroveRunner,
    )
    from datatrove.pipeline.inference.types import (  # type: ignore[import-not-found, import-untyped, unused-ignore]
        InferenceError,
    )
except ImportError as exc:  # pragma: no cover - exercised without the extra
    missing = exc.name or str(exc)
    raise ImportError(
        f"servescope.integrations.datatrove needs datatrove 0.10 and what its inference "
        f"runner imports ({missing} is missing): pip install 'servescope[datatrove]'"
    ) from exc

__all__ = ["InferenceConfig", "InferenceRunner", "ServescopeServer", "map_config"]


def _node_rank(env: Mapping[str, str]) -> int:
    """datatrove's node rank (``DATATROVE_NODE_RANK``; -1: single node), as in its log names."""
    try:
        return int(env.get("DATATROVE_NODE_RANK", "-1"))
    except ValueError:
        return -1


class ServescopeServer:
    """The server object datatrove's runner uses — ``async with server:`` and
    ``await server.make_request(payload)`` — backed by a servescope server or pool.

    Entering it starts the server (or pool) and returns once the process is spawned;
    requests wait for readiness by themselves. On a worker node of a server across nodes
    (``DATATROVE_NODE_RANK`` >= 1) it returns ``None`` once the head's scope has ended,
    as datatrove's servers do there. It must be entered and left in one task
    (datatrove's ``run_async`` does): a failure of the server cancels that task, and
    leaving raises servescope's error.
    """

    def __init__(self, plan: ServerPlan, *, rank: int, node: int) -> None:
        self.plan = plan
        self.rank = rank
        self.node = node
        self._stack: AsyncExitStack | None = None
        self._target: Server | Pool | None = None

    @property
    def target(self) -> Server | Pool:
        """The servescope ``Server`` (or ``Pool``) behind it, while entered."""
        if self._target is None:
            raise ServerClosed("the server is not running: requests go inside `async with server`")
        return self._target

    async def __aenter__(self) -> ServescopeServer | None:
        config = self.plan.config
        async with AsyncExitStack() as stack:
            if self.plan.replicas == 1:
                self._target = await stack.enter_async_context(
                    open_server(config, rank=self.rank, node=self.node)
                )
            else:
                if config.log_dir is not None:
                    # The replicas' logs (server_rank_{replica}_node_0.log), per datatrove task.
                    folder = Path(config.log_dir) / f"server_rank_{self.rank:05d}_node_{self.node}"
                    config = config.model_copy(update={"log_dir": folder})
                self._target = await stack.enter_async_context(
                    open_pool(config, replicas=self.plan.replicas)
                )
            self._stack = stack.pop_all()
        if isinstance(self._target, WorkerNode):
            # A worker node sends no requests (datatrove's runner returns at once on
            # None): it runs its part of the engine until the head's scope has ended.
            try:
                await self._target.wait_head_exit()
            except BaseException as exc:
                # The caller's `async with` will not leave a context it never entered:
                # leave it here, raising the scope's own error (a failed head, a lost node).
                await self.__aexit__(type(exc), exc, exc.__traceback__)
                raise
            return None
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool:
        stack, self._stack = self._stack, None
        try:
            if stack is None:
                return False
            return bool(await stack.__aexit__(exc_type, exc, traceback))
        finally:
            self._target = None

    async def make_request(self, payload: dict[str, Any]) -> dict[str, Any]:
        """POST ``payload`` (model and datatrove's default params already in it) to the
        chat or completions endpoint (``use_chat``); the OpenAI JSON answer.

        Retried by servescope; a request that fails for good raises datatrove's
        ``InferenceError`` (``BadRequestError`` in it for a refused one), which the runner
        does not retry. A server failure raises servescope's error (and the scope ends).
        """
        try:
            return await self.target.request(payload)
        except BadRequest as error:
            message = f"Got BadRequestError from server: {error}"
            raise InferenceError(None, message, payload=payload) from error
        except RequestError as error:
            raise InferenceError(None, f"{type(error).__name__}: {error}", payload=payload) from (
                error
            )

    def __repr__(self) -> str:
        kind = "pool" if self.plan.replicas > 1 else "server"
        return f"<ServescopeServer {kind} {type(self.plan.config).__name__} rank={self.rank}>"


class InferenceRunner(_DatatroveRunner):  # type: ignore[misc, unused-ignore]  # datatrove is untyped
    """datatrove's ``InferenceRunner`` (same arguments) whose server is servescope's.

    ``servescope_settings``: servescope config fields the ``InferenceConfig`` has no
    field for (``shutdown_grace``, ``fatal_patterns``, ``health_interval``,
    ``unhealthy_after``, ``env``, ...). The config is mapped when the runner is built,
    so a field that cannot be mapped fails there (``ConfigError``), before any task runs.
    """

    def __init__(
        self,
        *args: Any,
        servescope_settings: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.servescope_settings = dict(servescope_settings or {})
        # Checked now; mapped again in each task, where the executor has described the
        # nodes in the environment.
        map_config(self._datatrove_config(), self.servescope_settings, env={}, nodes_known=False)

    def _datatrove_config(self) -> DatatroveConfig:
        config: DatatroveConfig = self.config
        return config

    def _init_server(self, rank: int) -> ServescopeServer:
        """The task's server, servescope's (datatrove: ``SGLangServer``, ``VLLMServer``...)."""
        plan = map_config(self._datatrove_config(), self.servescope_settings)
        return ServescopeServer(plan, rank=rank, node=_node_rank(os.environ))
