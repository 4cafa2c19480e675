"""Export end to end on the real SmolLM2-135M-Instruct, and llama.cpp checks when llama-cpp-python is installed.

The embedded model ships as a GGUF written by llama.cpp's own converter: our file's tokenizer metadata is compared
with it key by key, an independent reference for what llama.cpp expects.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml

from tunelab import cli

HAS_LLAMACPP = importlib.util.find_spec("llama_cpp") is not None
needs_llamacpp = pytest.mark.skipif(not HAS_LLAMACPP, reason="llama-cpp-python is not installed: "
                                    "pip install -e '.[llamacpp]' then pytest -m llamacpp tests/test_export_e2e.py")


def _full_model_run(root: Path, model_dir: str) -> Path:
    """A run whose final/ is a full model (as after full fine-tuning): the model directory itself, linked."""
    root.mkdir(parents=True)
    (root / "final").symlink_to(Path(model_dir).resolve(), target_is_directory=True)
    (root / "config.yaml").write_text(yaml.safe_dump({"model": {"source": "embedded:smollm2-135m-instruct"},
                                                      "adapter": {"type": "none"}, "quantization": {"bits": None}}))
    return root


def _fields(path) -> dict:
    import gguf

    r = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in r.fields.items() if k.startswith("tokenizer.")}


@pytest.mark.e2e
def test_smollm2_gguf_round_trip_and_tokenizer_metadata_match_llamacpp(embedded_model, tmp_path, capsys):
    from tunelab.models import EMBEDDED

    run = _full_model_run(tmp_path / "smol", embedded_model)
    out = tmp_path / "smol-f16.gguf"
    assert cli.main(["export", str(run), "--to", "gguf", "--type", "f16", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "tokenizer round trip" in printed and "identical" in printed  # chat template survived

    module, name, _ = EMBEDDED["smollm2-135m-instruct"]
    spec = importlib.util.find_spec(module)
    reference = Path(list(spec.submodule_search_locations)[0]) / name
    ours, theirs = _fields(out), _fields(reference)
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "tokenizer.ggml.padding_token_id", "tokenizer.ggml.unknown_token_id",
                "tokenizer.ggml.add_bos_token", "tokenizer.chat_template"):
        assert ours.get(key) == theirs.get(key), key


@pytest.mark.llamacpp
@needs_llamacpp
def test_llamacpp_generates_like_transformers_and_infer_runs(tiny_model, tmp_path, capsys):
    """With llama.cpp present, the export's own llama.cpp check runs (tokenization + greedy agreement), a K-quant
    goes through llama.cpp's quantizer, and `tunelab infer --gguf` answers with the template applied."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.export.gguf import export_gguf

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model)
    report = export_gguf(model, tok, tmp_path / "tiny-f32.gguf", "f32")
    assert report["llamacpp"] is True
    assert "llama.cpp vs transformers" in capsys.readouterr().out
    kq = export_gguf(model, tok, tmp_path / "tiny-q4_k_m.gguf", "q4_k_m")
    assert kq["ok"] and kq["path"].is_file()
    assert cli.main(["infer", "--gguf", str(report["path"]), "--prompt", "Hi", "--max-new-tokens", "8"]) == 0
