"""Reading rows from where the user keeps them: local JSONL/JSON/CSV/Parquet/text files, bundled samples, hub ids.

Every row keeps its origin (`file:line`) so that a bad row can be reported exactly where it is.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path

from tunelab.errors import UserError

SAMPLES = Path(__file__).parent / "samples"


@dataclass
class Row:
    data: dict
    origin: str  # "path:line" (or "hub-id[index]")


def bundled(name: str) -> Path:
    """bundled:gsm8k/train -> the packaged JSONL sample."""
    p = SAMPLES / f"{name}.jsonl"
    if not p.is_file():
        known = sorted(str(q.relative_to(SAMPLES).with_suffix("")) for q in SAMPLES.rglob("*.jsonl"))
        raise UserError(f"unknown bundled dataset '{name}'; available: {', '.join(known)}")
    return p


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def read_jsonl(path: Path) -> list[Row]:
    rows = []
    with _open_text(path) as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{n}: malformed JSON ({e.msg} at column {e.colno}); "
                                "each line must be one JSON object") from None
            if not isinstance(obj, dict):
                raise UserError(f"{path}:{n}: expected a JSON object per line, got {type(obj).__name__}")
            rows.append(Row(obj, f"{path}:{n}"))
    return rows


def read_json(path: Path) -> list[Row]:
    with _open_text(path) as fh:
        try:
            obj = json.load(fh)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
    if isinstance(obj, dict):  # {"data": [...]} or {"train": [...]} style
        lists = [v for v in obj.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise UserError(f"{path}: expected a list of objects (or an object holding one list)")
        obj = lists[0]
    if not isinstance(obj, list):
        raise UserError(f"{path}: expected a list of objects")
    return [Row(o, f"{path}[{i}]") for i, o in enumerate(obj)]


def read_source(spec: str) -> list[Row]:
    """Rows of one source: `bundled:NAME`, a local file, or (when no such file exists) a hub dataset id."""
    if spec.startswith("bundled:"):
        return read_jsonl(bundled(spec.split(":", 1)[1]))
    path = Path(spec).expanduser()
    if path.is_file():
        suffixes = [s for s in path.suffixes if s != ".gz"]
        kind = suffixes[-1] if suffixes else ""
        if kind == ".jsonl":
            return read_jsonl(path)
        if kind == ".json":
            # a .json file that is really JSON Lines is common; try the strict reading first
            try:
                return read_json(path)
            except UserError:
                return read_jsonl(path)
        raise UserError(f"{spec}: unsupported file type '{kind}' (use .jsonl or .json)")
    if path.suffix or "/" not in spec:
        raise UserError(f"data file not found: {spec}")
    return read_hub(spec)


def read_hub(dataset_id: str, split: str = "train", name: str | None = None) -> list[Row]:
    """A hub dataset through `datasets.load_dataset` (needs network access to the hub)."""
    import datasets

    try:
        ds = datasets.load_dataset(dataset_id, name, split=split)
    except Exception as e:  # noqa: BLE001 - any failure to fetch is the same user problem
        raise UserError(f"could not load dataset '{dataset_id}' from the hub: {str(e).splitlines()[0]}") from None
    return [Row(dict(r), f"{dataset_id}[{i}]") for i, r in enumerate(ds)]
