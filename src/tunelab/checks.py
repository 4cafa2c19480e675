"""A run config checked against the layers it names: the method table (the method, its options, the adapter types it
trains with) and the data layer (format names). config.py, the lowest layer, reads and validates the sections
themselves and imports neither; train, estimate, sweep and the Python API call `check_config` before anything loads.
"""

from __future__ import annotations


def check_config(cfg):
    """`cfg` unchanged, or a UserError (one line: the key, what is wrong, how to fix it)."""
    from tunelab import methods
    from tunelab.data.formats import check_config as check_data_formats

    methods.options(cfg)
    check_data_formats(cfg.data)
    return cfg
