"""Reward modelling on `prompt`/`chosen`/`rejected` pairs: the second stage of RLHF.

    python reward_modeling.py                       # the embedded tiny TL;DR task, offline, a few minutes on a CPU
    accelerate launch reward_modeling.py --model-name-or-path models/sft_tldr \
        --dataset-name trl-lib/tldr-preference --learning-rate 3e-6 --output-dir models/rm_tldr

A scalar head on the SFT model scores `prompt + completion + EOS` at its last non-pad token, trained with the
pairwise loss -log sigmoid(r_chosen - r_rejected). After training the scores are shifted so that the dataset's
reference completions score 0 on average (the N+ normalisation). The shift is stored in the weights where a final norm
with a bias feeds the head (GPT-NeoX, GPT-2, OPT), so a plain `AutoModelForSequenceClassification.from_pretrained`
gives normalised scores; otherwise (RMSNorm models) as `reward_shift` in the config, which the PPO scripts add.
Conversational pairs go through the tokenizer's chat template and are scored at the EOS that ends the last assistant
turn.

The data: columns `chosen`, `rejected` and optionally `prompt` (without it the prompt is inside both sides, TRL's
implicit prompt), all strings or all lists of {role, content} messages (which need a chat template). A test split with
`gold_chosen_is_better` is also scored against those gold labels.

Read top to bottom: the arguments and their checks, the algorithm's helpers (score, loss, normalising shift), data
formats, plumbing, the output folder and checkpoints, the setup functions, then the main block: setup calls and the
training loop.
"""

import contextlib
import functools
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Optional

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
    load_any_dataset,
    load_splits,
    load_tokenizer,
    require_assistant,
    tokenize_conversation,
)
from rlhf_utils.hub import model_card
from rlhf_utils.outputs import claim_output_dir, save_output, write_run_files
from rlhf_utils.runs import end_run, progress_bar, stop_on_signals

EMBEDDED_PAIRS = "embedded/preference_data"  # the embedded task, normalised on its SFT data (embedded/sft_data)


@dataclass
class Args(epochs.EpochArgs):  # seed, tracking, checkpoints, Hub, AdamW and its schedule, LoRA: rlhf_utils
    output_dir: str = "models/rm_tiny"
    """where the reward model and tokenizer are saved (written atomically at the end)"""

    # data and model
    model_name_or_path: str = "embedded/sft_model"
    """the SFT model the reward model starts from: a hub id or a local folder"""
    tokenizer_name_or_path: Optional[str] = None
    """the tokenizer (None: the model's); without a pad token distinct from EOS, a dedicated [PAD] is added"""
    dataset_name: str = EMBEDDED_PAIRS
    """`chosen`/`rejected` pairs (optional `prompt`): a hub id, save_to_disk folder or json/jsonl/parquet/csv/tsv"""
    dataset_train_split: str = "train"
    """the split to train on"""
    dataset_test_split: str = "test"
    """the held-out split for accuracy (without one, every 10th train row is held out, as the log says)"""
    max_length: int = 256
    """pairs whose prompt + completion is longer (in tokens) are dropped and counted"""
    normalize_reward: bool = True
    """shift the scores so that the reference completions score 0 on average (N+ normalisation)"""
    normalize_dataset_name: Optional[str] = None
    """`prompt`/`completion` reference pairs for the normalisation, in the format of the pairs (None: for the embedded
    task its SFT data, embedded/sft_data; for other data the preferred completions of its held-out pairs)"""
    normalize_split: str = "validation"
    """the split of --normalize-dataset-name"""
    normalize_num_examples: int = 256
    """how many reference completions are scored for the normalisation"""

    # optimisation (the rest of AdamW and its schedule: EpochArgs)
    learning_rate: float = 1e-3
    """peak learning rate (~3e-6 for Pythia-1B)"""
    num_train_epochs: int = 1
    """passes over the training split (the N+ recipe uses one)"""

    # LoRA (PEFT; rank, alpha, dropout and target modules: EpochArgs)
    use_peft: bool = False
    """train a LoRA adapter and the score head instead of every weight; the adapter is merged into the saved model"""


def check_args(args: Args) -> None:
    """Every check that needs no data and no model, before anything loads: a typo should cost a second. Fills in the
    embedded task's reference data (args.json then names the data the scores were normalised on)."""
    check_ranges(args, {**TRAINING_RANGES, "num_train_epochs": (">", 0), "max_length": (">", 0)})
    check_trl_flags(args)
    if args.normalize_reward and args.normalize_num_examples <= 0:
        fail(
            "normalize_num_examples",
            f"must be positive to normalise (the mean of no scores is nan), got {args.normalize_num_examples}; "
            "or pass --no-normalize-reward",
        )
    if args.normalize_dataset_name is None and args.dataset_name == EMBEDDED_PAIRS:
        args.normalize_dataset_name = "embedded/sft_data"
    epochs.check_model_and_hub(args, "train it with `python sft.py` or pass a path/hub id")


# ---------------------------------------------------------------------------------------------------------------
# The algorithm: the score at the last token, the pairwise loss, and the shift that normalises the scores


def pad_batch(sequences: list, pad_token_id: int, side: str = "right") -> tuple:
    """Pad token-id lists into (input_ids, attention_mask)."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        cols = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
        input_ids[i, cols], attention_mask[i, cols] = torch.tensor(s), 1
    return input_ids, attention_mask


def get_reward(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Scalar score at the last attended token, for left or right padding. Position ids count real tokens
    only, so a left-padded sequence gets the same score as the unpadded one. It goes through the model's own forward
    (which reads the last non-pad token: the same one, as pad only pads), so that a DDP or DeepSpeed wrapper sees the
    call: DDP syncs no gradient of a backward whose forward bypassed it."""
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
    return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits.squeeze(-1)


def pairwise_loss_and_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> tuple:
    """Bradley-Terry loss -log sigmoid(r_c - r_r) and the fraction of pairs ranked right (ties count wrong)."""
    return -F.logsigmoid(chosen - rejected).mean(), (chosen > rejected).float().mean()


def final_norm(model):
    """The final norm of the backbone, if it has a bias (GPT-NeoX: final_layer_norm, GPT-2: ln_f, OPT:
    decoder.final_layer_norm), else None (RMSNorm models: Llama, Qwen2, Mistral, Gemma, Phi-3)."""
    for name in ("final_layer_norm", "ln_f", "decoder.final_layer_norm", "norm"):
        try:
            norm = model.base_model.get_submodule(name)
        except AttributeError:  # absent, or None (OPT with post-layer norms has no final one)
            continue
        # Its output must be what the head reads: same width (OPT may project after it; ZeRO-3 shards keep ds_shape).
        width = (
            [tuple(getattr(p, "ds_shape", p.shape))[-1] for p in (norm.bias, model.score.weight)]
            if getattr(norm, "bias", None) is not None
            else None
        )
        if width and width[0] == width[1]:
            return norm
    return None


def shift_scores(model, delta: float) -> None:
    """Add `delta` to every score by moving the bias of the final norm that feeds the linear head along the
    head's weight: score = w . (norm(h) + b), so b += delta * w / |w|^2 shifts it exactly. The architecture
    stays stock, so plain `from_pretrained` reproduces the normalised scores."""
    w = model.score.weight.data[0].float()
    norm = final_norm(model)
    if norm is None or getattr(norm, "bias", None) is None:
        raise ValueError(
            "reward normalisation needs a final norm with a bias before the score head; "
            "pass --no-normalize-reward for this architecture"
        )
    norm.bias.data += (delta * w / w.dot(w)).to(norm.bias.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Data: the formats, splits and tokenisation of pairs (the same rules as the other scripts)


def preference_format(data, where: str) -> tuple:
    """Which of TRL's preference formats a split is, every row checked: `text` or `conversation`, with an explicit
    `prompt` column or the prompt inside `chosen`/`rejected` (implicit). Also returns the rows that teach nothing
    (a blank side, or chosen == rejected: loss log 2 whatever the model), to be dropped."""
    if not {"chosen", "rejected"} <= set(data.column_names):
        fail(
            "dataset_name",
            f"{where} lacks columns {sorted({'chosen', 'rejected'} - set(data.column_names))} (has "
            f"{data.column_names}); it needs `chosen`, `rejected` and optionally `prompt`",
        )
    kind, blank_chosen = column_kind(data, "chosen", where, allow_empty=True)
    rejected_kind, blank_rejected = column_kind(data, "rejected", where, allow_empty=True)
    if rejected_kind != kind or ("prompt" in data.column_names and column_kind(data, "prompt", where)[0] != kind):
        fail("dataset_name", f"{where}: `prompt`, `chosen` and `rejected` must all be strings or all conversations")
    if kind == "conversation":
        for column in ("chosen", "rejected"):  # implicit prompt: the conversation ends with the scored answer
            require_assistant(data, column, where, last="prompt" not in data.column_names)
    same = [i for i, (c, r) in enumerate(zip(data["chosen"], data["rejected"])) if c == r]
    return kind, "prompt" in data.column_names, sorted(set(blank_chosen) | set(blank_rejected) | set(same))


def encode_completion(tokenizer, prompt, completion) -> list:
    """The token ids the reward model scores at their last token: prompt + completion + EOS (no prompt: the
    completion holds it, TRL's implicit prompt). Conversations go through the chat template and end after the
    last assistant turn, with EOS, as a PPO response does (tokenize_conversation)."""
    if isinstance(completion, str):
        return tokenizer((prompt or "") + completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    messages = (prompt or []) + completion
    return tokenize_conversation(tokenizer, messages, len(prompt) if prompt else len(messages) - 1)["input_ids"]


# ---------------------------------------------------------------------------------------------------------------
# Setup, evaluation, normalisation and saving: what the main block calls, in the order it runs


def useful_pairs(data, where: str) -> tuple:
    """A split's format ((`text` or `conversation`, whether the prompt is explicit): preference_format) and its pairs
    without those that teach nothing, with the line that says how many were dropped (None: none)."""
    kind, has_prompt, useless = preference_format(data, where)
    if len(useless) * 2 > len(data):
        fail(
            "dataset_name",
            f"{len(useless)} of {len(data)} pairs of {where} have an empty side or chosen == "
            f"rejected (e.g. row {useless[0]}); most of the data teaches nothing: fix it",
        )
    if not useless:
        return (kind, has_prompt), data, None
    note = f"dropped {len(useless)} of {len(data)} pairs of {where} with an empty side or chosen == rejected (e.g. row {useless[0]})"
    return (kind, has_prompt), data.select(sorted(set(range(len(data))) - set(useless))), note


def load_references(args: Args, kind: str, test_data) -> tuple:
    """The (prompt, completion) pairs that the normalisation scores, in the format of the pairs, and what they are:
    --normalize-dataset-name's `prompt`/`completion` pairs, or by default the preferred completions of the held-out
    pairs (an implicit prompt is inside them: prompt None)."""
    if args.normalize_dataset_name is None:
        rows = test_data.select(range(min(args.normalize_num_examples, len(test_data))))
        prompts = rows["prompt"] if "prompt" in rows.column_names else [None] * len(rows)
        return list(
            zip(prompts, rows["chosen"])
        ), f"the preferred completions of the held-out pairs of {args.dataset_name!r}"
    try:
        normalize_splits = load_any_dataset(args.normalize_dataset_name)
        refs = normalize_splits[None] if None in normalize_splits else normalize_splits[args.normalize_split]
    except Exception as e:
        fail(
            "normalize_dataset_name",
            f"could not load split {args.normalize_split!r} of {args.normalize_dataset_name!r} (is it empty, or "
            f"missing that split?): {e}",
        )
    where = f"split {args.normalize_split!r} of {args.normalize_dataset_name!r}"
    if {"prompt", "completion"} - set(refs.column_names):
        fail("normalize_dataset_name", f"{where} has columns {refs.column_names}; it needs `prompt` and `completion`")
    if len(refs) == 0:
        fail("normalize_split", f"{where} is empty")
    refs = refs.select(range(min(args.normalize_num_examples, len(refs))))
    kinds = {column_kind(refs, c, where, argument="normalize_dataset_name")[0] for c in ("prompt", "completion")}
    if kinds != {kind}:
        fail("normalize_dataset_name", f"{where} must be in the format of --dataset-name ({kind}), in both columns")
    if kind == "conversation":
        require_assistant(refs, "completion", where, argument="normalize_dataset_name")
    return list(zip(refs["prompt"], refs["completion"])), where


def check_reward_config(args: Args, config) -> None:
    """The model to start from: a causal LM (the SFT model), or a classifier with one label."""
    classifier = any("ForSequenceClassification" in a for a in config.architectures or [])
    if getattr(config, "num_labels", 1) != 1 and classifier:
        fail(
            "model_name_or_path",
            f"{args.model_name_or_path!r} is a classifier with {config.num_labels} labels; "
            "a reward model has one (start from the SFT model instead)",
        )


def gathered(params: list, zero_stage: Optional[int]):
    """Under ZeRO-3 the models are loaded as shards: gather these parameters to change them (on the main process,
    then re-partitioned); otherwise a no-op."""
    if zero_stage != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0)


def encode_checked(tokenizer, prompt, completion) -> list:
    """encode_completion, stopping with a message if the chat template's turns cannot be told apart."""
    try:
        return encode_completion(tokenizer, prompt, completion)
    except ValueError as e:
        fail(
            "tokenizer_name_or_path",
            f"{e} (in {completion!r:.80}); use a template that renders each turn after the previous ones unchanged",
        )


def tokenize_pairs(data, tokenizer, max_length: int) -> tuple:
    """Token ids of both sides of each pair and its gold label (-1: none); returns them and how many pairs were
    dropped as longer than max_length."""
    has_gold = "gold_chosen_is_better" in data.column_names
    rows = []
    for row in data:
        chosen = encode_checked(tokenizer, row.get("prompt"), row["chosen"])
        rejected = encode_checked(tokenizer, row.get("prompt"), row["rejected"])
        if max(len(chosen), len(rejected)) <= max_length:
            gold = int(row["gold_chosen_is_better"]) if has_gold else -1
            rows.append({"chosen": chosen, "rejected": rejected, "gold": gold})
    return rows, len(data) - len(rows)


def collate_pairs(batch: list, pad_token_id: int) -> dict:
    """Chosen and rejected go through the model in one forward: first half chosen, second half rejected."""
    sequences = [b["chosen"] for b in batch] + [b["rejected"] for b in batch]
    input_ids, attention_mask = pad_batch(sequences, pad_token_id)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "gold": torch.tensor([b["gold"] for b in batch])}


def load_reward_model(args: Args, config, tokenizer, resume_dir: Optional[str], zero_stage, accelerator):
    """The SFT backbone (dropout off, embeddings resized for a new [PAD]: epochs.load_for_training) with a fresh
    one-output head, N(0, 1/sqrt(d_model + 1)) as in the N+ recipe; under --use-peft a LoRA adapter, the head trained
    whole next to it. A resumed run takes the trained weights (with LoRA: the adapter and head) from the checkpoint."""
    from transformers import AutoModelForSequenceClassification

    config.num_labels, config.id2label, config.label2id = 1, {0: "LABEL_0"}, {"LABEL_0": 0}
    config.pad_token_id = tokenizer.pad_token_id
    model = epochs.load_for_training(
        AutoModelForSequenceClassification, args, config, tokenizer, resume_dir, accelerator
    )
    if not resume_dir:
        with gathered([model.score.weight], zero_stage):
            torch.nn.init.normal_(model.score.weight, std=1 / math.sqrt(config.hidden_size + 1))
    model = epochs.with_lora(model, args, resume_dir, "SEQ_CLS", modules_to_save=["score"])
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model


@torch.no_grad()
def evaluate(model, eval_loader, accelerator) -> dict:
    """Held-out loss, accuracy against the dataset's labels, and against gold labels where they exist."""
    unwrapped = accelerator.unwrap_model(model)
    model.eval()
    names = ("loss", "correct", "pairs", "gold_correct", "gold_pairs")
    totals = torch.zeros(len(names), device=accelerator.device)
    for batch in eval_loader:
        chosen, rejected = get_reward(unwrapped, batch["input_ids"], batch["attention_mask"]).chunk(2)
        has_gold = batch["gold"] >= 0
        per_pair = {
            "loss": -F.logsigmoid(chosen - rejected),
            "correct": (chosen > rejected).float(),
            "pairs": torch.ones_like(chosen),
            "gold_correct": ((chosen > rejected) == (batch["gold"] == 1)).float() * has_gold,
            "gold_pairs": has_gold.float(),
        }
        # One gather per batch, of every pair: gather_for_metrics drops the duplicates that pad the last batch.
        totals += accelerator.gather_for_metrics(torch.stack([per_pair[k] for k in names], 1)).sum(0)
    model.train()
    stats = dict(zip(names, totals))
    out = {
        "eval/loss": (stats["loss"] / stats["pairs"]).item(),
        "eval/accuracy": (stats["correct"] / stats["pairs"]).item(),
    }
    if stats["gold_pairs"] > 0:
        out["eval/gold_accuracy"] = (stats["gold_correct"] / stats["gold_pairs"]).item()
    return out


@torch.no_grad()
def normalize_scores(model, sequences: list, batch_size: int, pad_token_id: int, accelerator, zero_stage) -> tuple:
    """N+ normalisation: score the reference completions and shift every score so that their mean is 0. Returns
    their mean before the shift and where the shift is stored."""
    unwrapped = accelerator.unwrap_model(model)
    # An equal share per process, the short one padded with weight-0 repeats: under ZeRO-3 forwards are collective.
    share = math.ceil(len(sequences) / accelerator.num_processes)
    mine = sequences[accelerator.process_index * share : (accelerator.process_index + 1) * share]
    weights = torch.tensor([1.0] * len(mine) + [0.0] * (share - len(mine)), device=accelerator.device)
    mine += sequences[:1] * (share - len(mine))
    total = torch.zeros(2, device=accelerator.device)
    model.eval()
    for i in range(0, len(mine), batch_size):
        input_ids, attention_mask = pad_batch(mine[i : i + batch_size], pad_token_id)
        rewards = get_reward(unwrapped, input_ids.to(accelerator.device), attention_mask.to(accelerator.device))
        w = weights[i : i + batch_size]
        total += torch.stack([(rewards * w).sum(), w.sum()])
    total = accelerator.reduce(total, "sum")
    mean_before = (total[0] / total[1]).item()
    # Where a final norm with a bias feeds the head, the shift goes into that bias, so a stock from_pretrained gives
    # normalised scores; checked on a few references, since a layer between the norm and the head (OPT's
    # project_out) would break it. Otherwise (RMSNorm models) it is stored as config.reward_shift, which the PPO
    # scripts add to every score.
    probe = [t.to(accelerator.device) for t in pad_batch(sequences[:4], pad_token_id)]
    before, norm = get_reward(unwrapped, *probe), final_norm(unwrapped)
    if norm is not None:
        with gathered([unwrapped.score.weight] + list(norm.parameters()), zero_stage):
            shift_scores(unwrapped, -mean_before)
        moved = get_reward(unwrapped, *probe) - before
        tolerance = 1e-2 * max(1.0, abs(mean_before))
        if not torch.allclose(moved, torch.full_like(moved, -mean_before), atol=tolerance):
            with gathered([unwrapped.score.weight] + list(norm.parameters()), zero_stage):
                shift_scores(unwrapped, mean_before)  # undone
            norm = None
    if norm is None:
        unwrapped.config.reward_shift = -mean_before
    return (
        mean_before,
        "the final norm's bias" if norm is not None else "config.reward_shift (applied by the PPO scripts)",
    )


def write_output(path: str, state_dict: dict, args: Args, model, tokenizer, metrics: list, normalized: str) -> None:
    """The saved folder: the model (its config keeps num_labels=1 and the pad id, so the HF forward reads the same
    token), the tokenizer, metrics.jsonl, args.json and a model card that says how the scores were normalised."""
    model.save_pretrained(path, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(path)
    datasets = [args.dataset_name] + ([args.normalize_dataset_name] if args.normalize_dataset_name else [])
    lora = f", with a LoRA adapter (rank {args.lora_r}) merged into the weights" if args.use_peft else ""
    body = (
        "A reward model (one score per sequence, read at its last token) trained with `reward_modeling.py` from "
        f"`{args.model_name_or_path}` on the preference pairs of `{args.dataset_name}`{lora}.\n\n"
        f"## Normalisation\n\n{normalized}\n\n"
        f"## Command\n\n```\npython {' '.join(sys.argv)}\n```\n\n"
        "Every logged row is in `metrics.jsonl`, the arguments in `args.json`.\n"
    )
    title = os.path.basename(os.path.abspath(args.output_dir))
    tags = ["reward-model", "rlhf"] + (["lora"] if args.use_peft else [])
    # The LoRA adapter is merged before saving: the output is a plain sequence classifier either way.
    usage = dict(location=args.hub_model_id or args.output_dir, model_class="AutoModelForSequenceClassification")
    write_run_files(path, args, metrics, model_card(title, args.model_name_or_path, datasets, tags, body, usage))


if __name__ == "__main__":
    args = parse_args(Args, description=__doc__.split("\n")[0])
    explain_remote_code_errors()
    check_args(args)  # everything cheap before loading a model
    resume_dir = claim_output_dir(args.output_dir, args.resume_from_checkpoint, args.overwrite_output_dir)
    # the epochs may grow only where the training so far stays the same (see budget_growth_problem)
    may_grow = ("num_train_epochs",)
    resume_state = check_resume(resume_dir, args, epochs.MAY_CHANGE_ON_RESUME, os.path.basename(__file__), may_grow)
    train_data, test_data, (kind, has_prompt), split_note = load_splits(args, useful_pairs)
    refs, refs_name = load_references(args, kind, test_data) if args.normalize_reward else ([], None)
    config, tokenizer, added_pad = load_tokenizer(args, kind, "`prompt`/`chosen`/`rejected`")
    check_reward_config(args, config)
    epochs.check_lora_rows(args, config, tokenizer)
    stop_on_signals()  # from here on, Ctrl-C or SIGTERM stops after the current step with a checkpoint

    # TRY NOT TO MODIFY: processes, seeding, tracking
    # An optimizer step every gradient_accumulation_steps batches, and at the end of each epoch.
    accelerator, zero_stage = epochs.start_run(args, resume_state, added_pad, sync_with_dataloader=True)
    if args.use_peft and zero_stage == 3:
        fail("use_peft", "the adapter is merged into the saved model, which ZeRO-3's shards cannot; use ZeRO-2")

    # Data: prompt + completion + EOS, so that the score is read at EOS, as in PPO where responses end with it.
    train_rows, dropped_train = tokenize_pairs(train_data, tokenizer, args.max_length)
    eval_rows, dropped_eval = tokenize_pairs(test_data, tokenizer, args.max_length)
    reference_ids = [encode_checked(tokenizer, prompt, completion) for prompt, completion in refs]
    accelerator.print(split_note)
    prompt_kind = "explicit" if has_prompt else "implicit"
    summary = (
        f"{len(train_rows)} train / {len(eval_rows)} eval pairs ({kind} format, {prompt_kind} prompt); dropped as "
        f"longer than --max-length {args.max_length}: {dropped_train} train, {dropped_eval} eval"
    )
    epochs.report_data(accelerator, summary, kind == "text", tokenizer, len(train_rows), args.max_length)
    batch_size, pad = args.per_device_train_batch_size, tokenizer.pad_token_id
    collate = functools.partial(collate_pairs, pad_token_id=pad)
    train_loader, eval_loader, shuffle_generator = epochs.data_loaders(
        train_rows, eval_rows, batch_size, collate, args.seed, args.per_device_eval_batch_size
    )

    # Model, optimizer and learning-rate schedule
    model = load_reward_model(args, config, tokenizer, resume_dir, zero_stage, accelerator)
    optimizer, scheduler, num_update_steps = epochs.adamw_and_schedule(args, model, train_loader, accelerator)
    model, optimizer, train_loader, eval_loader = accelerator.prepare(model, optimizer, train_loader, eval_loader)
    training = (model, optimizer, scheduler, zero_stage)
    metrics_log, step, first_epoch, skip_batches = epochs.resume_position(
        args, resume_dir, resume_state, shuffle_generator, accelerator, *training
    )
    start = time.time()

    # ALGO LOGIC: the training loop
    model.train()
    bar = progress_bar(num_update_steps, "step", accelerator.is_main_process, initial=step)
    log = bar.write if bar is not None else accelerator.print
    for epoch in range(first_epoch, args.num_train_epochs):
        # The epoch's shuffle is drawn from this generator state: checkpoints keep it, so a resumed run draws the same
        # shuffle and skips the batches already trained on.
        shuffle_state = shuffle_generator.get_state()
        batches = accelerator.skip_first_batches(train_loader, skip_batches) if skip_batches else train_loader
        for batch_index, batch in enumerate(batches, start=skip_batches):
            with accelerator.accumulate(model):
                chosen, rejected = get_reward(model, batch["input_ids"], batch["attention_mask"]).chunk(2)
                loss, accuracy = pairwise_loss_and_accuracy(chosen, rejected)
                if not torch.isfinite(loss):
                    sys.exit(f"error: non-finite loss {loss.item()} at optimizer step {step}; lower --learning-rate")
                accelerator.backward(loss)
                epochs.optimizer_step(args, accelerator, model, optimizer, scheduler, step)
            if not accelerator.sync_gradients:
                continue
            step += 1
            if bar is not None:
                bar.update(1)
            if step % args.logging_steps == 0 or (args.logging_first_step and step == 1):
                row = {
                    "train/loss": accelerator.reduce(loss.detach(), "mean").item(),
                    "train/accuracy": accelerator.reduce(accuracy, "mean").item(),
                    "lr": scheduler.get_last_lr()[0],
                    "epoch": epoch,
                    "step": step,
                }
                epochs.log_row(row, metrics_log, args.track, accelerator)
                log(
                    f"step {step}/{num_update_steps} loss {row['train/loss']:.4f} accuracy {row['train/accuracy']:.3f}"
                )
            position = dict(epoch=epoch, batches_done=batch_index + 1, shuffle=shuffle_state)
            epochs.checkpoint_or_stop(
                args, step, position, metrics_log, os.path.basename(__file__), accelerator, *training
            )
        skip_batches = 0
        row = {**evaluate(model, eval_loader, accelerator), "epoch": epoch, "step": step}
        epochs.log_row(row, metrics_log, args.track, accelerator)
        shown = " ".join(f"{k} {v:.4g}" for k, v in row.items() if k.startswith("eval/"))
        log(f"epoch {epoch}: {shown} ({time.time() - start:.0f}s)")

    if bar is not None:
        bar.close()
    if args.use_peft:  # one plain model for the PPO scripts: the adapter and the trained head merged in
        model = accelerator.unwrap_model(model).merge_and_unload()

    # N+ normalisation: the reference completions' mean score becomes 0.
    normalized = "The scores are not normalised (`--no-normalize-reward`)."
    if args.normalize_reward:
        sequences = [s for s in reference_ids if len(s) <= args.max_length]
        mean_before, where = normalize_scores(model, sequences, batch_size, pad, accelerator, zero_stage)
        normalized = (
            f"{len(sequences)} reference completions ({refs_name}) scored {mean_before:.4f} on average; every score "
            f"is shifted by {-mean_before:+.4f} (stored in {where}), so that they score 0 on average."
        )
        accelerator.print(f"reward normalisation: {normalized}")
        metrics_log.append({"normalization/reference_mean_before": mean_before, "step": step})

    unwrapped = accelerator.unwrap_model(model)
    write = functools.partial(
        write_output, args=args, model=unwrapped, tokenizer=tokenizer, metrics=metrics_log, normalized=normalized
    )
    save_output(args, accelerator, model, write, start)
    end_run(accelerator)
