"""Export a finished run: a merged model, a verified GGUF, an Ollama Modelfile, or a push to the Hugging Face Hub.

`tunelab export RUN --to merged|gguf|ollama|hub`. Every export is checked against its source before it is put in
place (logits, tokenization); a failed check exits 1 and leaves nothing under the output name. Outputs go to
RUN/export/ unless --out says otherwise; --overwrite replaces an earlier export there, never anything else.

Heavy imports (torch, transformers, gguf) happen inside the functions, so the CLI stays instant.
"""

from __future__ import annotations

import sys
from pathlib import Path

TARGETS = ("merged", "gguf", "ollama", "hub")
DEFAULT_TYPE, DEFAULT_DTYPE = "q8_0", "fp32"
# The options each target reads. Any other one the user gives is refused rather than ignored: ignored, it would
# quietly produce something else than asked (`--to merged --type q4_0` would write float32 weights).
OPTIONS = {"merged": ("dtype", "out", "overwrite"),
           "gguf": ("type", "out", "overwrite", "verbose"),
           "ollama": ("type", "out", "overwrite", "verbose"),
           "hub": ("repo", "private", "dry_run")}
# The option that does the job instead, where one does.
_GGUF_PRECISION = "a GGUF's precision is --type (f32, f16, bf16, q8_0, q4_0, or a K-quant with llama.cpp)"
INSTEAD = {("merged", "type"): "a merged model's precision is --dtype fp32|fp16|bf16 (quantized is --to gguf --type)",
           ("gguf", "dtype"): _GGUF_PRECISION, ("ollama", "dtype"): _GGUF_PRECISION,
           ("hub", "out"): "the upload goes to --repo OWNER/NAME"}


def export(run: str, to: str = "merged", out: str | Path | None = None, qtype: str | None = None,
           dtype: str | None = None, overwrite: bool = False, repo: str | None = None, dry_run: bool = False,
           private: bool = False, verbose: bool = False):
    """Export a finished run (`to`: merged | gguf | ollama | hub) and return where it went (None for the hub).
    Python entry point behind `tunelab export`; a failed check raises ParityError and leaves nothing behind.
    qtype (gguf/ollama, default q8_0) and dtype (merged, default fp32): None means not given.
    verbose: show llama.cpp's own log (quantization, loading) instead of only a summary of the GGUF made."""
    from tunelab.errors import UserError
    from tunelab.export import llamacpp
    from tunelab.export.common import load_run, output_path

    if to not in TARGETS:
        raise UserError(f"--to {to}: choose one of {', '.join(TARGETS)}")
    _check_options(to, {"type": qtype, "dtype": dtype, "out": out, "overwrite": overwrite, "repo": repo,
                        "private": private, "dry_run": dry_run, "verbose": verbose})
    qtype, dtype = (qtype or DEFAULT_TYPE).lower(), dtype or DEFAULT_DTYPE
    r = load_run(run)
    if to == "hub":
        from tunelab.export.hub import push

        push(r, repo_id=repo, dry_run=dry_run, private=private)
        return None
    # everything about the output is checked before any model is loaded
    if to in ("gguf", "ollama"):
        _check_type(qtype)
    target = output_path(r, to, out, qtype, overwrite)
    if to in ("gguf", "ollama"):
        from tunelab.export.gguf import check_exportable

        check_exportable(r)  # an architecture GGUF export cannot write and check is refused before the merge
    if to == "merged":
        from tunelab.export.merge import export_merged

        export_merged(r, target, dtype=dtype, overwrite=overwrite)
    elif to == "gguf":
        from tunelab.export.gguf import export_gguf
        from tunelab.export.merge import merged_model

        model, tok, _ = merged_model(r)
        with llamacpp.quiet(verbose):
            export_gguf(model, tok, target, qtype, overwrite=overwrite, name=r.name)
        print(llamacpp.summary(target, qtype))
    else:
        from tunelab.export.ollama import export_ollama

        with llamacpp.quiet(verbose):
            export_ollama(r, target, qtype, overwrite=overwrite)
        for made in sorted(target.glob("*.gguf")):
            print(llamacpp.summary(made, qtype))
    return target


def main(args) -> int:
    from tunelab.export.common import ParityError

    try:  # --type and --dtype are None unless given: a flag the target does not read is refused
        export(args.run, args.to, args.out, args.type, args.dtype, args.overwrite, args.repo, args.dry_run,
               args.private, verbose=args.verbose)
    except ParityError as e:
        print(f"error: parity check failed: {e}", file=sys.stderr)
        return 1
    return 0


def _check_options(to: str, given: dict) -> None:
    """Refuse an option given (not None, not False) that `to` does not read, naming the one to use instead."""
    from tunelab.errors import UserError

    for name, value in given.items():
        if value is None or value is False or name in OPTIONS[to]:
            continue
        flag = "--" + name.replace("_", "-")
        targets = "|".join(t for t, names in OPTIONS.items() if name in names)
        raise UserError(f"{flag} does not apply to --to {to}, only with --to {targets}; "
                        f"{INSTEAD.get((to, name), f'drop {flag}')}")


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
