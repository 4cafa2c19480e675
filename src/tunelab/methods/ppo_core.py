"""The PPO loop behind methods/ppo.py, kept apart so that the method file reads as the others do (what, options, build).

`PPOTrainer` is a transformers Trainer: each training step takes a batch of prompts, samples one completion per
prompt, scores it, computes GAE advantages, and runs `ppo_epochs x num_mini_batches` clipped updates; every update
but the last is stepped here, the last one by the Trainer's own loop (so gradient clipping, the LR schedule,
checkpoints, resume and logging are the Trainer's). The value head is a linear layer on the policy's last hidden
state; it is trained with the policy, and saved next to the model as value_head.safetensors (checkpoints and final).
Equations follow Schulman et al. 2017 and "The N+ Implementation Details of RLHF with PPO" (Huang et al. 2024):
per-token reward r_t = -kl_coef * (log pi(a_t) - log pi_ref(a_t)), plus the score at the last completion token;
advantages whitened over the batch; value loss 0.5 * max((V - R)^2, (V_clip - R)^2).

On several processes (DDP) each process rolls out its own share of the prompts with its own sampling seed (as TRL's
GRPO does), whitens over its own batch (as TRL's PPO did), and the policy's and the value head's gradients are
averaged by DDP; the logged metrics are the means over every process.
"""

from __future__ import annotations

import copy
import os
from collections import defaultdict

import torch
import torch.nn.functional as F
from transformers import Trainer

from tunelab.rollout import left_pad, prompt_texts, stop_token_ids

VALUE_HEAD = "value_head.safetensors"


def masked_mean(x, mask):
    return (x * mask).sum() / mask.sum().clamp_min(1)


def masked_whiten(x, mask, shift_mean=True):
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return out if shift_mean else out + mean


def gae(rewards, values, mask, gamma: float, lam: float):
    """Generalized advantage estimation over completion tokens (positions past the end have mask 0)."""
    adv = torch.zeros_like(rewards)
    last = torch.zeros(rewards.shape[0], device=rewards.device)
    for t in reversed(range(rewards.shape[1])):
        next_v = values[:, t + 1] * mask[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        adv[:, t] = last
    return adv, adv + values


class PPOTrainer(Trainer):
    def __init__(self, model, args, opts, reward_funcs, reward_weights, tokenizer, train_dataset, eval_dataset=None):
        from accelerate.utils import set_seed
        from peft import PeftModel

        super().__init__(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=tokenizer,
                         data_collator=lambda rows: rows)  # prompts stay messages; the step tokenizes them
        self.opts, self.reward_funcs, self.reward_weights = opts, reward_funcs, reward_weights
        from trl.trainer.utils import disable_dropout_in_model

        self.is_peft = isinstance(model, PeftModel)
        disable_dropout_in_model(model)  # rollout and update log-probs must come from the same function
        # Full fine-tuning needs the starting weights as reference; with an adapter, disabling it gives the base.
        self.ref_model = None if self.is_peft else copy.deepcopy(model).eval().requires_grad_(False)
        hidden = model.config.get_text_config().hidden_size
        self.value_head = torch.nn.Linear(hidden, 1).to(model.device)
        torch.nn.init.zeros_(self.value_head.weight)  # start at V = 0: early advantages are the rewards themselves
        torch.nn.init.zeros_(self.value_head.bias)
        self.value_head_ddp = self.value_head
        if self.accelerator.num_processes > 1:
            from torch.nn.parallel import DistributedDataParallel

            # its gradients averaged like the policy's. Wrapped with torch's DDP rather than accelerator.prepare,
            # which would also run it under autocast: one process and several compute the same values.
            device = self.value_head.weight.device
            self.value_head_ddp = DistributedDataParallel(self.value_head,
                                                          device_ids=[device] if device.type != "cpu" else None)
            # every process its own sampling seed, or all would draw the same random numbers for their completions
            # (a resumed run restores each process's own RNG state from the checkpoint)
            set_seed(args.seed, device_specific=True)
        self.stop_ids = stop_token_ids(tokenizer, model)
        self._metrics = defaultdict(list)

    # -- optimizer, checkpoints: the value head travels with the policy -------------------------------------------
    def create_optimizer(self, model=None):
        opt = super().create_optimizer(model)
        if not any(p is self.value_head.weight for g in opt.param_groups for p in g["params"]):
            opt.add_param_group({"params": list(self.value_head.parameters()), "weight_decay": 0.0})
        return opt

    def _save(self, output_dir=None, state_dict=None):
        from safetensors.torch import save_file

        super()._save(output_dir, state_dict)
        if not self.args.should_save:  # the Trainer calls this on every process; one writes
            return
        out = output_dir or self.args.output_dir
        save_file({k: v.detach().cpu().contiguous() for k, v in self.value_head.state_dict().items()},
                  os.path.join(out, VALUE_HEAD))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        from safetensors.torch import load_file

        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = os.path.join(resume_from_checkpoint, VALUE_HEAD)
        if os.path.isfile(path):
            self.value_head.load_state_dict(load_file(path, device=str(self.value_head.weight.device)))

    # -- rollout ---------------------------------------------------------------------------------------------------
    def _forward(self, model, ids, mask, prompt_len):
        """Log-probs of the completion tokens (at the sampling temperature) and the last hidden states before them."""
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, output_hidden_states=True)
        logits = out.logits[:, prompt_len - 1:-1].float() / self.opts.temperature
        logp = torch.gather(F.log_softmax(logits, -1), 2, ids[:, prompt_len:, None]).squeeze(-1)
        return logp, out.hidden_states[-1][:, prompt_len - 1:-1], logits

    def _values(self, hidden):
        return self.value_head_ddp(hidden.to(self.value_head.weight.dtype)).squeeze(-1)

    @torch.no_grad()
    def sample_and_score(self, model, rows, greedy: bool = False, prefix: str = ""):
        """Sample one completion per prompt and score it with the reward functions (metrics logged under `prefix`).
        Returns prompt+completion ids and mask, the prompt width, the completion mask, which ended, and the score."""
        tok, o = self.processing_class, self.opts
        texts = prompt_texts(tok, [r["prompt"] for r in rows])
        enc = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        pad = tok.pad_token_id
        p_ids, p_mask = left_pad(enc, pad, model.device)
        width = p_ids.shape[1]
        model.eval()
        sampling = (dict(do_sample=False) if greedy else
                    dict(do_sample=True, temperature=o.temperature, top_p=o.top_p, top_k=0))
        out = model.generate(input_ids=p_ids, attention_mask=p_mask, max_new_tokens=o.max_completion_length,
                             eos_token_id=self.stop_ids, pad_token_id=pad, use_cache=True, **sampling)
        comp = out[:, width:]
        is_stop = torch.isin(comp, torch.tensor(self.stop_ids, device=comp.device))
        ended = is_stop.any(1)
        end = torch.where(ended, is_stop.int().argmax(1), torch.full_like(ended, comp.shape[1], dtype=torch.long))
        c_mask = (torch.arange(comp.shape[1], device=comp.device)[None] <= end[:, None]).long()
        comp = torch.where(c_mask.bool(), comp, torch.full_like(comp, pad))

        completions = [[{"role": "assistant", "content": tok.decode(c[m.bool()], skip_special_tokens=True)}]
                       for c, m in zip(comp, c_mask)]
        if not isinstance(rows[0]["prompt"], list):
            completions = [c[0]["content"] for c in completions]
        extra = {k: [r[k] for r in rows] for k in rows[0] if k != "prompt"}
        prompts = [r["prompt"] for r in rows]
        score = torch.zeros(len(rows), device=model.device)
        for f, w in zip(self.reward_funcs, self.reward_weights):
            vals = torch.tensor([float("nan") if v is None else v for v in
                                 f(prompts=prompts, completions=completions, **extra)], device=model.device)
            self._metrics[f"{prefix}rewards/{f.__name__}"].append(vals.nanmean().item())
            score += w * torch.nan_to_num(vals)
        self._metrics[f"{prefix}reward"].append(score.mean().item())
        self._metrics[f"{prefix}completions/mean_length"].append(c_mask.sum(1).float().mean().item())
        return torch.cat([p_ids, comp], 1), torch.cat([p_mask, c_mask], 1), width, c_mask, ended, score

    @torch.no_grad()
    def rollout(self, model, rows):
        """`model`: the policy as the Trainer holds it; generation and the no-grad forwards use the module itself
        (generate() and disable_adapter() are not on a DDP wrapper, which only the update's backward needs)."""
        o = self.opts
        model = self.accelerator.unwrap_model(model)
        ids, mask, width, c_mask, ended, score = self.sample_and_score(model, rows)
        if o.missing_eos_penalty is not None:
            score = score - o.missing_eos_penalty * (~ended).float()

        logp, hidden, _ = self._forward(model, ids, mask, width)
        values = self._values(hidden)
        model.train()
        if self.is_peft:
            with model.disable_adapter():
                ref_logp, _, _ = self._forward(model, ids, mask, width)
        else:
            ref_logp, _, _ = self._forward(self.ref_model, ids, mask, width)
        c_mask = c_mask.float()
        kl = (logp - ref_logp) * c_mask
        rewards = -o.kl_coef * kl
        if o.whiten_rewards:
            score = (score - score.mean()) / (score.std() + 1e-8) if len(score) > 1 else score
        last = (c_mask.sum(1).long() - 1).clamp_min(0)
        rewards[torch.arange(len(rows)), last] += score
        values = values * c_mask
        adv, returns = gae(rewards, values, c_mask, o.gamma, o.lam)
        adv = masked_whiten(adv, c_mask)
        self._metrics["kl"].append(kl.sum(1).mean().item())
        self.state.num_input_tokens_seen += int(self.accelerator.reduce(mask.sum(), "sum"))  # every process
        return dict(ids=ids, mask=mask, c_mask=c_mask, prompt_len=width, logp=logp, values=values, adv=adv,
                    returns=returns)

    # -- update ----------------------------------------------------------------------------------------------------
    def ppo_loss(self, model, b):
        o = self.opts
        logp, hidden, logits = self._forward(model, b["ids"], b["mask"], b["prompt_len"])
        v = self._values(hidden)
        m = b["c_mask"]
        ratio = torch.exp(logp - b["logp"])
        pg = torch.max(-b["adv"] * ratio, -b["adv"] * ratio.clamp(1 - o.clip_range, 1 + o.clip_range))
        v_clip = b["values"] + (v - b["values"]).clamp(-o.clip_range_value, o.clip_range_value)
        vf = 0.5 * torch.max((v - b["returns"]) ** 2, (v_clip - b["returns"]) ** 2)
        pg_loss, vf_loss = masked_mean(pg, m), masked_mean(vf, m)
        with torch.no_grad():
            self._metrics["policy_loss"].append(pg_loss.item())
            self._metrics["value_loss"].append(vf_loss.item())
            self._metrics["clipfrac"].append(masked_mean(((ratio - 1).abs() > o.clip_range).float(), m).item())
            ent = -(F.softmax(logits, -1) * F.log_softmax(logits, -1)).sum(-1)
            self._metrics["entropy"].append(masked_mean(ent, m).item())
        return pg_loss + o.vf_coef * vf_loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        o = self.opts
        batch = self.rollout(model, inputs)
        n = len(inputs)
        size = n // o.num_mini_batches
        # The Trainer zeroes and clips the policy's gradients only: the value head's are handled here, clipped on
        # their own so that every update (stepped here or by the Trainer) treats both parts alike.
        self.value_head.zero_grad(set_to_none=True)
        updates, total = o.ppo_epochs * o.num_mini_batches, 0.0
        for epoch in range(o.ppo_epochs):
            perm = torch.randperm(n).to(batch["ids"].device)  # a fresh mini-batch split every epoch
            for k in range(o.num_mini_batches):
                idx = perm[k * size:(k + 1) * size]
                mb = {key: (v[idx] if torch.is_tensor(v) else v) for key, v in batch.items()}
                with self.compute_loss_context_manager():
                    loss = self.ppo_loss(model, mb)
                self.accelerator.backward(loss)
                total += loss.item()
                if self.args.max_grad_norm:
                    self.accelerator.clip_grad_norm_(self.value_head.parameters(), self.args.max_grad_norm)
                if (epoch, k) != (o.ppo_epochs - 1, o.num_mini_batches - 1):  # the Trainer steps after the last
                    if self.args.max_grad_norm:
                        self.accelerator.clip_grad_norm_(model.parameters(), self.args.max_grad_norm)
                    self.optimizer.step()
                    self.optimizer.zero_grad()
        return torch.tensor(total / updates, device=self.args.device)

    def log(self, logs, start_time=None):
        if self._metrics:
            logs = {**logs, **self._process_means({k: sum(v) / len(v) for k, v in self._metrics.items() if v})}
            self._metrics.clear()
        super().log(logs, start_time)

    def _process_means(self, metrics: dict) -> dict:
        """The mean of each metric over every process (every process logs the same keys: same rewards, same
        steps); each process's batch has the same size, so a mean of means is the mean over all rollouts."""
        if self.accelerator.num_processes == 1 or not metrics:
            return metrics
        keys = sorted(metrics)
        values = torch.tensor([float(metrics[k]) for k in keys], device=self.args.device)
        return dict(zip(keys, self.accelerator.reduce(values, "mean").tolist()))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        raise NotImplementedError("PPO computes its loss in training_step")

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        """Mean reward of greedy completions on the validation prompts (PPO has no evaluation loss). Greedy decoding
        draws no random numbers, so evaluating does not change the training run's sampling (exact resume holds).
        On several processes each scores its own share of the prompts and the means are over all of them."""
        rows = list(eval_dataset if eval_dataset is not None else self.eval_dataset)
        rows = rows[self.accelerator.process_index::self.accelerator.num_processes]
        size = self.args.per_device_eval_batch_size
        model = self.model
        was_training = model.training
        prefix = metric_key_prefix + "_"
        for i in range(0, len(rows), size):
            self.sample_and_score(model, rows[i:i + size], greedy=True, prefix=prefix)
        model.train(was_training)
        # batch means weighted by batch size, summed over the processes: the mean over all prompts
        counts = [len(rows[i:i + size]) for i in range(0, len(rows), size)]
        sums = {k: sum(v * n for v, n in zip(vals, counts))
                for k in list(self._metrics) if k.startswith(prefix) for vals in [self._metrics.pop(k)]}
        keys = [f"{prefix}reward", f"{prefix}completions/mean_length",
                *(f"{prefix}rewards/{f.__name__}" for f in self.reward_funcs)]
        totals = torch.tensor([sums.get(k, 0.0) for k in keys] + [float(len(rows))], device=self.args.device)
        if self.accelerator.num_processes > 1:
            totals = self.accelerator.reduce(totals, "sum")
        metrics = {k: (totals[i] / totals[-1]).item() for i, k in enumerate(keys)}
        super().log(metrics)  # not self.log: that flushes the training metrics gathered since the last log
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def prediction_step(self, *args, **kwargs):
        raise NotImplementedError("PPO evaluates by reward (evaluate), not by a loss")
