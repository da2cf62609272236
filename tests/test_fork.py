"""Forking keeps working: a researcher copies ppo_rlhf.py to a new name next to it, changes one line of the algorithm
and runs it. Here the line is the KL estimator of the per-token penalty, written out inline as k3 in place of the
call that follows --kl-estimator; the fork, run with the default --kl-estimator k1, must train exactly as the
unforked script does with --kl-estimator k3."""

import json
import os
import uuid

import pytest
from helpers import ONE_THREAD, ROOT, run_script

CALL = "kl_penalty(logprobs, ref_logprobs, args.kl_estimator)"
INLINE_K3 = "torch.expm1(ref_logprobs - logprobs) - (ref_logprobs - logprobs)"
# 3 updates of 8 episodes, 16-token responses, one evaluation at the end on 8 prompts.
TINY = (
    "--total-episodes 24 --per-device-train-batch-size 4 --gradient-accumulation-steps 2 "
    "--local-rollout-forward-batch-size 8 --num-sample-generations 0 --eval-steps 100 --num-eval-prompts 8 "
    "--response-length 16"
).split()


def rows(out) -> list:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def training(out) -> list:
    """Per update, what the algorithm computed (not the timings, nor episodes per second)."""
    return [{k: v for k, v in r.items() if not k.startswith("time/") and k != "eps"} for r in rows(out)]


@pytest.mark.slow
def test_a_copy_with_the_kl_estimator_written_inline_runs_and_trains_as_that_estimator(tmp_path):
    source = open(os.path.join(ROOT, "ppo_rlhf.py")).read()
    assert source.count(CALL) == 1, f"ppo_rlhf.py no longer computes the KL penalty as `{CALL}`: update this test"
    fork = f"ppo_rlhf_k3fork_{uuid.uuid4().hex[:8]}.py"
    env = {**ONE_THREAD, "HF_DATASETS_CACHE": str(tmp_path / "hf_cache")}
    try:
        with open(os.path.join(ROOT, fork), "w") as f:
            f.write(source.replace(CALL, INLINE_K3))
        run_script(fork, *TINY, "--output-dir", str(tmp_path / "fork"), env=env, timeout=300)
    finally:
        os.remove(os.path.join(ROOT, fork))
    run_script("ppo_rlhf.py", *TINY, "--kl-estimator", "k3", "--output-dir", str(tmp_path / "k3"), env=env)

    out = tmp_path / "fork"
    assert (out / "model.safetensors").is_file() and (out / "value_model" / "model.safetensors").is_file()
    assert fork in (out / "README.md").read_text()  # the card says which script made the model
    forked, k3 = training(out), training(tmp_path / "k3")
    # three updates, the evaluation after the last one, then the final evaluation whose completions are saved
    assert [r.get("update") for r in forked] == [1, 2, 3, 3, 3]
    # The fork ran its own line: with the flag at k1 it trains, update by update, as the script does with k3 ...
    assert forked == k3
    # ... and k3 is not k1 here: the policy has moved from the reference after the first update, and k3 (unlike k1)
    # is never negative.
    kls = [r["objective/kl"] for r in forked if "objective/kl" in r]
    assert kls[0] == 0.0 and all(kl > 0 for kl in kls[1:]), kls
