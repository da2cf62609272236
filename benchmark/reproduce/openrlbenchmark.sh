#!/usr/bin/env bash
# Reproduces: the learning-curve figure and final-values table of TRL's PPO TL;DR benchmark, from the W&B runs of
#   benchmark/reproduce/ppo_tldr.sh (project `rlhf`, exp_name ppo_rlhf_tldr, tags <git commit> and `benchmark`),
#   with openrlbenchmark's rlops_multi_metrics: the 16 training metrics (logged under train/) against
#   train/episode, mean and band over the seeds. The second command overlays the runs TRL published for its own
#   PPOTrainer (W&B huggingface/trl, tag pr-1540, the command in TRL's PPO docs).
# Hardware: any machine with internet access and a W&B login (`wandb login`); no GPU.
# Time: a few minutes (the first call downloads the full histories with --scan-history, then caches them).
# Usage: WANDB_ENTITY=<your W&B user or team> [TAG=<git commit the runs were tagged with>] benchmark/reproduce/openrlbenchmark.sh
#   TAG defaults to the current commit, the tag ppo_tldr.sh gives runs launched from it.
# Output: benchmark/plots/openrlbenchmark/ppo_tldr_<TAG>{.png,.pdf,.svg,-time.png,...} and per-env tables
#   (.md/.csv) under benchmark/plots/openrlbenchmark/ppo_tldr_<TAG>/; the same with _vs_trl for the overlay.
# Filter syntax: the first string after --filters sets the W&B entity (we), project (wpn), x axis (xaxis), the
#   config key whose values --env-ids lists (ceik: here sft_model_path), the config key that names an experiment
#   (cen: here exp_name) and the metrics (one metrics= each); every following string is `<value of cen>?tag=..`
#   (several tag= must all be present on a run) with an optional legend label cl=.
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${WANDB_ENTITY:?set WANDB_ENTITY to the W&B user or team the ppo_tldr.sh runs were logged to}"
TAG=${TAG:-$(git rev-parse --short HEAD)}
OUT=benchmark/plots/openrlbenchmark/ppo_tldr_$TAG
METRICS="metrics=train/objective/rlhf_reward&metrics=train/objective/scores&metrics=train/objective/kl"
METRICS="$METRICS&metrics=train/objective/non_score_reward&metrics=train/objective/entropy"
METRICS="$METRICS&metrics=train/policy/approxkl_avg&metrics=train/policy/clipfrac_avg&metrics=train/loss/policy_avg"
METRICS="$METRICS&metrics=train/loss/value_avg&metrics=train/val/clipfrac_avg&metrics=train/policy/entropy_avg"
METRICS="$METRICS&metrics=train/val/ratio&metrics=train/val/ratio_var&metrics=train/val/num_eos_tokens"
METRICS="$METRICS&metrics=train/lr&metrics=train/eps"

# Needs openrlbenchmark, best in a virtualenv of its own (it pins its own wandb, pandas and seaborn):
#   python -m venv .venv-orb && .venv-orb/bin/pip install openrlbenchmark==0.3.1 && PATH=.venv-orb/bin:$PATH
# (TRL's docs use 0.2.1a5, which installs only on Python < 3.11.)

python -m openrlbenchmark.rlops_multi_metrics \
    --filters "?we=$WANDB_ENTITY&wpn=rlhf&xaxis=train/episode&ceik=sft_model_path&cen=exp_name&$METRICS" \
        "ppo_rlhf_tldr?tag=$TAG&tag=benchmark&cl=ppo_rlhf_tldr.py ($TAG)" \
    --env-ids cleanrl/EleutherAI_pythia-1b-deduped__sft__tldr \
    --pc.ncols 4 \
    --pc.ncols-legend 1 \
    --pc.xlabel "Episode" \
    --output-filename "$OUT" \
    --scan-history

# TRL's runs were logged with output_dir models/minimal/ppo_tldr and told apart by sft_model_path, hence their
# own ceik/cen; each --filters group takes its own --env-ids, in the same order.
python -m openrlbenchmark.rlops_multi_metrics \
    --filters "?we=$WANDB_ENTITY&wpn=rlhf&xaxis=train/episode&ceik=sft_model_path&cen=exp_name&$METRICS" \
        "ppo_rlhf_tldr?tag=$TAG&tag=benchmark&cl=ppo_rlhf_tldr.py ($TAG)" \
    --filters "?we=huggingface&wpn=trl&xaxis=train/episode&ceik=output_dir&cen=sft_model_path&$METRICS" \
        "cleanrl/EleutherAI_pythia-1b-deduped__sft__tldr?tag=pr-1540&cl=TRL PPOTrainer (pr-1540)" \
    --env-ids cleanrl/EleutherAI_pythia-1b-deduped__sft__tldr \
    --env-ids models/minimal/ppo_tldr \
    --pc.ncols 4 \
    --pc.ncols-legend 1 \
    --pc.xlabel "Episode" \
    --output-filename "${OUT}_vs_trl" \
    --scan-history
