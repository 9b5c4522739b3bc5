"""Test-only fault injection: `kill -9` in the middle of writing a file, at a point a test names.

Python imports `sitecustomize` at start-up from the first folder on its path that has one; only
tests/test_killed_runs.py puts this folder there (PYTHONPATH of the `cdabench` processes it
starts), and nothing happens unless CDABENCH_TEST_KILL_AT is set. No product code reads it.

CDABENCH_TEST_KILL_AT=<fnmatch pattern of a path>: every artifact is written by
cdabench/artifacts.py's atomic_write_bytes (a temporary file in the target's folder, then
os.replace over the target). When the N-th target (CDABENCH_TEST_KILL_NTH, default 1) matching
the pattern is about to be moved into place, its temporary file is cut to half of its bytes and
the process sends itself SIGKILL: what the disk holds when a process is killed while writing.
"""
import fnmatch
import os
import signal
import threading

_PATTERN = os.environ.get("CDABENCH_TEST_KILL_AT")

if _PATTERN:
    _NTH = int(os.environ.get("CDABENCH_TEST_KILL_NTH", "1"))
    _replace = os.replace
    _lock = threading.Lock()
    _seen = [0]

    def _replace_or_die(src, dst, *args, **kwargs):
        if fnmatch.fnmatch(os.fspath(dst), _PATTERN):
            with _lock:
                _seen[0] += 1
                if _seen[0] == _NTH:
                    with open(src, "r+b") as fh:
                        fh.truncate(os.path.getsize(src) // 2)
                    os.kill(os.getpid(), signal.SIGKILL)
        return _replace(src, dst, *args, **kwargs)

    os.replace = _replace_or_die
