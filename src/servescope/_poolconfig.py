"""A pool's settings: how many replicas, how requests are routed, how replicas restart,
when one is taken out of rotation. One home for each of those policies.

The replicas' own settings (the engine, its timeouts and health probe) stay in their
``ServerConfig``; these are what only a pool has. In a TOML/JSON file they sit beside
the server's keys (``load_pool_config`` splits them off).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ._config import DAY, MAX_SECONDS, Integer, Number, PathText, Settings
from ._health import Demotion

__all__ = ["POOL_KEYS", "PoolConfig", "Routing"]

Routing = Literal["least_loaded", "round_robin", "power_of_two", "prefix", "sticky"]


class PoolConfig(Settings):
    """How a pool runs its replicas.

    Attributes:
        replicas: how many copies of the one config to run (``open_pool(config)``); 0
            only in a pool that replicas join (``open_membership``).
        gpus_per_replica: each replica's slice of the visible GPUs (``CUDA_VISIBLE_DEVICES``);
            default: tp·pp·dp for vLLM and SGLang, none for other backends.
        routing: ``least_loaded`` (default), ``round_robin``, ``power_of_two``, ``prefix``
            (affinity by the prompt's start, least-loaded when load is imbalanced),
            ``sticky`` (by a request's ``routing_key``).
        seed: deterministic mode: the same routing decisions for the same requests.
        routing_log: a JSONL file with every routing decision.
        max_restarts / restart_window: a process replica restarts at most this many times
            within this many seconds; past that it stays failed (its reason and log kept).
            An endpoint replica (someone else's server) is re-checked for ever.
        restart_backoff / restart_backoff_max: the first wait before a restart, doubling
            up to the cap.
        demote_misses / demote_after / promote_answers: a ready replica leaves the rotation
            after this many health probes missed in a row or this many seconds without an
            answer (its requests are sent elsewhere at once), and comes back after this
            many answered in a row.
        breaker_failures / breaker_window / breaker_cooldown / breaker_successes: a
            replica's circuit breaker opens after this many failed requests within the
            window, stays open the cool-down (a 429 opens it at once for its Retry-After),
            and closes after this many successes.
        min_ready: how many ready replicas ``pool.wait_ready()`` waits for by default.
    """

    replicas: Integer = Field(default=1, ge=0, le=1024)
    gpus_per_replica: Integer | None = Field(default=None, ge=0, le=4096)
    routing: Routing = "least_loaded"
    seed: Integer | None = Field(default=None, ge=-(2**63), lt=2**63)
    routing_log: PathText | None = None
    max_restarts: Integer = Field(default=3, ge=0, le=1_000)
    restart_window: Number = Field(default=600.0, gt=0, le=MAX_SECONDS)
    restart_backoff: Number = Field(default=1.0, ge=0, le=DAY)
    restart_backoff_max: Number = Field(default=60.0, ge=0, le=DAY)
    demote_misses: Integer = Field(default=3, ge=1, le=1_000)
    demote_after: Number = Field(default=3.0, gt=0, le=MAX_SECONDS)
    promote_answers: Integer = Field(default=2, ge=1, le=1_000)
    breaker_failures: Integer = Field(default=5, ge=1, le=1_000_000)
    breaker_window: Number = Field(default=60.0, gt=0, le=MAX_SECONDS)
    breaker_cooldown: Number = Field(default=30.0, ge=0, le=DAY)
    breaker_successes: Integer = Field(default=2, ge=1, le=1_000_000)
    min_ready: Integer = Field(default=1, ge=1, le=1024)

    @model_validator(mode="after")
    def _reachable(self) -> PoolConfig:
        if self.replicas and self.min_ready > self.replicas:
            raise ValueError(f"min_ready={self.min_ready} is more than replicas={self.replicas}")
        if self.restart_backoff > self.restart_backoff_max:
            raise ValueError("restart_backoff is more than restart_backoff_max")
        return self

    def demotion(self) -> Demotion:
        """When a replica leaves the rotation, and comes back."""
        return Demotion(self.demote_misses, self.demote_after, self.promote_answers)

    def restart_delay(self, restarts: int) -> float:
        """The wait before restart number ``restarts`` (0-based): doubling, capped."""
        return min(self.restart_backoff_max, self.restart_backoff * 2.0 ** min(restarts, 62))


#: The keys of a config file that set the pool, not the server.
POOL_KEYS = frozenset(PoolConfig.model_fields)
