"""Shards of a ``generate`` job for job arrays: ``--shard K/N`` or ``--shard auto``.

A shard takes the input lines **whose id hashes to it**: shard ``K`` of ``N`` owns an id
whose 64-bit BLAKE2b digest (of its key: its digits, or its string in quotes; a line
without an id has its line number) is ``K`` modulo ``N``, the same on every machine.

By id, not by line number, because exactly-once is a property of ids: every line
holding an id lands in the same shard, so a repeated id is caught as a duplicate there,
as in an unsharded job, and no two shards ever send the same id. Line numbers would
send a repeated id once per shard it fell in. The cost: each shard reads every line to
find its ids (at resume speed, ~300,000 lines a second). A line that is not a valid
prompt is reported by one shard: the one its id picks if the id can be read from the
line's start (``_scan``), else shard ``(line - 1) mod N`` (a Parquet row: always so).

Each shard writes its own results file, the output's name with ``.shard-K-of-N``
before its extensions (``out.jsonl.zst`` → ``out.shard-3-of-8.jsonl.zst``), resumable
and locked like any output; ``servescope merge`` puts the shards together and checks that
they cover every input line exactly once.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from hashlib import blake2b
from pathlib import Path

from ._errors import ConfigError

__all__ = ["Shard", "parse_shard", "shard_path"]

#: Extensions the shard's tag goes before.
EXTENSIONS = (".jsonl", ".json", ".ndjson", ".gz", ".zst", ".zstd")


@dataclass(frozen=True)
class Shard:
    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ConfigError(f"--shard K/N needs N >= 1, got N={self.count}")
        if not 0 <= self.index < self.count:
            raise ConfigError(
                f"--shard {self.index}/{self.count}: K must be 0 to {self.count - 1} (N-1), "
                f"got {self.index}"
            )

    def owns(self, key: bytes) -> bool:
        """Whether the id with this key (``raw_key``) is this shard's."""
        digest = blake2b(key, digest_size=8).digest()
        return int.from_bytes(digest, "little") % self.count == self.index

    def owns_line(self, number: int) -> bool:
        """Whether this shard reports the input line ``number`` if it is malformed."""
        return (number - 1) % self.count == self.index

    @property
    def tag(self) -> str:
        return f"shard-{self.index}-of-{self.count}"

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(text: str, environ: Mapping[str, str] | None = None) -> Shard:
    """``K/N``, or ``auto``: ``K = SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN`` (0 if
    unset) and ``N = SLURM_ARRAY_TASK_COUNT``."""
    environ = os.environ if environ is None else environ
    if text == "auto":
        names = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT")
        missing = [name for name in names if not environ.get(name)]
        if missing:
            raise ConfigError(
                f"--shard auto needs {' and '.join(missing)} (set in a SLURM job array: "
                "sbatch --array=0-7 ...); outside one, give --shard K/N"
            )
        values = {}
        for name in (*names, "SLURM_ARRAY_TASK_MIN"):
            value = environ.get(name, "0")
            if not re.fullmatch(r"[0-9]+", value):
                raise ConfigError(f"--shard auto: {name}={value!r} is not a whole number")
            values[name] = int(value)
        index = values["SLURM_ARRAY_TASK_ID"] - values["SLURM_ARRAY_TASK_MIN"]
        count = values["SLURM_ARRAY_TASK_COUNT"]
        if not 0 <= index < count:
            raise ConfigError(
                f"--shard auto: task {values['SLURM_ARRAY_TASK_ID']} of an array of {count} "
                f"starting at {values['SLURM_ARRAY_TASK_MIN']} gives shard {index}, not 0 to "
                f"{count - 1}: use a contiguous array (--array=0-{count - 1}), or --shard K/N"
            )
        return Shard(index, count)
    match = re.fullmatch(r"\s*([0-9]+)\s*/\s*([0-9]+)\s*", text)
    if match is None:
        raise ConfigError(f"--shard takes K/N (e.g. 0/8) or auto, got {text!r}")
    return Shard(int(match[1]), int(match[2]))


def shard_path(path: Path, shard: Shard) -> Path:
    """``path`` with the shard's tag before its extensions: ``out.shard-3-of-8.jsonl.gz``."""
    name = path.name
    stem, extensions = name, ""
    while True:
        lowered = stem.lower()
        found = next((e for e in EXTENSIONS if lowered.endswith(e) and len(stem) > len(e)), None)
        if found is None:
            break
        stem, extensions = stem[: -len(found)], stem[-len(found) :] + extensions
    return path.with_name(f"{stem}.{shard.tag}{extensions}")
