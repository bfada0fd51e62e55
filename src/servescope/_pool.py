"""Sending requests to a server: payload defaults, readiness, errors, parsing."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import httpx

from ._errors import RequestError, RequestTimeout
from ._responses import Completion, classify_status, parse_completion, parse_json

__all__ = ["RequestPool"]

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"


class RequestPool:
    """Posts OpenAI requests to one server through one keep-alive httpx client.

    ``base_url`` and ``wait_ready`` come from the server scope: requests wait for
    readiness by themselves, and see the current address after a restart.
    """

    def __init__(
        self,
        client: httpx.AsyncClient,
        *,
        base_url: Callable[[], str],
        wait_ready: Callable[[], Awaitable[None]],
        model: str,
        default_params: Mapping[str, Any],
        use_chat: bool,
    ) -> None:
        self._client = client
        self._base_url = base_url
        self._wait_ready = wait_ready
        self._model = model
        self._defaults = dict(default_params)
        self._use_chat = use_chat

    async def request(
        self, payload: Mapping[str, Any], *, path: str | None = None
    ) -> dict[str, Any]:
        """POST ``payload`` (with the model and default params filled in); the JSON answer."""
        body = {"model": self._model, **self._defaults, **payload}
        path = path or (CHAT_PATH if self._use_chat else COMPLETIONS_PATH)
        await self._wait_ready()
        try:
            response = await self._client.post(self._base_url() + path, json=body)
        except httpx.TimeoutException as exc:
            raise RequestTimeout(f"no answer from {path} in time: {exc!r}") from exc
        except httpx.HTTPError as exc:
            raise RequestError(f"request to {path} failed: {exc!r}") from exc
        error = classify_status(response.status_code, response.content)
        if error is None and response.status_code >= 300:
            error = RequestError(f"server answered {response.status_code} to {path}")
        if error is not None:
            raise error
        return parse_json(response.content)

    async def chat(self, messages: list[dict[str, Any]], **params: Any) -> Completion:
        """A chat completion for ``messages``."""
        return parse_completion(
            await self.request({"messages": messages, **params}, path=CHAT_PATH)
        )

    async def complete(self, prompt: str, **params: Any) -> Completion:
        """A text completion of ``prompt``."""
        response = await self.request({"prompt": prompt, **params}, path=COMPLETIONS_PATH)
        return parse_completion(response)
