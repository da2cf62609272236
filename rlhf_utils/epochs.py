"""What sft.py and reward_modeling.py share around their epoch loops: the common arguments, the data loaders, AdamW
and its schedule, the resume position, the clipped optimizer step, the logged row and the checkpoint-or-stop at the
end of an optimizer step. The losses and what a step computes stay in the scripts."""

import json
import math
import os
import random
import shutil
import sys
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np
import torch

from rlhf_utils.checkpoints import load_checkpoint, write_checkpoint
from rlhf_utils.cli import TRLFlags, check_paths, fail, warmup_steps
from rlhf_utils.hub import check_push_to_hub
from rlhf_utils.models import disable_dropout, disable_dropout_in_config, load_options
from rlhf_utils.processes import make_accelerator, start_tracking
from rlhf_utils.runs import stop_requested, stop_run, wandb_row


@dataclass
class EpochArgs(TRLFlags):
    """The arguments sft.py and reward_modeling.py share (their Args add the data, the model and the algorithm's)."""

    # common settings
    exp_name: str = os.path.splitext(os.path.basename(sys.argv[0]))[0]
    """the name of this experiment (W&B run names start with it; default: the script's name)"""
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

    # AdamW and its schedule (the scripts' Args: learning_rate, num_train_epochs)
    per_device_train_batch_size: int = 32
    """examples (sft.py) or pairs (reward_modeling.py) per forward pass on each process"""
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
    logging_steps: int = 20
    """print/log the train loss (and the reward model's accuracy) every this many optimizer steps"""

    # LoRA (PEFT), under the script's --use-peft
    lora_r: int = 16
    """LoRA rank"""
    lora_alpha: int = 32
    """LoRA scaling numerator (the update is scaled by lora_alpha / lora_r)"""
    lora_dropout: float = 0.0
    """dropout on the adapter's input (0, like every dropout in the RLHF pipeline)"""
    lora_target_modules: Optional[list[str]] = None
    """modules that get an adapter (None: PEFT's choice for the architecture; `all-linear`: every linear layer)"""

    # TRL's flags whose meaning is this script's (the rest: rlhf_utils.cli.TRLFlags)
    per_device_eval_batch_size: Optional[int] = None
    """TRL: examples per evaluation forward on each process; None: per_device_train_batch_size"""
    optim: str = "adamw_torch"
    """TRL: the optimizer: adamw_torch or adamw_torch_fused (one kernel for all parameters)"""


# Arguments of EpochArgs (and the scripts' output_dir, exp_name, logging_steps) a resumed run may change: where and
# how often things are written, tracking and memory savers. Anything else would silently train a different model.
MAY_CHANGE_ON_RESUME = (
    "exp_name track wandb_project_name wandb_entity output_dir overwrite_output_dir push_to_hub hub_model_id "
    "trust_remote_code save_steps save_total_limit resume_from_checkpoint logging_steps gradient_checkpointing "
    "report_to run_name logging_first_step save_strategy per_device_eval_batch_size"
).split()


def check_model_and_hub(args, hint: str) -> None:
    """The last checks before any data loads: the model and tokenizer paths exist (`hint` says how to get them), and
    with --push-to-hub the Hub repository can be written (this asks the Hub, so it comes after every local check)."""
    tokenizer_path = args.tokenizer_name_or_path or args.model_name_or_path
    check_paths({"model_name_or_path": args.model_name_or_path, "tokenizer_name_or_path": tokenizer_path}, hint)
    if args.push_to_hub:
        check_push_to_hub(args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir)))


def check_lora_rows(args, config, tokenizer) -> None:
    """Under --use-peft, the tokenizer's ids must fit the model's embedding rows: a new [PAD] past them would resize
    the embeddings (load_for_training), and a LoRA adapter does not save the new row."""
    embedding_rows = config.get_text_config().vocab_size
    if len(tokenizer) > embedding_rows and args.use_peft:
        fail(
            "use_peft",
            f"the tokenizer has {len(tokenizer)} tokens (pad {tokenizer.pad_token!r} is id "
            f"{tokenizer.pad_token_id}) but {args.model_name_or_path!r} has {embedding_rows} embedding rows, "
            "and a LoRA adapter does not save new rows; train without --use-peft once, or give the "
            "tokenizer a pad token inside its vocabulary (tokenizer.pad_token = <an unused token>)",
        )


def load_for_training(model_class, args, config, tokenizer, resume_dir: Optional[str], accelerator):
    """The model to train, of model_class from --model-name-or-path with `config`, dropout off as in the whole RLHF
    pipeline (the N+ recipe); a resumed run takes the trained weights from its checkpoint (with LoRA: the base, whose
    adapter with_lora loads). A new [PAD] past the embedding rows (Llama-3, Mistral: no spare rows) resizes them, the
    new rows mean-initialised: the saved model and tokenizer then agree, and the PPO scripts take both as they are."""
    disable_dropout_in_config(config)
    embedding_rows = config.get_text_config().vocab_size
    resize = len(tokenizer) > embedding_rows
    if resize and resume_dir:
        config.get_text_config().vocab_size = len(tokenizer)  # the checkpoint holds the resized embeddings
    path = os.path.join(resume_dir, "model") if resume_dir and not args.use_peft else args.model_name_or_path
    if "SequenceClassification" in model_class.__name__ and path == args.model_name_or_path:
        if not any("SequenceClassification" in name for name in config.architectures or []):
            accelerator.print(
                "note: the score head is new (randomly initialised), so transformers' LOAD REPORT below lists it as "
                "missing: expected when a reward model starts from a language model"
            )
    model = model_class.from_pretrained(
        path, config=config, trust_remote_code=args.trust_remote_code, **load_options(args)
    )
    disable_dropout(model)  # what the config does not reach: rates kept as module attributes
    if resize and not resume_dir:
        model.resize_token_embeddings(len(tokenizer))
        accelerator.print(f"resized the embeddings from {embedding_rows} to {len(tokenizer)} rows for the tokenizer")
    return model


def with_lora(model, args, resume_dir: Optional[str], task_type: str, modules_to_save: Optional[list] = None):
    """Under --use-peft, the model with a LoRA adapter of --lora-r, --lora-alpha, --lora-dropout and
    --lora-target-modules (modules_to_save are trained and saved whole next to it); a resumed run loads the trained
    adapter from its checkpoint. Without --use-peft, the model as it is."""
    if not args.use_peft:
        return model
    from peft import LoraConfig, PeftModel, get_peft_model

    if resume_dir:
        return PeftModel.from_pretrained(model, os.path.join(resume_dir, "model"), is_trainable=True)
    targets = args.lora_target_modules  # `all-linear` is PEFT's keyword only as a string; tyro gives a list
    config = LoraConfig(
        task_type=task_type,
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules="all-linear" if targets == ["all-linear"] else targets,
        modules_to_save=modules_to_save,
    )
    return get_peft_model(model, config)


def start_run(args, resume_state: Optional[dict], added_pad: Optional[str], sync_with_dataloader: bool) -> tuple:
    """The Accelerator of this launch and its ZeRO stage (make_accelerator: an optimizer step every
    --gradient-accumulation-steps micro-batches, and with sync_with_dataloader at each epoch's end), the line on an
    added [PAD], the seeds of python, numpy and torch, and the W&B run under --track."""
    accelerator, zero_stage = make_accelerator(
        args.gradient_accumulation_steps, args.bf16, args.max_grad_norm, resume_state, sync_with_dataloader
    )
    if added_pad:
        accelerator.print(added_pad)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    if args.track and accelerator.is_main_process:
        start_tracking(args, "train/global_step")
    return accelerator, zero_stage


def report_data(accelerator, summary: str, plain_text: bool, tokenizer, num_train: int, max_length: int) -> None:
    """The log line on the tokenised data, with a note when a tokenizer with a chat template meets plain strings
    (used as they are); a stop when no training example fits --max-length."""
    accelerator.print(summary)
    if plain_text and tokenizer.chat_template:
        accelerator.print(
            "note: the tokenizer has a chat template, but the data is plain text: it is used as it is, without the "
            "template (give lists of {role, content} messages to have it applied)"
        )
    if not num_train:
        fail("max_length", f"every training example is longer than {max_length} tokens")


def data_loaders(
    train_rows: list, eval_rows: list, batch_size: int, collate, seed: int, eval_batch_size: Optional[int] = None
) -> tuple:
    """The shuffled train loader, the eval loader (eval_batch_size per batch; None: batch_size) and the train loader's
    generator: its state at each epoch's start goes in checkpoints, so that a resumed run draws the same shuffle."""
    shuffle_generator = torch.Generator().manual_seed(seed)
    train_loader = torch.utils.data.DataLoader(
        train_rows, batch_size=batch_size, shuffle=True, collate_fn=collate, generator=shuffle_generator
    )
    eval_loader = torch.utils.data.DataLoader(eval_rows, batch_size=eval_batch_size or batch_size, collate_fn=collate)
    return train_loader, eval_loader, shuffle_generator


def adamw_and_schedule(args, model, train_loader, accelerator) -> tuple:
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
        fused=args.optim == "adamw_torch_fused" or None,  # None: torch's default
    )
    batches_per_process = math.ceil(len(train_loader) / accelerator.num_processes)
    steps_per_epoch = math.ceil(batches_per_process / args.gradient_accumulation_steps)
    num_update_steps = math.ceil(steps_per_epoch * args.num_train_epochs)
    scheduler = get_scheduler(
        args.lr_scheduler_type,
        optimizer,
        num_warmup_steps=warmup_steps(args, num_update_steps),
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
