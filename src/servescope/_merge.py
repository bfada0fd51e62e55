"""``servescope merge``: the results files of a sharded job put together, and checked.

Before anything is written, every input line is accounted for: each valid prompt (not
malformed, not repeating an earlier line's id) must have exactly one result across the
shards' files, and no result may be for an id the input does not hold. Anything else is
an error naming what is missing (the line, its id, the shard that should have it),
repeated or foreign, and nothing is written. A shard still being written (its lock
held) or with a torn last line (killed, not yet rerun) is an error too.

The merged file is the shards' files one after the other, byte for byte (results are
whole lines, compressed ones whole members, so the concatenation is a valid file of
the same format), written beside the output and renamed over it at the end; the shards'
errors files are put together the same way. The shards' files are left as they were.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from ._errors import ConfigError
from ._generate import (
    PENDING,
    SENT,
    IdSet,
    Job,
    Prepared,
    _check,
    _expected,
    _key_object,
    _plan,
    _record,
    _records,
)
from ._inputs import Fields
from ._outputs import LineWriter, raw_key, scan_results
from ._scan import line_key
from ._shards import Shard, shard_path

__all__ = ["Merged", "find_shards", "merge"]

#: Problems named in full in an error; the rest are counted.
SHOWN = 10


@dataclass
class Merged:
    """What ``merge`` wrote: the results, the input's malformed lines, the files."""

    results: int = 0
    malformed: int = 0
    files: list[Path] = field(default_factory=list)


def find_shards(output: Path) -> int:
    """The shard count of the files named like ``output``'s shards (one count only)."""
    before, after = shard_path(output, Shard(0, 1)).name.split("shard-0-of-1")
    regex = re.compile(re.escape(before) + "shard-([0-9]+)-of-([0-9]+)" + re.escape(after))
    directory = output.parent
    counts = set()
    if directory.is_dir():
        for path in directory.iterdir():
            match = regex.fullmatch(path.name)
            if match is not None:
                counts.add(int(match[2]))
    if not counts:
        example = shard_path(output, Shard(0, 2)).name
        raise ConfigError(
            f"no shard files of {str(output)!r} in {str(directory)!r} (named like {example!r}); "
            "give --shards N"
        )
    if len(counts) > 1:
        raise ConfigError(
            f"shard files of {str(output)!r} for different shard counts ({sorted(counts)}); "
            "give --shards N"
        )
    return counts.pop()


def _keys(job: Job, send: Prepared) -> Iterator[tuple[int, bytes]]:
    """The keys of the input lines ``send`` marked, with their line numbers."""
    for number, item in _records(job):
        if not send.to_send(number):
            continue
        if isinstance(item, bytes):
            key = line_key(item, number)
            if key is None:
                found = _check(_record(item.decode("utf-8", errors="replace")), job.fields)
                key = raw_key(number if found is None else found)
        else:
            found = _check(item, job.fields)
            key = raw_key(number if found is None else found)
        assert key is not None
        yield number, key


def _listed(items: list[str], total: int) -> str:
    more = f", and {total - len(items)} more" if total > len(items) else ""
    return ", ".join(items) + more


def merge(input: Path, output: Path, count: int, fields: Fields | None = None) -> Merged:
    """Check that the ``count`` shards of the job on ``input`` cover it exactly once, then
    write their results to ``output`` (and their errors files to ``output.errors``)."""
    fields = fields or Fields()
    if not input.is_file():
        raise ConfigError(f"input file {str(input)!r} does not exist")
    shards = [Shard(index, count) for index in range(count)]
    paths = [shard_path(output, shard) for shard in shards]
    absent = [str(path) for path, _ in zip(paths, shards, strict=True) if not path.is_file()]
    if absent:
        raise ConfigError(
            f"{len(absent)} of the {count} shards have no results file "
            f"({_listed(absent[:SHOWN], len(absent))}): run those shards first "
            "(servescope generate ... --shard K/N)"
        )
    job = Job(input, output, output.with_name(output.name + ".errors"), fields=fields)
    ids = IdSet(_expected(job))
    plan = Prepared(0, ids, None, LineWriter(Path(os.devnull)))  # type: ignore[arg-type]
    malformed: list[int] = []
    _plan(job, plan, lambda number, message, text: malformed.append(number))
    with ExitStack() as stack:
        repeated: list[str] = []
        foreign: list[str] = []
        repeats = foreigns = matched = 0
        for path in paths:
            file = stack.enter_context(path.open("rb"))
            try:
                fcntl.flock(file.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ConfigError(
                    f"{path} is still being written by a servescope generate job (it holds "
                    "the file's lock); merge once every shard has finished"
                ) from None
            except OSError:
                pass  # a filesystem without locks: nothing to learn here

            def seen(keys: list[bytes], path: Path = path) -> None:
                nonlocal repeats, foreigns, matched
                for key, state in zip(keys, ids.put_many(keys, SENT), strict=True):
                    if state == PENDING:
                        matched += 1
                        continue
                    if state == SENT:
                        repeats += 1
                        if len(repeated) < SHOWN:
                            repeated.append(f"id {_key_object(key)!r} (again in {path.name})")
                    else:
                        foreigns += 1
                        if len(foreign) < SHOWN:
                            foreign.append(f"id {_key_object(key)!r} in {path.name}")

            good, size = scan_results(path, seen)
            if good != size:
                raise ConfigError(
                    f"{path} ends with a torn result (its job was killed): rerun that shard "
                    "with the same command to finish it, then merge"
                )
        missing: list[str] = []
        lacking = 0
        if matched < plan.left:
            for number, key in _keys(job, plan):
                if ids.put_many([key], None)[0] == PENDING:
                    lacking += 1
                    if len(missing) < SHOWN:
                        shard = next(shard for shard in shards if shard.owns(key))
                        missing.append(f"line {number} (id {_key_object(key)!r}, shard {shard})")
        problems = []
        if lacking:
            problems.append(
                f"{lacking} input lines have no result: {_listed(missing, lacking)}; rerun "
                "their shards (the same servescope generate command with --shard K/N)"
            )
        if repeats:
            problems.append(f"{repeats} results repeat an id: {_listed(repeated, repeats)}")
        if foreigns:
            problems.append(
                f"{foreigns} results are for ids not in {str(input)!r}: "
                + _listed(foreign, foreigns)
            )
        if problems:
            raise ConfigError(
                "the shards do not cover the input exactly once (nothing written):\n  - "
                + "\n  - ".join(problems)
            )
        merged = Merged(results=plan.left, malformed=len(malformed))
        for target, sources in (
            (output, paths),
            (job.errors, [path.with_name(path.name + ".errors") for path in paths]),
        ):
            present = [source for source in sources if source.is_file()]
            if target != output and not present:
                continue
            _concatenate(target, present)
            merged.files.append(target)
    return merged


def _concatenate(target: Path, sources: list[Path]) -> None:
    """``sources`` one after the other into ``target``, replacing it at the end."""
    partial = target.with_name(target.name + ".merging")
    try:
        with partial.open("wb") as out:
            for source in sources:
                with source.open("rb") as file:
                    shutil.copyfileobj(file, out, 1 << 20)
        os.replace(partial, target)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise ConfigError(f"cannot write {str(target)!r}: {exc.strerror or exc}") from None
