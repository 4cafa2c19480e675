"""From `cfg.data` to what a method trains on: read -> normalize -> dedupe/mix -> shuffle/subset/split -> encode.

`prepare_sft` gives tokenized rows with the assistant-only loss mask; `prepare_preference`, `prepare_kto` and
`prepare_prompts` give TRL-ready conversational rows for DPO/ORPO/SimPO/reward, KTO and GRPO/PPO. Each returns
(train rows, validation rows, stats); the stats are JSON-ready counts for the run report, including the chat template
used and how many samples keep their end-of-turn token after truncation (see `check_end_of_turn`). All four are
cached on disk the same way (see `cache`), keyed by their kind.
"""

from __future__ import annotations

import json
import logging
import random

from tunelab.data import cache, formats, render, templates
from tunelab.data.sources import fingerprint, read_source
from tunelab.errors import UserError

log = logging.getLogger(__name__)
MAX_PROBLEMS_SHOWN = 5


def _source_list(spec) -> list:
    if spec is None:
        return []
    from tunelab.config import SourceConfig

    items = list(spec) if isinstance(spec, list) else [spec]
    return [SourceConfig(**s) if isinstance(s, dict) else s for s in items]  # callers may pass plain mappings


def _src_path(src) -> str:
    return src if isinstance(src, str) else src.path


def _dedupe_key(rec: dict) -> str:
    return json.dumps({k: v for k, v in rec.items() if k != "origin"}, sort_keys=True, default=str)


def _new_info() -> dict:
    return {"formats": {}, "rows": 0, "invalid_skipped": 0, "problems": [], "duplicates": 0, "duplicates_removed": 0}


def load_source(src, data_cfg, info: dict | None = None, shared_columns: bool = False) -> list[dict]:
    """Normalized records of one source, with that source's own format/columns when it sets them."""
    info = info if info is not None else _new_info()
    skip = getattr(data_cfg, "on_invalid", "error") == "skip"
    problems: list[str] | None = [] if skip else None
    rows = read_source(src, problems)
    unreadable = len(problems or [])  # malformed lines skipped while reading
    path = _src_path(src)
    own = not isinstance(src, str)  # a SourceConfig may set its own format and columns
    fmt = (own and src.format) or data_cfg.format
    if own and src.columns:
        columns, used = src.columns, None
    elif shared_columns:  # data.columns shared by several sources: a key only has to fit one of them
        columns, used = data_cfg.columns, info.setdefault("columns_used", set())
    else:
        columns, used = data_cfg.columns, None
    if not rows and problems:  # every row was unreadable: that, not an empty dataset, is what to fix
        raise UserError(_all_invalid(path, problems))
    name, records = formats.normalize_rows(rows, fmt, path, columns, problems, used)
    info["formats"][path] = name
    if rows:  # what the format leaves unread, for the hint when a fallback format (prompt, text) was a wrong guess
        unused = formats.unused_fields(name, rows[0].data)
        if unused:
            info.setdefault("unused_fields", {})[path] = unused
    info["rows"] += len(rows) + unreadable
    if problems:
        info["invalid_skipped"] += len(problems)
        info["problems"] += problems[: MAX_PROBLEMS_SHOWN - len(info["problems"])]
    if not records:
        raise UserError(_all_invalid(path, problems) if problems else f"{path}: no usable rows")
    return records


def _all_invalid(path: str, problems: list[str]) -> str:
    n = len(problems)
    rows = "its one row is" if n == 1 else f"all {n} rows are"
    return f"{path}: no usable rows: {rows} invalid; first: {problems[0]}"


def _weighted(records: list[dict], weight: float, rng: random.Random) -> list[dict]:
    """weight 2 -> every record twice; 0.5 -> a random half; 1.5 -> all once plus a random half."""
    whole, frac = int(weight), weight - int(weight)
    out = records * whole
    extra = round(frac * len(records))
    if extra:
        out += [records[i] for i in sorted(rng.sample(range(len(records)), extra))]
    return out


def load_records(spec, data_cfg, info: dict | None = None) -> list[dict]:
    """All records of one or more sources: normalized, deduplicated (if asked) and mixed by their weights.

    `info` (optional dict) receives what happened: formats per source, rows read, invalid rows skipped, duplicates.
    """
    info = info if info is not None else _new_info()
    for k, v in _new_info().items():
        info.setdefault(k, v)
    sources = _source_list(spec)
    rng = random.Random(data_cfg.seed)
    seen: set[str] = set()
    records: list[dict] = []
    for src in sources:
        recs = load_source(src, data_cfg, info, shared_columns=len(sources) > 1)
        if data_cfg.system_prompt:
            for r in recs:
                msgs = r.get("messages", r.get("prompt"))
                if msgs and msgs[0]["role"] != "system":
                    msgs.insert(0, {"role": "system", "content": data_cfg.system_prompt})
        kept = []
        for r in recs:
            key = _dedupe_key(r)
            if key in seen:
                info["duplicates"] += 1
                if data_cfg.dedupe:
                    info["duplicates_removed"] += 1
                    continue
            seen.add(key)
            kept.append(r)
        weight = 1.0 if isinstance(src, str) else src.weight
        mixed = _weighted(kept, weight, rng) if weight != 1.0 else kept
        if kept and not mixed:  # a source listed in the mixture is meant to be in it
            raise UserError(f"data source '{_src_path(src)}': weight {weight} leaves none of its {len(kept)} rows "
                            f"({weight} x {len(kept)} rounds to 0); raise its weight to at least {1 / len(kept):.2g} "
                            "or remove the source")
        records += mixed
    unused = [k for k in data_cfg.columns if k not in info.get("columns_used", set())]
    if len(sources) > 1 and unused:
        raise UserError(f"data.columns: {', '.join(repr(k) for k in unused)} is not a field of "
                        f"{', '.join(map(_src_path, sources))}; the map is your field -> expected field")
    info.pop("columns_used", None)
    if sources and not records:
        raise UserError(f"data: nothing left of {', '.join(map(_src_path, sources))} after filtering")
    return records


def train_val_records(data_cfg, info: dict | None = None) -> tuple[list[dict], list[dict]]:
    info = info if info is not None else _new_info()
    train = load_records(data_cfg.train, data_cfg, info)
    if not train:
        raise UserError("data.train: the training data is empty")
    rng = random.Random(data_cfg.seed)
    if getattr(data_cfg, "shuffle", True):
        rng.shuffle(train)
    if data_cfg.subset and data_cfg.subset < len(train):
        train = [train[i] for i in sorted(rng.sample(range(len(train)), data_cfg.subset))]
    val = load_records(data_cfg.validation, data_cfg, info) if data_cfg.validation else []
    if data_cfg.val_split and not data_cfg.validation:
        # A weighted source repeats the same record objects. The fraction is of distinct records, and a record held
        # out for validation leaves training with all its repeats (otherwise validation would score rows the model
        # trains on); counting repeats would hold out far more distinct rows than asked.
        distinct = list({id(r): r for r in train}.values())
        n_val = max(1, int(round(len(distinct) * data_cfg.val_split)))
        if n_val >= len(distinct):
            raise UserError(f"data.val_split={data_cfg.val_split} leaves no training rows out of {len(distinct)}; "
                            "lower it or add data")
        idx = list(range(len(distinct)))
        rng.shuffle(idx)
        held = {id(distinct[i]) for i in idx[:n_val]}
        val = [r for r in distinct if id(r) in held]
        train = [r for r in train if id(r) not in held]
    return train, val


# ------------------------------------------------------------------------------------------------------------ SFT

def encode_text(tok, text: str, max_length: int | None = None) -> render.Encoded:
    """Language-modelling sample: every token trained, ending with EOS so the model learns to stop."""
    ids = tok(text, add_special_tokens=True)["input_ids"]
    if tok.eos_token_id is not None and (not ids or ids[-1] != tok.eos_token_id):
        ids = ids + [tok.eos_token_id]
    length = len(ids)
    truncated = max_length is not None and length > max_length
    ids = ids[:max_length] if truncated else ids
    return render.Encoded(list(ids), list(ids), truncated, length)


def encode_record(tok, rec: dict, max_length: int | None = None) -> render.Encoded:
    if "text" in rec:
        return encode_text(tok, rec["text"], max_length)
    # preference / KTO: the prompt (even its earlier assistant turns) is context; only the reply is a target
    train_from = len(rec["prompt"]) if "messages" not in rec and "prompt" in rec else 0
    try:
        return render.encode_conversation(tok, formats.conversation(rec), max_length, train_from)
    except UserError as e:  # a template's refusal ("System role not supported") names the row it met
        if rec.get("origin") and not str(e).startswith(rec["origin"]):
            raise UserError(f"{rec['origin']}: {e}") from None
        raise


def encode_records(tok, records: list[dict], data_cfg, unused: dict | None = None,
                   part: str = "training") -> tuple[list[dict], dict]:
    """Token rows {input_ids, labels} and counts of what happened to over-long samples.

    `unused`: source -> fields its format left unread (see `load_source`), named when prompt-only data cannot train.
    `part`: "training" or "validation", named when nothing is left to train or score.
    """
    rows, stats = [], {"samples": 0, "truncated": 0, "dropped": 0, "no_reply": 0, "eos_kept": 0, "eos_lost": 0,
                       "eos_missing": 0}
    eot, lengths = render.end_of_turn_ids(tok), []
    for i, r in enumerate(records):
        if r.get("label") is False:  # an undesirable KTO completion is not something to imitate
            stats["dropped"] += 1
            stats["undesirable"] = stats.get("undesirable", 0) + 1
            continue
        enc = encode_record(tok, r, data_cfg.max_length)
        lengths.append(enc.length)
        if enc.truncated:
            if data_cfg.overlong == "error":
                where = r.get("origin", f"sample {i}")
                raise UserError(f"{where}: sample is longer than data.max_length={data_cfg.max_length} tokens; raise "
                                "data.max_length or set data.overlong to truncate or drop")
            if data_cfg.overlong == "drop":
                stats["dropped"] += 1
                continue
            stats["truncated"] += 1
        if all(lab == render.IGNORE for lab in enc.labels):
            stats["no_reply"] += 1  # nothing to learn from (no assistant turn, or truncated before the reply)
            stats["dropped"] += 1
            continue
        # a sample whose reply was cut before its end-of-turn token teaches the model to run on instead of stopping;
        # one that has none without truncation is the template's doing (eos_missing), which max_length cannot fix
        if any(lab in eot for lab in enc.labels if lab != render.IGNORE):
            stats["eos_kept"] += 1
        else:
            stats["eos_lost" if enc.truncated else "eos_missing"] += 1
        rows.append({"input_ids": enc.input_ids, "labels": enc.labels})
    stats["samples"] = len(rows)
    stats["length_p95"] = percentile(sorted(lengths), 0.95) if lengths else 0
    if not rows and records and all(formats.kind_of(r) == "prompt" for r in records):
        fields = sorted({k for v in (unused or {}).values() for k in v})
        hint = (f"; the prompt format leaves field(s) {', '.join(fields)} unread: if one holds the reply, map it, "
                f"e.g. data.columns: {{{fields[0]}: completion}}" if fields else "")
        raise UserError(f"{records[0].get('origin', 'data')}: the data is prompts without replies; SFT needs "
                        f"conversations with assistant replies (prompt-only data is for GRPO/PPO){hint}")
    if not rows:
        undesirable = stats.get("undesirable", 0)
        if records and undesirable == len(records):
            raise UserError(f"{records[0].get('origin', 'data')}: every row of the {part} data is labelled undesirable "
                            "(KTO label false), and SFT only imitates desirable replies; train these rows with "
                            "method kto, or add rows labelled true")
        why = {"labelled undesirable (KTO label false)": undesirable,
               f"longer than data.max_length={data_cfg.max_length} (data.overlong: drop)":
                   stats["dropped"] - undesirable - stats["no_reply"],
               "without an assistant reply to train on": stats["no_reply"]}
        raise UserError(f"no trainable samples in the {part} data: of {len(records)}, "
                        + ", ".join(f"{n} {what}" for what, n in why.items() if n)
                        + "; check data.max_length and the data")
    return rows, stats


def percentile(sorted_vals: list[int], q: float) -> int:
    # nearest-rank: a value that actually occurs, which is what a user compares with max_length
    k = max(0, min(len(sorted_vals) - 1, int(round(q * len(sorted_vals) + 0.5)) - 1))
    return sorted_vals[k]


def check_end_of_turn(stats: dict, max_length: int, allow_lost: bool = False) -> str | None:
    """Refuse data where most samples (> 50%) lose their end-of-turn token to truncation at data.max_length: the
    model would learn to run on rather than to stop. Returns a warning line when some (but not most, or
    `allow_lost`) lose it, None when none do. Reads the counts every prepare_* puts in its stats."""
    lost = stats.get("eos_lost", 0)
    if not lost:
        return None
    total = lost + stats.get("eos_kept", 0) + stats.get("eos_missing", 0)
    share = f"{lost} of {total} samples ({100 * lost / total:.0f}%)"
    suggest = stats.get("length_p95", 0)
    fix = (f"set data.max_length to {suggest} (the 95th percentile sample length)" if suggest > max_length
           else "raise data.max_length")
    if lost * 2 > total and not allow_lost:
        raise UserError(f"data.max_length={max_length} cuts the end-of-turn token off {share}, so the model would "
                        f"not learn to stop; {fix}, set data.overlong: drop, or data.allow_truncated_eos: true")
    return f"data.max_length={max_length} cuts the end-of-turn token off {share}; {fix} to keep it"


def _report(info: dict) -> dict:
    """The reading counts every prepare_* puts in its stats. `invalid_summary` is one printable line on the rows
    `data.on_invalid: skip` left out (None when none were), `invalid_examples` the first few problems."""
    n = info["invalid_skipped"]
    summary = (f"{n} of {info['rows']} rows were invalid and skipped (data.on_invalid: skip); first: "
               f"{info['problems'][0]}" if n else None)
    return {"formats": info["formats"], "rows_read": info["rows"], "invalid_skipped": n,
            "invalid_examples": info["problems"], "invalid_summary": summary, "duplicates": info["duplicates"],
            "duplicates_removed": info["duplicates_removed"]}


def _source_prints(data_cfg) -> list[str]:
    return [fingerprint(s) for s in _source_list(data_cfg.train) + _source_list(data_cfg.validation)]


def _cached(kind: str, data_cfg, tok, build_rows) -> tuple[list[dict], list[dict], dict]:
    """`build_rows()` -> (train, validation, stats), read from / written to the on-disk cache of `kind` rows.

    A repeated or resumed job with the same data, tokenizer, template and settings reads the rows back instead of
    reading, normalizing and tokenizing again; a damaged cache file is rebuilt. Without a tokenizer (preference, KTO
    and prompt rows can be made without one) nothing is tokenized, so there is nothing worth caching.
    """
    use_cache = getattr(data_cfg, "cache", True) and tok is not None
    key = path = None
    status = "off"
    if use_cache:
        key = cache.make_key(kind, data_cfg, tok, _source_prints(data_cfg))
        path = cache.path_for(data_cfg, kind, key)
        payload, status = cache.load(path, key)
        if payload is not None:
            stats = dict(payload["stats"], cache="hit", cache_path=str(path))
            return payload["train"], payload["validation"], stats
        if status == "corrupt":
            log.warning("data cache %s is damaged; rebuilding it", path)
    train, val, stats = build_rows()
    if tok is not None:
        stats["template"] = templates.describe(tok)
    if use_cache:
        try:
            cache.save(path, key, {"train": train, "validation": val, "stats": stats})
        except OSError as e:  # a read-only or full disk costs the cache, not the run
            log.warning("could not write the data cache %s: %s", path, e)
            status = "unwritable"
        stats["cache"] = {"miss": "built", "corrupt": "rebuilt"}.get(status, status)
        stats["cache_path"] = str(path)
    else:
        stats["cache"] = "off"
    return train, val, stats


def prepare_sft(data_cfg, tok) -> tuple[list[dict], list[dict], dict]:
    """Tokenized train and validation rows for SFT-style methods, plus counts for the report (cached on disk)."""
    return _cached("sft", data_cfg, tok, lambda: _build_sft(data_cfg, tok))


def _build_sft(data_cfg, tok) -> tuple[list[dict], list[dict], dict]:
    info = _new_info()
    train_rec, val_rec = train_val_records(data_cfg, info)
    _same_loss(train_rec, val_rec, info)
    train, stats = encode_records(tok, train_rec, data_cfg, info.get("unused_fields"))
    val, val_stats = encode_records(tok, val_rec, data_cfg, part="validation") if val_rec else ([], {})
    stats["validation_samples"] = len(val)
    stats["validation_truncated"] = val_stats.get("truncated", 0)
    stats["validation_dropped"] = val_stats.get("dropped", 0)
    stats.update(_report(info))
    return train, val, stats


# ------------------------------------------------------------------------------------ preference / KTO / prompts

def _format_of(rec: dict, info: dict) -> str:
    """The format detected for the source a record came from (its origin is SOURCE:LINE)."""
    source = str(rec.get("origin", "")).rsplit(":", 1)[0]
    return info["formats"].get(source) or ", ".join(sorted(set(info["formats"].values())))


def _same_loss(train: list[dict], val: list[dict], info: dict) -> None:
    """SFT scores plain text on every token and a conversation on its replies only: validation data of the other
    kind than all the training data would report an eval_loss that the training loss cannot be compared with."""
    text = {formats.kind_of(r) == "text" for r in train}
    bad = next((r for r in val if len(text) == 1 and (formats.kind_of(r) == "text") not in text), None)
    if bad is not None:
        what = {True: "plain text (every token trained)", False: "conversations (replies trained)"}
        raise UserError(f"{bad.get('origin', 'data.validation')}: data.validation is "
                        f"{what[formats.kind_of(bad) == 'text']}, format {_format_of(bad, info)}, but the training "
                        f"data is {what[text.pop()]}: eval_loss would measure other tokens than the training loss; "
                        "give validation data of the training data's kind, or leave data.validation out "
                        "(data.val_split holds out training rows)")


def _need(records: list[dict], kinds: set[str], method_kind: str, info: dict) -> None:
    bad = next((r for r in records if formats.kind_of(r) not in kinds), None)
    if bad is not None:
        raise UserError(f"{bad.get('origin', 'data')}: this method needs {method_kind} data, but this is "
                        f"{formats.kind_of(bad)} data (format {_format_of(bad, info)}); see `tunelab data inspect`")


def _length_filter(tok, records: list[dict], data_cfg, parts, stats: dict, lengths: list[int]) -> list[dict]:
    """Apply data.overlong to the rendered length of each record's longest conversation."""
    if tok is None:
        return records
    out = []
    for r in records:
        n = max(len(tok(render.render(tok, msgs), add_special_tokens=False)["input_ids"]) for msgs in parts(r))
        lengths.append(n)
        if n > data_cfg.max_length:
            stats["overlong"] += 1
            if data_cfg.overlong == "error":
                raise UserError(f"{r.get('origin', 'data')}: sample is {n} tokens, longer than data.max_length="
                                f"{data_cfg.max_length}; raise it or set data.overlong to truncate or drop")
            if data_cfg.overlong == "drop":
                stats["dropped"] += 1
                continue
            stats["truncated"] += 1  # the trainer truncates to max_length
        out.append(r)
    return out


def _prepare(data_cfg, tok, kinds, method_kind, convert, parts, replies: bool = True):
    """Shared by the conversational preparations: `convert(record) -> [rows]`, `parts(record) -> [messages, ...]`
    whose rendered lengths decide over-long handling (with a tokenizer; without one, the trainer truncates).
    `replies`: rows end with a reply, whose end-of-turn token a truncated sample loses (the trainer cuts the end)."""
    info = _new_info()
    train_rec, val_rec = train_val_records(data_cfg, info)
    _need(train_rec + val_rec, kinds, method_kind, info)
    stats = {"samples": 0, "overlong": 0, "truncated": 0, "dropped": 0}
    lengths: list[int] = []
    kept = _length_filter(tok, train_rec, data_cfg, parts, stats, lengths)
    train = [row for r in kept for row in convert(r)]
    val = [row for r in _length_filter(tok, val_rec, data_cfg, parts, dict(stats), []) for row in convert(r)]
    if not train:
        raise UserError("no training samples left after filtering over-long ones; raise data.max_length")
    stats.update(samples=len(train), validation_samples=len(val), **_report(info))
    if tok is not None and replies:
        stats.update(eos_kept=len(kept) - stats["truncated"], eos_lost=stats["truncated"],
                     length_p95=percentile(sorted(lengths), 0.95))
    return train, val, stats


def prepare_preference(data_cfg, tok=None) -> tuple[list[dict], list[dict], dict]:
    """Rows {prompt, chosen, rejected} as conversational message lists (TRL's DPO/ORPO/SimPO/reward format)."""
    return _cached("preference", data_cfg, tok, lambda: _prepare(
        data_cfg, tok, {"preference"}, "preference (prompt/chosen/rejected)",
        lambda r: [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]}],
        lambda r: (r["prompt"] + r["chosen"], r["prompt"] + r["rejected"])))


def _kto_rows(r: dict):
    if "chosen" in r:  # a preference pair gives one desirable and one undesirable example
        return [{"prompt": r["prompt"], "completion": r["chosen"], "label": True},
                {"prompt": r["prompt"], "completion": r["rejected"], "label": False}]
    return [{"prompt": r["prompt"], "completion": r["completion"], "label": r["label"]}]


def prepare_kto(data_cfg, tok=None) -> tuple[list[dict], list[dict], dict]:
    """Rows {prompt, completion, label} (TRL's unpaired KTO format); preference pairs are split into one of each."""
    return _cached("kto", data_cfg, tok, lambda: _prepare(
        data_cfg, tok, {"kto", "preference"}, "KTO (prompt/completion/label) or preference", _kto_rows,
        lambda r: ([r["prompt"] + r["chosen"], r["prompt"] + r["rejected"]] if "chosen" in r
                   else [r["prompt"] + r["completion"]])))


def _prompt_row(r: dict) -> dict:
    if "messages" in r:
        msgs = r["messages"]
        last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
        prompt = msgs[:last] if last is not None else msgs
        answer = r.get("answer", msgs[last]["content"] if last is not None else None)
    else:
        prompt, answer = r["prompt"], r.get("answer")
    row = {"prompt": prompt, "answer": answer}
    if "aliases" in r:
        row["aliases"] = r["aliases"]
    return row


def prepare_prompts(data_cfg, tok=None) -> tuple[list[dict], list[dict], dict]:
    """Prompt-only rows {prompt: messages, answer: gold or None} for GRPO/PPO (and eval); the gold answer is the
    GSM8K number, the summary, or the final reply. Rows carry `aliases` when the data has them (TriviaQA)."""
    return _cached("prompts", data_cfg, tok, lambda: _build_prompts(data_cfg, tok))


def _build_prompts(data_cfg, tok):
    # prompts end where the model's reply would begin: there is no end-of-turn token to keep (replies=False)
    train, val, stats = _prepare(data_cfg, tok, {"conversation", "prompt", "preference", "kto"}, "prompt",
                                 lambda r: [_prompt_row(r)], lambda r: [_prompt_row(r)["prompt"]], replies=False)
    for rows in (train, val):  # one schema for every row, so `datasets.Dataset.from_list` keeps the column
        if any("aliases" in x for x in rows):
            for x in rows:
                x.setdefault("aliases", [])
    return train, val, stats


# ------------------------------------------------------------------------------------------------- by data kind

PREPARE = {"conversation": prepare_sft, "preference": prepare_preference, "kto": prepare_kto,
           "prompt": prepare_prompts}


def prepare(kind: str, data_cfg, tok) -> tuple[list[dict], list[dict], dict]:
    """Train rows, validation rows and stats of one of the kinds a method trains on (methods.contract.DATA_KINDS)."""
    return PREPARE[kind](data_cfg, tok)


# The conversations one row of each untokenized kind puts through the model: a pair each reply after the prompt, a
# KTO example its reply after the prompt, a prompt row the prompt itself (which generation continues).
_SEQUENCES = {"preference": lambda r: (r["prompt"] + r["chosen"], r["prompt"] + r["rejected"]),
              "kto": lambda r: (r["prompt"] + r["completion"],),
              "prompt": lambda r: (r["prompt"],)}


def sequence_lengths(kind: str, rows: list[dict], tok, max_length: int) -> list[tuple[int, ...]]:
    """Per row, the token length of each sequence it puts through the model, capped at max_length (where the
    trainers truncate). Tokenized rows (conversation) have theirs; preference, KTO and prompt rows are tokenized by
    TRL's trainers or the rollout, so they are rendered and counted here (the step-time estimate needs them)."""
    if kind == "conversation":
        return [(len(r["input_ids"]),) for r in rows]
    generation = kind == "prompt"  # a prompt is rendered up to where the reply begins, as the rollout renders it

    def length(msgs) -> int:
        text = msgs if isinstance(msgs, str) else render.render(tok, msgs, add_generation_prompt=generation)
        return min(len(tok(text, add_special_tokens=False)["input_ids"]), max_length)

    return [tuple(length(msgs) for msgs in _SEQUENCES[kind](r)) for r in rows]
