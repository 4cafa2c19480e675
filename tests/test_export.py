"""Export: merge parity against an independently computed W + scale·B·A, GGUF round trips through transformers,
tokenizer round trip, refusals (unsupported architecture, K-quants without llama.cpp, existing output, an
--out that is not an earlier export or cannot be written, options the target does not read), Ollama
Modelfile, Hub dry run. Tiny random models keep it fast on 2 CPU cores, over SmolLM2's tokenizer cut to 1,024 tokens
(conftest.write_small_vocab_tokenizer: reading a GGUF back costs seconds per read with the full vocabulary)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
import yaml

from tunelab import cli
from tunelab.errors import UserError

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "down_proj"]


def make_run(root: Path, base: str, adapter: str = "lora", quant_bits=None, seed: int = 1, source: str | None = None,
             b_scale: float = 0.3) -> Path:
    """A run directory as `tunelab train` leaves it: config.yaml + final/ (a LoRA whose B is non-zero).

    `base` is the model directory loaded here; `source` is what config.yaml names (default: the same directory)."""
    import peft
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root.mkdir(parents=True, exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, use_dora=adapter == "dora")
    pm = peft.get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n or "lora_magnitude" in n:  # PEFT initializes B to zero: a merge of it would prove nothing
                p.add_(torch.randn(p.shape, generator=g) * b_scale)
    pm.save_pretrained(root / "final")
    AutoTokenizer.from_pretrained(base).save_pretrained(root / "final")
    (root / "config.yaml").write_text(yaml.safe_dump({
        "model": {"source": source or base}, "method": {"name": "sft"}, "adapter": {"type": adapter, "r": 4, "alpha": 8},
        "quantization": {"bits": quant_bits}, "training": {"learning_rate": 2e-4}}))
    return root


@pytest.fixture(scope="module")
def lora_run(small_vocab_model, tmp_path_factory) -> Path:
    run = make_run(tmp_path_factory.mktemp("runs") / "tiny-lora", small_vocab_model)
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 3.0 - s / 10}) + "\n" for s in (1, 2, 3)))
    (run / "summary.json").write_text(json.dumps({"status": "complete", "steps": 3, "last_loss": 2.7}))
    (run / "loss.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    return run


@pytest.fixture(scope="module")
def merged(lora_run):
    from tunelab.export.common import load_run
    from tunelab.export.merge import merged_model

    model, tok, _ = merged_model(load_run(str(lora_run)))
    return model, tok


# ---- merge -------------------------------------------------------------------------------------------------------

def test_loading_a_run_for_merge_or_inference_raises_no_library_warning(lora_run):
    """Every chat, serve, eval and export loads an adapter over its base; a library's deprecation notice about its
    own internals (PEFT reading transformers' is_gradient_checkpointing) must not greet the user each time."""
    import warnings

    from tunelab.export.common import load_run
    from tunelab.export.merge import merged_model
    from tunelab.models import load_for_inference

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_for_inference(run=str(lora_run))
        merged_model(load_run(str(lora_run)), quiet=True)
    assert not [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))]


def test_merge_matches_independent_lora_formula(lora_run, small_vocab_model, tmp_path, capsys):
    from safetensors.torch import load_file

    out = tmp_path / "merged"
    assert cli.main(["export", str(lora_run), "--to", "merged", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "merged model as saved (fp32, read back) vs adapter model" in printed

    base = load_file(Path(small_vocab_model) / "model.safetensors")
    adapter = load_file(lora_run / "final" / "adapter_model.safetensors")
    merged_w = load_file(out / "model.safetensors")
    scale = 8 / 4  # lora_alpha / r
    checked = 0
    for name, w in base.items():
        module = name.removesuffix(".weight")
        a_key = f"base_model.model.{module}.lora_A.weight"
        if a_key in adapter:
            expect = w + scale * adapter[a_key.replace("lora_A", "lora_B")] @ adapter[a_key]
            assert not torch.allclose(expect, w), "B must be non-zero for this test to mean anything"
            checked += 1
        else:
            expect = w
        if name in merged_w:  # a tied lm_head is saved once, as the embedding
            torch.testing.assert_close(merged_w[name], expect, atol=1e-6, rtol=1e-5)
    assert checked == 2 * len(LORA_TARGETS)  # 2 layers
    assert (out / "tokenizer.json").is_file() and (out / "chat_template.jinja").is_file()


def test_merge_bf16_dtype_and_overwrite_protection(lora_run, tmp_path, capsys):
    from safetensors import safe_open

    out = tmp_path / "merged-bf16"
    assert cli.main(["export", str(lora_run), "--to", "merged", "--dtype", "bf16", "--out", str(out)]) == 0
    with safe_open(out / "model.safetensors", "pt") as f:
        assert f.get_tensor("model.layers.0.self_attn.q_proj.weight").dtype == torch.bfloat16
    before = (out / "model.safetensors").stat().st_mtime_ns
    assert cli.main(["export", str(lora_run), "--to", "merged", "--out", str(out)]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert (out / "model.safetensors").stat().st_mtime_ns == before
    assert cli.main(["export", str(lora_run), "--to", "merged", "--out", str(out), "--overwrite"]) == 0
    with safe_open(out / "model.safetensors", "pt") as f:  # replaced whole, now in the default fp32
        assert f.get_tensor("model.layers.0.self_attn.q_proj.weight").dtype == torch.float32
    assert [p.name for p in tmp_path.iterdir()] == ["merged-bf16"]  # no temporary leftovers


def test_dora_merge_parity(small_vocab_model, tmp_path):
    from tunelab.export.common import compare_logits, load_run
    from tunelab.export.merge import MERGE_TOLERANCE, merged_model

    run = load_run(str(make_run(tmp_path / "dora", small_vocab_model, adapter="dora")))
    model, tok, (before, ids) = merged_model(run)  # raises ParityError on drift
    from tunelab.export.common import all_logits

    assert all(r.rel <= MERGE_TOLERANCE["fp32"] for r in compare_logits(before, all_logits(model, ids)))
    assert not any("lora" in n for n, _ in model.named_parameters())


def test_qlora_run_merges_into_full_precision_base(small_vocab_model, tmp_path, capsys):
    from tunelab.export.common import load_run
    from tunelab.export.merge import merged_model

    model, _, _ = merged_model(load_run(str(make_run(tmp_path / "qlora", small_vocab_model, quant_bits=4))))
    assert "merging into the full-precision base" in capsys.readouterr().out
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert getattr(model.config, "quantization_config", None) is None


def test_prompt_tuning_adapter_cannot_be_merged(small_vocab_model, tmp_path, capsys):
    run = tmp_path / "prompt-run"
    (run / "final").mkdir(parents=True)
    (run / "final" / "adapter_config.json").write_text("{}")
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"source": small_vocab_model},
                                                     "adapter": {"type": "prompt"}}))
    assert cli.main(["export", str(run), "--to", "merged"]) == 2
    assert "cannot be merged" in capsys.readouterr().err


def test_missing_run_is_a_user_error(tmp_path, capsys):
    assert cli.main(["export", str(tmp_path / "nope"), "--to", "gguf"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_a_model_directory_is_refused_as_not_a_run_rather_than_missing(small_vocab_model, capsys):
    """A model directory exists: export says what it is and what to pass, not that the run does not exist."""
    assert cli.main(["export", small_vocab_model, "--to", "merged"]) == 2
    err = _one_line_refusal(capsys)
    assert "is a model directory, not a tunelab run" in err and "does not exist" not in err
    assert "tunelab train" in err


def _one_line_refusal(capsys) -> str:
    """The error a refused export printed: one line, and no model was loaded for it (no parity table)."""
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, captured.err
    assert "vs adapter model" not in captured.out  # refused before the merge
    return err


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_overwrite_replaces_only_an_earlier_export(small_vocab_model, tmp_path, capsys):
    """--overwrite replaces an export tunelab wrote, never a folder of the user's, a file that is not a GGUF, nor
    the run itself, a folder holding it or its own files."""
    run = make_run(tmp_path / "runs" / "r", small_vocab_model)  # its own run: a failure here must not spoil others
    models = tmp_path / "mymodels"
    (models / "llama").mkdir(parents=True)
    (models / "llama" / "w.bin").write_text("x")
    (models / "notes.md").write_text("notes")
    notes = tmp_path / "notes.txt"
    notes.write_text("not a gguf")
    before = _tree(tmp_path)
    capsys.readouterr()
    for to, out, says in [("merged", models, "is not a merged model"), ("gguf", notes, "is not a GGUF file"),
                          ("ollama", notes, "is not an Ollama export"),
                          ("merged", run, "is the run"), ("gguf", run, "among the run's own files"),
                          ("merged", run.parent, "holds the run"), ("merged", run / "final", "among the run's own")]:
        assert cli.main(["export", str(run), "--to", to, "--out", str(out), "--overwrite"]) == 2, (to, out)
        assert says in _one_line_refusal(capsys), (to, out)
    assert _tree(tmp_path) == before


def test_gguf_out_directory_gets_the_file_inside(lora_run, tmp_path, capsys):
    """A GGUF --out that is a directory (existing, or written with a trailing slash) receives the file under its
    default name; here beside a merged model, whose files must not be read back in place of the GGUF's own."""
    models = tmp_path / "models"
    assert cli.main(["export", str(lora_run), "--to", "merged", "--out", str(models)]) == 0
    (models / "notes.md").write_text("notes")
    before = _tree(models)
    assert cli.main(["export", str(lora_run), "--to", "gguf", "--type", "f32", "--out", str(models),
                     "--overwrite"]) == 0, capsys.readouterr().err
    assert (models / "tiny-lora-f32.gguf").read_bytes()[:4] == b"GGUF"
    assert {k: v for k, v in _tree(models).items() if k != "tiny-lora-f32.gguf"} == before
    assert cli.main(["export", str(lora_run), "--to", "gguf", "--type", "f32", "--out", f"{tmp_path / 'new'}/"]) == 0
    assert (tmp_path / "new" / "tiny-lora-f32.gguf").is_file()


def test_ollama_out_directory_gets_the_export_inside(lora_run, tmp_path, capsys):
    """An existing directory that is not itself an Ollama export receives one under the default name, `ollama`."""
    (tmp_path / "notes.md").write_text("notes")
    assert cli.main(["export", str(lora_run), "--to", "ollama", "--type", "f32", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "ollama" / "Modelfile").is_file() and (tmp_path / "ollama" / "tiny-lora-f32.gguf").is_file()
    assert (tmp_path / "notes.md").read_text() == "notes"
    # and that export is one --overwrite replaces
    assert cli.main(["export", str(lora_run), "--to", "ollama", "--type", "f32", "--out", str(tmp_path / "ollama"),
                     "--overwrite"]) == 0, capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.md", "ollama"]


def test_bad_out_is_refused_before_the_merge(lora_run, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for to in ("merged", "gguf", "ollama"):
        assert cli.main(["export", str(lora_run), "--to", to, "--out", str(afile / "x.gguf")]) == 2
        assert "afile is a file, not a directory" in _one_line_refusal(capsys)
    if Path("/proc/self").is_dir():  # a place nobody can create anything in, root included
        assert cli.main(["export", str(lora_run), "--to", "gguf", "--out", "/proc/nope/x.gguf"]) == 2
        assert "cannot write in /proc" in _one_line_refusal(capsys)
    assert [p.name for p in tmp_path.iterdir()] == ["afile"]


@pytest.mark.parametrize("to,flags,says", [
    ("merged", ["--type", "q4_0"], "--type does not apply to --to merged, only with --to gguf|ollama; "
                                   "a merged model's precision is --dtype"),
    ("gguf", ["--dtype", "fp16"], "--dtype does not apply to --to gguf, only with --to merged; "
                                  "a GGUF's precision is --type"),
    ("ollama", ["--dtype", "bf16"], "--dtype does not apply to --to ollama"),
    ("merged", ["--verbose"], "--verbose does not apply to --to merged"),
    ("gguf", ["--repo", "you/x"], "--repo does not apply to --to gguf, only with --to hub"),
    ("hub", ["--dry-run", "--out", "x"], "--out does not apply to --to hub"),
])
def test_options_that_do_not_apply_to_the_target_are_refused(lora_run, tmp_path, capsys, to, flags, says):
    out = ["--out", str(tmp_path / "out")] if to != "hub" else []
    assert cli.main(["export", str(lora_run), "--to", to, *out, *flags]) == 2
    assert says in _one_line_refusal(capsys)
    assert list(tmp_path.iterdir()) == []


def test_unfinished_run_says_what_export_can_do(small_vocab_model, tmp_path, capsys):
    """export takes a finished run, nothing else: its advice must not name a flag it does not have."""
    run = tmp_path / "unfinished"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"source": small_vocab_model},
                                                     "adapter": {"type": "lora"}}))
    assert cli.main(["export", str(run), "--to", "merged"]) == 2
    err = _one_line_refusal(capsys)
    assert "has no final model yet" in err and "re-running the same `tunelab train` resumes it" in err
    assert "--adapter" not in err


# ---- GGUF ----------------------------------------------------------------------------------------------------------

def test_gguf_f32_round_trip_logits_and_tokenizer(merged, tmp_path, capsys):
    """f32 is exact: transformers reads back the very logits of the merged model, and the same tokens."""
    from transformers import AutoTokenizer

    from tunelab.export.gguf import TOKENIZER_TEXTS, export_gguf

    model, tok = merged
    report = export_gguf(model, tok, tmp_path / "m-f32.gguf", "f32")
    printed = capsys.readouterr().out
    assert "tokenizer round trip" in printed and "logits, GGUF f32 read back by transformers" in printed
    assert report["path"].is_file() and report["ok"]
    assert all(r.max_abs < 1e-5 and r.top1 == 1.0 for r in report["logits"])
    assert len(report["logits"]) == 4  # two chat prompts (special tokens) and two plain texts
    rows = {text: (same, a, b) for text, same, a, b in report["tokenizer"]}
    assert set(TOKENIZER_TEXTS) < set(rows) and all(same and a == b for same, a, b in rows.values())
    chat = [t for t in rows if t.startswith("<|im_start|>")]
    assert chat and rows[chat[0]][1][0] == tok.convert_tokens_to_ids("<|im_start|>")  # specials stay whole
    gtok = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m-f32.gguf")
    assert gtok.chat_template == tok.chat_template
    assert (gtok.bos_token, gtok.eos_token) == (tok.bos_token, tok.eos_token)
    assert all(gtok.decode(gtok.encode(t)) == t for t in TOKENIZER_TEXTS)


@pytest.mark.parametrize("qtype,tol", [("q8_0", 0.08), ("q4_0", 0.75)])
def test_gguf_quantized_within_tolerance(merged, tmp_path, qtype, tol):
    """A quantized file matches the source with the same rounding applied exactly, and the source within budget."""
    import gguf

    from tunelab.export.gguf import EXACT_TOLERANCE, TOLERANCE, export_gguf

    assert TOLERANCE[qtype] == tol and EXACT_TOLERANCE == 1e-3  # the tolerances the README states
    model, tok = merged
    report = export_gguf(model, tok, tmp_path / f"m-{qtype}.gguf", qtype)
    assert all(e.rel < 1e-5 for e in report["exact"])
    assert all(0 < r.rel <= tol for r in report["logits"])  # > 0: it really was quantized
    # measured on this tiny model: q8_0 ~0.01, q4_0 0.1-0.27; well below the budget sized for real models
    assert all(r.rel <= tol / 2 for r in report["logits"])
    if qtype == "q4_0":
        types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(report["path"]).tensors}
        assert types["blk.0.attn_q.weight"] == "Q4_0" and types["blk.1.ffn_down.weight"] == "Q4_0"
        assert types["blk.0.attn_norm.weight"] == "F32"
        assert types["token_embd.weight"] == "Q8_0"  # the (tied) embedding stays at 8 bits


LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


@pytest.mark.parametrize("arch,extra", [("qwen2", {}), ("mistral", {}), ("llama", {"rope_parameters": LLAMA3_ROPE})],
                         ids=["qwen2", "mistral", "llama3-rope"])
def test_gguf_other_llama_family_models(sp_tokenizer, tmp_path, arch, extra):
    """Qwen2 (Q/K/V biases, no Q/K reordering), Mistral (written as llama), Llama 3.1+ rope scaling (rope_freqs)."""
    import gguf
    from transformers import AutoConfig, AutoModelForCausalLM

    from tunelab.export.gguf import export_gguf

    cfg = AutoConfig.for_model(arch, vocab_size=len(sp_tokenizer), hidden_size=64, intermediate_size=128,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=512, bos_token_id=1, eos_token_id=2, **extra)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # Qwen2's biases are zero at init: make them count
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.5)
    report = export_gguf(model, sp_tokenizer, tmp_path / f"{arch}.gguf", "f32")
    assert report["ok"] and all(r.max_abs < 1e-5 for r in report["logits"])
    names = {t.name for t in gguf.GGUFReader(report["path"]).tensors}
    assert ("blk.0.attn_q.bias" in names) == (arch == "qwen2")
    assert ("rope_freqs.weight" in names) == ("rope_parameters" in extra)


def test_gguf_unsupported_architecture(tmp_path, capsys):
    from conftest import build_tiny_model

    run = tmp_path / "gemma-run"
    build_tiny_model(run / "final", arch="gemma")  # refused before any GGUF is written: the full tokenizer is fine
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"source": str(run / "final")},
                                                     "adapter": {"type": "none"}}))
    assert cli.main(["export", str(run), "--to", "gguf"]) == 2
    assert "'gemma' models is not supported:" in capsys.readouterr().err
    assert not (run / "export").exists() or not any((run / "export").iterdir())


def test_gguf_broken_layout_fails_loudly_and_writes_nothing(lora_run, tmp_path, monkeypatch, capsys):
    """The round trip must catch a wrong tensor layout: skip llama.cpp's Q/K row order on purpose."""
    from tunelab.export import gguf as gguf_export

    monkeypatch.setattr(gguf_export, "_llama_qk_rows", lambda w, n_head: w)
    out = tmp_path / "broken.gguf"
    assert cli.main(["export", str(lora_run), "--to", "gguf", "--type", "f32", "--out", str(out)]) == 1
    captured = capsys.readouterr()
    assert "parity check failed" in captured.err and "NO" in captured.out
    assert list(tmp_path.iterdir()) == []


def test_gguf_types_and_kquant_refusals(lora_run, tmp_path, capsys):
    from tunelab.export import llamacpp

    assert cli.main(["export", str(lora_run), "--to", "gguf", "--type", "q3_x", "--out", str(tmp_path / "a")]) == 2
    assert "choose one of" in capsys.readouterr().err
    if not llamacpp.available():
        assert cli.main(["export", str(lora_run), "--to", "gguf", "--type", "q4_k_m",
                         "--out", str(tmp_path / "k.gguf")]) == 2
        assert "pip install -e '.[llamacpp]'" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_infer_without_llamacpp_says_how_to_install(tmp_path, capsys):
    from tunelab.export import llamacpp

    if llamacpp.available():
        pytest.skip("llama-cpp-python is installed; test_export_llamacpp covers infer")
    assert cli.main(["infer", "--gguf", str(tmp_path / "x.gguf"), "--prompt", "hi"]) == 2
    assert "pip install -e '.[llamacpp]'" in capsys.readouterr().err


# ---- Ollama --------------------------------------------------------------------------------------------------------

def test_ollama_export_writes_gguf_and_modelfile(lora_run, tmp_path, capsys):
    out = tmp_path / "ollama"
    killed = tmp_path / ".ollama.0123abcd"  # the staging folder of an export that was SIGKILLed an hour ago
    (killed / "sub").mkdir(parents=True)
    (killed / "tiny-lora-f16.gguf").write_bytes(b"GGUF half")
    os.utime(killed, (time.time() - 3600,) * 2)
    assert cli.main(["export", str(lora_run), "--to", "ollama", "--type", "f16", "--out", str(out)]) == 0
    printed, err = capsys.readouterr()
    assert not killed.exists() and f"removed {killed}: a partial write of {out}" in err
    assert "recognized as chatml" in printed
    # the GGUF is named where it ends up, not in the staging folder that is renamed into place
    assert f"written to {out / 'tiny-lora-f16.gguf'}\n" in printed and ".ollama." not in printed
    assert (out / "tiny-lora-f16.gguf").is_file()
    mf = (out / "Modelfile").read_text()
    assert mf.startswith("FROM ./tiny-lora-f16.gguf\n")
    assert 'TEMPLATE """{{- if .System }}<|im_start|>system' in mf
    # SmolLM2's template adds this system prompt when none is given; Ollama gets it as SYSTEM
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in mf
    assert 'PARAMETER stop "<|im_end|>"' in mf and 'PARAMETER stop "<|im_start|>"' in mf


def test_ollama_reuses_a_checked_gguf_of_the_same_type(lora_run, tmp_path, capsys):
    gguf = lora_run / "export" / "tiny-lora-f16.gguf"
    assert cli.main(["export", str(lora_run), "--to", "gguf", "--type", "f16", "--overwrite"]) == 0
    capsys.readouterr()
    out = tmp_path / "ollama"
    assert cli.main(["export", str(lora_run), "--to", "ollama", "--type", "f16", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"reusing {gguf} (GGUF f16, checked)" in printed
    assert (out / "tiny-lora-f16.gguf").stat().st_ino == gguf.stat().st_ino  # linked, not converted again


def test_exports_get_the_usual_permissions_under_umask_022(lora_run, tmp_path):
    """An Ollama service account must be able to read what export writes: 0755 directories, 0644 files."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        out = tmp_path / "merged"
        assert cli.main(["export", str(lora_run), "--to", "merged", "--out", str(out)]) == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    files = [p for p in out.rglob("*") if p.is_file()]
    assert files and {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o644}


def test_modelfile_template_detection(small_vocab_model):
    from transformers import AutoTokenizer

    from tunelab.export.ollama import detect_template, modelfile

    tok = AutoTokenizer.from_pretrained(small_vocab_model)
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + "
                         "'<|end_header_id|>\n\n' + m['content'] + '<|eot_id|>' }}{% endfor %}"
                         "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
                         "{% endif %}")
    assert detect_template(tok) == ("llama3", None)
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    text, fmt = modelfile(tok, "m.gguf")
    assert fmt is None and "TEMPLATE" not in text and 'PARAMETER stop "<|im_end|>"' in text


# ---- Hub -----------------------------------------------------------------------------------------------------------

def test_hub_dry_run_lists_exactly_the_upload(lora_run, capsys):
    from tunelab.export.common import load_run
    from tunelab.export.hub import push

    files = push(load_run(str(lora_run)), repo_id="someone/tiny-lora", dry_run=True)
    names = {str(f) for f in files}
    final_files = {p.name for p in (lora_run / "final").iterdir()} - {"README.md"}
    assert names == final_files | {"README.md", "tunelab_config.yaml", "summary.json", "metrics.jsonl", "loss.png"}
    printed = capsys.readouterr().out
    assert "dry run: nothing was uploaded" in printed
    assert all(n in printed for n in names)


def test_hub_model_card_has_config_metrics_and_plot(lora_run):
    from tunelab.export.common import load_run
    from tunelab.export.hub import model_card

    card = model_card(load_run(str(lora_run)), "someone/tiny-lora")
    assert card.startswith("---\n") and "library_name: peft" in card and "- tunelab" in card
    assert "![training loss](loss.png)" in card
    assert "| last logged loss | 2.7 |" in card
    assert "learning_rate: 0.0002" in card  # the training config
    assert 'AutoPeftModelForCausalLM.from_pretrained("someone/tiny-lora")' in card


def test_hub_names_the_public_id_of_the_embedded_base(small_vocab_model, tmp_path, capsys):
    """A run on the embedded model records its cache directory as the base (here: the tiny model's directory); the
    upload must name the public id instead, in adapter_config.json (which the card's snippet loads) and the card."""
    from tunelab.export.common import load_run
    from tunelab.export.hub import push, stage

    run = load_run(str(make_run(tmp_path / "emb", small_vocab_model, source="embedded:smollm2-135m-instruct")))
    base_path = json.loads((run.final / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base_path == small_vocab_model
    push(run, repo_id="someone/emb", dry_run=True)
    assert "base model: HuggingFaceTB/SmolLM2-135M-Instruct (the run's embedded:smollm2-135m-instruct)" in \
        capsys.readouterr().out
    staged = tmp_path / "staged"
    staged.mkdir()
    stage(run, staged, "someone/emb")
    cfg = json.loads((staged / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    card = (staged / "README.md").read_text()
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card and small_vocab_model not in card


def test_hub_push_needs_repo(lora_run, capsys):
    assert cli.main(["export", str(lora_run), "--to", "hub"]) == 2
    assert "--repo OWNER/NAME" in capsys.readouterr().err


def test_pre_tokenizer_name_follows_the_vocabulary():
    from tunelab.export.gguf import _pre_tokenizer_name

    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    assert _pre_tokenizer_name({"pre_tokenizer": byte_level}, {"a": 0, "Ġ1": 1}) == "gpt-2"
    assert _pre_tokenizer_name({"pre_tokenizer": byte_level}, {"a": 0, "1": 1, "Â²": 2}) == "smollm"
    with pytest.raises(UserError, match="pre-tokenizer"):
        _pre_tokenizer_name({"pre_tokenizer": {"type": "Whitespace"}}, {})


@pytest.fixture(scope="module")
def sp_tokenizer(tmp_path_factory):
    """A Llama-2-style tokenizer (sentencepiece BPE with byte fallback) trained here on a few lines of text.

    Its 400-token vocabulary also keeps the GGUF round trips of the architecture tests fast."""
    tmp_path = tmp_path_factory.mktemp("sp")
    import sentencepiece as spm
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    from transformers.tokenization_utils_base import generate_merges

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(["The quick brown fox jumps over the lazy dog.", "Numbers 12345, cafe, naive.",
                                 "def f(x):\n    return x ** 2  # square", "Leading space, then two spaces."] * 30))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=400,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0, bos_id=1, eos_id=2,
                                   unk_id=0, pad_id=-1, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    merges = generate_merges(vocab, {p: sp.get_score(i) for p, i in vocab.items()})
    t = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    t.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    t.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                   decoders.Strip(" ", 1, 0)])
    t.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_gguf_sentencepiece_llama_tokenizer_round_trip(sp_tokenizer, tmp_path):
    """Llama 2 / Mistral-style vocabularies go through gguf's LlamaHfVocab; byte fallback covers unseen text."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from tunelab.export.gguf import export_gguf

    tok = sp_tokenizer
    cfg = AutoConfig.for_model("llama", vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    report = export_gguf(model, tok, tmp_path / "sp.gguf", "q8_0")
    assert report["ok"] and all(same for _, same, _, _ in report["tokenizer"])
    assert any(len(a) > 20 for _, _, a, _ in report["tokenizer"])  # the unicode line went through byte fallback
    # llama.cpp's sentencepiece tokenizer merges by score: a merged piece scores minus its merge's rank (with the
    # same score everywhere it split "leading" into letters; the llama.cpp check above gates that when installed)
    import gguf

    scores = gguf.GGUFReader(tmp_path / "sp.gguf").fields["tokenizer.ggml.scores"].contents()
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    vocab = tok.get_vocab()
    for rank in (0, 5, len(merges) - 1):
        a, b = merges[rank].split(" ", 1) if isinstance(merges[rank], str) else merges[rank]
        assert scores[vocab[a + b]] == -rank


# ---- what the run trained: its end of turn and its BOS, in the exports --------------------------------------------

@pytest.fixture
def base_tokenizer(small_vocab_tokenizer):
    """SmolLM2's 1,024-token vocabulary laid out like a GPT-2 base: BOS = EOS = <|endoftext|>, no chat template,
    <|im_end|> still a token of it."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(small_vocab_tokenizer)
    tok.chat_template = None
    tok.bos_token = tok.eos_token = "<|endoftext|>"
    return tok


@pytest.mark.parametrize("template,ends_with_im_end", [("chatml", True), ("alpaca", False), ("llama3", False),
                                                      ("own-chatml", True)])
def test_stop_ids_add_the_trained_end_of_turn_to_the_eos(base_tokenizer, small_vocab_tokenizer, template,
                                                         ends_with_im_end):
    """chatml over the base trains <|im_end|> as the end of a reply: generation must stop there as well as on the
    model's EOS; alpaca (and llama3, whose <|eot_id|> this vocabulary lacks) end replies with EOS itself. A chatml
    template that is not the built-in one (SmolLM2's own Jinja, as a base shipping its own template) likewise."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from tunelab.data import templates
    from tunelab.export.common import trained_end_of_turn, trained_stop_ids

    tok = base_tokenizer
    own = AutoTokenizer.from_pretrained(small_vocab_tokenizer).chat_template
    templates.apply(tok, own if template == "own-chatml" else template)
    assert (templates.identify(tok) is None) == (template == "own-chatml")
    eos, im_end = tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")
    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=eos))
    if ends_with_im_end:
        assert trained_end_of_turn(tok) == im_end and trained_stop_ids(tok, model) == [eos, im_end]
    else:
        assert trained_end_of_turn(tok) is None and trained_stop_ids(tok, model) == [eos]


def test_merged_model_of_a_run_whose_eos_ends_turns_keeps_its_generation_eos(lora_run, tmp_path):
    """SmolLM2's EOS is its end of turn (<|im_end|>): nothing to add, the generation config is written as it was."""
    from transformers import AutoTokenizer, GenerationConfig

    out = tmp_path / "merged"
    assert cli.main(["export", str(lora_run), "--to", "merged", "--out", str(out)]) == 0
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.eos_token == "<|im_end|>"
    assert GenerationConfig.from_pretrained(out).eos_token_id in (tok.eos_token_id, [tok.eos_token_id])


def test_modelfile_writes_bos_only_where_the_template_does_and_llama_cpp_does_not(base_tokenizer):
    """The BOS the llama3 template renders goes into the Go TEMPLATE where the tokenizer (hence the GGUF's
    add_bos_token) adds none, and stays out where llama.cpp adds it, which would make two; chatml writes none."""
    from tunelab.data import templates
    from tunelab.export.ollama import go_template, modelfile

    tok = base_tokenizer

    def adds_bos() -> bool:
        return tok("a").input_ids[0] == tok.bos_token_id

    def template_of() -> str:
        return modelfile(tok, "m.gguf")[0].split('TEMPLATE """', 1)[1].split('"""', 1)[0]

    tok.chat_template = templates.text("llama3", tok)
    assert not adds_bos() and template_of() == "<|endoftext|>" + go_template("llama3", "<|endoftext|>")
    tok.chat_template = templates.text("chatml", tok)
    assert template_of() == go_template("chatml", "<|im_end|>")
    tok.add_bos_token = True  # a tokenizer that puts BOS before every text, as Llama 3's does
    tok.chat_template = templates.text("llama3", tok)
    assert adds_bos() and template_of() == go_template("llama3", "<|endoftext|>")


@pytest.mark.parametrize("template,add_bos", [("chatml", False), ("llama3", True), (None, True)])
def test_gguf_adds_bos_only_where_training_saw_one(base_tokenizer, small_vocab_model, tmp_path, template, add_bos):
    """A tokenizer that puts BOS before every text (Llama 2 / Mistral style): a chat was trained with a BOS only
    where its template writes one (chatml writes none, llama3 does), plain text with the tokenizer's (no template).
    The GGUF's add_bos_token, which llama.cpp and Ollama apply to every prompt, chats included, follows that."""
    import gguf
    from transformers import AutoModelForCausalLM

    from tunelab.data import templates
    from tunelab.export.gguf import export_gguf
    from tunelab.export.ollama import go_template, modelfile

    tok = base_tokenizer
    tok.add_bos_token = True
    if template:
        templates.apply(tok, template)
    assert tok("a").input_ids[0] == tok.bos_token_id
    model = AutoModelForCausalLM.from_pretrained(small_vocab_model, dtype=torch.float32).eval()
    report = export_gguf(model, tok, tmp_path / "m.gguf", "f32")
    assert report["ok"]
    assert bool(gguf.GGUFReader(report["path"]).fields["tokenizer.ggml.add_bos_token"].contents()) is add_bos
    if template:  # one BOS in Ollama's prompt where the template writes one, none where it writes none
        go = modelfile(tok, "m.gguf")[0].split('TEMPLATE """', 1)[1].split('"""', 1)[0]
        assert go == go_template(template, "<|im_end|>" if template == "chatml" else "<|endoftext|>")
