"""Merge a run's LoRA / DoRA adapter into its base model and save a plain transformers model.

The merge itself is PEFT's `merge_and_unload` (it knows LoRA scaling, rsLoRA, DoRA's magnitude vectors and fan-in/out
layouts). A QLoRA adapter is merged into the base loaded in full precision, never into 4-bit weights: merging into
quantized weights would re-quantize the sum and lose most of what the adapter learned. The merged model is checked
against the adapter model on a few prompts after it has been written and read back, so what is verified is the file.
"""

from __future__ import annotations

from pathlib import Path

from tunelab.adapters import ADAPTERS
from tunelab.errors import UserError
from tunelab.export.common import (ParityError, Run, all_logits, atomic_path, check_target, compare_logits,
                                   logit_table, prompt_ids, run_tokenizer, trained_stop_ids)

DTYPES = ("fp32", "fp16", "bf16")
# Relative logit error allowed between the adapter model (float32) and the merged model read back from disk:
# float32 only reorders additions; fp16 / bf16 round every weight (10 / 7 mantissa bits).
MERGE_TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 5e-2}
MERGEABLE = tuple(name for name, a in ADAPTERS.items() if a.mergeable)


def _load_base(source: str):
    """The base model in float32. A checkpoint saved already quantized (bitsandbytes) is de-quantized first."""
    import torch
    from transformers import AutoModelForCausalLM

    from tunelab.models import _from_pretrained, resolve_source

    model = _from_pretrained(AutoModelForCausalLM, resolve_source(source), dtype=torch.float32)
    if getattr(model.config, "quantization_config", None) is not None:
        # e.g. a `*-bnb-4bit` hub checkpoint: merge into its de-quantized weights, as with QLoRA
        model = model.dequantize()
    return model


def merged_model(run: Run, quiet: bool = False):
    """(model in float32 with the adapter merged, tokenizer, parity ok?) for a run; a full model is loaded as is.
    Its generation config stops on every end-of-turn token the run trained (_stop_on_trained_end_of_turn)."""
    model, tok, ref = _merged_model(run, quiet)
    _stop_on_trained_end_of_turn(model, tok)
    return model, tok, ref


def _stop_on_trained_end_of_turn(model, tok) -> None:
    """List the trained end-of-turn ids beside the EOS in the model's generation config (a base's says only its EOS,
    e.g. <|endoftext|> while a chatml run ended turns with <|im_end|>): the merged model's generation_config.json
    then stops where the run learned to, and the GGUF checks generate with the same stops."""
    ids = trained_stop_ids(tok, model)
    if getattr(model, "generation_config", None) is not None and len(ids) > 1:
        model.generation_config.eos_token_id = ids


def _merged_model(run: Run, quiet: bool):
    import torch
    from transformers import AutoModelForCausalLM

    from tunelab.models import _from_pretrained, load_adapter

    tok = run_tokenizer(run)
    if not run.is_adapter:  # a full fine-tune: nothing to merge; its own logits are the reference for the copy
        model = _from_pretrained(AutoModelForCausalLM, str(run.final), dtype=torch.float32).eval()
        if quiet:
            return model, tok, None
        ids = prompt_ids(tok)
        return model, tok, (all_logits(model, ids), ids)
    if run.adapter_type not in MERGEABLE:
        raise UserError(f"adapter.type '{run.adapter_type}' adds virtual tokens instead of changing weights and cannot "
                        f"be merged; only {', '.join(MERGEABLE)} adapters can be exported as a merged model")
    if run.quant_bits and not quiet:
        print(f"note: QLoRA run ({run.quant_bits}-bit base in training): merging into the full-precision base, "
              "not into quantized weights")
    base = _load_base(run.base)
    model = load_adapter(base, str(run.final)).eval()
    ids = prompt_ids(tok)
    before = all_logits(model, ids)
    model = model.merge_and_unload().eval()
    rows = compare_logits(before, all_logits(model, ids))
    if not quiet:
        ok = logit_table("merged (float32, in memory) vs adapter model:", rows, MERGE_TOLERANCE["fp32"])
        if not ok:
            raise ParityError("merged model disagrees with the adapter model in float32")
    return model, tok, (before, ids)


def export_merged(run: Run, out: Path, dtype: str = "fp32", overwrite: bool = False) -> Path:
    """Write the merged model (weights in `dtype`) and tokenizer to `out`; verify it against the adapter model."""
    import torch
    from transformers import AutoModelForCausalLM

    from tunelab.models import torch_dtype

    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype} is not supported for merging; choose one of {', '.join(DTYPES)}")
    check_target(out, overwrite, "merged")  # fail before the slow part
    model, tok, ref = merged_model(run)
    model = model.to(torch_dtype(dtype))
    with atomic_path(out, overwrite, "merged") as tmp:
        model.save_pretrained(tmp)  # safetensors (transformers' default)
        tok.save_pretrained(tmp)
        if ref is not None:
            before, ids = ref
            # Read back what was written, upcast to float32: the comparison measures the saved weights, not the
            # precision of the arithmetic used to run them.
            saved = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
            rows = compare_logits(before, all_logits(saved, ids))
            tol = MERGE_TOLERANCE[dtype]
            what = "adapter model" if run.is_adapter else "run's final model"
            if not logit_table(f"merged model as saved ({dtype}, read back) vs {what}:", rows, tol):
                raise ParityError(f"merged {dtype} model drifts from the {what} beyond rel {tol:g}; "
                                       "nothing was written")
    print(f"merged model written to {out}")
    return out
