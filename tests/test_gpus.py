"""GPU slices per replica: the visible-device list, the driver's count, and the slicing."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from servescope import _gpus
from servescope._errors import ConfigError
from servescope._gpus import (
    count_gpus,
    gpu_slices,
    parse_visible_devices,
    slice_env,
    visible_devices,
)

UUID_A = "GPU-8932f937-d72c-4106-c12f-20bd9faed9f6"
UUID_B = "GPU-2f1f0a7b-4c3e-11ee-be56-0242ac120002"
MIG_A = "MIG-4ff3e3a5-06c9-5d1c-a7b2-7a8d6e5f3c21"
MIG_OLD = "MIG-GPU-8932f937-d72c-4106-c12f-20bd9faed9f6/1/0"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("", []),
        ("   ", []),
        ("0", ["0"]),
        ("0,1,2,3", ["0", "1", "2", "3"]),
        ("3,1", ["3", "1"]),  # order kept: replica 0 gets the first
        (" 0 , 1 ", ["0", "1"]),
        ("0,1,", ["0", "1"]),  # an empty entry is invalid: CUDA stops there
        ("0,,1", ["0"]),
        ("-1", []),
        ("0,1,-1,2", ["0", "1"]),
        ("0,abc,1", ["0"]),
        ("0,1.5", ["0"]),
        ("gpu-8932f937", []),  # the prefix is GPU- or MIG-, as nvidia-smi writes it
        ("GPU-", []),
        ("10,11", ["10", "11"]),
        (UUID_A, [UUID_A]),
        (f"{UUID_A}, {UUID_B}", [UUID_A, UUID_B]),
        (f"{MIG_A},{MIG_OLD}", [MIG_A, MIG_OLD]),
        (f"0,{UUID_A}", ["0", UUID_A]),
        ("GPU-8932f937", ["GPU-8932f937"]),  # CUDA takes a unique prefix of a UUID
        ("0,-1,0", ["0"]),  # a duplicate past the cut is never seen by CUDA
    ],
)
def test_parse_visible_devices(value: str | None, expected: list[str] | None) -> None:
    assert parse_visible_devices(value) == expected


@pytest.mark.parametrize(
    ("value", "duplicate"),
    [("0,1,0", "0"), ("1, 1", "1"), ("0,00", "00"), (f"{UUID_A},{UUID_A}", UUID_A)],
)
def test_duplicate_devices_are_config_errors(value: str, duplicate: str) -> None:
    with pytest.raises(ConfigError, match="CUDA_VISIBLE_DEVICES") as caught:
        parse_visible_devices(value)
    assert duplicate in str(caught.value)


ids_st = st.lists(
    st.one_of(
        st.integers(0, 99).map(str),
        st.uuids().map(lambda u: f"GPU-{u}"),
        st.uuids().map(lambda u: f"MIG-{u}"),
    ),
    unique_by=lambda d: str(int(d)) if d.isdigit() else d,
    max_size=12,
)


@given(ids_st, st.sampled_from([",", ", ", " ,", " , "]))
def test_a_valid_list_round_trips(devices: list[str], sep: str) -> None:
    assert parse_visible_devices(sep.join(devices) if devices else "") == devices
    assert parse_visible_devices(slice_env(devices)["CUDA_VISIBLE_DEVICES"]) == devices


@given(ids_st, st.data(), st.sampled_from(["-1", "", "x", "-0", "1e3"]))
def test_the_first_invalid_entry_cuts_the_list(
    devices: list[str], data: st.DataObject, bad: str
) -> None:
    cut = data.draw(st.integers(0, len(devices)))
    value = ",".join([*devices[:cut], bad, *devices[cut:]])
    assert parse_visible_devices(value) == devices[:cut]


# The driver's count: /proc first, then nvidia-smi -L, else unknown.

SMI_L = """\
GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-8932f937-d72c-4106-c12f-20bd9faed9f6)
  MIG 3g.40gb     Device  0: (UUID: MIG-4ff3e3a5-06c9-5d1c-a7b2-7a8d6e5f3c21)
GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-2f1f0a7b-4c3e-11ee-be56-0242ac120002)
"""


@pytest.fixture
def no_proc(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """As on a machine without the NVIDIA driver's /proc entries."""
    monkeypatch.setattr(_gpus, "PROC_GPUS", tmp_path / "no-such-dir")


def fake_smi(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, body: str) -> None:
    """Put an ``nvidia-smi`` shell script with ``body`` alone on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "nvidia-smi"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))


def test_proc_entries_are_counted(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    proc = tmp_path / "gpus"
    for bus in ("0000:18:00.0", "0000:2a:00.0", "0000:3a:00.0"):
        (proc / bus).mkdir(parents=True)
    monkeypatch.setattr(_gpus, "PROC_GPUS", proc)
    fake_smi(monkeypatch, tmp_path, "echo 'GPU 0: not asked'")
    assert count_gpus() == 3


def test_empty_proc_dir_is_zero(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "gpus").mkdir()
    monkeypatch.setattr(_gpus, "PROC_GPUS", tmp_path / "gpus")
    assert count_gpus() == 0


@pytest.mark.usefixtures("no_proc")
@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (f"/bin/cat <<'EOF'\n{SMI_L}EOF", 2),  # MIG lines are not GPUs
        ("true", 0),
        ("echo 'No devices were found'; exit 6", None),
        ("echo 'NVIDIA-SMI has failed'; exit 9", None),
        ("echo 'GPU 0: x'; kill -9 $$", None),
        ("printf 'GPU 0: \\377\\376\\n'", 1),  # bad bytes do not break the count
    ],
)
def test_nvidia_smi_lines_are_counted(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, body: str, expected: int | None
) -> None:
    fake_smi(monkeypatch, tmp_path, body)
    assert count_gpus() == expected


@pytest.mark.usefixtures("no_proc")
def test_no_nvidia_smi_is_unknown(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    assert count_gpus() is None


@pytest.mark.usefixtures("no_proc")
def test_a_hanging_nvidia_smi_is_unknown_within_its_timeout(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A wedged driver makes nvidia-smi hang; the count gives up, and leaves nothing running
    (the sleep is a grandchild holding the pipe: the autouse leak check looks for it)."""
    monkeypatch.setattr(_gpus, "NVIDIA_SMI_TIMEOUT", 0.5)
    fake_smi(monkeypatch, tmp_path, "echo 'GPU 0: x'\n/bin/sleep 60\necho 'GPU 1: y'")
    started = time.monotonic()
    assert count_gpus() is None
    assert time.monotonic() - started < 5


def test_the_default_timeout_is_ten_seconds() -> None:
    assert _gpus.NVIDIA_SMI_TIMEOUT == 10.0


@pytest.mark.parametrize(
    ("environ", "count", "expected"),
    [
        ({"CUDA_VISIBLE_DEVICES": "2,3"}, 8, ["2", "3"]),
        ({"CUDA_VISIBLE_DEVICES": ""}, 8, []),
        ({"CUDA_VISIBLE_DEVICES": "-1"}, 8, []),
        ({"CUDA_VISIBLE_DEVICES": UUID_A}, None, [UUID_A]),
        ({}, 4, ["0", "1", "2", "3"]),
        ({}, 0, []),
        ({}, None, None),
        ({"OTHER": "1"}, 2, ["0", "1"]),
    ],
)
def test_visible_devices(environ: dict[str, str], count: int | None, expected: object) -> None:
    asked: list[None] = []

    def fake_count() -> int | None:
        asked.append(None)
        return count

    assert visible_devices(environ, fake_count) == expected
    assert len(asked) == (0 if "CUDA_VISIBLE_DEVICES" in environ else 1)


def test_visible_devices_duplicates_are_config_errors() -> None:
    with pytest.raises(ConfigError):
        visible_devices({"CUDA_VISIBLE_DEVICES": "0,0"}, lambda: 8)


# Slicing.

EIGHT = [str(i) for i in range(8)]


@pytest.mark.parametrize(
    ("devices", "per_replica", "replicas", "expected"),
    [
        (EIGHT, 2, 4, [["0", "1"], ["2", "3"], ["4", "5"], ["6", "7"]]),
        (EIGHT, 1, 8, [[d] for d in EIGHT]),
        (EIGHT, 8, 1, [EIGHT]),
        (EIGHT, 2, 2, [["0", "1"], ["2", "3"]]),  # the rest stay idle
        (["4", "5", "6", "7"], 2, 2, [["4", "5"], ["6", "7"]]),
        ([UUID_A, UUID_B], 1, 2, [[UUID_A], [UUID_B]]),
    ],
)
def test_gpu_slices(
    devices: list[str], per_replica: int, replicas: int, expected: list[list[str]]
) -> None:
    assert gpu_slices(devices, per_replica, replicas) == expected


@pytest.mark.parametrize(
    ("count", "per_replica", "replicas", "words"),
    [
        (6, 2, 4, ("4 replicas", "2 GPUs", "need 8", "6 are visible")),
        (0, 1, 1, ("1 replica ", "1 GPU ", "need 1", "0 are visible")),
        (8, 3, 2, ("8 visible GPUs", "do not divide", "slices of 3")),
        (8, 0, 4, ("GPUs per replica", "at least 1", "not 0")),
        (8, -1, 4, ("at least 1", "not -1")),
        (8, 2, 0, ("replicas", "at least 1", "not 0")),
        (8, 2, -1, ("replicas", "not -1")),
    ],
)
def test_gpu_slices_errors(count: int, per_replica: int, replicas: int, words: tuple[str]) -> None:
    with pytest.raises(ConfigError) as caught:
        gpu_slices([str(i) for i in range(count)], per_replica, replicas)
    for word in words:
        assert word in str(caught.value)


@given(st.integers(0, 16), st.integers(-1, 9), st.integers(-1, 9))
def test_slices_are_disjoint_in_order_and_whole(
    count: int, per_replica: int, replicas: int
) -> None:
    devices = [f"GPU-{i:04d}" for i in range(count)]
    fits = per_replica >= 1 and replicas >= 1 and replicas * per_replica <= count
    if not (fits and count % per_replica == 0):
        with pytest.raises(ConfigError):
            gpu_slices(devices, per_replica, replicas)
        return
    slices = gpu_slices(devices, per_replica, replicas)
    assert len(slices) == replicas
    assert all(len(s) == per_replica for s in slices)
    flat = [d for s in slices for d in s]
    assert flat == devices[: replicas * per_replica]  # in order, and no device twice
    assert len(set(flat)) == len(flat)


@pytest.mark.parametrize(
    ("devices", "expected"),
    [(["2", "3"], "2,3"), (["0"], "0"), ([UUID_A, UUID_B], f"{UUID_A},{UUID_B}"), ([], "")],
)
def test_slice_env(devices: list[str], expected: str) -> None:
    assert slice_env(devices) == {"CUDA_VISIBLE_DEVICES": expected}
