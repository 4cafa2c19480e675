"""Reading a config: command-line overrides (a value replaces its key whole; text keys keep the text as typed), YAML
numbers written 1e-5, keys given twice and empty files. Each mistake is one UserError line."""

from __future__ import annotations

import pytest
import yaml

from tunelab import cli
from tunelab.config import apply_overrides, read_config
from tunelab.errors import UserError


def write(tmp_path, text: str, name: str = "c.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_a_mapping_or_null_override_replaces_the_key(tmp_path):
    path = write(tmp_path, "training:\n  scheduler: cosine\n  scheduler_kwargs: {num_cycles: 2}\n"
                 "  learning_rate: 1.0e-3\nmethod: {name: dpo, beta: 0.2}\ndata: {columns: {q: prompt}}\n")
    for clear in ("training.scheduler_kwargs={}", "training.scheduler_kwargs=null", "training.scheduler_kwargs="):
        cfg = read_config(path, [clear])
        assert cfg.training.scheduler_kwargs == {} and cfg.training.scheduler == "cosine"
    assert read_config(path, ["data.columns=null"]).data.columns == {}
    # the file's method options do not survive a method given whole
    cfg = read_config(path, ["method={name: sft}"])
    assert cfg.method.name == "sft" and cfg.method.options() == {}
    # a section given whole replaces the file's; keys set after it go into it
    cfg = read_config(path, ["training={max_steps: 3}", "training.batch_size=2"])
    assert (cfg.training.max_steps, cfg.training.batch_size, cfg.training.learning_rate) == (3, 2, 2e-4)
    assert read_config(path, ["training=null"]).training.scheduler == "linear"  # null: the section's defaults
    # a plain key still changes one value and keeps its neighbours
    cfg = read_config(path, ["training.scheduler_kwargs.num_cycles=3"])
    assert cfg.training.scheduler_kwargs == {"num_cycles": 3} and cfg.training.learning_rate == 1e-3


def test_an_option_of_the_files_method_says_how_to_replace_the_section(tmp_path, capsys):
    path = write(tmp_path, "method: {name: dpo, beta: 0.2}\n")
    assert cli.main(["estimate", str(path), "method.name=sft"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'method.beta'" in err and "method={name: NAME}" in err, err


def test_exponent_floats_are_numbers(tmp_path):
    path = write(tmp_path, "training:\n  learning_rate: 1e-4\n  scheduler: cosine_with_min_lr\n"
                 "  scheduler_kwargs: {min_lr: 1e-6}\n")
    cfg = read_config(path)
    assert cfg.training.learning_rate == 1e-4 and cfg.training.scheduler_kwargs == {"min_lr": 1e-6}
    assert isinstance(cfg.training.scheduler_kwargs["min_lr"], float)
    # from an override, and quoted (text) in the file or built in code: the number too
    cfg = read_config(path, ["training.scheduler_kwargs={min_lr: 2e-6}"])
    assert cfg.training.scheduler_kwargs == {"min_lr": 2e-6}
    cfg = read_config(write(tmp_path, "training: {scheduler: cosine_with_min_lr, scheduler_kwargs: {min_lr: '3e-6'}}"))
    assert cfg.training.scheduler_kwargs == {"min_lr": 3e-6}


def test_text_keys_keep_the_text_as_typed(tmp_path):
    path = write(tmp_path, "training: {max_steps: 1}\n")
    template = "{% for m in messages %}{{ m['content'] }}: {% endfor %}"
    cfg = read_config(path, ["output.name=001", f"model.chat_template={template}", "data.train=*.jsonl",
                             "training.report_to=tensorboard"])
    assert cfg.output.name == "001" and cfg.model.chat_template == template and cfg.data.train == "*.jsonl"
    assert cfg.training.report_to == ["tensorboard"]
    cfg = read_config(path, ["output.name='a b'", "model.chat_template=null", "training.report_to=tensorboard,wandb"])
    assert cfg.output.name == "a b" and cfg.model.chat_template is None
    assert cfg.training.report_to == ["tensorboard", "wandb"]
    # transformers' `none`, and a tracker named twice, as training scripts pass them
    for given in ("none", "[none]", "tensorboard,tensorboard"):
        assert read_config(path, [f"training.report_to={given}"]).training.report_to == (
            [] if "none" in given else ["tensorboard"])
    # YAML reads a bare `no` as false: the strategy the README documents is still `no`
    assert read_config(path, ["training.eval_strategy=no"]).training.eval_strategy == "no"
    assert read_config(write(tmp_path, "training: {eval_strategy: no}")).training.eval_strategy == "no"
    # not YAML, for a key that is not text: kept as typed and checked as usual
    assert apply_overrides({}, ["method.x={% a"]) == {"method": {"x": "{% a"}}


@pytest.mark.parametrize("overrides, message", [
    (["training=x", "training.learning_rate=1"], "'training' is set to 'x', not a section"),
    (["training..learning_rate=1"], "not a dotted config key"),
    (["training.learning_rate"], "is not key=value"),
])
def test_override_mistakes_are_one_line(tmp_path, overrides, message):
    with pytest.raises(UserError, match=message) as e:
        read_config(write(tmp_path, "training: {max_steps: 1}\n"), overrides)
    assert "\n" not in str(e.value)


def test_keys_given_twice_and_empty_files_are_refused(tmp_path):
    dup = write(tmp_path, "training:\n  learning_rate: 1e-4\ntraining:\n  max_steps: 3\n", "dup.yaml")
    with pytest.raises(UserError, match=r"dup.yaml:3: .*'training' given twice \(first on line 1\)"):
        read_config(dup)
    inner = write(tmp_path, "training: {max_steps: 1, max_steps: 2}\n", "inner.yaml")
    with pytest.raises(UserError, match="'max_steps' given twice"):
        read_config(inner)
    for text in ("", "# only a comment\n"):
        with pytest.raises(UserError, match="empty.yaml is empty"):
            read_config(write(tmp_path, text, "empty.yaml"))
    # the same YAML a file holds when read by plain PyYAML: duplicates are the only difference
    assert yaml.safe_load(dup.read_text()) == {"training": {"max_steps": 3}}
