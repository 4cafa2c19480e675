"""Export a finished run: a merged model, a verified GGUF, an Ollama Modelfile, or a push to the Hugging Face Hub.

`tunelab export RUN --to merged|gguf|ollama|hub`. Every export is checked against its source before it is put in
place (logits, tokenization); a failed check exits 1 and leaves nothing under the output name. Outputs go to
RUN/export/ unless --out says otherwise, and an existing output is only replaced with --overwrite.

Heavy imports (torch, transformers, gguf) happen inside the functions, so the CLI stays instant.
"""

from __future__ import annotations

import sys
from pathlib import Path

TARGETS = ("merged", "gguf", "ollama", "hub")


def main(args) -> int:
    from tunelab.errors import UserError
    from tunelab.export.common import ParityError, check_target, load_run

    if args.to not in TARGETS:
        raise UserError(f"--to {args.to}: choose one of {', '.join(TARGETS)}")
    run = load_run(args.run)
    out = Path(args.out) if args.out else None
    qtype = (args.type or "q8_0").lower()
    if args.to in ("gguf", "ollama"):
        _check_type(qtype)  # before any model is loaded
    try:
        if args.to == "merged":
            from tunelab.export.merge import export_merged

            export_merged(run, out or run.path / "export" / "merged", dtype=args.dtype, overwrite=args.overwrite)
        elif args.to == "gguf":
            from tunelab.export.gguf import export_gguf
            from tunelab.export.merge import merged_model

            target = out or run.path / "export" / f"{run.name}-{qtype}.gguf"
            check_target(target, args.overwrite)
            model, tok, _ = merged_model(run)
            export_gguf(model, tok, target, qtype, overwrite=args.overwrite, name=run.name)
        elif args.to == "ollama":
            from tunelab.export.ollama import export_ollama

            export_ollama(run, out or run.path / "export" / "ollama", qtype, overwrite=args.overwrite)
        else:
            from tunelab.export.hub import push

            push(run, repo_id=args.repo, dry_run=args.dry_run, private=args.private)
    except ParityError as e:
        print(f"error: parity check failed: {e}", file=sys.stderr)
        return 1
    return 0


def _check_type(qtype: str) -> None:
    from tunelab.errors import UserError
    from tunelab.export.gguf import LLAMACPP_TYPES, TYPES, require_llamacpp

    if qtype not in TYPES:
        raise UserError(f"--type {qtype} is not a GGUF type tunelab writes; choose one of {', '.join(TYPES)}")
    if qtype in LLAMACPP_TYPES:
        require_llamacpp(qtype)


def infer(args) -> int:
    from tunelab.export.llamacpp import infer as run_infer

    return run_infer(args)
