"""Several references per sample: detected from DialogSum's summary1..N or a `references` list (or mapped to one
with --column), scored as ROUGE against the best reference and as the mean over references, both in the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunelab.cli import main as cli
from tunelab.errors import UserError

MULTI = Path(__file__).parent / "assets" / "data" / "multiref"
DIALOGSUM_TEST = MULTI / "dialogsum_test.jsonl"


def test_dialogsum_test_rows_are_detected_with_their_references():
    from tunelab.data.build import load_records
    from tunelab.config import DataConfig

    info = {}
    recs = load_records(str(DIALOGSUM_TEST), DataConfig(train=str(DIALOGSUM_TEST)), info)
    assert set(info["formats"].values()) == {"dialogue_summary"}
    first = json.loads(DIALOGSUM_TEST.read_text().splitlines()[0])
    assert recs[0]["references"] == [first["summary1"], first["summary2"], first["summary3"]]
    # training reads the first reference
    assert recs[0]["messages"][-1] == {"role": "assistant", "content": first["summary1"]}
    assert recs[0]["messages"][0]["content"].startswith("Summarize the following dialogue.")


def test_references_list_mapped_with_columns():
    from tunelab.evaluation.common import load_records

    recs = load_records(str(MULTI / "summaries_list.jsonl"), columns={"text": "dialogue", "summaries": "references"})
    assert [len(r["references"]) for r in recs] == [2, 2]
    assert recs[1]["messages"][-1]["content"] == "The dog ran to the park."


def test_single_reference_rows_are_unchanged(tmp_path):
    from tunelab.evaluation.common import load_records

    p = tmp_path / "one.jsonl"
    p.write_text(json.dumps({"dialogue": "#Person1#: Hi.\n#Person2#: Hello.", "summary": "They greet."}) + "\n")
    (rec,) = load_records(str(p))
    assert "references" not in rec and rec["answer"] == "They greet."


def test_bad_references_are_refused_with_the_row(tmp_path):
    from tunelab.evaluation.common import load_records

    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps({"dialogue": "#Person1#: Hi.", "references": ["ok", ""]}) + "\n")
    with pytest.raises(UserError, match=r"bad.jsonl:1: 'references' must be a non-empty list"):
        load_records(str(p))


def test_rouge_best_and_mean_over_references_hand_checked():
    pytest.importorskip("rouge_score")
    from tunelab.evaluation.summarization import rouge_multi

    same, partly = rouge_multi(["the cat sat", "the cat ran on the mat"],
                               [["the cat sat", "a dog ran"], ["the cat sat on the mat", "a dog ran"]])
    # an exact match and a reference sharing no word: best 1, mean 1/2, for every ROUGE type
    assert same == {f"{k}_{how}": v for k in ("rouge1", "rouge2", "rougeL")
                    for how, v in (("best_ref", 1.0), ("mean_ref", 0.5))}
    # vs ref 1: 5 of 6 words match (P = R = 5/6), 3 of 5 bigrams, LCS 5; vs ref 2: only "ran" (P 1/6, R 1/3)
    f_ref2 = 2 * (1 / 6) * (1 / 3) / (1 / 6 + 1 / 3)
    assert partly["rouge1_best_ref"] == pytest.approx(5 / 6)
    assert partly["rouge1_mean_ref"] == pytest.approx((5 / 6 + f_ref2) / 2)
    assert partly["rouge2_best_ref"] == pytest.approx(3 / 5)
    assert partly["rouge2_mean_ref"] == pytest.approx(3 / 10)
    assert partly["rougeL_best_ref"] == pytest.approx(5 / 6)
    assert partly["rougeL_mean_ref"] == pytest.approx((5 / 6 + f_ref2) / 2)


def test_eval_scores_every_reference_and_names_best_and_mean(tiny_model, tmp_path):
    rouge_score = pytest.importorskip("rouge_score")
    out = tmp_path / "report"
    assert cli(["eval", "--model", tiny_model, "--task", "summarization", "--data", str(DIALOGSUM_TEST),
                "--max-new-tokens", "6", "--batch-size", "2", "--out", str(out)]) == 0
    res = json.loads((out / "report.json").read_text())["results"][0]["tasks"]["summarization"]
    assert res["n"] == 2 and res["references"] == 3
    scorer = rouge_score.rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    for ex in res["examples"]:
        assert len(ex["references"]) == 3
        direct = [scorer.score(ref, ex["output"]) for ref in ex["references"]]
        for k in ("rouge1", "rouge2", "rougeL"):
            f = [d[k].fmeasure for d in direct]
            assert ex[f"{k}_best_ref"] == pytest.approx(max(f)) and ex[f"{k}_mean_ref"] == pytest.approx(sum(f) / 3)
            assert ex[f"{k}_best_ref"] >= ex[f"{k}_mean_ref"]
    for k in ("rouge1", "rouge2", "rougeL"):
        assert res[f"{k}_best_ref"] == pytest.approx(sum(e[f"{k}_best_ref"] for e in res["examples"]) / 2)
        assert res[f"{k}_best_ref"] >= res[f"{k}_mean_ref"]
    md = (out / "report.md").read_text()
    assert "| summarization | rougeL_best_ref |" in md and "| summarization | rougeL_mean_ref |" in md
    assert "ROUGE-L best ref" in md


def test_data_inspect_says_training_uses_the_first_reference(tiny_model):
    from tunelab.config import DataConfig
    from tunelab.data.inspection import inspect
    from tunelab.models import load_tokenizer

    tok = load_tokenizer(tiny_model)
    rep = inspect([str(DIALOGSUM_TEST)], tok, DataConfig(train=str(DIALOGSUM_TEST), cache=False))
    assert any("several references (up to 3): training uses the first" in w for w in rep["warnings"])


def test_eval_maps_a_references_column(tiny_model, capsys):
    pytest.importorskip("rouge_score")
    data = str(MULTI / "summaries_list.jsonl")
    assert cli(["eval", "--model", tiny_model, "--task", "summarization", "--data", data, "--n", "1",
                "--max-new-tokens", "2", "--column", "text=dialogue", "--column", "summaries=references"]) == 0
    assert "rougeL_best_ref=" in capsys.readouterr().out
    from tunelab.evaluation.main import evaluate

    res = evaluate("summarization", model=tiny_model, data=data, n=1, max_new_tokens=2,
                   column={"text": "dialogue", "summaries": "references"})
    assert res["references"] == 2 and res["examples"][0]["references"] == ["The cat sat on the mat.",
                                                                          "A cat is on a mat."]
