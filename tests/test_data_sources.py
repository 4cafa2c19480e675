"""Sources (file types, gzip, directories, globs), mixing, subset/split/shuffle/dedupe, and reading errors."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest

from tunelab.config import DataConfig, SourceConfig
from tunelab.data import build
from tunelab.data.sources import fingerprint, read_source, resolve_files
from tunelab.errors import UserError

DATA = Path(__file__).parent / "assets" / "data"
FMT = DATA / "formats"


def qa_rows(n: int, start: int = 0) -> list[dict]:
    return [{"question": f"question {i}?", "answer": f"answer {i}"} for i in range(start, start + n)]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_gzip_parquet_and_json_lines_named_json(tmp_path):
    src = (FMT / "qa_gsm8k.jsonl").read_bytes()
    gz = tmp_path / "qa.jsonl.gz"
    gz.write_bytes(gzip.compress(src))
    rows = read_source(str(gz))
    assert len(rows) == 2 and rows[1].origin == f"{gz}:2"

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(qa_rows(3)), tmp_path / "qa.parquet")
    rows = read_source(str(tmp_path / "qa.parquet"))
    assert rows[2].data == {"question": "question 2?", "answer": "answer 2"}
    assert rows[2].origin.endswith("qa.parquet:row 3")

    jl_as_json = tmp_path / "lines.json"
    jl_as_json.write_bytes(src)
    assert [r.data for r in read_source(str(jl_as_json))] == [r.data for r in read_source(str(FMT / "qa_gsm8k.jsonl"))]


def test_csv_line_numbers_survive_multiline_cells():
    with pytest.raises(UserError) as e:
        read_source(str(DATA / "errors" / "bad_cells.csv"))
    # record 1 spans lines 2-3, so the row with an extra cell starts on line 4
    assert str(e.value).endswith("bad_cells.csv:4: more cells than the header has columns")


def test_directory_and_glob(tmp_path):
    rows = read_source(str(DATA / "dir"))
    assert len(rows) == 6  # README.md is not data
    assert rows[3].origin.endswith("part2.jsonl:1")
    assert len(read_source(str(DATA / "dir" / "part*.jsonl"))) == 6
    with pytest.raises(UserError, match="no data files match"):
        read_source(str(tmp_path / "*.jsonl"))
    with pytest.raises(UserError, match="holds no data files"):
        read_source(str(tmp_path))


def test_missing_file_and_unsupported_type(tmp_path):
    with pytest.raises(UserError, match="data file not found: nope.jsonl"):
        read_source("nope.jsonl")
    (tmp_path / "x.xlsx").write_text("x")
    with pytest.raises(UserError, match="unsupported file type '.xlsx'"):
        read_source(str(tmp_path / "x.xlsx"))
    assert resolve_files("someone/some-dataset") is None  # a hub id: read through `datasets.load_dataset`


def test_a_split_that_selects_nothing_is_refused(tmp_path):
    """split/name/revision select within a hub dataset or a saved DatasetDict: on a local file or a saved Dataset
    (no splits) they were ignored, and the whole data trained as if it were the asked-for split."""
    import datasets

    p = write_jsonl(tmp_path / "qa.jsonl", qa_rows(4))
    with pytest.raises(UserError, match=rf"^{p}: split: test applies to a hub dataset .*local files have none"):
        read_source(SourceConfig(path=str(p), split="test"))
    saved = tmp_path / "saved"
    datasets.Dataset.from_list([{"question": "q", "answer": "1"}]).save_to_disk(str(saved))
    with pytest.raises(UserError, match=rf"^{saved}: the saved dataset is a single Dataset with no splits"):
        read_source(SourceConfig(path=str(saved), split="test"))
    assert len(read_source(SourceConfig(path=str(saved)))) == 1


def test_hub_code_path(tmp_path):
    # `hub:` forces `datasets.load_dataset`, which also accepts a local dataset folder: the same code path a hub id
    # takes, exercised offline
    repo = tmp_path / "repo"
    repo.mkdir()
    write_jsonl(repo / "train.jsonl", qa_rows(4))
    cfg = DataConfig(train=[{"path": f"hub:{repo}", "split": "train"}])
    recs = build.load_records(cfg.train, cfg)
    assert len(recs) == 4 and recs[0]["origin"] == f"{repo}[train][0]"
    with pytest.raises(UserError) as e:  # offline in tests (conftest): fails at once, in one line
        read_source(SourceConfig(path="someone/no-such-dataset", split="test"))
    assert str(e.value).startswith("could not load dataset 'someone/no-such-dataset' (split test) from the hub")
    assert "\n" not in str(e.value)


def test_malformed_json_line_named():
    path = DATA / "errors" / "malformed.jsonl"
    with pytest.raises(UserError) as e:
        read_source(str(path))
    assert str(e.value).startswith(f"{path}:3: malformed JSON")
    problems: list[str] = []
    assert len(read_source(str(path), problems)) == 2 and problems[0].startswith(f"{path}:3:")


def test_not_utf8_and_bad_gzip(tmp_path):
    (tmp_path / "latin.jsonl").write_bytes('{"text": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8 text"):
        read_source(str(tmp_path / "latin.jsonl"))
    (tmp_path / "fake.jsonl.gz").write_text('{"text": "x"}\n')
    with pytest.raises(UserError, match="not a valid gzip file"):
        read_source(str(tmp_path / "fake.jsonl.gz"))


def test_pretty_printed_json_in_a_jsonl_file_is_named_once(tmp_path):
    objs = qa_rows(4)
    p = tmp_path / "pretty.jsonl"
    p.write_text("".join(json.dumps(o, indent=2) + "\n" for o in objs))
    fix = "not JSON Lines; write one object per line, or rename the file pretty.json"
    for problems in (None, []):  # a whole-file mistake, not 24 malformed lines, even when bad rows are skipped
        with pytest.raises(UserError) as e:
            read_source(str(p), problems)
        assert str(e.value) == f"{p}: pretty-printed JSON (4 objects over several lines each), {fix}"
    p.write_text(json.dumps(objs, indent=2))
    with pytest.raises(UserError) as e:
        read_source(str(p))
    assert str(e.value) == f"{p}: a JSON array (4 objects) over 18 lines, {fix}"
    # the same indented objects under a .json name are read, each named by the line it starts on
    j = tmp_path / "pretty.json"
    j.write_text("".join(json.dumps(o, indent=2) + "\n" for o in objs))
    assert [r.origin for r in read_source(str(j))] == [f"{j}:{n}" for n in (1, 5, 9, 13)]
    assert [r.data for r in read_source(str(j))] == objs
    # a malformed first line of real JSON Lines is still that line's problem
    p.write_text("{bad\n" + json.dumps(objs[0]) + "\n")
    with pytest.raises(UserError, match=f"{p}:1: malformed JSON"):
        read_source(str(p))


def test_parquet_named_jsonl_says_what_it_is(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "qa.jsonl"
    pq.write_table(pa.Table.from_pylist(qa_rows(2)), p)
    with pytest.raises(UserError) as e:
        build.load_records(str(p), DataConfig(train=str(p), on_invalid="skip"))
    assert str(e.value) == f"{p}: a Parquet file (it starts with PAR1), not text; rename it qa.parquet"


def test_fingerprint_follows_content(tmp_path):
    p = tmp_path / "a.jsonl"
    write_jsonl(p, qa_rows(2))
    before = fingerprint(str(p))
    assert fingerprint(str(p)) == before
    write_jsonl(p, qa_rows(3))
    assert fingerprint(str(p)) != before


# ------------------------------------------------------------------------------------ mixing, subset, split, dedupe

def test_mixing_with_weights_and_formats(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", qa_rows(10))
    cfg = DataConfig(train=[{"path": a, "weight": 2}, {"path": str(FMT / "messages.jsonl"), "weight": 0.5},
                            str(FMT / "sharegpt.json")], shuffle=False)
    info = {}
    recs = build.load_records(cfg.train, cfg, info)
    assert len(recs) == 20 + 1 + 2
    assert info["formats"] == {a: "qa", str(FMT / "messages.jsonl"): "messages", str(FMT / "sharegpt.json"): "sharegpt"}


def test_per_source_format_and_columns(tmp_path):
    p = write_jsonl(tmp_path / "custom.jsonl", [{"ask": "Why?", "reply": "Because."}])
    cfg = DataConfig(train=[{"path": p, "format": "qa", "columns": {"ask": "question", "reply": "answer"}}])
    (rec,) = build.load_records(cfg.train, cfg)
    assert rec["messages"][1]["content"] == "Because."


def test_columns_map_must_name_a_field(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"ask": "Why?", "answer": "Because."}])
    b = str(FMT / "messages.jsonl")
    cfg = DataConfig(train=[a, b], columns={"ask": "question"})  # shared map: fits a, ignored by b
    assert len(build.load_records(cfg.train, cfg)) == 3
    with pytest.raises(UserError, match="data.columns: 'aks' is not a field of"):
        q = str(FMT / "qa_gsm8k.jsonl")
        build.load_records([q, b], DataConfig(train=[q, b], columns={"aks": "question"}))
    with pytest.raises(UserError, match="a.jsonl: none of the columns keys \\(aks\\) is a field"):
        build.load_records(a, DataConfig(train=a, columns={"aks": "question"}))
    with pytest.raises(UserError, match="none of the columns keys \\(aks\\) is a field"):
        build.load_records([{"path": a, "columns": {"aks": "question"}}],
                           DataConfig(train=[{"path": a, "columns": {"aks": "question"}}]))


def test_subset_split_shuffle_are_seeded(tmp_path):
    p = write_jsonl(tmp_path / "a.jsonl", qa_rows(50))
    cfg = DataConfig(train=p, subset=20, val_split=0.25, seed=7)
    train, val = build.train_val_records(cfg)
    assert len(train) == 15 and len(val) == 5
    assert not {r["origin"] for r in train} & {r["origin"] for r in val}
    assert build.train_val_records(cfg) == (train, val)  # same seed, same split
    other = build.train_val_records(DataConfig(train=p, subset=20, val_split=0.25, seed=8))
    assert other != (train, val)
    unshuffled, _ = build.train_val_records(DataConfig(train=p, shuffle=False))
    assert [r["origin"] for r in unshuffled] == [f"{p}:{i}" for i in range(1, 51)]


def test_validation_source(tmp_path):
    t = write_jsonl(tmp_path / "t.jsonl", qa_rows(8))
    v = write_jsonl(tmp_path / "v.jsonl", qa_rows(3, start=100))
    train, val = build.train_val_records(DataConfig(train=t, validation=v, val_split=0.5))
    assert len(train) == 8 and len(val) == 3  # a validation source wins over val_split


def test_val_split_leaving_nothing(tmp_path):
    p = write_jsonl(tmp_path / "a.jsonl", qa_rows(1))
    with pytest.raises(UserError, match="val_split=0.5 leaves no training rows"):
        build.train_val_records(DataConfig(train=p, val_split=0.5))


def test_dedupe_counts(tmp_path):
    p = write_jsonl(tmp_path / "a.jsonl", qa_rows(3) + qa_rows(2))
    info = {}
    assert len(build.load_records(p, DataConfig(train=p), info)) == 5
    assert info["duplicates"] == 2 and info["duplicates_removed"] == 0
    info = {}
    assert len(build.load_records(p, DataConfig(train=p, dedupe=True), info)) == 3
    assert info["duplicates_removed"] == 2


def test_on_invalid_skip_counts_and_reports(tmp_path):
    src = DATA / "errors" / "malformed.jsonl"
    with pytest.raises(UserError, match="malformed.jsonl:3"):
        build.load_records(str(src), DataConfig(train=str(src)))
    info = {}
    recs = build.load_records(str(src), DataConfig(train=str(src), on_invalid="skip"), info)
    assert len(recs) == 2 and info["rows"] == 3 and info["invalid_skipped"] == 1
    assert "malformed.jsonl:3" in info["problems"][0]


def test_empty_after_filtering(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps({"question": "", "answer": "x"}) + "\n")
    with pytest.raises(UserError, match=r"bad.jsonl: no usable rows: its one row is invalid; first: .*bad.jsonl:1"):
        build.load_records(str(p), DataConfig(train=str(p), on_invalid="skip"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(UserError, match="empty.jsonl: no rows"):
        build.load_records(str(empty), DataConfig(train=str(empty)))


def test_all_rows_unreadable_is_not_an_empty_dataset(tmp_path):
    p = tmp_path / "py.jsonl"
    p.write_text("{'instruction': 'a', 'output': 'b'}\n{'instruction': 'c', 'output': 'd'}\n")  # Python dicts
    with pytest.raises(UserError) as e:
        build.load_records(str(p), DataConfig(train=str(p), on_invalid="skip"))
    assert str(e.value).startswith(f"{p}: no usable rows: all 2 rows are invalid; first: {p}:1: malformed JSON")


def test_empty_json_reads_as_empty_like_other_files(tmp_path):
    for name, text in [("e.json", ""), ("w.json", "  \n\n"), ("e.jsonl", ""), ("e.csv", ""), ("e.txt", "\n")]:
        p = tmp_path / name
        p.write_text(text)
        with pytest.raises(UserError) as e:
            build.load_records(str(p), DataConfig(train=str(p)))
        assert str(e.value) == f"{p}: no rows (the dataset is empty)"


def test_weight_that_leaves_a_source_no_rows_is_refused(tmp_path):
    x = write_jsonl(tmp_path / "x.jsonl", qa_rows(3))
    m = write_jsonl(tmp_path / "m.jsonl", qa_rows(5, start=10))
    cfg = DataConfig(train=[{"path": x, "weight": 0.1}, m])
    with pytest.raises(UserError) as e:
        build.load_records(cfg.train, cfg)
    assert str(e.value).startswith(f"data source '{x}': weight 0.1 leaves none of its 3 rows")
    assert "at least 0.33" in str(e.value)
    cfg = DataConfig(train=[{"path": x, "weight": 0.33}, m])  # the weight it suggests keeps one row
    assert sum(r["origin"].startswith(x) for r in build.load_records(cfg.train, cfg)) == 1


def test_mistyped_local_folder_is_not_read_as_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d" / "dir1").mkdir(parents=True)
    with pytest.raises(UserError) as e:
        resolve_files("d/dirr1")
    assert str(e.value).startswith("data folder not found: d/dirr1 (d/ is a local folder;")
    assert "hub:d/dirr1" in str(e.value)
    assert resolve_files("someone/some-dataset") is None  # no local folder 'someone': still a hub id
    assert resolve_files("hub:d/dirr1") is None  # the way to say it is the hub dataset


def test_config_source_errors_are_one_line():
    from tunelab import load_config

    with pytest.raises(UserError, match="unknown source key 'wieght' \\(did you mean 'weight'\\?\\)"):
        load_config(None, ["data.train=[{path: a.jsonl, wieght: 2}]"])
    with pytest.raises(UserError, match="unknown data format 'alpacca' \\(did you mean 'alpaca'\\?\\)"):
        load_config(None, ["data.format=alpacca"])
    # the source's own key and value, not the whole list of sources
    with pytest.raises(UserError) as e:
        load_config(None, ["data.train=[a.jsonl, {path: b.jsonl, weight: 0}]"])
    assert str(e.value) == "config key 'data.train[1].weight': Input should be greater than 0 (got 0)"
    with pytest.raises(UserError) as e:
        load_config(None, ["data.validation={path: b.jsonl, split: [1]}"])
    assert str(e.value) == "config key 'data.validation.split': Input should be a valid string (got [1])"
    cfg = load_config(None, ["data.train=[a.jsonl, {path: b.jsonl, weight: 2, format: hh-rlhf}]"])
    assert isinstance(cfg.data.train[1], SourceConfig) and cfg.data.train[1].weight == 2


def test_bundled_sample_still_reads(tmp_path):
    rows = read_source("bundled:gsm8k/train")
    assert len(rows) == 1000 and rows[0].origin.endswith("train.jsonl:1")
    shutil.copy(FMT / "kto.csv", tmp_path / "k.tsv")  # a .tsv is split on tabs: one column here, so not KTO
    with pytest.raises(UserError, match="could not detect"):
        build.load_records(str(tmp_path / "k.tsv"), DataConfig(train=str(tmp_path / "k.tsv")))


def test_val_split_never_holds_out_a_trained_row(tmp_path):
    # weight 3 repeats each row: a held-out row must leave training with all its repeats
    a = write_jsonl(tmp_path / "a.jsonl", qa_rows(20))
    b = write_jsonl(tmp_path / "b.jsonl", qa_rows(20, start=100))
    cfg = DataConfig(train=[{"path": a, "weight": 3}, {"path": b, "weight": 1.5}], val_split=0.2, seed=3)
    train, val = build.train_val_records(cfg)
    held = {r["origin"] for r in val}
    assert val and len(held) == len(val)  # each held-out row once
    assert not held & {r["origin"] for r in train}
    assert len(train) + sum(3 if r["origin"].startswith(a) else 1 for r in val) >= 80  # the rest still trains
    subset, subset_val = build.train_val_records(DataConfig(train=cfg.train, val_split=0.2, subset=30, seed=3))
    assert len(subset_val) <= 6 and not {r["origin"] for r in subset_val} & {r["origin"] for r in subset}


def test_val_split_holds_out_a_fraction_of_distinct_rows(tmp_path):
    ten = write_jsonl(tmp_path / "ten.jsonl", qa_rows(10))
    for split, held in ((0.1, 1), (0.3, 3)):
        train, val = build.train_val_records(DataConfig(train=[{"path": ten, "weight": 10}], val_split=split))
        assert len(val) == held and len(train) == 10 * (10 - held)  # the rest trains with all its repeats
        assert len({r["origin"] for r in train}) == 10 - held


# ----------------------------------------------------------------------------------------- JSON files, CSV, saved

def test_json_syntax_error_named_at_its_line(tmp_path):
    p = tmp_path / "wrapped.json"
    p.write_text('{\n  "version": "1.0",\n  "data": [\n    {"instruction": "a", "output": "b"},\n'
                 '    {"instruction": "c", "output": "d",}\n  ]\n}\n')
    for problems in (None, []):  # skip mode does not salvage fragments of a broken document either
        with pytest.raises(UserError) as e:
            read_source(str(p), problems)
        assert str(e.value).startswith(f"{p}:5: malformed JSON (Expecting property name")
        assert "JSON Lines" in str(e.value) and "\n" not in str(e.value)
    p.write_text(p.read_text().replace('"d",}', '"d"}'))
    assert [r.origin for r in read_source(str(p))] == [f"{p}:row 1", f"{p}:row 2"]


def test_one_sample_json_object_is_a_row(tmp_path):
    p = tmp_path / "one.json"
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    p.write_text(json.dumps({"messages": conv}))
    (row,) = read_source(str(p))
    assert row.data == {"messages": conv}
    p.write_text(json.dumps({"train": qa_rows(2), "test": qa_rows(1)}))
    with pytest.raises(UserError, match="several lists of rows \\(train, test\\)"):
        read_source(str(p))


def test_skip_mode_skips_bad_csv_rows_and_array_entries(tmp_path):
    c = tmp_path / "bad.csv"
    c.write_text("instruction,output\na,b\nc,d,e\nf\ng,h\n")
    with pytest.raises(UserError, match="bad.csv:3: more cells than the header has columns"):
        read_source(str(c))
    problems: list[str] = []
    assert [r.origin for r in read_source(str(c), problems)] == [f"{c}:2", f"{c}:5"]
    assert problems[0].endswith("bad.csv:3: more cells than the header has columns")
    assert problems[1].endswith("bad.csv:4: too few cells (no value for output)")
    j = tmp_path / "arr.json"
    j.write_text(json.dumps([{"question": "q?", "answer": "a"}, 5, {"question": "r?", "answer": "b"}]))
    info = {}
    recs = build.load_records(str(j), DataConfig(train=str(j), on_invalid="skip"), info)
    assert [r["origin"] for r in recs] == [f"{j}:row 1", f"{j}:row 3"]
    assert info["invalid_skipped"] == 1 and "arr.json:row 2: expected an object, got int" in info["problems"][0]


def test_gzipped_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(qa_rows(2)), tmp_path / "qa.parquet")
    gz = tmp_path / "qa.parquet.gz"
    gz.write_bytes(gzip.compress((tmp_path / "qa.parquet").read_bytes()))
    rows = read_source(str(gz))
    assert rows[1].data == {"question": "question 1?", "answer": "answer 1"} and rows[1].origin == f"{gz}:row 2"


def test_save_to_disk_folders(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list(qa_rows(3))
    ds.save_to_disk(str(tmp_path / "one"))
    recs = build.load_records(str(tmp_path / "one"), DataConfig(train=str(tmp_path / "one")))
    assert [r["messages"][1]["content"] for r in recs] == ["answer 0", "answer 1", "answer 2"]
    assert recs[0]["origin"] == f"{tmp_path / 'one'}:row 1"
    before = fingerprint(str(tmp_path / "one"))
    datasets.Dataset.from_list(qa_rows(4)).save_to_disk(str(tmp_path / "one2"))
    assert fingerprint(str(tmp_path / "one2")) != before

    datasets.DatasetDict({"train": ds, "test": datasets.Dataset.from_list(qa_rows(1, start=9))}).save_to_disk(
        str(tmp_path / "dict"))
    assert len(read_source(str(tmp_path / "dict"))) == 3  # the train split by default
    (row,) = read_source(SourceConfig(path=str(tmp_path / "dict"), split="test"))
    assert row.data["question"] == "question 9?" and row.origin == f"{tmp_path / 'dict'}/test:row 1"
    with pytest.raises(UserError, match="has no split 'dev' \\(splits: train, test\\)"):
        read_source(SourceConfig(path=str(tmp_path / "dict"), split="dev"))
    # the metadata files of a saved dataset are not data when a plain folder holds them
    plain = tmp_path / "plain"
    plain.mkdir()
    write_jsonl(plain / "rows.jsonl", qa_rows(2))
    (plain / "dataset_info.json").write_text("{}")
    assert [r.origin for r in read_source(str(plain))] == [f"{plain / 'rows.jsonl'}:1", f"{plain / 'rows.jsonl'}:2"]
