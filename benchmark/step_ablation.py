"""What each speed optimisation of ppo_rlhf.py buys: one PPO training micro-batch and one generation, timed with each
optimisation switched off and on, in one process, alternating, on the same inputs.

    python benchmark/step_ablation.py --shape tldr     # real TL;DR prompts, 50k vocabulary (needs ../shared/data)
    python benchmark/step_ablation.py --shape tiny     # the embedded task

Training micro-batch = the PolicyAndValue forward of a batch of prompts + responses sampled from the policy (stopped at
EOS, computed up to each row's stop token + 1 as in the script), a PPO-like loss on the log-probs and values, backward,
gradient clipping and an AdamW step, as in the script's PPO epochs. The table also gives the token positions the
backbones compute: the padded batch (plain; TRL pads further, to the longest generated response) vs the length groups.
Variants, each adding one step to the previous one:
  plain               one padded forward, full-vocabulary logits -> log_softmax -> gather, AdamW looping over tensors
  + length groups     rows forwarded in groups of similar length, each trimmed of its padding (--length-grouping)
  + chunked logprobs  the LM head + log-softmax + entropy in chunks of positions, logits never whole (--chunked-logprobs)
  + fused AdamW       one AdamW kernel for all parameters (the script's default outside DeepSpeed)
  + bf16 autocast     --bf16 (a different precision: compared with TRL's bf16 in speed_compare.py --bf16)
Generation: torch.multinomial vs the script's inverse-CDF sample_tokens, same KV-cached sampler otherwise.

Times are process CPU seconds (one thread), the median over --repeats rounds that run every variant once in turn, so
that other load on the machine costs all variants alike. The models and prompts are speed_compare.py's (the tldr shape's
are built once and cached in models/bench_tldr).
"""

import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Literal

import torch
import tyro

import common  # noqa: F401  (puts the repository root on sys.path)
import ppo_rlhf
from common import ROOT


@dataclass
class Args:
    shape: Literal["tiny", "tldr"] = "tldr"
    """tiny: the embedded models and prompts; tldr: real TL;DR prompts and the 50k-vocabulary models"""
    batch_size: int = 8
    """rows of the training micro-batch and of the generation batch"""
    response_length: int = 53
    """response tokens"""
    repeats: int = 5
    """rounds; each times every variant once"""
    build_dir: str = "models/bench_tldr"
    """where speed_compare.py caches the tldr shape's models and prompts"""
    results_dir: str = os.path.join(ROOT, "benchmark", "results")
    """where step_ablation_<shape>.md is written"""


def load(args: Args):
    """The shape's tokenizer, prompts and model loaders, from speed_compare.py's task builders (the same files)."""
    import speed_compare
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    bench = speed_compare.resolve(speed_compare.Args(shape=args.shape, build_dir=os.path.join(ROOT, args.build_dir)))
    task = speed_compare.build_tldr(bench) if args.shape == "tldr" else speed_compare.tiny_task(bench)
    if task is None:
        sys.exit("error: --shape tldr needs ../shared/data (the TL;DR prompts and the GPT-NeoX tokenizer)")
    tokenizer = AutoTokenizer.from_pretrained(task["tokenizer"])
    data = load_from_disk(task["prompts"])["train"]
    prompts = [tokenizer(p)["input_ids"] for p in data["prompt"][: args.batch_size]]
    return (
        tokenizer,
        prompts,
        (lambda: AutoModelForCausalLM.from_pretrained(task["sft"])),
        (lambda: AutoModelForSequenceClassification.from_pretrained(task["reward"])),
    )


def main(args: Args) -> None:
    torch.set_num_threads(1)
    tokenizer, prompts, load_policy, load_value = load(args)
    queries, query_mask = ppo_rlhf.left_pad(prompts, tokenizer.pad_token_id)
    # Responses sampled from the policy, stopped at EOS as in the rollout (the tldr shape's random-init policy never
    # samples EOS: 53 tokens); the training step computes what the script's does: up to each row's stop token + 1.
    policy = load_policy().eval()
    responses = ppo_rlhf.generate(
        policy,
        queries,
        query_mask,
        args.response_length,
        0.7,
        tokenizer.eos_token_id,
        torch.Generator().manual_seed(0),
    )
    _, sequence_lengths = ppo_rlhf.truncate_after_stop(responses, tokenizer.eos_token_id, tokenizer.pad_token_id)
    needed = (sequence_lengths + 2).clamp(max=responses.shape[1])
    context_length = queries.shape[1]
    query_responses = torch.cat([queries, responses], 1)[:, : context_length + int(needed.max())]
    attention_mask = torch.cat([query_mask, torch.ones_like(responses)], 1)[:, : context_length + int(needed.max())]
    weights = torch.linspace(-1, 1, needed.numel() * int(needed.max())).view(len(needed), -1)
    # Token positions the backbones compute per forward: the padded batch (trimmed of shared left padding, as the
    # plain path and TRL do) vs the length groups. Training time is about proportional to it.
    lengths = (context_length + needed - ppo_rlhf.first_true_indices(query_mask.bool())).tolist()
    positions = {
        "padded": len(lengths) * max(lengths),
        "grouped": sum(len(rows) * max(lengths[i] for i in rows) for rows in ppo_rlhf.length_groups(lengths)),
        "real": sum(lengths),
    }

    variants = {  # name: (group overhead, chunked, fused AdamW, bf16)
        "plain": (None, False, False, False),
        "+ length groups": (ppo_rlhf.GROUP_OVERHEAD, False, False, False),
        "+ chunked logprobs": (ppo_rlhf.GROUP_OVERHEAD, True, False, False),
        "+ fused AdamW": (ppo_rlhf.GROUP_OVERHEAD, True, True, False),
        "+ bf16 autocast": (ppo_rlhf.GROUP_OVERHEAD, True, True, True),
    }
    setups = {}
    for name, (overhead, chunked, fused, bf16) in variants.items():
        torch.manual_seed(0)
        model = ppo_rlhf.PolicyAndValue(load_policy(), load_value(), overhead, chunked).train()
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=1e-6, eps=1e-5, weight_decay=0.0, fused=fused, foreach=None if fused else False
        )
        setups[name] = (model, optimizer, bf16)

    def train_step(name: str) -> float:
        model, optimizer, bf16 = setups[name]
        start = time.process_time()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logprobs, _, values = model(query_responses, attention_mask, context_length, 0.7, needed)
        ((logprobs.exp() * weights).sum() + ((values - weights) ** 2).sum()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        return time.process_time() - start

    sample = ppo_rlhf.sample_tokens

    def generate(multinomial: bool) -> float:
        ppo_rlhf.sample_tokens = (
            (lambda probs, gen: torch.multinomial(probs, 1, generator=gen)) if multinomial else sample
        )
        start = time.process_time()
        ppo_rlhf.generate(
            policy, queries, query_mask, args.response_length, 0.7, None, torch.Generator().manual_seed(1)
        )
        ppo_rlhf.sample_tokens = sample
        return time.process_time() - start

    for name in variants:  # warm-up
        train_step(name)
    generate(True), generate(False)
    times = {
        name: [] for name in [*variants, "generation: torch.multinomial", "generation: inverse-CDF sample_tokens"]
    }
    for _ in range(args.repeats):
        for name in variants:
            times[name].append(train_step(name))
        times["generation: torch.multinomial"].append(generate(True))
        times["generation: inverse-CDF sample_tokens"].append(generate(False))

    lines = [
        f"shape {args.shape}: {len(prompts)} prompts (query width {context_length}, mean "
        f"{query_mask.sum(1).float().mean():.0f} tokens), {args.response_length}-token responses, vocabulary "
        f"{len(tokenizer)}, 1 thread, median CPU seconds over {args.repeats} rounds "
        f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})",
        "",
        f"Token positions per forward of the micro-batch: {positions['padded']} padded, {positions['grouped']} in "
        f"length groups, {positions['real']} real (responses of {float(sequence_lengths.float().mean()) + 1:.1f} "
        f"tokens on average, computed up to each row's stop token + 1).",
        "",
        "| step | s | vs plain / multinomial |",
        "|---|---|---|",
    ]
    base = statistics.median(times["plain"])
    for name, values in times.items():
        if name.startswith("generation"):
            base = statistics.median(times["generation: torch.multinomial"])
        median = statistics.median(values)
        lines.append(f"| {name} | {median:.3f} | {base / median:.2f}x |")
    print("\n".join(lines))
    with open(os.path.join(args.results_dir, f"step_ablation_{args.shape}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main(tyro.cli(Args))
