"""On-disk cache of preprocessed (tokenized) data.

The key is a hash of everything that decides the tokens: the bytes of every source file (or a hub dataset's
id/split/config/revision), the tokenizer (its full serialized vocabulary/merges/normalizer and special tokens),
the chat template, the data settings, and `VERSION` (bump it when the preprocessing code changes what it writes).
A repeated or resumed job with the same inputs reads the file instead of re-tokenizing. Every kind of data is cached
(SFT token rows, preference / KTO / prompt rows); the kind is part of the key and of the file name.

A cache file is one header line (JSON: version, key, sha256 and length of the body) followed by the body (JSON).
It is written to a temporary file in the same directory and renamed into place, so a crash never leaves a
half-written file under the real name; a file that is damaged anyway (disk full, edited, truncated) fails its checksum
on reading and is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

# 2: every method's data is cached (kinds sft, preference, kto, prompts); stats carry eos_kept/eos_lost/template
# 3: val_split holds out a fraction of the distinct rows; stats carry invalid_summary
# 4: eos_kept/eos_lost count the end-of-turn token of templates that are not built in (templates.own_end_token)
VERSION = 5  # 5: formats detected from the first rows by majority, not the first row alone
# settings that do not change the tokenized rows (they are applied later, by the trainer)
_NOT_IN_KEY = {"packing", "padding_free", "cache", "cache_dir"}


def root(data_cfg) -> Path:
    if getattr(data_cfg, "cache_dir", None):
        return Path(data_cfg.cache_dir).expanduser()
    from tunelab.models import cache_dir

    return cache_dir() / "data"


def tokenizer_fingerprint(tok) -> str:
    h = hashlib.sha256()
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:  # slow (Python) tokenizers: the vocabulary is what we can see
        h.update(json.dumps(sorted(tok.get_vocab().items())).encode())
    special = [type(tok).__name__, tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token,
               getattr(tok, "add_bos_token", None), getattr(tok, "add_eos_token", None)]
    h.update(json.dumps(special, default=str).encode())
    h.update(json.dumps(getattr(tok, "chat_template", None), default=str).encode())
    return h.hexdigest()


def make_key(kind: str, data_cfg, tok, source_prints: list[str]) -> str:
    settings = {k: v for k, v in data_cfg.model_dump(mode="json").items() if k not in _NOT_IN_KEY}
    blob = json.dumps({"version": VERSION, "kind": kind, "settings": settings, "sources": source_prints,
                       "tokenizer": tokenizer_fingerprint(tok)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def path_for(data_cfg, kind: str, key: str) -> Path:
    return root(data_cfg) / f"{kind}-{key[:40]}.json"


def load(path: Path, key: str) -> tuple[dict | None, str]:
    """(payload, status): status is 'hit', 'miss' (no file) or 'corrupt' (present but unreadable or damaged)."""
    if not path.is_file():
        return None, "miss"
    try:
        raw = path.read_bytes()
        head, body = raw.split(b"\n", 1)
        meta = json.loads(head)
        if (meta.get("version") != VERSION or meta.get("key") != key or meta.get("bytes") != len(body)
                or meta.get("sha256") != hashlib.sha256(body).hexdigest()):
            return None, "corrupt"
        return json.loads(body), "hit"
    except (OSError, ValueError, AttributeError):
        return None, "corrupt"


def save(path: Path, key: str, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    body = json.dumps(payload, separators=(",", ":")).encode()
    head = json.dumps({"version": VERSION, "key": key, "bytes": len(body),
                       "sha256": hashlib.sha256(body).hexdigest()}).encode()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(head + b"\n" + body)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
