"""Every shipped config under configs/ parses, starts with the command that runs it, and passes the checks
`tunelab train` makes before loading anything (method options, evaluation schedule)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tunelab import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ALL = sorted(CONFIGS.rglob("*.yaml"))


def is_sweep(path: Path) -> bool:
    """Sweep files (tunelab sweep) have their own schema: a base config plus a search space."""
    data = yaml.safe_load(path.read_text()) or {}
    return "sweeps" in path.relative_to(CONFIGS).parts or "sweep" in data or "search" in data


def test_configs_are_found():
    names = {str(p.relative_to(CONFIGS)) for p in ALL}
    for method in ("dpo", "orpo", "kto", "simpo", "reward"):
        assert f"preference/{method}-hh.yaml" in names
    for method in ("lora", "qlora", "dora", "prefix", "ptuning", "prompt"):
        assert f"qa/{method}.yaml" in names
    # the seeds replayed at CPU scale, and the DialogSum recipe the outcome tests train
    for name in ("seeds/002-qa-lora.yaml", "seeds/002-qa-qlora.yaml", "seeds/002-qa-prefix.yaml",
                 "seeds/003-dialogsum-qlora.yaml", "seeds/004-full-dolly.yaml", "dialogsum/lora.yaml"):
        assert name in names


@pytest.mark.parametrize("path", ALL, ids=[str(p.relative_to(CONFIGS)) for p in ALL])
def test_shipped_config_parses(path: Path):
    first = path.read_text().splitlines()[0]
    command = "sweep" if is_sweep(path) else "train"
    assert first.startswith(f"# tunelab {command} configs/{path.relative_to(CONFIGS)}"), first
    if is_sweep(path):
        sweep = pytest.importorskip("tunelab.sweep")
        if not hasattr(sweep, "load_sweep"):
            pytest.skip("tunelab.sweep has no load_sweep")
        sweep.load_sweep(path)
        return
    cfg = load_config(path)  # includes the method's own options
    from tunelab.train import evaluation_settings

    evaluation_settings(cfg)  # the evaluation schedule fits the checkpoint schedule
    assert cfg.output.name == path.stem
