"""Loss and perplexity on any data the data layer reads, over the tokens training would learn.

Each record is encoded exactly as training encodes it (`data.build.encode_record`: the chat template with the
assistant-only loss mask, or every token of plain text), so the number is comparable with the run's validation loss.
The loss is averaged per token over the whole set (not per sample), which is what perplexity means.
"""

from __future__ import annotations

import math

from tunelab.errors import UserError


def evaluate(model, tok, records: list[dict], *, batch_size: int = 8, max_length: int = 1024,
             show_progress: bool = True) -> dict:
    """{"n", "tokens", "loss", "perplexity"} of `model` on normalized records."""
    import torch

    from tunelab.data.build import encode_record
    from tunelab.data.render import IGNORE
    from tunelab.evaluation.common import progress

    from tunelab.models import context_length

    # no longer than the model's positions: learned ones (GPT-2) fail past them, rotary ones score what they never saw
    max_length = min(max_length, context_length(model.config) or max_length)
    rows, no_reply, cut = [], 0, 0
    for rec in records:
        enc = encode_record(tok, rec, max_length)
        if any(lab != IGNORE for lab in enc.labels[1:]):
            rows.append(enc)
        elif enc.truncated:
            cut += 1  # its reply lies past max_length
        else:
            no_reply += 1
    if not rows:
        raise UserError("perplexity: no sample has tokens to score (conversations need an assistant reply"
                        + (f"; {cut} had theirs past {max_length} tokens" if cut else "") + ")")
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_nll, total_tokens = 0.0, 0
    # Longest first, so similar lengths share a batch and padding stays small.
    rows.sort(key=lambda e: -len(e.input_ids))
    with progress("perplexity", len(rows), show_progress) as advance:
        try:
            for b in range(0, len(rows), batch_size):
                batch = rows[b: b + batch_size]
                width = max(len(e.input_ids) for e in batch)
                ids = torch.full((len(batch), width), pad, dtype=torch.long)
                labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for i, e in enumerate(batch):
                    n = len(e.input_ids)
                    ids[i, :n] = torch.tensor(e.input_ids)
                    labels[i, :n] = torch.tensor(e.labels)
                    mask[i, :n] = 1
                ids, labels, mask = ids.to(device), labels.to(device), mask.to(device)
                with torch.inference_mode():
                    logits = model(input_ids=ids, attention_mask=mask).logits.float()
                # token t is predicted from positions < t
                nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)),
                                                        labels[:, 1:].reshape(-1), ignore_index=IGNORE, reduction="sum")
                total_nll += nll.item()
                total_tokens += int((labels[:, 1:] != IGNORE).sum())
                advance(len(batch))
        finally:
            if was_training:
                model.train()
    loss = total_nll / total_tokens
    skipped = {k: v for k, v in (("no_reply", no_reply), ("reply_past_max_length", cut)) if v}
    return {"n": len(rows), "tokens": total_tokens, "loss": loss,
            "perplexity": math.exp(loss) if loss < 700 else float("inf"), **({"skipped": skipped} if skipped else {}),
            "max_length": max_length}
