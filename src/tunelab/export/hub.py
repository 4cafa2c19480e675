"""Push a run's final model (or adapter) to the Hugging Face Hub with a model card.

The upload is staged in a temporary folder first: final/ as saved by training, a README.md model card (base model,
method, training config, metrics, loss plot), the resolved config, summary and metrics, and loss.png. `--dry-run`
lists that folder, which is exactly what `HfApi.upload_folder` would send; the real push uploads the same folder.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from tunelab.errors import UserError
from tunelab.export.common import Run, print_table

RUN_FILES = {"config.yaml": "tunelab_config.yaml", "summary.json": "summary.json", "metrics.jsonl": "metrics.jsonl",
             "loss.png": "loss.png"}


def _base_hub_id(source: str | None) -> str | None:
    """The Hub id of the run's base model, or None when it has none (a local directory of the user's own).

    An embedded model has the public id declared beside models.EMBEDDED, whether the run names it as embedded:NAME
    or by the cache directory it was loaded from (what PEFT records in adapter_config.json)."""
    from tunelab.models import EMBEDDED_PUBLIC_IDS, cache_dir

    if not source:
        return None
    if source.startswith("embedded:"):
        return EMBEDDED_PUBLIC_IDS.get(source.split(":", 1)[1])
    path = Path(source).expanduser()
    if path.exists():
        cached = cache_dir() / "models"
        if path.resolve().parent == cached.resolve():
            return EMBEDDED_PUBLIC_IDS.get(path.name)
        return None
    return source


def _public_base(run: Run, dest: Path) -> str | None:
    """Point the staged adapter_config.json at the base's Hub id (PEFT records the local directory it loaded, e.g.
    the embedded model's cache): AutoPeftModelForCausalLM, and the card's snippet, load the base from there."""
    cfg_file = dest / "adapter_config.json"
    recorded = json.loads(cfg_file.read_text()).get("base_model_name_or_path") if cfg_file.is_file() else None
    base = _base_hub_id(run.base) or _base_hub_id(recorded)
    if base and cfg_file.is_file() and recorded != base:
        cfg = json.loads(cfg_file.read_text())
        cfg["base_model_name_or_path"] = base
        cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return base


def _metrics(run: Run) -> tuple[dict, list[dict]]:
    summary = {}
    if (run.path / "summary.json").is_file():
        summary = json.loads((run.path / "summary.json").read_text())
    rows = []
    if (run.path / "metrics.jsonl").is_file():
        for line in (run.path / "metrics.jsonl").read_text().splitlines():
            if line.strip():
                rows.append(json.loads(line))
    return summary, rows


def model_card(run: Run, repo_id: str | None) -> str:
    import yaml
    from huggingface_hub import ModelCardData

    base = _base_hub_id(run.base)
    method = (run.config.get("method") or {}).get("name", "sft")
    card = ModelCardData(base_model=base, library_name="peft" if run.is_adapter else "transformers",
                         pipeline_tag="text-generation", tags=["tunelab", method, run.adapter_type])
    summary, rows = _metrics(run)
    kind = f"a {run.adapter_type.upper()} adapter" if run.is_adapter else "a fully fine-tuned model"
    lines = [f"---\n{card.to_yaml()}\n---", "", f"# {repo_id or run.name}", "",
             f"{kind[0].upper()}{kind[1:]} trained with tunelab ({method}) from "
             f"`{base or run.base or 'unknown'}`.", ""]
    if run.is_adapter and run.quant_bits:
        lines += [f"Trained as QLoRA over a {run.quant_bits}-bit base; apply it to the full-precision base.", ""]
    lines += ["## Metrics", ""]
    scalars = {k: v for k, v in summary.items() if isinstance(v, (int, float, str)) and k not in ("final",)}
    losses = [r for r in rows if "loss" in r]
    if losses:
        scalars.setdefault("first logged loss", losses[0]["loss"])
        scalars.setdefault("last logged loss", losses[-1]["loss"])
        scalars.setdefault("logged steps", losses[-1].get("step", len(losses)))
    if scalars:
        lines += ["| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in scalars.items()]
    else:
        lines.append("No metrics were recorded for this run.")
    if (run.path / "loss.png").is_file():
        lines += ["", "![training loss](loss.png)"]
    lines += ["", "## Training configuration", "", "```yaml", yaml.safe_dump(run.config, sort_keys=False).rstrip(),
              "```", "", "## Use", "", "```python"]
    rid = repo_id or "REPO_ID"
    if run.is_adapter:
        lines += ["from peft import AutoPeftModelForCausalLM", "from transformers import AutoTokenizer", "",
                  f'model = AutoPeftModelForCausalLM.from_pretrained("{rid}")',
                  f'tokenizer = AutoTokenizer.from_pretrained("{rid}")']
    else:
        lines += ["from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  f'model = AutoModelForCausalLM.from_pretrained("{rid}")',
                  f'tokenizer = AutoTokenizer.from_pretrained("{rid}")']
    lines += ["```", ""]
    return "\n".join(lines)


def stage(run: Run, dest: Path, repo_id: str | None) -> list[Path]:
    """Fill `dest` with everything the push uploads; returns the files, relative to `dest`."""
    for p in sorted(run.final.rglob("*")):
        if p.is_file():
            target = dest / p.relative_to(run.final)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(p, target)
    for src, name in RUN_FILES.items():
        if (run.path / src).is_file():
            shutil.copy2(run.path / src, dest / name)
    _public_base(run, dest)
    (dest / "README.md").write_text(model_card(run, repo_id))  # replaces PEFT's placeholder card, if any
    return sorted(p.relative_to(dest) for p in dest.rglob("*") if p.is_file())


def push(run: Run, repo_id: str | None, dry_run: bool = False, private: bool = False) -> list[Path]:
    if not dry_run and not repo_id:
        raise UserError("--to hub needs --repo OWNER/NAME (or --dry-run to see what would be uploaded)")
    if repo_id and repo_id.count("/") != 1:
        raise UserError(f"--repo {repo_id}: expected OWNER/NAME, e.g. you/{run.name}")
    if not dry_run:
        from huggingface_hub import get_token

        if get_token() is None:
            raise UserError("not logged in to the Hugging Face Hub: run `hf auth login` or set HF_TOKEN")
    with tempfile.TemporaryDirectory(prefix="tunelab-hub-") as td:
        files = stage(run, Path(td), repo_id)
        print_table(f"files {'that would be' if dry_run else 'to be'} uploaded to {repo_id or '(no --repo given)'}:",
                    ["file", "bytes"], [[str(f), (Path(td) / f).stat().st_size] for f in files])
        base = _base_hub_id(run.base)
        if base:
            local = f" (the run's {run.base})" if base != run.base else ""
            print(f"base model: {base}{local}, as named in the model card" +
                  (" and adapter_config.json" if run.is_adapter else ""))
        else:
            print(f"warning: the base model {run.base} is a local directory with no Hub id: the card and "
                  "adapter_config.json name that path, which others cannot load; train from a Hub id to share it")
        if dry_run:
            print("dry run: nothing was uploaded")
            return files
        from huggingface_hub import HfApi
        from huggingface_hub.errors import HfHubHTTPError
        errors: tuple = (HfHubHTTPError, OSError)
        for client in ("httpx2", "httpx"):  # huggingface_hub's HTTP client: its connection errors are not OSErrors
            try:
                errors += (__import__(client).HTTPError,)
            except (ImportError, AttributeError):
                pass
        api = HfApi()
        try:
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            info = api.upload_folder(folder_path=td, repo_id=repo_id, repo_type="model",
                                     commit_message=f"Upload {run.name} (tunelab)")
        except errors as e:
            raise UserError(f"push to {repo_id} failed: {str(e).splitlines()[0]}") from None
        print(f"pushed {len(files)} files to https://huggingface.co/{repo_id} ({getattr(info, 'oid', '')})")
        return files
