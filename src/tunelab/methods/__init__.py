"""The method table: method name -> module. Each module follows the same contract (see methods/sft.py):

    Config   a pydantic model of the method's own options (unknown keys rejected)
    KIND     the record kind it trains on: "conversation" | "preference" | "prompt" | "kto"
    build(cfg, model, tokenizer, data, args) -> a transformers Trainer (or an object with .train())

Adding a method = one module here, one line in METHODS, one YAML in configs/, one test.
"""

from __future__ import annotations

import importlib

METHODS: dict[str, str] = {
    "sft": "tunelab.methods.sft",
}


def method_module(name: str):
    return importlib.import_module(METHODS[name])
