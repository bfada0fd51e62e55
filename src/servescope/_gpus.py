"""GPU slices: which devices each replica of a pool may see.

A pool of N replicas of a tp·pp model gives each replica its own
``CUDA_VISIBLE_DEVICES`` slice of the devices the pool itself may use (vLLM's
external data parallelism and SGLang's ``--dp-size`` do the same with
``base_gpu_id = dp_id·tp_size``). Two replicas on one GPU run out of memory at load,
or worse, much later; so the slices never overlap, and a device count that does not
divide into whole slices is a ``ConfigError`` before anything starts.

The visible devices are ``CUDA_VISIBLE_DEVICES`` read as CUDA reads it: ids in order,
cut at the first invalid entry (``"0,1,-1,2"`` is ``0,1``; ``"-1"`` hides every GPU),
each id as given (an index, or a ``GPU-``/``MIG-`` UUID or a unique prefix of one).
The ids are the parent's, and a child's ``CUDA_VISIBLE_DEVICES`` replaces (does not
nest in) the parent's, so a slice of them names the same physical devices. Without
the variable, the driver's count (``/proc/driver/nvidia/gpus``, else
``nvidia-smi -L``) gives indices ``0..n-1``; ``count_gpus`` is the only I/O here.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from ._errors import ConfigError

__all__ = [
    "count_gpus",
    "gpu_slices",
    "parse_visible_devices",
    "slice_env",
    "visible_devices",
]

ENV_VAR = "CUDA_VISIBLE_DEVICES"
#: One entry per GPU the NVIDIA driver has bound, named by PCI bus id.
PROC_GPUS = Path("/proc/driver/nvidia/gpus")
#: The longest ``nvidia-smi -L`` may take (a wedged driver makes it hang).
NVIDIA_SMI_TIMEOUT = 10.0

_INDEX = re.compile(r"[0-9]+")
_UUID = re.compile(r"(GPU|MIG)-\S+")
_SMI_GPU_LINE = re.compile(rb"GPU [0-9]+:")


def parse_visible_devices(value: str | None) -> list[str] | None:
    """The device ids in a ``CUDA_VISIBLE_DEVICES`` value, as CUDA reads it.

    ``None`` when the variable is unset; ``[]`` when it hides every GPU (``""``,
    ``"-1"``). Entries are stripped and kept in order up to the first invalid one,
    where CUDA stops reading. A device named twice is a ``ConfigError``.
    """
    if value is None:
        return None
    devices: list[str] = []
    for entry in (part.strip() for part in value.split(",")):
        if not (_INDEX.fullmatch(entry) or _UUID.fullmatch(entry)):
            break
        devices.append(entry)
    _refuse_duplicates(devices, value)
    return devices


def _refuse_duplicates(devices: list[str], value: str) -> None:
    """``ConfigError`` if two entries name one device (``1`` and ``01`` are one index)."""
    seen: set[str] = set()
    for device in devices:
        key = str(int(device)) if _INDEX.fullmatch(device) else device
        if key in seen:
            raise ConfigError(f"{ENV_VAR}={value!r} names device {device} twice")
        seen.add(key)


def count_gpus() -> int | None:
    """How many GPUs the NVIDIA driver shows, or ``None`` if that cannot be told.

    Blocking (``nvidia-smi`` may take up to ``NVIDIA_SMI_TIMEOUT`` seconds): call it
    from a worker thread inside an event loop.
    """
    try:
        return sum(1 for _ in PROC_GPUS.iterdir())
    except OSError:
        pass
    out = _nvidia_smi_list()
    if out is None:
        return None
    return sum(1 for line in out.splitlines() if _SMI_GPU_LINE.match(line))


def _nvidia_smi_list() -> bytes | None:
    """``nvidia-smi -L``'s output, or ``None`` if it is missing, fails or hangs."""
    path = shutil.which("nvidia-smi")
    if path is None:
        return None
    try:
        proc = subprocess.Popen(
            [path, "-L"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # its own group, so a hang is killed whole
        )
    except OSError:
        return None
    with proc:
        try:
            out, _ = proc.communicate(timeout=NVIDIA_SMI_TIMEOUT)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            return None
    return out if proc.returncode == 0 else None


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """Kill a timed-out process and whatever it started (a child may hold its pipe)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # not reaped yet: the group id is still its own
    except OSError:
        proc.kill()  # so that the wait below cannot hang
    proc.wait()


def visible_devices(
    environ: Mapping[str, str], count: Callable[[], int | None] = count_gpus
) -> list[str] | None:
    """The devices a pool may use: ``CUDA_VISIBLE_DEVICES`` if set, else indices
    ``0..n-1`` from ``count()``, else ``None`` (no GPU known)."""
    if ENV_VAR in environ:
        return parse_visible_devices(environ[ENV_VAR])
    n = count()
    return None if n is None else [str(i) for i in range(n)]


def gpu_slices(devices: Sequence[str], per_replica: int, replicas: int) -> list[list[str]]:
    """Replica ``i``'s devices: ``devices[i*per_replica:(i+1)*per_replica]``.

    ``ConfigError`` naming the numbers when a replica would get no GPU, when there
    are too few devices, or when they do not divide into slices of ``per_replica``.
    """
    _check_slicing(len(devices), per_replica, replicas)
    return [list(devices[i * per_replica : (i + 1) * per_replica]) for i in range(replicas)]


def _check_slicing(visible: int, per_replica: int, replicas: int) -> None:
    """The reasons ``visible`` devices cannot be sliced as asked, as ``ConfigError``."""
    if per_replica < 1:
        raise ConfigError(f"GPUs per replica must be at least 1, not {per_replica}")
    if replicas < 1:
        raise ConfigError(f"replicas must be at least 1, not {replicas}")
    if replicas * per_replica > visible:
        raise ConfigError(
            f"{_count(replicas, 'replica')} \N{MULTIPLICATION SIGN} "
            f"{_count(per_replica, 'GPU')} need {replicas * per_replica}, "
            f"{visible} are visible"
        )
    if visible % per_replica:
        raise ConfigError(f"{visible} visible GPUs do not divide into slices of {per_replica}")


def _count(n: int, noun: str) -> str:
    """``1 GPU``, ``2 GPUs``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def slice_env(devices: Sequence[str]) -> dict[str, str]:
    """The environment that gives a replica its slice: ``{"CUDA_VISIBLE_DEVICES": "2,3"}``."""
    return {ENV_VAR: ",".join(devices)}
