"""The router front's settings: where it listens, who may administer it, how many
requests it takes. One home for each of those policies (``servescope route``).

The replicas' own settings stay in their ``ServerConfig``, the pool's in ``PoolConfig``.
"""

from __future__ import annotations

import ipaddress

from pydantic import Field, SecretStr, field_validator, model_validator

from ._config import MAX_SECONDS, Integer, Number, Settings, Text
from ._leases import TTL

__all__ = ["FRONT_KEYS", "FrontConfig", "is_loopback"]


class FrontConfig(Settings):
    """How the front serves.

    Attributes:
        host / port: where it listens (127.0.0.1 by default; port 0: any free port).
        admin_token: the bearer token of the admin API (``/workers``, ``/pause``, ...),
            never the clients' key. Required to listen on any address but loopback;
            without one (on loopback) the admin API is open to local processes.
        api_key: if set, clients must send ``Authorization: Bearer <api_key>``.
        max_concurrency: requests the front works on at once; beyond it they queue.
        queue_size: requests that may wait for a turn; beyond it a 429 with Retry-After.
        queue_timeout: the longest wait for a turn; past it a 503 with Retry-After.
        lease_ttl: a registered replica that has not renewed its lease for this long is
            ejected (its requests sent elsewhere).
        drain_timeout: how long ``DELETE /workers/{id}`` and ``POST /drain`` let the
            requests in flight finish.
        probe_timeout: how long ``POST /workers`` waits for the new replica's check before
            answering (202 if it is still being checked then).
        min_ready: how many ready replicas make ``GET /readiness`` answer 200.
    """

    host: Text = "127.0.0.1"
    port: Integer = Field(default=8000, ge=0, le=65535)
    admin_token: SecretStr | None = None
    api_key: SecretStr | None = None
    max_concurrency: Integer = Field(default=1024, ge=1, le=1_000_000)
    queue_size: Integer = Field(default=4096, ge=0, le=10_000_000)
    queue_timeout: Number = Field(default=30.0, gt=0, le=MAX_SECONDS)
    lease_ttl: Number = Field(default=TTL, gt=0, le=MAX_SECONDS)
    drain_timeout: Number = Field(default=30.0, ge=0, le=MAX_SECONDS)
    probe_timeout: Number = Field(default=10.0, gt=0, le=MAX_SECONDS)
    min_ready: Integer = Field(default=1, ge=1, le=1_000_000)

    @field_validator("admin_token", "api_key")
    @classmethod
    def _usable_token(cls, token: SecretStr | None) -> SecretStr | None:
        if token is None:
            return None
        value = token.get_secret_value()
        if len(value) < 8:
            raise ValueError("must be at least 8 characters (it guards the front)")
        if not value.isascii() or not value.isprintable() or " " in value:
            raise ValueError("must be printable ASCII without spaces (it goes in a header)")
        return token

    @model_validator(mode="after")
    def _guarded(self) -> FrontConfig:
        if self.admin_token is None and not is_loopback(self.host):
            raise ValueError(
                f"listening on {self.host!r} (not loopback) needs an admin token "
                "(--admin-token or SERVESCOPE_ADMIN_TOKEN): anyone who can reach it could "
                "add replicas or drain the pool"
            )
        return self

    def secrets(self) -> list[str]:
        """The tokens, to keep out of every message."""
        return [t.get_secret_value() for t in (self.admin_token, self.api_key) if t is not None]


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (or ``localhost``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


#: The keys of a config (``--set``) that set the front, not the server or the pool.
FRONT_KEYS = frozenset(FrontConfig.model_fields)
