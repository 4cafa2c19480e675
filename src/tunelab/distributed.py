"""Several processes, one run: data-parallel training through accelerate and the standard launchers.

`tunelab train CONFIG --nproc N` starts N processes with torch's own launcher (`python -m torch.distributed.run`,
i.e. torchrun); `torchrun --nnodes 2 --nproc-per-node 8 ... -m tunelab train CONFIG` and `accelerate launch -m
tunelab train CONFIG` work the same way. Each process runs the same `tunelab train`: the Trainer (through accelerate)
wraps the model in DDP, gives every process its own share of each batch and averages the gradients; on a CPU the
collectives run over gloo, on GPUs over NCCL. No collective code is written here.

What this module adds is the run directory's side of it: one process (rank 0) writes and prints, the others wait at
the points where they must agree (the run directory exists, a checkpoint is complete on every rank before it is
renamed into place, final/ is written). torchrun stops every process when one dies (a SIGKILL of one rank ends the
job), and the same command resumes from the last complete checkpoint, each rank with its own saved RNG state.
"""

from __future__ import annotations

import contextlib
import os
import sys


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def _state():
    """accelerate's process state: it sets up the process group from the launcher's environment (once)."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def barrier() -> None:
    """Every process waits here until all have arrived (nothing to do in a single process)."""
    if world_size() > 1:
        _state().wait_for_everyone()


@contextlib.contextmanager
def main_first():
    """Rank 0 runs the body first (e.g. building the tokenized-data cache), then the others (who then read it).

    Rank 0 then tells the others how its body went (accelerate's broadcast_object_list, a collective of the process
    group): a refusal there (bad data) is raised in every process, so all stop with the same one line, and a crash
    ends the others quietly, so the job's report names rank 0's error rather than a peer that lost its connection."""
    if world_size() == 1:
        yield
        return
    from accelerate.utils import broadcast_object_list

    from tunelab.errors import UserError

    _state()  # the process group, set up before the first collective
    if is_main():
        try:
            yield
        except UserError as e:
            broadcast_object_list([("refused", str(e))])
            raise
        except Exception:
            broadcast_object_list([("crashed", None)])
            raise
        broadcast_object_list([("done", None)])
        return
    outcome, message = broadcast_object_list([None])[0]
    if outcome == "refused":
        raise UserError(message)
    if outcome == "crashed":
        raise SystemExit(1)  # rank 0's traceback is the job's report
    yield


def name_cpu_for_deepspeed() -> None:
    """On a machine with no accelerator, say so to DeepSpeed (DS_ACCELERATOR=cpu, its own setting) where the user
    has not: accelerate imports DeepSpeed, when installed, whenever a Trainer looks at its model, and DeepSpeed's
    detection then prints a warning to stdout, in the middle of the run's progress, that it found no GPU."""
    import torch

    if "DS_ACCELERATOR" not in os.environ and torch.accelerator.current_accelerator() is None:
        os.environ["DS_ACCELERATOR"] = "cpu"


def quiet_unless_main(echo):
    """`echo` on rank 0, a no-op elsewhere: the pre-flight, estimate and progress print once."""
    return echo if is_main() else (lambda *a, **k: None)


FSDP_NEEDS_ACCELERATORS = ("distributed.strategy=fsdp needs GPUs (or other accelerators): accelerate shards with FSDP "
                           "only there and would train these CPU processes as plain DDP; set "
                           "distributed.strategy=ddp to train on CPUs")


def fsdp_unavailable() -> str | None:
    """Why FSDP cannot shard this process group, or None.

    accelerate (1.15) turns an FSDP plugin into FSDP only when its processes run on accelerators (the MULTI_GPU /
    XPU / NPU / ... branch of AcceleratorState); processes on CPUs (MULTI_CPU, gloo) keep a full model copy each and
    train as DDP without a word. Inside the job this asks accelerate's own state; in the launching process (`--nproc`,
    before any process starts) it asks torch whether there is an accelerator, which is what accelerate's choice rests
    on."""
    if world_size() > 1:
        from accelerate.utils import DistributedType

        cpu = _state().distributed_type == DistributedType.MULTI_CPU
    else:
        import torch

        cpu = not torch.accelerator.is_available()
    return FSDP_NEEDS_ACCELERATORS if cpu else None


def shards_weights(dcfg) -> bool:
    """Whether the strategy splits the weights themselves across processes (FSDP, ZeRO-3), not only gradients and
    optimizer state."""
    return dcfg.strategy == "fsdp" or (dcfg.strategy == "deepspeed" and dcfg.zero_stage == 3)


def check(cfg, method=None, nproc: int | None = None) -> None:
    """A strategy that cannot run here, refused before anything loads (one line): the method does not train under
    it, 8-bit weights would be sharded, its package is missing, or (FSDP) the processes have no accelerator to
    shard on. `cfg`: the RunConfig; `nproc`: the processes about to
    be launched (default: this job's)."""
    import importlib.util

    from tunelab.errors import UserError

    dcfg, several = cfg.distributed, (nproc or world_size()) > 1
    if several and method is not None and dcfg.strategy not in method.strategies:
        raise UserError(f"method '{cfg.method.name}' does not train under distributed.strategy={dcfg.strategy} (its "
                        f"own training loop); set distributed.strategy={method.strategies[0]}, or run it in one "
                        "process")
    if several and cfg.quantization.bits == 8 and shards_weights(dcfg):
        raise UserError(f"quantization.bits=8 with distributed.strategy={dcfg.strategy}: 8-bit weights cannot be "
                        "sharded across processes; use quantization.bits=4 (QLoRA shards, as FSDP-QLoRA does) or "
                        "distributed.strategy=ddp")
    if dcfg.strategy == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        raise UserError("distributed.strategy=deepspeed needs the deepspeed package: pip install 'tunelab[deepspeed]' "
                        "(or use distributed.strategy=ddp / fsdp, which need nothing more)")
    if dcfg.strategy == "fsdp" and several:
        reason = fsdp_unavailable()
        if reason:
            raise UserError(reason)


def training_arguments(dcfg) -> dict:
    """TrainingArguments for the strategy when this process is one of several (accelerate builds its plugin from
    them); nothing in a single process."""
    if world_size() == 1:
        return {}
    if dcfg.strategy == "ddp":
        # Every trainable weight of every method gets a gradient in every step (a frozen base's do not count), so
        # DDP need not search the graph for unused ones: the Trainer's default for a PEFT model (True) costs a
        # traversal of the autograd graph per step and warns each process that none was found.
        return {"ddp_find_unused_parameters": False}
    if dcfg.strategy == "fsdp":
        return {"fsdp": f"{dcfg.fsdp_sharding} auto_wrap" + (" offload" if dcfg.fsdp_cpu_offload else ""),
                "fsdp_config": {"version": 2, "activation_checkpointing": dcfg.fsdp_activation_checkpointing}}
    offload = {"device": "cpu"} if dcfg.zero_offload else {"device": "none"}
    zero = {"stage": dcfg.zero_stage, "offload_optimizer": offload}
    if dcfg.zero_stage == 3:
        # ZeRO-3 keeps the weights sharded: gather them when saving, or final/ would hold empty tensors
        zero.update(offload_param=offload, stage3_gather_16bit_weights_on_model_save=True)
    return {"deepspeed": {"zero_optimization": zero, "train_micro_batch_size_per_gpu": "auto",
                          "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
                          "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"}}}


# Set by `launch` for the processes it starts: a folder where a process that refuses the run (a UserError) leaves its
# one-line message instead of printing it, so the launcher prints it once, not once per process.
REFUSALS_ENV = "TUNELAB_LAUNCH_REFUSALS"


def record_refusal(message: str) -> bool:
    """In a process started by `launch`: keep a refusal's message for the launcher (True); elsewhere False."""
    folder = os.environ.get(REFUSALS_ENV)
    if not folder or not os.path.isdir(folder):
        return False
    with open(os.path.join(folder, f"rank-{rank()}.txt"), "w") as f:
        f.write(message)
    return True


LAUNCHER_ENV = "TUNELAB_LAUNCHER_PID"


def exit_with_launcher() -> None:
    """In a process `launch` started: end it as soon as the launcher is gone. torchrun starts each process in a
    session of its own and can forward no SIGKILL, so a killed launcher left its processes training on: the same
    command re-run at once then met checkpoints they rotated away under it. Written by hand: torch's launcher has no
    such option. A watch of the parent's pid rather than a parent-death signal, which would fire when the launcher
    thread that started the process ends, not the launcher."""
    launcher = os.environ.get(LAUNCHER_ENV)
    if not launcher or world_size() == 1:
        return
    import threading
    import time

    def watch():
        while os.getppid() == int(launcher):
            time.sleep(0.5)
        os._exit(137)  # as killed: the job's checkpoints are atomic, a resume continues from the last complete one

    threading.Thread(target=watch, name="tunelab-launcher-watch", daemon=True).start()


def unused_strategy(dcfg) -> str | None:
    """A note when the config names a strategy that a single process does not use (it applies across processes)."""
    if world_size() == 1 and dcfg.strategy != "ddp":
        return (f"note: distributed.strategy={dcfg.strategy} applies when several processes train (--nproc N, "
                "torchrun, accelerate launch); this single process trains without it")
    return None


def launch(argv: list[str], nproc: int) -> int:
    """Run `tunelab <argv>` in `nproc` processes on this machine with torch's launcher; its exit code.

    torchrun's own `run` is used (in this process) rather than a process pool of our own: it sets
    RANK/WORLD_SIZE/MASTER_ADDR for every process, forwards Ctrl-C and SIGTERM to them, and ends the whole job when one
    process fails. What a failed job prints is decided here: a run the processes refused (bad data, say) is the one
    line they left and exit 2, as in one process; a crash is torchrun's failure report, which ends with the failing
    process's traceback."""
    import logging
    import tempfile

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # the agent's own lines on a failure ("failed (exitcode: 2)", "closing signal SIGTERM") only repeat what is
    # printed below; its loggers each carry their own level, so each is raised
    for name in list(logging.Logger.manager.loggerDict):
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    args = parse_args(["--nproc-per-node", str(nproc), "--master-port", str(_free_port()), "-m", "tunelab", *argv])
    # torchrun gives each process one CPU thread (with a banner saying so) unless OMP_NUM_THREADS is set; the
    # processes of one machine share its cores instead (cores // N threads each), so a CPU job uses all of them
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1  # macOS lacks it
    threads = None if "OMP_NUM_THREADS" in os.environ else str(max(1, cores // nproc))
    with tempfile.TemporaryDirectory(prefix="tunelab-launch-") as refusals:
        os.environ[REFUSALS_ENV] = refusals
        os.environ[LAUNCHER_ENV] = str(os.getpid())  # the processes end with this one (exit_with_launcher)
        if threads:
            os.environ["OMP_NUM_THREADS"] = threads
        try:
            run(args)
            return 0
        except ChildFailedError as e:
            left = sorted(os.listdir(refusals), key=lambda name: int(name.split("-")[1].split(".")[0]))
            if left:  # a refusal: the others stopped because of it
                with open(os.path.join(refusals, left[0])) as f:
                    print(f"error: {f.read()}", file=sys.stderr)
                return 2
            print(e.format_msg(), file=sys.stderr)
            return 1
        except SignalException as e:  # Ctrl-C or SIGTERM to the launcher: torchrun has stopped the processes
            print("interrupted", file=sys.stderr)
            return 128 + int(e.sigval)
        finally:
            os.environ.pop(REFUSALS_ENV, None)
            os.environ.pop(LAUNCHER_ENV, None)
            if threads:
                os.environ.pop("OMP_NUM_THREADS", None)


def _free_port() -> int:
    """A port for the launcher's rendezvous, so two jobs on one machine (two tests, two users) do not collide."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
