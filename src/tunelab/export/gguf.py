"""GGUF export for llama.cpp / Ollama, written with the `gguf` package and verified by reading it back.

The writer is `gguf.GGUFWriter`; tensor names come from `gguf.get_tensor_name_map`, quantization from `gguf.quants`,
merges / special tokens / chat template from `gguf.SpecialVocab`, a sentencepiece vocabulary from
`gguf.vocab.LlamaHfVocab`. What is written by hand is the glue that lives in llama.cpp's converter script (which is
not part of the `gguf` package): the hyper-parameter keys, the Q/K row order llama.cpp expects, GPT-2's transposed
Conv1D weights, the name of the pre-tokenizer, and Llama 3 rope factors. Every file is then loaded back with
transformers (`gguf_file=`) and compared with the source model: tokenization of tricky text, and logits on a few
prompts, both against the source with the file's own rounding applied (must match to float precision) and against the
float32 source (a quality budget per type). A file that fails is never left behind.

Types f32, f16, bf16, q8_0 and q4_0 are produced here in Python. K-quants (q4_k_m, ...) need llama.cpp's own
quantizer, reached through llama-cpp-python when it is installed (`pip install -e .[llamacpp]`).
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

from tunelab.errors import UserError
from tunelab.export.chat_formats import adds_bos, adds_eos, llamacpp_ids, tokenizer_adds_bos
from tunelab.export.common import (EXACT_TOLERANCE, LLAMACPP_TYPES, PYTHON_TYPES, TOKENIZER_TEXTS,
                                   TOLERANCE, TYPES, ParityError, all_logits, atomic_path, check_target, print_table,
                                   prompt_ids, trained_end_of_turn)

# HF model_type -> GGUF architecture, for every architecture whose file transformers reads back (the round-trip check
# needs that): transformers.integrations.ggml.GGUF_CONFIG_MAPPING. llama.cpp runs Mistral (without sliding-window use)
# as "llama", as its own converter does; SmolLM / SmolLM2 are plain Llama checkpoints. Phi-2 ("phi"), Gemma 1
# ("gemma") and GPT-NeoX run in llama.cpp too, but transformers cannot read those files back, so an export of them
# could not be checked: they are refused before any work (check_exportable).
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gpt2": "gpt2",
                 "phi3": "phi3"}
# GGUF tensors whose HF weights are transformers Conv1D layers, stored (in, out): llama.cpp's converter transposes them
# to the (out, in) layout of every other matrix, and transformers' GGUF loader transposes them back
# (GPT2TensorProcessor).
CONV1D_TENSORS = {"gpt2": ("attn_qkv.weight", "attn_output.weight", "ffn_up.weight", "ffn_down.weight")}


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _check_supported(config) -> str:
    arch = ARCHITECTURES.get(config.model_type)
    if arch is None:
        raise UserError(f"GGUF export of '{config.model_type}' models is not supported: every GGUF is checked by "
                        "reading it back with transformers, which cannot read that architecture; supported: "
                        f"{', '.join(ARCHITECTURES)}. Export with --to merged and convert with llama.cpp's "
                        "convert_hf_to_gguf.py instead")
    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type not in ("default", "llama3") or (rope_type == "llama3" and arch != "llama"):
        raise UserError(f"GGUF export of models with rope scaling '{rope_type}' is not supported yet "
                        "(export with --to merged and convert with llama.cpp)")
    return arch


def check_exportable(run) -> None:
    """Refuse, before the merge or any other work, a run whose architecture (or rope scaling) GGUF export cannot
    write and check. Reads only the model's config.json."""
    from transformers import AutoConfig

    from tunelab.models import resolve_source

    source = resolve_source(run.model_source)
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise UserError(f"could not read the model config of {source}: {str(e).splitlines()[0]}") from None
    _check_supported(config)


def _readback_gap(config) -> str | None:
    """Why transformers' GGUF reader would rebuild a different config than the source's from a correct file, or None.

    Its per-architecture key maps skip some keys llama.cpp reads (they are still written), and fall back on the
    config class's defaults; for such a model the weights are read back under the source config instead.
    """
    t = config.model_type
    if t == "qwen3" and config.head_dim != 128:
        return f"head_dim {config.head_dim} (transformers assumes Qwen3's 128)"
    if t == "gpt2" and (config.n_positions != 1024 or config.n_inner not in (None, 4 * config.n_embd)):
        return "n_positions or n_inner differ from GPT-2's (transformers reads neither from GGUF)"
    if t == "phi3" and _rope_parameters(config).get("partial_rotary_factor", 1.0) != 1.0:
        return "partial rotary embedding (transformers does not read rope.dimension_count for phi3)"
    return None


def _rope_parameters(config) -> dict:
    return getattr(config, "rope_parameters", None) or {}


def _rope_type(config) -> str:
    return (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")


def _llama3_rope_factors(config):
    """Llama 3.1+ rope scaling as llama.cpp stores it: one divisor per rotary frequency (`rope_freqs.weight`).

    The scaled frequencies come from transformers' own llama3 rope initialisation; the divisor is the plain RoPE
    frequency (theta^(-2i/d)) over the scaled one.
    """
    import torch
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    plain = 1.0 / (_rope_theta(config) ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    return (plain / scaled.float()).numpy()


def _llama_qk_rows(w, n_head: int):
    """Reorder Q/K rows for llama.cpp.

    HF Llama checkpoints apply rotary embeddings to the two halves of each head (`rotate_half`); llama.cpp's "llama"
    architecture rotates adjacent pairs. Its converter therefore interleaves the halves of every head, and
    transformers' GGUF loader undoes exactly this (`_reverse_permute_weights`). Qwen2 uses the half layout in
    llama.cpp too, so it is written as is.
    """
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensor_type(gname: str, shape, qtype: str):
    """GGML type for one tensor: 1-D tensors (norms, biases) and learned positions stay float32, as llama.cpp
    expects."""
    from gguf import GGMLQuantizationType as T

    if len(shape) == 1 or qtype == "f32":
        return T.F32
    if gname == "position_embd.weight":
        # GPT-2's learned positions stay float32: llama.cpp's converter always keeps them so (they are added to
        # the embeddings, never multiplied)
        return T.F32
    simple = {"f16": T.F16, "bf16": T.BF16}
    if qtype in simple:
        return simple[qtype]
    blocked = {"q8_0": T.Q8_0, "q4_0": T.Q4_0}[qtype]
    if qtype == "q4_0" and gname in ("token_embd.weight", "output.weight"):
        # The embedding (and the output head, tied to it in small models) is kept at 8 bits: at 4 bits it costs far
        # more quality than it saves space. llama.cpp's quantizer keeps these at a higher precision for the same reason.
        blocked = T.Q8_0
    if shape[-1] % 32:  # both block formats need rows that are a multiple of 32 values
        return T.F16
    return blocked


def _digits_stand_alone(vocab: dict) -> bool:
    """True when no byte-level token joins a number character (Unicode category N) to anything else."""
    import unicodedata

    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    for token in vocab:
        if any(c not in byte_of for c in token):  # an added token written as plain text, e.g. <|im_start|>
            continue
        text = bytes(byte_of[c] for c in token).decode("utf-8", errors="ignore")
        if len(text) > 1 and any(unicodedata.category(c).startswith("N") for c in text):
            return False
    return True


def _pre_tokenizer_name(tj: dict, vocab: dict) -> str:
    """llama.cpp's name for how text is split before BPE (`tokenizer.ggml.pre`).

    llama.cpp's converter recognizes a tokenizer by hashing its output on a test text against a table it maintains;
    here we read the pre-tokenizer from tokenizer.json instead, for the splitting schemes of the supported families.
    """
    try:  # the split patterns transformers itself uses to rebuild these tokenizers from a GGUF
        from transformers.integrations.gguf.gguf_tokenizer_mapping import _LLAMA3_SPLIT, _QWEN2_SPLIT
    except ImportError:  # moved in another transformers version: those families are then refused below
        _LLAMA3_SPLIT = _QWEN2_SPLIT = None

    pre = tj.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        # GPT-2's split. A vocabulary in which every token holding a digit is that digit alone tokenizes
        # identically when each digit is split off first, which is llama.cpp's "smollm" scheme (the one its
        # converter picks for SmolLM2's tokenizer); otherwise it is the plain GPT-2 scheme.
        return "smollm" if _digits_stand_alone(vocab) else "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    if kinds and kinds[0] == "Split" and kinds[-1] == "ByteLevel":
        regex = (steps[0].get("pattern") or {}).get("Regex")
        if regex and regex == _LLAMA3_SPLIT:
            return "llama-bpe"
        if regex and regex == _QWEN2_SPLIT:
            return "qwen2"
    raise UserError(f"the tokenizer's pre-tokenizer ({', '.join(map(str, kinds)) or 'none'}) is not one tunelab "
                    "knows how to describe in GGUF yet (GPT-2/SmolLM, Llama 3, Qwen2); convert with llama.cpp")


def _special_vocab(td: str, config, n_vocab: int, merges: bool):
    """gguf's SpecialVocab over the saved tokenizer, with the model config beside it for its bos/eos id fallback.

    The config is written only now: with it present, reloading the tokenizer from the same folder (LlamaHfVocab
    does) would pick the tokenizer class of the model type, e.g. Qwen2's, which adds tokens of its own.
    """
    import gguf

    config.to_json_file(str(Path(td) / "config.json"))
    return gguf.SpecialVocab(td, load_merges=merges, n_vocab=n_vocab)


def _add_tokenizer(writer, tok, config, n_vocab: int) -> None:
    import gguf

    with tempfile.TemporaryDirectory() as td:
        tok.save_pretrained(td)
        tj = json.loads((Path(td) / "tokenizer.json").read_text())
        model = tj.get("model", {})
        byte_level = (tj.get("decoder") or {}).get("type") == "ByteLevel"
        if model.get("type") == "BPE" and byte_level:
            vocab = tok.get_vocab()
            if max(vocab.values()) >= n_vocab:
                raise UserError(f"the tokenizer has ids up to {max(vocab.values())} but the model's embedding has "
                                f"{n_vocab} rows; resize the embedding before exporting")
            added = {i: t for i, t in tok.added_tokens_decoder.items()}
            tokens = [f"[PAD{i}]" for i in range(n_vocab)]  # rows no token uses, as llama.cpp pads them
            types = [gguf.TokenType.UNUSED] * n_vocab
            for text, i in vocab.items():
                tokens[i] = text
                a = added.get(i)
                types[i] = (gguf.TokenType.NORMAL if a is None else
                            gguf.TokenType.CONTROL if a.special else gguf.TokenType.USER_DEFINED)
            writer.add_tokenizer_model("gpt2")
            writer.add_tokenizer_pre(_pre_tokenizer_name(tj, vocab))
            writer.add_token_list(tokens)
            writer.add_token_types(types)
            special = _special_vocab(td, config, n_vocab, merges=True)
        elif model.get("type") == "BPE" and model.get("byte_fallback"):  # a sentencepiece (Llama 2 / Mistral) vocab
            from gguf.vocab import LlamaHfVocab

            sp = LlamaHfVocab(Path(td))
            # LlamaHfVocab scores every token -1000, but llama.cpp's sentencepiece tokenizer merges the adjacent pair
            # whose joined text has the highest score: with equal scores it tokenizes differently from transformers
            # ("leading" as l,e,a,d,i,n,g). A BPE merge's rank is the score sentencepiece gives the piece it makes.
            rank: dict[str, int] = {}
            for i, merge in enumerate(model.get("merges") or []):
                a, b = merge.split(" ", 1) if isinstance(merge, str) else merge
                rank.setdefault(a + b, i)
            tokens, scores, types = [], [], []
            for text, score, ttype in sp.all_tokens():
                tokens.append(text)
                piece = text.decode("utf-8", errors="replace")
                scores.append(-float(rank[piece]) if ttype == gguf.TokenType.NORMAL and piece in rank else
                              0.0 if ttype == gguf.TokenType.NORMAL else score)
                types.append(ttype)
            if len(tokens) > n_vocab:
                raise UserError(f"the tokenizer has {len(tokens)} tokens but the embedding only {n_vocab} rows")
            for i in range(len(tokens), n_vocab):
                tokens.append(f"[PAD{i}]".encode())
                scores.append(-1000.0)
                types.append(gguf.TokenType.UNUSED)
            writer.add_tokenizer_model("llama")
            writer.add_tokenizer_pre("default")
            writer.add_token_list(tokens)
            writer.add_token_scores(scores)
            writer.add_token_types(types)
            special = _special_vocab(td, config, n_vocab, merges=False)
        else:
            raise UserError(f"tokenizer model '{model.get('type')}' is not supported for GGUF export yet "
                            "(byte-level BPE and sentencepiece-style BPE are)")
        special.add_special_token["bos"], special.add_special_token["eos"] = adds_bos(tok), adds_eos(tok)
        if tok.chat_template and not special.chat_template:
            special.chat_template = tok.chat_template
        special.add_to_gguf(writer, quiet=True)
        # llama.cpp (and Ollama through it) stops on the end-of-turn id besides EOS. A run whose template ends turns
        # with its own token over a base with another EOS (chatml's <|im_end|> on a Qwen or GPT-2-style base) learned
        # to stop there, and the file must say so; transformers' GGUF reader ignores this key.
        eot = trained_end_of_turn(tok)
        if eot is not None:
            writer.add_eot_token_id(eot)


def _tensor_plan(model, arch: str, qtype: str):
    """(HF name, GGUF name, tensor, GGML type) for every tensor that goes into the file."""
    import gguf

    config = model.config
    names = gguf.get_tensor_name_map(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch),
                                     config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for hf_name, t in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reuses token_embd when output.weight is absent
        gname = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise UserError(f"tensor {hf_name} has no GGUF name for architecture {arch}; this checkpoint has parts "
                            "the GGUF export does not know yet")
        shape = tuple(t.shape)[::-1] if gname.endswith(CONV1D_TENSORS.get(arch, ())) else tuple(t.shape)
        yield hf_name, gname, t, _tensor_type(gname, shape, qtype)


def _file_layout(arch: str, gname: str, data, config):
    """A tensor as the file stores it: Conv1D weights transposed, Llama's Q/K rows in llama.cpp's order.

    Both are what llama.cpp's converter does and transformers' GGUF loader undoes."""
    if gname.endswith(CONV1D_TENSORS.get(arch, ())):
        return data.T
    if arch == "llama" and re.search(r"attn_[qk]\.weight$", gname):
        n_head = config.num_attention_heads
        n_kv = config.num_key_value_heads or n_head
        return _llama_qk_rows(data, n_head if "attn_q" in gname else n_kv)
    return data


def rounded_reference(model, qtype: str):
    """A copy of `model` whose weights went through exactly the rounding the file applies (f16, bf16, q8_0, q4_0).

    The GGUF read back must match this copy to float precision whatever the type: a quantization error budget would
    otherwise have to be loose enough to also hide a wrong tensor layout. Returns `model` itself for f32.
    """
    import copy

    import gguf
    import numpy as np
    import torch

    if qtype == "f32":
        return model
    ref = copy.deepcopy(model)
    arch = ARCHITECTURES[model.config.model_type]
    with torch.no_grad():
        for _, gname, t, ttype in _tensor_plan(ref, arch, qtype):  # state_dict tensors share storage with the copy
            if ttype == gguf.GGMLQuantizationType.F32:
                continue
            data = t.float().numpy()
            # quantization blocks run along the file's rows: a transposed (Conv1D) weight is rounded as the file
            # holds it, then turned back (row reorders such as Llama's Q/K commute with the rounding)
            transposed = gname.endswith(CONV1D_TENSORS.get(arch, ()))
            if transposed:
                data = np.ascontiguousarray(data.T)
            if ttype == gguf.GGMLQuantizationType.F16:
                rounded = data.astype(np.float16).astype(np.float32)
            else:
                rounded = gguf.quants.dequantize(gguf.quants.quantize(data, ttype), ttype)
            if transposed:
                rounded = rounded.T
            t.copy_(torch.from_numpy(np.ascontiguousarray(rounded, dtype=np.float32)).reshape(t.shape))
    return ref


def _add_hparams(writer, config, arch: str) -> None:
    """The model's hyper-parameters under llama.cpp's keys for `arch` (what its converter writes for them)."""
    if arch == "gpt2":
        writer.add_context_length(config.n_positions)
        writer.add_embedding_length(config.n_embd)
        writer.add_block_count(config.n_layer)
        writer.add_feed_forward_length(config.n_inner or 4 * config.n_embd)
        writer.add_head_count(config.n_head)
        writer.add_layer_norm_eps(config.layer_norm_epsilon)
        writer.add_vocab_size(config.vocab_size)
        return
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    if arch == "llama":
        writer.add_rope_dimension_count(head_dim)
    if arch == "phi3":  # rotary width in dimensions; Phi-3 rotates whole heads, later Phi models part of them
        writer.add_rope_dimension_count(int(head_dim * _rope_parameters(config).get("partial_rotary_factor", 1.0)))
        if getattr(config, "sliding_window", None):
            writer.add_sliding_window(config.sliding_window)
    if head_dim != config.hidden_size // n_head:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


def write_gguf(model, tok, path: Path, qtype: str, name: str = "model") -> None:
    """Write `model` (a float32 transformers model of one of ARCHITECTURES) and its tokenizer as one GGUF file."""
    import gguf
    import numpy as np

    config = model.config
    arch = _check_supported(config)
    if qtype not in PYTHON_TYPES:
        raise UserError(f"GGUF type {qtype} cannot be produced in Python; choose one of {', '.join(PYTHON_TYPES)}")
    n_vocab = config.vocab_size

    if name == "mistral" and arch != config.model_type:
        # transformers' GGUF reader takes a "llama" file whose general.name is exactly "mistral" for a type of its
        # own that gguf-py has no tensor map for, and cannot read it back; the name is only informational
        name = "mistral-model"
    if re.search(r"phi-?3", name, re.I) and not {"</s>", "<unk>", "<s>", "<|endoftext|>"} <= set(tok.get_vocab()):
        # llama.cpp gives every special token Phi-3's whitespace rules when general.name contains "phi3"/"phi-3"
        # (llama-vocab.cpp) and looks those four tokens up by text: another vocabulary under such a name does not
        # load. The name is only informational, so it is written without the match.
        name = re.sub(r"(?i)(phi-?)3", r"\g<1>_3", name)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_type("model")
    writer.add_name(name)
    _add_hparams(writer, config, arch)
    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                  "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                  "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}
    writer.add_file_type(file_types[qtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_tokenizer(writer, tok, config, n_vocab)

    if _rope_type(config) == "llama3":
        writer.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight",
                          np.ascontiguousarray(_llama3_rope_factors(config), dtype=np.float32))
    for hf_name, gname, t, ttype in _tensor_plan(model, arch, qtype):
        data = np.ascontiguousarray(_file_layout(arch, gname, t.detach().float().cpu().numpy(), config))
        if ttype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(gname, np.ascontiguousarray(data, dtype=np.float32))
        elif ttype == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(gname, data.astype(np.float16))
        else:
            writer.add_tensor(gname, gguf.quants.quantize(data, ttype), raw_dtype=ttype)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def require_llamacpp(qtype: str) -> None:
    """K-quants need llama.cpp's quantizer; say how to get it before any work is done."""
    from tunelab.export import llamacpp

    if not llamacpp.available():
        raise UserError(f"GGUF type {qtype} needs llama.cpp's quantizer: pip install -e '.[llamacpp]' "
                        f"(builds llama-cpp-python, several minutes), or use one of {', '.join(PYTHON_TYPES)}")


def llamacpp_quantize(src: Path, dst: Path, qtype: str) -> None:
    """K-quants through llama.cpp's own quantizer (its C API, as exposed by llama-cpp-python)."""
    require_llamacpp(qtype)
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype.upper()}")
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise ParityError(f"llama.cpp quantize to {qtype} failed (return code {rc})")


def check_tokenizer(tok, gguf_tok) -> list[list]:
    """Rows (text, same?, expected ids, gguf ids) for plain text, specials and a rendered chat.

    Plain text is expected as llama.cpp should tokenize it under the file's add_bos_token (llamacpp_ids); the chat
    as training tokenized it, without added special tokens on either side (its template writes them)."""
    rows = []
    for t in TOKENIZER_TEXTS:
        a, b = llamacpp_ids(tok, t), gguf_tok.encode(t)
        rows.append([t, a == b and gguf_tok.decode(b) == tok.decode(a), a, b])
    if tok.chat_template:
        t = tok.apply_chat_template([{"role": "user", "content": "Hi! 2+2?"}, {"role": "assistant", "content": "4."}],
                                    tokenize=False)
        a, b = tok.encode(t, add_special_tokens=False), gguf_tok.encode(t, add_special_tokens=False)
        rows.append([t, a == b and gguf_tok.decode(b) == tok.decode(a), a, b])
    return rows


def verify_gguf(path: Path, model, tok, qtype: str) -> dict:
    """Load `path` back with transformers and compare tokenization and logits with the source; print the tables.

    Returns {"ok", "tokenizer": rows (text, same?, source ids, gguf ids), "logits": LogitRows, "tolerance"}.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # transformers takes the tokenizer and config files lying beside a GGUF over the file's own metadata (a merged
    # model exported to the same folder would be checked instead of the file): read the file alone, through a link
    with tempfile.TemporaryDirectory(prefix="tunelab-gguf-") as d:
        f = path.name
        (Path(d) / f).symlink_to(path.resolve())
        gtok = AutoTokenizer.from_pretrained(d, gguf_file=f)
        rope_ok = True
        gap = _readback_gap(model.config)
        if gap:
            print(f"note: transformers cannot rebuild this model's config from the GGUF ({gap}): the weights are "
                  "read back under the source config")
            gmodel = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, config=model.config,
                                                          dtype=torch.float32)
        elif _rope_type(model.config) == "llama3":
            # transformers' GGUF loader does not read llama.cpp's rope_freqs, so the weights are read back under
            # the source config and the stored frequency divisors are checked on their own.
            import gguf
            import numpy as np

            stored = next((t for t in gguf.GGUFReader(path).tensors if t.name == "rope_freqs.weight"), None)
            rope_ok = stored is not None and np.allclose(np.asarray(stored.data),
                                                         _llama3_rope_factors(model.config))
            print(f"llama3 rope scaling: rope_freqs.weight {'matches' if rope_ok else 'DOES NOT match'} the "
                  "source's frequencies (transformers reads the weights back under the source config)")
            gmodel = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, config=model.config,
                                                          dtype=torch.float32)
        else:
            gmodel = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    gmodel.eval()

    tok_rows = check_tokenizer(tok, gtok)
    meta = [["bos token", tok.bos_token, gtok.bos_token], ["eos token", tok.eos_token, gtok.eos_token],
            ["chat template", "present" if tok.chat_template else "none",
             "identical" if gtok.chat_template == tok.chat_template else "DIFFERENT"]]
    meta_ok = meta[0][1] == meta[0][2] and meta[1][1] == meta[1][2] and meta[2][2] == "identical"
    print_table("tokenizer round trip (source vs GGUF read back by transformers):", ["text", "tokens", "same"],
                [[repr(t[:40]), len(a), "yes" if same else "NO"] for t, same, a, _ in tok_rows] +
                [[m[0], m[1], m[2]] for m in meta])
    tok_ok = all(r[1] for r in tok_rows) and meta_ok

    from tunelab.export.common import compare_logits

    ids = prompt_ids(tok)
    got = all_logits(gmodel, ids)
    del gmodel
    source = all_logits(model, ids)
    rows = compare_logits(source, got)
    tol = TOLERANCE[qtype]
    if qtype in PYTHON_TYPES:
        rounded = all_logits(rounded_reference(model, qtype), ids)
        exact = compare_logits(rounded, got)
    else:  # llama.cpp chose the per-tensor K-quant mix: only the quality budget applies
        exact = None
    header = ["prompt", "tokens", "rel vs rounded source", "rel vs source", "max|diff| vs source", "top-1 agree"]
    table = [[r.prompt, r.tokens, f"{e.rel:.2g}" + ("" if e.rel <= EXACT_TOLERANCE else " NO") if e else "n/a",
              f"{r.rel:.3g}" + ("" if r.rel <= tol else " NO"), f"{r.max_abs:.3g}", f"{r.top1:.0%}"]
             for r, e in zip(rows, exact or [None] * len(rows))]
    print_table(f"logits, GGUF {qtype} read back by transformers (allowed: rel <= {EXACT_TOLERANCE:g} vs the source "
                f"with the file's rounding applied, rel <= {tol:g} vs the float32 source):", header, table)
    logits_ok = all(r.rel <= tol for r in rows) and all(e.rel <= EXACT_TOLERANCE for e in exact or [])
    return {"ok": tok_ok and logits_ok and rope_ok, "tokenizer": tok_rows, "logits": rows, "exact": exact,
            "tolerance": tol}


def export_gguf(model, tok, out: Path, qtype: str = "q8_0", overwrite: bool = False, name: str = "model",
                shown: Path | None = None) -> dict:
    """Write, verify, and only then move the GGUF into place. Returns verify_gguf's report plus "path".

    `shown`: the path to name in the message, where `out` is itself staged and renamed later (the Ollama export)."""
    qtype = qtype.lower()
    if qtype not in TYPES:
        raise UserError(f"--type {qtype} is not a GGUF type tunelab writes; choose one of {', '.join(TYPES)}")
    check_target(out, overwrite, "gguf")
    _check_supported(model.config)
    if qtype in LLAMACPP_TYPES:
        require_llamacpp(qtype)
    # the temporary file keeps a .gguf suffix: transformers and llama.cpp read it back under that name for the check
    with atomic_path(out, overwrite, "gguf", suffix=".gguf") as tmp:
        if qtype in LLAMACPP_TYPES:
            with tempfile.TemporaryDirectory(dir=out.parent) as td:
                f32 = Path(td) / "f32.gguf"  # quantize from full precision, not from an already rounded file
                write_gguf(model, tok, f32, "f32", name=name)
                llamacpp_quantize(f32, tmp, qtype)
        else:
            write_gguf(model, tok, tmp, qtype, name=name)
        from tunelab.export import llamacpp

        report = verify_gguf(tmp, model, tok, qtype)
        report["llamacpp"] = llamacpp.verify(tmp, model, tok, qtype)
        if not (report["ok"] and report["llamacpp"]):
            raise ParityError(f"GGUF {qtype} export does not reproduce the source model (see the tables above); "
                              "nothing was written")
    size = out.stat().st_size / 2**20
    print(f"GGUF ({qtype}, {size:.1f} MiB) written to {shown or out}")
    if tokenizer_adds_bos(tok) and not adds_bos(tok):
        print(f"note: the chat template writes no BOS, so llama.cpp is told to add none (add_bos_token false), as "
              f"chats were trained; plain text trained with the tokenizer's {tok.bos_token} first: put it before a "
              "raw completion prompt yourself")
    report["path"] = out
    return report
