"""The models users bring: every architecture of tests/tiny_archs.MATRIX through the whole pipeline (sft.py ->
reward_modeling.py with its defaults, normalisation on -> ppo_rlhf.py for two updates), tokenizers without a pad token
(the real GPT-NeoX-20B tokenizer, as Pythia ships it), and the checks on reward/value models and context lengths.

The scripts run in this process (runpy, as `python script.py ...` would, with the imports shared), so that each
architecture costs a few seconds rather than three interpreter starts."""

import json
import os
import runpy
import shutil
import sys

import pytest
import torch

from conftest import ROOT, SHARED, run_in_process
from tiny_archs import MATRIX, save_tiny_causal_lm

EMBEDDED = os.path.join(ROOT, "embedded")
NEOX_TOKENIZER = os.path.join(SHARED, "data", "tokenizers", "gpt-neox-20b_tokenizer.json")


def run_inline(script, argv, tmp_path, monkeypatch, capsys) -> str:
    """Run `python <script> <argv>` in this process; returns its stdout, or fails the test with its error."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setattr(sys, "argv", [script, *argv])
    capsys.readouterr()
    try:
        runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
    except SystemExit as e:
        if e.code not in (None, 0):
            pytest.fail(f"{script} {' '.join(argv)} exited: {e.code}\n{capsys.readouterr().out[-3000:]}")
    return capsys.readouterr().out


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """A few rows of each embedded dataset, so that each script spends its time on the model, not the data."""
    from datasets import DatasetDict, load_from_disk

    root = tmp_path_factory.mktemp("data")
    sft, pref, prompts = (load_from_disk(os.path.join(EMBEDDED, n)) for n in ("sft_data", "preference_data", "prompts"))
    DatasetDict(train=sft["train"].select(range(32)), validation=sft["validation"].select(range(8))).save_to_disk(str(root / "sft"))
    DatasetDict(train=pref["train"].select(range(32)), test=pref["test"].select(range(8))).save_to_disk(str(root / "pref"))
    DatasetDict(train=prompts["train"].select(range(16)), validation=prompts["validation"].select(range(4))).save_to_disk(str(root / "prompts"))
    return {name: str(root / name) for name in ("sft", "pref", "prompts")}


def reference_sequences(tokenizer, data_dir, n=8, max_length=256):
    """What reward_modeling.py scores for its normalisation: prompt + completion + EOS of the first n references."""
    from datasets import load_from_disk

    refs = load_from_disk(data_dir)["validation"].select(range(n))
    seqs = [tokenizer(p + c, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            for p, c in zip(refs["prompt"], refs["completion"])]
    return [s for s in seqs if len(s) <= max_length]


def stock_scores(path, sequences):
    """Scores of a saved reward model as a stock from_pretrained reads them, plus config.reward_shift if any."""
    import reward_modeling as rm
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    pad = AutoTokenizer.from_pretrained(path).pad_token_id
    with torch.no_grad():
        scores = rm.get_reward(model, *rm.pad_batch(sequences, pad))
    return scores, getattr(model.config, "reward_shift", 0.0)


def pipeline(base, data, out, tmp_path, monkeypatch, capsys, ppo_extra=()) -> dict:
    """sft.py -> reward_modeling.py (defaults: normalisation on) -> ppo_rlhf.py, two updates of 4 rollouts, one PPO epoch
    and one mini-batch each (so update 1's val/ratio is the first mini-batch's). Returns the logs and paths."""
    sft_out, rm_out, ppo_out = (os.path.join(out, n) for n in ("sft", "rm", "ppo"))
    logs = {}
    logs["sft"] = run_inline("sft.py", ["--model-name-or-path", base, "--dataset-name", data["sft"], "--output-dir", sft_out,
                                        "--num-train-epochs", "1", "--per-device-train-batch-size", "16",
                                        "--num-sample-completions", "0", "--logging-steps", "1"], tmp_path, monkeypatch, capsys)
    logs["rm"] = run_inline("reward_modeling.py", [
        "--model-name-or-path", sft_out, "--dataset-name", data["pref"], "--output-dir", rm_out,
        "--normalize-dataset-name", data["sft"], "--normalize-num-examples", "8", "--per-device-train-batch-size", "16",
        "--logging-steps", "1"], tmp_path, monkeypatch, capsys)
    logs["ppo"] = run_inline("ppo_rlhf.py", [
        "--model-name-or-path", sft_out, "--sft-model-path", sft_out, "--reward-model-path", rm_out,
        "--dataset-name", data["prompts"], "--output-dir", ppo_out, "--total-episodes", "8",
        "--per-device-train-batch-size", "4", "--gradient-accumulation-steps", "1", "--num-ppo-epochs", "1",
        "--local-rollout-forward-batch-size", "4", "--response-length", "8", "--num-sample-generations", "0",
        "--eval-strategy", "no", *ppo_extra], tmp_path, monkeypatch, capsys)
    with open(os.path.join(ppo_out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {"logs": logs, "rows": rows, "sft": sft_out, "rm": rm_out, "ppo": ppo_out}


@pytest.fixture(scope="module")
def embedded_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.join(EMBEDDED, "sft_model"))


@pytest.mark.slow
@pytest.mark.parametrize("arch", MATRIX)
def test_every_architecture_runs_the_pipeline(arch, small_data, embedded_tokenizer, tmp_path, monkeypatch, capsys):
    from transformers import AutoTokenizer

    base = save_tiny_causal_lm(arch, tmp_path / "base", tokenizer=embedded_tokenizer)
    run = pipeline(base, small_data, str(tmp_path / "out"), tmp_path, monkeypatch, capsys)
    updates = [r for r in run["rows"] if "val/ratio" in r]
    assert [r["update"] for r in updates] == [1, 2], run["rows"]
    assert abs(updates[0]["val/ratio"] - 1.0) < 1e-5, updates[0]  # fp32, first mini-batch: the rollout's own policy
    # The normalisation: the references score 0 on average, as a stock from_pretrained (+ config.reward_shift) reads
    # them; the shift sits in a norm bias exactly where the architecture has one before the head.
    # (The tokenizer as saved with the model: in transformers 5 a model folder's model_type picks the tokenizer class,
    # and Qwen2's tokenises the same tokenizer.json differently from the embedded one.)
    saved_tokenizer = AutoTokenizer.from_pretrained(run["rm"])
    scores, shift = stock_scores(run["rm"], reference_sequences(saved_tokenizer, small_data["sft"]))
    assert abs((scores + shift).mean().item()) < 1e-4, (scores, shift)
    in_bias = arch in ("gpt_neox", "gpt2", "opt")
    assert (shift == 0.0) == in_bias, shift
    assert ("the final norm's bias" if in_bias else "config.reward_shift") in run["logs"]["rm"]


@pytest.mark.slow
def test_attention_dropout_in_the_config_still_runs(small_data, embedded_tokenizer, tmp_path, monkeypatch, capsys):
    base = save_tiny_causal_lm("llama", tmp_path / "base", tokenizer=embedded_tokenizer, attention_dropout=0.3)
    run = pipeline(base, small_data, str(tmp_path / "out"), tmp_path, monkeypatch, capsys)
    assert [r["update"] for r in run["rows"] if "val/ratio" in r] == [1, 2]
