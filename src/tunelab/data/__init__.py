"""Data layer: sources (files, bundled samples, hub) -> detected format -> normalized records -> tokens + loss mask.

Normalized records:
  conversation  {"messages": [{"role", "content"}, ...], "answer"?: gold final answer}
  preference    {"prompt": [messages], "chosen": [messages], "rejected": [messages]}
  prompt        {"prompt": [messages], "answer"?: gold}
  kto           {"prompt": [messages], "completion": [messages], "label": bool}
"""
