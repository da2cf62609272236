#!/usr/bin/env python
"""Reference runner: train TRL 1.12.0's ``trl.experimental.ppo.PPOTrainer`` and record timings.

This script is the TRL side of the speed / learning comparison benchmark. It is NOT part of the
project's code paths and must only be run with the separate TRL virtualenv (see
``benchmark/requirements-trl.txt``)::

    .venv-trl/bin/python benchmark/trl_ppo_runner.py \
        --sft-model-path embedded/sft_model --reward-model-path embedded/reward_model \
        --tokenizer-path embedded/tokenizer --dataset-path embedded/prompts --dataset-split train \
        --total-episodes 512 --per-device-train-batch-size 8 --response-length 16 \
        --stop-token eos --output-dir /tmp/trl_run --results-json /tmp/trl_run/results.json

It sets TRL up the way TRL's own ``examples/scripts/ppo/ppo.py`` does (policy and reference policy
loaded from the SFT model, value model and reward model both loaded from the reward-model path as
``AutoModelForSequenceClassification(num_labels=1)``, prompts tokenised without a chat template and
without padding, left padding done by TRL's collator), with sample generations, evaluation and
checkpointing switched off.

Timing is done without modifying TRL: the module-level helpers that ``PPOTrainer.train`` looks up
by name in ``trl.experimental.ppo.ppo_trainer`` (``batch_generation``, ``forward``, ``get_reward``,
``selective_log_softmax``) are replaced by timed wrappers, and the trainer's ``accelerator.backward``
and ``optimizer.step`` are wrapped on the instances. Update boundaries come from a
``TrainerCallback`` (``on_train_begin`` / ``on_step_end``). ``trl`` is imported only here; nothing in
the project imports this file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from collections import defaultdict
from pathlib import Path

# Offline by default: nothing may be fetched from a hub at run time; no telemetry.
for _k, _v in (
    ("HF_HUB_OFFLINE", "1"),
    ("HF_DATASETS_OFFLINE", "1"),
    ("HF_HUB_DISABLE_TELEMETRY", "1"),
    ("WANDB_MODE", "offline"),
    ("TOKENIZERS_PARALLELISM", "false"),
):
    os.environ.setdefault(_k, _v)

RESULTS_SCHEMA_VERSION = 1

# Phase keys reported per update (seconds).
PHASES = (
    "generation",  # batch_generation(): policy.generate for all rollout chunks
    "rollout_log_softmax",  # no-grad selective_log_softmax (policy logprobs from generation scores + ref logprobs)
    "rollout_ref_forward",  # no-grad forward() of the reference policy
    "rollout_value_forward",  # get_reward() on the value model
    "rollout_reward_forward",  # get_reward() on the reward model (scores)
    "training",  # PPO epochs: first training forward .. end of last optimizer.step of the update
    "training_forward",  # (part of training) forward() of policy+value wrapper with grad
    "training_backward",  # (part of training) accelerator.backward
    "training_optimizer_step",  # (part of training) optimizer.step (skipped steps included)
    "other",  # update time minus generation, rollout forwards and training (GAE, masks, stats, logging, gc)
    "other_gc_collect",  # (part of other) gc.collect() calls made by train()
    "other_empty_cache",  # (part of other) empty_cache() calls made by train()
    "other_log",  # (part of other) trainer.log(metrics): callbacks, progress bar, reporting
)
ROLLOUT_FORWARD_PHASES = (
    "rollout_log_softmax",
    "rollout_ref_forward",
    "rollout_value_forward",
    "rollout_reward_forward",
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    g = p.add_argument_group("paths")
    g.add_argument("--sft-model-path", required=True, help="policy (and reference policy) checkpoint dir")
    g.add_argument(
        "--reward-model-path", required=True, help="reward model dir; the value model is initialised from it"
    )
    g.add_argument("--tokenizer-path", default=None, help="tokenizer dir (default: --sft-model-path)")
    g.add_argument(
        "--dataset-path",
        required=True,
        help="datasets.save_to_disk folder (Dataset or DatasetDict) with a prompt column",
    )
    g.add_argument("--dataset-split", default="train", help="split to use when --dataset-path holds a DatasetDict")
    g.add_argument("--dataset-text-field", default="prompt")
    g.add_argument("--max-prompts", type=int, default=None, help="use only the first N prompts")
    g.add_argument("--output-dir", required=True)
    g.add_argument(
        "--results-json", default=None, help="where to write the results (default: OUTPUT_DIR/trl_results.json)"
    )
    g.add_argument(
        "--save-policy", action="store_true", help="save the trained policy (+tokenizer) to OUTPUT_DIR/policy"
    )

    g = p.add_argument_group("PPO")
    g.add_argument("--total-episodes", type=int, required=True)
    g.add_argument("--per-device-train-batch-size", type=int, default=8)
    g.add_argument("--gradient-accumulation-steps", type=int, default=1)
    g.add_argument("--num-ppo-epochs", type=int, default=4)
    g.add_argument("--num-mini-batches", type=int, default=1)
    g.add_argument("--response-length", type=int, default=53)
    stop = g.add_mutually_exclusive_group()
    stop.add_argument("--stop-token", choices=["eos"], default=None)
    stop.add_argument("--stop-token-id", type=int, default=None)
    g.add_argument("--missing-eos-penalty", type=float, default=None)
    g.add_argument("--learning-rate", type=float, default=3e-6)
    g.add_argument("--local-rollout-forward-batch-size", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.7)
    g.add_argument("--kl-coef", type=float, default=0.05)
    g.add_argument("--kl-estimator", choices=["k1", "k3"], default="k1")
    g.add_argument("--vf-coef", type=float, default=0.1)
    g.add_argument("--cliprange", type=float, default=0.2)
    g.add_argument("--cliprange-value", type=float, default=0.2)
    g.add_argument("--gamma", type=float, default=1.0)
    g.add_argument("--lam", type=float, default=0.95)
    g.add_argument("--whiten-rewards", action="store_true")
    g.add_argument("--seed", type=int, default=42)
    g.add_argument(
        "--bf16", action="store_true", help="TRL's PPOConfig defaults to bf16=True; this runner defaults to fp32"
    )

    g = p.add_argument_group("runtime")
    g.add_argument("--num-threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)")
    g.add_argument("--report-to", default="none", help="TrainingArguments.report_to (e.g. none, wandb)")
    g.add_argument("--run-name", default=None)
    g.add_argument(
        "--gc-freeze",
        action="store_true",
        help="call gc.freeze() before training so TRL's two gc.collect() per update skip the startup heap "
        "(not TRL's default behaviour; leave off to measure TRL as shipped)",
    )
    g.add_argument("--quiet", action="store_true", help="disable TRL's per-update metric printing / progress bar")
    args = p.parse_args(argv)
    if args.tokenizer_path is None:
        args.tokenizer_path = args.sft_model_path
    if args.results_json is None:
        args.results_json = os.path.join(args.output_dir, "trl_results.json")
    return args


def peak_rss_mib() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return ru / (1024.0 * 1024.0) if sys.platform == "darwin" else ru / 1024.0


class PhaseTimer:
    """Accumulates wall-clock time per phase for the current update and keeps per-update records."""

    def __init__(self):
        self.current = defaultdict(float)
        self.calls = defaultdict(int)
        self.train_start = None  # perf_counter of the first grad-enabled forward of this update
        self.train_end = None  # perf_counter of the end of the last optimizer.step of this update
        self.updates: list[dict] = []
        self.logs: list[dict] = []
        self.last_mark = None
        self.train_begin = None
        self.train_finish = None

    def add(self, phase: str, dt: float):
        self.current[phase] += dt
        self.calls[phase] += 1

    def mark_update_end(self, global_step: int, episode: int):
        now = time.perf_counter()
        update_s = now - self.last_mark
        self.last_mark = now
        rec = {"update": global_step, "episode": episode, "update_s": update_s}
        training = (
            (self.train_end - self.train_start)
            if (self.train_start is not None and self.train_end is not None)
            else 0.0
        )
        for ph in PHASES:
            if ph in ("training", "other"):
                continue
            rec[f"{ph}_s"] = self.current.get(ph, 0.0)
        rec["training_s"] = training
        rec["rollout_forwards_s"] = sum(rec[f"{ph}_s"] for ph in ROLLOUT_FORWARD_PHASES)
        rec["other_s"] = update_s - rec["generation_s"] - rec["rollout_forwards_s"] - training
        rec["rss_peak_mib"] = peak_rss_mib()
        self.updates.append(rec)
        self.current = defaultdict(float)
        self.train_start = self.train_end = None


def install_timers(ppo_mod, timer: PhaseTimer, reward_model_ref):
    """Replace module-level helpers used by PPOTrainer.train with timed wrappers."""
    import torch

    orig_batch_generation = ppo_mod.batch_generation
    orig_forward = ppo_mod.forward
    orig_get_reward = ppo_mod.get_reward
    orig_sls = ppo_mod.selective_log_softmax
    orig_empty_cache = ppo_mod.empty_cache
    orig_gc = ppo_mod.gc

    def batch_generation(*a, **k):
        t = time.perf_counter()
        try:
            return orig_batch_generation(*a, **k)
        finally:
            timer.add("generation", time.perf_counter() - t)

    def forward(model, *a, **k):
        grad = torch.is_grad_enabled()
        t = time.perf_counter()
        if grad and timer.train_start is None:
            timer.train_start = t
        try:
            return orig_forward(model, *a, **k)
        finally:
            timer.add("training_forward" if grad else "rollout_ref_forward", time.perf_counter() - t)

    def get_reward(model, *a, **k):
        t = time.perf_counter()
        try:
            return orig_get_reward(model, *a, **k)
        finally:
            phase = "rollout_reward_forward" if model is reward_model_ref() else "rollout_value_forward"
            timer.add(phase, time.perf_counter() - t)

    def selective_log_softmax(*a, **k):
        if torch.is_grad_enabled():  # training path: counted inside "training"
            return orig_sls(*a, **k)
        t = time.perf_counter()
        try:
            return orig_sls(*a, **k)
        finally:
            timer.add("rollout_log_softmax", time.perf_counter() - t)

    def empty_cache(*a, **k):
        t = time.perf_counter()
        try:
            return orig_empty_cache(*a, **k)
        finally:
            timer.add("other_empty_cache", time.perf_counter() - t)

    class _TimedGC:
        """Stands in for the `gc` module inside ppo_trainer: times gc.collect(), forwards the rest."""

        def __getattr__(self, name):
            return getattr(orig_gc, name)

        @staticmethod
        def collect(*a, **k):
            t = time.perf_counter()
            try:
                return orig_gc.collect(*a, **k)
            finally:
                timer.add("other_gc_collect", time.perf_counter() - t)

    ppo_mod.empty_cache = empty_cache
    ppo_mod.gc = _TimedGC()
    ppo_mod.batch_generation = batch_generation
    ppo_mod.forward = forward
    ppo_mod.get_reward = get_reward
    ppo_mod.selective_log_softmax = selective_log_softmax


def install_instance_timers(trainer, timer: PhaseTimer):
    """Wrap accelerator.backward, optimizer.step and log on the trainer's instances (train() captures them)."""
    acc = trainer.accelerator
    orig_backward = acc.backward

    def backward(*a, **k):
        t = time.perf_counter()
        try:
            return orig_backward(*a, **k)
        finally:
            timer.add("training_backward", time.perf_counter() - t)

    acc.backward = backward

    opt = trainer.optimizer
    orig_step = opt.step

    def step(*a, **k):
        t = time.perf_counter()
        try:
            return orig_step(*a, **k)
        finally:
            end = time.perf_counter()
            timer.add("training_optimizer_step", end - t)
            timer.train_end = end

    opt.step = step

    orig_log = trainer.log

    def log(*a, **k):
        t = time.perf_counter()
        try:
            return orig_log(*a, **k)
        finally:
            timer.add("other_log", time.perf_counter() - t)

    trainer.log = log


def summarize(updates: list[dict]) -> dict:
    keys = ["update_s"] + [f"{ph}_s" for ph in PHASES] + ["rollout_forwards_s"]
    n = len(updates)
    totals = {k: sum(u[k] for u in updates) for k in keys}
    means = {k: (totals[k] / n if n else None) for k in keys}
    rest = updates[1:]
    means_excl_first = {k: (sum(u[k] for u in rest) / len(rest) if rest else None) for k in keys}
    tot = totals["update_s"]
    fractions = {k: (totals[k] / tot if tot else None) for k in keys if k != "update_s"}
    return {
        "totals_s": totals,
        "mean_per_update_s": means,
        "mean_per_update_excl_first_s": means_excl_first,
        "fraction_of_update_time": fractions,
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()

    import torch

    if args.num_threads is not None:
        torch.set_num_threads(args.num_threads)

    import accelerate
    import datasets
    import transformers
    from datasets import DatasetDict, load_from_disk
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback

    import trl
    import trl.experimental.ppo.ppo_trainer as ppo_mod
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    transformers.set_seed(args.seed)  # TRL never seeds numpy itself; seeding here makes runs repeatable

    # ---- tokenizer (as TRL's example: left padding, dedicated pad token) ----
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_path, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    if tokenizer.pad_token_id == tokenizer.eos_token_id:
        print("WARNING: pad_token_id == eos_token_id: TRL's masks will be wrong", file=sys.stderr)

    # ---- models (as TRL's example) ----
    policy = AutoModelForCausalLM.from_pretrained(args.sft_model_path)
    ref_policy = AutoModelForCausalLM.from_pretrained(args.sft_model_path)
    value_model = AutoModelForSequenceClassification.from_pretrained(args.reward_model_path, num_labels=1)
    reward_model = AutoModelForSequenceClassification.from_pretrained(args.reward_model_path, num_labels=1)
    if len(tokenizer) > policy.get_input_embeddings().weight.shape[0]:
        raise SystemExit(
            f"tokenizer has {len(tokenizer)} tokens but the policy's embedding has {policy.get_input_embeddings().weight.shape[0]}"
        )
    n_policy_params = sum(p.numel() for p in policy.parameters())
    n_value_params = sum(p.numel() for p in value_model.parameters())

    # ---- dataset: tokenise the prompt column, no chat template, no padding (as TRL's example) ----
    ds = load_from_disk(args.dataset_path)
    if isinstance(ds, DatasetDict):
        if args.dataset_split not in ds:
            raise SystemExit(f"split {args.dataset_split!r} not in {list(ds)}")
        ds = ds[args.dataset_split]
    if args.max_prompts is not None:
        ds = ds.select(range(min(args.max_prompts, len(ds))))
    field = args.dataset_text_field

    def tokenize(batch):
        return {"input_ids": tokenizer(batch[field], padding=False)["input_ids"]}

    train_dataset = ds.map(tokenize, batched=True, remove_columns=ds.column_names, desc="tokenize")

    # ---- config ----
    config = PPOConfig(
        output_dir=args.output_dir,
        run_name=args.run_name,
        report_to=args.report_to,
        sft_model_path=args.sft_model_path,
        reward_model_path=args.reward_model_path,
        total_episodes=args.total_episodes,
        per_device_train_batch_size=args.per_device_train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        num_ppo_epochs=args.num_ppo_epochs,
        num_mini_batches=args.num_mini_batches,
        response_length=args.response_length,
        stop_token=args.stop_token,
        stop_token_id=args.stop_token_id,
        missing_eos_penalty=args.missing_eos_penalty,
        learning_rate=args.learning_rate,
        local_rollout_forward_batch_size=args.local_rollout_forward_batch_size,
        temperature=args.temperature,
        kl_coef=args.kl_coef,
        kl_estimator=args.kl_estimator,
        vf_coef=args.vf_coef,
        cliprange=args.cliprange,
        cliprange_value=args.cliprange_value,
        gamma=args.gamma,
        lam=args.lam,
        whiten_rewards=args.whiten_rewards,
        seed=args.seed,
        bf16=args.bf16,
        # transformers refuses bf16 without a GPU unless use_cpu is set; on a machine without CUDA it changes nothing else
        use_cpu=not torch.cuda.is_available(),
        num_sample_generations=0,
        eval_strategy="no",
        save_strategy="no",
        gradient_checkpointing=False,
        disable_tqdm=args.quiet,
        logging_steps=1,
    )

    timer = PhaseTimer()
    holder = {}

    class TimingCallback(TrainerCallback):
        def on_train_begin(self, a, state, control, **kw):
            timer.train_begin = timer.last_mark = time.perf_counter()

        def on_log(self, a, state, control, logs=None, **kw):
            if logs:
                timer.logs.append(dict(logs))

        def on_step_end(self, a, state, control, **kw):
            timer.mark_update_end(state.global_step, getattr(state, "episode", None))

    install_timers(ppo_mod, timer, lambda: holder.get("reward_model"))
    trainer = PPOTrainer(
        args=config,
        processing_class=tokenizer,
        model=policy,
        ref_model=ref_policy,
        reward_model=reward_model,
        value_model=value_model,
        train_dataset=train_dataset,
        eval_dataset=None,
        callbacks=[TimingCallback()],
    )
    if args.quiet:
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    holder["reward_model"] = trainer.reward_model  # the object train() passes to get_reward
    install_instance_timers(trainer, timer)
    setup_s = time.perf_counter() - t_start
    rss_before_train = peak_rss_mib()

    if args.gc_freeze:
        import gc

        gc.collect()
        gc.freeze()

    t0 = time.perf_counter()
    trainer.train()
    train_wall_s = time.perf_counter() - t0

    saved_to = None
    if args.save_policy:
        saved_to = os.path.join(args.output_dir, "policy")
        unwrapped = trainer.accelerator.unwrap_model(trainer.model)
        if trainer.accelerator.is_main_process:
            unwrapped.policy.save_pretrained(saved_to)
            tokenizer.save_pretrained(saved_to)
        trainer.accelerator.wait_for_everyone()

    # ---- results ----
    cfg = trainer.args
    n_updates = len(timer.updates)
    episodes = n_updates * cfg.batch_size
    summary = summarize(timer.updates)
    final_metrics = timer.logs[-1] if timer.logs else {}
    results = {
        "schema_version": RESULTS_SCHEMA_VERSION,
        "framework": "trl",
        "trainer": "trl.experimental.ppo.PPOTrainer",
        "versions": {
            "trl": trl.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "accelerate": accelerate.__version__,
            "datasets": datasets.__version__,
            "python": platform.python_version(),
        },
        "host": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "torch_num_threads": torch.get_num_threads(),
        },
        "args": vars(args),
        "derived": {
            "world_size": cfg.world_size,
            "local_batch_size": cfg.local_batch_size,
            "micro_batch_size": cfg.micro_batch_size,
            "batch_size": cfg.batch_size,
            "mini_batch_size": cfg.mini_batch_size,
            "local_mini_batch_size": cfg.local_mini_batch_size,
            "num_total_batches": cfg.num_total_batches,
            "num_train_prompts": len(train_dataset),
            "policy_params": n_policy_params,
            "value_params": n_value_params,
            "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "stop_token_id": trainer.stop_token_id,
        },
        "setup_s": setup_s,
        "train_wall_time_s": train_wall_s,
        "num_updates": n_updates,
        "episodes": episodes,
        "episodes_per_s": episodes / train_wall_s if train_wall_s > 0 else None,
        "time_per_update_s": train_wall_s / n_updates if n_updates else None,
        "time_per_update_excl_first_s": summary["mean_per_update_excl_first_s"]["update_s"],
        "phases": summary,
        "peak_rss_mib": peak_rss_mib(),
        "peak_rss_mib_before_train": rss_before_train,
        "final_metrics": final_metrics,
        "metrics_history": timer.logs,
        "per_update": timer.updates,
        "policy_saved_to": saved_to,
    }
    if trainer.accelerator.is_main_process:
        out = Path(args.results_json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2, default=str))
        m = summary["mean_per_update_s"]
        print(
            f"[trl_ppo_runner] updates={n_updates} episodes={episodes} wall={train_wall_s:.2f}s "
            f"eps/s={results['episodes_per_s']:.2f} s/update={results['time_per_update_s']:.3f} "
            f"(gen {m['generation_s']:.3f}, rollout fwd {m['rollout_forwards_s']:.3f}, train {m['training_s']:.3f}, "
            f"other {m['other_s']:.3f}) peak_rss={results['peak_rss_mib']:.0f}MiB "
            f"scores={final_metrics.get('objective/scores')} -> {out}"
        )
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
