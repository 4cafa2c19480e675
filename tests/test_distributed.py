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


def write_config(tmp_path, tiny_model, train_file, name, batch_size, max_steps=6, **extra) -> Path:
    cfg = {"model": {"source": tiny_model}, "data": {"train": train_file, "max_length": 64},
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


def refusal(capsys, *args) -> tuple[int, str]:
    """Exit code and stderr of `tunelab ARGS` run in this process: a refusal comes before any process is launched,
    so the launching process alone is under test (a new process would cost seconds of imports)."""
    from tunelab import cli

    capsys.readouterr()
    code = cli.main(list(args))
    return code, capsys.readouterr().err


def train(path, *extra, env=None, check=True):
    out = subprocess.run([*CLI, str(path), *extra], capture_output=True, text=True, env=env, timeout=600)
    if check:
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


STAGING_AT_TRAIN_END = """
import sys, time
from pathlib import Path
from tunelab import distributed, runs

run = runs.Run(Path(sys.argv[1]))
distributed.barrier()  # both processes are up
if distributed.is_main():
    time.sleep(1.5)  # rank 0 is the slower one: it also writes the metrics and the plots
    # what the Trainer does on every process just before on_train_end: list .staging/'s checkpoints
    print("listed", len(list(run.staging.glob("checkpoint-*"))), flush=True)
runs.AtomicCheckpoints(run, None).on_train_end(None, None, None)
"""


def test_no_process_deletes_the_staging_folder_while_another_still_lists_it(tmp_path):
    """Each process lists .staging/ at the end of training (the Trainer's sort_checkpoints) and then runs
    on_train_end; a process that deleted it while another listed it made Path.glob raise in that one (a two-process
    PPO run died that way). Rank 0 deletes it, after both have listed it."""
    from tunelab.distributed import _free_port

    run = tmp_path / "run"
    (run / ".staging" / "checkpoint-2").mkdir(parents=True)
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    procs = [subprocess.Popen([sys.executable, "-c", STAGING_AT_TRAIN_END, str(run)], text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in (0, 1)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    assert "listed 1" in outs[0][0]  # rank 1 had not deleted it under rank 0's listing
    assert not (run / ".staging").exists()  # and it is gone once training has ended


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory, tiny_model, tiny_chat_data) -> Path:
    """The reference run: one process, batch 8."""
    tmp = tmp_path_factory.mktemp("one")
    train(write_config(tmp, tiny_model, tiny_chat_data, "one", batch_size=8, max_steps=12))
    return tmp / "runs" / "one"


@pytest.fixture(scope="module")
def one_process(one_process_run) -> list[float]:
    """The reference run's per-step losses."""
    return losses(one_process_run)


def test_two_processes_learn_what_one_process_learns(tmp_path, tiny_model, tiny_chat_data, one_process):
    out = train(write_config(tmp_path, tiny_model, tiny_chat_data, "two", batch_size=4, max_steps=12), "--nproc", "2")
    run = tmp_path / "runs" / "two"
    assert losses(run) == pytest.approx(one_process, abs=1e-4)
    assert out.stdout.count("pre-flight: first training sample") == 1  # rank 0 prints, the others stay quiet
    # every trainable weight gets a gradient: DDP is not asked to search for unused ones (and warn it found none)
    assert "find_unused_parameters=True" not in out.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["global_step"] == 12
    ckpt = run / "checkpoints" / "checkpoint-12"
    assert (ckpt / "rng_state_0.pth").is_file() and (ckpt / "rng_state_1.pth").is_file()  # each rank's part
    assert (run / "final" / "adapter_model.safetensors").is_file()
    assert not (run / ".staging").exists() or not any((run / ".staging").iterdir())


@pytest.mark.slow
def test_accelerates_launcher_learns_what_one_process_learns(tmp_path, tiny_model, tiny_chat_data, one_process):
    """`accelerate launch -m tunelab train` (its multi-process launcher: on CPUs too, over gloo) is the same job."""
    path = write_config(tmp_path, tiny_model, tiny_chat_data, "acc", batch_size=4, max_steps=12)
    out = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                          "--main_process_port", "0", "-m", "tunelab", "train", str(path)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "each of 2 processes" in out.stdout
    assert losses(tmp_path / "runs" / "acc") == pytest.approx(one_process, abs=1e-4)


@pytest.mark.slow
def test_full_fine_tuning_on_two_processes_learns_what_one_process_learns(tmp_path, tiny_model, tiny_chat_data):
    def cfg(name, batch_size):
        return write_config(tmp_path, tiny_model, tiny_chat_data, name, batch_size=batch_size, max_steps=4,
                            adapter={"type": "none"}, training={"learning_rate": 1e-3, "save_steps": 100})

    train(cfg("one", 8))
    train(cfg("two", 4), "--nproc", "2")
    runs_dir = tmp_path / "runs"
    assert losses(runs_dir / "two") == pytest.approx(losses(runs_dir / "one"), abs=1e-4)
    assert losses(runs_dir / "two")[-1] < losses(runs_dir / "two")[0]
    assert (runs_dir / "two" / "final" / "model.safetensors").is_file()


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


def kill_rank_once(path: Path, checkpoint: Path, env: dict) -> None:
    """Start `tunelab train path --nproc 2`, SIGKILL its rank 1 once `checkpoint` exists, and check that the launcher
    then ends the whole job. `env` holds TUNELAB_TEST_JOB, by which the rank's process is found."""
    job = subprocess.Popen([*CLI, str(path), "--nproc", "2"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           env=env)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not checkpoint.is_dir() and job.poll() is None:
            time.sleep(0.05)
        pid = _rank_pid(env["TUNELAB_TEST_JOB"], 1)
        assert pid is not None and job.poll() is None, "the job ended before a rank could be killed"
        os.kill(pid, signal.SIGKILL)
        assert job.wait(timeout=300) != 0  # the launcher ends the whole job when one rank dies
    finally:
        if job.poll() is None:
            job.kill()


def test_a_strategy_in_one_process_is_noted(tmp_path, tiny_model, tiny_chat_data):
    """distributed.strategy names how several processes share the work; one process trains without it, and says so
    rather than recording fsdp in config.yaml as if it had applied."""
    from tunelab import load_config
    from tunelab.train import run_training

    path = write_config(tmp_path, tiny_model, tiny_chat_data, "one", batch_size=4, max_steps=1,
                        distributed={"strategy": "fsdp"})
    lines = []
    run_training(load_config(path), echo=lines.append, show_progress=False)
    assert any(x.startswith("note: distributed.strategy=fsdp applies when several processes train") for x in lines)


def _running(pid: int) -> bool:
    """Whether process `pid` still runs (a zombie waiting for its reaper does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def test_a_killed_launcher_takes_its_processes_with_it(tmp_path, tiny_model, tiny_chat_data):
    """SIGKILL of `tunelab train --nproc 2` itself, which cannot forward it: torchrun starts its processes in sessions
    of their own, and they trained on beside a re-run of the same command. They end with the launcher."""
    path = write_config(tmp_path, tiny_model, tiny_chat_data, "orphans", batch_size=4, max_steps=500,
                        training={"save_steps": 1000})
    env = {**os.environ, "TUNELAB_TEST_JOB": str(tmp_path)}
    metrics = tmp_path / "runs" / "orphans" / "metrics.jsonl"
    job = subprocess.Popen([*CLI, str(path), "--nproc", "2"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           env=env)
    ranks = []
    try:
        deadline = time.time() + 300
        while time.time() < deadline and job.poll() is None and not (metrics.is_file() and metrics.stat().st_size):
            time.sleep(0.1)
        ranks = [_rank_pid(str(tmp_path), r) for r in (0, 1)]
        assert job.poll() is None and None not in ranks, "the job ended before its launcher could be killed"
        job.kill()
        job.wait(timeout=60)
        deadline = time.time() + 30
        while time.time() < deadline and any(_running(pid) for pid in ranks):
            time.sleep(0.2)
        assert not any(_running(pid) for pid in ranks), "a process trains on after its launcher was killed"
    finally:
        for pid in [job.pid, *(r for r in ranks if r)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.mark.slow  # two 2-process jobs and a SIGKILL: ~45 s
def test_a_killed_rank_stops_the_job_and_the_same_command_resumes_exactly(tmp_path, tiny_model, tiny_chat_data,
                                                                          one_process):
    path = write_config(tmp_path, tiny_model, tiny_chat_data, "killed", batch_size=4, max_steps=12,
                        training={"save_steps": 2})
    run = tmp_path / "runs" / "killed"
    env = {**os.environ, "TUNELAB_TEST_JOB": str(tmp_path)}
    kill_rank_once(path, run / "checkpoints" / "checkpoint-4", env)
    assert not (run / "final").exists()
    out = train(path, "--nproc", "2", env=env)
    assert "resuming from" in out.stdout
    assert losses(run) == pytest.approx(one_process, abs=1e-4)  # the same curve as an uninterrupted run


def test_deepspeed_without_its_package_is_refused_before_anything_loads(tmp_path, tiny_model, tiny_chat_data,
                                                                       monkeypatch):
    import importlib.util

    from tunelab.api import load_config
    from tunelab.errors import UserError
    from tunelab.train import run_training

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else
                        find_spec(name, *a))  # as on a machine without it
    path = write_config(tmp_path, tiny_model, tiny_chat_data, "ds", batch_size=4,
                        distributed={"strategy": "deepspeed"})
    with pytest.raises(UserError, match="distributed.strategy=deepspeed needs the deepspeed package"):
        run_training(load_config(path))
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------------------------------- DeepSpeed

def _no_deepspeed() -> str | None:
    import importlib.util
    import shutil

    if importlib.util.find_spec("deepspeed") is None:
        return "deepspeed is not installed (pip install 'tunelab[deepspeed]'; `make test` installs it)"
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return "no C++ compiler: DeepSpeed builds its shared-memory collective for CPU processes with one"
    return None


needs_deepspeed = pytest.mark.skipif(_no_deepspeed() is not None, reason=str(_no_deepspeed()))


def _same_tensors(a: Path, b: Path, name: str, values: bool = True) -> None:
    """The weight files `name` in a and b hold the same tensors (`values`: else only the same names and shapes),
    none of them empty. Within 1e-3: equal losses
    (1e-4) leave float32 rounding that Adam's normalized steps carry into the weights (6e-5 after 12 steps at lr
    1e-2), while a weight not gathered or not trained would be off by a whole step or more (~1e-2)."""
    from safetensors.torch import load_file

    x, y = load_file(a / name), load_file(b / name)
    assert x.keys() == y.keys() and x
    for k in x:
        assert x[k].numel() > 0 and x[k].shape == y[k].shape, k  # a ZeRO-3 save without gathering is empty
        assert not values or (x[k].float() - y[k].float()).abs().max() < 1e-3, k


@needs_deepspeed
@pytest.mark.slow  # two-process DeepSpeed jobs, over two minutes each here; CI's two-process check is plain DDP's
@pytest.mark.parametrize("stage", [3, 2])
def test_deepspeed_zero_two_processes_learn_what_one_process_learns_and_final_loads_plainly(
        tmp_path, tiny_model, tiny_chat_data, one_process_run, stage):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    path = write_config(tmp_path, tiny_model, tiny_chat_data, "zero", batch_size=4, max_steps=12,
                        distributed={"strategy": "deepspeed", "zero_stage": stage})
    out = train(path, "--nproc", "2")
    run = tmp_path / "runs" / "zero"
    assert f"deepspeed ZeRO-{stage}" in out.stdout
    assert losses(run) == pytest.approx(losses(one_process_run), abs=1e-4)
    _same_tensors(run / "final", one_process_run / "final", "adapter_model.safetensors")
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), run / "final")  # plain PEFT loads it


@needs_deepspeed
@pytest.mark.slow
def test_deepspeed_zero3_full_fine_tuning_saves_the_whole_gathered_model(tmp_path, tiny_model, tiny_chat_data):
    from transformers import AutoModelForCausalLM

    def cfg(name, batch_size, **extra):
        return write_config(tmp_path, tiny_model, tiny_chat_data, name, batch_size=batch_size, max_steps=4,
                            adapter={"type": "none"}, training={"learning_rate": 1e-3, "save_steps": 100}, **extra)

    train(cfg("one", 8))
    train(cfg("zero3", 4, distributed={"strategy": "deepspeed", "zero_stage": 3}), "--nproc", "2")
    runs_dir = tmp_path / "runs"
    assert losses(runs_dir / "zero3") == pytest.approx(losses(runs_dir / "one"), abs=1e-4)
    _same_tensors(runs_dir / "zero3" / "final", runs_dir / "one" / "final", "model.safetensors")
    AutoModelForCausalLM.from_pretrained(runs_dir / "zero3" / "final")


@needs_deepspeed
@pytest.mark.slow
def test_qlora_under_deepspeed_zero3_learns_what_one_process_learns(tmp_path, tiny_model, tiny_chat_data):
    """The 4-bit base sharded by ZeRO-3 (packed in the model's dtype). Within 5e-4: bitsandbytes' CPU 4-bit matmul
    rounds a batch of 4 and one of 8 differently (1.3e-4 at the fourth step), which no strategy causes."""
    def cfg(name, batch_size, **extra):
        return write_config(tmp_path, tiny_model, tiny_chat_data, name, batch_size=batch_size, max_steps=4,
                            quantization={"bits": 4}, training={"save_steps": 100}, **extra)

    train(cfg("one", 8))
    train(cfg("zero3", 4, distributed={"strategy": "deepspeed", "zero_stage": 3}), "--nproc", "2")
    runs_dir = tmp_path / "runs"
    assert losses(runs_dir / "zero3") == pytest.approx(losses(runs_dir / "one"), abs=5e-4)
    assert losses(runs_dir / "zero3")[-1] < losses(runs_dir / "zero3")[0]
    # names and shapes only: where a gradient is near 0, the 4-bit rounding can flip its sign, and Adam then steps
    # the whole learning rate the other way (1.5e-2 apart after 4 steps)
    _same_tensors(runs_dir / "zero3" / "final", runs_dir / "one" / "final", "adapter_model.safetensors", values=False)


@needs_deepspeed
@pytest.mark.slow
def test_a_task_metric_generates_from_the_zero3_sharded_model(tmp_path, tiny_model, tiny_chat_data):
    """The GSM8K metric during training generates with the model ZeRO-3 shards (its hooks gather the weights), not
    with a CPU bf16 copy of this process's shards."""
    path = write_config(tmp_path, tiny_model, tiny_chat_data, "task", batch_size=4, max_steps=4,
                        data={"val_split": 0.25}, training={"eval_steps": 2, "save_steps": 100},
                        eval={"task": "gsm8k", "task_samples": 4, "task_max_new_tokens": 8},
                        distributed={"strategy": "deepspeed", "zero_stage": 3})
    train(path, "--nproc", "2")
    rows = [json.loads(x) for x in (tmp_path / "runs" / "task" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval_gsm8k_accuracy" in r] == [2, 4]


@needs_deepspeed
@pytest.mark.slow  # two 2-process jobs and a SIGKILL
def test_deepspeed_zero3_killed_rank_then_the_same_command_resumes_exactly(tmp_path, tiny_model, tiny_chat_data,
                                                                           one_process):
    path = write_config(tmp_path, tiny_model, tiny_chat_data, "killed", batch_size=4, max_steps=12,
                        training={"save_steps": 2}, distributed={"strategy": "deepspeed", "zero_stage": 3})
    run = tmp_path / "runs" / "killed"
    env = {**os.environ, "TUNELAB_TEST_JOB": str(tmp_path)}
    kill_rank_once(path, run / "checkpoints" / "checkpoint-4", env)
    out = train(path, "--nproc", "2", env=env)
    assert "resuming from" in out.stdout
    assert losses(run) == pytest.approx(one_process, abs=1e-4)


# ---------------------------------------------------------------------------------------------------------- FSDP


@pytest.mark.parametrize("strategy", [{"strategy": "fsdp"}, {"strategy": "deepspeed", "zero_stage": 3}],
                         ids=["fsdp", "zero3"])
def test_8bit_weights_under_a_strategy_that_shards_them_are_refused_before_any_process_starts(
        tmp_path, tiny_model, tiny_chat_data, strategy, capsys):
    path = write_config(tmp_path, tiny_model, tiny_chat_data, "int8", batch_size=4, distributed=strategy,
                        quantization={"bits": 8})
    code, err = refusal(capsys, "train", str(path), "--nproc", "2")
    assert code == 2 and "8-bit weights cannot be sharded" in err, err[-2000:]
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("overrides, says", [
    (["adapter.type=prefix", "method.name=ppo"], "method 'ppo' does not train with adapter.type 'prefix'"),
    (["training.optimizer=adamw_torhc"], "did you mean 'adamw_torch'"),
    (["training.eval_strategy=epoch"], "validation data"),
], ids=["method_adapter", "optimizer", "evaluation"])
def test_config_mistakes_are_refused_once_before_any_process_starts(tmp_path, tiny_model, tiny_chat_data, overrides,
                                                                    says, capsys):
    """What `tunelab train` refuses in one process is refused by the launching process under --nproc: one line and
    exit 2, not one line per rank and the launcher's failure report."""
    path = write_config(tmp_path, tiny_model, tiny_chat_data, "mistake", batch_size=4)
    code, err = refusal(capsys, "train", str(path), "--nproc", "2", *overrides)
    assert code == 2 and says in err, err[-2000:]
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "runs").exists()


def test_a_data_refusal_inside_the_processes_is_one_line_and_exit_2(tmp_path, tiny_model, tiny_chat_data):
    """Bad data is found by rank 0 while the others wait for its tokenized cache: every process stops with that
    refusal, and the job prints it once as its last line (no traceback of a peer that lost its connection, no
    launcher report), exit 2, nothing written."""
    data = tmp_path / "bad.jsonl"
    lines = Path(tiny_chat_data).read_text().splitlines()
    data.write_text("\n".join([*lines[:3], '{"messages": [', *lines[3:]]) + "\n")
    path = write_config(tmp_path, tiny_model, str(data), "bad", batch_size=4, data={"on_invalid": "error"})
    out = train(path, "--nproc", "2", check=False)
    assert out.returncode == 2, out.stderr[-3000:]
    err = out.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {data}:4:"), out.stderr[-3000:]  # no torchrun banner
    assert "Traceback" not in out.stderr and "FAILED" not in out.stderr, out.stderr[-3000:]
    assert not (tmp_path / "runs").exists()


def test_qlora_under_a_sharding_strategy_packs_4bit_weights_in_the_model_dtype_with_the_same_values(tiny_model):
    """FSDP and ZeRO-3 shard parameters of one dtype: the 4-bit weights are stored in the model's dtype (FSDP-QLoRA),
    and the model computes exactly what the uint8-stored one does, gradients included."""
    import torch

    from tunelab import models
    from tunelab.api import load_config

    def cfg(strategy):
        return load_config(None, [f"model.source={tiny_model}", "quantization.bits=4", "adapter.type=lora",
                                  "adapter.dropout=0.0", f"distributed.strategy={strategy}"])

    def loss_and_grads(strategy):
        torch.manual_seed(0)
        model = models.attach_adapter(models.load_model(cfg(strategy), precision="bf16"), cfg(strategy))
        # as loaded (bitsandbytes' CPU kernels repack the weights at their first use)
        packed = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight.dtype
        ids = torch.arange(3, 40)[None]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = [p.grad.float() for n, p in model.named_parameters() if p.requires_grad]
        return packed, loss.item(), grads

    storage, loss, grads = loss_and_grads("ddp")
    sharded_storage, sharded_loss, sharded_grads = loss_and_grads("fsdp")
    weights = models.torch_dtype(models.base_dtype(cfg("fsdp"), "bf16", torch.cuda.is_available()))
    assert storage == torch.uint8 and sharded_storage == weights != torch.uint8
    assert grads and sharded_loss == loss and all(torch.equal(a, b) for a, b in zip(grads, sharded_grads))


def _fsdp_cannot_run() -> str | None:
    """Why FSDP cannot be tested here (the same line `tunelab train` refuses it with), or None."""
    import torch

    from tunelab import distributed

    reason = distributed.fsdp_unavailable()
    if reason is None and torch.accelerator.device_count() < 2:
        reason = "FSDP with 2 processes needs 2 accelerators (one per process)"
    return reason


@pytest.mark.skipif(_fsdp_cannot_run() != FSDP_NEEDS_ACCELERATORS,
                    reason="this machine has accelerators: FSDP runs here")
def test_fsdp_on_cpus_is_refused_in_one_line_before_any_process_starts(tmp_path, tiny_model, tiny_chat_data,
                                                                       capsys):
    """accelerate would silently train CPU processes as DDP (full copies), so `fsdp` is refused where it cannot
    shard."""
    path = write_config(tmp_path, tiny_model, tiny_chat_data, "fsdp", batch_size=4, distributed={"strategy": "fsdp"})
    code, err = refusal(capsys, "train", str(path), "--nproc", "2")
    assert code == 2, err[-2000:]
    assert "distributed.strategy=fsdp needs GPUs" in err
    assert len(err.strip().splitlines()) == 1  # one line, not a launcher failure report per rank
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


def test_estimate_cli_takes_nproc(tmp_path, tiny_model, tiny_chat_data, capsys):
    from tunelab import cli

    path = write_config(tmp_path, tiny_model, tiny_chat_data, "est", batch_size=4, adapter={"type": "none"},
                        distributed={"strategy": "fsdp"})
    got = {}
    for n in (1, 8):
        capsys.readouterr()
        code = cli.main(["estimate", str(path), "--device", "h100", "--nproc", str(n), "--json"])
        out, err = capsys.readouterr()
        assert code == 0, err[-2000:]
        got[n] = json.loads(out)
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


# ---------------------------------------------------------------------------------------------------------- methods

PAIRS = [("Write a greeting.", "Hello, nice to meet you!", "go away"),
         ("Is the earth flat?", "No, it is roughly a sphere.", "Yes."),
         ("What is 2+2?", "2+2 = 4.", "It is 5."),
         ("Name a color.", "Blue.", "Seven.")]


@pytest.fixture(scope="module")
def method_data(tmp_path_factory) -> dict[str, str]:
    """Preference pairs, unpaired KTO rows and prompts, beside the chat data."""
    d = tmp_path_factory.mktemp("method-data")
    (d / "pairs.jsonl").write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n"
                                           for _ in range(4) for p, c, r in PAIRS))
    kto = [{"prompt": p, "completion": c, "label": True} for p, c, _ in PAIRS] * 3
    kto += [{"prompt": p, "completion": r, "label": False} for p, _, r in PAIRS] * 2
    (d / "kto.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kto))
    (d / "prompts.jsonl").write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"Say something {i}."}, {"role": "assistant", "content": "ok"}]}) + "\n"
        for i in range(16)))
    return {"pairs": str(d / "pairs.jsonl"), "kto": str(d / "kto.jsonl"), "prompts": str(d / "prompts.jsonl")}


def logged_reward(prompts, completions, **kwargs):
    """A reward (longer completions score higher) that also records, per process, what it scored: the tests check
    that the logged reward is the mean over every process's completions, and that the processes saw other prompts."""
    from tunelab.rewards import completion_text

    scores = [len(completion_text(c)) / 50 for c in completions]
    with open(os.environ["TUNELAB_TEST_REWARDS"], "a") as f:
        f.write(json.dumps({"rank": int(os.environ.get("RANK", "0")), "scores": scores,
                            "prompts": [json.dumps(p) for p in prompts]}) + "\n")
    return scores


REWARD = f"{__file__}:logged_reward"


@pytest.mark.slow
def test_dpo_two_processes_learn_what_one_process_learns(tmp_path, tiny_model, method_data):
    def cfg(name, batch_size):
        return write_config(tmp_path, tiny_model, method_data["pairs"], name, batch_size=batch_size, max_steps=3,
                            method={"name": "dpo"}, data={"max_length": 96}, adapter={"dropout": 0.0},
                            training={"save_steps": 100, "learning_rate": 5e-3})

    train(cfg("one", 4))
    out = train(cfg("two", 2), "--nproc", "2")
    run = tmp_path / "runs" / "two"
    assert losses(run) == pytest.approx(losses(tmp_path / "runs" / "one"), abs=1e-4)  # DPO is deterministic
    assert losses(run)[-1] < losses(run)[0]
    assert out.stdout.count("model: ") == 1  # rank 0 prints
    assert json.loads((run / "summary.json").read_text())["status"] == "complete"
    assert (run / "final" / "adapter_model.safetensors").is_file()


def _rewards_per_step(path: Path) -> list[float]:
    """The mean reward of every generation batch over all processes (each process's k-th call is batch k)."""
    by_rank: dict[int, list[list[float]]] = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        by_rank.setdefault(row["rank"], []).append(row["scores"])
    assert sorted(by_rank) == [0, 1], "both processes score their own completions"
    assert len(by_rank[0]) == len(by_rank[1])
    return [sum(a + b) / len(a + b) for a, b in zip(by_rank[0], by_rank[1])]


@pytest.mark.slow  # two two-process jobs with generation: the slowest here
@pytest.mark.e2e
def test_grpo_under_two_processes_trains_with_shared_rewards_and_resumes_after_a_kill(tmp_path, tiny_model,
                                                                                        method_data):
    path = write_config(tmp_path, tiny_model, method_data["prompts"], "grpo", batch_size=4, max_steps=4,
                        method={"name": "grpo", "rewards": [REWARD], "num_generations": 4,
                                "max_completion_length": 8},
                        adapter={"dropout": 0.0}, training={"save_steps": 2, "learning_rate": 5e-3})
    run = tmp_path / "runs" / "grpo"
    env = {**os.environ, "TUNELAB_TEST_JOB": str(tmp_path), "TUNELAB_TEST_REWARDS": str(tmp_path / "part1.jsonl")}
    kill_rank_once(path, run / "checkpoints" / "checkpoint-2", env)
    env["TUNELAB_TEST_REWARDS"] = str(tmp_path / "part2.jsonl")
    out = train(path, "--nproc", "2", env=env)
    assert "resuming from" in out.stdout
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r["reward"] for r in rows if "reward" in r}
    assert sorted(logged) == [1, 2, 3, 4]  # every step once: rank 0 alone writes, the resumed part continues
    # the resumed steps' logged rewards are the mean over both processes' completions
    assert [logged[3], logged[4]] == pytest.approx(_rewards_per_step(tmp_path / "part2.jsonl"), abs=1e-5)
    assert json.loads((run / "summary.json").read_text())["status"] == "complete"


METHODS = [({"name": "orpo"}, "pairs"), ({"name": "simpo"}, "pairs"), ({"name": "reward"}, "pairs"),
           ({"name": "kto"}, "kto"), ({"name": "distill", "student_layers": 1}, "chat")]


@pytest.mark.slow  # one two-process run per method (~a minute each on 2 cores)
@pytest.mark.e2e
@pytest.mark.parametrize("method, data", METHODS, ids=lambda v: v["name"] if isinstance(v, dict) else None)
def test_every_method_finishes_steps_under_two_processes(tmp_path, tiny_model, tiny_chat_data, method_data, method,
                                                         data, distributed=None):
    path = write_config(tmp_path, tiny_model, tiny_chat_data if data == "chat" else method_data[data], "m",
                        batch_size=4, max_steps=2, method=method, data={"max_length": 96},
                        distributed=distributed or {},
                        **({"adapter": {"type": "none"}} if method["name"] == "distill" else {}))
    env = {**os.environ, "TUNELAB_TEST_REWARDS": str(tmp_path / "rewards.jsonl")}
    train(path, "--nproc", "2", env=env)
    run = tmp_path / "runs" / "m"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["global_step"] == 2
    assert losses(run) and (run / "final").is_dir()


@needs_deepspeed
@pytest.mark.slow  # one two-process run per method
@pytest.mark.e2e
@pytest.mark.parametrize("method, data", [
    ({"name": "dpo"}, "pairs"),
    ({"name": "grpo", "rewards": [REWARD], "num_generations": 4, "max_completion_length": 8}, "prompts"),
    *METHODS], ids=lambda v: v["name"] if isinstance(v, dict) else None)
def test_every_method_but_ppo_finishes_steps_under_deepspeed_zero3(tmp_path, tiny_model, tiny_chat_data,
                                                                   method_data, method, data):
    """ZeRO-3 keeps each process's shard of the weights: GRPO samples without folding its adapter into them, and
    distillation's report reads the student without leaving its gathered weights as inference tensors."""
    test_every_method_finishes_steps_under_two_processes(tmp_path, tiny_model, tiny_chat_data, method_data, method,
                                                         data, {"strategy": "deepspeed", "zero_stage": 3})


def _ppo_config(tmp_path, tiny_model, method_data, name, max_steps=4, save_steps=2, training=(), **extra):
    return write_config(tmp_path, tiny_model, method_data["prompts"], name, batch_size=4, max_steps=max_steps,
                        method={"name": "ppo", "rewards": [REWARD], "max_completion_length": 8, "ppo_epochs": 2,
                                "num_mini_batches": 2}, adapter={"dropout": 0.0},
                        training={"save_steps": save_steps, "learning_rate": 5e-3, **dict(training)}, **extra)


def test_ppo_under_two_processes_rolls_out_each_share_and_logs_the_mean_over_both(tmp_path, tiny_model,
                                                                                   method_data):
    """PPO's own loop on two processes: each rolls out its own prompts of every step, the logged reward is the mean
    over both processes' completions, evaluation scores each validation prompt once (split between the processes)
    and reports the mean over all, and final/ holds the adapter and the value head."""
    val = tmp_path / "val.jsonl"
    val.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Check {i}."},
                                                    {"role": "assistant", "content": "ok"}]}) + "\n" for i in range(5)))
    path = _ppo_config(tmp_path, tiny_model, method_data, "ppo", max_steps=2, save_steps=100,
                       data={"validation": str(val)}, training={"eval_steps": 2}, eval={"metric": "eval_reward"})
    env = {**os.environ, "TUNELAB_TEST_REWARDS": str(tmp_path / "rewards.jsonl")}
    train(path, "--nproc", "2", env=env)
    run = tmp_path / "runs" / "ppo"
    assert json.loads((run / "summary.json").read_text())["status"] == "complete"
    assert len(losses(run)) == 2  # one entry per step: rank 0 alone writes
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    calls = [json.loads(x) for x in (tmp_path / "rewards.jsonl").read_text().splitlines()]
    evals = [c for c in calls if "Check" in c["prompts"][0]]
    train_calls = tmp_path / "train-rewards.jsonl"
    train_calls.write_text("".join(json.dumps(c) + "\n" for c in calls if c not in evals))
    logged = [r["reward"] for r in rows if "reward" in r]
    assert logged == pytest.approx(_rewards_per_step(train_calls), abs=1e-5)
    for a, b in zip(*([c["prompts"] for c in calls if c["rank"] == r and c not in evals] for r in (0, 1))):
        assert len(a) == len(b) == 4 and not set(a) & set(b)  # disjoint shares of the step's batch
    scored = [p for c in evals for p in c["prompts"]]
    assert len(scored) == len(set(scored)) == 5 and {c["rank"] for c in evals} == {0, 1}
    [evaluated] = [r for r in rows if "eval_reward" in r]
    scores = [x for c in evals for x in c["scores"]]
    assert evaluated["eval_reward"] == pytest.approx(sum(scores) / len(scores), abs=1e-5)
    assert (run / "final" / "adapter_model.safetensors").is_file()
    assert (run / "final" / "value_head.safetensors").is_file()


def reward_failing_on_rank_1(prompts, completions, **kwargs):
    if os.environ.get("RANK") == "1":
        raise RuntimeError("this reward broke on rank 1")
    return [0.0] * len(completions)


@pytest.mark.slow  # a two-process job, about a minute here
def test_a_process_that_crashes_ends_the_job_and_its_traceback_closes_the_output(tmp_path, tiny_model, method_data):
    """The job's failure summary (the last lines a user sees) names the failing process's error, not only its exit
    code: each process records its traceback for the launcher."""
    path = write_config(tmp_path, tiny_model, method_data["prompts"], "crash", batch_size=4, max_steps=1,
                        method={"name": "ppo", "rewards": [f"{__file__}:reward_failing_on_rank_1"],
                                "max_completion_length": 4})
    out = train(path, "--nproc", "2", check=False)
    assert out.returncode != 0
    tail = out.stderr[out.stderr.rfind("Root Cause"):]  # the summary's last section: the first process that failed
    assert "RuntimeError: this reward broke on rank 1" in tail and tail.count("\n") < 80, out.stderr[-3000:]


@pytest.mark.slow  # two two-process PPO jobs and a SIGKILL
def test_ppo_under_two_processes_resumes_after_a_kill_on_the_uninterrupted_curve(tmp_path, tiny_model, method_data):
    """Only rank 0 saves the value head: had the processes' value heads drifted apart (gradients not averaged),
    the resumed steps would differ from the uninterrupted run's."""
    env = {**os.environ, "TUNELAB_TEST_JOB": str(tmp_path), "TUNELAB_TEST_REWARDS": str(tmp_path / "rewards.jsonl")}
    train(_ppo_config(tmp_path, tiny_model, method_data, "whole"), "--nproc", "2", env=env)
    path = _ppo_config(tmp_path, tiny_model, method_data, "killed")
    run = tmp_path / "runs" / "killed"
    kill_rank_once(path, run / "checkpoints" / "checkpoint-2", env)
    out = train(path, "--nproc", "2", env=env)
    assert "resuming from" in out.stdout
    whole = losses(tmp_path / "runs" / "whole")
    assert len(whole) == 4 and losses(run) == pytest.approx(whole, abs=1e-5)


def test_a_method_is_refused_under_a_strategy_it_does_not_train_under(tmp_path, tiny_model, method_data, capsys):
    """PPO's own loop trains under DDP only: --nproc 2 with another strategy is one line and exit 2 from the
    launching process, and no run directory is written."""
    path = _ppo_config(tmp_path, tiny_model, method_data, "ppo", distributed={"strategy": "fsdp"})
    code, err = refusal(capsys, "train", str(path), "--nproc", "2")
    assert code == 2, err[-2000:]
    assert "method 'ppo' does not train under distributed.strategy=fsdp" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "runs" / "ppo").exists()
