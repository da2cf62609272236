"""Speed and peak memory of ppo_rlhf.py against TRL 1.12.0's PPOTrainer, same machine, same invocation, alternating.

    python benchmark/speed_compare.py --shape tiny                 # the embedded task, batch 16x4, 53 tokens
    python benchmark/speed_compare.py --shape tldr                 # real TL;DR prompts, Pythia tokenizer, batch 8
    python benchmark/speed_compare.py --shape tldr --scaling       # ours only: s/update vs response length, batch
    python benchmark/speed_compare.py --shape tldr --trl-gc-freeze # also TRL with gc.freeze() (not as shipped)
    python benchmark/speed_compare.py --shape pythia160m --bf16    # a Pythia-160M-shaped model, real prompts, batch 8
    python benchmark/speed_compare.py --shape qwen05b --qwen-layers 6  # Qwen2.5-0.5B's width and 152k vocabulary

Both implementations run as subprocesses with the same models, tokenizer, prompts, batch sizes, response length, PPO
epochs, mini-batches, stop token (EOS), temperature, learning rate, missing-EOS penalty, seed and threads
(OMP_NUM_THREADS / MKL_NUM_THREADS for both, plus TRL's torch.set_num_threads). Ours is `python ppo_rlhf.py`, TRL is
`<--trl-python> benchmark/trl_ppo_runner.py` (a separate venv: benchmark/requirements-trl.txt). Each repeat runs both,
alternating the order (ABBA) so a drifting machine load hits both alike.

Per implementation it reports episodes/s and the time per update split into generation / rollout forwards / training /
other, from the per-update timers of each (ours: metrics.jsonl `time/*`; TRL: the runner's `per_update`), excluding
the first update as warm-up; and the peak resident memory of the whole process, measured the same way for both
(`/usr/bin/time -v`, or a fresh wrapper process reading getrusage(RUSAGE_CHILDREN) if `time` is missing). Numbers are
medians over the repeats; ratios are ours/TRL per repeat (adjacent runs), then the median.

The `tldr` shape needs ../shared/data (the real Reddit prompts and the GPT-NeoX-20B tokenizer): it builds, once, a
tokenizer with `[PAD]` added (id 50277), a tiny-width GPT-NeoX policy (hidden 128, 4 layers, vocabulary 50304) and
reward model, randomly initialised, and the prompts of at most 512 tokens, cached in --build-dir (models/ is ignored
by git). Random-init models rarely emit EOS, so both implementations generate all response tokens.

Results: a markdown table printed and written with a JSON of every run to --results-dir (speed_<shape>.md/.json,
scaling_tldr.md/.json).
"""

import json
import math
import os
import shlex
import shutil
import statistics
import sys
from dataclasses import asdict, dataclass, field
from typing import List, Literal, Optional

import common
import tyro
from common import NEOX_TOKENIZER, ROOT, TLDR_PROMPTS, default_trl_python, fail, run_measured, trl_available

PHASES = ("generation", "rollout_forwards", "training", "other")

# Settings that differ between the shapes (the rest are Args defaults shared by all).
SHAPES = {
    "tiny": dict(
        num_updates=6,
        per_device_train_batch_size=16,
        gradient_accumulation_steps=4,
        local_rollout_forward_batch_size=64,
        learning_rate=3e-5,
    ),
    "tldr": dict(
        num_updates=4,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=1,
        local_rollout_forward_batch_size=8,
        learning_rate=3e-6,
    ),
    "pythia160m": dict(
        num_updates=3,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=1,
        local_rollout_forward_batch_size=8,
        learning_rate=3e-6,
    ),
    "qwen05b": dict(
        num_updates=3,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=1,
        local_rollout_forward_batch_size=8,
        learning_rate=3e-6,
    ),
}
# The tiny-width GPT-NeoX of the tldr shape (the vocabulary is the tokenizer's, rounded up to a multiple of 128).
TLDR_MODEL = dict(
    hidden_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    intermediate_size=512,
    max_position_embeddings=2048,
    rotary_pct=0.25,
    use_parallel_residual=True,
    hidden_dropout=0.0,
    attention_dropout=0.0,
    tie_word_embeddings=False,
    initializer_range=0.02,
)
# Realistic widths (random init; the real TL;DR prompts and the GPT-NeoX-20B tokenizer in every shape):
# Pythia-160M's layout exactly, and Qwen2.5-0.5B's width, heads, MLP and 151,936-entry tied vocabulary (the tokenizer
# only uses its first 50,278 ids, which changes no cost), with --qwen-layers of its 24 layers.
PYTHIA160M_MODEL = dict(
    TLDR_MODEL, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072
)
QWEN05B_MODEL = dict(
    hidden_size=896,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    intermediate_size=4864,
    max_position_embeddings=32768,
    rope_theta=1000000.0,
    tie_word_embeddings=True,
    rms_norm_eps=1e-6,
    attention_dropout=0.0,
    initializer_range=0.02,
    vocab_size=151936,
)
REAL_SHAPES = ("tldr", "pythia160m", "qwen05b")


@dataclass
class Args:
    shape: Literal["tiny", "tldr", "pythia160m", "qwen05b"] = "tiny"
    """tiny: the embedded task; tldr: real TL;DR prompts (<= --max-prompt-tokens), the Pythia tokenizer and a
    hidden-128 x 4-layer model; pythia160m / qwen05b: the same prompts with a Pythia-160M- / Qwen2.5-0.5B-shaped model"""
    qwen_layers: int = 24
    """qwen05b shape: layers of the Qwen2.5-0.5B-shaped model (24 in the real one; fewer to fit a CPU's time)"""
    repeats: int = 3
    """alternating runs of each implementation; the table shows medians"""
    num_updates: Optional[int] = None
    """PPO updates per run, the first being warm-up (default: tiny 6, tldr 4)"""
    per_device_train_batch_size: Optional[int] = None
    """micro-batch size (default: tiny 16, tldr 8)"""
    gradient_accumulation_steps: Optional[int] = None
    """micro-batches per update (default: tiny 4, tldr 1)"""
    local_rollout_forward_batch_size: Optional[int] = None
    """generation / rollout forward chunk (default: tiny 64, tldr 8)"""
    response_length: int = 53
    """new tokens per response"""
    num_ppo_epochs: int = 4
    """passes over the batch per update"""
    num_mini_batches: int = 1
    """optimizer steps per PPO epoch"""
    learning_rate: Optional[float] = None
    """learning rate of both (default: tiny 3e-5, tldr 3e-6)"""
    temperature: float = 0.7
    """sampling temperature"""
    missing_eos_penalty: Optional[float] = 1.0
    """subtracted from the score of responses without EOS (both); None for off"""
    seed: int = 42
    """seed of both"""
    num_threads: int = 1
    """OMP_NUM_THREADS / MKL_NUM_THREADS of both, and TRL's torch.set_num_threads"""
    bf16: bool = False
    """bf16 in both (ours: autocast; TRL: its bf16 flag); off: both fp32"""
    ours_extra_args: str = ""
    """extra arguments for ppo_rlhf.py only (e.g. to try an optimisation flag); shown in the results"""
    ours_script: str = "ppo_rlhf.py"
    """the script measured as ours; it is copied into --work-dir at the start and the copy runs, so edits made
    during the benchmark never mix two versions"""
    trl_python: Optional[str] = None
    """python of the TRL venv (default: .venv-trl/bin/python in the repository)"""
    skip_trl: bool = False
    """run ours only"""
    trl_gc_freeze: bool = False
    """also run TRL with the runner's --gc-freeze (skips the startup heap in TRL's two gc.collect() per update)"""
    max_prompt_tokens: int = 512
    """tldr shape: drop prompts longer than this many tokens"""
    max_prompts: Optional[int] = None
    """use only the first N prompts (quick checks)"""
    build_dir: Optional[str] = None
    """where the shape's tokenizer, models and prompts are built and cached (default: models/bench_<shape>)"""
    work_dir: str = "models/bench_runs"
    """where the runs write their outputs and logs"""
    results_dir: str = "benchmark/results"
    """where the markdown and JSON results go"""
    name: Optional[str] = None
    """file stem of the results (default: speed_<shape>, or scaling_<shape> with --scaling)"""
    ours_snapshot: tyro.conf.Suppress[Optional[str]] = None
    """filled in at runtime: the copy of --ours-script that runs"""
    scaling: bool = False
    """ours only: time per update for each --scaling-response-lengths (at the shape's batch) and each
    --scaling-batch-sizes (at --response-length)"""
    scaling_response_lengths: List[int] = field(default_factory=lambda: [16, 32, 53])
    """response lengths of the scaling table"""
    scaling_batch_sizes: List[int] = field(default_factory=lambda: [4, 8, 16])
    """batch sizes (episodes per update, one micro-batch) of the scaling table"""
    keep_runs: bool = False
    """keep each run's output folder (default: delete it once parsed; logs are kept)"""
    timeout: int = 7200
    """seconds before a run is killed"""
    targets: str = os.path.join(ROOT, "benchmark", "targets.json")
    """a JSON file of speed and memory targets per shape, checked under the table (none if absent)"""


def resolve(args: Args) -> Args:
    """Fill the shape's defaults and validate."""
    for key, value in SHAPES[args.shape].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.num_updates < 2:
        fail(f"--num-updates {args.num_updates}: need at least 2 (the first update is warm-up and not counted)")
    for name in (
        "repeats",
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "response_length",
        "local_rollout_forward_batch_size",
        "num_ppo_epochs",
        "num_mini_batches",
        "num_threads",
    ):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.scaling and args.shape != "tldr":
        fail("--scaling measures the tldr shape; pass --shape tldr")
    # The runs start in the repository root: hand them absolute paths.
    if args.qwen_layers < 1:
        fail(f"--qwen-layers must be >= 1, got {args.qwen_layers}")
    args.build_dir = args.build_dir or os.path.join("models", f"bench_{args.shape}")
    args.work_dir, args.build_dir = os.path.abspath(args.work_dir), os.path.abspath(args.build_dir)
    return args


# ----------------------------------------------------------------------------------------------------------------
# Task data and models


def tiny_task(args: Args) -> dict:
    paths = {
        "sft": os.path.join(common.EMBEDDED, "sft_model"),
        "reward": os.path.join(common.EMBEDDED, "reward_model"),
        "tokenizer": os.path.join(common.EMBEDDED, "sft_model"),
        "prompts": os.path.join(common.EMBEDDED, "prompts"),
    }
    info = {"prompts": "embedded/prompts train split"}
    if args.max_prompts:
        from datasets import DatasetDict, load_from_disk

        data = load_from_disk(paths["prompts"])
        subset = os.path.join(args.work_dir, f"tiny_prompts_{args.max_prompts}")
        DatasetDict(
            train=data["train"].select(range(min(args.max_prompts, len(data["train"])))),
            validation=data["validation"].select(range(16)),
        ).save_to_disk(subset)
        paths["prompts"] = subset
        info["prompts"] += f", first {args.max_prompts}"
    return {**paths, "info": info}


def model_spec(args: Args) -> tuple:
    """(architecture, config fields) of the shape's random-init policy and reward model."""
    if args.shape == "qwen05b":
        return "qwen2", dict(QWEN05B_MODEL, num_hidden_layers=args.qwen_layers)
    return "gpt_neox", PYTHIA160M_MODEL if args.shape == "pythia160m" else TLDR_MODEL


def build_tldr(args: Args) -> dict:
    """A real-prompt shape's tokenizer, random-init models and filtered prompts, built once and cached in
    --build-dir (the tldr, pythia160m and qwen05b shapes differ in the model only)."""
    if not (os.path.isfile(TLDR_PROMPTS) and os.path.isfile(NEOX_TOKENIZER)):
        return None
    import torch
    from datasets import Dataset, DatasetDict
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        CONFIG_MAPPING,
        PreTrainedTokenizerFast,
    )

    build = args.build_dir
    tok_dir, sft_dir, rm_dir = (os.path.join(build, n) for n in ("tokenizer", "sft_model", "reward_model"))
    arch, fields = model_spec(args)
    spec = {
        "arch": arch,
        "model": fields,
        "tokenizer_bytes": os.path.getsize(NEOX_TOKENIZER),
        "init_seed": 0,
        "version": 2,
    }
    spec_path = os.path.join(build, "build_info.json")
    cached = False
    if os.path.isfile(spec_path):
        with open(spec_path) as f:
            cached = json.load(f).get("spec") == spec
    if not cached:
        shutil.rmtree(build, ignore_errors=True)
        os.makedirs(build)
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_file=NEOX_TOKENIZER,
            eos_token="<|endoftext|>",
            bos_token="<|endoftext|>",
            unk_token="<|endoftext|>",
            padding_side="left",
        )
        tokenizer.add_special_tokens({"pad_token": "[PAD]"})
        if tokenizer.pad_token_id != 50277 or tokenizer.eos_token_id != 0:
            fail(
                f"unexpected token ids: pad {tokenizer.pad_token_id} (expected 50277), eos {tokenizer.eos_token_id} (0)"
            )
        vocab = fields.get("vocab_size") or math.ceil(len(tokenizer) / 128) * 128
        torch.manual_seed(spec["init_seed"])
        ids = dict(bos_token_id=0, eos_token_id=0, pad_token_id=tokenizer.pad_token_id)
        config = CONFIG_MAPPING[arch](**{**fields, "vocab_size": vocab}, **ids)
        policy = AutoModelForCausalLM.from_config(config)
        rm_config = config.to_dict()
        for key in ("id2label", "label2id"):
            rm_config.pop(key, None)
        rm_config.update(num_labels=1)
        reward = AutoModelForSequenceClassification.from_config(
            CONFIG_MAPPING[arch](
                **{
                    k: v
                    for k, v in rm_config.items()
                    if k not in ("model_type", "transformers_version", "architectures")
                }
            )
        )
        for model, path in ((policy, sft_dir), (reward, rm_dir)):
            model.save_pretrained(path)
            tokenizer.save_pretrained(path)
        tokenizer.save_pretrained(tok_dir)
        with open(spec_path, "w") as f:
            json.dump(
                {
                    "spec": spec,
                    "vocab_size": vocab,
                    "policy_params": sum(p.numel() for p in policy.parameters()),
                    "reward_params": sum(p.numel() for p in reward.parameters()),
                },
                f,
                indent=2,
            )
        del policy, reward
    built = json.load(open(spec_path))

    # Prompts of at most max_prompt_tokens tokens (the recipe's 512), in file order.
    prompts_dir = os.path.join(build, f"prompts_max{args.max_prompt_tokens}_n{args.max_prompts or 'all'}")
    lengths_path = os.path.join(prompts_dir, "prompt_lengths.json")
    stats_path = os.path.join(prompts_dir, "prompt_stats.json")
    if not (os.path.isfile(stats_path) and os.path.isfile(lengths_path)):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tok_dir)
        with open(TLDR_PROMPTS) as f:
            prompts = [json.loads(line)["prompt"] for line in f if line.strip()]
        lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
        kept = [(p, n) for p, n in zip(prompts, lengths) if n <= args.max_prompt_tokens][: args.max_prompts or None]
        shutil.rmtree(prompts_dir, ignore_errors=True)
        DatasetDict(
            train=Dataset.from_dict({"prompt": [p for p, _ in kept]}),
            validation=Dataset.from_dict({"prompt": [p for p, _ in kept[:16]]}),
        ).save_to_disk(prompts_dir)
        kept_lengths = sorted(n for _, n in kept)
        with open(lengths_path, "w") as f:
            json.dump([n for _, n in kept], f)
        with open(stats_path, "w") as f:
            json.dump(
                {
                    "prompts_in_file": len(prompts),
                    "prompts_kept": len(kept),
                    "max_prompt_tokens": args.max_prompt_tokens,
                    "median_tokens": statistics.median(kept_lengths),
                    "mean_tokens": statistics.fmean(kept_lengths),
                    "max_tokens": kept_lengths[-1],
                },
                f,
                indent=2,
            )
    return {
        "sft": sft_dir,
        "reward": rm_dir,
        "tokenizer": tok_dir,
        "prompts": prompts_dir,
        "info": {
            "prompts": "../shared/data/tldr (real Reddit TL;DR validation prompts)",
            **json.load(open(stats_path)),
            "vocab_size": built["vocab_size"],
            "policy_params": built["policy_params"],
            "reward_params": built["reward_params"],
            "arch": arch,
            "model": fields,
        },
        "prompt_lengths": json.load(open(lengths_path)) if os.path.isfile(lengths_path) else None,
    }


# ----------------------------------------------------------------------------------------------------------------
# The equal-work ceiling: how much faster ours can be than TRL at equal speed per FLOP


def forward_flops(dims: dict, rows_by_width: List[tuple], head_positions: int) -> float:
    """Forward FLOPs of a causal LM over padded batches: rows_by_width = [(rows, width), ...] (every position of a
    padded batch is computed, and with an explicit mask the attention is the full width x width), plus the LM head
    on head_positions positions. Matmuls count 2 FLOPs per multiply-add."""
    h, layers = dims["hidden_size"], dims["num_hidden_layers"]
    per_position = 2 * dims["matmul_params"]  # the layers' weight matmuls, per position
    positions = sum(r * w for r, w in rows_by_width)
    attention = sum(r * w * w for r, w in rows_by_width) * layers * 4 * dims["attention_width"]
    return positions * per_position + attention + head_positions * 2 * h * dims["vocab_size"]


def update_flops(dims: dict, prompt_lengths: List[int], response_length: int, epochs: int, groups) -> dict:
    """FLOPs of one PPO update on one micro-batch of prompts, for TRL 1.12's PPOTrainer and for ours, by phase.
    Random-init models never stop early, so every response is response_length tokens (ours computes up to stop + 1,
    here all of them). Backward = 2x forward. groups(lengths) -> list of row-index lists is ours' length grouping.

    TRL (trl/experimental/ppo/ppo_trainer.py): rollout log-probs come from generation's scores; then the reference
    (body + LM head), the value model and the reward model each run on the padded batch (prompts left-padded to the
    longest, responses full); training runs policy (body + LM head on every position) and value on the padded batch.
    Ours: the rollout runs policy + value, reference and reward, each in length groups trimmed of padding, the LM head
    on response positions only; training the same, per epoch. Generation is the same work in both: the prompt
    prefill on the padded batch, then one position per row per token with a KV cache."""
    b, r = len(prompt_lengths), response_length
    p_max = max(prompt_lengths)
    padded = [(b, p_max + r)]
    grouped = []
    for rows in groups([p + r for p in prompt_lengths]):
        grouped.append((len(rows), max(prompt_lengths[i] for i in rows) + r))
    h, layers = dims["hidden_size"], dims["num_hidden_layers"]
    decode = sum(
        b * (2 * dims["matmul_params"] + layers * 4 * dims["attention_width"] * (p_max + t)) for t in range(r)
    )
    generation = forward_flops(dims, [(b, p_max)], b) + decode + b * r * 2 * h * dims["vocab_size"]
    body_trl, body_ours = forward_flops(dims, padded, 0), forward_flops(dims, grouped, 0)
    head_trl, head_ours = forward_flops(dims, [], b * (p_max + r)), forward_flops(dims, [], b * r)
    trl = {
        "generation": generation,
        "rollout_forwards": 3 * body_trl + head_trl,
        "training": epochs * 3 * (2 * body_trl + head_trl),
    }
    ours = {
        "generation": generation,
        "rollout_forwards": 4 * body_ours + 2 * head_ours,
        "training": epochs * 3 * (2 * body_ours + head_ours),
    }
    return {"trl": trl, "ours": ours}


def model_dims(config: dict) -> dict:
    """What update_flops needs from a config: width, depth, vocabulary, the weight-matmul parameters of the layers
    (embeddings and LM head excluded) and the attention's query width."""
    h, layers, inter = config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or h // heads
    kv = config.get("num_key_value_heads") or heads
    attn = h * heads * head_dim + 2 * h * kv * head_dim + heads * head_dim * h  # q, k, v, o
    mlp = (3 if config.get("model_type") in ("qwen2", "llama", "mistral") else 2) * h * inter  # gated MLPs: 3
    return {
        "hidden_size": h,
        "num_hidden_layers": layers,
        "vocab_size": config["vocab_size"],
        "matmul_params": layers * (attn + mlp),
        "attention_width": heads * head_dim,
    }


def equal_work_ceiling(
    dims: dict,
    prompt_lengths: List[int],
    batch_size: int,
    response_length: int,
    epochs: int,
    samples: int = 2000,
    seed: int = 0,
) -> dict:
    """Expected FLOPs per update of TRL and ours over random batches of the prompts, and their ratio: the speed-up
    ours would show if both ran at the same FLOP/s (the equal-work ceiling of the measured ratio)."""
    import random

    import ppo_rlhf

    def groups(lengths):
        return ppo_rlhf.length_groups(lengths, ppo_rlhf.GROUP_OVERHEAD)

    rng = random.Random(seed)
    totals = {impl: {} for impl in ("trl", "ours")}
    for _ in range(samples):
        flops = update_flops(dims, rng.sample(prompt_lengths, batch_size), response_length, epochs, groups)
        for impl, phases in flops.items():
            for phase, value in phases.items():
                totals[impl][phase] = totals[impl].get(phase, 0.0) + value / samples
    trl_total, ours_total = sum(totals["trl"].values()), sum(totals["ours"].values())
    head = 2 * dims["hidden_size"] * dims["vocab_size"]
    return {
        "trl_tflop": {k: v / 1e12 for k, v in totals["trl"].items()},
        "ours_tflop": {k: v / 1e12 for k, v in totals["ours"].items()},
        "trl_total_tflop": trl_total / 1e12,
        "ours_total_tflop": ours_total / 1e12,
        "ceiling": trl_total / ours_total,
        "head_share_per_position": head / (head + 2 * dims["matmul_params"]),
    }


# ----------------------------------------------------------------------------------------------------------------
# Running and parsing


def run_settings(args: Args, task: dict, out_dir: str, **overrides) -> dict:
    """What both implementations are given for one run (common.FLAGS spells it for each); overrides: Args fields
    changed for this run (the scaling table's batch and response length)."""
    s = {**asdict(args), **overrides}
    batch = s["per_device_train_batch_size"] * s["gradient_accumulation_steps"]
    return {
        **{k: s[k] for k in (*common.PPO_SETTINGS, "seed", "bf16")},
        "output_dir": out_dir,
        "sft_model_path": task["sft"],
        "reward_model_path": task["reward"],
        "tokenizer": task["tokenizer"],
        "prompts": task["prompts"],
        "train_split": "train",
        "total_episodes": s["num_updates"] * batch,
        "stop_token": "eos",
        # ours only: no evaluation, samples or checkpoints, whose time TRL's runner does not spend
        "test_split": "validation",
        "overwrite_output_dir": True,
        "eval_strategy": "no",
        "num_sample_generations": 0,
        "save_steps": 0,
        # TRL only: where the runner writes its timings
        "results_json": os.path.join(out_dir, "trl_results.json"),
        "quiet": True,
    }


def ours_command(args: Args, task: dict, out_dir: str, **overrides) -> List[str]:
    program = [sys.executable, args.ours_snapshot]
    return common.command("ours", program, run_settings(args, task, out_dir, **overrides)) + shlex.split(
        args.ours_extra_args
    )


def trl_command(args: Args, task: dict, out_dir: str, gc_freeze: bool) -> List[str]:
    settings = {**run_settings(args, task, out_dir), "gc_freeze": gc_freeze}
    return common.command("trl", [args.trl_python, common.TRL_RUNNER], settings)


def ours_updates(out_dir: str) -> List[dict]:
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    updates = []
    for row in rows:
        if "time/update" not in row:
            continue
        u = {
            "update": row["update"],
            "update_s": row["time/update"],
            "generation_s": row["time/generation"],
            "rollout_forwards_s": row["time/rollout_forward"],
            "training_s": row["time/training"],
            "response_length": row.get("objective/response_length"),
        }
        u["other_s"] = u["update_s"] - u["generation_s"] - u["rollout_forwards_s"] - u["training_s"]
        updates.append(u)
    return updates


def trl_updates(out_dir: str) -> tuple:
    with open(os.path.join(out_dir, "trl_results.json")) as f:
        results = json.load(f)
    updates = [
        {
            "update": u["update"],
            "update_s": u["update_s"],
            "generation_s": u["generation_s"],
            "rollout_forwards_s": u["rollout_forwards_s"],
            "training_s": u["training_s"],
            "other_s": u["other_s"],
            "gc_collect_s": u.get("other_gc_collect_s"),
        }
        for u in results["per_update"]
    ]
    return updates, {
        "versions": results.get("versions"),
        "self_reported_peak_rss_mib": results.get("peak_rss_mib"),
        "derived": results.get("derived"),
    }


def summarize_updates(updates: List[dict], batch_size: int) -> dict:
    """Episodes/s and mean seconds per update and phase, excluding the first update (warm-up)."""
    timed = updates[1:]
    if not timed:
        return None
    total = sum(u["update_s"] for u in timed)
    out = {
        "updates_counted": len(timed),
        "episodes_per_s": batch_size * len(timed) / total,
        "update_s": total / len(timed),
    }
    for phase in PHASES:
        out[f"{phase}_s"] = sum(u[f"{phase}_s"] for u in timed) / len(timed)
    if all(u.get("gc_collect_s") is not None for u in timed):
        out["gc_collect_s"] = sum(u["gc_collect_s"] for u in timed) / len(timed)
    return out


def run_one(impl: str, args: Args, task: dict, env: dict, tag: str, **overrides) -> dict:
    """One measured run of `ours`, `trl` or `trl_gc_freeze`; returns its record (raises on failure)."""
    out_dir = os.path.join(args.work_dir, tag)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(out_dir)
    if impl == "ours":
        cmd = ours_command(args, task, out_dir, **overrides)
    else:
        cmd = trl_command(args, task, out_dir, gc_freeze=impl == "trl_gc_freeze")
    print(f"[speed_compare] {tag}: running {impl} ...", flush=True)
    rec = {
        "impl": impl,
        "tag": tag,
        "command": shlex.join(cmd),
        **run_measured(cmd, env, os.path.join(args.work_dir, "logs", tag + ".log"), args.timeout),
    }
    if rec["returncode"] != 0:
        tail = common.log_tail(rec["log"])
        raise RuntimeError(f"{impl} run {tag} failed ({rec['returncode']}); log {rec['log']}:\n{tail}")
    s = {**asdict(args), **overrides}
    batch = s["per_device_train_batch_size"] * s["gradient_accumulation_steps"]
    if impl == "ours":
        rec["per_update"] = ours_updates(out_dir)
    else:
        rec["per_update"], rec["trl"] = trl_updates(out_dir)
    rec["summary"] = summarize_updates(rec["per_update"], batch)
    if not args.keep_runs:
        shutil.rmtree(out_dir, ignore_errors=True)
    s = rec["summary"]
    print(
        f"[speed_compare] {tag}: {s['episodes_per_s']:.2f} episodes/s, {s['update_s']:.3f} s/update (gen "
        f"{s['generation_s']:.3f}, rollout fwd {s['rollout_forwards_s']:.3f}, train {s['training_s']:.3f}, other "
        f"{s['other_s']:.3f}), peak RSS {rec['peak_rss_mib']:.0f} MiB, wall {rec['wall_s']:.0f} s, CPU share "
        f"{rec['cpu_share'] or float('nan'):.2f}",
        flush=True,
    )
    return rec


# ----------------------------------------------------------------------------------------------------------------
# Tables

LABELS = {"ours": "ours (ppo_rlhf.py)", "trl": "TRL 1.12.0 PPOTrainer", "trl_gc_freeze": "TRL 1.12.0 + gc.freeze()"}
METRICS = [
    "episodes_per_s",
    "update_s",
    "generation_s",
    "rollout_forwards_s",
    "training_s",
    "other_s",
    "peak_rss_mib",
    "episodes_per_cpu_s",
]
HEADERS = [
    "episodes/s",
    "s/update",
    "generation",
    "rollout forwards",
    "training",
    "other",
    "peak RSS (MiB)",
    "episodes per CPU-second (est.)",
]


def run_value(rec: dict, metric: str) -> Optional[float]:
    if metric == "peak_rss_mib":
        return rec["peak_rss_mib"]
    if metric == "episodes_per_cpu_s":  # an estimate: episodes/s over the share of a core the whole process got
        share = rec.get("cpu_share")
        return rec["summary"]["episodes_per_s"] / share if share else None
    return rec["summary"][metric]


def aggregate(runs: List[dict], impls: List[str]) -> dict:
    """Medians over repeats per implementation, and medians of the per-repeat ratios ours / each other one."""
    agg = {"medians": {}, "ratios_vs_ours": {}}
    for impl in impls:
        recs = [r for r in runs if r["impl"] == impl]
        agg["medians"][impl] = {
            m: (
                statistics.median(run_value(r, m) for r in recs)
                if all(run_value(r, m) is not None for r in recs)
                else None
            )
            for m in METRICS
        }
        agg["medians"][impl]["repeats"] = len(recs)
        if "gc_collect_s" in recs[0]["summary"]:
            agg["medians"][impl]["gc_collect_s"] = statistics.median(r["summary"]["gc_collect_s"] for r in recs)
    ours = [r for r in runs if r["impl"] == "ours"]
    for impl in impls:
        if impl == "ours":
            continue
        others = [r for r in runs if r["impl"] == impl]
        pairs = list(zip(ours, others))  # repeat i of ours with repeat i of the other (adjacent in time)
        agg["ratios_vs_ours"][impl] = {
            m: {
                "median": statistics.median(run_value(a, m) / run_value(b, m) for a, b in pairs),
                "per_repeat": [run_value(a, m) / run_value(b, m) for a, b in pairs],
            }
            for m in METRICS
            if all(run_value(a, m) is not None and run_value(b, m) for a, b in pairs)
        }
    return agg


def fmt(value: float, metric: str) -> str:
    if value is None:
        return "n/a"
    if metric == "peak_rss_mib":
        return f"{value:.0f}"
    if metric in ("episodes_per_s", "episodes_per_cpu_s"):
        return f"{value:.2f}"
    return f"{value:.3f}"


def targets_lines(a: dict, speed: float, mem: float, cpu_note: str, ceiling: Optional[dict]) -> List[str]:
    """Each target of --targets for this shape, met or not, with the measured ratio."""
    if not a.get("targets") or not os.path.isfile(a["targets"]):
        return []
    with open(a["targets"]) as f:
        shape = json.load(f).get(a["shape"])
    if not shape:
        return []
    of_ceiling = speed / ceiling["ceiling"] if ceiling else None
    measured = {
        "episodes_per_s": (speed, f"{speed:.2f}x{cpu_note}"),
        "peak_rss_mib": (mem, f"{mem:.2f}x"),
        "of_ceiling": (of_ceiling, "n/a" if of_ceiling is None else f"{of_ceiling:.0%}"),
    }
    checks = []
    for target in shape["targets"]:
        value, shown = measured[target["ratio"]]
        met = value is not None and target.get("at_least", -math.inf) <= value <= target.get("at_most", math.inf)
        checks.append(f"{target['text']}: **{'met' if met else 'not met'}** ({shown})")
    return ["", f"{shape['title']} at this shape: " + "; ".join(checks) + "."]


def speed_markdown(results: dict) -> str:
    a, m, agg = results["settings"], results["machine"], results["aggregate"]
    lines = [
        f"### Speed, {a['shape']} shape ({m['date']})",
        "",
        f"Machine: {m['nproc']} CPUs ({m['cpu_model']}), {a['num_threads']} thread(s) per run, torch {m['torch']}, "
        f"transformers {m['transformers']}, TRL {results.get('trl_version') or 'not run'}; commit "
        f"{(m['commit'] or '?')[:10]}{' + uncommitted ppo_rlhf.py changes' if m['ppo_rlhf_py_uncommitted_changes'] else ''}; "
        f"load average at start {m['load_average_at_start'][0]:.1f}.",
        "",
        f"Settings (both): batch {a['per_device_train_batch_size']}x{a['gradient_accumulation_steps']} "
        f"(= {a['per_device_train_batch_size'] * a['gradient_accumulation_steps']} episodes/update), rollout chunk "
        f"{a['local_rollout_forward_batch_size']}, response length {a['response_length']}, {a['num_ppo_epochs']} PPO "
        f"epochs, {a['num_mini_batches']} mini-batch(es), stop token EOS, temperature {a['temperature']}, lr "
        f"{a['learning_rate']}, missing_eos_penalty {a['missing_eos_penalty']}, seed {a['seed']}, "
        f"{'bf16' if a['bf16'] else 'fp32'}; {a['num_updates']} updates per run, the first excluded as warm-up; "
        f"{a['repeats']} alternating repeats, medians."
        + (f" Ours with extra args `{a['ours_extra_args']}`." if a["ours_extra_args"] else ""),
        "",
        "Task: " + ", ".join(f"{k} {v}" for k, v in results["task"].items() if k != "model") + ".",
        "",
        "| implementation | " + " | ".join(HEADERS) + " |",
        "|---" * (len(HEADERS) + 1) + "|",
    ]
    for impl, med in agg["medians"].items():
        lines.append(f"| {LABELS[impl]} | " + " | ".join(fmt(med[k], k) for k in METRICS) + " |")
    for impl, ratios in agg["ratios_vs_ours"].items():
        lines.append(
            f"| **ours / {LABELS[impl]}** | "
            + " | ".join(f"**{ratios[k]['median']:.3g}x**" if k in ratios else "n/a" for k in METRICS)
            + " |"
        )
    lines += [
        "",
        "Time columns are seconds per update (generation / rollout forwards / training / other = the rest of "
        "the update: GAE, masks, stats, logging; TRL's includes its two gc.collect() per update"
        + (
            ", median {:.3f} s".format(agg["medians"]["trl"]["gc_collect_s"])
            if "trl" in agg["medians"] and "gc_collect_s" in agg["medians"]["trl"]
            else ""
        )
        + "). Peak RSS is the whole process, by "
        f"{results['runs'][0]['rss_method']}. Ratios are ours/TRL per repeat (adjacent runs), median over repeats: "
        "above 1 is faster for episodes/s, below 1 is less for time and memory. Episodes per CPU-second is an "
        "estimate for a shared machine: episodes/s divided by the process's CPU seconds per wall second (setup "
        "included), i.e. what the run would do with its cores to itself; the measured columns are the others.",
    ]
    if "trl" in agg["ratios_vs_ours"]:
        r = agg["ratios_vs_ours"]["trl"]
        speed, mem = r["episodes_per_s"]["median"], r["peak_rss_mib"]["median"]
        cpu = r.get("episodes_per_cpu_s")
        cpu_note = f", {cpu['median']:.2f}x per CPU-second" if cpu else ""
        ceiling = results.get("ceiling")
        if ceiling:
            t, o = ceiling["trl_tflop"], ceiling["ours_tflop"]
            lines += [
                "",
                f"Equal-work ceiling (FLOPs of one update, expected over random batches of these prompts; "
                f"benchmark/speed_compare.py `update_flops`): TRL {ceiling['trl_total_tflop']:.2f} TFLOP "
                f"(generation {t['generation']:.2f}, rollout forwards {t['rollout_forwards']:.2f}, training "
                f"{t['training']:.2f}), ours {ceiling['ours_total_tflop']:.2f} (generation {o['generation']:.2f}, "
                f"rollout forwards {o['rollout_forwards']:.2f}, training {o['training']:.2f}): ceiling "
                f"**{ceiling['ceiling']:.2f}x**; measured/ceiling **{speed / ceiling['ceiling']:.0%}**. The LM "
                f"head is {ceiling['head_share_per_position']:.0%} of the FLOPs of a position.",
            ]
        lines += targets_lines(a, speed, mem, cpu_note, ceiling)
    lines += [
        "",
        "Per run, in the order run (CPU share = the process's CPU seconds / its wall seconds, setup included: "
        f"below {a['num_threads']} means it waited for a core on the shared machine):",
        "",
        "| run | episodes/s | s/update | peak RSS (MiB) | CPU share | load avg before |",
        "|---|---|---|---|---|---|",
    ]
    for rec in results["runs"]:
        share = rec.get("cpu_share")
        lines.append(
            f"| {rec['tag']} | {rec['summary']['episodes_per_s']:.2f} | {rec['summary']['update_s']:.3f} | "
            f"{rec['peak_rss_mib']:.0f} | {'n/a' if share is None else f'{share:.2f}'} | "
            f"{rec['load_average_1min_before']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def scaling_table(runs: List[dict]) -> List[dict]:
    """One row per (batch, response length): the fastest of its repeats (other jobs on a shared machine only ever
    add time), with the median over repeats and the CPU share of the fastest run for reference."""
    table = []
    for key in dict.fromkeys((r["batch_size"], r["response_length"]) for r in runs):
        recs = [r for r in runs if (r["batch_size"], r["response_length"]) == key]
        best = min(recs, key=lambda r: r["summary"]["update_s"])
        row = {
            "batch_size": key[0],
            "response_length": key[1],
            "repeats": len(recs),
            "fastest": best["tag"],
            "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in recs),
            "cpu_share": best.get("cpu_share"),
            "median_update_s": statistics.median(r["summary"]["update_s"] for r in recs),
        }
        row.update(
            {
                k: best["summary"][k]
                for k in ("update_s", "generation_s", "rollout_forwards_s", "training_s", "other_s")
            }
        )
        table.append(row)
    return table


def scaling_markdown(results: dict) -> str:
    a, m = results["settings"], results["machine"]
    lines = [
        f"### Scaling of ours, tldr shape ({m['date']})",
        "",
        f"Machine: {m['nproc']} CPUs ({m['cpu_model']}), {a['num_threads']} thread(s), torch {m['torch']}; load "
        f"average at start {m['load_average_at_start'][0]:.1f}. Ours only: {a['num_ppo_epochs']} PPO epochs, one "
        f"micro-batch per update, {'bf16' if a['bf16'] else 'fp32'}, {a['num_updates']} updates per run (the first "
        f"excluded), {a['repeats']} repeat(s) of every configuration in alternating order; each row is the "
        "fastest repeat (other jobs on the shared machine only add time; its CPU share says whether it had a core "
        "to itself), with the median over repeats beside it.",
        "",
        "| batch | response length | s/update | generation | rollout forwards | training | other | s per episode | "
        "ms per response token | CPU share | median s/update | peak RSS (MiB) |",
        "|---" * 12 + "|",
    ]
    for row in results["table"]:
        tokens = row["batch_size"] * row["response_length"]
        share = row.get("cpu_share")
        lines.append(
            f"| {row['batch_size']} | {row['response_length']} | {row['update_s']:.3f} | {row['generation_s']:.3f} | "
            f"{row['rollout_forwards_s']:.3f} | {row['training_s']:.3f} | {row['other_s']:.3f} | "
            f"{row['update_s'] / row['batch_size']:.3f} | {1000 * row['update_s'] / tokens:.1f} | "
            f"{'n/a' if share is None else f'{share:.2f}'} | {row['median_update_s']:.3f} | "
            f"{row['peak_rss_mib']:.0f} |"
        )
    lines += [
        "",
        "Linear in batch size shows as a flat `s per episode` column over the batch rows; linear in response "
        "length as s/update growing by a constant per extra token (every forward also pays for the prompt, up to "
        "512 tokens, a fixed cost per episode, so `ms per response token` falls as responses get longer).",
    ]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------------


def main(args: Args) -> Optional[dict]:
    args = resolve(args)
    os.makedirs(args.work_dir, exist_ok=True)
    if args.shape == "tiny":
        task = tiny_task(args)
    else:
        task = build_tldr(args)
        if task is None:
            print(
                f"[speed_compare] SKIPPED: the {args.shape} shape needs {TLDR_PROMPTS} and {NEOX_TOKENIZER} (../shared/data "
                "next to the repository); it is absent here."
            )
            return None
    env = common.run_env(args.num_threads, args.work_dir)
    machine = common.machine_info()
    args.ours_snapshot, machine["ours_script_sha256"] = common.snapshot_script(args.ours_script, args.work_dir)
    settings = asdict(args)

    if args.scaling:
        configs = [(args.per_device_train_batch_size, r) for r in args.scaling_response_lengths]
        configs += [
            (b, args.response_length) for b in args.scaling_batch_sizes if (b, args.response_length) not in configs
        ]
        runs = []
        for repeat in range(args.repeats):
            for batch, length in configs if repeat % 2 == 0 else configs[::-1]:
                rec = run_one(
                    "ours",
                    args,
                    task,
                    env,
                    f"scaling_b{batch}_r{length}_r{repeat}",
                    per_device_train_batch_size=batch,
                    gradient_accumulation_steps=1,
                    local_rollout_forward_batch_size=batch,
                    response_length=length,
                )
                rec.update(batch_size=batch, response_length=length, repeat=repeat)
                runs.append(rec)
        table = scaling_table(runs)
        results = {
            "kind": "scaling",
            "machine": {**machine, "load_average_at_end": os.getloadavg()},
            "settings": settings,
            "task": task["info"],
            "table": table,
            "runs": runs,
        }
        stem = args.name or f"scaling_{args.shape}"
        common.write_results(args.results_dir, stem, results, scaling_markdown(results), "speed_compare")
        return results

    ceiling = None
    if task.get("prompt_lengths"):
        with open(os.path.join(task["sft"], "config.json")) as f:
            config = json.load(f)
        ceiling = equal_work_ceiling(
            model_dims(config),
            task["prompt_lengths"],
            args.per_device_train_batch_size * args.gradient_accumulation_steps,
            args.response_length,
            args.num_ppo_epochs,
        )
        print(
            f"[speed_compare] equal-work ceiling {ceiling['ceiling']:.2f}x (TRL {ceiling['trl_total_tflop']:.2f} vs "
            f"ours {ceiling['ours_total_tflop']:.2f} TFLOP per update)",
            flush=True,
        )
    impls = ["ours"]
    trl_version = None
    if not args.skip_trl:
        args.trl_python = args.trl_python or default_trl_python()
        ok, trl_version = trl_available(args.trl_python)
        if ok:
            impls += ["trl"] + (["trl_gc_freeze"] if args.trl_gc_freeze else [])
        else:
            print(f"[speed_compare] TRL SKIPPED: {trl_version}; measuring ours only.")
            trl_version = None
    runs = []
    for repeat in range(args.repeats):
        order = impls if repeat % 2 == 0 else impls[::-1]  # ABBA: a drifting load falls on both alike
        for impl in order:
            rec = run_one(impl, args, task, env, f"{args.shape}_{impl}_r{repeat}")
            rec["repeat"] = repeat
            runs.append(rec)
    results = {
        "kind": "speed",
        "machine": {**machine, "load_average_at_end": os.getloadavg()},
        "settings": settings,
        "task": task["info"],
        "trl_version": trl_version,
        "implementations": impls,
        "ceiling": ceiling,
        "aggregate": aggregate(runs, impls),
        "runs": runs,
    }
    stem = args.name or f"speed_{args.shape}"
    common.write_results(args.results_dir, stem, results, speed_markdown(results), "speed_compare")
    return results


if __name__ == "__main__":
    main(tyro.cli(Args))
