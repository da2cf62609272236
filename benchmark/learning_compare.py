"""Learning comparison on the embedded task: ppo_rlhf.py vs TRL 1.12.0's PPOTrainer, judged by the gold judge.

    python benchmark/learning_compare.py                      # seed 1, 3072 episodes each
    python benchmark/learning_compare.py --seeds 1 2 3 --jobs 2

Both start from the same SFT policy (embedded/sft_model) and reward model (embedded/reward_model) and get the same
episode budget, batch, learning rate (3e-5, the embedded task's), response length, PPO epochs, stop token (EOS),
temperature, KL coefficient, missing-EOS penalty and seed: ours is `python ppo_rlhf.py`, TRL is
`<--trl-python> benchmark/trl_ppo_runner.py --save-policy` (a separate venv, benchmark/requirements-trl.txt). Then
the SFT policy and every final policy generate near-greedy completions for the first 200 test prompts with plain
Hugging Face `generate` (benchmark/gold_eval.py's `generate_completions`, an implementation independent of both
trainers), the gold judge scores them (tiny_tldr.gold_score) and judge.py's `judge_gold` gives win rates (ties count
half, 95% Wilson interval) against the SFT policy and head to head.

Writes a markdown table (printed) and a JSON with every number to --results-dir (learning_embedded.md/.json).
"""

import json
import os
import shlex
import shutil
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import List, Optional

import common
from common import default_trl_python, fail, snapshot_script, trl_available


@dataclass
class Args:
    seeds: List[int] = field(default_factory=lambda: [1])
    """one training run of each implementation per seed"""
    total_episodes: int = 3072
    """episode budget of each run (48 updates of 64)"""
    per_device_train_batch_size: int = 16
    """micro-batch size"""
    gradient_accumulation_steps: int = 4
    """micro-batches per update (episodes per update = the product)"""
    local_rollout_forward_batch_size: int = 64
    """generation / rollout forward chunk"""
    num_ppo_epochs: int = 4
    """passes over the batch per update"""
    num_mini_batches: int = 1
    """optimizer steps per PPO epoch"""
    response_length: int = 53
    """new tokens per rollout"""
    learning_rate: float = 3e-5
    """learning rate of both (the embedded task's; the Pythia recipe's 3e-6 barely moves a tiny model)"""
    temperature: float = 0.7
    """rollout sampling temperature"""
    kl_coef: float = 0.05
    """KL penalty coefficient"""
    missing_eos_penalty: Optional[float] = 1.0
    """subtracted from the score of responses without EOS (both); None for off"""
    num_threads: int = 1
    """OMP_NUM_THREADS of each training run (and TRL's torch.set_num_threads), and torch threads of the evaluation"""
    jobs: int = 1
    """training runs at once (2: ours and TRL of a seed side by side, one per core)"""
    max_prompts: Optional[int] = None
    """train on the first N training prompts only (quick checks)"""
    num_eval_prompts: int = 200
    """test prompts judged"""
    eval_response_length: int = 53
    """new tokens per evaluation completion"""
    eval_temperature: float = 0.01
    """near-greedy evaluation decoding"""
    eval_batch_size: int = 64
    """prompts per generate call"""
    eval_seed: int = 0
    """evaluation sampling seed"""
    ours_extra_args: str = ""
    """extra arguments for ppo_rlhf.py only"""
    ours_script: str = "ppo_rlhf.py"
    """the script trained as ours; copied into --work-dir at the start and the copy runs (edits during the
    comparison never mix two versions)"""
    trl_python: Optional[str] = None
    """python of the TRL venv (default: .venv-trl/bin/python in the repository)"""
    skip_trl: bool = False
    """train and judge ours only"""
    reuse: bool = False
    """reuse a run whose final policy is already in --work-dir instead of training it again"""
    sft_model_path: str = "embedded/sft_model"
    """the SFT policy (start of both, and the baseline)"""
    reward_model_path: str = "embedded/reward_model"
    """the reward model (and value model initialisation)"""
    dataset_name: str = "embedded/prompts"
    """prompts: train split for training, test split for judging"""
    work_dir: str = "models/learning_compare"
    """where the runs, their logs and the completions go"""
    results_dir: str = "benchmark/results"
    """where the markdown and JSON results go"""
    name: str = "learning_embedded"
    """file stem of the results"""
    timeout: int = 14400
    """seconds before a training run is killed"""


LABELS = {"sft": "SFT policy (start)", "ours": "ours (ppo_rlhf.py)", "trl": "TRL 1.12.0 PPOTrainer"}


def train_commands(args: Args, seed: int, prompts: str, ours_script: str) -> dict:
    """Both implementations' training commands for one seed, from one set of settings (common.FLAGS spells them)."""
    same = (*common.PPO_SETTINGS, "total_episodes", "kl_coef", "sft_model_path", "reward_model_path")
    settings = {
        **{k: getattr(args, k) for k in same},
        "seed": seed,
        "stop_token": "eos",
        "tokenizer": args.sft_model_path,
        "prompts": prompts,
        "train_split": "train",
        # ours only: its test split is not judged here, so no evaluation or samples during training
        "test_split": "validation",
        "overwrite_output_dir": True,
        "eval_strategy": "no",
        "num_sample_generations": 0,
        # TRL only: the runner writes its metrics and saves the policy on request
        "save_policy": True,
        "quiet": True,
    }
    ours_dir, trl_dir = (os.path.join(args.work_dir, f"{impl}_s{seed}") for impl in ("ours", "trl"))
    ours = common.command("ours", [sys.executable, ours_script], {**settings, "output_dir": ours_dir})
    trl = common.command(
        "trl",
        [args.trl_python, common.TRL_RUNNER],
        {**settings, "output_dir": trl_dir, "results_json": os.path.join(trl_dir, "trl_results.json")},
    )
    ours += shlex.split(args.ours_extra_args)
    return {"ours": (ours, ours_dir, ours_dir), "trl": (trl, trl_dir, os.path.join(trl_dir, "policy"))}


def train(impl: str, cmd: List[str], out_dir: str, policy_dir: str, args: Args, tag: str) -> dict:
    """One training run; returns where its policy is, its wall time and its last logged reward-model score."""
    done = os.path.isfile(os.path.join(policy_dir, "config.json")) and any(
        f.endswith(".safetensors") for f in os.listdir(policy_dir)
    )
    log_path = os.path.join(args.work_dir, "logs", tag + ".log")
    wall = None
    if not (args.reuse and done):
        shutil.rmtree(out_dir, ignore_errors=True)
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        print(f"[learning_compare] training {tag} ...", flush=True)
        env = common.run_env(args.num_threads, args.work_dir)
        rc, wall = common.run_logged(cmd, env, log_path, args.timeout)
        if rc != 0:
            raise RuntimeError(f"{tag} failed ({rc}); log {log_path}:\n{common.log_tail(log_path)}")
        print(f"[learning_compare] {tag} trained in {wall:.0f} s", flush=True)
    if impl == "ours":
        train_rows = [r for r in common.read_jsonl(os.path.join(out_dir, "metrics.jsonl")) if "objective/scores" in r]
    else:
        with open(os.path.join(out_dir, "trl_results.json")) as f:
            train_rows = [r for r in json.load(f)["metrics_history"] if "objective/scores" in r]
    last = train_rows[-1] if train_rows else {}
    return {
        "policy": policy_dir,
        "train_wall_s": wall,
        "log": log_path,
        "episodes": last.get("episode"),
        "final_rm_score": last.get("objective/scores"),
        "final_kl": last.get("objective/kl"),
    }


def mean_std(values: List[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"


def markdown(results: dict) -> str:
    a, m, per_seed = results["settings"], results["machine"], results["per_seed"]
    impls = results["implementations"]
    seeds = [s["seed"] for s in per_seed]
    lines = [
        f"### Learning, embedded task ({m['date']})",
        "",
        f"Machine: {m['nproc']} CPUs ({m['cpu_model']}), {a['num_threads']} thread(s) per run, torch {m['torch']}, "
        f"TRL {results.get('trl_version') or 'not run'}; commit {common.commit_note(m)}.",
        "",
        f"Both: {a['total_episodes']} episodes, batch {a['per_device_train_batch_size']}x"
        f"{a['gradient_accumulation_steps']}, {a['num_ppo_epochs']} PPO epochs, {a['num_mini_batches']} mini-batch(es), "
        f"lr {a['learning_rate']}, response length {a['response_length']}, temperature {a['temperature']}, kl_coef "
        f"{a['kl_coef']}, missing_eos_penalty {a['missing_eos_penalty']}, stop token EOS; seeds {seeds}. Judged on "
        f"the first {a['num_eval_prompts']} test prompts, near-greedy (temperature {a['eval_temperature']}), "
        f"{a['eval_response_length']} new tokens, by the gold judge (reference summaries score "
        f"{results['reference_gold_score']:.3f}; the ideal is 4.0).",
        "",
        "| policy | gold score" + (" (mean ± std over seeds)" if len(seeds) > 1 else "") + " | per seed | "
        "win rate vs SFT (ties half, 95% CI) | final RM score in training | train wall time (s) |",
        "|---|---|---|---|---|---|",
    ]
    sft = per_seed[0]["gold"]["sft"]  # judged once: the same policy and the same near-greedy decoding for every seed
    lines.append(f"| {LABELS['sft']} | {sft:.3f} | (the same for every seed) | 0.5 | | |")
    for impl in impls:
        gold = [s["gold"][impl] for s in per_seed]
        wins = [s["win_vs_sft"][impl] for s in per_seed]
        wr = ", ".join(f"{w['win_rate']:.3f} [{w['ci_low']:.2f}, {w['ci_high']:.2f}]" for w in wins)
        rm = [s["train"][impl]["final_rm_score"] for s in per_seed]
        walls = [s["train"][impl]["train_wall_s"] for s in per_seed]
        lines.append(
            f"| {LABELS[impl]} | {mean_std(gold)} | {', '.join(f'{x:.3f}' for x in gold)} | {wr} | "
            f"{', '.join('n/a' if x is None else f'{x:.3f}' for x in rm)} | "
            f"{', '.join('reused' if x is None else f'{x:.0f}' for x in walls)} |"
        )
    lines += [
        "",
        f"Train wall times are {a['jobs']} run(s) at a time on a shared machine: not a speed measurement "
        "(benchmark/speed_compare.py is).",
    ]
    if "trl" in impls:
        h2h = [s["ours_vs_trl"] for s in per_seed]
        lines += [
            "",
            "Head to head, ours vs TRL (win rate of ours, ties half, 95% Wilson interval), per seed: "
            + "; ".join(
                f"seed {s}: {w['win_rate']:.3f} [{w['ci_low']:.2f}, {w['ci_high']:.2f}] "
                f"({w['wins']}-{w['ties']}-{w['losses']})"
                for s, w in zip(seeds, h2h)
            )
            + ".",
        ]
    return "\n".join(lines) + "\n"


def main(args: Args) -> dict:
    import torch
    from datasets import DatasetDict, load_from_disk

    from gold_eval import generate_completions
    from judge import judge_gold
    from tiny_tldr import gold_score

    for name in ("sft_model_path", "reward_model_path", "dataset_name"):
        if not os.path.exists(getattr(args, name)):
            fail(f"--{name.replace('_', '-')} {getattr(args, name)!r} does not exist")
    # The runs start in the repository root: hand them absolute paths.
    for name in ("sft_model_path", "reward_model_path", "dataset_name", "work_dir"):
        setattr(args, name, os.path.abspath(getattr(args, name)))
    os.makedirs(args.work_dir, exist_ok=True)
    impls = ["ours"]
    trl_version = None
    if not args.skip_trl:
        args.trl_python = args.trl_python or default_trl_python()
        ok, trl_version = trl_available(args.trl_python)
        if ok:
            impls.append("trl")
        else:
            print(f"[learning_compare] TRL SKIPPED: {trl_version}; training and judging ours only.")
            trl_version = None

    data = load_from_disk(args.dataset_name)
    prompts_path = args.dataset_name
    if args.max_prompts:
        prompts_path = os.path.join(args.work_dir, f"prompts_{args.max_prompts}")
        DatasetDict(
            train=data["train"].select(range(min(args.max_prompts, len(data["train"])))), validation=data["validation"]
        ).save_to_disk(prompts_path)
    test = data["test"].select(range(min(args.num_eval_prompts, len(data["test"]))))
    prompts, references = test["prompt"], test["completion"]

    # Training: all runs first (optionally two at a time), then the judging.
    ours_script, ours_sha = snapshot_script(args.ours_script, args.work_dir)
    jobs = []
    for seed in args.seeds:
        commands = train_commands(args, seed, prompts_path, ours_script)
        jobs += [(seed, impl, *commands[impl]) for impl in impls]
    with ThreadPoolExecutor(max_workers=max(args.jobs, 1)) as pool:
        futures = {
            (seed, impl): pool.submit(train, impl, cmd, out, pol, args, f"{impl}_s{seed}")
            for seed, impl, cmd, out, pol in jobs
        }
        trained = {key: f.result() for key, f in futures.items()}

    torch.set_num_threads(args.num_threads)

    def completions(path: str, tag: str) -> list:
        responses = generate_completions(
            path, prompts, args.eval_response_length, args.eval_temperature, args.eval_batch_size, args.eval_seed
        )
        rows = [
            {"query": p, "response": r, "reference": ref, "score": gold_score(p, r)}
            for p, r, ref in zip(prompts, responses, references)
        ]
        os.makedirs(os.path.join(args.work_dir, "completions"), exist_ok=True)
        with open(os.path.join(args.work_dir, "completions", tag + ".jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        return rows

    def win(a_rows, b_rows) -> dict:
        r = judge_gold(a_rows, b_rows, gold_score)
        return {k: r[k] for k in ("win_rate", "ci_low", "ci_high", "wins", "ties", "losses")}

    print("[learning_compare] judging ...", flush=True)
    sft_rows = completions(args.sft_model_path, "sft")
    per_seed = []
    for seed in args.seeds:
        rows = {impl: completions(trained[(seed, impl)]["policy"], f"{impl}_s{seed}") for impl in impls}
        entry = {
            "seed": seed,
            "gold": {"sft": statistics.fmean(r["score"] for r in sft_rows)},
            "win_vs_sft": {},
            "train": {impl: trained[(seed, impl)] for impl in impls},
        }
        for impl in impls:
            entry["gold"][impl] = statistics.fmean(r["score"] for r in rows[impl])
            entry["win_vs_sft"][impl] = win(rows[impl], sft_rows)
        if "trl" in impls:
            entry["ours_vs_trl"] = win(rows["ours"], rows["trl"])
        per_seed.append(entry)

    results = {
        "kind": "learning",
        "machine": {**common.machine_info(), "ours_script_sha256": ours_sha},
        "settings": asdict(args),
        "trl_version": trl_version,
        "implementations": impls,
        "reference_gold_score": statistics.fmean(gold_score(p, c) for p, c in zip(prompts, references)),
        "per_seed": per_seed,
    }
    common.write_results(args.results_dir, args.name, results, markdown(results), "learning_compare")
    return results


if __name__ == "__main__":
    import tyro

    main(tyro.cli(Args))
