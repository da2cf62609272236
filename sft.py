"""Supervised fine-tuning on `prompt`/`completion` data: the first stage of RLHF.

    python sft.py                                   # the embedded tiny TL;DR task, offline, a few minutes on a CPU
    accelerate launch sft.py --model-name-or-path EleutherAI/pythia-1b-deduped --dataset-name trl-lib/tldr \
        --learning-rate 3e-5 --num-train-epochs 1 --output-dir models/sft_tldr

The loss is the next-token cross-entropy on completion tokens only (prompt and padding positions are masked),
and the completion ends with EOS so that the policy learns to stop. Conversational data (TRL's `messages`, or
`prompt`/`completion` as lists of messages) goes through the tokenizer's chat template, with the loss on the
assistant turns only. A `text` column (TRL's language-modelling format) trains on every token.
"""

import functools
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F

from rlhf_utils import epochs
from rlhf_utils.checkpoints import check_resume
from rlhf_utils.cli import (
    TRAINING_RANGES,
    check_ranges,
    check_trl_flags,
    explain_remote_code_errors,
    fail,
    parse_args,
)
from rlhf_utils.data import (
    column_kind,
    load_splits,
    load_tokenizer,
    require_assistant,
    tokenize_conversation,
)
from rlhf_utils.hub import model_card
from rlhf_utils.outputs import claim_output_dir, save_output, write_run_files
from rlhf_utils.runs import end_run, progress_bar, show_samples, stop_on_signals


@dataclass
class Args(epochs.EpochArgs):  # seed, tracking, checkpoints, Hub, AdamW and its schedule, LoRA: rlhf_utils
    output_dir: str = "models/sft_tiny"
    """where the model and tokenizer are saved (written atomically at the end)"""

    # data and model
    model_name_or_path: str = "embedded/base_model"
    """the base model: a hub id or a local folder"""
    tokenizer_name_or_path: Optional[str] = None
    """the tokenizer (None: model_name_or_path's); without a pad token distinct from EOS, a dedicated [PAD] is added"""
    dataset_name: str = "embedded/sft_data"
    """hub id, save_to_disk folder or json/jsonl/parquet/csv/tsv file with `prompt`/`completion` or `messages`"""
    dataset_train_split: str = "train"
    """the split to train on"""
    dataset_test_split: str = "validation"
    """the held-out split for the eval loss and samples (if there is none: every 10th train row, see the log)"""
    max_length: int = 256
    """examples whose prompt + completion is longer (in tokens) are dropped and counted"""

    # optimisation (the rest of AdamW and its schedule: EpochArgs)
    learning_rate: float = 3e-3
    """peak learning rate (tiny models trained from scratch like it high; ~3e-5 for Pythia-1B)"""
    num_train_epochs: float = 3
    """passes over the training split; a fraction (e.g. 0.5) trains on that share of the optimizer steps"""
    eval_strategy: Literal["epoch", "steps"] = "epoch"
    """when the held-out loss is computed: after each epoch, or every --eval-steps optimizer steps"""
    eval_steps: Optional[int] = None
    """with --eval-strategy steps: evaluate every this many optimizer steps (None: --logging-steps)"""
    num_sample_completions: int = 6
    """validation prompts shown with the model's greedy completion at the end"""
    sample_max_new_tokens: int = 53
    """generation length of the sample completions"""

    # LoRA (PEFT; rank, alpha, dropout and target modules: EpochArgs)
    use_peft: bool = False
    """train a LoRA adapter instead of the model's weights; output_dir then holds the adapter"""
    merge_adapter_on_save: bool = False
    """also save the adapter merged into the base, in output_dir/merged (a plain model, e.g. for reward_modeling.py)"""


def check_args(args: Args) -> None:
    """Every check that needs only the arguments, before any data or model loads: a typo should cost a second."""
    ranges = {**TRAINING_RANGES, "num_train_epochs": (">", 0), "max_length": (">", 0), "eval_steps": (">", 0)}
    check_ranges(args, ranges)
    check_trl_flags(args)
    if args.merge_adapter_on_save and not args.use_peft:
        fail("merge_adapter_on_save", "merges a LoRA adapter into the model; add --use-peft")
    if args.eval_steps is not None and args.eval_strategy != "steps":
        fail("eval_steps", f"applies to --eval-strategy steps (now {args.eval_strategy}); add it or drop --eval-steps")
    epochs.check_model_and_hub(args, "build the embedded task with `python tiny_tldr.py` or pass a path/hub id")


# Arguments a resumed run may change besides those of rlhf_utils' list: what is shown at the end, and the merge.
MAY_CHANGE_ON_RESUME = epochs.MAY_CHANGE_ON_RESUME + [
    "num_sample_completions",
    "sample_max_new_tokens",
    "merge_adapter_on_save",
]


def sft_format(data, where: str) -> str:
    """Which of TRL's SFT formats a split is, every row checked: `text` (`prompt`/`completion` strings),
    `conversation` (`prompt`/`completion` lists of messages), `messages` (whole conversations) or `language modeling`
    (a `text` column: every token is trained on)."""
    if {"prompt", "completion"} <= set(data.column_names):
        kind = column_kind(data, "prompt", where)[0]
        if column_kind(data, "completion", where)[0] != kind:
            fail("dataset_name", f"{where}: `prompt` and `completion` must both be strings or both conversations")
        if kind == "conversation":
            require_assistant(data, "completion", where)
        return kind
    if "messages" in data.column_names:
        if column_kind(data, "messages", where)[0] != "conversation":
            fail("dataset_name", f"{where}: `messages` must hold lists of {{'role', 'content'}} messages, not strings")
        require_assistant(data, "messages", where)
        return "messages"
    if "text" in data.column_names:
        if column_kind(data, "text", where)[0] != "text":
            fail("dataset_name", f"{where}: `text` must hold strings (conversations go in a `messages` column)")
        return "language modeling"
    fail(
        "dataset_name",
        f"{where} has columns {data.column_names}; SFT needs `prompt` and `completion` (strings or "
        "lists of messages), `messages` (conversations) or `text` (language modelling on every token)",
    )


def tokenize_row(tokenizer, row: dict, kind: str) -> dict:
    """One example of any sft_format: input ids and labels with everything but the completion masked (a `text` row:
    nothing masked; EOS appended, as to a completion)."""
    if kind == "language modeling":
        ids = tokenizer(row["text"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        return {"input_ids": ids, "labels": list(ids)}
    if kind == "text":
        return tokenize_example(tokenizer, row["prompt"], row["completion"])
    if kind == "messages":
        return tokenize_conversation(tokenizer, row["messages"], 0)
    return tokenize_conversation(tokenizer, row["prompt"] + row["completion"], len(row["prompt"]))


def prompt_and_reference(tokenizer, row: dict, kind: str) -> tuple:
    """For the sample table: the prompt as text (a conversation up to its last assistant turn, with the assistant
    cue; a `text` row's first half of words) and the reference answer."""
    if kind == "language modeling":
        words, half = row["text"].split(" "), max(1, len(row["text"].split(" ")) // 2)
        return " ".join(words[:half]), " " + " ".join(words[half:])
    if kind == "text":
        return row["prompt"], row["completion"]
    messages = row["messages"] if kind == "messages" else row["prompt"] + row["completion"]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return (
        tokenizer.apply_chat_template(messages[:last], tokenize=False, add_generation_prompt=True),
        messages[last]["content"],
    )


def tokenize_example(tokenizer, prompt: str, completion: str) -> dict:
    """Prompt and completion tokenised separately (no chat template), EOS appended; labels mask the prompt."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return {"input_ids": prompt_ids + completion_ids, "labels": [-100] * len(prompt_ids) + completion_ids}


def collate(batch: list, pad_token_id: int) -> dict:
    """Right padding: padded positions get label -100 and attention 0."""
    width = max(len(b["input_ids"]) for b in batch)
    input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    for i, b in enumerate(batch):
        n = len(b["input_ids"])
        input_ids[i, :n], attention_mask[i, :n], labels[i, :n] = (
            torch.tensor(b["input_ids"]),
            1,
            torch.tensor(b["labels"]),
        )
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def completion_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy on positions whose label is not -100 (the completion tokens)."""
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100, reduction=reduction
    )


def step_groups(batches, size: int):
    """The batches in groups of `size`, one group per optimizer step; the last group of an epoch may be shorter."""
    group = []
    for batch in batches:
        group.append(batch)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


# ---------------------------------------------------------------------------------------------------------------
# Setup, evaluation, samples, saving and checkpointing, in the order the main block calls them


def tokenize_split(data, tokenizer, kind: str, max_length: int) -> tuple:
    """The rows of a split tokenised (tokenize_row), those longer than max_length dropped; returns (kept, dropped)."""
    rows = []
    for i, row in enumerate(data):
        try:
            rows.append(tokenize_row(tokenizer, row, kind))
        except ValueError as e:  # a chat template whose turns cannot be told apart
            fail(
                "tokenizer_name_or_path",
                f"row {i}: {e}; use a template that renders each turn after the previous ones unchanged",
            )
    kept = [r for r in rows if len(r["input_ids"]) <= max_length]
    return kept, len(rows) - len(kept)


def load_model(args: Args, config, tokenizer, resume_dir: Optional[str], accelerator):
    """The model to train (dropout off, embeddings resized for a new [PAD]: epochs.load_for_training), with a LoRA
    adapter under --use-peft. A resumed run takes the trained weights (with LoRA: the trained adapter) from the
    checkpoint."""
    from transformers import AutoModelForCausalLM

    model = epochs.load_for_training(AutoModelForCausalLM, args, config, tokenizer, resume_dir, accelerator)
    model = epochs.with_lora(model, args, resume_dir, "CAUSAL_LM")
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    return model


@torch.no_grad()
def evaluate(model, eval_loader, accelerator) -> float:
    """Mean completion-token loss over the held-out split (summed over tokens, gathered over processes). Per-example
    sums, so that gather_for_metrics drops the duplicates accelerate pads the last batch with: each example counts
    once."""
    model.eval()
    total, count = torch.zeros((), device=accelerator.device), torch.zeros((), device=accelerator.device)
    for batch in eval_loader:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        per_token = completion_loss(logits, batch["labels"], reduction="none").view(len(logits), -1)
        sums, counts = accelerator.gather_for_metrics((per_token.sum(1), (batch["labels"][:, 1:] != -100).sum(1)))
        total, count = total + sums.sum(), count + counts.sum()
    model.train()
    return (total / count).item()


def print_samples(args: Args, model, tokenizer, eval_data, kind: str, zero_stage: Optional[int], accelerator) -> None:
    """Greedy completions of held-out prompts, next to the dataset's reference. Every process generates (under ZeRO-3
    each forward is collective, and synced_gpus keeps them stepping together); the main one prints them."""
    rows = eval_data.select(range(min(args.num_sample_completions, len(eval_data))))
    samples = [prompt_and_reference(tokenizer, row, kind) for row in rows]
    prompts, references = [p for p, _ in samples], [r for _, r in samples]
    enc = tokenizer(prompts, padding=True, padding_side="left", return_tensors="pt", add_special_tokens=False)
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.eval()
    with torch.no_grad():
        out = unwrapped.generate(
            **enc.to(accelerator.device),
            max_new_tokens=args.sample_max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            synced_gpus=zero_stage == 3,
        )
    responses = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    if not accelerator.is_main_process:
        return
    rows = list(zip(prompts, responses, references))
    show_samples("sample completions", ["query", "model response", "reference"], rows, args.track, {"query": 300})


def write_output(path: str, state_dict: dict, args: Args, model, tokenizer, metrics_log: list, deepspeed) -> None:
    """The output folder's files: the model (with LoRA: the adapter, and under --merge-adapter-on-save the merged
    model in merged/), the tokenizer, metrics.jsonl, args.json and the model card. `deepspeed`: the transformers
    DeepSpeed config to restore after the merge, or None."""
    model.save_pretrained(path, state_dict=state_dict, safe_serialization=True)  # with LoRA: the adapter
    tokenizer.save_pretrained(path)
    if args.merge_adapter_on_save:
        # A fresh copy of the base on this process only: transformers must not load it with ZeRO-3's zero.Init (a
        # collective), so its DeepSpeed config is unset meanwhile.
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        from transformers.integrations import set_hf_deepspeed_config, unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
        base = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, trust_remote_code=args.trust_remote_code)
        if deepspeed is not None:
            set_hf_deepspeed_config(deepspeed)
        PeftModel.from_pretrained(base, path).merge_and_unload().save_pretrained(os.path.join(path, "merged"))
        tokenizer.save_pretrained(os.path.join(path, "merged"))
    if args.merge_adapter_on_save:
        what = " (a LoRA adapter; `merged/` holds it merged into the base)"
    else:
        what = " (a LoRA adapter)" if args.use_peft else ""
    body = (
        f"Supervised fine-tuning of `{args.model_name_or_path}` on `{args.dataset_name}` with `sft.py`{what}.\n\n"
        f"## Command\n\n```\npython {' '.join(sys.argv)}\n```\n\n"
        "Every logged row is in `metrics.jsonl`, the arguments in `args.json`.\n"
    )
    title = os.path.basename(os.path.abspath(args.output_dir))
    tags = ["sft", "rlhf"] + (["lora"] if args.use_peft else [])
    usage = dict(
        location=args.hub_model_id or args.output_dir, model_class="AutoModelForCausalLM", adapter=args.use_peft
    )
    write_run_files(
        path,
        args,
        metrics_log,
        model_card(title, args.model_name_or_path, [args.dataset_name], tags, body, usage),
    )


if __name__ == "__main__":
    args = parse_args(Args, description=__doc__.split("\n")[0])
    explain_remote_code_errors()
    check_args(args)
    resume_dir = claim_output_dir(args.output_dir, args.resume_from_checkpoint, args.overwrite_output_dir)
    # the epochs may grow only where the training so far stays the same (see budget_growth_problem)
    may_grow = ("num_train_epochs",)
    resume_state = check_resume(resume_dir, args, MAY_CHANGE_ON_RESUME, os.path.basename(__file__), may_grow)
    train_data, eval_data, kind, split_note = load_splits(
        args, lambda data, where: (sft_format(data, where), data, None)
    )
    # a `text` column needs no chat template, as prompt/completion strings
    template_kind = "text" if kind == "language modeling" else kind
    config, tokenizer, added_pad = load_tokenizer(args, template_kind, "`prompt`/`completion`")
    epochs.check_lora_rows(args, config, tokenizer)
    stop_on_signals()  # from here on, Ctrl-C or SIGTERM stops after the current step with a checkpoint

    # TRY NOT TO MODIFY: processes, seeding, tracking
    # The training loop ends each optimizer step itself (step_groups), including the shorter last one of an epoch.
    accelerator, zero_stage = epochs.start_run(args, resume_state, added_pad, sync_with_dataloader=False)

    # Data: tokenise, drop (and count) over-long examples.
    train_rows, dropped_train = tokenize_split(train_data, tokenizer, kind, args.max_length)
    eval_rows, dropped_eval = tokenize_split(eval_data, tokenizer, kind, args.max_length)
    summary = (
        f"{split_note}; {len(train_rows)} train / {len(eval_rows)} eval examples ({kind} format); "
        f"dropped as longer than --max-length {args.max_length}: {dropped_train} train, {dropped_eval} eval"
    )
    epochs.report_data(accelerator, summary, template_kind == "text", tokenizer, len(train_rows), args.max_length)
    train_loader, eval_loader, shuffle_generator = epochs.data_loaders(
        train_rows,
        eval_rows,
        args.per_device_train_batch_size,
        lambda b: collate(b, tokenizer.pad_token_id),
        args.seed,
        args.per_device_eval_batch_size,
    )

    # Model, optimizer and learning-rate schedule
    model = load_model(args, config, tokenizer, resume_dir, accelerator)
    optimizer, scheduler, num_update_steps = epochs.adamw_and_schedule(args, model, train_loader, accelerator)
    model, optimizer, train_loader, eval_loader = accelerator.prepare(model, optimizer, train_loader, eval_loader)
    training = (model, optimizer, scheduler, zero_stage)
    metrics_log, step, first_epoch, skip_batches = epochs.resume_position(
        args, resume_dir, resume_state, shuffle_generator, accelerator, *training
    )
    eval_steps, start = args.eval_steps or args.logging_steps, time.time()

    # ALGO LOGIC: the training loop
    model.train()
    bar = progress_bar(num_update_steps, "step", accelerator.is_main_process, initial=step)
    log = bar.write if bar is not None else accelerator.print
    for epoch in range(first_epoch, math.ceil(args.num_train_epochs)):
        # The epoch's shuffle is drawn from this generator state: checkpoints keep it, so a resumed run draws the same
        # shuffle and skips the batches already trained on.
        shuffle_state = shuffle_generator.get_state()
        batches = accelerator.skip_first_batches(train_loader, skip_batches) if skip_batches else train_loader
        for group in step_groups(enumerate(batches, start=skip_batches), args.gradient_accumulation_steps):
            if step >= num_update_steps:  # the end of a fractional last epoch (--num-train-epochs 0.5)
                break
            # The loss of an optimizer step is the token sum of its micro-batches over the completion tokens of the
            # whole step, all processes together (not a mean of per-micro-batch means): how the data is split into
            # micro-batches and processes does not change it. accelerate (or DeepSpeed) divides each backward by
            # gradient_accumulation_steps and DDP averages over processes; loss_scale undoes both.
            step_tokens = accelerator.reduce(sum((b["labels"][:, 1:] != -100).sum() for _, b in group), "sum")
            loss_scale = args.gradient_accumulation_steps * accelerator.num_processes / step_tokens.clamp(min=1)
            accelerator.step = args.gradient_accumulation_steps - len(group)  # gradients sync on the group's last
            step_loss = torch.zeros((), device=accelerator.device)
            for batch_index, batch in group:
                with accelerator.accumulate(model):
                    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                    token_sum = completion_loss(logits, batch["labels"], reduction="sum")
                    if not torch.isfinite(token_sum):
                        sys.exit(f"error: non-finite loss at optimizer step {step + 1}; lower --learning-rate")
                    accelerator.backward(token_sum * loss_scale)
                    epochs.optimizer_step(args, accelerator, model, optimizer, scheduler, step)
                step_loss += token_sum.detach()
            step += 1
            if bar is not None:
                bar.update(1)
            if step % args.logging_steps == 0 or (args.logging_first_step and step == 1):
                loss = (accelerator.reduce(step_loss, "sum") / step_tokens).item()
                row = {"train/loss": loss, "lr": scheduler.get_last_lr()[0], "epoch": epoch, "step": step}
                epochs.log_row(row, metrics_log, args.track, accelerator)
                log(f"step {step}/{num_update_steps} loss {loss:.4f} lr {row['lr']:.2e}")
            if args.eval_strategy == "steps" and step % eval_steps == 0:
                row = {"eval/loss": evaluate(model, eval_loader, accelerator), "epoch": epoch, "step": step}
                epochs.log_row(row, metrics_log, args.track, accelerator)
                log(f"step {step}: eval loss {row['eval/loss']:.4f} ({time.time() - start:.0f}s)")
            position = dict(epoch=epoch, batches_done=batch_index + 1, shuffle=shuffle_state)
            epochs.checkpoint_or_stop(
                args, step, position, metrics_log, os.path.basename(__file__), accelerator, *training
            )
        skip_batches = 0
        if args.eval_strategy == "epoch":
            row = {"eval/loss": evaluate(model, eval_loader, accelerator), "epoch": epoch, "step": step}
            epochs.log_row(row, metrics_log, args.track, accelerator)
            log(f"epoch {epoch}: eval loss {row['eval/loss']:.4f} ({time.time() - start:.0f}s)")

    if bar is not None:
        bar.close()
    if args.num_sample_completions > 0:
        print_samples(args, model, tokenizer, eval_data, kind, zero_stage, accelerator)
    deepspeed = accelerator.state.deepspeed_plugin.dschf if zero_stage is not None else None
    unwrapped = accelerator.unwrap_model(model)
    write = functools.partial(
        write_output, args=args, model=unwrapped, tokenizer=tokenizer, metrics_log=metrics_log, deepspeed=deepspeed
    )
    save_output(args, accelerator, model, write, start)
    end_run(accelerator)
