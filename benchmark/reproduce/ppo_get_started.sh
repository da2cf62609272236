#!/usr/bin/env bash
# Reproduces: TRL's PPO "get started" command (descriptiveness task, Pythia-1B as policy, reference, value and
#   reward model, 10k episodes) with ppo_rlhf.py in place of TRL's examples/scripts/ppo/ppo.py, same flags.
#   A smoke test of the pipeline at GPU scale: the reward model is the base model with an untrained score head,
#   so the scores carry no meaning; check that the run completes and that val/ratio stays near 1.
# Hardware: 8 GPUs with 80 GB (A100/H100), DDP (benchmark/accelerate_configs/multi_gpu.yaml); 512 episodes per
#   update (8 x 64), 20 updates.
# Time: roughly 10-20 minutes plus downloads (an estimate, not measured by this project).
# Output: models/minimal/ppo (policy, value_model, metrics.jsonl). Plot: python benchmark/plot.py --run ours=models/minimal/ppo
set -euo pipefail
cd "$(dirname "$0")/../.."
export WANDB_TAGS="$(git rev-parse --short HEAD),benchmark"

# Nothing to prepare: Pythia's tokenizer has no pad token, and ppo_rlhf.py adds a dedicated [PAD] (id 50277, inside
# Pythia's 50304-row embedding, so nothing is resized), as TRL's example did; the plain causal LM given as reward model
# gets a fresh one-output score head, as TRL's example's num_labels=1 did.
# Precision: --bf16, as TRL's PPOConfig defaults to; not --gradient_checkpointing, a no-op in TRL's PPOTrainer (so it
# did not shape the published runs), and unneeded for Pythia-1B on 80 GB.
accelerate launch --config_file benchmark/accelerate_configs/multi_gpu.yaml \
    ppo_rlhf.py \
    --dataset_name trl-internal-testing/descriptiveness-sentiment-trl-style \
    --dataset_train_split descriptiveness \
    --learning_rate 3e-6 \
    --num_ppo_epochs 1 \
    --num_mini_batches 1 \
    --output_dir models/minimal/ppo \
    --per_device_train_batch_size 64 \
    --gradient_accumulation_steps 1 \
    --total_episodes 10000 \
    --model_name_or_path EleutherAI/pythia-1b-deduped \
    --sft_model_path EleutherAI/pythia-1b-deduped \
    --reward_model_path EleutherAI/pythia-1b-deduped \
    --missing_eos_penalty 1.0 \
    --bf16 \
    --track
