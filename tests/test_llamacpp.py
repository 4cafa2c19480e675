"""llama.cpp as the export's second check: the greedy comparison (unit tests on token sequences, no llama.cpp needed),
and, where llama-cpp-python is installed (`pytest -m llamacpp`), real GGUF files: one that stops on its end-of-turn
token as transformers does, one that does not declare that token and never stops, and a K-quant export whose
llama.cpp log stays out of the terminal while a summary of what was made is printed."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from tunelab.export.llamacpp import compare_greedy

from conftest import ASSETS

HAS_LLAMACPP = importlib.util.find_spec("llama_cpp") is not None
needs_llamacpp = pytest.mark.skipif(not HAS_LLAMACPP, reason="llama-cpp-python is not installed: "
                                    "pip install -e '.[llamacpp]' then pytest -m llamacpp")

EOT = 2  # the end-of-turn token's id in the sequences below
A, B, C = 500, 501, 502


# ---- the comparison, on token sequences ----------------------------------------------------------------------------

def test_identical_output_agrees_fully_stop_token_included():
    """transformers returns the stop token, llama.cpp stops on it: the same span on both sides, all of it agreeing."""
    check = compare_greedy([A, B, EOT], [A, B, EOT], True, {EOT}, gated=True)
    assert check.ok and (check.agree, check.total) == (3, 3)
    assert "both stop" in check.note


def test_never_stopping_output_fails_even_for_4bit_types():
    never = [A, B, EOT, A, B, EOT, A, B, EOT, A, B, EOT, A, B, EOT, A]  # the end-of-turn token comes, nothing stops
    for gated in (True, False):
        check = compare_greedy([A, B, EOT], never, False, {EOT}, gated=gated)
        assert not check.ok and "does not stop" in check.note
    # the stop token reached at the very end of the budget but not treated as a stop is no better
    assert not compare_greedy([A, B, EOT], [A, B, EOT], False, {EOT}, gated=True).ok


def test_llamacpp_stopping_where_transformers_goes_on_fails():
    check = compare_greedy([A, B, C, A], [A, B], True, {EOT}, gated=True)
    assert not check.ok and "transformers goes on" in check.note


def test_drift_after_the_first_token_is_reported_not_gated():
    # a near-tie flips the second token; from there the two continue from different text and may stop elsewhere
    check = compare_greedy([A, B, EOT], [A, C, C, C, C], False, {EOT}, gated=True)
    assert check.ok and (check.agree, check.total) == (1, 5)
    first = compare_greedy([A, B, EOT], [C, B, EOT], True, {EOT}, gated=True)
    assert not first.ok and "first token differs" in first.note
    assert compare_greedy([A, B, EOT], [C, B, EOT], True, {EOT}, gated=False).ok  # 4-bit: first token reported only


def test_a_first_token_within_the_types_tolerance_is_a_near_tie_not_a_failure():
    import torch

    from tunelab.export.llamacpp import near_tie

    logits = torch.zeros(600)
    logits[A], logits[C], logits[B] = 4.0, 3.99, 1.0  # std ~0.23: C is 0.01 below A, B 3.0 below
    assert near_tie(logits, A, C, 0.08) and not near_tie(logits, A, C, 1e-4)
    assert not near_tie(logits, A, B, 0.08)
    tie = compare_greedy([A, B, EOT], [C, B, EOT], True, {EOT}, gated=True, tie=True)
    assert tie.ok and "near-tie" in tie.note
    # a near-tie does not excuse a GGUF that never stops
    assert not compare_greedy([A, B, EOT], [A, B, EOT, A], False, {EOT}, gated=True, tie=True).ok


def test_neither_stopping_within_the_limit_passes():
    seq = [A, B, C] * 5 + [A]
    check = compare_greedy(seq, list(seq), False, {EOT}, gated=True)
    assert check.ok and check.agree == check.total == 16 and "neither stops" in check.note


# ---- real GGUF files through llama.cpp -----------------------------------------------------------------------------

END = "<|end_of_answer|>"  # an end-of-turn token llama.cpp does not recognise by its text (unlike <|im_end|>)


def _answering_model():
    """A tiny Llama that answers any prompt with two fixed tokens and then its end-of-turn token END.

    Attention and MLP outputs are zero, so the next token depends on the current one alone: one-hot embeddings and a
    hand-set head make every token lead to A, A to B, and B to END (logit 8 against 0 for every other token)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    tok = AutoTokenizer.from_pretrained(ASSETS / "tokenizer")
    tok.add_special_tokens({"eos_token": END})
    tok.chat_template = tok.chat_template.replace("<|im_end|>", END)
    end = tok.convert_tokens_to_ids(END)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=tok.bos_token_id, eos_token_id=end, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb, head = model.model.embed_tokens.weight, model.lm_head.weight
        emb.zero_()
        emb[:, 0] = 1.0
        emb[A] = torch.nn.functional.one_hot(torch.tensor(1), 64).float()
        emb[B] = torch.nn.functional.one_hot(torch.tensor(2), 64).float()
        head.zero_()
        head[A, 0] = head[B, 1] = head[end, 2] = 1.0
    return model, tok, end


@pytest.mark.llamacpp
@needs_llamacpp
def test_gguf_that_stops_on_its_end_of_turn_token_passes_and_one_that_never_stops_fails(tmp_path, capsys):
    import copy

    import torch

    from tunelab.export import llamacpp
    from tunelab.export.common import prompt_ids
    from tunelab.export.gguf import write_gguf

    model, tok, end = _answering_model()
    ids = prompt_ids(tok)[0]
    with torch.no_grad():  # the reference answer: A, B and the end-of-turn token, on which transformers stops
        assert model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)[0, len(ids):].tolist() == \
            [A, B, end]

    good = tmp_path / "good.gguf"
    write_gguf(model, tok, good, "f32")
    with llamacpp.quiet():
        assert llamacpp.verify(good, model, tok, "f32") is True
    out = capsys.readouterr().out
    assert out.count(f"3/3 tokens agree, both stop on '{END}'") == 2, out

    # The same weights in a GGUF whose tokenizer and template end turns with <|endoftext|>: llama.cpp does not know
    # END ends a turn, so it answers A, B, END, A, B, END, ... up to the limit.
    bad_tok = copy.deepcopy(tok)
    bad_tok.eos_token = "<|endoftext|>"
    bad_tok.chat_template = tok.chat_template.replace(END, "<|endoftext|>")
    bad = tmp_path / "bad.gguf"
    write_gguf(model, bad_tok, bad, "f32")
    with llamacpp.quiet():
        assert llamacpp.verify(bad, model, tok, "f32") is False
        llm = llamacpp.load(bad, n_ctx=512)
        got, stopped = llamacpp.generate(llm, ids, 16)
    assert got == ([A, B, end] * 6)[:16] and not stopped
    out = capsys.readouterr().out
    assert f"llama.cpp does not stop on '{END}'" in out and f"end of turn '{END}' ends generation  NO" in out


@pytest.mark.llamacpp
@needs_llamacpp
@pytest.mark.parametrize("template", ["chatml", "llama3"])
def test_chats_reach_llamacpp_with_the_bos_training_saw(template, small_vocab_tokenizer, small_vocab_model,
                                                        tmp_path, monkeypatch, capsys):
    """Over a tokenizer that adds BOS to every text, `tunelab infer` hands llama.cpp a rendered chat as training
    tokenized it: llama3's own BOS once (not twice), chatml with none; the export's llama.cpp check agrees."""
    from types import SimpleNamespace

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.data import templates
    from tunelab.export import llamacpp
    from tunelab.export.gguf import write_gguf

    tok = AutoTokenizer.from_pretrained(small_vocab_tokenizer)
    tok.bos_token = tok.eos_token = "<|endoftext|>"
    tok.add_bos_token = True
    templates.apply(tok, template)
    model = AutoModelForCausalLM.from_pretrained(small_vocab_model, dtype=torch.float32).eval()
    path = tmp_path / "m.gguf"
    write_gguf(model, tok, path, "f32")
    with llamacpp.quiet():
        assert llamacpp.verify(path, model, tok, "f32") is True
    assert re.search(r"tokenize a rendered chat +yes", capsys.readouterr().out)

    seen = []
    monkeypatch.setattr(llamacpp, "generate", lambda llm, ids, n, stream=None: (seen.append(ids), ([], True))[1])
    args = SimpleNamespace(gguf=str(path), n_ctx=256, threads=1, system=None, prompt="Hi", max_new_tokens=4)
    with llamacpp.quiet():
        assert llamacpp.infer(args) == 0
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert seen == [tok.encode(text, add_special_tokens=False)]
    assert seen[0][:1] == ([tok.bos_token_id] if template == "llama3" else [tok.convert_tokens_to_ids("<|im_start|>")])


LLAMACPP_LOG = re.compile(r"llama_model_quantize|llama_model_loader|llm_load|load_tensors|ggml_")


@pytest.mark.llamacpp
@needs_llamacpp
def test_kquant_export_is_quiet_and_summarizes_what_was_made(tiny_model, tmp_path, capfd):
    """llama.cpp's log (hundreds of lines, C-level) stays out of the terminal unless --verbose; the summary's type
    counts add up to the file's tensors and its bits per weight follow from the GGML block sizes."""
    import gguf

    from tunelab import cli
    from test_export import make_run

    run = make_run(tmp_path / "kq", tiny_model)
    out = tmp_path / "kq.gguf"
    assert cli.main(["export", str(run), "--to", "gguf", "--type", "q4_k_m", "--out", str(out)]) == 0
    captured = capfd.readouterr()
    printed = captured.out + captured.err
    assert not LLAMACPP_LOG.search(printed), LLAMACPP_LOG.search(printed).group(0)

    m = re.search(r"GGUF q4_k_m: (\d+) tensors \(([^)]*)\), ([\d.]+) bits per weight, ([\d.]+) MiB", captured.out)
    assert m, captured.out
    tensors = gguf.GGUFReader(out).tensors
    counts = {name: int(n) for name, n in (part.rsplit(" ", 1) for part in m.group(2).split(", "))}
    assert sum(counts.values()) == int(m.group(1)) == len(tensors)
    assert counts["f32"] == sum(1 for t in tensors if len(t.shape) == 1)  # norms stay f32; every matrix is quantized
    bits = sum(int(t.n_elements) // gguf.GGML_QUANT_SIZES[t.tensor_type][0] * gguf.GGML_QUANT_SIZES[t.tensor_type][1]
               for t in tensors) * 8
    assert float(m.group(3)) == pytest.approx(bits / sum(int(t.n_elements) for t in tensors), abs=0.006)
    assert float(m.group(4)) == pytest.approx(out.stat().st_size / 2**20, abs=0.06)

    # asked for, the log is there (so the check above would have seen it)
    assert cli.main(["export", str(run), "--to", "gguf", "--type", "q4_k_m", "--out", str(out), "--overwrite",
                     "--verbose"]) == 0
    captured = capfd.readouterr()
    assert LLAMACPP_LOG.search(captured.out + captured.err)


@pytest.mark.parametrize("name, written", [("phi3-facts", "phi_3-facts"), ("My-Phi-3", "My-Phi-_3"),
                                           ("qwen-run", "qwen-run")])
def test_a_name_llamacpp_reads_as_phi3_is_not_written_over_another_vocabulary(name, written, small_vocab_tokenizer,
                                                                               tmp_path):
    """llama.cpp applies Phi-3's tokenizer rules when general.name contains phi3/phi-3 and then fails to load a
    vocabulary without Phi-3's </s>, <unk>, <s>, <|endoftext|> (a run named phi3-... on another tokenizer)."""
    import gguf
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Phi3Config

    from tunelab.export.gguf import write_gguf

    tok = AutoTokenizer.from_pretrained(small_vocab_tokenizer)  # 1,024 tokens: the file is read in milliseconds
    cfg = Phi3Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    path = tmp_path / "m.gguf"
    write_gguf(AutoModelForCausalLM.from_config(cfg).eval(), tok, path, "f32", name=name)
    assert gguf.GGUFReader(path).fields["general.name"].contents() == written
    if HAS_LLAMACPP:
        from tunelab.export import llamacpp

        with llamacpp.quiet():
            assert llamacpp.load(path, n_ctx=64).tokenize(b"hello", add_bos=False) == tok.encode("hello")
