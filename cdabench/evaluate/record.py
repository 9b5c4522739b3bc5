"""The record an evaluation returns, built in one place for every kind of measurement: what was
measured (`kind`: a post-train cell or a continual cell), on what (task, dataset, the class map's
hash), how (device, versions) and by which command. The harness adds the suite, the cell and its
key; records.append_record adds the schema version and the record's own hash."""
from __future__ import annotations

from cdabench import artifacts
from cdabench.engine.context import Context
from cdabench.engine.runtime import device_description, versions

KINDS = ("cross-arch", "continual")


def measurement(ctx: Context, kind: str, hashes: dict, command: str, **fields) -> dict:
    """A record of `kind` with the fields every record shares, then the kind's own `fields`."""
    if kind not in KINDS:
        raise ValueError(f"unknown record kind {kind!r}: use {', '.join(KINDS)}")
    return {"kind": kind, "task": ctx.task.name, "dataset": ctx.data.spec.name, **fields,
            "device": device_description(ctx.device), "versions": versions(),
            "hashes": {**hashes, "classes": artifacts.hash_config(ctx.classes)}, "command": command}
