"""Memory-aware defaults: `auto` settings follow the estimate against a memory budget, fastest first."""

from __future__ import annotations

import pytest

from tunelab import load_config, methods
from tunelab.autoplan import apply, plan

STATS = {"mean_tokens": 400, "max_tokens": 512, "trained_fraction": 0.5, "num_samples": 64, "baseline_mb": 0.0}


def setup(tiny_model, *overrides):
    cfg = load_config(None, [f"model.source={tiny_model}", "data.max_length=512", "training.batch_size=16",
                             "training.precision=fp32", *overrides])
    method, opts = methods.options(cfg)
    return cfg, method, opts


def test_fastest_settings_when_they_fit_and_frugal_ones_when_not(tiny_model):
    cfg, method, opts = setup(tiny_model)
    roomy = plan(cfg, method, opts, STATS, device="cpu", budget_mb=1e9)
    assert (roomy.gradient_checkpointing, roomy.lean_loss) == (False, True)
    assert "the fastest settings fit" in roomy.reason

    sizes = {(g, lean): plan(cfg.model_copy(update={"training": cfg.training.model_copy(
        update={"gradient_checkpointing": g})}), method, method.with_lean_loss(opts, lean), STATS, device="cpu",
        budget_mb=1e9).estimate_mb for g in (False, True) for lean in (True, False)}
    # each lever saves memory on this shape (a 49k vocabulary: the lean loss's logits are the largest part)
    assert sizes[(False, False)] < sizes[(False, True)] and sizes[(True, True)] < sizes[(False, True)]
    assert sizes[(True, False)] < min(sizes[(False, False)], sizes[(True, True)])

    just_under = plan(cfg, method, opts, STATS, device="cpu", budget_mb=sizes[(False, True)] - 1)
    assert (just_under.gradient_checkpointing, just_under.lean_loss) == (False, False)  # cheaper lever first
    assert "over the" in just_under.reason

    tight = plan(cfg, method, opts, STATS, device="cpu", budget_mb=sizes[(True, False)] + 1)
    assert (tight.gradient_checkpointing, tight.lean_loss) == (True, False)

    impossible = plan(cfg, method, opts, STATS, device="cpu", budget_mb=1.0)
    assert (impossible.gradient_checkpointing, impossible.lean_loss) == (True, False)
    assert "does NOT fit" in impossible.reason


def test_prompt_learning_plans_with_trls_loss(tiny_model):
    """Prompt learning cannot take the lean loss (PEFT prepends its virtual tokens inside the forward): the plan says
    and records TRL's chunked loss, and with the budget to spare checkpointing stays off."""
    cfg, method, opts = setup(tiny_model, "adapter.type=prompt", "adapter.num_virtual_tokens=4")
    p = plan(cfg, method, opts, STATS, device="cpu", budget_mb=1e9)
    assert (p.gradient_checkpointing, p.lean_loss) == (False, False)
    assert "chunked (fused) loss: the fastest settings fit" in p.reason


def test_prefix_tuning_never_gets_checkpointing(tiny_model):
    """Prefix tuning fails under gradient checkpointing: `auto` keeps it off however tight the budget (saying the
    run does not fit), and `true` is refused before anything loads."""
    from tunelab.errors import UserError

    cfg, method, opts = setup(tiny_model, "adapter.type=prefix")
    p = plan(cfg, method, opts, STATS, device="cpu", budget_mb=1.0)
    assert p.gradient_checkpointing is False and "does NOT fit" in p.reason
    with pytest.raises(UserError, match=r"^training\.gradient_checkpointing=true does not run with adapter\.type="
                                        r"prefix"):
        setup(tiny_model, "adapter.type=prefix", "training.gradient_checkpointing=true")


def test_settings_the_config_fixes_are_kept(tiny_model):
    cfg, method, opts = setup(tiny_model, "training.gradient_checkpointing=false", "method.loss=lean")
    p = plan(cfg, method, opts, STATS, device="cpu", budget_mb=1.0)
    assert (p.gradient_checkpointing, p.lean_loss) == (False, True)
    cfg2, opts2 = apply(cfg, method, opts, p)
    assert cfg2.training.gradient_checkpointing is False and opts2.loss == "lean"


def test_apply_resolves_auto_without_touching_the_users_config(tiny_model):
    cfg, method, opts = setup(tiny_model)
    p = plan(cfg, method, opts, STATS, device="cpu", budget_mb=1.0)
    run_cfg, run_opts = apply(cfg, method, opts, p)
    assert run_cfg.training.gradient_checkpointing is True and run_opts.loss == "fused"
    assert cfg.training.gradient_checkpointing == "auto" and opts.loss == "auto"


@pytest.mark.parametrize("name", ["dpo", "grpo"])
def test_methods_without_a_loss_choice_plan_checkpointing_only(tiny_model, name):
    cfg, method, opts = setup(tiny_model, f"method.name={name}")
    assert len(method.loss_choices(opts)) == 1
    p = plan(cfg, method, opts, STATS, device="cpu", budget_mb=1.0)
    assert p.gradient_checkpointing is True and p.lean_loss == method.lean_loss(opts)


def test_a_run_under_a_small_budget_saves_memory_and_learns_the_same(tmp_path, tiny_model, tiny_chat_data):
    """training.memory_budget_gb too small for the fast settings: checkpointing and the chunked loss are chosen,
    printed, recorded in summary.json, and the losses equal the fast run's (neither lever changes the math)."""
    from tunelab import finetune

    def run(name, *extra):
        lines = []
        cfg = load_config(None, [f"model.source={tiny_model}", f"data.train={tiny_chat_data}", "data.max_length=64",
                                 "training.max_steps=3", "training.batch_size=4", "training.precision=fp32",
                                 f"output.dir={tmp_path}", f"output.name={name}", *extra])
        summary = finetune(cfg, show_progress=False, echo=lines.append)
        import json
        from pathlib import Path

        rows = map(json.loads, (Path(summary["run"]) / "metrics.jsonl").read_text().splitlines())
        return summary, [r["loss"] for r in rows if "loss" in r], lines

    fast, fast_losses, fast_lines = run("fast")
    small, small_losses, small_lines = run("small", "training.memory_budget_gb=0.001")
    assert fast["memory_plan"]["gradient_checkpointing"] is False and fast["memory_plan"]["lean_loss"] is True
    assert small["memory_plan"]["gradient_checkpointing"] is True and small["memory_plan"]["lean_loss"] is False
    assert any(line.startswith("memory plan: gradient checkpointing on") for line in small_lines), small_lines
    assert small_losses == pytest.approx(fast_losses, abs=1e-4)
    # the run directory keeps what the user wrote: a re-run with the same command is the same config
    assert "gradient_checkpointing: auto" in (tmp_path / "small" / "config.yaml").read_text()


def llama_1b_shape(tmp_path):
    """A model directory holding only Llama-3.2-1B's config: the estimate reads nothing else."""
    import shutil
    from pathlib import Path

    shutil.copy(Path(__file__).parents[1] / "benchmarks" / "models" / "llama-3.2-1b.json", tmp_path / "config.json")
    return tmp_path


def test_offloading_is_the_last_lever_and_only_on_a_gpu(tmp_path):
    """On a GPU, a budget that checkpointing and the chunked loss cannot meet gets activation offloading too (SFT's
    trainer can); on a CPU there is no faster memory to offload from, and the frugal settings stop there."""
    tiny_model = llama_1b_shape(tmp_path)
    cfg, method, opts = setup(tiny_model, "training.batch_size=64", "data.max_length=2048")
    stats = {**STATS, "mean_tokens": 2048, "max_tokens": 2048}
    frugal = plan(cfg, method, method.with_lean_loss(opts, False), stats, device="t4", budget_mb=1e9)
    gc_only = plan(cfg.model_copy(update={"training": cfg.training.model_copy(update={
        "gradient_checkpointing": True, "activation_offloading": False})}), method,
        method.with_lean_loss(opts, False), stats, device="t4", budget_mb=1e9).estimate_mb
    offloaded = plan(cfg.model_copy(update={"training": cfg.training.model_copy(update={
        "gradient_checkpointing": True, "activation_offloading": True})}), method,
        method.with_lean_loss(opts, False), stats, device="t4", budget_mb=1e9).estimate_mb
    assert offloaded < gc_only and not frugal.activation_offloading  # roomy: nothing saved

    p = plan(cfg, method, opts, stats, device="t4", budget_mb=(offloaded + gc_only) / 2)
    assert (p.gradient_checkpointing, p.lean_loss, p.activation_offloading) == (True, False, True)
    assert "offloaded to CPU memory" in p.reason and p.estimate_mb <= (offloaded + gc_only) / 2
    run_cfg, _ = apply(cfg, method, opts, p)
    assert run_cfg.training.activation_offloading is True and cfg.training.activation_offloading == "auto"

    on_cpu = plan(cfg, method, opts, stats, device="cpu", budget_mb=1.0)
    assert on_cpu.activation_offloading is False and on_cpu.gradient_checkpointing is True

    dpo_cfg, dpo, dpo_opts = setup(tiny_model, "method.name=dpo", "training.batch_size=64", "data.max_length=2048")
    assert plan(dpo_cfg, dpo, dpo_opts, stats, device="t4", budget_mb=1.0).activation_offloading is False


def test_offloading_asked_for_where_it_cannot_work_is_refused(tiny_model):
    from tunelab.checks import check_training
    from tunelab.errors import UserError

    with pytest.raises(UserError, match="training.activation_offloading.*method 'dpo' cannot offload.*sft"):
        setup(tiny_model, "method.name=dpo", "training.activation_offloading=true")
    cfg, _, _ = setup(tiny_model, "training.activation_offloading=true")
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA device is visible"):
            check_training(cfg)


def test_a_batch_larger_than_the_data_is_planned_as_the_data(tiny_model, monkeypatch):
    """training.batch_size=100000 over 64 rows trains batches of 64 rows: the plan is that of batch 64 (it once said
    "does NOT fit even so" for a run that then trained in a few MB); under WORLD_SIZE processes, of each one's share."""
    big, method, opts = setup(tiny_model, "training.batch_size=100000")
    rows, _, _ = setup(tiny_model, "training.batch_size=64")
    half, _, _ = setup(tiny_model, "training.batch_size=32")
    need = plan(rows, method, opts, STATS, device="cpu", budget_mb=1e9).estimate_mb
    p = plan(big, method, opts, STATS, device="cpu", budget_mb=need + 1)
    assert p.estimate_mb == pytest.approx(need) and "the fastest settings fit" in p.reason
    monkeypatch.setenv("WORLD_SIZE", "2")  # two processes of 32 rows each
    assert plan(big, method, opts, STATS, device="cpu", budget_mb=1e9).estimate_mb == pytest.approx(
        plan(half, method, opts, STATS, device="cpu", budget_mb=1e9).estimate_mb)
