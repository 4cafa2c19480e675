"""Shared fixtures: tiny random models built from configs (2 layers, hidden 64) with SmolLM2's real tokenizer.

The tokenizer under tests/assets/tokenizer is SmolLM2-135M-Instruct's (with its chat template), so tests exercise
the real template, EOS and loss-mask logic while the model stays small enough for 2 CPU cores. The tests that read
GGUF files use the same tokenizer cut to 1,024 tokens (`small_vocab_model`), which gguf's reader parses in milliseconds.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

# before transformers (and huggingface_hub, which reads HF_HUB_OFFLINE once, when imported) loads
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from transformers import TrainerCallback  # noqa: E402

ASSETS = Path(__file__).parent / "assets"
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def build_tiny_model(path: Path, arch: str = "llama", seed: int = 0, tokenizer: Path = ASSETS / "tokenizer") -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer)
    cfg = AutoConfig.for_model(
        arch, vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """Directory of a tiny random Llama with SmolLM2's tokenizer and chat template."""
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny-llama")))


def write_small_vocab_tokenizer(path: Path, n: int = 1024) -> Path:
    """SmolLM2's tokenizer cut to its first `n` tokens (the specials, the 256 bytes, the earliest merges) and the
    merges whose parts and result stay inside them: still a byte-level BPE with SmolLM2's specials, chat template and
    pre-tokenizer, so any text tokenizes, in more pieces.

    For the GGUF tests: gguf's reader walks every token and merge of a file in Python, seconds per read for 49,152
    tokens, and an export reads its file back several times (transformers' tokenizer, config and weights); with 1,024
    tokens a read takes milliseconds."""
    tj = json.loads((ASSETS / "tokenizer" / "tokenizer.json").read_text())
    bpe = tj["model"]
    vocab = {t: i for t, i in bpe["vocab"].items() if i < n}
    bpe["vocab"] = vocab
    bpe["merges"] = [[a, b] for a, b in bpe["merges"] if a in vocab and b in vocab and a + b in vocab]
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False))
    for name in ("tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(ASSETS / "tokenizer" / name, path / name)
    return path


@pytest.fixture(scope="session")
def small_vocab_tokenizer(tmp_path_factory) -> Path:
    """Directory of SmolLM2's tokenizer cut to 1,024 tokens (see write_small_vocab_tokenizer)."""
    return write_small_vocab_tokenizer(tmp_path_factory.mktemp("tokenizer-1k"))


@pytest.fixture(scope="session")
def small_vocab_model(tmp_path_factory, small_vocab_tokenizer) -> str:
    """The tiny random Llama of `tiny_model` over the 1,024-token tokenizer: for tests that read GGUF files."""
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny-llama-1k"), tokenizer=small_vocab_tokenizer))


def write_chat(path: Path, pairs, repeat: int = 1) -> str:
    """An OpenAI-messages JSONL of (question, answer) pairs repeated `repeat` times; returns its path."""
    with open(path, "w") as f:
        for i in range(repeat * len(pairs)):
            q, a = pairs[i % len(pairs)]
            f.write(json.dumps({"messages": [{"role": "user", "content": q},
                                             {"role": "assistant", "content": a}]}) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def tiny_chat_data(tmp_path_factory) -> str:
    """A small OpenAI-messages JSONL: the same few short Q/A pairs repeated, so a tiny model can fit them."""
    path = tmp_path_factory.mktemp("data") / "chat.jsonl"
    pairs = [("What is 2+2?", "2+2 = 4.\n#### 4"), ("What is 3+5?", "3+5 = 8.\n#### 8"),
             ("Say hi.", "Hi there!"), ("Name a color.", "Blue.")]
    with open(path, "w") as f:
        for i in range(32):
            q, a = pairs[i % len(pairs)]
            f.write(json.dumps({"messages": [{"role": "user", "content": q},
                                             {"role": "assistant", "content": a}]}) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def embedded_model() -> str:
    """Path of the embedded SmolLM2-135M-Instruct (converted once into the tunelab cache)."""
    from tunelab.models import embedded_path

    return str(embedded_path("smollm2-135m-instruct"))


class StopAt(TrainerCallback):
    """Stops training after `step`, as an interruption would, leaving the checkpoint written at that step."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.step:
            control.should_training_stop = True


def shared_data(rel: str) -> Path:
    p = SHARED_DATA / rel
    if not p.exists():
        pytest.skip(f"../shared/data/{rel} is not present")
    return p


def make_adapter(base: str, path: Path, seed: int) -> str:
    """A LoRA adapter with random non-zero B matrices (a fresh LoRA is a no-op), so it changes the model's answers."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    pm = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                             peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    pm.save_pretrained(path)
    return str(path)
