"""The endpoint backend: an OpenAI-compatible server someone else runs.

No process is started. Entering ``open_server`` checks the endpoint once
(``GET /v1/models`` with the API key) and fails with a ``ServerStartError`` that says
which of the usual things is wrong: refused connection, TLS verification, a rejected
key (401/403), no OpenAI API at that URL (404). The key is a ``SecretStr``: it is sent
only in the ``Authorization`` header and never appears in a repr, a log line or an error.
"""

from __future__ import annotations

import ssl
import urllib.parse
from typing import Any, Literal

import httpx
from pydantic import Field, SecretStr, field_validator

from .._config import MAX_SECONDS, Flag, Number, PathText, ServerConfig
from ._base import check_api_key

__all__ = ["EndpointConfig", "url_problem"]


def url_problem(url: str) -> str | None:
    """Why ``url`` cannot be an endpoint's URL, or ``None``. The message never quotes the
    URL: it may hold a password."""
    if not url.startswith(("http://", "https://")):
        return "must start with http:// or https://"
    if any(char.isspace() or not char.isprintable() for char in url):
        return "must not contain spaces or control characters"
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "is not a valid URL (a malformed [IPv6] address?)"
    if "@" in parts.netloc:
        return (
            "must not hold a user or a password (user:password@host): servescope does not "
            "send them; for bearer auth use api_key"
        )
    if not parts.hostname:
        return "has no host"
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        return "has an invalid port (allowed: 1 to 65535)"
    if parts.query or parts.fragment:
        return "must not have a query or a fragment (paths are appended to it)"
    try:
        httpx.URL(url)
    except httpx.InvalidURL:
        return "is not a valid URL"
    return None


class EndpointConfig(ServerConfig):
    """An external OpenAI-compatible endpoint.

    Attributes:
        url: the server's root or its ``/v1`` (``https://host/v1`` as for the openai client).
        api_key: sent as ``Authorization: Bearer ...``.
        ca_bundle: a PEM file of CAs to trust instead of the system's (private clusters).
        verify: TLS certificate verification; on unless turned off explicitly.
        trust_env: honour ``HTTPS_PROXY`` / ``SSL_CERT_FILE`` and friends.
    """

    backend: Literal["endpoint"] = "endpoint"
    url: str
    api_key: SecretStr | None = None
    ca_bundle: PathText | None = None
    verify: Flag = True
    trust_env: Flag = True
    #: Someone else's server, maybe a shared API: probe ``/v1/models`` rarely, be patient.
    health_interval: Number | None = Field(default=10.0, gt=0, le=MAX_SECONDS)
    unhealthy_after: Number = Field(default=120.0, gt=0, le=MAX_SECONDS)

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        problem = url_problem(url)
        if problem is not None:
            raise ValueError(problem)
        return url

    @field_validator("api_key")
    @classmethod
    def _valid_key(cls, key: SecretStr | None) -> SecretStr | None:
        return check_api_key(key)

    def secrets(self) -> list[str]:
        """The API key too."""
        key = [self.api_key.get_secret_value()] if self.api_key is not None else []
        return [*super().secrets(), *key]

    def root_url(self) -> str:
        """The URL that ``/v1/...`` paths are appended to."""
        root = self.url.rstrip("/")
        return root.removesuffix("/v1")

    def client_options(self) -> dict[str, Any]:
        """httpx client settings: auth header, TLS verification, proxies from the environment."""
        headers = {}
        if self.api_key is not None:
            headers["Authorization"] = f"Bearer {self.api_key.get_secret_value()}"
        verify: bool | ssl.SSLContext = self.verify
        if self.verify and self.ca_bundle is not None:
            verify = ssl.create_default_context(cafile=str(self.ca_bundle))
        return {"headers": headers, "verify": verify, "trust_env": self.trust_env}
