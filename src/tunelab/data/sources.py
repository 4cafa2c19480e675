"""Reading rows from where the user keeps them: local files, directories and globs, bundled samples, hub datasets.

Local files: .jsonl/.ndjson, .json, .csv/.tsv, .parquet, .txt, each optionally gzipped (`.jsonl.gz`); a directory or a
glob reads every such file in it, sorted by name; a folder written by `datasets`' save_to_disk is read with
`datasets.load_from_disk`. Every row keeps its origin (`file:line`, or `file:row N` where a
format has no lines) so that a bad row can be reported exactly where it is.

A source is a string (`data/train.jsonl`, `data/*.csv`, `bundled:gsm8k/train`, `owner/name` on the hub) or a
`SourceConfig`-like object with `path`, `split`, `name` and `revision`.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import gzip
import hashlib
import json
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

from tunelab.errors import UserError

SAMPLES = Path(__file__).parent / "samples"
READERS = (".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".parquet", ".txt")
_GLOB_CHARS = set("*?[")


@dataclass
class Row:
    data: dict
    origin: str  # "path:line" (or "path:row N", "hub-id[index]")
    # True for CSV/TSV rows: every value is a text cell, so message lists and other structured values arrive as
    # JSON text. Only such values are decoded; a string from JSON, Parquet or the hub is the text itself.
    cells: bool = False


def bundled(name: str) -> Path:
    """bundled:gsm8k/train -> the packaged JSONL sample."""
    p = SAMPLES / f"{name}.jsonl"
    if not p.is_file():
        known = sorted(str(q.relative_to(SAMPLES).with_suffix("")) for q in SAMPLES.rglob("*.jsonl"))
        raise UserError(f"unknown bundled dataset '{name}'; available: {', '.join(known)}")
    return p


def _kind(path: Path) -> str:
    """The reader a file needs: its last suffix other than .gz."""
    suffixes = [s.lower() for s in path.suffixes if s.lower() != ".gz"]
    return suffixes[-1] if suffixes else ""


def _skip_or_raise(msg: str, problems: list[str] | None) -> None:
    """A bad row: raise (the default), or record it and let the reader go on (`data.on_invalid: skip`)."""
    if problems is None:
        raise UserError(msg)
    problems.append(msg)


def _open_text(path: Path):
    # utf-8-sig: spreadsheets and some editors write a byte-order mark that would otherwise end up in the first key
    if path.suffix.lower() == ".gz":
        return gzip.open(path, "rt", encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


def _renamed(path: Path, suffix: str) -> str:
    """The file's name with its type suffix (the one before any .gz) replaced: data.jsonl.gz -> data.json.gz."""
    gz = path.suffix.lower() == ".gz"
    return (path.with_suffix("") if gz else path).with_suffix(suffix).name + (".gz" if gz else "")


def _not_text(path: Path, e: UnicodeDecodeError) -> str:
    """Why a file is not UTF-8 text: what its first bytes say it is (a file saved under the wrong suffix is more
    common than a wrong encoding), else where decoding failed."""
    try:
        with (gzip.open(path, "rb") if path.suffix.lower() == ".gz" else open(path, "rb")) as fh:
            head = fh.read(4)
    except (OSError, EOFError, zlib.error):
        head = b""
    if head == b"PAR1":
        return f"{path}: a Parquet file (it starts with PAR1), not text; rename it {_renamed(path, '.parquet')}"
    if head[:2] == b"\x1f\x8b" and path.suffix.lower() != ".gz":
        return f"{path}: a gzip-compressed file, not text; rename it {path.name}.gz"
    if head[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return f"{path}: UTF-16 text (it starts with a UTF-16 byte-order mark); save the file as UTF-8"
    return f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save the file as UTF-8"


@contextlib.contextmanager
def _reading(path: Path):
    """Turn decoding/decompression failures into one line naming the file."""
    try:
        yield
    except UnicodeDecodeError as e:
        raise UserError(_not_text(path, e)) from None
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise UserError(f"{path}: not a valid gzip file ({e}); re-compress it or drop the .gz suffix") from None


_SPACE = re.compile(r"[ \t\n\r]*")  # JSON's whitespace


def _json_values(text: str) -> list[tuple[int, int, object]] | None:
    """(first line, last line, value) of each JSON value in `text`, one after another (JSON Lines, or objects
    written with indent); None when the text is not such a sequence."""
    dec, out, pos, line = json.JSONDecoder(), [], 0, 1
    while True:
        end = _SPACE.match(text, pos).end()
        line, pos = line + text.count("\n", pos, end), end
        if pos == len(text):
            return out
        try:
            obj, end = dec.raw_decode(text, pos)
        except json.JSONDecodeError:
            return None
        last = line + text.count("\n", pos, end)
        out.append((line, last, obj))
        line, pos = last, end


def _count(items) -> str:
    """'4 objects' (or '3 values' when not all are objects)."""
    noun = "object" if all(isinstance(x, dict) for x in items) else "value"
    return f"{len(items)} {noun}{'s' * (len(items) != 1)}"


def _check_json_lines(path: Path) -> None:
    """Called when the first line of a JSON Lines file is not an object: when the whole file is one JSON document
    (an array, or objects written with indent), say so once, rather than call each of its lines malformed."""
    with _reading(path), _open_text(path) as fh:
        values = _json_values(fh.read())
    if not values:
        return
    fix = f"not JSON Lines; write one object per line, or rename the file {_renamed(path, '.json')}"
    if len(values) == 1 and isinstance(values[0][2], list):
        first, last, items = values[0]
        lines = f" over {last - first + 1} lines" if last > first else " on one line"
        raise UserError(f"{path}: a JSON array ({_count(items)}){lines}, {fix}")
    spread = sum(last > first for first, last, _ in values)
    if spread:
        if len(values) == 1:
            each = f" over {values[0][1] - values[0][0] + 1} lines"
        else:
            each = " over several lines each" if spread == len(values) else f", {spread} of them over several lines"
        raise UserError(f"{path}: pretty-printed JSON ({_count([v for _, _, v in values])}{each}), {fix}")


def read_jsonl(path: Path, problems: list[str] | None = None) -> list[Row]:
    """One JSON object per line. Read by hand (not `datasets`) so a malformed line is named by its number.

    With `problems` given, malformed lines are recorded there and skipped instead of raising. A file that is one
    JSON document instead (an array, or indented objects) is refused as a whole, naming what it holds.
    """
    rows, seen = [], False
    with _reading(path), _open_text(path) as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                why = None if isinstance(obj, dict) else f"expected a JSON object per line, got {type(obj).__name__}"
            except json.JSONDecodeError as e:
                obj, why = None, f"malformed JSON ({e.msg} at column {e.colno}); each line must be one JSON object"
            if why and not seen:
                _check_json_lines(path)
            seen = True
            if why:
                _skip_or_raise(f"{path}:{n}: {why}", problems)
                continue
            rows.append(Row(obj, f"{path}:{n}"))
    return rows


def _is_message(v) -> bool:
    return isinstance(v, dict) and ({"role", "content"} <= v.keys() or {"from", "value"} <= v.keys())


def read_json(path: Path, problems: list[str] | None = None) -> list[Row]:
    """A JSON array of objects, an object holding exactly one such array (e.g. {"data": [...]}), or one object that
    is itself a sample (e.g. {"messages": [...]}). Objects one after another (JSON Lines under a .json name, or
    objects written with indent) are rows too, each named by the line it starts on.
    """
    with _reading(path), _open_text(path) as fh:
        text = fh.read()
    if not text.strip():  # no rows, as an empty file of any other type
        return []
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        # "Extra data" after a complete first value is the mark of values one after another; any other error is a
        # real syntax error of a JSON document, reported at its own line
        if e.msg == "Extra data":
            values = _json_values(text)
            if values is None:  # JSON Lines with a bad line: the line-by-line reader names (or skips) it
                return read_jsonl(path, problems)
            rows = []
            for first, _, o in values:
                if isinstance(o, dict):
                    rows.append(Row(o, f"{path}:{first}"))
                else:
                    _skip_or_raise(f"{path}:{first}: expected a JSON object, got {type(o).__name__}", problems)
            return rows
        raise UserError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno}); "
                        "fix the file (a .json file holds one JSON value; JSON Lines hold one object per "
                        "line)") from None
    if isinstance(obj, dict):
        # a wrapper holds its rows in one list of objects; lists of messages (or of plain values) belong to a sample
        row_lists = [v for v in obj.values() if isinstance(v, list) and v
                     and all(isinstance(o, dict) for o in v) and not any(map(_is_message, v))]
        if not row_lists:
            return [Row(obj, f"{path}:row 1")]
        if len(row_lists) > 1:
            keys = [k for k, v in obj.items() if any(v is r for r in row_lists)]
            raise UserError(f"{path}: the object holds several lists of rows ({', '.join(keys)}); keep one list per "
                            "file, or give each list its own file")
        obj = row_lists[0]
    if not isinstance(obj, list):
        raise UserError(f"{path}: expected a list of objects, got {type(obj).__name__}")
    rows = []
    for i, o in enumerate(obj, 1):
        if not isinstance(o, dict):
            _skip_or_raise(f"{path}:row {i}: expected an object, got {type(o).__name__}", problems)
            continue
        rows.append(Row(o, f"{path}:row {i}"))
    return rows


def read_csv(path: Path, problems: list[str] | None = None) -> list[Row]:
    """CSV/TSV with a header row. The stdlib reader (rather than pandas) reports where each record starts, so a bad
    row is named by its real line even when quoted cells span several lines. With `problems` given, rows with the
    wrong number of cells are recorded there and skipped."""
    rows = []
    with _reading(path), _open_text(path) as fh:
        reader = csv.DictReader(fh, delimiter="\t" if _kind(path) == ".tsv" else ",")
        start = 2
        try:
            for rec in reader:
                missing = [k for k, v in rec.items() if v is None]
                if None in rec:
                    _skip_or_raise(f"{path}:{start}: more cells than the header has columns", problems)
                elif missing:
                    _skip_or_raise(f"{path}:{start}: too few cells (no value for {', '.join(missing)})", problems)
                else:
                    rows.append(Row(dict(rec), f"{path}:{start}", cells=True))
                start = reader.line_num + 1
        except csv.Error as e:
            raise UserError(f"{path}:{reader.line_num}: malformed CSV ({e})") from None
        if reader.fieldnames is None:
            return []
        if len(set(reader.fieldnames)) != len(reader.fieldnames):
            raise UserError(f"{path}:1: duplicate column names in the header {reader.fieldnames}")
    return rows


def read_parquet(path: Path) -> list[Row]:
    import pyarrow.parquet as pq

    try:
        if path.suffix.lower() == ".gz":  # Parquet needs random access: read the decompressed bytes
            import pyarrow as pa

            with _reading(path), gzip.open(path, "rb") as fh:
                table = pq.read_table(pa.BufferReader(fh.read()))
        else:
            table = pq.read_table(path)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a damaged or foreign file
        raise UserError(f"{path}: cannot read as Parquet ({str(e).splitlines()[0]})") from None
    return [Row(r, f"{path}:row {i}") for i, r in enumerate(table.to_pylist(), 1)]


def read_text(path: Path) -> list[Row]:
    """Plain text for language modelling: one sample per non-empty line (as `datasets`' text loader does)."""
    with _reading(path), _open_text(path) as fh:
        return [Row({"text": line.rstrip("\r\n")}, f"{path}:{n}") for n, line in enumerate(fh, 1) if line.strip()]


def read_file(path: Path, problems: list[str] | None = None) -> list[Row]:
    kind = _kind(path)
    if kind in (".jsonl", ".ndjson"):
        return read_jsonl(path, problems)
    if kind == ".json":
        return read_json(path, problems)
    if kind in (".csv", ".tsv"):
        return read_csv(path, problems)
    if kind == ".parquet":
        return read_parquet(path)
    if kind == ".txt":
        return read_text(path)
    raise UserError(f"{path}: unsupported file type '{kind or path.name}' "
                    f"(use {', '.join(READERS)}, optionally .gz)")


# `datasets.Dataset.save_to_disk` writes Arrow shards beside these (a DatasetDict adds dataset_dict.json and one
# such folder per split); they describe the dataset and are not data rows.
_SAVED_META = ("dataset_info.json", "state.json", "dataset_dict.json")


def saved_dataset(path: Path) -> bool:
    """Whether `path` is a folder written by `datasets`' save_to_disk (a Dataset or a DatasetDict)."""
    return path.is_dir() and ((path / "dataset_dict.json").is_file() or
                              ((path / "state.json").is_file() and (path / "dataset_info.json").is_file()))


def read_saved(path: Path, split: str | None = None) -> list[Row]:
    """Rows of a save_to_disk folder, through `datasets.load_from_disk`; of a DatasetDict, the split (default train)."""
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001 - a damaged folder raises whatever the Arrow reader hits
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{path}: cannot read the saved dataset ({why}); save it again with save_to_disk") from None
    where = str(path)
    if split and not isinstance(ds, datasets.DatasetDict):
        raise UserError(f"{path}: the saved dataset is a single Dataset with no splits, so split: {split} selects "
                        "nothing; drop the source's split")
    if isinstance(ds, datasets.DatasetDict):
        split = split or "train"
        if split not in ds:
            raise UserError(f"{path}: the saved dataset has no split '{split}' (splits: {', '.join(ds)}); "
                            "set the source's split")
        ds, where = ds[split], f"{path}/{split}"
    return [Row(dict(r), f"{where}:row {i}") for i, r in enumerate(ds, 1)]


def _is_data_file(p: Path) -> bool:
    return p.is_file() and not p.name.startswith(".") and _kind(p) in READERS and p.name not in _SAVED_META


def _spec_parts(spec) -> tuple[str, str | None, str | None, str | None]:
    if isinstance(spec, str):
        return spec, None, None, None
    return spec.path, getattr(spec, "split", None), getattr(spec, "name", None), getattr(spec, "revision", None)


def resolve_files(spec) -> list[Path] | None:
    """The local files a source stands for, or None when it is a hub dataset id."""
    path_s = _spec_parts(spec)[0]
    if path_s.startswith("bundled:"):
        return [bundled(path_s.split(":", 1)[1])]
    if path_s.startswith("hub:"):
        return None
    if _GLOB_CHARS & set(path_s):
        files = sorted(Path(p) for p in glob.glob(str(Path(path_s).expanduser()), recursive=True))
        files = [p for p in files if _is_data_file(p)]
        if not files:
            raise UserError(f"no data files match '{path_s}' (readable: {', '.join(READERS)}, optionally .gz)")
        return files
    path = Path(path_s).expanduser()
    if saved_dataset(path):  # every file of the folder: its content is what the fingerprint follows
        return sorted(p for p in path.rglob("*") if p.is_file())
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if _is_data_file(p))
        if not files:
            raise UserError(f"directory {path_s} holds no data files ({', '.join(READERS)}, optionally .gz)")
        return files
    if path.is_file():
        return [path]
    # owner/name without a file suffix and not on disk: a hub dataset id
    if path.suffix or "/" not in path_s or path_s.startswith((".", "/", "~")):
        raise UserError(f"data file not found: {path_s}")
    owner = path_s.split("/", 1)[0]
    if Path(owner).is_dir():  # beside a local folder of that name, a mistyped path is likelier than a hub id
        raise UserError(f"data folder not found: {path_s} ({owner}/ is a local folder; for the hub dataset "
                        f"'{path_s}' write hub:{path_s})")
    return None


def read_source(spec, problems: list[str] | None = None) -> list[Row]:
    """Rows of one source: `bundled:NAME`, a local file/dir/glob, or (when no such path exists) a hub dataset id.

    `problems`: when given, malformed rows (JSON lines, CSV rows, array entries) are collected there and skipped
    instead of raising.
    """
    files = resolve_files(spec)
    path_s, split, name, revision = _spec_parts(spec)
    if files is None:
        return read_hub(path_s.removeprefix("hub:"), split or "train", name, revision)
    if saved_dataset(Path(path_s).expanduser()):
        return read_saved(Path(path_s).expanduser(), split)
    given = [f"{k}: {v}" for k, v in (("split", split), ("name", name), ("revision", revision)) if v]
    if given:  # they select within a hub dataset; a local file would be read whole whatever they say
        raise UserError(f"{path_s}: {', '.join(given)} applies to a hub dataset (or a saved DatasetDict's splits); "
                        "local files have none: drop it, or point at the file that holds that part")
    rows = []
    for f in files:
        rows += read_file(f, problems)
    return rows


def read_hub(dataset_id: str, split: str = "train", name: str | None = None, revision: str | None = None) -> list[Row]:
    """A hub dataset through `datasets.load_dataset`; where the Hub cannot be reached, from the copy huggingface_hub
    cached of it (models.hub_or_cache), which `datasets` reads as a local folder."""
    import datasets

    from tunelab.models import hub_or_cache

    local = datasets.config.HF_HUB_OFFLINE or Path(dataset_id).exists()  # `hub:FOLDER` is a local folder
    where = dataset_id if local else hub_or_cache(dataset_id, revision, "dataset")
    try:
        ds = datasets.load_dataset(where, name, split=split, revision=revision if where == dataset_id else None)
    except Exception as e:  # noqa: BLE001 - any failure to fetch is the same user problem
        raise UserError(f"could not load dataset '{dataset_id}' (split {split}) from the hub: "
                        f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return [Row(dict(r), f"{dataset_id}[{split}][{i}]") for i, r in enumerate(ds)]


def fingerprint(spec) -> str:
    """A hash of what a source holds: the bytes of its local files, or the id/split/config/revision of a hub dataset
    (the hub copy is cached by `datasets` itself; pin `revision` for a key that cannot drift)."""
    h = hashlib.sha256()
    files = resolve_files(spec)
    if files is None:
        h.update(json.dumps(["hub", *_spec_parts(spec)]).encode())
        return h.hexdigest()
    for f in files:
        h.update(str(f.name).encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()
