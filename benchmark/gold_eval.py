"""Gold-judge evaluation of policies on the embedded task's held-out prompts.

    python benchmark/gold_eval.py --models embedded/sft_model models/ppo_tiny

Generates near-greedy completions with plain Hugging Face `generate` (an implementation independent of the
training scripts' sampler), scores them with the embedded gold judge, and reports each model's mean gold score and
win rate against the first model (ties count half, 95% Wilson interval). Completions can be saved as jsonl in
the judge's format (query, response, reference, score).
"""

import json
import os
from dataclasses import dataclass, field
from typing import List, Optional

import torch

import common  # noqa: F401  (puts the repository root on sys.path)
from judge import judge_gold
from tiny_tldr import gold_score


@dataclass
class Args:
    models: List[str] = field(default_factory=lambda: ["embedded/sft_model"])
    """policies to evaluate; the first is the baseline for win rates"""
    dataset_name: str = "embedded/prompts"
    """save_to_disk folder with `prompt` (and `completion` references)"""
    split: str = "test"
    """the held-out split"""
    num_prompts: int = 200
    """how many prompts of the split"""
    response_length: int = 53
    """maximum new tokens"""
    temperature: float = 0.01
    """near-greedy, as in the published evaluations"""
    batch_size: int = 64
    """prompts per generate call"""
    seed: int = 0
    """sampling seed"""
    save_dir: Optional[str] = None
    """write <save_dir>/<i>_<model name>.jsonl for each model"""


@torch.no_grad()
def generate_completions(
    model_path: str,
    prompts: List[str],
    response_length: int = 53,
    temperature: float = 0.01,
    batch_size: int = 64,
    seed: int = 0,
) -> List[str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    torch.manual_seed(seed)
    out = []
    for i in range(0, len(prompts), batch_size):
        enc = tokenizer(prompts[i : i + batch_size], padding=True, return_tensors="pt", add_special_tokens=False)
        tokens = model.generate(
            **enc,
            max_new_tokens=response_length,
            do_sample=True,
            temperature=temperature,
            top_k=0,
            top_p=1.0,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        out += tokenizer.batch_decode(tokens[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return out


def evaluate(args: Args) -> dict:
    from datasets import load_from_disk

    data = load_from_disk(args.dataset_name)[args.split]
    data = data.select(range(min(args.num_prompts, len(data))))
    prompts, references = data["prompt"], data["completion"] if "completion" in data.column_names else None
    rows = {}
    for i, path in enumerate(args.models):
        responses = generate_completions(
            path, prompts, args.response_length, args.temperature, args.batch_size, args.seed
        )
        rows[path] = [
            {
                "query": p,
                "response": r,
                "score": gold_score(p, r),
                **({"reference": references[j]} if references else {}),
            }
            for j, (p, r) in enumerate(zip(prompts, responses))
        ]
        if args.save_dir:
            os.makedirs(args.save_dir, exist_ok=True)
            with open(os.path.join(args.save_dir, f"{i}_{os.path.basename(path.rstrip('/'))}.jsonl"), "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows[path])
    baseline = args.models[0]
    report = {
        "reference_gold_score": (
            sum(gold_score(p, c) for p, c in zip(prompts, references)) / len(prompts) if references else None
        ),
        "models": {},
    }
    for path in args.models:
        result = judge_gold(rows[path], rows[baseline], gold_score)
        report["models"][path] = {
            "gold_score": sum(r["score"] for r in rows[path]) / len(rows[path]),
            "win_rate_vs_baseline": result["win_rate"],
            "ci_low": result["ci_low"],
            "ci_high": result["ci_high"],
            "wins": result["wins"],
            "ties": result["ties"],
            "losses": result["losses"],
        }
    return report


if __name__ == "__main__":
    import tyro

    print(json.dumps(evaluate(tyro.cli(Args)), indent=2))
