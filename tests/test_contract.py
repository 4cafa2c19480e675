"""The method contract and the adapter table: a method defined outside the package trains through the public table;
every method/adapter pair a method does not declare is refused before anything is written; every adapter trains at
the default precision; the layers import one way; the Python API drives a run end to end."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict, Field

from tunelab import cli, methods
from tunelab.adapters import ADAPTER_TYPES, ADAPTERS
from tunelab.errors import UserError
from tunelab.methods.contract import Method

SRC = Path(__file__).resolve().parents[1] / "src" / "tunelab"


def write_config(tmp_path, tiny_model, data, method, name="run", adapter=None, **training) -> Path:
    import yaml

    cfg = {"model": {"source": tiny_model}, "data": {"train": data, "max_length": 64},
           "method": method, "adapter": {"type": "lora", "r": 4, "alpha": 8, "num_virtual_tokens": 4, **(adapter or {})},
           "training": {"max_steps": 6, "batch_size": 4, "learning_rate": 1e-2, "save_steps": 100, **training},
           "output": {"dir": str(tmp_path / "runs"), "name": name}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def losses(summary) -> list[float]:
    rows = map(json.loads, (Path(summary["run"]) / "metrics.jsonl").read_text().splitlines())
    return [r["loss"] for r in rows if "loss" in r]


# ------------------------------------------------------------------------------------- a method from outside

class ToyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="passed to the Trainer")


class Toy(Method):
    """Plain next-token loss through transformers' own Trainer: the smallest method the contract allows."""

    Config = ToyConfig
    adapters = ("none", "lora")

    def build(self, cfg, opts, model, tokenizer, data, args):
        from datasets import Dataset
        from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

        return Trainer(model=model, args=TrainingArguments(**args, label_smoothing_factor=opts.label_smoothing),
                       train_dataset=Dataset.from_list(data.train),
                       data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100))


@pytest.fixture
def toy():
    methods.register("toy", Toy())
    yield
    del methods.METHODS["toy"]


def test_a_method_registered_from_outside_trains(tmp_path, tiny_model, tiny_chat_data, toy):
    from tunelab import finetune, load_config

    path = write_config(tmp_path, tiny_model, tiny_chat_data, {"name": "toy"}, adapter={"type": "none"},
                        max_steps=12, learning_rate=3e-3)
    summary = finetune(load_config(path), show_progress=False, echo=lambda *a: None)
    assert summary["status"] == "complete" and summary["method"] == "toy"
    ls = losses(summary)
    assert len(ls) == 12 and ls[-1] < ls[0] - 0.5, ls
    assert (Path(summary["final"]) / "config.json").is_file()
    # its own options and its adapter declaration are checked like a shipped method's
    with pytest.raises(UserError, match="method.label_smothing"):
        load_config(write_config(tmp_path, tiny_model, tiny_chat_data, {"name": "toy", "label_smothing": 0.1}, "b"))
    with pytest.raises(UserError, match="method 'toy' does not train with adapter.type 'dora'"):
        load_config(write_config(tmp_path, tiny_model, tiny_chat_data, {"name": "toy"}, "c", adapter={"type": "dora"}))


def test_register_refuses_what_is_not_a_method():
    with pytest.raises(TypeError):
        methods.register("bad", object())


# ------------------------------------------------------------------------------- method / adapter pairs

# The pairs each shipped method trains with (checked by training every one on a tiny model); the rest are refused.
ACCEPTED = {
    "sft": set(ADAPTER_TYPES), "dpo": set(ADAPTER_TYPES), "kto": set(ADAPTER_TYPES), "grpo": set(ADAPTER_TYPES),
    "orpo": {"none", "lora", "dora", "ia3", "prefix"}, "simpo": {"none", "lora", "dora", "ia3", "prefix"},
    "distill": {"none", "lora", "dora", "ia3", "prefix"}, "reward": {"none", "lora", "dora", "ia3"},
    "ppo": {"none", "lora", "dora"},
}


def test_pair_table_matches_the_declarations():
    assert set(ACCEPTED) == set(methods.METHODS)
    for name, accepted in ACCEPTED.items():
        assert set(methods.get(name).adapters) == accepted, name


@pytest.mark.parametrize("name", sorted(ACCEPTED))
def test_unsupported_pairs_are_refused_before_anything_loads(tmp_path, name):
    from tunelab import load_config

    for adapter in sorted(set(ADAPTER_TYPES) - ACCEPTED[name]):
        with pytest.raises(UserError, match=f"method '{name}' does not train with adapter.type '{adapter}'; it takes"):
            load_config(None, [f"method.name={name}", f"adapter.type={adapter}"])


def test_cli_refuses_a_pair_in_one_line_and_writes_nothing(tmp_path, tiny_model, tiny_chat_data, capsys):
    path = write_config(tmp_path, tiny_model, tiny_chat_data, {"name": "reward"}, adapter={"type": "prefix"})
    assert cli.main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: method 'reward' does not train with adapter.type 'prefix'; it takes none, lora, dora, ia3"]
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("adapter", ADAPTER_TYPES)
def test_every_adapter_trains_at_the_default_precision(tmp_path, tiny_model, tiny_chat_data, adapter):
    """precision: auto (bf16 on a CPU that has it): IA3 used to crash there in the lean loss."""
    from tunelab import finetune, load_config

    path = write_config(tmp_path, tiny_model, tiny_chat_data, {"name": "sft"}, adapter={"type": adapter},
                        max_steps=2, precision="auto")
    summary = finetune(load_config(path), show_progress=False, echo=lambda *a: None)
    assert summary["status"] == "complete" and len(losses(summary)) == 2


@pytest.mark.parametrize("adapter", ["lora", "dora"])
def test_gradient_checkpointing_trains_at_the_default_precision(tmp_path, tiny_model, tiny_chat_data, adapter):
    """The lean loss under bf16 with checkpointing: the recompute in backward must see the forward's dtypes (it
    raised a CheckpointError when the memory plan turned checkpointing on for a DoRA run)."""
    from tunelab import finetune, load_config

    path = write_config(tmp_path, tiny_model, tiny_chat_data, {"name": "sft"}, adapter={"type": adapter},
                        max_steps=2, precision="auto", gradient_checkpointing=True)
    summary = finetune(load_config(path), show_progress=False, echo=lambda *a: None)
    assert summary["status"] == "complete" and len(losses(summary)) == 2


def test_adapter_table_declares_what_the_estimate_and_reference_need():
    assert [a for a in ADAPTERS.values() if a.trains_base] == [ADAPTERS["none"]]
    assert {a.name for a in ADAPTERS.values() if a.prompt_learning} == {"prefix", "prompt", "ptuning"}
    assert not any(a.mergeable for a in ADAPTERS.values() if a.prompt_learning)
    arch = {"params": 1000, "linears": [("q_proj", 8, 8), ("up_proj", 8, 16)], "hidden": 8, "layers": 2}
    from tunelab.config import AdapterConfig

    assert ADAPTERS["lora"].params(AdapterConfig(r=2), arch) == 2 * (16 + 24)
    assert ADAPTERS["dora"].params(AdapterConfig(type="dora", r=2), arch) == 2 * (16 + 24) + 8 + 16
    assert ADAPTERS["prefix"].params(AdapterConfig(type="prefix", num_virtual_tokens=3), arch) == 3 * 8 * 4


# ---------------------------------------------------------------------------------------------------- layers

def import_graph() -> dict[str, set[str]]:
    """Module -> the tunelab modules it imports (at the top or inside functions)."""
    mods = {}
    for p in SRC.rglob("*.py"):
        name = ".".join(p.relative_to(SRC.parent).with_suffix("").parts).removesuffix(".__init__")
        mods[name] = p
    graph = {}
    for name, p in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tunelab"):
                deps.update(f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in mods else node.module
                            for a in node.names)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("tunelab"))
        graph[name] = {d for d in deps if d in mods and d != name}
    return graph


def test_no_import_cycles():
    graph = import_graph()
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(dep):] + [dep]))
            if dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_lower_layers_do_not_import_higher_ones():
    graph = import_graph()
    assert graph["tunelab.config"] <= {"tunelab.errors", "tunelab.adapters"}, graph["tunelab.config"]
    assert graph["tunelab.adapters"] <= {"tunelab.errors"}
    above_data = ("tunelab.methods", "tunelab.train", "tunelab.estimate", "tunelab.api", "tunelab.checks",
                  "tunelab.cli", "tunelab.sweep", "tunelab.export", "tunelab.evaluation", "tunelab.inference")
    above_methods = ("tunelab.train", "tunelab.estimate", "tunelab.api", "tunelab.checks", "tunelab.cli",
                     "tunelab.sweep", "tunelab.export", "tunelab.runs", "tunelab.quickstart")
    for module, deps in graph.items():
        if module.startswith("tunelab.data"):
            assert not [d for d in deps if d.startswith(above_data)], module
        if module.startswith("tunelab.methods"):
            assert not [d for d in deps if d.startswith(above_methods)], module


def test_no_adapter_or_method_names_tested_outside_their_tables():
    """`adapter.type == "lora"` or `method.name in (...)` outside adapters.py would bring back the edits a new
    adapter or method used to need in several files."""
    import re

    pattern = re.compile(r"(adapter\.type|method\.name|\.KIND)\s*(==|!=|in\b|not in\b)")
    found = [f"{p.relative_to(SRC)}:{i}" for p in SRC.rglob("*.py") if p.name != "adapters.py"
             for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not found, found


# ------------------------------------------------------------------------------------------------ Python API

def test_python_api_drives_a_run(tmp_path, tiny_model, tiny_chat_data):
    import tunelab

    cfg = tunelab.load_config(write_config(tmp_path, tiny_model, tiny_chat_data, {"name": "sft"}, name="api",
                                           precision="fp32"), ["training.max_steps=8"])
    summary = tunelab.finetune(cfg, show_progress=False, echo=lambda *a: None)
    assert summary["status"] == "complete" and summary["global_step"] == 8
    scores = tunelab.evaluate("perplexity", run=summary["run"], data=tiny_chat_data, n=8)
    assert scores["n"] == 8 and scores["perplexity"] > 1
    merged = tunelab.export_run(summary["run"], to="merged")
    assert (merged / "config.json").is_file()
    # the same errors as the CLI: a typo is one line naming the nearest key
    with pytest.raises(UserError, match="did you mean 'learning_rate'"):
        tunelab.load_config(None, ["training.lerning_rate=1e-4"])
    assert tunelab.load_config(None, "training.max_steps=3").training.max_steps == 3  # one override as a string
    with pytest.raises(UserError, match=r"^export_run: unknown option 'qtpye' \(did you mean 'qtype'\?\)"):
        tunelab.export_run(summary["run"], to="gguf", qtpye="f16")
