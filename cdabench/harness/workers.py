"""Jobs in worker processes: the path of `cdabench run --workers N`, and of any suite whose cells
must run in a plain process under torchrun.

At the embedded default's sizes a post-train step is mostly per-operator overhead, which one
thread serves no faster than two; so N single-thread processes run N cells at once
(docs/suites.md has the measurements). Each worker opens the task once and takes the suite's
teacher from the cache (the parent trained it) when a cell first needs it; a cell's result does
not depend on which worker ran it, only on the number of threads (recorded). The parent alone
writes records.

On GPUs each worker is pinned to one device (`runtime.worker_devices`: round-robin over the
visible GPUs without torchrun, the rank's own GPU under it). A worker is always a plain single
process: it strips torchrun's environment before anything can read it, so it never joins (and
hangs) its parent rank's process group, and Avalanche stays in its single-process mode."""
from __future__ import annotations

import multiprocessing
import signal
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Iterator

import torch

from cdabench import progress
from cdabench.engine.context import open_context
from cdabench.engine.runtime import strip_launcher_env
from cdabench.engine.watch import Watch
from cdabench.harness.cells import Job, Session
from cdabench.schema import Task

_SESSION: list[Session] = []


def _init_worker(task: Task, data_root: str | None, devices, cache: str | None, threads: int,
                 watch: Watch | None) -> None:
    """`devices`: a queue holding one device name per worker; each worker takes one."""
    strip_launcher_env()
    device = devices.get()
    # Ctrl-C reaches the whole process group: only the parent acts on it (and stops the workers).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(threads)
    progress.set_quiet(True)  # the parent shows one bar and a line per finished cell
    _SESSION.append(Session(open_context(task, data_root, device, cache), watch=watch))


def _run_job(job: Job) -> dict:
    return job.run(_SESSION[0], **job.args)


def run_in_workers(jobs: list[Job], devices: list[str], threads: int, task: Task, data_root: str | None,
                   cache: str | None, watch: Watch | None = None) -> Iterator[tuple[Job, dict]]:
    """Yield (job, record) as jobs finish, in len(devices) workers (one per entry, on that
    device), submitted in the order given. `task`: the parent's Task (the context's: command-line
    overrides, precision included; a worker that reloaded the task file would lose them). `watch`:
    the parent's (curve points, loggers). Stops submitting when the caller stops iterating (the
    pool is shut down)."""
    workers = len(devices)
    context = multiprocessing.get_context("spawn")  # no fork of a process that holds torch threads
    device_queue = context.Queue()
    for device in devices:
        device_queue.put(device)
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                               initargs=(task, data_root, device_queue, cache, threads, watch))
    queue, running, clean = list(jobs), {}, False
    try:
        while queue or running:
            while queue and len(running) < workers:
                job = queue.pop(0)
                running[pool.submit(_run_job, job)] = job
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                job = running.pop(future)
                yield job, future.result()
        clean = True
    finally:
        if clean:
            pool.shutdown(wait=True)
        else:
            # Interrupted, a cell failed, or the caller stopped early: do not wait minutes for the
            # running cells; they were not recorded and run again next time. (The executor has no
            # public way to stop a busy worker, hence its process table.)
            for process in list((getattr(pool, "_processes", None) or {}).values()):
                process.terminate()
            pool.shutdown(wait=False, cancel_futures=True)
