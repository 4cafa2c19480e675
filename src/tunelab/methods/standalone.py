"""final/ as a standalone transformers model: the trained adapter merged into full-precision weights.

A method whose final/ cannot be an adapter over `model.source` (a reward model, read by plain
AutoModelForSequenceClassification; a distilled student cut from the teacher's layers, whose base exists nowhere on
disk) declares it (Method.merges_final), and train.py saves the merged model. Over a quantized base (QLoRA) PEFT's
own merge adds the adapter into the 4-bit weights and re-quantizes the sum, which loses most of what the adapter
learned and leaves a model that needs bitsandbytes to load; so the base is de-quantized first and the adapter merged
into that, as `tunelab export --to merged` does from a run's files. Checkpoints keep the adapter alone, so resuming
works as for every other run.
"""

from __future__ import annotations


def restore_head_dtype(model) -> None:
    """Put fully trained copies of modules (PEFT's modules_to_save: a reward model's score head) back in the dtype of
    the module they replace. TRL's trainers cast every trainable parameter of a quantized model to bfloat16 (the QLoRA
    paper's adapter dtype), the head included; a bfloat16 head after float32 hidden states fails in any forward that
    runs without autocast (float32 precision, and the saved model read back by plain transformers). LoRA layers cast
    their input to their own dtype, so the adapter weights can stay as TRL left them."""
    from peft.utils import ModulesToSaveWrapper

    for wrapper in model.modules():
        if isinstance(wrapper, ModulesToSaveWrapper):
            dtype = next(wrapper.original_module.parameters()).dtype
            for copy in wrapper.modules_to_save.values():
                copy.to(dtype)


def standalone_model(model):
    """A PeftModel -> the plain transformers model with its active adapter merged in (any other model: itself).
    The model passed in is used up: its layers are unwrapped, and de-quantized when the base was quantized."""
    import peft

    if not isinstance(model, peft.PeftModel):
        return model
    if not getattr(model.get_base_model(), "is_quantized", False):
        return model.merge_and_unload()
    config = model.peft_config[model.active_adapter]
    trained = peft.get_peft_model_state_dict(model, adapter_name=model.active_adapter)
    base = model.unload()  # the quantized base with the trained head (modules_to_save) in place
    dtype = base.get_input_embeddings().weight.dtype  # the dtype the base computes in (float32 on CPU, QLoRA)
    base = base.dequantize(dtype=dtype)
    merged = peft.get_peft_model(base, config)
    peft.set_peft_model_state_dict(merged, trained)
    return merged.merge_and_unload()
