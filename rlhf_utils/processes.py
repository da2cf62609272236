"""Processes and tracking: the Accelerator of a launch, checked against a resumed checkpoint's layout; the W&B run;
the DeepSpeed settings a training loop relies on and the frozen models' engines."""

import os
import sys
import time
from dataclasses import asdict
from typing import Optional

import torch

from rlhf_utils.cli import fail


def make_accelerator(
    accumulation_steps: int,
    bf16: bool,
    max_grad_norm: Optional[float],
    resume_state: Optional[dict] = None,
    sync_with_dataloader: bool = False,
) -> tuple:
    """The Accelerator of this launch (processes, mixed precision, DeepSpeed) and its ZeRO stage (None: no
    DeepSpeed). An optimizer step takes `accumulation_steps` backward passes (and, with sync_with_dataloader, ends
    with the data loader too), whatever the launcher's config says. A resumed run must have the launch layout of its
    checkpoint (resume_state): each process's data position and RNG state, and DeepSpeed's optimizer shards, belong
    to one."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, GradientAccumulationPlugin, InitProcessGroupKwargs

    # On a CPU-only host the processes talk over gloo: cpu=True joins the process group that torchrun (or `accelerate
    # launch --multi_gpu`) set up, where a plain Accelerator() would run independent copies; accelerate ignores
    # DeepSpeed under cpu=True, and DeepSpeed needs the backend named or each rank sees one process. GPUs: NCCL.
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    check_launcher_processes(world_size)
    on_cpu = not torch.cuda.is_available()
    deepspeed_launch = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    accelerator = Accelerator(
        cpu=on_cpu and not deepspeed_launch,
        mixed_precision="bf16" if bf16 else "no",
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=accumulation_steps, sync_with_dataloader=sync_with_dataloader
        ),
        kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")] if on_cpu and world_size > 1 else [],
    )
    if accelerator.num_processes != world_size:
        fail(
            "num_processes", f"WORLD_SIZE says {world_size} processes but accelerate runs {accelerator.num_processes}"
        )
    zero_stage = None
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # Clip at --max-grad-norm whatever the config file says; ZeRO-3 gathers full weights to save a loadable model.
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        ds_config["gradient_clipping"] = max_grad_norm or 0.0  # 0: off
        zero_stage = ds_config["zero_optimization"]["stage"]
        if zero_stage == 3:
            ds_config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
    if resume_state is not None and resume_state["world_size"] != world_size:
        fail(
            "resume_from_checkpoint",
            f"the checkpoint was written by {resume_state['world_size']} processes; "
            f"resume it with the same number, not {world_size}",
        )
    if resume_state is not None and resume_state.get("zero_stage") != zero_stage:
        fail(
            "resume_from_checkpoint",
            f"the checkpoint was written with DeepSpeed ZeRO stage {resume_state.get('zero_stage')}, this launch has "
            f"{zero_stage} (None: no DeepSpeed); resume it the same way",
        )
    return accelerator, zero_stage


def start_tracking(args, step_metric: str, charts: tuple = ("*",)) -> None:
    """A W&B run named --run-name (TRL's flag) or as CleanRL names them (exp_name__seed__time), with the arguments
    as its config and the script's code; every chart matching `charts` has step_metric as its x-axis."""
    import wandb

    run_name = getattr(args, "run_name", None) or f"{args.exp_name}__{args.seed}__{int(time.time())}"
    wandb.init(
        project=args.wandb_project_name, entity=args.wandb_entity, config=asdict(args), name=run_name, save_code=True
    )
    wandb.define_metric(step_metric)
    for pattern in charts:
        wandb.define_metric(pattern, step_metric=step_metric)


def launcher_asked_processes(parent_cmdline: list) -> int:
    """How many processes an `accelerate launch` command line asked for (--num_processes / --num-processes, before
    the script's name); 1 when it is not such a command or does not say."""
    words = parent_cmdline[parent_cmdline.index("launch") + 1 :] if "launch" in parent_cmdline else []
    if not any(os.path.basename(w) == "accelerate" for w in parent_cmdline):
        return 1
    for i, word in enumerate(words):
        if word.endswith(".py") or word == "-m":
            break  # the script's own arguments follow
        flag, _, value = word.partition("=")
        if flag in ("--num_processes", "--num-processes"):
            value = value or (words[i + 1] if i + 1 < len(words) else "")
            return int(value) if value.isdigit() else 1
    return 1


def check_launcher_processes(num_processes: int) -> None:
    """`accelerate launch --num_processes N script.py` on a machine without GPUs and without a config file starts ONE
    process (accelerate's CPU mode needs mpirun or --multi_gpu for more): stop, instead of training silently with
    1/N of the batch per update and N times the updates."""
    if num_processes != 1 or not sys.platform.startswith("linux"):
        return
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            parent = f.read().decode(errors="replace").split("\0")
    except OSError:
        return
    asked = launcher_asked_processes(parent)
    if asked > 1:
        fail(
            "num_processes",
            f"accelerate launch was asked for {asked} processes but started one (on a CPU, accelerate starts several "
            f"only with --multi_gpu or a config file); use `torchrun --nproc_per_node {asked} SCRIPT` or `accelerate "
            f"launch --multi_gpu --num_processes {asked} --num_machines 1 --mixed_precision no --dynamo_backend no "
            "SCRIPT` (docs/scale_out.md)",
        )


def configure_deepspeed(accelerator, micro_batch_size: int, accumulation_steps: int, max_grad_norm) -> int:
    """What a training loop relies on under DeepSpeed, whatever the launcher's config file says: micro-batches of
    micro_batch_size, one engine step per accumulation_steps backward passes, clipping at max_grad_norm, and (ZeRO-3)
    full weights gathered for saving loadable models. Returns the ZeRO stage."""
    ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
    ds_config.update(
        train_micro_batch_size_per_gpu=micro_batch_size,
        gradient_accumulation_steps=accumulation_steps,
        gradient_clipping=max_grad_norm or 0.0,
        train_batch_size=micro_batch_size * accumulation_steps * accelerator.num_processes,
    )
    zero_stage = ds_config["zero_optimization"]["stage"]
    if zero_stage == 3:
        ds_config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
    return zero_stage


def prepare_frozen(frozen: torch.nn.Module, accelerator, micro_batch_size: int, bf16: bool, zero_stage: Optional[int]):
    """A model that is never trained (a reference or reward model): a copy on every process, or, under DeepSpeed, an
    inference engine from an eval config built here (no optimizer; ZeRO-3 shards it like the trained models when
    training uses ZeRO-3, else stage 0 keeps a full copy on each process)."""
    if zero_stage is None:
        return frozen.to(accelerator.device)
    import deepspeed

    eval_config = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "bf16": {"enabled": bf16},
        "zero_optimization": {"stage": 0},
    }
    if zero_stage == 3:
        zero = accelerator.state.deepspeed_plugin.deepspeed_config["zero_optimization"]
        eval_config["zero_optimization"] = {
            "stage": 3,
            "stage3_param_persistence_threshold": zero.get("stage3_param_persistence_threshold", 1e5),
            "offload_param": zero.get("offload_param", {"device": "none"}),
        }
    engine, *_ = deepspeed.initialize(model=frozen, config=eval_config)
    engine.eval()
    return engine
