"""Reward functions for GRPO/PPO, in TRL's reward-function signature: `f(completions, **kwargs) -> list[float]`.

TRL calls each reward function with `prompts`, `completions` and every extra dataset column as keyword arguments
(here the gold `answer`). Completions are strings for plain prompts and lists of messages for conversational ones;
both are accepted everywhere. GSM8K correctness shares its answer extraction with `tunelab eval --task gsm8k`, so the
reward trains towards exactly what the evaluation scores.

Configs name rewards by string: a built-in (`gsm8k_correct`, `format`, `length`, `reward_model`), a
`module:function`, or `path/to/file.py:function`; `build_rewards` turns a list of such specs (with weights and
options) into the `(reward_funcs, reward_weights)` pair that TRL's GRPOConfig takes.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from pathlib import Path

from tunelab.errors import UserError, suggest
from tunelab.evaluation.extract import extract_answer, has_format, normalize_number, numbers_equal


def completion_text(completion) -> str:
    """The text of one completion: a string, or the assistant content of a list of messages (or one message)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return str(completion.get("content", ""))
    if isinstance(completion, list):
        parts = [m.get("content", "") if isinstance(m, dict) else str(m) for m in completion
                 if not isinstance(m, dict) or m.get("role", "assistant") == "assistant"]
        return "\n".join(p for p in parts if isinstance(p, str))
    return "" if completion is None else str(completion)


def _gold(answer) -> str | None:
    """A gold answer as a number: plain ('72', 72) or a GSM8K solution ending in '#### 72'."""
    if isinstance(answer, str) and "####" in answer:
        return extract_answer(answer)
    return normalize_number(answer)


def gsm8k_correct(completions, answer=None, **kwargs) -> list[float]:
    """1.0 where the completion's final number (#### N, \\boxed{N}, <answer>N</answer>, or the last number) equals
    the gold `answer` column, else 0.0."""
    if answer is None:
        raise UserError("reward gsm8k_correct needs an 'answer' column in the training data (the gold number)")
    if isinstance(answer, (str, int, float)):  # one gold answer for all completions
        answer = [answer] * len(completions)
    return [1.0 if numbers_equal(extract_answer(completion_text(c)), _gold(a)) else 0.0
            for c, a in zip(completions, answer)]


# the data columns a reward reads and how each value is parsed (None: unusable); check_specs looks at every row
gsm8k_correct.needs = {"answer": _gold}


# The reasoning format GRPO recipes teach: the whole completion is a reasoning block followed by an answer block.
_TAGS_RE = re.compile(r"\A\s*<reasoning>(?:(?!</?reasoning>).)*?</reasoning>\s*<answer>(?:(?!</?answer>).)*?</answer>\s*\Z",
                      re.DOTALL)


def format_reward(completions, **kwargs) -> list[float]:
    """1.0 where the completion is `<reasoning>…</reasoning><answer>…</answer>` (nothing else around it, answer not
    empty) or states its answer GSM8K-style ("#### N"), else 0.0."""
    out = []
    for c in completions:
        text = completion_text(c)
        ok = has_format(text)
        if not ok and len(text) < 100_000 and _TAGS_RE.match(text):
            ok = bool(text.split("<answer>", 1)[1].split("</answer>", 1)[0].strip())
        out.append(1.0 if ok else 0.0)
    return out


format_reward.__name__ = "format"  # TRL logs each reward by its function name


def make_length(target: int = 200, unit: str = "words", tolerance: float | None = None):
    """A reward for completions near `target` words (or characters): 1.0 at the target, falling linearly to 0.0 at
    `tolerance` away (default: the target itself, i.e. 0 words or twice the target score 0)."""
    if unit not in ("words", "chars"):
        raise UserError(f"reward length: unit must be 'words' or 'chars', not '{unit}'")
    if target <= 0:
        raise UserError("reward length: target must be a positive number")
    tol = float(tolerance or target)

    def length(completions, **kwargs) -> list[float]:
        out = []
        for c in completions:
            text = completion_text(c)
            n = len(text.split()) if unit == "words" else len(text)
            out.append(max(0.0, 1.0 - abs(n - target) / tol))
        return out

    return length


length = make_length()


def reward_model(path: str, batch_size: int = 8, max_length: int = 1024, device: str | None = None):
    """A reward from a sequence-classification model (e.g. one trained by the reward method): the score of its first
    logit for prompt + completion, rendered with the reward model's chat template when the data is conversational."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    p = Path(path)
    if not (p / "config.json").is_file():
        raise UserError(f"reward_model: {path} is not a model directory (no config.json); point it at the final/ "
                        "directory of a reward-model run")
    tok = AutoTokenizer.from_pretrained(p)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForSequenceClassification.from_pretrained(p)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    model.to(device or ("cuda" if torch.cuda.is_available() else "cpu")).eval()

    def render(prompt, completion) -> str:
        if isinstance(completion, list) and tok.chat_template:
            msgs = (list(prompt) if isinstance(prompt, list) else [{"role": "user", "content": prompt or ""}])
            return tok.apply_chat_template(msgs + list(completion), tokenize=False)
        prompt_text = completion_text(prompt) if isinstance(prompt, list) else (prompt or "")
        return prompt_text + completion_text(completion)

    def score(completions, prompts=None, **kwargs) -> list[float]:
        prompts = prompts if prompts is not None else [""] * len(completions)
        texts = [render(p_, c) for p_, c in zip(prompts, completions)]
        scores: list[float] = []
        old_side, tok.truncation_side = tok.truncation_side, "left"  # keep the completion when truncating
        try:
            for i in range(0, len(texts), batch_size):
                enc = tok(texts[i: i + batch_size], return_tensors="pt", padding=True, truncation=True,
                          max_length=max_length, add_special_tokens=False).to(model.device)
                with torch.inference_mode():
                    scores += model(**enc).logits[:, 0].float().tolist()
        finally:
            tok.truncation_side = old_side
        return scores

    score.__name__ = "reward_model"
    # one sample scored now, while the method builds its trainer (before the run directory is written): a model
    # that loads but cannot score (e.g. a head saved in another dtype than its body) would otherwise fail at the
    # first training step, as a traceback, with the run directory already written
    try:
        score(["Hello."], prompts=["Say hello."])
    except (RuntimeError, ValueError, TypeError, IndexError) as e:
        why = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UserError(f"reward_model: {path} loads but cannot score a sample ({type(e).__name__}: {why}); point it "
                        "at a model that AutoModelForSequenceClassification loads and runs, e.g. retrain it with "
                        "method.name=reward") from None
    return score


BUILTIN = {"gsm8k_correct": gsm8k_correct, "format": format_reward, "length": make_length,
           "reward_model": reward_model}
FACTORIES = {"length", "reward_model"}  # built-ins that take options and return the reward function


def load_user_function(spec: str):
    """`package.module:function` or `path/to/file.py:function` -> the function."""
    target, _, name = spec.rpartition(":")
    if not target or not name:
        raise UserError(f"reward '{spec}': expected module:function or path/to/file.py:function")
    if target.endswith(".py"):
        path = Path(target).expanduser()
        if not path.is_file():
            raise UserError(f"reward '{spec}': file {target} not found")
        mod_spec = importlib.util.spec_from_file_location(f"tunelab_user_reward_{path.stem}", path)
        module = importlib.util.module_from_spec(mod_spec)
        try:
            mod_spec.loader.exec_module(module)
        except Exception as e:  # noqa: BLE001 - the user's file failed to import: say which and why, in one line
            raise UserError(f"reward '{spec}': importing {target} failed: {type(e).__name__}: {e}") from None
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise UserError(f"reward '{spec}': cannot import module {target} ({e})") from None
    func = getattr(module, name, None)
    if not callable(func):
        raise UserError(f"reward '{spec}': {target} has no function '{name}'")
    return func


def resolve(name: str, options: dict | None = None):
    """One reward function from its name (built-in or user's) and options (for factories)."""
    options = options or {}
    if name in BUILTIN:
        if name in FACTORIES:
            try:
                return BUILTIN[name](**options)
            except TypeError as e:
                raise UserError(f"reward '{name}': bad option ({e})") from None
        if options:
            raise UserError(f"reward '{name}' takes no options (got {', '.join(options)})")
        return BUILTIN[name]
    if ":" in name:
        func = load_user_function(name)
        return func(**options) if options else func
    raise UserError(f"unknown reward '{name}'{suggest(name, BUILTIN)}; built-ins: {', '.join(BUILTIN)}, or give "
                    "module:function or path/to/file.py:function")


def build_rewards(specs) -> tuple[list, list[float]]:
    """Reward specs -> (functions, weights) for TRL (`GRPOConfig(reward_weights=weights)`).

    A spec is a name (`"gsm8k_correct"`, `"my_pkg.rewards:brevity"`) or a mapping with `name`, optional `weight`
    (default 1.0) and options for factories, e.g. `{"name": "length", "target": 150, "weight": 0.2}` or
    `{"name": "reward_model", "path": "runs/rm/final"}`. With options, a user's function is called with them and
    must return the reward function (a factory).
    """
    if isinstance(specs, (str, dict)):
        specs = [specs]
    if not specs:
        raise UserError("no rewards configured: list at least one (e.g. gsm8k_correct)")
    funcs, weights = [], []
    for i, spec in enumerate(specs):
        if isinstance(spec, str):
            name, weight, options = spec, 1.0, {}
        elif isinstance(spec, dict) and "name" in spec:
            options = {k: v for k, v in spec.items() if k not in ("name", "weight")}
            name, weight = spec["name"], spec.get("weight", 1.0)
        else:
            raise UserError(f"rewards[{i}]: expected a name or a mapping with 'name' (and optional 'weight')")
        if not isinstance(weight, (int, float)) or isinstance(weight, bool):
            raise UserError(f"rewards[{i}] ({name}): weight must be a number")
        funcs.append(resolve(name, options))
        weights.append(float(weight))
    return funcs, weights


def check_specs(specs, rows=()) -> None:
    """Resolve reward specs before anything loads (unknown names, missing files); a reward model is only looked for,
    loaded later. `rows`: the prompts rewarded (training and validation), each holding what its rewards read (a
    reward's `needs`): a prompt without its gold answer would score 0 whatever the model says."""
    light = []
    for spec in specs:
        if isinstance(spec, dict) and spec.get("name") == "reward_model":
            path = spec.get("path")
            if not path or not (Path(path) / "config.json").is_file():
                raise UserError(f"reward_model: {path} is not a model directory (no config.json); point it at the "
                                "final/ directory of a reward-model run")
        else:
            light.append(spec)
    if light or not specs:
        for func in build_rewards(light)[0]:
            for column, parse in getattr(func, "needs", {}).items():
                unusable = [r for r in rows if parse(r.get(column)) is None]
                if unusable:
                    raise UserError(f"reward {func.__name__} needs a usable '{column}' in every prompt row, and "
                                    f"{len(unusable)} of {len(rows)} have none (e.g. {unusable[0].get(column)!r} "
                                    f"for {str(unusable[0].get('prompt'))[:60]!r}): add it to the data or drop "
                                    "this reward")
