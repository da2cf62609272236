#!/usr/bin/env bash
# Reproduces: TRL's PPO TL;DR benchmark (the N+ recipe at Pythia-1B: SFT and reward models of the N+ paper,
#   1M episodes of trl-lib/tldr prompts, 53-token summaries, EOS trick) with ppo_rlhf_tldr.py and TRL's flags,
#   4 seeds, each with an evaluation on the validation split every 100 updates.
# Hardware: 8 GPUs with 80 GB (A100/H100), DeepSpeed ZeRO-2 (benchmark/accelerate_configs/deepspeed_zero2.yaml);
#   512 episodes per update (8 x 16 x 4), 1954 updates per seed.
# Time: roughly 6-10 hours per seed, 1-2 days for the 4 (an estimate, not measured by this project).
# Output: models/minimal/ppo_tldr/seed_<SEED> (policy, value_model, metrics.jsonl) and W&B runs in project `rlhf`,
#   exp_name ppo_rlhf_tldr, tagged with the git commit and `benchmark`. Each seed has its own output_dir so that no
#   seed overwrites another's model and metrics.jsonl (TRL's command reuses models/minimal/ppo_tldr).
#   Plot: benchmark/reproduce/openrlbenchmark.sh (from W&B), or from the local files:
#   python benchmark/plot.py --run "ours=models/minimal/ppo_tldr/seed_*" --output benchmark/plots/ppo_tldr.png
set -euo pipefail
cd "$(dirname "$0")/../.."
export WANDB_TAGS="$(git rev-parse --short HEAD),benchmark"

# Pythia's tokenizer has no pad token: ppo_rlhf_tldr.py adds a dedicated [PAD] (id 50277, inside Pythia's 50304-row
# embedding, so nothing is resized), as TRL's example did, and saves it with the policy.
# Precision: --bf16, as TRL's published runs (its PPOConfig defaults to bf16, and TRL's deepspeed_zero2.yaml set
# mixed_precision bf16). Not --gradient_checkpointing: TRL's flag was a no-op in its PPOTrainer, so the published runs
# did not recompute activations; it would change memory and time only, not the numbers, and Pythia-1B fits in 80 GB.
for SEED in 1 2 3 4; do
    accelerate launch --config_file benchmark/accelerate_configs/deepspeed_zero2.yaml \
        ppo_rlhf_tldr.py \
        --dataset_name trl-lib/tldr \
        --dataset_test_split validation \
        --output_dir models/minimal/ppo_tldr/seed_$SEED \
        --learning_rate 3e-6 \
        --per_device_train_batch_size 16 \
        --gradient_accumulation_steps 4 \
        --total_episodes 1000000 \
        --model_name_or_path EleutherAI/pythia-1b-deduped \
        --sft_model_path cleanrl/EleutherAI_pythia-1b-deduped__sft__tldr \
        --reward_model_path cleanrl/EleutherAI_pythia-1b-deduped__reward__tldr \
        --local_rollout_forward_batch_size 16 \
        --missing_eos_penalty 1.0 \
        --stop_token eos \
        --eval_strategy steps \
        --eval_steps 100 \
        --bf16 \
        --seed $SEED \
        --track
done
