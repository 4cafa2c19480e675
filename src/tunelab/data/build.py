"""From `cfg.data` to tokenized train/validation sets: read -> normalize -> dedupe/subset/split -> encode."""

from __future__ import annotations

import json
import random

from tunelab.data import formats, render
from tunelab.data.sources import read_source
from tunelab.errors import UserError


def _source_list(spec) -> list[str]:
    if spec is None:
        return []
    items = spec if isinstance(spec, list) else [spec]
    return [s if isinstance(s, str) else s.path for s in items]


def load_records(spec, data_cfg) -> list[dict]:
    records = []
    for src in _source_list(spec):
        rows = read_source(src)
        records += formats.normalize(rows, data_cfg.format, src, data_cfg.columns)
    if data_cfg.system_prompt:
        for r in records:
            msgs = r.get("messages")
            if msgs and msgs[0]["role"] != "system":
                msgs.insert(0, {"role": "system", "content": data_cfg.system_prompt})
    if data_cfg.dedupe:
        seen, kept = set(), []
        for r in records:
            key = json.dumps(r, sort_keys=True)
            if key not in seen:
                seen.add(key)
                kept.append(r)
        records = kept
    return records


def train_val_records(data_cfg) -> tuple[list[dict], list[dict]]:
    train = load_records(data_cfg.train, data_cfg)
    if not train:
        raise UserError("data.train: the training data is empty")
    rng = random.Random(data_cfg.seed)
    if data_cfg.subset and data_cfg.subset < len(train):
        train = [train[i] for i in sorted(rng.sample(range(len(train)), data_cfg.subset))]
    val = load_records(data_cfg.validation, data_cfg) if data_cfg.validation else []
    if data_cfg.val_split and not val:
        idx = list(range(len(train)))
        rng.shuffle(idx)
        n_val = max(1, int(round(len(train) * data_cfg.val_split)))
        val_idx = set(idx[:n_val])
        val = [r for i, r in enumerate(train) if i in val_idx]
        train = [r for i, r in enumerate(train) if i not in val_idx]
    return train, val


def encode_records(tok, records: list[dict], data_cfg) -> tuple[list[dict], dict]:
    """Token rows {input_ids, labels} and counts of what happened to over-long samples."""
    rows, stats = [], {"samples": 0, "truncated": 0, "dropped": 0}
    for i, r in enumerate(records):
        enc = render.encode_conversation(tok, r["messages"], data_cfg.max_length)
        if enc.truncated:
            if data_cfg.overlong == "error":
                raise UserError(f"sample {i} is longer than data.max_length={data_cfg.max_length} tokens; raise "
                                "data.max_length or set data.overlong to truncate or drop")
            if data_cfg.overlong == "drop":
                stats["dropped"] += 1
                continue
            stats["truncated"] += 1
        if all(lab == render.IGNORE for lab in enc.labels):
            stats["dropped"] += 1  # nothing to learn from (e.g. truncated before the reply)
            continue
        rows.append({"input_ids": enc.input_ids, "labels": enc.labels})
    stats["samples"] = len(rows)
    if not rows:
        raise UserError("no trainable samples after filtering (all were dropped as over-long or had no assistant "
                        "reply); check data.max_length and the data")
    return rows, stats


def prepare_sft(data_cfg, tok) -> tuple[list[dict], list[dict], dict]:
    """Tokenized train and validation rows for SFT-style methods, plus counts for the report."""
    train_rec, val_rec = train_val_records(data_cfg)
    train, stats = encode_records(tok, train_rec, data_cfg)
    val = encode_records(tok, val_rec, data_cfg)[0] if val_rec else []
    stats["validation_samples"] = len(val)
    return train, val, stats
