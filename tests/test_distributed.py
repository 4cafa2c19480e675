"""Several processes on one machine (torch's gloo backend on CPU): `tunelab train --nproc 2` learns exactly what one
process learns with the same global batch, writes every file once, and a rank killed with SIGKILL ends the job,
after which the same command resumes on the same loss curve."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tunelab.distributed import FSDP_NEEDS_ACCELERATORS

CLI = [sys.executable, "-m", "tunelab", "train"]


def write_config(tmp_path, tiny_model, data, name, batch_size, max_steps=6, **extra) -> Path:
    cfg = {"model": {"source": tiny_model}, "data": {"train": data, "max_length": 64},
           "adapter": {"type": "lora", "r": 8, "alpha": 16},
           "training": {"max_steps": max_steps, "batch_size": batch_size, "learning_rate": 1e-2,
                        "precision": "fp32", "save_steps": 3, "save_total_limit": None},
           "output": {"dir": str(tmp_path / "runs"), "name": name}}
    for section, values in extra.items():
        cfg.setdefault(section, {}).update(values)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def losses(run_dir: Path) -> list[float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert len(steps) == len(set(steps)), f"a step was logged twice (two ranks writing?): {steps}"
    return [r["loss"] for r in rows if "loss" in r]


def train(path, *extra, env=None, check=True):
    out = subprocess.run([*CLI, str(path), *extra], capture_output=True, text=True, env=env, timeout=600)
    if check:
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_model, tiny_chat_data):
    """The reference: one process, batch 8."""
    tmp = tmp_path_factory.mktemp("one")
    train(write_config(tmp, tiny_model, tiny_chat_data, "one", batch_size=8, max_steps=12))
    return losses(tmp / "runs" / "one")


def test_two_processes_learn_what_one_process_learns(tmp_path, tiny_model, tiny_chat_data, one_process):
    out = train(write_config(tmp_path, tiny_model, tiny_chat_data, "two", batch_size=4, max_steps=12), "--nproc", "2")
    run = tmp_path / "runs" / "two"
    assert losses(run) == pytest.approx(one_process, abs=1e-4)
    assert out.stdout.count("pre-flight: first training sample") == 1  # rank 0 prints, the others stay quiet
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["global_step"] == 12
    ckpt = run / "checkpoints" / "checkpoint-12"
    assert (ckpt / "rng_state_0.pth").is_file() and (ckpt / "rng_state_1.pth").is_file()  # each rank's part
    assert (run / "final" / "adapter_model.safetensors").is_file()
    assert not (run / ".staging").exists() or not any((run / ".staging").iterdir())


def _rank_pid(marker: str, rank: int) -> int | None:
    """The pid of the worker process with RANK=`rank` among those started with TUNELAB_TEST_JOB=`marker`."""
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            env = dict(kv.split("=", 1) for kv in (p / "environ").read_text().split("\0") if "=" in kv)
        except (OSError, ValueError):
            continue
        if env.get("TUNELAB_TEST_JOB") == marker and env.get("RANK") == str(rank) and "LOCAL_RANK" in env:
            return int(p.name)
    return None


def test_a_killed_rank_stops_the_job_and_the_same_command_resumes_exactly(tmp_path, tiny_model, tiny_chat_data,
                                                                          one_process):
    path = write_config(tmp_path, tiny_model, tiny_chat_data, "killed", batch_size=4, max_steps=12,
                        training={"save_steps": 2})
    run = tmp_path / "runs" / "killed"
    env = {**os.environ, "TUNELAB_TEST_JOB": str(tmp_path)}
    job = subprocess.Popen([*CLI, str(path), "--nproc", "2"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           env=env)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not (run / "checkpoints" / "checkpoint-4").is_dir() and job.poll() is None:
            time.sleep(0.05)
        pid = _rank_pid(str(tmp_path), 1)
        assert pid is not None and job.poll() is None, "the job ended before a rank could be killed"
        os.kill(pid, signal.SIGKILL)
        assert job.wait(timeout=300) != 0  # the launcher ends the whole job when one rank dies
    finally:
        if job.poll() is None:
            job.kill()
    assert not (run / "final").exists()
    out = train(path, "--nproc", "2", env=env)
    assert "resuming from" in out.stdout
    assert losses(run) == pytest.approx(one_process, abs=1e-4)  # the same curve as an uninterrupted run


def test_deepspeed_without_its_package_is_refused_before_anything_loads(tmp_path, tiny_model, tiny_chat_data):
    import importlib.util

    if importlib.util.find_spec("deepspeed") is not None:
        pytest.skip("deepspeed is installed here")
    path = write_config(tmp_path, tiny_model, tiny_chat_data, "ds", batch_size=4,
                        distributed={"strategy": "deepspeed"})
    out = train(path, check=False)
    assert out.returncode == 2 and "distributed.strategy=deepspeed needs the deepspeed package" in out.stderr
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------------------------------- FSDP


def _fsdp_cannot_run() -> str | None:
    """Why FSDP cannot be tested here (the same line `tunelab train` refuses it with), or None."""
    import torch

    from tunelab import distributed

    reason = distributed.fsdp_unavailable()
    if reason is None and torch.accelerator.device_count() < 2:
        reason = "FSDP with 2 processes needs 2 accelerators (one per process)"
    return reason


@pytest.mark.skipif(_fsdp_cannot_run() != FSDP_NEEDS_ACCELERATORS, reason="this machine has accelerators: FSDP runs here")
def test_fsdp_on_cpus_is_refused_in_one_line_before_any_process_starts(tmp_path, tiny_model, tiny_chat_data):
    """accelerate would silently train CPU processes as DDP (full copies), so `fsdp` is refused where it cannot
    shard."""
    path = write_config(tmp_path, tiny_model, tiny_chat_data, "fsdp", batch_size=4, distributed={"strategy": "fsdp"})
    out = train(path, "--nproc", "2", check=False)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert "distributed.strategy=fsdp needs GPUs" in out.stderr
    assert "Traceback" not in out.stderr  # one line, not a launcher failure report per rank
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("adapter", ["lora", "full"])
def test_fsdp_two_processes_learn_what_one_process_learns_and_final_loads_plainly(tmp_path, tiny_model,
                                                                                  tiny_chat_data, adapter):
    reason = _fsdp_cannot_run()
    if reason:
        pytest.skip(reason)
    import torch
    from transformers import AutoModelForCausalLM

    kind = {} if adapter == "lora" else {"adapter": {"type": "none"}}
    one = write_config(tmp_path, tiny_model, tiny_chat_data, "one", batch_size=8, max_steps=6, **kind)
    two = write_config(tmp_path, tiny_model, tiny_chat_data, "two", batch_size=4, max_steps=6,
                       distributed={"strategy": "fsdp"}, **kind)
    train(one)
    train(two, "--nproc", "2")
    runs_dir = tmp_path / "runs"
    assert losses(runs_dir / "two") == pytest.approx(losses(runs_dir / "one"), abs=1e-4)
    # final/ is consolidated: plain transformers / PEFT load it, with the weights the single process learned
    if adapter == "lora":
        from peft import AutoPeftModelForCausalLM

        got, want = (AutoPeftModelForCausalLM.from_pretrained(runs_dir / n / "final") for n in ("two", "one"))
    else:
        got, want = (AutoModelForCausalLM.from_pretrained(runs_dir / n / "final") for n in ("two", "one"))
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert torch.allclose(got(ids).logits, want(ids).logits, atol=1e-3)
    sd, ref = got.state_dict(), want.state_dict()
    assert sd.keys() == ref.keys() and all(sd[k].shape == ref[k].shape and sd[k].numel() for k in ref)


# ---------------------------------------------------------------------------------------------------------- estimate


def _full_finetune(tiny_model, *overrides):
    from tunelab import load_config

    return load_config(None, [f"model.source={tiny_model}", "adapter.type=none", "training.precision=fp32",
                              "data.max_length=256", *overrides])


@pytest.mark.parametrize("strategy, sharded, whole", [
    ("ddp", [], ["weights", "gradients", "optimizer"]),
    ("fsdp", ["weights", "gradients", "optimizer"], []),
    ("fsdp fsdp_sharding=shard_grad_op", ["gradients", "optimizer"], ["weights"]),
    ("deepspeed", ["gradients", "optimizer"], ["weights"]),  # ZeRO-2
    ("deepspeed zero_stage=3", ["weights", "gradients", "optimizer"], []),
])
def test_estimate_per_device_divides_what_the_strategy_shards(tiny_model, strategy, sharded, whole):
    from tunelab.estimate import estimate, per_process

    name, *more = strategy.split()
    cfg = _full_finetune(tiny_model, f"distributed.strategy={name}", *(f"distributed.{x}" for x in more))
    one = estimate(cfg, "h100", max_tokens=200)
    four = per_process(one, cfg.distributed, 4)
    assert per_process(one, cfg.distributed, 1) is one  # a single process: nothing changes
    for part in sharded:
        assert four.memory_mb[part] == pytest.approx(one.memory_mb[part] / 4)
    for part in whole + ["activations", "loss"]:  # each process runs its own batch
        assert four.memory_mb[part] == pytest.approx(one.memory_mb[part])
    if name == "ddp":  # DDP's flat gradient buckets come on top of a full copy
        assert four.memory_mb["ddp_buckets"] == pytest.approx(one.memory_mb["gradients"])
        assert four.total_mb > one.total_mb
    else:
        assert four.total_mb < one.total_mb
    if "weights" in sharded:  # the layer being computed is gathered whole
        assert four.memory_mb["gathered"] == pytest.approx(one.memory_mb["weights"] / 2)  # 2 layers
    assert f"each of 4 processes, {name}" in four.report()


def test_offload_moves_the_sharded_state_off_the_device(tiny_model):
    from tunelab.estimate import estimate, per_process

    cfg = _full_finetune(tiny_model, "distributed.strategy=fsdp", "distributed.fsdp_cpu_offload=true")
    est = per_process(estimate(cfg, "h100", max_tokens=200), cfg.distributed, 4)
    assert est.memory_mb["weights"] == est.memory_mb["gradients"] == est.memory_mb["optimizer"] == 0
    cfg = _full_finetune(tiny_model, "distributed.strategy=deepspeed", "distributed.zero_offload=true")
    one = estimate(cfg, "h100", max_tokens=200)
    est = per_process(one, cfg.distributed, 4)  # ZeRO-2 offload: the optimizer state; the weights stay
    assert est.memory_mb["optimizer"] == 0 and est.memory_mb["weights"] == pytest.approx(one.memory_mb["weights"])


def test_estimate_cli_takes_nproc(tmp_path, tiny_model, tiny_chat_data):
    path = write_config(tmp_path, tiny_model, tiny_chat_data, "est", batch_size=4, adapter={"type": "none"},
                        distributed={"strategy": "fsdp"})
    got = {}
    for n in (1, 8):
        out = subprocess.run([sys.executable, "-m", "tunelab", "estimate", str(path), "--device", "h100", "--nproc",
                              str(n), "--json"], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        got[n] = json.loads(out.stdout)
    assert got[8]["memory_mb"]["optimizer"] == pytest.approx(got[1]["memory_mb"]["optimizer"] / 8, abs=0.1)
    assert got[8]["total_mb"] < got[1]["total_mb"] and "each of 8 processes, fsdp" in got[8]["device"]


def test_memory_plan_is_per_process(tiny_model, monkeypatch):
    """Under FSDP over 8 processes a budget that one process's full copy overflows fits without checkpointing."""
    from tunelab import methods
    from tunelab.autoplan import plan

    stats = {"mean_tokens": 200, "max_tokens": 256, "trained_fraction": 0.5, "num_samples": 64}
    cfg = _full_finetune(tiny_model, "distributed.strategy=fsdp", "training.gradient_checkpointing=auto",
                         "training.batch_size=2")
    method, opts = methods.options(cfg)
    alone = plan(cfg, method, opts, stats, device="h100", budget_mb=1e9)
    monkeypatch.setenv("WORLD_SIZE", "8")
    shared = plan(cfg, method, opts, stats, device="h100", budget_mb=1e9)
    assert shared.estimate_mb < alone.estimate_mb
    tight = plan(cfg, method, opts, stats, device="h100", budget_mb=shared.estimate_mb + 1)
    assert not tight.gradient_checkpointing and "the fastest settings fit" in tight.reason
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert plan(cfg, method, opts, stats, device="h100", budget_mb=shared.estimate_mb + 1).gradient_checkpointing
