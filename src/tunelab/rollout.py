"""Prompt batches for generation, shared by the RL methods (GRPO, PPO), sequence distillation and the inference
engine: chat prompts rendered with the generation prompt, left padding so that every prompt ends where its reply
starts, and the token ids a reply stops on.
"""

from __future__ import annotations

# End-of-turn tokens of the common chat templates (ChatML, Llama 3, Phi-3, Gemma): a reply ends on them even where
# the tokenizer's EOS is another token.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")


def prompt_texts(tok, prompts: list, **chat_template_kwargs) -> list[str]:
    """Conversations (lists of messages) rendered with the generation prompt; plain strings stay as they are."""
    return [tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True, **chat_template_kwargs)
            if isinstance(p, list) else p for p in prompts]


def left_pad(ids: list[list[int]], pad: int | None, device):
    """(input_ids, attention_mask) of token id lists left-padded into one batch.

    Padding is done here rather than by the tokenizer (`padding=True`): that call reconfigures the shared fast
    tokenizer, which races with other threads using it (the server tokenizes while another request generates).
    """
    import torch

    width = max(len(x) for x in ids)
    pad = 0 if pad is None else pad
    input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=device)
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)
    return input_ids, mask


def stop_token_ids(tok, model) -> list[int]:
    """Every id a reply may end on: the tokenizer's and the generation config's EOS, and a known end-of-turn token."""
    ids = set()
    for src in (tok.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, list):
            ids.update(src)
    for special in END_OF_TURN_TOKENS:
        tid = tok.convert_tokens_to_ids(special)
        if isinstance(tid, int) and tid != tok.unk_token_id and tid is not None and tid >= 0:
            ids.add(tid)
    return sorted(ids)


def end_of_turn_id(tok) -> int:
    """The token that closes an assistant turn: the template's end-of-turn token where it has one, else EOS."""
    for special in END_OF_TURN_TOKENS:
        tid = tok.convert_tokens_to_ids(special)
        if isinstance(tid, int) and tid is not None and tid >= 0 and tid != tok.unk_token_id:
            return tid
    return tok.eos_token_id
