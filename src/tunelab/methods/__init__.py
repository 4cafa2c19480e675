"""The method table: method name -> module. Each module follows the same contract (see methods/sft.py):

    Config   a pydantic model of the method's own options (unknown keys rejected)
    KIND     the record kind it trains on: "conversation" | "preference" | "prompt" | "kto"
    build(cfg, model, tokenizer, data, args) -> a transformers Trainer (or an object with .train())
    TASK     optional: the PEFT task type of the model to load, default "CAUSAL_LM" ("SEQ_CLS": a reward model)
    MERGE_FINAL  optional: True saves final/ with the adapter merged in (a model plain transformers loads)
    check(cfg, opts, data)  optional: refusals (UserError) that need the config and data, before anything is written

Adding a method = one module here, one line in METHODS, one YAML in configs/, one test.
"""

from __future__ import annotations

import importlib

METHODS: dict[str, str] = {
    "sft": "tunelab.methods.sft",
    "dpo": "tunelab.methods.dpo",
    "orpo": "tunelab.methods.orpo",
    "kto": "tunelab.methods.kto",
    "simpo": "tunelab.methods.simpo",
    "reward": "tunelab.methods.reward",
    "grpo": "tunelab.methods.grpo",
    "ppo": "tunelab.methods.ppo",
    "distill": "tunelab.methods.distill",
}


def method_module(name: str):
    return importlib.import_module(METHODS[name])
