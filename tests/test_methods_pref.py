"""Preference methods (DPO, ORPO, SimPO, KTO) and reward-model training, end to end through `run_training`.

Outcome checks on a tiny model: the chosen-minus-rejected log-probability margin on the training pairs rises (DPO,
ORPO, SimPO), KTO's loss falls, a reward model ranks its training pairs above chance and is usable as a GRPO/PPO
reward. One marked test does DPO on real hh-rlhf pairs with the embedded model and checks held-out pairs.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest
from conftest import StopAt
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from tunelab import load_config
from tunelab.errors import UserError
from tunelab.train import run_training

PAIRS = [("Write a greeting.", "Hello, nice to meet you!", "go away"),
         ("Is the earth flat?", "No, it is roughly a sphere.", "Yes."),
         ("What is 2+2?", "2+2 = 4.", "It is 5."),
         ("Name a color.", "Blue.", "Seven.")]


@pytest.fixture(scope="module")
def pref_data(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("pref") / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n"
                            for _ in range(4) for p, c, r in PAIRS))
    return str(path)


@pytest.fixture(scope="module")
def kto_data(tmp_path_factory) -> str:
    """Unpaired KTO rows: more desirable than undesirable, not matched one to one."""
    path = tmp_path_factory.mktemp("kto") / "kto.jsonl"
    rows = [{"prompt": p, "completion": c, "label": True} for p, c, _ in PAIRS] * 3
    rows += [{"prompt": p, "completion": r, "label": False} for p, _, r in PAIRS[:3]] * 2
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def config(tmp_path, model, train, method: dict, name="run", **sections) -> Path:
    cfg = {
        "model": {"source": model},
        "data": {"train": train, "max_length": 96},
        "method": method,
        "adapter": {"type": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
        "training": {"max_steps": 8, "batch_size": 4, "learning_rate": 5e-3, "save_steps": 100, "precision": "fp32"},
        "output": {"dir": str(tmp_path / "runs"), "name": name},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def reply_logprobs(model, tok, items: list[tuple[list[dict], list[dict]]], batch_size: int = 8) -> list[float]:
    """For each (prompt, reply): the sum of the reply's token log-probabilities after the prompt, both rendered with
    the chat template. Sequences are scored in right-padded batches."""
    seqs = []
    for prompt, reply in items:
        context = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template(prompt + reply, tokenize=False)
        seqs.append((len(tok(context, add_special_tokens=False)["input_ids"]),
                     tok(full, add_special_tokens=False)["input_ids"]))
    out = []
    for i in range(0, len(seqs), batch_size):
        chunk = seqs[i:i + batch_size]
        width = max(len(ids) for _, ids in chunk)
        ids = torch.tensor([x + [tok.pad_token_id] * (width - len(x)) for _, x in chunk])
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for _, x in chunk])
        with torch.no_grad():
            logp = model(input_ids=ids, attention_mask=mask).logits.float()[:, :-1].log_softmax(-1)
        token_logp = logp.gather(-1, ids[:, 1:, None])[..., 0]
        for row, (n_ctx, x) in enumerate(chunk):
            out.append(token_logp[row, n_ctx - 1:len(x) - 1].sum().item())
    return out


def mean_margin(model, tok, rows: list[dict], bf16: bool = False) -> float:
    """Mean over pairs of log p(chosen | prompt) - log p(rejected | prompt); `bf16` scores under bfloat16 autocast
    (several times faster on CPUs with AMX, and the same rounding before and after training)."""
    model.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        chosen = reply_logprobs(model, tok, [(r["prompt"], r["chosen"]) for r in rows])
        rejected = reply_logprobs(model, tok, [(r["prompt"], r["rejected"]) for r in rows])
    return sum(c - r for c, r in zip(chosen, rejected)) / len(rows)


def as_rows(pairs) -> list[dict]:
    return [{"prompt": [{"role": "user", "content": p}], "chosen": [{"role": "assistant", "content": c}],
             "rejected": [{"role": "assistant", "content": r}]} for p, c, r in pairs]


def trained_model(base: str, summary: dict):
    """The run's final/ as plain libraries load it: a full model, or the base with the PEFT adapter."""
    final = Path(summary["final"])
    if (final / "adapter_config.json").is_file():
        from peft import PeftModel

        return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), final)
    return AutoModelForCausalLM.from_pretrained(final)


def metric(run: str, key: str) -> list[float]:
    return [r[key] for r in map(json.loads, (Path(run) / "metrics.jsonl").read_text().splitlines()) if key in r]


class Capture(TrainerCallback):
    def on_train_begin(self, args, state, control, model=None, **kw):
        self.adapters = sorted(getattr(model, "peft_config", {}))


@pytest.mark.parametrize("method,kind", [
    ({"name": "dpo"}, "lora"),
    ({"name": "dpo", "loss_type": "ipo", "beta": 0.5}, "qlora"),
    ({"name": "dpo"}, "full"),
    ({"name": "orpo"}, "lora"),
    ({"name": "simpo"}, "lora"),
])
def test_preference_raises_margin(tmp_path, tiny_model, pref_data, method, kind):
    sections = {"full": {"adapter": {"type": "none"}, "training": {"learning_rate": 5e-4}},
                "qlora": {"quantization": {"bits": 4}}, "lora": {}}[kind]
    path = config(tmp_path, tiny_model, pref_data, method, **sections)
    cap = Capture()
    summary = run_training(load_config(path), callbacks=[cap], show_progress=False)
    assert summary["status"] == "complete"
    # 8 steps x 4 pairs, each trained as prompt+chosen and prompt+rejected: counted for every method (ORPO/CPO batches
    # carry no input_ids for the Trainer's own count)
    assert summary["tokens"] > 8 * 4 * 2 * 4 and summary["tokens_per_s"] > 0, summary["tokens"]
    if kind != "full":
        # the reference is the base with the adapter switched off: no frozen adapter copy, none saved in final/
        assert cap.adapters == ["default"]
        assert not (Path(summary["final"]) / "ref").exists()
    tok = AutoTokenizer.from_pretrained(tiny_model)
    before = mean_margin(AutoModelForCausalLM.from_pretrained(tiny_model), tok, as_rows(PAIRS))
    after = mean_margin(trained_model(tiny_model, summary), tok, as_rows(PAIRS))
    print(f"{method['name']}/{kind}: margin {before:.3f} -> {after:.3f}")
    assert after > before + 0.1, (before, after)


def test_kto_unpaired_loss_goes_down(tmp_path, tiny_model, kto_data):
    path = config(tmp_path, tiny_model, kto_data, {"name": "kto", "desirable_weight": 1.0, "undesirable_weight": 1.5},
                  training={"max_steps": 10})
    cap = Capture()
    summary = run_training(load_config(path), callbacks=[cap], show_progress=False)
    assert cap.adapters == ["default"]
    losses = metric(summary["run"], "loss")
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.02, losses


def test_kto_refusals_write_nothing(tmp_path, tiny_model, pref_data, kto_data):
    with pytest.raises(UserError, match="batch_size"):
        run_training(load_config(config(tmp_path, tiny_model, pref_data, {"name": "kto"}, name="b1",
                                        training={"batch_size": 1})), show_progress=False)
    only_good = tmp_path / "good.jsonl"
    only_good.write_text("".join(line + "\n" for line in Path(kto_data).read_text().splitlines()
                                 if json.loads(line)["label"]))
    with pytest.raises(UserError, match="undesirable"):
        run_training(load_config(config(tmp_path, tiny_model, str(only_good), {"name": "kto"}, name="good")),
                     show_progress=False)
    assert not (tmp_path / "runs").exists()  # refused before the run directory is written


def test_validation_dropped_whole_is_refused_before_anything_is_written(tmp_path, tiny_model, pref_data):
    """Every validation pair over data.max_length and dropped: one line naming data.validation, not the Trainer's
    "didn't pass an eval_dataset" traceback after the model has loaded."""
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt": "Tell a story. " * 60, "chosen": "Once.", "rejected": "No."}) + "\n")
    path = config(tmp_path, tiny_model, pref_data, {"name": "dpo"}, data={"validation": str(long), "overlong": "drop"},
                  training={"eval_steps": 4, "save_steps": 4})
    with pytest.raises(UserError, match=r"^data\.validation \(.*long\.jsonl\): no validation sample is left"):
        run_training(load_config(path), show_progress=False)
    assert not (tmp_path / "runs").exists()


def test_method_options_are_checked(tmp_path, tiny_model, pref_data):
    with pytest.raises(UserError, match="method.betta"):
        load_config(config(tmp_path, tiny_model, pref_data, {"name": "dpo", "betta": 0.1}))
    with pytest.raises(UserError, match="loss_type"):
        load_config(config(tmp_path, tiny_model, pref_data, {"name": "dpo", "loss_type": "sigmod"}))
    with pytest.raises(UserError, match="one weight per loss type"):
        run_training(load_config(config(tmp_path, tiny_model, pref_data, name="w",
                                        method={"name": "dpo", "loss_type": ["sigmoid", "sft"],
                                                "loss_weights": [1.0]})), show_progress=False)


def test_reward_model_ranks_pairs_and_serves_as_reward(tmp_path, tiny_model, pref_data):
    path = config(tmp_path, tiny_model, pref_data, {"name": "reward"}, data={"val_split": 0.25})
    summary = run_training(load_config(path), show_progress=False)
    # pairwise accuracy on the held-out pairs is reported after the last step
    assert metric(summary["run"], "eval_accuracy"), "no validation accuracy in metrics.jsonl"
    from tunelab.rewards import reward_model

    score = reward_model(summary["final"])  # final/ is a standalone sequence-classification model
    rows = as_rows(PAIRS)
    chosen = score([r["chosen"] for r in rows], prompts=[r["prompt"] for r in rows])
    rejected = score([r["rejected"] for r in rows], prompts=[r["prompt"] for r in rows])
    accuracy = sum(c > r for c, r in zip(chosen, rejected)) / len(rows)
    print(f"reward model pairwise accuracy on its training pairs: {accuracy:.2f}")
    assert accuracy > 0.5


@pytest.mark.e2e
@pytest.mark.shared
@pytest.mark.outcome  # a recipe's outcome on real data: 5-15 minutes on 2 cores, run by make test-outcomes
def test_dpo_on_hh_rlhf_raises_held_out_margin(tmp_path, embedded_model):
    from conftest import shared_data

    from tunelab.data.build import prepare_preference
    from tunelab.models import bf16_supported

    hh = shared_data("hh-rlhf/harmless-base-test.jsonl.gz")
    path = config(tmp_path, embedded_model, str(hh), {"name": "dpo", "beta": 0.1}, name="hh",
                  data={"subset": 340, "val_split": 1 / 3, "max_length": 256, "overlong": "drop",
                        "on_invalid": "skip"},
                  adapter={"r": 16, "alpha": 32}, training={"max_steps": -1, "epochs": 1, "batch_size": 4,
                                                            "learning_rate": 2e-4, "precision": "auto"})
    cfg = load_config(path)
    tok = AutoTokenizer.from_pretrained(embedded_model)
    train, held_out, _ = prepare_preference(cfg.data, tok)  # the run's own split: held-out pairs are never trained
    bf16 = bf16_supported()  # score as the run trains: bf16 autocast where the CPU/GPU has it
    before = mean_margin(AutoModelForCausalLM.from_pretrained(embedded_model), tok, held_out, bf16=bf16)
    t0 = time.time()
    summary = run_training(cfg, show_progress=False)
    seconds = time.time() - t0
    after = mean_margin(trained_model(embedded_model, summary), tok, held_out, bf16=bf16)
    print(f"DPO on {len(train)} hh-rlhf pairs ({seconds:.0f}s, {summary['precision']}): mean log-prob margin "
          f"(chosen - rejected) over {len(held_out)} held-out pairs {before:.3f} -> {after:.3f}")
    assert after > before


class Batches(TrainerCallback):
    """The padded width of each batch of one pass over the training data, as the run's own data loader draws it."""

    def on_train_begin(self, args, state, control, train_dataloader=None, **kw):
        self.loader = train_dataloader
        self.widths = [max(v.shape[1] for k, v in b.items() if k.endswith("input_ids")) for b in train_dataloader]


@pytest.mark.parametrize("method", ["dpo", "orpo", "simpo", "reward"])
def test_pairs_are_grouped_by_length_longest_batch_first(tmp_path, tiny_model, method):
    """training.group_by_length (the default) groups pairs too: each pair's length is what its trainer pads it to
    alone, the batch holding the longest pair comes first (a run out of memory fails at step 1) and an epoch pads far
    less than pairs drawn at random (the estimate's padded_length), which the estimate then counts (grouped_length)."""
    from tunelab.estimate import grouped_length, padded_length

    rng = random.Random(0)
    path = tmp_path / "varied.jsonl"  # replies of 1 to 100 words: batches drawn at random pad to their longest
    words = [rng.randint(1, 100) for _ in range(64)]
    path.write_text("".join(json.dumps({"prompt": f"Say something {i}.", "chosen": "yes " * n,
                                        "rejected": "no " * max(1, n - 3)}) + "\n" for i, n in enumerate(words)))
    batches = Batches()
    path = config(tmp_path, tiny_model, str(path), {"name": method}, data={"max_length": 256},
                  training={"max_steps": 2})
    summary = run_training(load_config(path), callbacks=[batches], show_progress=False)
    assert summary["status"] == "complete"
    dataset, collate = batches.loader.dataset, batches.loader.collate_fn
    lengths = dataset["length"]
    for i in range(len(dataset)):
        alone = collate([dataset[i]])
        assert max(v.shape[1] for k, v in alone.items() if k.endswith("input_ids")) == lengths[i]
    assert batches.widths[0] == max(lengths) == max(batches.widths)
    grouped, drawn = sum(batches.widths) * 4 / len(dataset), padded_length(lengths, 4)
    mean = sum(lengths) / len(lengths)
    print(f"{method}: a pair pads to {grouped:.1f} tokens grouped, {drawn:.1f} drawn at random (mean {mean:.1f})")
    assert grouped - mean < 0.5 * (drawn - mean)  # the padding, not the tokens, is what grouping saves
    assert grouped == pytest.approx(grouped_length(lengths, 4, 1), rel=0.15)


def test_dpo_resume_continues_the_same_curve(tmp_path, tiny_model, pref_data):
    """The adapter-disabled reference survives a resume: the interrupted run's losses match an uninterrupted one."""
    sections = {"training": {"max_steps": 6, "save_steps": 3}}
    full = run_training(load_config(config(tmp_path, tiny_model, pref_data, {"name": "dpo"}, "full", **sections)),
                        show_progress=False)
    path = config(tmp_path, tiny_model, pref_data, {"name": "dpo"}, "split", **sections)
    first = run_training(load_config(path), callbacks=[StopAt(3)], show_progress=False)
    run_dir = Path(first["run"])
    (run_dir / "final").rename(run_dir / "final-half")  # as if the process had been interrupted
    (run_dir / "summary.json").unlink()
    second = run_training(load_config(path), show_progress=False)
    assert second["resumed_from"].endswith("checkpoint-3")
    a, b = metric(full["run"], "loss"), metric(second["run"], "loss")
    assert len(a) == len(b) == 6
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5, (a, b)


class Scores(TrainerCallback):
    """The trained reward model's scores of a few texts at the end of training, as the run computed them."""

    def __init__(self, tokenizer, texts):
        self.tok, self.texts = tokenizer, texts

    def on_train_end(self, args, state, control, model=None, **kw):
        with torch.no_grad():
            self.scores = model(**self.tok(self.texts, return_tensors="pt", padding=True)).logits[:, 0].float()


def test_qlora_reward_model_final_scores_as_trained(tmp_path, tiny_model, pref_data):
    """A QLoRA reward model's final/ is the adapter merged into the de-quantized, full-precision base: plain
    transformers scores with it as the run scored in training (an adapter merged into the 4-bit weights and
    re-quantized moves these scores by 0.02-0.06, past the tolerance), and it serves as a reward."""
    from transformers import AutoModelForSequenceClassification

    from tunelab.rewards import reward_model

    texts = ["Hello, nice to meet you!", "It is 5.", "No, it is roughly a sphere."]
    tok = AutoTokenizer.from_pretrained(tiny_model)
    captured = Scores(tok, texts)
    path = config(tmp_path, tiny_model, pref_data, {"name": "reward"}, quantization={"bits": 4})
    summary = run_training(load_config(path), callbacks=[captured], show_progress=False)
    final = Path(summary["final"])
    assert "quantization_config" not in json.loads((final / "config.json").read_text())
    saved = AutoModelForSequenceClassification.from_pretrained(final).eval()
    with torch.no_grad():
        scores = saved(**tok(texts, return_tensors="pt", padding=True)).logits[:, 0].float()
    print("in training:", captured.scores.tolist(), "final/:", scores.tolist())
    torch.testing.assert_close(scores, captured.scores, atol=5e-3, rtol=0)
    assert len(reward_model(str(final))([r["chosen"] for r in as_rows(PAIRS)],
                                        prompts=[r["prompt"] for r in as_rows(PAIRS)])) == len(PAIRS)


def test_reward_model_that_cannot_score_is_refused_before_the_run(tmp_path, tiny_model):
    """A reward model that loads but fails in its forward (a 4-bit model computing in float32 with a bfloat16 head)
    is one line before a GRPO run directory is written, not a traceback at
    step 1."""
    from transformers import AutoModelForSequenceClassification, BitsAndBytesConfig

    rm = tmp_path / "rm"
    model = AutoModelForSequenceClassification.from_pretrained(
        tiny_model, num_labels=1, dtype=torch.float32,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32))
    model.score.to(torch.bfloat16)
    model.save_pretrained(rm)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(rm)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": p}]}) + "\n" for p, _, _ in PAIRS))
    path = config(tmp_path, tiny_model, str(prompts), {"name": "grpo", "num_generations": 4,
                                                       "rewards": [{"name": "reward_model", "path": str(rm)}]})
    with pytest.raises(UserError, match=r"^reward_model: .*rm loads but cannot score a sample"):
        run_training(load_config(path), show_progress=False)
    assert not (tmp_path / "runs").exists()
