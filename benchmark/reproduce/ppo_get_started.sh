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

# Two artefacts TRL's example creates in code and ppo_rlhf.py expects on disk (it refuses to guess either):
# - the tokenizer: Pythia's has no pad token; add a dedicated [PAD] (id 50277, inside Pythia's 50304-row
#   embedding, so nothing is resized). Padding with EOS instead would corrupt every mask.
# - the reward model: EleutherAI/pythia-1b-deduped's config says nothing about labels (transformers then assumes 2);
#   save it once as a one-label sequence classifier, the freshly initialised head TRL's example gets with num_labels=1.
TOKENIZER=${TOKENIZER:-models/tokenizers/pythia-1b-deduped-pad}
REWARD_MODEL=${REWARD_MODEL:-models/minimal/pythia-1b-deduped-score}
python - "$TOKENIZER" "$REWARD_MODEL" <<'PY'
import os
import sys
from transformers import AutoModelForSequenceClassification, AutoTokenizer
tokenizer_dir, reward_dir = sys.argv[1:]
if not os.path.exists(os.path.join(tokenizer_dir, "tokenizer_config.json")):
    tokenizer = AutoTokenizer.from_pretrained("EleutherAI/pythia-1b-deduped")
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    tokenizer.save_pretrained(tokenizer_dir)
if not os.path.exists(os.path.join(reward_dir, "config.json")):
    AutoModelForSequenceClassification.from_pretrained("EleutherAI/pythia-1b-deduped", num_labels=1).save_pretrained(reward_dir)
PY

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
    --model_name_or_path "$TOKENIZER" \
    --sft_model_path EleutherAI/pythia-1b-deduped \
    --reward_model_path "$REWARD_MODEL" \
    --missing_eos_penalty 1.0 \
    --track
