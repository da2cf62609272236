"""The whole RLHF pipeline on the embedded tiny TL;DR task, in one command (the N+ code's "hello world"):

    python pipeline.py                      # ~7 minutes on a 2-core laptop CPU, offline

1. build the task (datasets, tokenizer, random base model)     tiny_tldr.py
2. supervised fine-tuning                                         sft.py
3. reward model from the SFT model                                reward_modeling.py
4. PPO from the SFT policy against the reward model               ppo_rlhf_tldr.py
5. the gold judge: PPO vs SFT generations on the test prompts     judge.py

Each stage runs as the user would run it (a subprocess with flags), writes into --work-dir, and is timed. The last
lines print a table: gold score of SFT and PPO, PPO's win rate against SFT with a 95% interval, the reward model's
accuracy against gold labels, the policy's KL to the SFT model, and the run times.
"""

import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import List

ROOT = os.path.dirname(os.path.abspath(__file__))


@dataclass
class Args:
    work_dir: str = "models/pipeline"
    """everything is written here (the shipped embedded/ folder is never touched)"""
    seed: int = 1
    """seed of the task and of every stage"""
    use_shipped_models: bool = False
    """skip stages 1-3 and start PPO from the shipped embedded/ SFT and reward models"""
    task_args: str = ""
    """extra flags for tiny_tldr.py, as one string: --task-args="--flag value ..." """
    sft_args: str = ""
    """extra flags for sft.py, as one string: --sft-args="--flag value ..." """
    rm_args: str = ""
    """extra flags for reward_modeling.py, as one string: --rm-args="--flag value ..." """
    ppo_args: str = ""
    """extra flags for ppo_rlhf_tldr.py, as one string: --ppo-args="--flag value ..." """


def run_stage(name: str, script: str, flags: List[str], times: dict) -> None:
    print(
        f"\n=== {name} ({sum(times.values()):.0f} s into the pipeline): python {script} {' '.join(flags)}", flush=True
    )
    start = time.time()
    # The stage writes to this process's terminal (or log) directly: on a terminal it draws its own progress bar
    # with the rate and the time left, in a log it prints one line per step or update.
    result = subprocess.run([sys.executable, os.path.join(ROOT, script), *flags], cwd=ROOT)
    times[name] = time.time() - start
    if result.returncode != 0:
        sys.exit(f"error: stage {name!r} failed with exit code {result.returncode}; its output is above")


def last_row_with(path: str, key: str) -> dict:
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return next((r for r in reversed(rows) if key in r), {})


def main(args: Args) -> dict:
    from judge import judge_gold, load_completions
    from tiny_tldr import gold_score

    work = os.path.abspath(args.work_dir)
    task = os.path.join(work, "task")
    sft_dir, rm_dir, ppo_dir = (os.path.join(work, n) for n in ("sft_model", "reward_model", "ppo"))
    os.makedirs(work, exist_ok=True)
    times, rm_accuracy = {}, None
    if args.use_shipped_models:
        task, sft_dir, rm_dir = (os.path.join(ROOT, "embedded", n) for n in ("", "sft_model", "reward_model"))
    else:
        run_stage(
            "task",
            "tiny_tldr.py",
            ["--output-dir", task, "--seed", str(args.seed), *shlex.split(args.task_args)],
            times,
        )
        run_stage(
            "sft",
            "sft.py",
            [
                "--model-name-or-path",
                f"{task}/base_model",
                "--dataset-name",
                f"{task}/sft_data",
                "--output-dir",
                sft_dir,
                "--overwrite-output-dir",
                "--seed",
                str(args.seed),
                *shlex.split(args.sft_args),
            ],
            times,
        )
        run_stage(
            "reward model",
            "reward_modeling.py",
            [
                "--model-name-or-path",
                sft_dir,
                "--dataset-name",
                f"{task}/preference_data",
                "--normalize-dataset-name",
                f"{task}/sft_data",
                "--output-dir",
                rm_dir,
                "--overwrite-output-dir",
                "--seed",
                str(args.seed),
                *shlex.split(args.rm_args),
            ],
            times,
        )
        rm_accuracy = last_row_with(os.path.join(rm_dir, "metrics.jsonl"), "eval/gold_accuracy").get(
            "eval/gold_accuracy"
        )
    run_stage(
        "ppo",
        "ppo_rlhf_tldr.py",
        [
            "--dataset-name",
            os.path.join(task, "prompts"),
            "--model-name-or-path",
            sft_dir,
            "--sft-model-path",
            sft_dir,
            "--reward-model-path",
            rm_dir,
            "--output-dir",
            ppo_dir,
            "--overwrite-output-dir",
            "--seed",
            str(args.seed),
            *shlex.split(args.ppo_args),
        ],
        times,
    )

    start = time.time()
    generations = os.path.join(ppo_dir, "eval_generations")
    result = judge_gold(
        load_completions(os.path.join(generations, "final.jsonl")),
        load_completions(os.path.join(generations, "initial.jsonl")),
        gold_score,
    )
    times["judge"] = time.time() - start
    final = last_row_with(os.path.join(ppo_dir, "metrics.jsonl"), "final_eval/kl")
    summary = {
        "sft_gold_score": result["mean_score_b"],
        "ppo_gold_score": result["mean_score_a"],
        "ppo_win_rate_vs_sft": result["win_rate"],
        "ci_low": result["ci_low"],
        "ci_high": result["ci_high"],
        "wins": result["wins"],
        "ties": result["ties"],
        "losses": result["losses"],
        "n": result["n"],
        "rm_gold_accuracy": rm_accuracy,
        "ppo_kl_to_sft": final.get("final_eval/kl"),
        "ppo_rm_score": final.get("final_eval/score"),
        "times_s": times,
    }
    with open(os.path.join(work, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"RLHF pipeline on the embedded tiny TL;DR task ({result['n']} test prompts, gold judge)")
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_row("SFT gold score", f"{summary['sft_gold_score']:.3f}")
    table.add_row("PPO gold score", f"{summary['ppo_gold_score']:.3f}")
    table.add_row(
        "PPO win rate vs SFT (ties half)",
        f"{summary['ppo_win_rate_vs_sft']:.1%} [{summary['ci_low']:.1%}, {summary['ci_high']:.1%}]",
    )
    table.add_row("wins / ties / losses", f"{result['wins']} / {result['ties']} / {result['losses']}")
    table.add_row("RM accuracy vs gold labels", "shipped model" if rm_accuracy is None else f"{rm_accuracy:.1%}")
    table.add_row("PPO KL to SFT (near-greedy, summed)", f"{summary['ppo_kl_to_sft']:.3f}")
    for name, seconds in times.items():
        table.add_row(f"time: {name}", f"{seconds:.0f} s")
    table.add_row("time: total", f"{sum(times.values()):.0f} s")
    Console().print(table)
    return summary


if __name__ == "__main__":
    import tyro

    main(tyro.cli(Args))
