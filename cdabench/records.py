"""Records: one finished cell of a benchmark, a schema-versioned JSON object, one per line of
`records.jsonl`. Leaderboards and regression checks are computed from records only."""
from __future__ import annotations

import json
from pathlib import Path

from cdabench import artifacts

SCHEMA_VERSION = 1
REQUIRED = ("schema_version", "task", "method", "ipc", "student", "labels", "seed", "top1", "top5", "epochs",
            "image_bytes", "label_bytes", "seconds", "device", "versions", "hashes")


class RecordError(ValueError):
    pass


def record_id(record: dict) -> str:
    """A content hash of the record (without its own id): provenance for leaderboards."""
    body = {k: v for k, v in record.items() if k != "record_hash"}
    return artifacts.hash_config(body)[:16]


def is_continual(record: dict) -> bool:
    """Continual records (a continual suite's cells) share the schema but not the meaning of
    `top1` (final seen-class accuracy): tables, leaderboards and checks keep them apart."""
    return record.get("kind") == "continual" or bool(record.get("continual"))  # `continual`: before `kind`


def validate(record: dict, where: str = "record") -> dict:
    version = record.get("schema_version")
    if version != SCHEMA_VERSION:
        raise RecordError(f"{where}: schema_version {version!r} is not the supported {SCHEMA_VERSION}; "
                          "re-run the suite with this cdabench version to regenerate its records")
    missing = [k for k in REQUIRED if k not in record]
    if missing:
        raise RecordError(f"{where}: missing field(s) {', '.join(missing)}")
    return record


def append_record(path: Path, record: dict) -> dict:
    """Append one record; the whole file is rewritten atomically, so a crash never leaves half a line."""
    record = dict(record, schema_version=SCHEMA_VERSION)
    record["record_hash"] = record_id(record)
    validate(record)
    path = Path(path)
    existing = path.read_bytes() if path.exists() else b""
    line = json.dumps(record, sort_keys=True, ensure_ascii=False) + "\n"
    artifacts.atomic_write_bytes(path, existing + line.encode())
    return record


def read_records(path: Path) -> list[dict]:
    path = Path(path)
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(validate(json.loads(line), f"{path}:{n}"))
            except json.JSONDecodeError as exc:
                raise RecordError(f"{path}:{n}: not a JSON object ({exc})") from exc
    return records


def unique_cells(records: list[dict]) -> tuple[list[dict], list[dict]]:
    """(kept, left_out): every cell once, and the records left out. A cell is its `cell_key` (a
    suite's cells), else its record hash (`cdabench evaluate`). Two runs launched on one folder by an
    older version, or a record copied by hand, leave two records of one key: one measurement,
    counted once (the first). Two keys of one named cell (cell_identity) are two
    measurements, as `cdabench run --remeasure` after an edited task or a later folder read
    after an earlier one makes them: the later supersedes the earlier (describe_left_out says so)."""
    seen, kept, left_out, latest = set(), {}, [], {}
    for record in records:
        key = _merge_key(record)
        if key in seen:
            left_out.append(record)
            continue
        seen.add(key)
        if record.get("cell") is not None:
            name = cell_identity(record)
            if name in latest:
                left_out.append(kept.pop(latest[name]))
            latest[name] = key
        kept[key] = record
    return list(kept.values()), left_out


def cell_identity(record: dict) -> tuple:
    """Which cell a suite's record measures, whatever its key: task, student and cell name (a
    continual cell's name omits the suite's student, and one folder may hold two students' runs)."""
    return record["task"], record["student"], record["cell"]


def describe_left_out(kept: list[dict], left_out: list[dict]) -> str:
    """What unique_cells left out and why, for a leaderboard's provenance and the check's output."""
    kept_keys = {_merge_key(r) for r in kept}
    repeats, superseded = [], []
    for r in left_out:  # a key no kept record has: a measurement of a named cell that a later one replaced
        (superseded if r.get("cell") is not None and _merge_key(r) not in kept_keys else repeats).append(r)
    parts = []
    if repeats:
        parts.append(f"{len(repeats)} more record(s) of cells already counted (same cell_key: two runs on one "
                     f"folder, or a copied record) are left out, each cell counted once: {_cell_names(repeats)}")
    if superseded:
        parts.append(f"{len(superseded)} earlier measurement(s) of cells measured again (another cell_key: an "
                     "edited task run with --remeasure, or a later run folder read after this one) are superseded by "
                     f"the later record: {_cell_names(superseded)}")
    return "; ".join(parts)


def _cell_names(rows: list[dict]) -> str:
    return ", ".join(sorted({r.get("cell") or f"{r['method']}/{'full' if r['ipc'] is None else 'ipc' + str(r['ipc'])}/"
                                                f"{r['student']}/{r['labels']}/seed{r['seed']}" for r in rows}))


def merge_records(path: Path, parts: list[Path], order: list[str] | None = None) -> list[dict]:
    """Append to `path` the records of the files `parts` (each rank's records of a multi-process
    suite) that it does not hold yet (by cell_key, else record hash), in one atomic write, then
    delete the parts. Safe to repeat after a crash at any point: a part already merged adds
    nothing. `order`: cell keys in the order new records are appended (the rest after, as read).
    Returns the records appended."""
    path = Path(path)
    parts = [Path(p) for p in parts if Path(p).exists()]
    if not parts:
        return []
    held = {_merge_key(r) for r in read_records(path)} if path.exists() else set()
    new = {}
    for part in parts:
        for record in read_records(part):
            key = _merge_key(record)
            if key not in held and key not in new:
                new[key] = validate(record, str(part))
    rank = {key: i for i, key in enumerate(order or [])}
    ordered = sorted(new.values(), key=lambda r: rank.get(_merge_key(r), len(rank)))
    if ordered:
        existing = path.read_bytes() if path.exists() else b""
        lines = "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in ordered)
        artifacts.atomic_write_bytes(path, existing + lines.encode())
    for part in parts:
        part.unlink()
    return ordered


def _merge_key(record: dict) -> str:
    return record.get("cell_key") or record.get("record_hash") or record_id(record)


# ------------------------------------------------------------------ curves
# A cell's curve (evaluate/posttrain.py: per epoch its mean training loss, learning rate and, at
# the chosen epochs, held-out top-1) is one small JSON file beside the records, named by the
# cell's key; its record holds the file's path relative to the records' folder.
CURVES = "curves"


def write_curve(folder: Path, key: str, record: dict) -> dict:
    """Store `record`'s curve (if it has one) atomically as <folder>/curves/<key>.json; the record
    with `curve` replaced by that file's path relative to `folder`."""
    curve = record.get("curve")
    if not isinstance(curve, dict):
        return record
    relative = f"{CURVES}/{key}.json"
    artifacts.atomic_write_json(Path(folder) / relative, {**curve, "key": key})
    return dict(record, curve=relative)


def read_curve(folder: Path, record: dict) -> dict | None:
    """The curve a record (read from <folder>/records.jsonl) refers to, or None when it has none."""
    relative = record.get("curve")
    if not isinstance(relative, str):
        return None
    path = Path(folder) / relative
    if not path.is_file():
        raise RecordError(f"{path}: the curve of cell {record.get('cell', record.get('record_hash'))} is missing; "
                          "re-run the cell (delete its record) to write it again")
    return artifacts.read_json(path)
