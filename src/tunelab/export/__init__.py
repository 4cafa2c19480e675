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


def export(run: str, to: str = "merged", out: str | Path | None = None, qtype: str = "q8_0", dtype: str = "fp32",
           overwrite: bool = False, repo: str | None = None, dry_run: bool = False, private: bool = False,
           verbose: bool = False):
    """Export a finished run (`to`: merged | gguf | ollama | hub) and return where it went (None for the hub).
    Python entry point behind `tunelab export`; a failed check raises ParityError and leaves nothing behind.
    verbose: show llama.cpp's own log (quantization, loading) instead of only a summary of the GGUF made."""
    from tunelab.errors import UserError
    from tunelab.export import llamacpp
    from tunelab.export.common import check_target, load_run

    if to not in TARGETS:
        raise UserError(f"--to {to}: choose one of {', '.join(TARGETS)}")
    r = load_run(run)
    out = Path(out) if out else None
    qtype = qtype.lower()
    if to in ("gguf", "ollama"):
        from tunelab.export.gguf import check_exportable

        _check_type(qtype)  # before any model is loaded
        check_exportable(r)  # an architecture GGUF export cannot write and check is refused before the merge
    if to == "merged":
        from tunelab.export.merge import export_merged

        target = out or r.path / "export" / "merged"
        export_merged(r, target, dtype=dtype, overwrite=overwrite)
    elif to == "gguf":
        from tunelab.export.gguf import export_gguf
        from tunelab.export.merge import merged_model

        target = out or r.path / "export" / f"{r.name}-{qtype}.gguf"
        check_target(target, overwrite)
        model, tok, _ = merged_model(r)
        with llamacpp.quiet(verbose):
            export_gguf(model, tok, target, qtype, overwrite=overwrite, name=r.name)
        print(llamacpp.summary(target, qtype))
    elif to == "ollama":
        from tunelab.export.ollama import export_ollama

        target = out or r.path / "export" / "ollama"
        with llamacpp.quiet(verbose):
            export_ollama(r, target, qtype, overwrite=overwrite)
        for made in sorted(target.glob("*.gguf")):
            print(llamacpp.summary(made, qtype))
    else:
        from tunelab.export.hub import push

        push(r, repo_id=repo, dry_run=dry_run, private=private)
        target = None
    return target


def main(args) -> int:
    from tunelab.export.common import ParityError

    try:
        export(args.run, args.to, args.out, args.type or "q8_0", args.dtype, args.overwrite, args.repo, args.dry_run,
               args.private, verbose=args.verbose)
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
