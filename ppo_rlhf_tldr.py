"""PPO for RLHF on TL;DR summarisation: ppo_rlhf.py with the TL;DR data format and evaluation.

    python ppo_rlhf_tldr.py                     # the embedded tiny TL;DR task, offline, ~3 minutes on a laptop CPU
    accelerate launch --config_file benchmark/accelerate_configs/deepspeed_zero2.yaml ppo_rlhf_tldr.py \
        --dataset-name trl-lib/tldr --model-name-or-path EleutherAI/pythia-1b-deduped --learning-rate 3e-6 \
        --sft-model-path cleanrl/EleutherAI_pythia-1b-deduped__sft__tldr --output-dir models/minimal/ppo_tldr \
        --reward-model-path cleanrl/EleutherAI_pythia-1b-deduped__reward__tldr --total-episodes 1000000 \
        --per-device-train-batch-size 16 --gradient-accumulation-steps 4 --local-rollout-forward-batch-size 16

The N+ implementation details recipe, with TRL's PPOTrainer flags. One PPO update, in the main block at the end:
1. rollout: the policy samples a response to each prompt; the reward model (or --reward-funcs) scores it;
2. reward: minus kl_coef x the per-token KL to the frozen SFT reference, plus the score at the response's end;
3. advantages: GAE over the value model's values, whitened over the valid tokens;
4. PPO epochs: clipped policy and value losses over random mini-batches, one optimizer step per mini-batch.
Plumbing that no fork changes (output folder, checkpoints, Hub, datasets, model checks) lives in rlhf_utils/ (see
docs/rlhf_utils.md); the numbered "implementation details" in the README say where this departs from TRL.

What differs from ppo_rlhf.py: TL;DR's `prompt`/`completion` rows; a final evaluation whose generations a judge reads.
"""

import contextlib
import functools
import inspect
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn as nn

from rlhf_utils.checkpoints import check_resume, load_checkpoint, write_checkpoint
from rlhf_utils.cli import TRAINING_RANGES, check_paths, check_ranges, check_trl_flags, explain_remote_code_errors
from rlhf_utils.cli import fail, parse_args, TRLFlags, warmup_steps
from rlhf_utils.data import column_kind, left_pad, load_final_split, load_splits, prompt_token_ids, prompts_for_update
from rlhf_utils.data import right_pad_cat
from rlhf_utils.hub import check_push_to_hub, run_model_card
from rlhf_utils.models import add_pad_token, backbone_and_head, checked_configs, eos_token_ids, gathered_for_generation
from rlhf_utils.models import is_adapter_folder, load_model, load_options, logit_transform, model_config, num_params
from rlhf_utils.models import transform_logits
from rlhf_utils.outputs import claim_output_dir, prepare_output_dir, save_output, save_policy, split_state_dict
from rlhf_utils.outputs import write_jsonl, write_run_files
from rlhf_utils.processes import configure_deepspeed, make_accelerator, prepare_frozen, start_tracking
from rlhf_utils.rewards import call_reward_funcs, load_reward_funcs, weighted_sum
from rlhf_utils.runs import append_metrics, end_run, progress_bar, reduce_stats, show_samples, stop_if_not_finite
from rlhf_utils.runs import stop_on_signals, stop_requested, Timer
from rlhf_utils.speed import GROUP_OVERHEAD, forward_in_chunks, grouped_response_hidden, in_position_chunks
from rlhf_utils.speed import length_groups, round_up

INVALID_LOGPROB = 1.0  # written at padded positions; both policy and reference get it, so their KL there is 0


@dataclass
class Args(TRLFlags):
    """Fine-tune a causal language model with PPO against a reward model (RLHF)."""

    # common settings
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment (W&B run names start with it)"""
    seed: int = 42
    """seed of python, numpy and torch; each process samples with seed + rank * 100003"""
    track: bool = False
    """log to Weights and Biases"""
    wandb_project_name: str = "rlhf"
    """the W&B project"""
    wandb_entity: Optional[str] = None
    """the W&B entity (team); None: your default entity"""
    output_dir: str = "models/ppo_tiny"
    """where the policy, value model, tokenizer, metrics.jsonl and model card are written"""
    overwrite_output_dir: bool = False
    """replace an existing non-empty output_dir"""
    push_to_hub: bool = False
    """upload the trained policy and tokenizer to the Hugging Face hub"""
    hub_model_id: Optional[str] = None
    """the hub repository for --push-to-hub; None: the output_dir's name"""
    trust_remote_code: bool = False
    """allow models and tokenizers that run code from their repository"""
    logging_steps: int = 1
    """log the metrics every this many PPO updates"""
    save_steps: int = 0
    """write a resumable checkpoint every this many PPO updates (0: never)"""
    save_total_limit: Optional[int] = 2
    """keep only the newest this many checkpoints; None: keep all"""
    resume_from_checkpoint: Optional[str] = None
    """a checkpoint folder, or `latest` (the newest in output_dir/checkpoints), to continue exactly"""

    # data
    dataset_name: str = "embedded/prompts"
    """trl-lib/tldr or a local copy with `prompt` and `completion` string columns (chats: use ppo_rlhf.py)"""
    dataset_train_split: str = "train"
    """the split of prompts to train on"""
    dataset_test_split: str = "validation"
    """the split for evaluation and sample tables (if there is none: every 10th train row)"""
    dataset_final_eval_split: Optional[str] = "test"
    """the final evaluation's split, whose generations are saved for a judge; None: skip it"""
    max_prompt_length: int = 512
    """prompts longer than this many tokens are dropped (and counted in the log)"""
    eval_initial_policy: bool = True
    """also save the initial (SFT) policy's generations on the final evaluation split, for the judge"""
    dataset_num_proc: Optional[int] = None
    """processes for tokenising the dataset; None: this process"""

    # models
    model_name_or_path: str = "embedded/sft_model"
    """the tokenizer (as in TRL's example); without a pad token distinct from EOS, a dedicated [PAD] is added"""
    sft_model_path: str = "embedded/sft_model"
    """the SFT policy: the starting point of the policy and the frozen reference"""
    reward_model_path: Optional[str] = "embedded/reward_model"
    """the reward model (a one-label sequence classifier); None: rewards from --reward-funcs only"""
    reward_funcs: Optional[list[str]] = None
    """reward functions, each `path/to/file.py:function` or `package.module:function`: f(prompts, completions,
    **columns) -> one float per completion (README: Rewards as code)"""
    reward_weights: Optional[list[float]] = None
    """one weight per reward source, the reward model first (if any), then each function; None: all 1.0"""
    value_model_path: Optional[str] = None
    """the value model's initialisation; None: reward_model_path, else the SFT model with a new one-output head"""

    # batch sizes (see the batch arithmetic below)
    total_episodes: int = 3072
    """total number of prompts rolled out over the run, all processes together"""
    per_device_train_batch_size: int = 16
    """micro-batch size of one forward/backward on each process"""
    gradient_accumulation_steps: int = 4
    """micro-batches per process per update; rollouts per process per update = the product of these two"""
    num_mini_batches: int = 1
    """optimizer steps per PPO epoch"""
    num_ppo_epochs: int = 4
    """passes over the rollout batch per update"""
    local_rollout_forward_batch_size: int = 64
    """chunk size of generation and of the no-grad rollout forwards"""

    # optimisation
    learning_rate: float = 3e-5
    """learning rate (the Pythia-1B recipe's is 3e-6; a ~0.5M-parameter model needs more)"""
    lr_scheduler_type: Literal["linear", "cosine", "constant"] = "linear"
    """schedule over the PPO updates, stepped once per update"""
    warmup_ratio: float = 0.0
    """fraction of the updates spent warming the learning rate up"""
    max_grad_norm: Optional[float] = 1.0
    """gradient clipping norm of each optimizer step; None: no clipping (the norm is still logged)"""
    adam_epsilon: float = 1e-5
    """AdamW's epsilon"""
    adam_beta1: float = 0.9
    """AdamW's beta1"""
    adam_beta2: float = 0.999
    """AdamW's beta2"""
    weight_decay: float = 0.0
    """AdamW's decoupled weight decay"""
    bf16: bool = False
    """bf16 autocast for every forward (faster matmuls on GPUs and on CPUs with avx512_bf16)"""
    gradient_checkpointing: bool = False
    """recompute policy and value activations in the backward pass to save memory"""
    length_grouping: bool = True
    """forward rows in groups of similar length, each trimmed of its padding (same result)"""
    pad_to_multiple_of: Optional[int] = None
    """round each forward's width up to a multiple of this (same result); None: 64 under --bf16 on a CPU, else 1"""
    chunked_logprobs: bool = True
    """LM head log-probs a chunk of positions at a time, never whole [batch, response, vocab] logits (same result)"""

    # generation
    response_length: int = 53
    """maximum new tokens per response"""
    stop_token: Optional[Literal["eos"]] = "eos"
    """truncate responses after EOS and stop generating once every row has it; None (TRL's default): the SFT model's
    generation-config EOS ids, where TRL's generate() stopped"""
    stop_token_id: Optional[int] = None
    """truncate after this token id instead (needs --stop-token None)"""
    temperature: float = 0.7
    """sampling temperature of the rollouts"""
    missing_eos_penalty: Optional[float] = 1.0
    """subtracted from the score of responses without the stop token (the EOS trick); None: no penalty"""

    # PPO
    kl_coef: float = 0.05
    """weight of the per-token KL penalty against the reference policy"""
    kl_estimator: Literal["k1", "k3"] = "k1"
    """k1: logp - logp_ref (unbiased, can be negative); k3: exp(-x) - 1 + x (non-negative, lower variance)"""
    whiten_rewards: bool = False
    """scale the per-token rewards to unit variance before GAE"""
    cliprange: float = 0.2
    """policy ratio clip range"""
    vf_coef: float = 0.1
    """value loss weight"""
    cliprange_value: float = 0.2
    """value clip range around the rollout values"""
    gamma: float = 1.0
    """discount factor"""
    lam: float = 0.95
    """GAE lambda"""

    # evaluation
    num_sample_generations: int = 10
    """sample tables (query, model response, score) printed over the run; 0 for none"""
    eval_strategy: Literal["no", "steps"] = "steps"
    """evaluate on the test split every eval_steps updates and at the end"""
    eval_steps: int = 16
    """updates between evaluations"""
    eval_temperature: float = 0.01
    """near-greedy decoding for evaluation and sample tables"""
    num_eval_prompts: Optional[int] = None
    """evaluate on the first this many test prompts; None: all"""

    # processes and DeepSpeed (the launch commands are in docs/scale_out.md)
    ds3_gather_for_generation: bool = True
    """under ZeRO-3, gather the policy's weights for generation (fast; the policy must fit on one device)"""

    # LoRA (PEFT)
    use_peft: bool = False
    """train a LoRA adapter instead of the policy's weights; the reference is the policy with its adapter off"""
    lora_r: int = 16
    """LoRA rank"""
    lora_alpha: int = 32
    """LoRA scaling numerator (the update is scaled by lora_alpha / lora_r)"""
    lora_dropout: float = 0.0
    """dropout on the adapter's input (TRL: 0.05; any dropout makes rollout and training log-probs differ)"""
    lora_target_modules: Optional[list[str]] = None
    """modules that get an adapter (`all-linear`: every linear layer but the LM head); None: PEFT's choice"""
    model_adapter_name: Optional[str] = None
    """name of the trained adapter, for models that carry several; None: `default`"""
    ref_adapter_name: Optional[str] = None
    """with a LoRA adapter as --sft-model-path: a frozen copy of it under this name is the reference"""
    merge_adapter_on_save: bool = False
    """also save the policy with the adapter merged into its weights, in output_dir/merged"""

    # TRL's flags whose meaning is this script's (the rest: rlhf_utils.cli.TRLFlags)
    num_train_epochs: Optional[float] = None
    """TRL: passes over the train prompts; given, total_episodes = int(epochs x train prompts) (TRL's rule)"""
    per_device_eval_batch_size: Optional[int] = None
    """TRL: prompts per evaluation generation batch on each process; None: local_rollout_forward_batch_size"""
    optim: str = "adamw_torch_fused"
    """TRL: the optimizer: adamw_torch or adamw_torch_fused (one kernel for all parameters; DeepSpeed keeps its own)"""


@dataclass
class Batches:
    """The batch arithmetic of the N+ recipe, derived once from the arguments and the number of processes."""

    world_size: int
    local_batch_size: int  # rollouts per process per update
    batch_size: int  # episodes per update, all processes together
    local_mini_batch_size: int
    micro_per_mini: int  # backward passes per optimizer step
    num_total_batches: int  # PPO updates


# The range of every numeric argument (check_ranges): each must hold before anything loads.
RANGES = {
    **TRAINING_RANGES,
    **dict.fromkeys(
        "num_mini_batches num_ppo_epochs local_rollout_forward_batch_size response_length logging_steps eval_steps "
        "pad_to_multiple_of temperature eval_temperature cliprange cliprange_value".split(),
        (">", 0),
    ),
    "kl_coef": (">=", 0, "a negative weight rewards what it should penalise"),
    "vf_coef": (">=", 0, "a negative weight rewards what it should penalise"),
    "gamma": ("[]", 0, 1),
    "lam": ("[]", 0, 1),
    "missing_eos_penalty": (">=", 0, "it is subtracted from the score"),
}


def check_args(args: Args, train_prompts: Optional[int] = None) -> Batches:
    """Every check that needs no model, before any loads (a typo should cost a second, not a model load); returns
    the batch arithmetic. WORLD_SIZE is set by every launcher before the script runs. With --num-train-epochs it runs
    again once the train prompts are counted (train_prompts), which sets total_episodes by TRL's rule."""
    check_ranges(args, RANGES)
    check_trl_flags(args)
    if args.num_train_epochs is not None and train_prompts is None and args.total_episodes != Args.total_episodes:
        fail(
            "num_train_epochs",
            "and --total-episodes both set the budget (TRL takes --total-episodes when both are given); drop one",
        )
    if args.num_train_epochs is not None and train_prompts is not None:
        args.total_episodes = int(args.num_train_epochs * train_prompts)  # TRL's rule
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_batch_size = args.per_device_train_batch_size * args.gradient_accumulation_steps
    batch_size = local_batch_size * world_size
    local_mini_batch_size = local_batch_size // max(args.num_mini_batches, 1)
    b = Batches(
        world_size=world_size,
        local_batch_size=local_batch_size,
        batch_size=batch_size,
        local_mini_batch_size=local_mini_batch_size,
        micro_per_mini=local_mini_batch_size // args.per_device_train_batch_size,
        num_total_batches=math.ceil(args.total_episodes / batch_size),
    )
    if args.stop_token is not None and args.stop_token_id is not None:
        fail(
            "stop_token_id",
            f"both --stop-token {args.stop_token} and --stop-token-id {args.stop_token_id} are set; "
            "pass --stop-token None to stop on the id, or drop --stop-token-id",
        )
    if local_batch_size % args.num_mini_batches != 0:
        fail(
            "num_mini_batches",
            f"the per-process batch of {local_batch_size} rollouts (per_device_train_batch_size "
            f"{args.per_device_train_batch_size} x gradient_accumulation_steps "
            f"{args.gradient_accumulation_steps}) does not split into {args.num_mini_batches} "
            "mini-batches",
        )
    if local_mini_batch_size % args.per_device_train_batch_size != 0:
        fail(
            "num_mini_batches",
            f"a mini-batch of {local_mini_batch_size} rollouts does not split into micro-batches "
            f"of {args.per_device_train_batch_size}; make gradient_accumulation_steps "
            f"({args.gradient_accumulation_steps}) a multiple of num_mini_batches",
        )
    if args.total_episodes < batch_size:
        fail(
            "total_episodes" if args.num_train_epochs is None else "num_train_epochs",
            f"{args.total_episodes} is less than one update's batch of {batch_size} episodes "
            f"({local_batch_size} per process x {world_size} processes)",
        )
    if args.whiten_rewards and local_mini_batch_size < 8:
        fail("whiten_rewards", f"needs at least 8 rollouts per mini-batch per process, got {local_mini_batch_size}")
    sources = (args.reward_model_path is not None) + len(args.reward_funcs or [])
    if sources == 0:
        fail("reward_model_path", "is None and no --reward-funcs are given: nothing would score the responses")
    if args.reward_weights is not None and len(args.reward_weights) != sources:
        fail(
            "reward_weights",
            f"{len(args.reward_weights)} weights for {sources} reward sources (the reward model first, if any, then "
            "each of --reward-funcs)",
        )
    if args.reward_weights is not None and not all(map(math.isfinite, args.reward_weights)):
        fail("reward_weights", f"must be finite, got {args.reward_weights}")
    models = ("model_name_or_path", "sft_model_path", "reward_model_path", "value_model_path")
    check_paths(
        {arg: getattr(args, arg) for arg in models},
        "pass a local folder or a hub id (the embedded task's models are made by `python tiny_tldr.py --with-models`)",
    )
    sft_is_adapter = is_adapter_folder(args.sft_model_path)
    model_adapter_name = args.model_adapter_name or "default"
    lora_settings = args.model_adapter_name or args.ref_adapter_name or args.merge_adapter_on_save or sft_is_adapter
    if not args.use_peft and lora_settings:
        fail(
            "use_peft",
            "--model-adapter-name, --ref-adapter-name, --merge-adapter-on-save and an adapter folder as "
            "--sft-model-path are LoRA settings; add --use-peft",
        )
    if sft_is_adapter and not args.ref_adapter_name:
        fail(
            "ref_adapter_name",
            f"{args.sft_model_path!r} is a LoRA adapter: the reference must be that adapter, not "
            "the base model; pass --ref-adapter-name reference (any name but the trained one's)",
        )
    if args.ref_adapter_name and not sft_is_adapter:
        fail(
            "ref_adapter_name",
            f"{args.sft_model_path!r} is not a LoRA adapter folder (no adapter_config.json): the "
            "reference is the policy with its adapter disabled; drop --ref-adapter-name",
        )
    if args.ref_adapter_name and args.ref_adapter_name == model_adapter_name:
        fail("ref_adapter_name", f"is the trained adapter's name {model_adapter_name!r}; pick another")
    if args.push_to_hub and train_prompts is None:  # asks the Hub: last, after every local check
        check_push_to_hub(args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir)))
    return b


# Resuming continues the checkpoint's run: only where and how often things are written, tracking and memory savers
# may differ from the arguments it was written with; anything else would silently train another model (evaluation
# settings too: evaluation draws from the sampling generator).
MAY_CHANGE_ON_RESUME = set(
    "exp_name track wandb_project_name wandb_entity output_dir overwrite_output_dir push_to_hub hub_model_id "
    "trust_remote_code logging_steps save_steps save_total_limit resume_from_checkpoint gradient_checkpointing "
    "dataset_num_proc merge_adapter_on_save report_to run_name logging_first_step save_strategy "
    "num_train_epochs".split()  # what num_train_epochs sets, total_episodes, is checked: the budget may grow
)


# ---------------------------------------------------------------------------------------------------------------
# Helpers: small, pure, and each compared with a plain computation in tests/test_ppo_helpers.py


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum()


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        variance = variance * n / (n - 1)
    return variance


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Normalise to unit variance over the masked entries (and zero mean unless shift_mean=False)."""
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    return whitened if shift_mean else whitened + mean


def first_true_indices(bools: torch.Tensor) -> torch.Tensor:
    """Index of the first True in each row, or the row length if there is none."""
    width = bools.shape[-1]
    positions = torch.where(bools, torch.arange(width, device=bools.device), width)
    return positions.min(-1).values


def is_stop(tokens: torch.Tensor, stop_token_id) -> torch.Tensor:
    """Where tokens are the stop token (an id, or a list of ids: some models end a turn with any of several)."""
    return torch.isin(tokens, torch.as_tensor(stop_token_id, device=tokens.device))


def truncate_after_stop(responses: torch.Tensor, stop_token_id, pad_token_id: int) -> tuple:
    """Keep each response up to and including its first stop token (an id or a list of ids); pad the rest.
    Returns (postprocessed responses, sequence_lengths = index of the last real token)."""
    width = responses.shape[1]
    if stop_token_id is None:
        return responses, torch.full((len(responses),), width - 1, device=responses.device)
    stop = first_true_indices(is_stop(responses, stop_token_id))
    after = torch.arange(width, device=responses.device) > stop[:, None]
    return responses.masked_fill(after, pad_token_id), stop.clamp(max=width - 1)


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token KL estimate of the sampled tokens (k1 or k3 of Schulman's 'Approximating KL divergence')."""
    logr = ref_logprobs - logprobs
    return -logr if estimator == "k1" else torch.expm1(logr) - logr


def place_scores(non_score_reward: torch.Tensor, scores: torch.Tensor, sequence_lengths: torch.Tensor) -> torch.Tensor:
    """Add each sequence's score at sequence_length + 1 (just after the last token) when that position exists,
    else at the last position, as the N+ recipe does."""
    rewards = non_score_reward.clone()
    width = rewards.shape[1]
    end = torch.where(sequence_lengths + 1 < width, sequence_lengths + 1, sequence_lengths)
    rewards[torch.arange(len(rewards), device=rewards.device), end] += scores
    return rewards


def gae_advantages(rewards: torch.Tensor, values: torch.Tensor, gamma: float, lam: float) -> torch.Tensor:
    """Generalised advantage estimation, A_t = sum_k (gamma*lam)^k delta_{t+k}, as one matrix product instead of
    a Python loop over tokens. The value after the last position is 0."""
    width = rewards.shape[1]
    next_values = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], dim=1)
    deltas = rewards + gamma * next_values - values
    k = torch.arange(width, device=rewards.device, dtype=torch.float64)
    exponent = k[:, None] - k[None, :]  # [source step k, target step t]: weight (gamma*lam)^(k-t) for k >= t
    discount = torch.where(exponent >= 0, (gamma * lam) ** exponent.clamp(min=0), 0.0)
    return (deltas.double() @ discount).to(rewards.dtype)


def token_mean_divisors(valid_pg: torch.Tensor, valid_vf: torch.Tensor, micro_per_mini: int, world_size: int) -> tuple:
    """What each micro-batch divides its policy and value token sums by, so that the gradient is the token mean over
    the whole global mini-batch: accelerate (or DeepSpeed) divides each micro-batch loss by micro_per_mini and DDP
    (or ZeRO) averages the processes' gradients, so the valid tokens of the mini-batch on every process, summed in one
    all-reduce, are divided by both. Neither the micro-batch split nor the number of processes changes the gradient
    (TRL averaged per-micro-batch means; dividing by this process's own count would weigh a token of a process with
    short responses more)."""
    counts = torch.stack([valid_pg.sum(), valid_vf.sum()])
    if world_size > 1:
        torch.distributed.all_reduce(counts)
    return tuple(counts.clamp(min=1) / (micro_per_mini * world_size))


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    probs = logits.softmax(-1)
    return torch.logsumexp(logits, -1) - (probs * logits).sum(-1)


def sequence_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return torch.gather(logits.log_softmax(-1), 2, tokens[..., None]).squeeze(-1)


# ---------------------------------------------------------------------------------------------------------------
# The policy and the value model: log-probs, entropy and values of the response tokens. The plain computation is one
# forward of the padded batch, hidden = last_hidden_state[:, context_length - 1 : -1] (the positions that predict the
# response tokens), logits = head(hidden) / temperature, values = score(hidden). rlhf_utils.speed gets the same numbers
# with less work; `--no-length-grouping --no-chunked-logprobs` switches it off.


def head_logprobs(
    head: nn.Module, hidden: torch.Tensor, tokens: torch.Tensor, temperature: float, scale: float, softcap
) -> tuple:
    """(log-probs of tokens, entropy) under logits = transform_logits(head(hidden), scale, softcap) / temperature, the
    model's own logits (Gemma's softcap, Granite's scaling, ...: see logit_transform) at the sampling temperature; the
    entropy is a statistic, without gradient."""
    logits = transform_logits(head(hidden).float(), scale, softcap) / (temperature + 1e-7)
    with torch.no_grad():
        entropy = entropy_from_logits(logits)
    return sequence_logprobs(logits, tokens), entropy


def response_logprobs(
    head: nn.Module,
    hidden: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float,
    chunked: bool = True,
    scale: float = 1.0,
    softcap: Optional[float] = None,
) -> tuple:
    """head_logprobs; chunked: the same numbers over chunks of positions, so that the [batch, response, vocab] logits
    and their gradient never exist whole."""
    if chunked:
        return in_position_chunks(head_logprobs, head, hidden, tokens, temperature, scale, softcap)
    return head_logprobs(head, hidden, tokens, temperature, scale, softcap)


def policy_logprobs(
    policy: nn.Module,
    query_responses: torch.Tensor,
    attention_mask: torch.Tensor,
    context_length: int,
    temperature: float,
    needed: torch.Tensor,
    overhead: Optional[int],
    chunked: bool,
    multiple: int = 1,
) -> tuple:
    """(log-probs, entropy) of the response tokens, [batch, max(needed)], from the final hidden states at the positions
    that predict them (overhead None: one forward of the batch; else in length groups). The LM head runs on response
    positions only: a 512-token prompt costs no vocabulary-sized logits."""
    backbone, head = backbone_and_head(policy)
    hidden = grouped_response_hidden(
        backbone, query_responses, attention_mask, context_length, needed, overhead, multiple
    )
    tokens = query_responses[:, context_length : context_length + hidden.shape[1]]
    return response_logprobs(head, hidden, tokens, temperature, chunked, *logit_transform(model_config(policy)))


class PolicyAndValue(nn.Module):
    """The two trained models behind one forward, so that accelerate/DeepSpeed wrap (and DDP syncs) them together.
    Returns log-probs, entropy and values of the first needed[i] response positions of each row (default: all)."""

    def __init__(
        self,
        policy: nn.Module,
        value_model: nn.Module,
        overhead: Optional[int] = GROUP_OVERHEAD,
        chunked: bool = True,
        multiple: int = 1,
    ):
        super().__init__()
        self.policy, self.value_model, self.overhead, self.chunked = policy, value_model, overhead, chunked
        self.multiple = multiple

    def forward(self, query_responses, attention_mask, context_length: int, temperature: float, needed=None):
        if needed is None:
            needed = torch.full(
                (len(query_responses),), query_responses.shape[1] - context_length, device=query_responses.device
            )
        return (
            *self.policy_forward(query_responses, attention_mask, context_length, temperature, needed),
            self.value_forward(query_responses, attention_mask, context_length, needed),
        )

    def policy_forward(
        self, query_responses, attention_mask, context_length: int, temperature: float, needed, policy=None
    ):
        """(log-probs, entropy) under the trained policy, or with the same settings under another (the reference)."""
        inputs = (query_responses, attention_mask, context_length, temperature, needed)
        return policy_logprobs(
            self.policy if policy is None else policy, *inputs, self.overhead, self.chunked, self.multiple
        )

    def value_forward(self, query_responses, attention_mask, context_length: int, needed) -> torch.Tensor:
        inputs = (query_responses, attention_mask, context_length, needed, self.overhead, self.multiple)
        hidden = grouped_response_hidden(self.value_model.base_model, *inputs)
        return self.value_model.score(hidden).squeeze(-1).float()


# ---------------------------------------------------------------------------------------------------------------
# Generation and scoring


def sample_tokens(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One token per row of probs, [batch, 1], by inverse CDF: a uniform draw per row located in the cumulative sum.
    The same distribution as torch.multinomial, which on CPU draws an exponential variate per vocabulary entry;
    tokens of probability 0 are never drawn (right=True)."""
    cdf = probs.cumsum(-1)
    u = torch.rand(len(probs), 1, generator=generator, device=probs.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp(max=probs.shape[-1] - 1)


@torch.no_grad()
def generate(
    policy: nn.Module,
    queries: torch.Tensor,
    query_mask: torch.Tensor,
    response_length: int,
    temperature: float,
    stop_token_id,
    generator: torch.Generator,
    sync_processes: bool = False,
) -> torch.Tensor:
    """Sample up to response_length tokens (top_k 0, top_p 1) with a KV cache, computing the LM head on the last
    position only, and stop as soon as every row has produced the stop token. With sync_processes (sharded ZeRO-3
    weights: each forward is collective), stop only when every row of every process has."""
    backbone, head = backbone_and_head(policy)
    scale, softcap = logit_transform(model_config(policy))
    # transformers 5.2x names the KV cache `cache` (and warns on past_key_values); earlier 5.x, past_key_values.
    cache = "cache" if "cache" in inspect.signature(backbone.forward).parameters else "past_key_values"
    attention_mask = query_mask.long()
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
    out = backbone(input_ids=queries, attention_mask=attention_mask, position_ids=position_ids, use_cache=True)
    next_position = position_ids[:, -1:] + 1
    tokens, done = [], torch.zeros(len(queries), dtype=torch.bool, device=queries.device)
    if stop_token_id is not None:  # one tensor for every step's comparison
        stop_token_id = torch.as_tensor(stop_token_id, device=queries.device)
    for step in range(response_length):
        logits = transform_logits(head(out.last_hidden_state[:, -1]).float(), scale, softcap)
        probs = (logits / (temperature + 1e-7)).softmax(-1)
        token = sample_tokens(probs, generator)
        tokens.append(token)
        if stop_token_id is not None:
            done |= is_stop(token[:, 0], stop_token_id)
            all_done = done.all().float()
            if sync_processes:
                torch.distributed.all_reduce(all_done, op=torch.distributed.ReduceOp.MIN)
            if all_done:
                break
        if step + 1 < response_length:
            attention_mask = torch.cat([attention_mask, torch.ones_like(token)], dim=1)
            out = backbone(
                input_ids=token,
                attention_mask=attention_mask,
                position_ids=next_position,
                **{cache: out[cache]},
                use_cache=True,
            )
            next_position = next_position + 1
    return torch.cat(tokens, dim=1)


@torch.no_grad()
def get_score(
    reward_model: nn.Module,
    query_responses: torch.Tensor,
    attention_mask: torch.Tensor,
    overhead: Optional[int] = None,
    multiple: int = 1,
) -> torch.Tensor:
    """Reward-model score read at the last attended token (left-padded query, right-padded response), computed over
    length_groups, each group trimmed to its first real token (less, to a width that is a multiple of `multiple`)
    and its last attended one."""
    columns = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    start, end = first_true_indices(attention_mask.bool()), (columns * attention_mask).argmax(1) + 1
    scores = torch.empty(len(query_responses), device=query_responses.device)
    for rows in length_groups((end - start).tolist(), overhead):
        index = torch.tensor(rows, device=query_responses.device)
        a, b = int(start[index].min()), int(end[index].max())
        a = max(0, b - round_up(b - a, multiple))
        mask = attention_mask[index, a:b]
        position_ids = (mask.cumsum(1) - 1).clamp(min=0)
        hidden = reward_model.base_model(
            input_ids=query_responses[index, a:b], attention_mask=mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        scores[index] = (
            reward_model.score(hidden[torch.arange(len(rows), device=hidden.device), end[index] - 1 - a])
            .squeeze(-1)
            .float()
        )
    return scores


# ---------------------------------------------------------------------------------------------------------------
# Setup, models, evaluation and saving: what the main block calls around the PPO loop


def prompt_format(data, where: str) -> tuple:
    """A split's TL;DR rows, every row checked: `prompt` + reference `completion`, text prompts in the TL;DR format.
    Returns the format, the rows and no note."""
    missing = {"prompt", "completion"} - set(data.column_names)
    if missing:
        fail(
            "dataset_name",
            f"{where} lacks columns {sorted(missing)} (it has {data.column_names}); the TL;DR "
            "format is `prompt` + reference `completion`",
        )
    # Conversational prompts are refused here: the saved generations are for judges that read TL;DR text.
    if column_kind(data, "prompt", where)[0] == "conversation":
        fail(
            "dataset_name",
            f"{where} has conversational prompts; this TL;DR variant takes TL;DR text prompts: "
            "use ppo_rlhf.py for conversations",
        )
    # The TL;DR prompt format: "SUBREDDIT: r/...\n\nTITLE: ...\n\nPOST: ...\n\nTL;DR:" (no trailing space).
    bad = [p for p in data["prompt"] if not (p.startswith("SUBREDDIT: r/") and p.endswith("\n\nTL;DR:"))]
    if bad:
        fail(
            "dataset_name",
            f"{len(bad)} of {len(data)} prompts in {where} are not in the TL;DR format "
            f"'SUBREDDIT: r/...\\n\\nTITLE: ...\\n\\nPOST: ...\\n\\nTL;DR:', e.g. {bad[0][-80:]!r}; "
            "use ppo_rlhf.py for other prompt formats",
        )
    return "text", data, None


def load_prompts(args: Args, local_batch_size: int) -> tuple:
    """The train and evaluation prompts, checked: (train rows, eval rows, "text" or "conversation", a note saying
    which rows are evaluated)."""
    train_data, eval_data, prompt_kind, split_note = load_splits(args, prompt_format)
    final_data, split = None, args.dataset_final_eval_split
    if split is not None:
        final_data, note = load_final_split(args.dataset_name, split, eval_data, prompt_format, args.dataset_config)
        split_note += note
    if len(train_data) < local_batch_size:
        fail(
            "dataset_train_split",
            f"{len(train_data)} prompts cannot fill one per-process batch of {local_batch_size} ({split_note})",
        )
    return train_data, eval_data, final_data, prompt_kind, split_note


def check_model_configs(args: Args, tokenizer, prompt_kind: str) -> tuple:
    """From the configs and saved tokenizers only, before any weights load (checked_configs): every model reads the
    policy tokenizer's ids, and prompt + response fits every model's context. Returns (the smallest context or None,
    the reward model's reward_shift)."""
    if prompt_kind == "conversation" and not tokenizer.chat_template:
        fail(
            "model_name_or_path",
            f"the tokenizer of {args.model_name_or_path!r} has no chat template, which "
            "conversational prompts need; use an instruct model's tokenizer, set "
            "tokenizer.chat_template and save it, or give the prompts as strings",
        )
    models = {
        "sft_model_path": (args.sft_model_path, False),
        "reward_model_path": (args.reward_model_path, True),  # None: rewards from --reward-funcs only
        "value_model_path": (args.value_model_path or args.reward_model_path or args.sft_model_path, True),
    }
    tokenizer_path, response_length = args.model_name_or_path, args.response_length
    configs, context = checked_configs(models, tokenizer, tokenizer_path, args.trust_remote_code, response_length)
    # reward_modeling.py's normalisation, for architectures without a norm bias
    return context, float(getattr(configs.get("reward_model_path"), "reward_shift", 0.0))


def tokenize_prompts(
    args: Args, tokenizer, train_data, eval_data, final_data, context: Optional[int], b: Batches, say
) -> tuple:
    """The train, evaluation and final evaluation rows, each a dict of its columns (for reward functions) and the
    prompt's token ids `input_ids` (left padding happens per batch), without the prompts longer than
    --max-prompt-length or the models' context, and the final split's reference completions."""

    def tokenize(batch):
        return {"input_ids": prompt_token_ids(tokenizer, batch["prompt"])}

    def tokenize_and_filter(data, split: str) -> list:
        """The rows whose prompts fit in max_prompt_length, the others counted in the log."""
        rows = data.map(tokenize, batched=True, num_proc=args.dataset_num_proc, keep_in_memory=True).to_list()
        if any(len(r["input_ids"]) and r["input_ids"][-1] == tokenizer.eos_token_id for r in rows):
            fail(
                "dataset_name",
                f"some prompts of split {split!r} end with the EOS token; the policy would see a "
                "finished text. Strip EOS from the prompts",
            )
        # Prompt + response must also fit the models' context (absolute positions would index past their table,
        # rotary ones extrapolate).
        limit = min(args.max_prompt_length, context - args.response_length) if context else args.max_prompt_length
        keep = [r for r in rows if 0 < len(r["input_ids"]) <= limit]
        reason = (
            f"--max-prompt-length {limit}"
            if limit == args.max_prompt_length
            else f"{limit} tokens (the models' context of {context} minus --response-length {args.response_length})"
        )
        say(f"split {split!r}: dropped {len(rows) - len(keep)} of {len(rows)} prompts longer than {reason}")
        if not keep:
            fail("max_prompt_length", f"every prompt of split {split!r} is longer than {limit} tokens")
        return keep

    train_rows = tokenize_and_filter(train_data, args.dataset_train_split)
    if len(train_rows) < b.local_batch_size:
        fail(
            "max_prompt_length",
            f"only {len(train_rows)} prompts fit, fewer than one per-process batch of {b.local_batch_size}",
        )
    eval_data = eval_data.select(range(min(args.num_eval_prompts or len(eval_data), len(eval_data))))
    eval_rows = tokenize_and_filter(eval_data, args.dataset_test_split)
    final_rows = tokenize_and_filter(final_data, args.dataset_final_eval_split) if final_data else []
    return train_rows, eval_rows, final_rows


def load_policy(args: Args, tokenizer, resume_dir: Optional[str]) -> tuple:
    """(policy, frozen reference or None, the base model's path). A resumed run takes the trained policy (or
    adapter) from the checkpoint. LoRA: the base weights are frozen and shared with the reference, which is the
    same model with the adapter disabled (or, for an SFT adapter, with that adapter loaded a second time, frozen):
    no reference copy."""
    from transformers import AutoModelForCausalLM

    trained_path = os.path.join(resume_dir, "policy") if resume_dir else args.sft_model_path
    if not args.use_peft:
        policy = load_model(AutoModelForCausalLM, trained_path, tokenizer, args.trust_remote_code, load_options(args))
        ref_policy = load_model(
            AutoModelForCausalLM, args.sft_model_path, tokenizer, args.trust_remote_code, load_options(args)
        )
        return policy, ref_policy.eval().requires_grad_(False), args.sft_model_path
    from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model

    sft_is_adapter = is_adapter_folder(args.sft_model_path)
    adapter_name = args.model_adapter_name or "default"
    base_path = args.sft_model_path
    if sft_is_adapter:
        base_path = PeftConfig.from_pretrained(args.sft_model_path).base_model_name_or_path
    policy = load_model(AutoModelForCausalLM, base_path, tokenizer, args.trust_remote_code, load_options(args))
    if resume_dir or sft_is_adapter:
        policy = PeftModel.from_pretrained(policy, trained_path, adapter_name=adapter_name, is_trainable=True)
    else:
        lora = LoraConfig(
            task_type="CAUSAL_LM",
            r=args.lora_r,
            lora_alpha=args.lora_alpha,
            lora_dropout=args.lora_dropout,
            # `all-linear` is PEFT's keyword only as a string; tyro parses the flag into a list
            target_modules="all-linear" if args.lora_target_modules == ["all-linear"] else args.lora_target_modules,
        )
        policy = get_peft_model(policy, lora, adapter_name=adapter_name)
    if args.ref_adapter_name:
        policy.load_adapter(args.sft_model_path, adapter_name=args.ref_adapter_name, is_trainable=False)
        policy.set_adapter(adapter_name)
    return policy, None, base_path


def parameter_counts(args: Args, policy, value_model, reward_model, ref_policy) -> str:
    reference = f"{num_params(ref_policy)}"
    if ref_policy is None:
        adapter = f"adapter {args.ref_adapter_name!r}" if args.ref_adapter_name else "its adapter disabled"
        reference = f"0 (the policy with {adapter})"
    return (
        f"parameters: policy {num_params(policy)} ({num_params(policy, True)} trained), value model "
        f"{num_params(value_model)}, reward model {num_params(reward_model)}, reference {reference}"
    )


@dataclass
class Run:
    """What rollouts, evaluation and saving share: the models as prepared, and settings resolved at setup."""

    args: Args
    accelerator: object
    model: nn.Module  # PolicyAndValue as prepared: DDP-wrapped or a DeepSpeed engine (train/eval, backward, steps)
    unwrapped: "PolicyAndValue"  # the same model, for forwards that bypass the wrapper
    ref_policy: Optional[nn.Module]  # None with LoRA: see reference_policy
    reward_model: Optional[nn.Module]  # None: rewards from functions only
    reward_funcs: list  # rlhf_utils.rewards.RewardFunction of each --reward-funcs
    reward_weights: list  # one per reward source: the reward model first (if any), then each function
    tokenizer: object
    sampling_generator: torch.Generator
    stop_token_id: list  # the token ids that end a response (and that the EOS trick checks)
    reward_shift: float
    pad_multiple: int
    zero_stage: Optional[int]  # None: no DeepSpeed
    base_path: str  # the policy's base model (for --merge-adapter-on-save)
    metrics_path: str


def autocast(run: Run):
    return torch.autocast(run.accelerator.device.type, dtype=torch.bfloat16, enabled=run.args.bf16)


@contextlib.contextmanager
def reference_policy(run: Run):
    """The frozen SFT copy, or with LoRA the policy itself with its adapter disabled (or the SFT adapter set)."""
    policy, adapter_name = run.unwrapped.policy, run.args.model_adapter_name or "default"
    if run.ref_policy is not None:
        yield run.ref_policy
    elif run.args.ref_adapter_name:
        policy.set_adapter(run.args.ref_adapter_name, inference_mode=True)
        try:
            yield policy
        finally:
            policy.set_adapter(adapter_name)
    else:
        with policy.disable_adapter():
            yield policy


@torch.no_grad()
def reference_logprobs(run: Run, query_responses, attention_mask, context_length: int, temperature: float, needed):
    inputs = (query_responses, attention_mask, context_length, temperature, needed)
    with reference_policy(run) as ref:
        return run.unwrapped.policy_forward(*inputs, policy=ref)[0]


@torch.no_grad()
def generate_responses(run: Run, queries, query_mask, temperature: float) -> torch.Tensor:
    gather = run.zero_stage == 3 and run.args.ds3_gather_for_generation  # whole weights once, not at every token
    with autocast(run), gathered_for_generation(run.model, run.unwrapped.policy, gather):
        return generate(
            run.unwrapped.policy,
            queries,
            query_mask,
            run.args.response_length,
            temperature,
            run.stop_token_id,
            run.sampling_generator,
            sync_processes=run.zero_stage == 3 and not run.args.ds3_gather_for_generation,
        )


@torch.no_grad()
def rollout_scores(run: Run, queries, query_mask, responses, rows: list, where: str) -> tuple:
    """Truncate after the stop token and score query + truncated response by each reward source (the reward model,
    each --reward-funcs function on the texts and the dataset rows' columns). Returns the truncated responses, their
    sequence lengths, the weighted sum of the scores and {source: scores}."""
    pad_id = run.tokenizer.pad_token_id
    postprocessed, sequence_lengths = truncate_after_stop(responses, run.stop_token_id, pad_id)
    sources = {}
    if run.reward_model is not None:
        response_mask = torch.arange(responses.shape[1], device=responses.device)[None, :] <= sequence_lengths[:, None]
        query_responses = torch.cat([queries, postprocessed], 1)
        attention_mask = torch.cat([query_mask, response_mask.long()], 1)
        with autocast(run):
            scores = get_score(
                run.reward_model, query_responses, attention_mask, run.unwrapped.overhead, run.unwrapped.multiple
            )
        sources["reward_model"] = scores + run.reward_shift  # 0 unless the model's config carries its normalisation
    if run.reward_funcs:
        completions = run.tokenizer.batch_decode(postprocessed, skip_special_tokens=True)
        for name, scores in call_reward_funcs(run.reward_funcs, rows, completions, run.tokenizer, where).items():
            sources[name] = torch.tensor(scores, device=responses.device)
    return postprocessed, sequence_lengths, weighted_sum(sources, run.reward_weights), sources


@torch.no_grad()
def rollout_forward(run: Run, query_responses, attention_mask, context_length: int, needed) -> tuple:
    """Old log-probs, reference log-probs and values of the first needed[i] response positions."""
    temperature = run.args.temperature
    with autocast(run):
        logprobs, _, values = run.unwrapped(query_responses, attention_mask, context_length, temperature, needed)
        ref_logprobs = reference_logprobs(run, query_responses, attention_mask, context_length, temperature, needed)
    return logprobs, ref_logprobs, values


# The PPO epochs' statistics: sums over valid tokens, then token-weighted averages (the token counts are the last two).
PPO_STATS = "approxkl pg_clipfrac pg_loss vf_loss vf_clipfrac entropy ratio ratio_squared pg_tokens vf_tokens".split()


@torch.no_grad()
def evaluate(run: Run, prompt_rows: list) -> tuple:
    """Near-greedy responses to the prompts of the given rows: mean score (the weighted sum of the reward sources), KL
    to the reference (sum over the response of logp - logp_ref at temperature 1), stop-token rate and length, gathered
    over processes."""
    args, accelerator, tokenizer = run.args, run.accelerator, run.tokenizer
    device, rank, processes = accelerator.device, accelerator.process_index, accelerator.num_processes
    chunk = args.per_device_eval_batch_size or args.local_rollout_forward_batch_size
    run.model.eval()  # gradient checkpointing (active in train mode) would drop the KV cache of generation
    mine = prompt_rows[rank::processes]
    # Every process runs the same number of batches (under ZeRO-3 each forward is collective): a process with one
    # prompt fewer repeats its first one, with weight 0.
    weight = torch.ones(math.ceil(len(prompt_rows) / processes), device=device)
    weight[len(mine) :] = 0.0
    mine = mine + mine[:1] * (len(weight) - len(mine))
    rows, totals = [], {k: torch.zeros((), device=device) for k in ("score", "kl", "eos", "length", "count")}
    for i in range(0, len(mine), chunk):
        prompts = [r["input_ids"] for r in mine[i : i + chunk]]
        queries, query_mask = (t.to(device) for t in left_pad(prompts, tokenizer.pad_token_id, run.pad_multiple))
        w = weight[i : i + chunk]
        responses = generate_responses(run, queries, query_mask, args.eval_temperature)
        postprocessed, sequence_lengths, scores, _ = rollout_scores(
            run, queries, query_mask, responses, mine[i : i + chunk], "evaluation"
        )
        query_responses = torch.cat([queries, responses], 1)
        attention_mask = torch.cat([query_mask, torch.ones_like(responses)], 1)
        context_length = queries.shape[1]
        needed = (sequence_lengths + 1).clamp(max=responses.shape[1])  # up to the stop token
        with autocast(run):
            # the policy alone: the value model's forward would be thrown away
            logprobs = run.unwrapped.policy_forward(query_responses, attention_mask, context_length, 1.0, needed)[0]
            ref_logprobs = reference_logprobs(run, query_responses, attention_mask, context_length, 1.0, needed)
        valid = torch.arange(logprobs.shape[1], device=device)[None, :] <= sequence_lengths[:, None]
        kl = ((logprobs - ref_logprobs) * valid).sum(1)
        has_stop = is_stop(responses, run.stop_token_id).any(1)
        totals["score"] += (scores * w).sum()
        totals["kl"] += (kl * w).sum()
        totals["eos"] += (has_stop.float() * w).sum()
        totals["length"] += (valid.float().sum(1) * w).sum()
        totals["count"] += w.sum()
        texts = tokenizer.batch_decode(postprocessed, skip_special_tokens=True)
        first = rank + processes * i  # position of this chunk in prompt_rows
        rows += [
            {
                "index": first + processes * j,
                "query": tokenizer.decode(q, skip_special_tokens=True),
                "response": r,
                "score": s,
            }
            for j, (q, r, s, keep) in enumerate(zip(queries, texts, scores.tolist(), w))
            if keep > 0
        ]
    totals = reduce_stats(accelerator, totals, "sum")
    n = totals["count"]
    return {
        "eval/score": (totals["score"] / n).item(),
        "eval/kl": (totals["kl"] / n).item(),
        "eval/eos_rate": (totals["eos"] / n).item(),
        "eval/response_length": (totals["length"] / n).item(),
    }, rows


def log(run: Run, row: dict) -> None:
    if run.accelerator.is_main_process:
        append_metrics(run.metrics_path, row, run.args.track)


def print_samples(run: Run, rows: list, update: int) -> None:
    if not run.accelerator.is_main_process:
        return
    columns = ["query", "model response", "score"]
    table = [[r["query"], r["response"], r["score"]] for r in rows]
    show_samples(f"sample completions after update {update}", columns, table, run.args.track, {"query": 200})


def write_models(run: Run, state_dict: dict, policy_dir: str, value_dir: str, merge: bool = False) -> None:
    """The policy (as from_pretrained loads it, or with LoRA its adapter; with merge, also merged into its base model,
    in policy_dir/merged) and the value model."""
    args, split = run.args, split_state_dict(state_dict, ("policy", "value_model"))
    adapter_name = (args.model_adapter_name or "default") if args.use_peft else None
    merge_base = run.base_path if merge else None
    deepspeed = run.accelerator.state.deepspeed_plugin.dschf if merge and run.zero_stage is not None else None
    policy_args = (adapter_name, merge_base, run.tokenizer, args.trust_remote_code, deepspeed)
    save_policy(run.unwrapped.policy, policy_dir, split["policy"], *policy_args)
    run.unwrapped.value_model.save_pretrained(value_dir, state_dict=split["value_model"])


def save_checkpoint(run: Run, optimizer, scheduler, update: int, global_episode: int, optimizer_steps: int) -> None:
    """checkpoint-`update` (write_checkpoint): the policy (or its adapter), the value model and the counters."""
    counters = {"update": update, "global_episode": global_episode, "optimizer_steps": optimizer_steps}
    state = {**counters, "script": os.path.basename(__file__)}

    def write(folder: str, state_dict: dict) -> None:
        write_models(run, state_dict, os.path.join(folder, "policy"), os.path.join(folder, "value_model"))

    training = (run.accelerator, run.model, optimizer, scheduler, run.zero_stage)
    write_checkpoint(run.args, update, state, *training, write, run.sampling_generator)


def save_generations(run: Run, name: str, eval_rows: list) -> dict:
    """Evaluate on eval_rows and write every generation (the query, the response, the row's reference `completion`
    where it has one, the score) to output_dir/eval_generations/<name>.jsonl, for a judge; returns the metrics."""
    from accelerate.utils import gather_object

    metrics, rows = evaluate(run, eval_rows)
    rows = sorted(gather_object(rows), key=lambda r: r["index"])
    if run.accelerator.is_main_process:
        saved = []
        for row in rows:
            reference = {"reference": eval_rows[row["index"]]["completion"]} if "completion" in eval_rows[0] else {}
            saved.append({"query": row["query"], "response": row["response"], **reference, "score": row["score"]})
        write_jsonl(os.path.join(run.args.output_dir, "eval_generations", f"{name}.jsonl"), saved)
    return {k.replace("eval/", f"{name}_eval/"): v for k, v in metrics.items()}


def write_output(run: Run, path: str, state_dict: dict) -> None:
    """The policy (+ tokenizer, model card, metrics, args) at path and the value model in path/value_model."""
    args, tokenizer = run.args, run.tokenizer
    write_models(run, state_dict, path, os.path.join(path, "value_model"), merge=args.merge_adapter_on_save)
    tokenizer.save_pretrained(path)
    tokenizer.save_pretrained(os.path.join(path, "value_model"))
    with open(run.metrics_path) as f:
        rows = [json.loads(line) for line in f]
    summary = (
        f"A PPO-RLHF policy trained with `{os.path.basename(__file__)}` from `{args.sft_model_path}` against "
        + " and ".join([f"`{args.reward_model_path}`"] * bool(args.reward_model_path) + list(args.reward_funcs or []))
        + "."
    )
    footer = "\nThe value model is in `value_model/`; every logged row is in `metrics.jsonl`.\n"
    usage = dict(
        location=args.hub_model_id or args.output_dir, model_class="AutoModelForCausalLM", adapter=args.use_peft
    )
    card = run_model_card(args, summary, args.sft_model_path, ["ppo", "rlhf"], rows, footer, usage)
    write_run_files(path, args, rows, card)
    if args.dataset_final_eval_split is not None:  # this run wrote them (an earlier run's must not come along)
        shutil.copytree(os.path.join(args.output_dir, "eval_generations"), os.path.join(path, "eval_generations"))


# ---------------------------------------------------------------------------------------------------------------


if __name__ == "__main__":
    args = parse_args(Args)
    explain_remote_code_errors()
    b = check_args(args)
    reward_funcs = load_reward_funcs(args.reward_funcs or [], ("reward_model",) if args.reward_model_path else ())
    resume_dir = claim_output_dir(args.output_dir, args.resume_from_checkpoint, args.overwrite_output_dir)
    train_data, eval_data, final_data, prompt_kind, split_note = load_prompts(args, b.local_batch_size)
    if args.num_train_epochs is not None:  # TRL's rule: the budget is the epochs over the train prompts
        b = check_args(args, len(train_data))
    may_grow = ("total_episodes",)  # only where the training so far stays the same (see budget_growth_problem)
    resume_state = check_resume(resume_dir, args, MAY_CHANGE_ON_RESUME, os.path.basename(__file__), may_grow)

    from accelerate.utils import DistributedType
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_scheduler

    tokenizer = AutoTokenizer.from_pretrained(
        args.model_name_or_path,
        padding_side="left",
        trust_remote_code=args.trust_remote_code,
        revision=args.model_revision,
    )
    added_pad = add_pad_token(tokenizer)  # logged below, once
    context, reward_shift = check_model_configs(args, tokenizer, prompt_kind)
    stop_token_id = [tokenizer.eos_token_id] if args.stop_token == "eos" else [args.stop_token_id]
    if args.stop_token is None and args.stop_token_id is None:
        # TRL's default: its generate() still stopped at the model's EOS, which transformers takes from the SFT
        # model's generation config (every id of it), else from the tokenizer.
        stop_token_id = eos_token_ids(args.sft_model_path, tokenizer, args.trust_remote_code)

    stop_on_signals()  # from here on, Ctrl-C or SIGTERM stops after the current update with a checkpoint

    # TRY NOT TO MODIFY: processes, seeding, tracking
    # One optimizer step per mini-batch: accelerate (and the DeepSpeed engine) accumulate micro_per_mini backward
    # passes, whatever gradient_accumulation_steps the launcher's config says.
    accelerator, zero_stage = make_accelerator(b.micro_per_mini, args.bf16, args.max_grad_norm, resume_state)
    is_deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    device = accelerator.device
    if added_pad:
        accelerator.print(added_pad)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    # Sampling differs per process; the data order and the PPO permutations are the same on every process.
    sampling_generator = torch.Generator(device=device).manual_seed(args.seed + accelerator.process_index * 100003)
    if args.track and accelerator.is_main_process:
        start_tracking(args, "train/episode", ("train/*", "eval/*"))
    accelerator.print(split_note)
    if prompt_kind == "text" and tokenizer.chat_template:
        accelerator.print(
            "note: the tokenizer has a chat template, but the prompts are plain text: they are used as "
            "they are, as TRL's PPO did (give lists of {role, content} messages to have it applied)"
        )
    train_rows, eval_rows, final_rows = tokenize_prompts(
        args, tokenizer, train_data, eval_data, final_data, context, b, accelerator.print
    )
    metrics_path = prepare_output_dir(args.output_dir, resume_state, accelerator.is_main_process)

    # Models: policy and reference from the SFT model; value model and reward model from the reward model (without
    # one, the value model is the SFT model with a new head).
    policy, ref_policy, base_path = load_policy(args, tokenizer, resume_dir)
    value_path = args.value_model_path or args.reward_model_path or base_path
    if resume_dir:
        value_path = os.path.join(resume_dir, "value_model")
    elif not (args.value_model_path or args.reward_model_path):
        accelerator.print(
            f"value model: {base_path} with a new one-output head (no --reward-model-path to start from)"
        )
    options = load_options(args)
    value_model = load_model(
        AutoModelForSequenceClassification, value_path, tokenizer, args.trust_remote_code, options
    )
    reward_model = None
    if args.reward_model_path is not None:
        reward_model = load_model(
            AutoModelForSequenceClassification, args.reward_model_path, tokenizer, args.trust_remote_code, options
        )
        reward_model = reward_model.eval().requires_grad_(False)
    if args.gradient_checkpointing:
        for m in (policy, value_model):
            m.gradient_checkpointing_enable()
    # oneDNN (bf16 on a CPU) keeps kernels per matmul shape: rounded widths keep the shapes, and memory, bounded.
    pad_multiple = args.pad_to_multiple_of or (64 if args.bf16 and not torch.cuda.is_available() else 1)
    overhead = GROUP_OVERHEAD if args.length_grouping else None
    model = PolicyAndValue(policy, value_model, overhead, args.chunked_logprobs, pad_multiple)
    accelerator.print(parameter_counts(args, policy, value_model, reward_model, ref_policy))
    # fused: one kernel for all parameters (torch's default on CPU loops over them); DeepSpeed keeps its own path.
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=args.learning_rate,
        eps=args.adam_epsilon,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.weight_decay,
        fused=not is_deepspeed and args.optim == "adamw_torch_fused",
    )
    # Stepped by hand once per PPO update (accelerate's wrapper would step it once per process, DeepSpeed once per
    # optimizer step), so it is not prepared.
    scheduler = get_scheduler(
        args.lr_scheduler_type,
        optimizer,
        num_warmup_steps=warmup_steps(args, b.num_total_batches),
        num_training_steps=b.num_total_batches,
    )
    if is_deepspeed:  # the PPO loop relies on one engine step per mini-batch, whatever the config file says
        configure_deepspeed(accelerator, args.per_device_train_batch_size, b.micro_per_mini, args.max_grad_norm)
    if zero_stage == 3:
        # ZeRO-3 holds a shard of each weight, gathered by a collective around each module call: every process must
        # make the same calls (one forward per batch, not a group count of its own), and the LM head's weight is
        # only whole inside the head's own forward.
        model.overhead, model.chunked = None, False
    model, optimizer = accelerator.prepare(model, optimizer)
    frozen_settings = (accelerator, args.per_device_train_batch_size, args.bf16, zero_stage)
    run = Run(
        args=args,
        accelerator=accelerator,
        model=model,
        unwrapped=accelerator.unwrap_model(model),
        ref_policy=prepare_frozen(ref_policy, *frozen_settings) if ref_policy is not None else None,
        reward_model=prepare_frozen(reward_model, *frozen_settings) if reward_model is not None else None,
        reward_funcs=reward_funcs,
        reward_weights=args.reward_weights or [1.0] * ((reward_model is not None) + len(reward_funcs)),
        tokenizer=tokenizer,
        sampling_generator=sampling_generator,
        stop_token_id=stop_token_id,
        reward_shift=reward_shift,
        pad_multiple=pad_multiple,
        zero_stage=zero_stage,
        base_path=base_path,
        metrics_path=metrics_path,
    )
    pad_id = tokenizer.pad_token_id
    accelerator.print(
        f"{len(train_rows)} train / {len(eval_rows)} eval prompts; {b.num_total_batches} updates of "
        f"{b.batch_size} episodes ({b.world_size} processes x {b.local_batch_size})"
    )

    batch_sizes = (b.batch_size, b.local_batch_size)  # the prompts of an update, all processes and this one
    sample_every = max(b.num_total_batches // args.num_sample_generations, 1) if args.num_sample_generations else 0
    global_episode, optimizer_steps, first_update = 0, 0, 1
    if resume_state is not None:
        load_checkpoint(
            resume_dir, resume_state, accelerator, model, optimizer, scheduler, zero_stage, sampling_generator
        )
        global_episode, optimizer_steps = resume_state["global_episode"], resume_state["optimizer_steps"]
        first_update = resume_state["update"] + 1
        accelerator.print(f"resumed from {resume_dir}: continuing at update {first_update}, episode {global_episode}")

    if final_rows and args.eval_initial_policy and resume_state is None:
        log(run, {**save_generations(run, "initial", final_rows), "episode": 0, "update": 0})
    start_time, start_episode = time.time(), global_episode
    bar = progress_bar(
        b.num_total_batches * b.batch_size, "episode", accelerator.is_main_process, initial=global_episode
    )
    say = bar.write if bar is not None else accelerator.print  # printed lines stay above the bar
    for update in range(first_update, b.num_total_batches + 1):
        rows = prompts_for_update(train_rows, update, args.seed, *batch_sizes, accelerator.process_index)
        global_episode += b.batch_size
        timer = Timer(generation=0.0, rollout_forward=0.0, training=0.0)
        update_start = time.time()

        # ALGO LOGIC: rollout. Steps 1-5 of the recipe, in chunks of local_rollout_forward_batch_size.
        queries, query_mask = (t.to(device) for t in left_pad([r["input_ids"] for r in rows], pad_id, pad_multiple))
        context_length = queries.shape[1]
        responses, scores, sequence_lengths, postprocessed, source_scores = [], [], [], [], []
        model.eval()
        with torch.no_grad():
            for i in range(0, b.local_batch_size, args.local_rollout_forward_batch_size):
                q = queries[i : i + args.local_rollout_forward_batch_size]
                qm = query_mask[i : i + args.local_rollout_forward_batch_size]
                with timer("generation"):
                    r = generate_responses(run, q, qm, args.temperature)
                with timer("rollout_forward"):
                    chunk_rows = rows[i : i + args.local_rollout_forward_batch_size]
                    pp, sl, s, by_source = rollout_scores(run, q, qm, r, chunk_rows, f"update {update}")
                responses.append(r), postprocessed.append(pp), sequence_lengths.append(sl), scores.append(s)
                source_scores.append(by_source)
            width = max(r.shape[1] for r in responses)
            responses = right_pad_cat(responses, width, pad_id)
            postprocessed = right_pad_cat(postprocessed, width, pad_id)
            scores, sequence_lengths = torch.cat(scores), torch.cat(sequence_lengths)
            # each reward source's scores, before weighting and the EOS trick (logged as objective/scores/<name>)
            source_scores = {k: torch.cat([c[k] for c in source_scores]) for k in source_scores[0]}
            query_responses = torch.cat([queries, responses], 1)
            attention_mask = torch.cat([query_mask, torch.ones_like(responses)], 1)
            # The old log-probs come from the same forward the training uses (not from generation scores), so the
            # first PPO mini-batch has ratio 1; the values come from that same call. They run on the padded batch:
            # a row that stopped in its chunk's last column still gets its value at sequence_length + 1.
            with timer("rollout_forward"):
                logprobs, ref_logprobs, values = forward_in_chunks(
                    functools.partial(rollout_forward, run),
                    query_responses,
                    attention_mask,
                    context_length,
                    sequence_lengths,
                    args.local_rollout_forward_batch_size,
                )

            # Step 6, the EOS trick: responses that never produced the stop token lose missing_eos_penalty.
            # The EOS trick checks the configured stop tokens (TRL checked EOS even with a custom stop_token_id).
            contains_stop = is_stop(postprocessed, stop_token_id).any(1)
            if args.missing_eos_penalty is not None:
                scores = scores - args.missing_eos_penalty * (~contains_stop).float()

            # Step 7, masks. padding_mask: positions after the last real token (no action was taken there).
            # padding_mask_p1 keeps one more position for the values, because the score lands at sequence_length + 1.
            response_idxs = torch.arange(width, device=device)[None, :]
            padding_mask = response_idxs > sequence_lengths[:, None]
            padding_mask_p1 = response_idxs > (sequence_lengths[:, None] + 1)
            logprobs = logprobs.masked_fill(padding_mask, INVALID_LOGPROB)
            ref_logprobs = ref_logprobs.masked_fill(padding_mask, INVALID_LOGPROB)
            values = values.masked_fill(padding_mask_p1, 0.0)

            # Step 8, per-token KL penalty plus the score.
            kl = kl_penalty(logprobs, ref_logprobs, args.kl_estimator)
            non_score_reward = -args.kl_coef * kl
            rewards = place_scores(non_score_reward, scores, sequence_lengths)

            # Step 9, optional reward whitening (scale only), GAE, and advantage whitening over valid tokens.
            if args.whiten_rewards:
                rewards = masked_whiten(rewards, ~padding_mask_p1, shift_mean=False).masked_fill(padding_mask_p1, 0.0)
            advantages = gae_advantages(rewards, values, args.gamma, args.lam)
            returns = advantages + values
            advantages = masked_whiten(advantages, ~padding_mask).masked_fill(padding_mask, 0.0)
            advice = " (lower --learning-rate, or check the reward model)"
            stop_if_not_finite("reward or advantage", [scores, advantages], f"update {update}", advice)

        # ALGO LOGIC: PPO epochs. Step 10: one optimizer step per mini-batch, whatever num_mini_batches is.
        training_start = time.time()
        model.train()
        # Sums over valid tokens of each statistic (the weights of the token-weighted averages logged below).
        stats = {k: torch.zeros((), device=device, dtype=torch.float64) for k in PPO_STATS}
        micro_ratio_means = []  # for val/ratio_var, TRL's: the variance of the per-micro-batch mean ratios
        # Each epoch passes over a fresh random permutation of the rollouts, split into mini-batches.
        permutations = [np.random.permutation(b.local_batch_size) for _ in range(args.num_ppo_epochs)]
        mini_batches = [
            (ppo_epoch, mini)
            for ppo_epoch, permutation in enumerate(permutations)
            for mini in torch.from_numpy(permutation).to(device).split(b.local_mini_batch_size)
        ]
        for ppo_epoch, mini in mini_batches:
            # Gradient = token sum / valid tokens of the whole mini-batch, all processes together: neither the split
            # into micro-batches nor the number of processes changes it (token_mean_divisors).
            n_pg, n_vf = token_mean_divisors(
                ~padding_mask[mini], ~padding_mask_p1[mini], b.micro_per_mini, accelerator.num_processes
            )
            for micro in mini.split(args.per_device_train_batch_size):
                # Response columns past every row's stop token + 1 are masked everywhere: not computed at all.
                needed = (sequence_lengths[micro] + 2).clamp(max=width)
                n = int(needed.max())
                valid_pg, valid_vf = ~padding_mask[micro, :n], ~padding_mask_p1[micro, :n]
                old_logprobs, old_values = logprobs[micro, :n], values[micro, :n]
                mb_advantages, mb_returns = advantages[micro, :n], returns[micro, :n]
                # Gradients are all-reduced (DDP) or reduce-scattered (ZeRO) on the mini-batch's last micro-batch;
                # the DeepSpeed engine takes its optimizer step inside that backward.
                with accelerator.accumulate(model):
                    mb_query_responses = query_responses[micro, : context_length + n]
                    mb_attention_mask = attention_mask[micro, : context_length + n]
                    with autocast(run):
                        new_logprobs, entropy, vpred = model(
                            mb_query_responses, mb_attention_mask, context_length, args.temperature, needed
                        )
                    new_logprobs = new_logprobs.masked_fill(~valid_pg, INVALID_LOGPROB)
                    logratio = new_logprobs - old_logprobs
                    ratio = torch.exp(logratio)
                    pg_unclipped = -mb_advantages * ratio
                    pg_clipped = -mb_advantages * ratio.clamp(1 - args.cliprange, 1 + args.cliprange)
                    pg_losses = torch.max(pg_unclipped, pg_clipped)
                    vpred = vpred.masked_fill(~valid_vf, 0.0)
                    vpred_clipped = old_values + (vpred - old_values).clamp(
                        -args.cliprange_value, args.cliprange_value
                    )
                    vf_unclipped = (vpred - mb_returns) ** 2
                    vf_losses = torch.max(vf_unclipped, (vpred_clipped - mb_returns) ** 2)
                    pg_loss = (pg_losses * valid_pg).sum() / n_pg
                    vf_loss = 0.5 * (vf_losses * valid_vf).sum() / n_vf
                    loss = pg_loss + args.vf_coef * vf_loss
                    accelerator.backward(loss)
                with torch.no_grad():
                    vp, vv = valid_pg.double(), valid_vf.double()
                    stats["approxkl"] += (0.5 * logratio**2 * vp).sum()
                    stats["pg_clipfrac"] += ((pg_losses > pg_unclipped).double() * vp).sum()
                    stats["pg_loss"] += (pg_losses * vp).sum()
                    stats["vf_loss"] += (0.5 * vf_losses * vv).sum()
                    stats["vf_clipfrac"] += ((vf_losses > vf_unclipped).double() * vv).sum()
                    stats["entropy"] += (entropy * vp).sum()
                    stats["ratio"] += (ratio * vp).sum()
                    stats["ratio_squared"] += (ratio**2 * vp).sum()
                    stats["pg_tokens"] += vp.sum()
                    stats["vf_tokens"] += vv.sum()
                    micro_ratio_means.append((ratio * vp).sum() / vp.sum().clamp(min=1))
            where = f"update {update}, PPO epoch {ppo_epoch}"
            stop_if_not_finite("loss", [loss], where, " (lower --learning-rate)")
            grad_norm = accelerator.clip_grad_norm_(  # DeepSpeed: its norm; an infinite max only measures
                model.parameters(), math.inf if args.max_grad_norm is None else args.max_grad_norm
            )
            advice = ", so the last checkpoint is intact (lower --learning-rate)"
            stop_if_not_finite("gradient norm", [grad_norm], where, advice)
            optimizer.step()
            optimizer.zero_grad()
            # Under DeepSpeed, count the engine's own steps: a mismatch with the mini-batches would show here.
            optimizer_steps = model.global_steps if is_deepspeed else optimizer_steps + 1
        timer["training"] = time.time() - training_start

        # TRY NOT TO MODIFY: logging. Step 11. Token-weighted averages, gathered over processes.
        with torch.no_grad():
            s = reduce_stats(accelerator, stats, "sum")
            n_pg, n_vf = s["pg_tokens"].clamp(min=1), s["vf_tokens"].clamp(min=1)
            ratio_mean = s["ratio"] / n_pg
            per_process = {
                "kl": kl.masked_fill(padding_mask, 0).sum(1).mean(),
                "entropy": (-logprobs).masked_fill(padding_mask, 0).sum(1).mean(),
                "non_score_reward": non_score_reward.sum(1).mean(),
                "rlhf_reward": (scores + non_score_reward.sum(1)).mean(),
                "scores": scores.mean(),
                "response_length": (sequence_lengths + 1).float().mean(),
            }
            if args.reward_funcs:  # each source's mean score, when there is more than the reward model
                per_process.update({f"scores/{k}": v.mean() for k, v in source_scores.items()})
            objective = reduce_stats(accelerator, {k: v.double() for k, v in per_process.items()}, "mean")
            num_eos = accelerator.reduce(contains_stop.sum().double(), "sum")
            micro_ratio_means = accelerator.gather(torch.stack(micro_ratio_means))
            ratio_var = micro_ratio_means.var() if len(micro_ratio_means) > 1 else torch.zeros((), device=device)
        first = args.logging_first_step and update == 1
        if update % args.logging_steps == 0 or update == b.num_total_batches or first:
            row = {
                "eps": int((global_episode - start_episode) / (time.time() - start_time)),
                "objective/kl": objective["kl"].item(),
                "objective/entropy": objective["entropy"].item(),
                "objective/non_score_reward": objective["non_score_reward"].item(),
                "objective/rlhf_reward": objective["rlhf_reward"].item(),
                "objective/scores": objective["scores"].item(),
                **{f"objective/{k}": v.item() for k, v in objective.items() if k.startswith("scores/")},
                "policy/approxkl_avg": (s["approxkl"] / n_pg).item(),
                "policy/clipfrac_avg": (s["pg_clipfrac"] / n_pg).item(),
                "loss/policy_avg": (s["pg_loss"] / n_pg).item(),
                "loss/value_avg": (s["vf_loss"] / n_vf).item(),
                "val/clipfrac_avg": (s["vf_clipfrac"] / n_vf).item(),
                "policy/entropy_avg": (s["entropy"] / n_pg).item(),
                "val/ratio": ratio_mean.item(),
                "val/ratio_var": ratio_var.item(),
                "val/ratio_token_var": (s["ratio_squared"] / n_pg - ratio_mean**2).clamp(min=0).item(),  # not < 0
                "val/num_eos_tokens": num_eos.item(),
                "lr": scheduler.get_last_lr()[0],
                "episode": global_episode,
                "update": update,
                "optimizer_steps": optimizer_steps,
                "objective/response_length": objective["response_length"].item(),
                **{f"time/{k}": v for k, v in timer.items()},
                "time/update": time.time() - update_start,
            }
            log(run, row)
            say(
                f"update {update}/{b.num_total_batches} episode {global_episode} "
                f"scores {row['objective/scores']:.3f} kl {row['objective/kl']:.3f} "
                f"ratio {row['val/ratio']:.4f} eps {row['eps']}"
            )
        scheduler.step()
        if bar is not None:
            bar.update(b.batch_size)

        if args.eval_strategy == "steps" and (update % args.eval_steps == 0 or update == b.num_total_batches):
            metrics, _ = evaluate(run, eval_rows)
            log(run, {**metrics, "episode": global_episode, "update": update})
            say(f"eval after update {update}: " + " ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
        if sample_every and (update % sample_every == 0 or update == b.num_total_batches):
            _, samples = evaluate(run, eval_rows[: 8 * accelerator.num_processes])
            print_samples(run, samples, update)
        stop = stop_requested(accelerator)
        if (args.save_steps and update % args.save_steps == 0) or stop:
            save_checkpoint(run, optimizer, scheduler, update, global_episode, optimizer_steps)
        if stop:
            accelerator.print(
                f"stopped by {signal.Signals(stop).name} after update {update}, with checkpoint-{update}: "
                "continue with --resume-from-checkpoint latest",
                file=sys.stderr,
            )
            end_run(accelerator, 128 + stop)
    if bar is not None:
        bar.close()

    if final_rows:
        final_metrics = save_generations(run, "final", final_rows)
        log(run, {**final_metrics, "episode": global_episode, "update": b.num_total_batches})
        accelerator.print("final evaluation: " + " ".join(f"{k} {v:.3f}" for k, v in final_metrics.items()))
    save_output(args, accelerator, model, functools.partial(write_output, run), start_time, "policy and value model ")
    end_run(accelerator)
