"""`tunelab data inspect SOURCE`: what the data layer makes of a dataset, before any training is spent on it.

Reports the chat template in use (the model's own, a built-in one by name, or the default for base models), the
detected format, row counts, token lengths under the model's chat template (min/median/p95/max and a
histogram), over-long samples, exact duplicates, invalid rows (with file:line), the first sample rendered with its
trained tokens highlighted, and warnings: EOS never trained, a system prompt the template inserts by itself,
duplicates, over-long samples.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from tunelab.data import build, formats, render, templates
from tunelab.errors import UserError

DEFAULT_MODEL = "embedded:smollm2-135m-instruct"


def load_tokenizer(model: str, chat_template: str | None = None):
    """The tokenizer of a model source, with the chat template training would use (`chat_template`: a built-in
    name, Jinja or a file, as model.chat_template); a directory holding only a tokenizer (no config.json) works too."""
    p = Path(model).expanduser()
    if p.is_dir() and not (p / "config.json").is_file() and (p / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(p)
        templates.apply(tok, chat_template)  # as models.load_tokenizer does
        return tok
    from tunelab.models import load_tokenizer as load

    return load(model, chat_template=chat_template)


_percentile = build.percentile


def histogram(lengths: list[int], bins: int = 10) -> list[dict]:
    if not lengths:
        return []
    lo, hi = min(lengths), max(lengths)
    width = max(1, -(-(hi - lo + 1) // bins))
    out = [{"from": lo + i * width, "to": lo + (i + 1) * width - 1, "count": 0} for i in range(bins)]
    for n in lengths:
        out[min(bins - 1, (n - lo) // width)]["count"] += 1
    while out and out[-1]["count"] == 0:
        out.pop()
    return out


def _prompt_encoding(tok, r: dict) -> render.Encoded:
    """A prompt-only row (GRPO/PPO) as the rollout renders it: up to where the reply begins, nothing trained."""
    ids = tok(render.render(tok, r["prompt"], add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    return render.Encoded(ids, [render.IGNORE] * len(ids), length=len(ids))


def inspect(source, tok, data_cfg, limit: int | None = None) -> dict:
    """The report as a JSON-ready dict (what `--json` prints)."""
    info = build._new_info()
    records = build.load_records(source, data_cfg, info)
    kinds: dict[str, int] = {}
    for r in records:
        k = formats.kind_of(r)
        kinds[k] = kinds.get(k, 0) + 1
    sample = records[:limit] if limit else records
    lengths, no_reply, eos_missing, overlong, reply_lost = [], 0, 0, 0, 0
    first = None
    for r in sample:
        enc = _prompt_encoding(tok, r) if formats.kind_of(r) == "prompt" else build.encode_record(tok, r)
        n = len(enc.input_ids)
        if "rejected" in r:  # a preference pair is as long as its longer side
            n = max(n, len(render.encode_conversation(tok, r["prompt"] + r["rejected"]).input_ids))
        lengths.append(n)
        overlong += n > data_cfg.max_length
        if n > data_cfg.max_length and data_cfg.overlong == "truncate" and formats.kind_of(r) != "prompt":
            # cut where training cuts it: a prompt that fills max_length leaves no reply, and training drops it
            cut = build.encode_record(tok, r, data_cfg.max_length)
            reply_lost += all(lab == render.IGNORE for lab in cut.labels)
        trained = any(lab != render.IGNORE for lab in enc.labels)
        if not trained:
            no_reply += 1
        elif not render.eos_trained(tok, enc):
            eos_missing += 1
        if first is None:
            first = (r, enc)
    srt = sorted(lengths)
    stats = ({"min": srt[0], "median": int(statistics.median(srt)), "p95": _percentile(srt, 0.95), "max": srt[-1],
              "mean": round(sum(srt) / len(srt), 1)} if srt else {})
    fmt_names = sorted(set(info["formats"].values()))
    report = {
        "source": source if isinstance(source, str) else [getattr(s, "path", s) for s in source],
        "template": templates.describe(tok),
        "format": fmt_names[0] if len(fmt_names) == 1 else fmt_names,
        "kinds": kinds,
        "rows": {"read": info["rows"], "valid": len(records), "invalid": info["invalid_skipped"],
                 "duplicates": info["duplicates"]},
        "tokens": {"measured": len(lengths), "max_length": data_cfg.max_length, "overlong": overlong,
                   **({"reply_cut_off": reply_lost} if reply_lost else {}), **stats},
        "histogram": histogram(lengths),
        "invalid_examples": info["problems"],
        "warnings": [],
    }
    if first is not None:
        r, enc = first
        note = None
        if len(enc.input_ids) > data_cfg.max_length:
            # shown as training will see it: cut where data.overlong: truncate cuts (or said to be dropped/refused)
            note = {"truncate": f"cut at data.max_length={data_cfg.max_length} of its {len(enc.input_ids)} tokens, "
                                "as training cuts it",
                    "drop": f"{len(enc.input_ids)} tokens, over data.max_length={data_cfg.max_length}: training "
                            "drops it (data.overlong: drop)",
                    "error": f"{len(enc.input_ids)} tokens, over data.max_length={data_cfg.max_length}: training "
                             "refuses it (data.overlong: error)"}[data_cfg.overlong]
            if data_cfg.overlong == "truncate" and formats.kind_of(r) != "prompt":
                enc = build.encode_record(tok, r, data_cfg.max_length)
        report["first_sample"] = {
            "origin": r.get("origin"),
            **({"overlong": note} if note else {}),
            "tokens": len(enc.input_ids),
            "trained_tokens": sum(lab != render.IGNORE for lab in enc.labels),
            "rendered": render.show_mask(tok, enc, width=100_000),
            "segments": render.mask_segments(tok, enc),
        }
        for key in ("answer", "label"):
            if key in r:
                report["first_sample"][key] = r[key]
        if "rejected" in r:
            report["first_sample"]["rejected"] = "\n".join(m["content"] for m in r["rejected"])
    w = report["warnings"]
    if info["invalid_skipped"]:
        w.append(f"{info['invalid_skipped']} invalid rows skipped (training stops at the first one unless "
                 f"data.on_invalid: skip); first: {info['problems'][0]}")
    if eos_missing:
        w.append(f"EOS not trained in {eos_missing} samples: the model would not learn to stop; check the chat "
                 "template and that max_length does not cut replies")
    if no_reply and kinds.get("prompt", 0) < len(records):
        w.append(f"{no_reply} samples have no trained tokens (no assistant reply); SFT drops them")
    multi = [len(r["references"]) for r in records if len(r.get("references") or []) > 1]
    if multi:
        w.append(f"{len(multi)} samples have several references (up to {max(multi)}): training uses the first; "
                 "tunelab eval scores summarization against all of them (best and mean)")
    default_sys = render.default_system_prompt(tok)
    if default_sys:
        without = sum(1 for r in records if (msgs := formats.conversation(r)) and msgs[0]["role"] != "system")
        if without:
            w.append(f"the chat template inserts its own system prompt into {without} conversation(s) that have none "
                     f"({default_sys!r}); set data.system_prompt to choose one")
    for path, fields in info.get("unused_fields", {}).items():
        name = info["formats"].get(path)
        if name and formats.FORMATS[name].fallback:  # prompt/text are chosen when nothing else fits: a likely misread
            w.append(f"format {name} leaves field(s) {', '.join(fields)} of {path} unread; if one holds the reply, "
                     f"map it (e.g. data.columns: {{{fields[0]}: completion}}) or set data.format")
    if info["duplicates"]:
        w.append(f"{info['duplicates']} exact duplicate rows; set data.dedupe: true to drop them")
    if overlong:
        lost = report["tokens"].get("reply_cut_off", 0)
        w.append(f"{overlong} samples are longer than max_length={data_cfg.max_length} tokens "
                 f"(data.overlong={data_cfg.overlong})" + (f"; in {lost} of them the cut leaves no reply to train, "
                                                             "so training drops them" if lost else ""))
    return report


def _print(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    con = Console()
    src = report["source"]
    fmt = report["format"] if isinstance(report["format"], str) else ", ".join(report["format"])
    kinds = ", ".join(f"{n} {k}" for k, n in report["kinds"].items())
    rows, tok = report["rows"], report["tokens"]
    con.print(Text.assemble(("source  ", "bold"), str(src)))
    con.print(Text.assemble(("template", "bold"), f"  {report['template']}"))
    con.print(Text.assemble(("format  ", "bold"), f"{fmt}  ({kinds})"))
    con.print(Text.assemble(("rows    ", "bold"), f"{rows['read']} read, {rows['valid']} valid, "
                                                  f"{rows['invalid']} invalid, {rows['duplicates']} duplicates"))
    if "min" in tok:
        table = Table(title=f"tokens per sample ({tok['measured']} measured)", title_justify="left")
        for col in ("min", "median", "p95", "max", "mean", f"> {tok['max_length']}"):
            table.add_column(col, justify="right")
        table.add_row(*(str(tok[k]) for k in ("min", "median", "p95", "max", "mean")), str(tok["overlong"]))
        con.print(table)
        hist = report["histogram"]
        top = max(b["count"] for b in hist) or 1
        for b in hist:
            bar = "█" * max(1 if b["count"] else 0, round(30 * b["count"] / top))
            con.print(Text(f"  {b['from']:>6}-{b['to']:<6} {bar} {b['count']}"))
    first = report.get("first_sample")
    if first:
        con.print(Text.assemble(("\nfirst sample", "bold"), f" ({first['origin']}; {first['trained_tokens']} of "
                                f"{first['tokens']} tokens trained, highlighted"
                                + (f"; {first['overlong']}" if first.get("overlong") else "") + "):"))
        if con.is_terminal:
            con.print(Text.assemble(*((t, "black on green") if trained else (t, "") for t, trained in first["segments"])))
        else:  # piped or redirected: colours are lost, so mark the trained text the way the pre-flight does
            con.print(Text(first["rendered"]))
        if "rejected" in first:
            con.print(Text.assemble(("rejected reply: ", "bold"), first["rejected"]))
        if "answer" in first:
            con.print(Text.assemble(("gold answer: ", "bold"), str(first["answer"])))
        if "label" in first:
            con.print(Text.assemble(("label: ", "bold"), "desirable" if first["label"] else "undesirable"))
    for line in report["warnings"]:
        con.print(Text.assemble(("warning: ", "bold yellow"), line))


def main(args) -> int:
    from tunelab.config import DataConfig, SourceConfig
    from tunelab.data.formats import unknown_format
    from tunelab.data.sources import resolve_files

    columns = {}
    for item in args.column or []:
        if "=" not in item:
            raise UserError(f"--column '{item}' is not yours=expected (e.g. --column instruction_text=instruction)")
        k, v = item.split("=", 1)
        columns[k] = v
    if unknown_format(args.format):
        raise UserError(f"--format: {unknown_format(args.format)}")
    try:
        source = SourceConfig(path=args.source, split=args.split, name=args.name)
        data_cfg = DataConfig(train=[source], format=args.format, columns=columns, max_length=args.max_length,
                              on_invalid="error" if args.strict else "skip", shuffle=False, cache=False,
                              system_prompt=args.system_prompt)
    except ValueError as e:  # pydantic's ValidationError: a bad --max-length
        err = e.errors()[0] if hasattr(e, "errors") else {"msg": str(e), "loc": ()}
        flag = "--" + str(err["loc"][0]).replace("_", "-") if err["loc"] else "option"
        raise UserError(f"{flag}: {err['msg'].removeprefix('Value error, ')}") from None
    resolve_files(source)  # a missing file is reported before the tokenizer (and transformers) loads
    tok = load_tokenizer(args.model, args.chat_template)
    report = inspect([source], tok, data_cfg, limit=args.limit)
    report["source"] = args.source
    report["model"] = args.model
    if args.json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        _print(report)
    return 0
