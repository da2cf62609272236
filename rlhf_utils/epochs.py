"""What sft.py and reward_modeling.py share around their epoch loops: the common arguments, the data loaders, AdamW
and its schedule, the resume position, the clipped optimizer step, the logged row and the checkpoint-or-stop at the
end of an optimizer step. The losses and what a step computes stay in the scripts."""

import json
import math
import os
import shutil
from dataclasses import dataclass
from typing import Literal, Optional

import torch

from rlhf_utils.checkpoints import load_checkpoint, write_checkpoint
from rlhf_utils.cli import check_paths
from rlhf_utils.hub import check_push_to_hub
from rlhf_utils.runs import stop_requested, stop_run, wandb_row


@dataclass
class EpochArgs:
    """The arguments sft.py and reward_modeling.py share (their Args add the data, the model and the algorithm's)."""

    # common settings
    seed: int = 1
    """seed of python, numpy and torch"""
    track: bool = False
    """log to Weights and Biases"""
    wandb_project_name: str = "rlhf"
    """the W&B project"""
    wandb_entity: Optional[str] = None
    """the W&B entity (team)"""
    overwrite_output_dir: bool = False
    """replace an existing non-empty output_dir"""
    save_steps: int = 0
    """write a resumable checkpoint every this many optimizer steps (0: never)"""
    save_total_limit: Optional[int] = 2
    """keep only the newest this many checkpoints (None: keep all)"""
    resume_from_checkpoint: Optional[str] = None
    """a checkpoint folder, or `latest` for the newest one in output_dir/checkpoints; the run continues exactly"""
    push_to_hub: bool = False
    """upload the saved model and tokenizer to the Hugging Face hub"""
    hub_model_id: Optional[str] = None
    """the hub repository for --push-to-hub (None: the output_dir's name)"""
    trust_remote_code: bool = False
    """allow models and tokenizers that run code from their repository"""

    # AdamW and its schedule
    gradient_accumulation_steps: int = 1
    """micro-batches per optimizer step"""
    lr_scheduler_type: Literal["cosine", "linear", "constant"] = "cosine"
    """learning-rate schedule after warmup"""
    warmup_ratio: float = 0.05
    """fraction of the optimizer steps spent warming up linearly"""
    weight_decay: float = 0.0
    """AdamW's decoupled weight decay"""
    adam_epsilon: float = 1e-5
    """AdamW's epsilon"""
    adam_beta1: float = 0.9
    """AdamW's beta1"""
    adam_beta2: float = 0.999
    """AdamW's beta2"""
    max_grad_norm: Optional[float] = 1.0
    """gradient clipping norm; None: no clipping"""
    bf16: bool = False
    """bf16 autocast (faster matmuls on GPUs and on CPUs with avx512_bf16)"""
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass to save memory"""


# Arguments of EpochArgs (and the scripts' output_dir, exp_name, logging_steps) a resumed run may change: where and
# how often things are written, tracking and memory savers. Anything else would silently train a different model.
EPOCH_MAY_CHANGE_ON_RESUME = (
    "exp_name track wandb_project_name wandb_entity output_dir overwrite_output_dir push_to_hub hub_model_id "
    "trust_remote_code save_steps save_total_limit resume_from_checkpoint logging_steps gradient_checkpointing"
).split()


def check_model_and_hub(args, hint: str) -> None:
    """The last checks before any data loads: the model and tokenizer paths exist (`hint` says how to get them), and
    with --push-to-hub the Hub repository can be written (this asks the Hub, so it comes after every local check)."""
    tokenizer_path = args.tokenizer_name_or_path or args.model_name_or_path
    check_paths({"model_name_or_path": args.model_name_or_path, "tokenizer_name_or_path": tokenizer_path}, hint)
    if args.push_to_hub:
        check_push_to_hub(args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir)))


def data_loaders(train_rows: list, eval_rows: list, batch_size: int, collate, seed: int) -> tuple:
    """The shuffled train loader, the eval loader and the train loader's generator: its state at each epoch's start
    goes in checkpoints, so that a resumed run draws the same shuffle."""
    shuffle_generator = torch.Generator().manual_seed(seed)
    train_loader = torch.utils.data.DataLoader(
        train_rows, batch_size=batch_size, shuffle=True, collate_fn=collate, generator=shuffle_generator
    )
    eval_loader = torch.utils.data.DataLoader(eval_rows, batch_size=batch_size, collate_fn=collate)
    return train_loader, eval_loader, shuffle_generator


def adamw_and_schedule(args, model, num_batches: int, num_processes: int) -> tuple:
    """AdamW over the trainable parameters, the learning-rate schedule, the optimizer steps of one epoch and of the
    run (--num-train-epochs may be a fraction: that share of the steps, rounded up). The schedule counts this
    process's optimizer steps (accelerate gives each process ceil(batches / processes) batches) and is stepped by
    hand once per optimizer step, so it is not prepared: accelerate's wrapper would step it once per process,
    which overshoots the schedule when the batches do not split evenly."""
    from transformers import get_scheduler

    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=args.learning_rate,
        eps=args.adam_epsilon,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.weight_decay,
    )
    steps_per_epoch = math.ceil(math.ceil(num_batches / num_processes) / args.gradient_accumulation_steps)
    num_update_steps = math.ceil(steps_per_epoch * args.num_train_epochs)
    scheduler = get_scheduler(
        args.lr_scheduler_type,
        optimizer,
        num_warmup_steps=int(args.warmup_ratio * num_update_steps),
        num_training_steps=num_update_steps,
    )
    return optimizer, scheduler, num_update_steps


def resume_position(args, resume_dir, resume_state, shuffle_generator, accelerator, model, optimizer, scheduler, zero):
    """Where the loop starts: (metrics so far, optimizer steps done, epoch, batches done in it). A resumed run takes
    the optimizer, schedule, RNG and shuffle states from its checkpoint; a fresh one drops the checkpoints of a run
    that --overwrite-output-dir replaces, so that they do not mix with its own."""
    if not resume_dir:
        if accelerator.is_main_process:
            shutil.rmtree(os.path.join(args.output_dir, "checkpoints"), ignore_errors=True)
        return [], 0, 0, 0
    load_checkpoint(resume_dir, resume_state, accelerator, model, optimizer, scheduler, zero)
    shuffle_generator.set_state(resume_state["shuffle"])
    step, epoch, batches_done = resume_state["step"], resume_state["epoch"], resume_state["batches_done"]
    accelerator.print(
        f"resumed from {resume_dir}: continuing after optimizer step {step} (epoch {epoch}, {batches_done} batches in)"
    )
    return json.loads(resume_state["metrics"]), step, epoch, batches_done


def optimizer_step(args, accelerator, model, optimizer, scheduler, step: int) -> None:
    """After a backward inside accelerator.accumulate: on the micro-batch that ends an optimizer step, clip the
    gradients (--max-grad-norm None: an infinite bound, the norm still checked) and stop on a non-finite norm (the
    step would write it into the weights and every later checkpoint, so the run stops before it and the last
    checkpoint stays intact); then the step and the schedule's."""
    if accelerator.sync_gradients:
        max_norm = args.max_grad_norm if args.max_grad_norm is not None else math.inf
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_norm)
        if grad_norm is not None and not math.isfinite(float(grad_norm)):
            raise SystemExit(
                f"error: non-finite gradient norm at optimizer step {step + 1}; the run stops before that step, so "
                "the last checkpoint is intact (lower --learning-rate)"
            )
    optimizer.step()
    if accelerator.sync_gradients:
        scheduler.step()
    optimizer.zero_grad()


def log_row(row: dict, metrics_log: list, track: bool, accelerator) -> None:
    """A row of metrics.jsonl, and of W&B under --track."""
    metrics_log.append(row)
    if track and accelerator.is_main_process:
        import wandb

        wandb.log(wandb_row(row))


def checkpoint_or_stop(args, step: int, position: dict, metrics_log: list, script: str, accelerator, *training):
    """At the end of optimizer step `step`: a checkpoint every --save-steps, or when a signal asks the run to stop
    (then the run ends). `position` is the data position (the epoch, its shuffle state, the batches done in it);
    `training` is (model, optimizer, scheduler, zero_stage)."""
    stop = stop_requested(accelerator)
    if (args.save_steps and step % args.save_steps == 0) or stop:
        state = dict(step=step, **position, metrics=json.dumps(metrics_log), script=script)
        write_checkpoint(args, step, state, accelerator, *training)
    if stop:
        stop_run(accelerator, stop, f"optimizer step {step}", step)
