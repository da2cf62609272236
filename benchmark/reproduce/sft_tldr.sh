#!/usr/bin/env bash
# Reproduces: the SFT stage of the N+ TL;DR recipe: sft.py fine-tunes EleutherAI/pythia-1b-deduped on the
#   prompt/completion pairs of trl-lib/tldr (one epoch, lr 3e-6 cosine, 128 examples per step), the counterpart
#   of the public cleanrl/EleutherAI_pythia-1b-deduped__sft__tldr checkpoint that ppo_tldr.sh starts from.
# Hardware: 8 GPUs with 80 GB (A100/H100), DDP (benchmark/accelerate_configs/multi_gpu.yaml), bf16 autocast.
#   With fewer GPUs raise --gradient_accumulation_steps to keep 128 = GPUs x 4 x accumulation.
# Time: roughly 30-60 minutes plus downloads (an estimate, not measured by this project).
# Output: models/minimal/sft_tldr (model, tokenizer with [PAD], metrics.jsonl); W&B project `rlhf`, tagged with
#   the git commit and `benchmark`. Next: benchmark/reproduce/rm_tldr.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
export WANDB_TAGS="$(git rev-parse --short HEAD),benchmark"

# Pythia's tokenizer has no pad token: sft.py adds a dedicated [PAD] (id 50277, inside Pythia's 50304-row embedding,
# so nothing is resized), as TRL's example did, and saves it with the model for rm_tldr.sh and ppo_tldr.sh.
accelerate launch --config_file benchmark/accelerate_configs/multi_gpu.yaml \
    sft.py \
    --model_name_or_path EleutherAI/pythia-1b-deduped \
    --dataset_name trl-lib/tldr \
    --dataset_train_split train \
    --dataset_test_split validation \
    --max_length 640 \
    --learning_rate 3e-6 \
    --lr_scheduler_type cosine \
    --warmup_ratio 0.0 \
    --num_train_epochs 1 \
    --per_device_train_batch_size 4 \
    --gradient_accumulation_steps 4 \
    --bf16 \
    --output_dir models/minimal/sft_tldr \
    --seed 1 \
    --track
