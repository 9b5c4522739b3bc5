"""Shards of a suite: `cdabench run --suite S --shard I/N` runs the cells dealt to shard I of N,
one independent job each (a Slurm job array), with no coordination between the jobs: the
scheduler schedules, and every shard computes the same deal from the same files.

The rule (what "the cells not recorded yet" means when N jobs start at different times): the
cells are dealt longest first across N shards, as across torchrun's ranks, after skipping the
cells that are *settled*, recorded in any record file of the folder except the N shards' own
(`shards/shard<i>of<N>/records.jsonl`). While the array runs only its own files change (a run on
the whole folder, or shards of another count, are refused while it holds its locks: harness/lock.py),
so every shard deals the same cells whenever it starts. A shard then runs the cells of its deal
that no file records yet (its own file after a restart). So every cell is dealt to exactly one
shard, and run by it unless it is already recorded: every cell once, whatever N and start times.

A plain `cdabench run` on the folder (no --shard) merges the shards' files into records.jsonl
(records.merge_records, as it merges the files of torchrun's ranks) before it runs what is left."""
from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from cdabench.config import ConfigError
from cdabench.harness.cells import Job, deal_longest_first

_FOLDER = re.compile(r"^shard(\d+)of(\d+)$")


@dataclass(frozen=True)
class Shard:
    """Shard `index` (1-based) of `count`."""

    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    @property
    def folder(self) -> str:
        return f"shard{self.index}of{self.count}"


def parse_shard(text: str, environ: Mapping[str, str] | None = None) -> Shard:
    """`I/N` (1 <= I <= N), or `slurm`: the task's place in its job array, from
    SLURM_ARRAY_TASK_ID, SLURM_ARRAY_TASK_MIN and SLURM_ARRAY_TASK_COUNT (I = ID - MIN + 1, N =
    COUNT), which needs an array of consecutive indices (`--array=0-15`, `--array=1-16%4`)."""
    if text == "slurm":
        return _slurm_shard(os.environ if environ is None else environ)
    match = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not match:
        raise ConfigError(f"--shard must be I/N (shard I of N, e.g. 2/8) or slurm, got {text!r}")
    index, count = int(match[1]), int(match[2])
    if not 1 <= index <= count:
        raise ConfigError(f"--shard {text}: I must be between 1 and N (the shards are numbered 1 to {count})")
    return Shard(index, count)


def _slurm_shard(environ: Mapping[str, str]) -> Shard:
    names = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_COUNT")
    missing = [n for n in names if n not in environ]
    if missing:
        raise ConfigError(f"--shard slurm: {', '.join(missing)} not set: submit the run as a job array "
                          "(sbatch --array=0-<N-1> ...), or give the shard as --shard I/N")
    try:
        task, low, count = (int(environ[n]) for n in names)
        high = int(environ.get("SLURM_ARRAY_TASK_MAX", low + count - 1))
    except ValueError as exc:
        raise ConfigError(f"--shard slurm: the array variables are not whole numbers ({exc})") from exc
    if high - low + 1 != count or not low <= task <= high:
        raise ConfigError(f"--shard slurm: the array's indices are not consecutive (min {low}, max {high}, "
                          f"{count} tasks): submit it with --array=<first>-<last> (a % limit is fine, a step is not)")
    return Shard(task - low + 1, count)


def folder_shard(name: str) -> Shard | None:
    """The shard whose folder under <out>/shards/ is `name` (shard<I>of<N>), or None."""
    match = _FOLDER.match(name)
    return Shard(int(match[1]), int(match[2])) if match else None


def shard_records_path(out: Path, shard: Shard) -> Path:
    """Where a shard writes its cells' records (merged into records.jsonl by a later plain run)."""
    return Path(out) / "shards" / shard.folder / "records.jsonl"


def shard_record_files(out: Path, count: int | None = None) -> list[Path]:
    """The record files of the folder's shards (of `count` shards only, when given)."""
    return [path for path in sorted((Path(out) / "shards").glob("shard*of*/records.jsonl"))
            if (shard := folder_shard(path.parent.name)) and (count is None or shard.count == count)]


def prune_shard_folders(out: Path) -> None:
    """Remove the folders of shards that hold nothing any more (their records merged, no lock)."""
    for folder in sorted((Path(out) / "shards").glob("shard*of*")) + [Path(out) / "shards"]:
        try:
            folder.rmdir()
        except OSError:  # not empty, or not there
            pass


def shard_jobs(jobs: list[Job], shard: Shard, settled: set[str], recorded: set[str]) -> tuple[list[Job], list[Job]]:
    """(dealt, to run): the jobs dealt to `shard` after skipping the `settled` cell keys (recorded
    outside this array's own files), and those of them not `recorded` anywhere yet (the module's rule)."""
    dealt = deal_longest_first([job for job in jobs if job.key not in settled], shard.count)[shard.index - 1]
    return dealt, [job for job in dealt if job.key not in recorded]


def stages_command(command: str, suite: str, out: Path) -> str:
    """The command that makes the shared stages a shard needs: the shard's own with --stages
    shared instead of --shard (or a plain one for a caller of the Python API)."""
    words = shlex.split(command)
    if words[:2] != ["cdabench", "run"]:
        return f"cdabench run --suite {shlex.quote(suite)} --out {shlex.quote(str(out))} --stages shared"
    kept, skip = [], False
    for word in words:
        if skip or word.startswith("--shard="):
            skip = False
            continue
        skip = word == "--shard"
        if not skip:
            kept.append(word)
    return " ".join(shlex.quote(w) for w in kept) + " --stages shared"
