"""Data layer: sources (files, bundled samples, hub) -> detected format -> normalized records -> tokens + loss mask.

Normalized records (every record also carries "origin": "file:line" of its row, for errors after normalization):
  conversation  {"messages": [{"role", "content"}, ...], "answer"?: gold final answer, "aliases"?: [accepted answers]}
  preference    {"prompt": [messages], "chosen": [messages], "rejected": [messages]}
  prompt        {"prompt": [messages], "answer"?: gold}
  kto           {"prompt": [messages], "completion": [messages], "label": bool}
  text          {"text": str}  (plain language modelling: every token trained)

Entry points: `build.prepare_sft` (tokenized, cached), `build.prepare_preference`, `build.prepare_kto`,
`build.prepare_prompts` (TRL-ready conversational rows), `build.load_records` (records of any source), and
`inspection.inspect` behind `tunelab data inspect`.
"""
