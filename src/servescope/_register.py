"""A supervised server that registers itself with a front on another node
(``servescope serve --register-with http://ROUTER``) and keeps its lease.

Once its server is ready, ``keep_registered`` posts ``{"url", "api_key", "lease": true}``
to the front's ``/workers`` (the admin token as bearer token), renews the lease every
``RENEW_EVERY`` seconds, registers again if the front has forgotten it (restarted, or
the lease lapsed while this node was frozen or cut off: a 404), and deregisters when it
stops (``DELETE /workers/{id}``: the front lets the requests on it finish first). A
front that cannot be reached is retried on the same beat, logged once per outage; one
that refuses the token or the URL is a ``ConfigError`` — no retry can help that.
"""

from __future__ import annotations

import logging
from typing import Any

import anyio
import httpx
from anyio.abc import TaskStatus

from ._errors import ConfigError
from ._leases import RENEW_EVERY
from ._redact import Redactor

__all__ = ["keep_registered"]

logger = logging.getLogger("servescope.register")

#: How long a stopping server waits for the front to drain and forget it.
DEREGISTER_TIMEOUT = 10.0


class _Registration:
    def __init__(self, client: httpx.AsyncClient, router: str, redact: Redactor) -> None:
        self.client = client
        self.router = router.rstrip("/")
        self.redact = redact
        self.index: int | None = None
        self.unreachable = False

    async def call(self, method: str, path: str, body: Any = None) -> httpx.Response | None:
        """The front's answer, or ``None`` if it cannot be reached now (logged once)."""
        try:
            response = await self.client.request(method, self.router + path, json=body)
        except httpx.HTTPError as exc:
            if not self.unreachable:
                why = self.redact(f"{type(exc).__name__}: {exc}")
                logger.warning("register: the front at %s cannot be reached: %s", self.router, why)
            self.unreachable = True
            return None
        if self.unreachable:
            logger.warning("register: the front at %s answers again", self.router)
        self.unreachable = False
        if response.status_code in (400, 401, 403):
            text = self.redact(response.text[:300])
            raise ConfigError(
                f"the front at {self.router} refused {method} {path} "
                f"({response.status_code}): {text}"
            )
        return response


async def keep_registered(
    router: str,
    url: str,
    *,
    token: str | None = None,
    api_key: str | None = None,
    renew_every: float = RENEW_EVERY,
    task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Register ``url`` with the front at ``router`` and keep its lease until cancelled;
    started (``tg.start``) with its worker id once the front has taken it."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    redact = Redactor([secret for secret in (token, api_key) if secret])
    body: dict[str, Any] = {"url": url, "lease": True}
    if api_key:
        body["api_key"] = api_key
    async with httpx.AsyncClient(timeout=renew_every * 2, headers=headers) as client:
        reg = _Registration(client, router, redact)
        started, beat = False, renew_every
        try:
            while True:
                if reg.index is None:
                    response = await reg.call("POST", "/workers", body)
                    if response is not None and response.status_code in (200, 201, 202):
                        reg.index, beat = _registered(response, renew_every)
                        logger.info("register: %s is worker %d of %s", url, reg.index, router)
                        if not started:
                            task_status.started(reg.index)
                            started = True
                else:
                    response = await reg.call("POST", f"/workers/{reg.index}/lease")
                    if response is not None and response.status_code == 404:
                        logger.warning("register: the front forgot worker %d; again", reg.index)
                        reg.index = None
                        continue
                await anyio.sleep(beat)
        finally:
            if reg.index is not None:
                with anyio.CancelScope(shield=True), anyio.move_on_after(DEREGISTER_TIMEOUT):
                    try:
                        await client.delete(f"{reg.router}/workers/{reg.index}")
                    except httpx.HTTPError:
                        pass  # the front will notice the lease lapse


def _registered(response: httpx.Response, renew_every: float) -> tuple[int, float]:
    """The worker id the front gave, and how often it wants the lease renewed (at most
    ``renew_every``); ``ConfigError`` if the answer is not a front's."""
    try:
        answer = response.json()
        index, beat = answer["id"], answer.get("renew_every", renew_every)
    except (ValueError, LookupError, TypeError, AttributeError):
        index, beat = None, None
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < 2**31:
        raise ConfigError(f"{response.url} did not answer as a servescope front: no worker id")
    if not isinstance(beat, int | float) or not 0.05 <= beat <= renew_every:
        beat = renew_every
    return index, float(beat)
