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

# Hub ids of the embedded models, for the card's `base_model` (a local path is not a Hub reference).
EMBEDDED_HUB_IDS = {"embedded:smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}
RUN_FILES = {"config.yaml": "tunelab_config.yaml", "summary.json": "summary.json", "metrics.jsonl": "metrics.jsonl",
             "loss.png": "loss.png"}


def _base_hub_id(source: str | None) -> str | None:
    if not source:
        return None
    if source in EMBEDDED_HUB_IDS:
        return EMBEDDED_HUB_IDS[source]
    if Path(source).expanduser().exists() or source.startswith("embedded:"):
        return None
    return source


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
