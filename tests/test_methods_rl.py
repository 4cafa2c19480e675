"""GRPO and PPO on tiny models: a toy reward goes up within a few steps (PPO: KL to the reference stays bounded),
configs are refused with one line when they cannot work, and (marked e2e) GRPO on GSM8K with the embedded model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tunelab import load_config
from tunelab.errors import UserError
from tunelab.train import run_training

WORDS = [" the", " a", " cat", " dog", " red", " blue", " yes", " no"]


TARGET = {"cat", "dog"}


def target_reward(completions, **kwargs):
    """Toy reward: the share of a completion's words that are target words."""
    from tunelab.rewards import completion_text

    words = [completion_text(c).split() for c in completions]
    return [sum(x in TARGET for x in w) / max(len(w), 1) for w in words]


@pytest.fixture(scope="module")
def peaked_model(tmp_path_factory) -> str:
    """A tiny random Llama whose samples concentrate on eight common words (a uniform 49k-token policy would almost
    never say the target word, leaving RL no signal to learn from). Target words are rare at first."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from conftest import ASSETS

    tok = AutoTokenizer.from_pretrained(ASSETS / "tokenizer")
    cfg = AutoConfig.for_model(
        "llama", vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    ids = [tok.convert_tokens_to_ids(tok.tokenize(w))[0] for w in WORDS]
    with torch.no_grad():
        model.get_input_embeddings().weight[ids] = torch.randn(len(ids), 64) * 0.8
    path = tmp_path_factory.mktemp("peaked")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("prompts") / "p.jsonl"
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Say something {i}."},
                                                     {"role": "assistant", "content": "ok"}]}) + "\n"
                            for i in range(16)))
    return str(path)


def write_config(tmp_path, model, data, method, name="run", adapter=None, **training) -> Path:
    cfg = {"model": {"source": model}, "data": {"train": data, "max_length": 64},
           "adapter": adapter or {"type": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
           "method": method,
           "training": {"max_steps": 8, "batch_size": 8, "learning_rate": 2e-2, "save_steps": 100,
                        "precision": "fp32", **training},
           "output": {"dir": str(tmp_path / "runs"), "name": name}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def metrics(summary) -> list[dict]:
    return [json.loads(x) for x in (Path(summary["run"]) / "metrics.jsonl").read_text().splitlines()]


REWARD = f"{__file__}:target_reward"


@pytest.mark.parametrize("adapter", ["lora", "qlora", "full"])
def test_grpo_raises_toy_reward(tmp_path, peaked_model, prompts, adapter):
    method = {"name": "grpo", "rewards": [REWARD], "num_generations": 4, "max_completion_length": 12,
              "beta": 0.04 if adapter == "lora" else 0.0}
    path = write_config(tmp_path, peaked_model, prompts, method,
                        adapter={"type": "none"} if adapter == "full" else None,
                        learning_rate=1e-3 if adapter == "full" else 5e-3)
    extra = ["quantization.bits=4"] if adapter == "qlora" else []
    summary = run_training(load_config(path, extra), show_progress=False)
    assert summary["status"] == "complete"
    rewards = [r["reward"] for r in metrics(summary) if "reward" in r]
    print(f"GRPO ({adapter}) mean reward per step:", [round(x, 3) for x in rewards])
    assert len(rewards) == 8
    assert sum(rewards[-4:]) / 4 > sum(rewards[:2]) / 2 + 0.3, rewards
    if adapter != "full":
        assert (Path(summary["final"]) / "adapter_config.json").is_file()
    if adapter == "lora":
        assert any("kl" in r for r in metrics(summary))
    # every training log says how long sampling took per step (tunelab's rollout), a part of the step's time
    steps = [r for r in metrics(summary) if "loss" in r]
    assert len(steps) == 8 and all(0 < r["rollout_seconds"] < r["elapsed"] for r in steps)


def test_grpo_refuses_bad_batch_and_reward(tmp_path, peaked_model, prompts):
    path = write_config(tmp_path, peaked_model, prompts, {"name": "grpo", "num_generations": 3, "rewards": [REWARD]})
    with pytest.raises(UserError, match="multiple of method.num_generations"):
        run_training(load_config(path), show_progress=False)
    assert not (tmp_path / "runs").exists()  # refused before the run directory is written
    path = write_config(tmp_path, peaked_model, prompts, {"name": "grpo", "rewards": ["gsm8k_corect"]}, name="r2")
    with pytest.raises(UserError, match="did you mean 'gsm8k_correct'"):
        run_training(load_config(path), show_progress=False)
    bad_rm = {"name": "ppo", "rewards": [{"name": "reward_model", "path": str(tmp_path / "nowhere")}]}
    with pytest.raises(UserError, match="not a model directory"):
        run_training(load_config(write_config(tmp_path, peaked_model, prompts, bad_rm, name="r4")),
                     show_progress=False)
    assert not (tmp_path / "runs").exists()
    # these prompts carry no gold answer: every completion would score 0, a run that learns nothing
    no_gold = {"name": "grpo", "num_generations": 4, "rewards": ["gsm8k_correct"]}
    with pytest.raises(UserError, match=r"reward gsm8k_correct needs a usable 'answer' .* 16 of 16 have none"):
        run_training(load_config(write_config(tmp_path, peaked_model, prompts, no_gold, name="r5")),
                     show_progress=False)
    assert not (tmp_path / "runs").exists()
    # a batch is reused num_iterations steps, and a checkpoint inside that window could not resume exactly
    reused = {"name": "grpo", "num_generations": 4, "rewards": [REWARD], "num_iterations": 2}
    with pytest.raises(UserError, match=r"num_iterations=2 .* training.save_steps to a multiple of 2 \(e.g. 4\)"):
        run_training(load_config(write_config(tmp_path, peaked_model, prompts, reused, name="r6", save_steps=3)),
                     show_progress=False)
    assert not (tmp_path / "runs").exists()
    with pytest.raises(UserError, match="num_genrations"):
        load_config(write_config(tmp_path, peaked_model, prompts, {"name": "grpo", "num_genrations": 4}, name="r3"))


@pytest.mark.parametrize("adapter", ["lora", "full"])
def test_ppo_raises_toy_reward_with_bounded_kl(tmp_path, peaked_model, prompts, adapter):
    method = {"name": "ppo", "rewards": [REWARD], "max_completion_length": 12, "kl_coef": 0.05, "ppo_epochs": 2,
              "num_mini_batches": 2}
    path = write_config(tmp_path, peaked_model, prompts, method,
                        adapter={"type": "none"} if adapter == "full" else None,
                        learning_rate=2e-3 if adapter == "lora" else 3e-4, max_steps=8, save_steps=4)
    summary = run_training(load_config(path), show_progress=False)
    assert summary["status"] == "complete"
    logs = [r for r in metrics(summary) if "reward" in r]
    rewards, kls = [r["reward"] for r in logs], [r["kl"] for r in logs]
    print("PPO mean reward per step:", [round(x, 3) for x in rewards], "KL:", [round(x, 2) for x in kls])
    assert sum(rewards[-4:]) / 4 > sum(rewards[:2]) / 2 + 0.3, rewards
    assert max(kls) < 20, kls  # nats per completion: the penalty keeps the policy near the reference
    final = Path(summary["final"])
    assert (final / "value_head.safetensors").is_file()
    assert (Path(summary["run"]) / "checkpoints" / "checkpoint-8" / "value_head.safetensors").is_file()


def stopped_and_resumed(cfg, step: int) -> tuple[dict, dict]:
    """(summary of an uninterrupted run, summary of the same run stopped after `step` and resumed): `cfg(name)` gives
    each run's config."""
    from conftest import StopAt

    full = run_training(cfg("full"), show_progress=False)
    first = run_training(cfg("split"), callbacks=[StopAt(step)], show_progress=False)
    run_dir = Path(first["run"])
    (run_dir / "final").rename(run_dir / "final-half")  # as if the process had been interrupted
    (run_dir / "summary.json").unlink()
    second = run_training(cfg("split"), show_progress=False)
    assert second["resumed_from"].endswith(f"checkpoint-{step}")
    return full, second


def test_ppo_resume_is_exact(tmp_path, peaked_model, prompts):
    """Stopped at step 2 and resumed, PPO continues exactly: policy, value head, optimizer and sampling RNG."""
    method = {"name": "ppo", "rewards": [REWARD], "max_completion_length": 8, "ppo_epochs": 2, "num_mini_batches": 2}

    def cfg(name):
        return load_config(write_config(tmp_path, peaked_model, prompts, method, name=name, learning_rate=2e-3,
                                        max_steps=4, save_steps=2))

    full, second = stopped_and_resumed(cfg, 2)
    a = {r["step"]: (r["loss"], r["reward"]) for r in metrics(full) if "loss" in r}
    b = {r["step"]: (r["loss"], r["reward"]) for r in metrics(second) if "loss" in r}
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert a[step] == pytest.approx(b[step], abs=1e-5), (step, a[step], b[step])


def test_grpo_resume_from_a_checkpoint_continues_the_uninterrupted_run(tmp_path, peaked_model, prompts):
    """Stopped after step 1 and resumed, GRPO logs the rewards, losses and grad norms of an uninterrupted run. Run in
    bf16, where CPU rollouts sample from a bf16 copy of the merged policy built at the process's first rollout: in a
    resumed run that comes after the Trainer restored the sampling RNG. The loss of a single-iteration GRPO step is
    about 0 whatever was sampled, so the grad norm carries the check along with the reward."""
    method = {"name": "grpo", "rewards": [REWARD], "num_generations": 2, "max_completion_length": 8}

    def cfg(name):
        return load_config(write_config(tmp_path, peaked_model, prompts, method, name=name, max_steps=3,
                                        batch_size=4, save_steps=1, precision="bf16"))

    full, second = stopped_and_resumed(cfg, 1)

    def steps(summary):
        return {r["step"]: (r["reward"], r["loss"], r["grad_norm"]) for r in metrics(summary) if "loss" in r}

    a, b = steps(full), steps(second)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in a:
        assert a[step] == pytest.approx(b[step], abs=1e-6), (step, a[step], b[step])


def test_grpo_reusing_batches_resumes_exactly_at_the_end_of_a_group(tmp_path, peaked_model, prompts):
    """num_iterations=2: each generated batch trains two steps. Checkpoints fall at the ends of those groups (save_steps
    a multiple, a Ctrl-C waits for the group's last step), where a resume samples the batch the uninterrupted run
    sampled next."""
    method = {"name": "grpo", "rewards": [REWARD], "num_generations": 2, "max_completion_length": 8,
              "num_iterations": 2}

    def cfg(name):
        return load_config(write_config(tmp_path, peaked_model, prompts, method, name=name, max_steps=4,
                                        batch_size=4, save_steps=2))

    full, second = stopped_and_resumed(cfg, 2)
    # TRL logs the reward of a batch at the step that samples it (1 and 3)
    a = {r["step"]: (r.get("reward"), r["loss"], r["grad_norm"]) for r in metrics(full) if "loss" in r}
    b = {r["step"]: (r.get("reward"), r["loss"], r["grad_norm"]) for r in metrics(second) if "loss" in r}
    assert sorted(a) == sorted(b) == [1, 2, 3, 4] and a[3][0] is not None
    for step in a:
        assert a[step] == pytest.approx(b[step], abs=1e-6), (step, a[step], b[step])
    # a stop asked for in the middle of a group (step 3) waits for its end (step 4)
    from types import SimpleNamespace

    from tunelab.runs import GracefulStop

    stop, control = GracefulStop(every=2), SimpleNamespace(should_save=False, should_training_stop=False)
    stop.requested = True
    stop.on_step_end(None, SimpleNamespace(global_step=3), control)
    assert not control.should_save and not control.should_training_stop
    stop.on_step_end(None, SimpleNamespace(global_step=4), control)
    assert control.should_save and control.should_training_stop


def test_ppo_evaluates_by_reward_and_keeps_the_best(tmp_path, peaked_model, prompts):
    """With validation prompts and eval_steps, PPO logs the mean reward of greedy completions (eval_reward), the
    training entries keep their own metrics, and the best checkpoint follows eval_reward."""
    method = {"name": "ppo", "rewards": [REWARD], "max_completion_length": 12, "kl_coef": 0.05, "ppo_epochs": 2,
              "num_mini_batches": 2}
    path = write_config(tmp_path, peaked_model, prompts, method, learning_rate=3e-4, max_steps=8, save_steps=2,
                        eval_steps=2)
    raw = yaml.safe_load(path.read_text())
    raw["data"]["val_split"] = 0.25
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(UserError, match="eval.metric=eval_reward"):  # eval_loss (the default) is never reported
        run_training(load_config(path), show_progress=False)
    summary = run_training(load_config(path, ["eval.metric=eval_reward"]), show_progress=False)
    assert summary["status"] == "complete"
    evals = {r["step"]: r for r in metrics(summary) if "eval_reward" in r}
    print("PPO eval_reward per eval:", {k: round(v["eval_reward"], 3) for k, v in evals.items()})
    assert sorted(evals) == [2, 4, 6, 8]
    assert all(f"eval_rewards/{target_reward.__name__}" in r and "reward" not in r for r in evals.values())
    assert evals[8]["eval_reward"] > evals[2]["eval_reward"] + 0.2, evals
    assert all("reward" in r and "kl" in r for r in metrics(summary) if "loss" in r)
    best = max(evals.values(), key=lambda r: r["eval_reward"])
    assert summary["best_metric"]["eval_reward"] == pytest.approx(best["eval_reward"])


@pytest.mark.e2e
@pytest.mark.slow  # GRPO on the embedded model: ~2 minutes on 2 cores; the toy-reward tests cover GRPO in make test
def test_grpo_gsm8k_embedded(tmp_path, embedded_model):
    """GRPO on 32 bundled GSM8K questions with the embedded SmolLM2-135M (LoRA), the shipped CPU config shortened:
    4 steps of 2 questions x 4 completions of at most 32 tokens, scored by its rewards; prints the mean reward per
    step (a 135M model rarely solves GSM8K, so the numbers are reported, not asserted to rise)."""
    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "configs" / "gsm8k" / "grpo-cpu.yaml", [
        f"output.dir={tmp_path}", "data.subset=32", "training.max_steps=4",
        "method.max_completion_length=32", "training.save_steps=4"])
    summary = run_training(cfg, show_progress=False)
    assert summary["status"] == "complete" and summary["global_step"] == 4
    logs = [r for r in metrics(summary) if "reward" in r]
    for r in logs:
        print(f"step {r['step']}: mean reward {r['reward']:.3f} (gsm8k_correct "
              f"{r['rewards/gsm8k_correct/mean']:.3f}, format {r['rewards/format/mean']:.3f}), "
              f"completion length {r['completions/mean_length']:.1f}")
    assert len(logs) == 4
    assert all(0.0 <= r["reward"] <= 1.2 for r in logs)
    assert (Path(summary["final"]) / "adapter_config.json").is_file()


def test_bf16_sampler_follows_the_merged_policy(tiny_model):
    """GRPO on CPU with bf16 samples from a plain bf16 copy of the merged policy: its logits match the merged float32
    policy's, it is built once, and it follows the adapter as training changes it."""
    import copy
    from types import SimpleNamespace

    import peft
    import torch
    from transformers import AutoModelForCausalLM

    from tunelab.methods.grpo import bf16_sampler, merged_adapter

    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                                peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    trainer = SimpleNamespace(args=SimpleNamespace(bf16=True))
    ids = torch.tensor([[1, 5, 9, 14, 3, 7]])

    def check():
        with merged_adapter(model) as merged, torch.no_grad():
            assert merged
            sampler = bf16_sampler(trainer, model)
            assert sampler is not model and next(sampler.parameters()).dtype == torch.bfloat16
            want, got = model(input_ids=ids).logits, sampler(input_ids=ids).logits.float()
        # the same weights as PEFT's own merge cast to bf16; logits close to float32 up to bf16 rounding
        reference = copy.deepcopy(model).merge_and_unload().to(torch.bfloat16).state_dict()
        weights = sampler.state_dict()
        assert weights.keys() == reference.keys()
        for key in weights:
            assert torch.equal(weights[key], reference[key]), key
        assert (got - want).abs().max() < 0.15 * want.abs().max(), (got - want).abs().max()
        return sampler, want

    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    first, before = check()
    with torch.no_grad():  # a training step changes the adapter: the next rollout samples from the new policy
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    second, after = check()
    assert second is first and not torch.allclose(before, after)
    assert bf16_sampler(SimpleNamespace(args=SimpleNamespace(bf16=False)), model) is model  # float32 runs sample as is


def test_ppo_writes_its_value_head_from_the_saving_process_only(tmp_path, tiny_model, monkeypatch):
    """The Trainer calls _save on every process of a job and only one writes (`args.should_save`): the value head
    follows that rule. Written by every rank, one rank's temporary file vanished under the other's rename."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

    from tunelab.methods.ppo import Config
    from tunelab.methods.ppo_core import VALUE_HEAD, PPOTrainer

    args = TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none")
    trainer = PPOTrainer(AutoModelForCausalLM.from_pretrained(tiny_model), args, Config(), [target_reward], [1.0],
                         AutoTokenizer.from_pretrained(tiny_model), Dataset.from_list([{"prompt": "Hi."}]))
    trainer._save(str(tmp_path / "writer"))
    assert (tmp_path / "writer" / VALUE_HEAD).is_file()
    monkeypatch.setattr(TrainingArguments, "should_save", property(lambda self: False))  # as on rank 1
    trainer._save(str(tmp_path / "other"))
    assert not (tmp_path / "other").exists()
