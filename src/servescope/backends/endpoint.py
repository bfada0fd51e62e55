"""The endpoint backend: an OpenAI-compatible server someone else runs.

No process is started. Entering ``open_server`` checks the endpoint once
(``GET /v1/models`` with the API key) and fails with a ``ServerStartError`` that says
which of the usual things is wrong: refused connection, TLS verification, a rejected
key (401/403), no OpenAI API at that URL (404). The key is a ``SecretStr``: it is sent
only in the ``Authorization`` header and never appears in a repr, a log line or an error.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator

from .._config import ServerConfig

__all__ = ["EndpointConfig"]


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
    ca_bundle: Path | None = None
    verify: bool = True
    trust_env: bool = True
    #: Someone else's server, maybe a shared API: probe ``/v1/models`` rarely, be patient.
    health_interval: float | None = Field(default=10.0, gt=0)
    unhealthy_after: float = Field(default=120.0, gt=0)

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"must start with http:// or https://, not {url!r}")
        return url

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
