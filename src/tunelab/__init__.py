"""tunelab: fine-tune open LLMs end to end.

The Python API (tunelab.api): `load_config`, `finetune`, `evaluate`, `export_run`. They are imported on first use, so
`import tunelab` (and `tunelab --help`) stays instant.
"""

__version__ = "0.1.0"

__all__ = ["load_config", "finetune", "evaluate", "export_run", "check_config"]


def __getattr__(name: str):
    if name in __all__:
        from tunelab import api

        return getattr(api, name)
    raise AttributeError(f"module 'tunelab' has no attribute {name!r}")
