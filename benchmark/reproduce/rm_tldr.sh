#!/usr/bin/env bash
# Reproduces: the reward-model stage of the N+ TL;DR recipe: reward_modeling.py trains a scalar head on the SFT
#   model of sft_tldr.sh with the human preference pairs of trl-lib/tldr-preference (train: 92.9k pairs, one
#   epoch, lr 3e-6 cosine, 64 pairs per step), reports accuracy on its validation split, and shifts the scores
#   so that trl-lib/tldr's reference summaries score 0 on average (the N+ normalisation). The counterpart of
#   the public cleanrl/EleutherAI_pythia-1b-deduped__reward__tldr checkpoint.
# Hardware: 8 GPUs with 80 GB (A100/H100), DDP (benchmark/accelerate_configs/multi_gpu.yaml), bf16 autocast.
#   With fewer GPUs raise --gradient_accumulation_steps to keep 64 = GPUs x 2 x accumulation.
# Time: roughly 1-2 hours plus downloads, most of it on the 83.8k validation pairs (an estimate, not measured by
#   this project).
# Needs: models/minimal/sft_tldr from benchmark/reproduce/sft_tldr.sh (its tokenizer has the [PAD] token).
# Output: models/minimal/rm_tldr (model, tokenizer, metrics.jsonl); W&B project `rlhf`, tagged with the git commit
#   and `benchmark`. To run PPO from these two models instead of the published ones, give ppo_tldr.sh
#   --sft_model_path models/minimal/sft_tldr --reward_model_path models/minimal/rm_tldr.
set -euo pipefail
cd "$(dirname "$0")/../.."
export WANDB_TAGS="$(git rev-parse --short HEAD),benchmark"

accelerate launch --config_file benchmark/accelerate_configs/multi_gpu.yaml \
    reward_modeling.py \
    --model_name_or_path models/minimal/sft_tldr \
    --dataset_name trl-lib/tldr-preference \
    --dataset_train_split train \
    --dataset_test_split validation \
    --normalize_dataset_name trl-lib/tldr \
    --normalize_split validation \
    --max_length 640 \
    --learning_rate 3e-6 \
    --lr_scheduler_type cosine \
    --warmup_ratio 0.0 \
    --num_train_epochs 1 \
    --per_device_train_batch_size 2 \
    --gradient_accumulation_steps 4 \
    --bf16 \
    --output_dir models/minimal/rm_tldr \
    --seed 1 \
    --track
