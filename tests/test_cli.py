"""The command line itself: overrides anywhere after the config, counts that must be above zero, and --json output
that is JSON only."""

from __future__ import annotations

import json

import pytest
from test_train import make_config

from tunelab import cli


def test_overrides_may_follow_flags():
    parser = cli.build_parser()
    args = cli.parse(parser, ["train", "my.yaml", "a.b=1", "--overwrite", "training.max_steps=1", "--nproc", "1",
                              "x=y"])
    assert args.overwrite and args.overrides == ["a.b=1", "training.max_steps=1", "x=y"]
    args = cli.parse(parser, ["estimate", "t.yaml", "--device", "h100", "training.max_steps=1"])
    assert args.device == "h100" and args.overrides == ["training.max_steps=1"]


@pytest.mark.parametrize("argv", [["train", "my.yaml", "--overwrite", "stray"],
                                  ["train", "my.yaml", "--overwrite", "--bogus"],
                                  ["export", "runs/x", "--to", "merged", "a=b"]])  # export takes no overrides
def test_anything_else_after_a_flag_is_refused(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.parse(cli.build_parser(), argv)
    assert e.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


def test_an_override_after_a_flag_reaches_the_config(tmp_path, tiny_model, tiny_chat_data, capsys):
    path = make_config(tmp_path, tiny_model, tiny_chat_data)
    assert cli.main(["train", str(path), "--overwrite", "training.lerning_rate=1"]) == 2
    assert "training.lerning_rate" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("argv", [["sweep", "s.yaml", "--trials", "0"], ["sweep", "s.yaml", "--trials", "-1"],
                                  ["estimate", "t.yaml", "--nproc", "0"], ["train", "t.yaml", "--nproc", "-2"],
                                  ["estimate", "t.yaml", "--budget-gb", "-5"],
                                  ["estimate", "t.yaml", "--budget-gb", "x"],
                                  ["data", "inspect", "--limit", "-1", "d.jsonl"],
                                  ["quickstart", "--eval-n", "0"], ["infer", "--gguf", "m.gguf", "--n-ctx", "0"],
                                  ["serve", "--max-tokens", "0"], ["chat", "--max-tokens", "-3"],
                                  ["serve", "--max-queue", "-1"]])
def test_counts_and_budgets_must_be_above_zero(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.parse(cli.build_parser(), argv)
    err = capsys.readouterr().err
    flag = next(a for a in argv if a.startswith("--"))
    assert e.value.code == 2 and flag in err, err
    assert "above 0" in err or "0 or more" in err or "expected a float" in err, err


def test_zero_is_a_count_where_it_means_none():
    args = cli.parse(cli.build_parser(), ["serve", "--max-queue", "0"])
    assert args.max_queue == 0


def test_estimate_json_is_json_only(tmp_path, tiny_model, tiny_chat_data, capsys):
    # token lengths cannot be measured (no such data): the note goes to stderr, stdout stays JSON
    path = make_config(tmp_path, tiny_model, tiny_chat_data)
    code = cli.main(["estimate", str(path), "--json", f"data.train={tmp_path / 'missing.jsonl'}"])
    out, err = capsys.readouterr()
    assert code in (0, 1) and "note: token lengths not measured" in err, err
    assert json.loads(out)["device"] == "cpu"
    # a config mistake is not data the estimate can do without: refused as `tunelab train` refuses it
    assert cli.main(["estimate", str(path), "model.chat_template=chatmll"]) == 2
    out, err = capsys.readouterr()
    assert not out and err.startswith("error: model.chat_template: 'chatmll'") and "did you mean 'chatml'" in err
