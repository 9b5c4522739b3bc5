"""One run per folder: a suite run holds a lock file on its --out for its lifetime, so a second
launch on the same folder (the same command started twice by accident) is refused instead of
running every cell again.

The lock is `<out>/run.lock` for a run on the whole folder (and `--stages shared`), and
`<out>/shards/shard<I>of<N>/run.lock` for shard I of N: shards of one suite hold their own locks
and do not refuse each other. A run on the whole folder is refused while any shard runs, and a
shard while the whole folder or a shard of another count runs: each takes its own lock first,
then looks for the others (of two launches at once, at least one sees the other).

A lock file is JSON: host, pid, start time and command of its holder. It is created atomically
and never seen half-written: written to a unique temporary file, then hard-linked to its name
(`link` fails if the name exists; atomic on local file systems, NFS (v2 and later) and Lustre);
a link whose reply an NFS client lost is recognised by the link count of the temporary file. On a
file system without hard links it is created with O_CREAT|O_EXCL (atomic on local file systems,
NFSv3 and later, and Lustre). Nothing else is assumed: no flock/fcntl locks, no clocks compared
across machines.

A lock whose holder is gone is taken over, and the takeover logged (and kept in the new lock
file): on the same host, when its pid no longer runs (or runs another process: its start time
differs). The lock of a process on another host cannot be checked from here; the error names the
file to remove when that run is gone. Locks are released when the run ends, fails, is
interrupted or is sent SIGTERM (the CLI turns SIGTERM into an exit, as Slurm sends it at a job's
time limit); only a SIGKILL leaves one behind."""
from __future__ import annotations

import json
import os
import socket
import time
import uuid
from pathlib import Path

from cdabench import progress
from cdabench.harness.shards import Shard, folder_shard, prune_shard_folders

LOCK = "run.lock"


class FolderInUse(RuntimeError):
    """Another run holds the folder; the message names it and what to do."""


def lock_path(out: Path, shard: Shard | None = None) -> Path:
    out = Path(out)
    return out / LOCK if shard is None else out / "shards" / shard.folder / LOCK


class FolderLock:
    """`with FolderLock(out, command, shard):` the run's lock on `out` (or on its shard), held
    for the block; FolderInUse when another live run holds it or a lock it conflicts with."""

    def __init__(self, out: Path, command: str = "", shard: Shard | None = None):
        self.out, self.shard = Path(out), shard
        self.path = lock_path(out, shard)
        self.info = {"host": socket.gethostname(), "pid": os.getpid(), "process_start": _process_start(os.getpid()),
                     "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "command": command,
                     "shard": None if shard is None else str(shard)}

    def __enter__(self) -> FolderLock:
        self.info = _claim(self.out, self.path, self.info)
        try:
            busy = [(path, holder) for path, holder in ((p, _read(p)) for p in self._conflicting())
                    if holder is not None and not _stale_removed(path, holder)]
            if busy:
                raise FolderInUse(_in_use(self.out, busy))
        except BaseException:
            self.release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        """Remove the lock if it is still ours (and a shard's folder if that leaves it empty)."""
        if _read(self.path) == self.info:
            self.path.unlink(missing_ok=True)
        if self.shard is not None:
            prune_shard_folders(self.out)

    def _conflicting(self) -> list[Path]:
        """The locks this one excludes: every shard's for the whole folder; the whole folder's and
        those of shards of another count for a shard."""
        shards = [p for p in sorted((self.out / "shards").glob(f"shard*of*/{LOCK}")) if folder_shard(p.parent.name)]
        if self.shard is None:
            return shards
        return [self.out / LOCK] + [p for p in shards if folder_shard(p.parent.name).count != self.shard.count]


def _claim(out: Path, path: Path, info: dict) -> dict:
    """Create the lock at `path`, taking over a stale one; the info written. FolderInUse if held."""
    for _ in range(3):  # the holder may release it between our failed create and our read
        if _create(path, info):
            return info
        holder = _read(path)
        if holder is None:
            continue
        if holder and _alive(holder) is False:
            taken = dict(info, took_over=holder)
            if _replace_stale(path, holder, taken):
                progress.log(f"took over the lock {path} of {_who(holder)}: that process is no longer running")
                return taken
            holder = _read(path) or holder
        raise FolderInUse(_in_use(out, [(path, holder)]))
    raise FolderInUse(f"{path} keeps appearing and disappearing: another launch is starting on the same folder")


def _stale_removed(path: Path, holder: dict) -> bool:
    """Remove a conflicting lock whose holder is gone (same host, pid not running); True if removed."""
    if holder and _alive(holder) is False and _replace_stale(path, holder, None):
        progress.log(f"removed the stale lock {path} of {_who(holder)}: that process is no longer running")
        return True
    return False


def _replace_stale(path: Path, stale: dict, info: dict | None) -> bool:
    """Replace the stale lock at `path` by `info` (or just remove it), under a guard lock so that two
    processes never both take over the same stale lock. False if another process got there first."""
    guard = path.with_name(path.name + ".takeover")
    if not _create(guard, {"host": socket.gethostname(), "pid": os.getpid()}):
        return False
    try:
        if _read(path) == stale:
            path.unlink(missing_ok=True)
        return True if info is None else _create(path, info)
    finally:
        guard.unlink(missing_ok=True)


def _create(path: Path, info: dict) -> bool:
    """Create `path` holding `info` if it does not exist, atomically; False if it exists."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (json.dumps(info, sort_keys=True) + "\n").encode()
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return os.stat(tmp).st_nlink == 2  # NFS: the link was made, its reply lost and the retry refused
    except OSError:  # no hard links here: an exclusive create (the content follows at once)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        return True
    finally:
        tmp.unlink(missing_ok=True)


def _read(path: Path) -> dict | None:
    """The lock's holder; None if there is no lock, {} if it cannot be read (written by hand, or
    being written by a file system without hard links)."""
    try:
        holder = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _alive(holder: dict) -> bool | None:
    """Whether the lock's holder still runs: None when it ran on another host (not checkable here)."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return None
    pid = holder["pid"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    start = _process_start(pid)
    # The pid runs another process (reused after the holder ended, or after a reboot).
    return not (start is not None and holder.get("process_start") is not None and start != holder["process_start"])


def _process_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux /proc), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat[stat.rindex(")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _who(holder: dict) -> str:
    return f"pid {holder.get('pid')} on {holder.get('host')} (started {holder.get('started')})"


def _in_use(out: Path, holders: list[tuple[Path, dict]]) -> str:
    lines = [f"{out} is in use by another run; this launch is refused (two runs on one folder run every cell twice):"]
    for path, holder in holders:
        if not holder:
            lines.append(f"  {path} exists but is not a lock this version can read: if no run is using the folder, "
                         f"remove {path} and launch again")
            continue
        shard = f" shard {holder['shard']}" if holder.get("shard") else ""
        lines.append(f"  held by{shard} {_who(holder)}: {holder.get('command') or '(no command recorded)'}")
        alive = _alive(holder)
        if alive is None:
            lines.append(f"  it runs on another host, so it cannot be checked from here: if that run is gone, "
                         f"remove {path} and launch again")
        elif alive:
            lines.append(f"  it is still running on this host: wait for it, or stop it (kill {holder.get('pid')})")
        else:
            guard = path.with_name(path.name + ".takeover")
            lines.append(f"  that process is gone, but another launch was taking its lock over: launch again; if "
                         f"this repeats, no launch is running and {guard} is left over: remove it")
    return "\n".join(lines)
