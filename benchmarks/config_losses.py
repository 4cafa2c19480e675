"""Per-step losses of every shipped CPU config after a few steps: a refactoring check ("behaviour does not change").

    python benchmarks/config_losses.py --steps 2 --out before.json        # on the old code
    python benchmarks/config_losses.py --steps 2 --out after.json --compare before.json

Each config under configs/ that runs here (embedded model; data present) trains `--steps` optimizer steps in a
temporary run directory; its logged losses (and eval losses/rewards) are written to --out. --compare prints each
config's largest difference against an earlier file and exits 1 when one exceeds --tol.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def runnable(path: Path) -> str | None:
    """Why a config cannot run here (None when it can)."""
    import yaml

    raw = yaml.safe_load(path.read_text())
    if "base" in raw or "overrides" in raw:
        return "a sweep"
    source = (raw.get("model") or {}).get("source", "embedded:")
    if not source.startswith("embedded:") and not Path(source).exists():
        return f"model {source} is not local"
    train = (raw.get("data") or {}).get("train", "")
    for src in train if isinstance(train, list) else [train]:
        p = src.get("path") if isinstance(src, dict) else src
        if isinstance(p, str) and p.startswith("../") and not (ROOT / p).exists():
            return f"data {p} is absent"
    return None


def losses_of(path: Path, steps: int, out_dir: Path, subset: int | None) -> dict:
    from tunelab.api import finetune as train, load_config

    extra = [f"data.subset={subset}"] if subset else []
    cfg = load_config(path, [f"training.max_steps={steps}", f"output.dir={out_dir}", f"output.name={path.stem}",
                             "training.report_to=[]", *extra])
    train(cfg, echo=lambda *a, **k: None, show_progress=False)
    rows = [json.loads(line) for line in (out_dir / path.stem / "metrics.jsonl").read_text().splitlines() if line]
    keep = ("loss", "eval_loss", "reward", "eval_reward")
    return {k: [r[k] for r in rows if k in r] for k in keep if any(k in r for r in rows)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--out", required=True)
    ap.add_argument("--compare")
    ap.add_argument("--tol", type=float, default=1e-6)
    ap.add_argument("--subset", type=int, default=None, help="train on N rows of each config's data (faster; "
                    "sequence distillation has the teacher answer every training row first)")
    ap.add_argument("configs", nargs="*", help="default: every config under configs/")
    a = ap.parse_args()
    import os

    os.chdir(ROOT)  # shipped configs name ../shared/... relative to the repository root
    paths = [Path(p).resolve() for p in a.configs] or sorted((ROOT / "configs").rglob("*.yaml"))
    results = {}
    for p in paths:
        why = runnable(p)
        if why:
            print(f"skip {p.relative_to(ROOT)}: {why}", flush=True)
            continue
        with tempfile.TemporaryDirectory() as tmp:
            results[str(p.relative_to(ROOT))] = losses_of(p, a.steps, Path(tmp), a.subset)
        print(p.relative_to(ROOT), results[str(p.relative_to(ROOT))], flush=True)
    Path(a.out).write_text(json.dumps(results, indent=1))
    if not a.compare:
        return 0
    before, worst = json.loads(Path(a.compare).read_text()), 0.0
    for name, now in results.items():
        old = before.get(name)
        if old is None:
            print(f"{name}: not in {a.compare}")
            continue
        diffs = [abs(x - y) for k in old for x, y in zip(old[k], now.get(k, []))]
        same_len = all(len(old[k]) == len(now.get(k, [])) for k in old)
        d = max(diffs, default=0.0)
        worst = max(worst, d if same_len else float("inf"))
        print(f"{name}: max |diff| {d:.2e}{'' if same_len else ' (different number of values)'}")
    print(f"largest difference {worst:.2e} (tolerance {a.tol:g})")
    return 0 if worst <= a.tol else 1


if __name__ == "__main__":
    sys.exit(main())
