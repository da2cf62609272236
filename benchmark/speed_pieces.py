"""What each piece of ppo_rlhf.py's speed and memory machinery buys at the Pythia-160M shape (GPT-NeoX, hidden 768,
12 layers, vocabulary 50,304; batches of 8 real TL;DR prompts + 53-token responses): small one-core measurements.

    python benchmark/speed_pieces.py --part flops                     # length groups: FLOPs of an update, grouped vs padded
    python benchmark/speed_pieces.py --part head                      # the LM head's log-probs: chunked vs plain, CPU s
    python benchmark/speed_pieces.py --part train --variant chunked   # one policy forward + backward: CPU s, peak RSS
    python benchmark/speed_pieces.py --part train --variant plain     # (one variant per process, for its peak RSS)

`--script PATH` measures another version of ppo_rlhf.py (e.g. `git show <commit>:ppo_rlhf.py > /tmp/old.py`).
`train` holds the policy only (weights, gradients, activations; no optimizer, no value model) to stay small; a
training micro-batch runs the value model's backbone too, about the same work again. Times are process CPU seconds
with one thread, so other load on the machine costs little; peak memory is the process's peak RSS.
"""

import importlib.util
import os
import random
import statistics
import time
from dataclasses import dataclass
from typing import Literal

import torch
import tyro

import common
import speed_compare
from common import ROOT


@dataclass
class Args:
    part: Literal["flops", "head", "train"]
    """flops: length groups' FLOPs; head: the LM head's log-probs alone; train: one policy forward + backward"""
    variant: Literal["chunked", "plain", "grouped", "padded"] = "chunked"
    """train: chunked (length groups + chunked log-probs), plain (neither), grouped (groups + plain head),
    padded (one padded batch + chunked log-probs)"""
    script: str = os.path.join(ROOT, "ppo_rlhf.py")
    """the ppo_rlhf.py to measure"""
    batch_size: int = 8
    """prompts per micro-batch"""
    response_length: int = 53
    """response tokens"""
    repeats: int = 5
    """head: rounds of every variant in turn"""
    samples: int = 2000
    """flops: random batches of prompts averaged over"""
    seed: int = 0
    """which prompts form the batch"""


def load_script(path: str):
    spec = importlib.util.spec_from_file_location("ppo_rlhf_measured", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def prompt_lengths() -> list:
    """Token counts of the real TL;DR prompts of at most 512 tokens (GPT-NeoX-20B tokenizer), in file order."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(common.NEOX_TOKENIZER)
    prompts = [row["prompt"] for row in common.read_jsonl(common.TLDR_PROMPTS)]
    lengths = [len(e.ids) for e in tokenizer.encode_batch(prompts, add_special_tokens=False)]
    return [n for n in lengths if n <= 512]


def config():
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(**speed_compare.PYTHIA160M_MODEL, vocab_size=50304, bos_token_id=0, eos_token_id=0)


def flops(args: Args, ppo) -> None:
    """Expected FLOPs of one update (speed_compare.update_flops, 4 PPO epochs) over random batches of the prompts."""
    dims = speed_compare.model_dims({**config().to_dict(), "model_type": "gpt_neox"})
    lengths = prompt_lengths()
    splits = {
        "padded (one group)": lambda lens: ppo.length_groups(lens, None),
        "length_groups, overhead GROUP_OVERHEAD": lambda lens: ppo.length_groups(lens, ppo.GROUP_OVERHEAD),
        "one row per forward": lambda lens: [[i] for i in range(len(lens))],
    }
    rng = random.Random(args.seed)
    batches = [rng.sample(lengths, args.batch_size) for _ in range(args.samples)]
    print(f"{len(lengths)} prompts, median {statistics.median(lengths)} tokens; batch {args.batch_size}")
    base = None
    for name, groups in splits.items():
        total = positions = calls = 0.0
        for batch in batches:
            f = speed_compare.update_flops(dims, batch, args.response_length, 4, groups)["ours"]
            total += sum(f.values()) / len(batches)
            split = groups([p + args.response_length for p in batch])
            positions += sum(len(g) * max(batch[i] + args.response_length for i in g) for g in split) / len(batches)
            calls += len(split) / len(batches)
        base = base or total
        print(
            f"{name}: {total / 1e12:.2f} TFLOP per update ({1 - total / base:+.1%} saved vs padded), "
            f"{positions:.0f} positions and {calls:.2f} forward calls per forward of the batch"
        )


def head(args: Args, ppo) -> None:
    """CPU seconds of log-probs + entropy + backward at the response positions, chunked vs plain, alternating."""
    torch.manual_seed(args.seed)
    vocab, width = 50304, 768
    hidden = torch.randn(args.batch_size, args.response_length, width)
    lm_head = torch.nn.Linear(width, vocab, bias=False)
    torch.nn.init.normal_(lm_head.weight, std=0.02)
    tokens = torch.randint(0, vocab, hidden.shape[:2])
    times = {False: [], True: []}
    for _ in range(args.repeats):
        for chunked in (True, False):
            h = hidden.clone().requires_grad_(True)
            lm_head.weight.grad = None
            start = time.process_time()
            logprobs, _ = ppo.response_logprobs(lm_head, h, tokens, 0.7, chunked)
            logprobs.sum().backward()
            times[chunked].append(time.process_time() - start)
    for chunked, t in times.items():
        print(f"head {'chunked' if chunked else 'plain'}: median {statistics.median(t):.3f} CPU s ({t})")


def train(args: Args, ppo) -> None:
    """One policy forward + backward over a batch of real prompt lengths, as a PPO epoch runs it."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(args.seed)
    policy = AutoModelForCausalLM.from_config(config()).train()
    lengths = random.Random(args.seed).sample(prompt_lengths(), args.batch_size)
    width = max(lengths) + args.response_length
    ids = torch.randint(1, 50000, (args.batch_size, width))
    mask = torch.zeros(args.batch_size, width, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, max(lengths) - n :] = 1
    needed = torch.full((args.batch_size,), args.response_length)
    overhead = ppo.GROUP_OVERHEAD if args.variant in ("chunked", "grouped") else None
    chunked = args.variant in ("chunked", "padded")
    base_rss = common.peak_rss_mib()
    times = []
    for _ in range(2):  # the first one warms up
        policy.zero_grad(set_to_none=True)
        start = time.process_time()
        logprobs, _ = ppo.policy_logprobs(policy, ids, mask, max(lengths), 0.7, needed, overhead, chunked)
        logprobs.sum().backward()
        times.append(time.process_time() - start)
    peak = common.peak_rss_mib()
    print(
        f"train {args.variant}: prompts {sorted(lengths)}; {times[-1]:.2f} CPU s (warm-up {times[0]:.2f}); "
        f"peak RSS {peak:.0f} MiB ({peak - base_rss:+.0f} over the model)"
    )


if __name__ == "__main__":
    args = tyro.cli(Args)
    torch.set_num_threads(1)
    ppo = load_script(args.script)
    {"flops": flops, "head": head, "train": train}[args.part](args, ppo)
