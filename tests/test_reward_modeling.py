"""Tests of reward_modeling.py: the pairwise loss, reading the score at the last real token whatever the padding,
the normalisation shift and its survival through save/load, the shipped reward model's normalisation, a tiny
end-to-end run as a user would do it, and bad inputs that must stop the script before training."""

import copy
import dataclasses
import json
import math
import os
import re
import shutil

import pytest
import torch
from helpers import (
    ROOT,
    ReachedTraining,
    assert_bad_input_stops_before_training,
    assert_exact_resume,
    copy_model_with_pad,
    fake_checkpoint,
    resume_bad_inputs,
    run_in_process,
    run_script,
    write_jsonl,
)

import reward_modeling as rm  # noqa: E402

EMBEDDED = os.path.join(ROOT, "embedded")
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # the 2 CPUs are shared: one uncontended thread is much faster than two


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.join(EMBEDDED, "reward_model"))


@pytest.fixture(scope="module")
def reward_model():
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(os.path.join(EMBEDDED, "reward_model")).eval()


def references(n: int):
    from datasets import load_from_disk

    return load_from_disk(os.path.join(EMBEDDED, "sft_data"))["validation"].select(range(n))


def encode(tokenizer, prompt, completion):
    """What the script scores: prompt + completion + EOS."""
    return tokenizer(prompt + completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


@pytest.fixture(scope="module")
def sequences(tokenizer):
    seqs = [encode(tokenizer, r["prompt"], r["completion"]) for r in references(6)]
    assert len({len(s) for s in seqs}) > 1  # padding must happen for the tests to mean anything
    return seqs


def hf_scores(model, seqs, pad_token_id):
    """Scores from the stock HF forward on a right-padded batch (it finds the last non-pad token itself)."""
    input_ids, attention_mask = rm.pad_batch(seqs, pad_token_id, side="right")
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    assert logits.shape == (len(seqs), 1)
    return logits[:, 0]


def rewards(model, seqs, pad_token_id, side="right"):
    with torch.no_grad():
        return rm.get_reward(model, *rm.pad_batch(seqs, pad_token_id, side=side))


# ---------------------------------------------------------------------------------------------------------------
# helpers


def test_pad_batch_left_and_right():
    ids, mask = rm.pad_batch([[5, 6, 7], [8]], pad_token_id=1, side="right")
    assert ids.tolist() == [[5, 6, 7], [8, 1, 1]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    ids, mask = rm.pad_batch([[5, 6, 7], [8]], pad_token_id=1, side="left")
    assert ids.tolist() == [[5, 6, 7], [1, 1, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_pairwise_loss_and_accuracy_match_the_plain_formula():
    chosen = torch.tensor([2.0, 0.5, -1.0, 3.0, 0.0])
    rejected = torch.tensor([1.0, 1.5, -1.0, -2.0, 0.0])
    loss, accuracy = rm.pairwise_loss_and_accuracy(chosen, rejected)
    plain = sum(math.log(1 + math.exp(-(c - r))) for c, r in zip(chosen.tolist(), rejected.tolist())) / 5
    assert loss.item() == pytest.approx(plain, rel=1e-6)
    assert accuracy.item() == pytest.approx(2 / 5)  # ties count as wrong
    # Large margins stay finite (log-sigmoid, not log of a sigmoid that underflows).
    loss, accuracy = rm.pairwise_loss_and_accuracy(torch.tensor([-200.0]), torch.tensor([200.0]))
    assert loss.item() == pytest.approx(400.0) and accuracy.item() == 0.0


def test_get_reward_reads_the_last_real_token_for_any_padding(reward_model, tokenizer, sequences):
    pad = tokenizer.pad_token_id
    right = rewards(reward_model, sequences, pad, "right")
    left = rewards(reward_model, sequences, pad, "left")
    single = torch.cat([rewards(reward_model, [s], pad) for s in sequences])
    assert right.shape == (len(sequences),)
    assert torch.allclose(left, right, atol=1e-4), (left, right)
    assert torch.allclose(single, right, atol=1e-4), (single, right)
    assert torch.allclose(hf_scores(reward_model, sequences, pad), right, atol=1e-4)
    assert right.std() > 1e-2  # different texts, different scores: the comparisons above are not trivially equal
    # The score is the one at EOS: dropping it changes it.
    without_eos = rewards(reward_model, [s[:-1] for s in sequences], pad)
    assert (without_eos - right).abs().max() > 1e-3


def test_get_reward_left_padding_with_absolute_position_embeddings():
    """Rotary attention (GPT-NeoX) is blind to a constant position offset, so the test above would pass without
    the position ids; a GPT-2 style model with learned absolute positions is not, and must still agree."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=40,
        n_positions=32,
        n_embd=32,
        n_layer=1,
        n_head=2,
        num_labels=1,
        pad_token_id=1,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = GPT2ForSequenceClassification(config).eval()
    seqs = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [15, 16, 17, 18, 19]]
    right, left = rewards(model, seqs, 1, "right"), rewards(model, seqs, 1, "left")
    single = torch.cat([rewards(model, [s], 1) for s in seqs])
    assert torch.allclose(left, right, atol=1e-5) and torch.allclose(single, right, atol=1e-5)
    assert torch.allclose(hf_scores(model, seqs, 1), right, atol=1e-5)
    assert right.std() > 1e-4


def test_shift_scores_moves_every_score_by_delta_and_survives_save_and_load(
    reward_model, tokenizer, sequences, tmp_path
):
    from transformers import AutoModelForSequenceClassification

    pad = tokenizer.pad_token_id
    before = rewards(reward_model, sequences, pad)
    for delta in (0.75, -2.5):
        model = copy.deepcopy(reward_model)
        rm.shift_scores(model, delta)
        after = rewards(model, sequences, pad)
        assert torch.allclose(after - before, torch.full_like(before, delta), atol=1e-4), after - before
        assert torch.allclose(
            rewards(model, sequences, pad, "left") - before, torch.full_like(before, delta), atol=1e-4
        )
        model.save_pretrained(str(tmp_path / f"shifted{delta}"))
        reloaded = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / f"shifted{delta}")).eval()
        assert torch.allclose(hf_scores(reloaded, sequences, pad) - before, torch.full_like(before, delta), atol=1e-4)
    assert torch.equal(rewards(reward_model, sequences, pad), before)  # the original was left alone


def test_shipped_reward_model_is_normalised_on_reference_completions(reward_model, tokenizer):
    seqs = [encode(tokenizer, r["prompt"], r["completion"]) for r in references(100)]
    scores = torch.cat([rewards(reward_model, seqs[i : i + 50], tokenizer.pad_token_id) for i in range(0, 100, 50)])
    assert abs(scores.mean().item()) < 0.15, scores.mean()
    assert scores.std().item() > 0.1  # a real spread of scores, not a constant zero


def test_shipped_reward_model_config_is_stock_with_one_label(reward_model, tokenizer):
    assert reward_model.config.num_labels == 1
    assert reward_model.config.pad_token_id == tokenizer.pad_token_id != tokenizer.eos_token_id
    assert reward_model.config.architectures == ["GPTNeoXForSequenceClassification"]


# ---------------------------------------------------------------------------------------------------------------
# the script as a user runs it


def test_help_lists_every_argument_with_its_docstring():
    text = re.sub(r"[\s│╭╮╰╯─]+", " ", run_script("reward_modeling.py", "--help", env=ONE_THREAD, timeout=120).stdout)
    for field in dataclasses.fields(rm.Args):
        assert f"--{field.name.replace('_', '-')} " in text or f"--{field.name.replace('_', '-')}," in text, field.name
    for doc in (
        "the SFT model the reward model starts from",
        "shift the scores so that the reference completions score 0 on average",
        "how many reference completions are scored for the normalisation",
    ):
        assert doc in text


@pytest.mark.slow
def test_reward_modeling_tiny_run_saves_a_normalised_model(tmp_path, tokenizer):
    from datasets import load_from_disk
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    load_from_disk(os.path.join(EMBEDDED, "preference_data"))["train"].select(range(64)).to_json(
        str(tmp_path / "pref.jsonl")
    )
    out = tmp_path / "rm_out"
    proc = run_script(
        "reward_modeling.py",
        "--model-name-or-path",
        os.path.join(EMBEDDED, "sft_model"),
        "--dataset-name",
        str(tmp_path / "pref.jsonl"),
        "--normalize-dataset-name",
        os.path.join(EMBEDDED, "sft_data"),
        "--normalize-num-examples",
        "32",
        "--per-device-train-batch-size",
        "16",
        "--logging-steps",
        "2",
        "--output-dir",
        str(out),
        env={**ONE_THREAD, "HF_DATASETS_CACHE": str(tmp_path / "cache")},
        timeout=600,
    )
    # one jsonl file has no splits: the last row and every 10th before it are held out
    assert "held out 7 of 64 rows of 'train' for evaluation (no 'test' split)" in proc.stdout
    assert "57 train / 7 eval pairs" in proc.stdout
    assert {"config.json", "model.safetensors", "tokenizer.json", "metrics.jsonl", "args.json"} <= set(os.listdir(out))
    assert not os.path.exists(str(out) + ".tmp")
    with open(out / "metrics.jsonl") as f:
        metrics = [json.loads(line) for line in f]
    assert [m["step"] for m in metrics if "train/loss" in m] == [2, 4]  # 57 pairs / 16 per step = 4 steps
    (eval_row,) = [m for m in metrics if "eval/loss" in m]
    assert math.isfinite(eval_row["eval/loss"]) and 0 <= eval_row["eval/accuracy"] <= 1
    assert 0 <= eval_row["eval/gold_accuracy"] <= 1  # the jsonl kept the gold column
    (norm_row,) = [m for m in metrics if "normalization/reference_mean_before" in m]
    assert math.isfinite(norm_row["normalization/reference_mean_before"])

    # A plain from_pretrained gives normalised scores: the 32 reference completions average 0.
    model = AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    saved_tok = AutoTokenizer.from_pretrained(str(out))
    assert (
        model.config.num_labels == 1 and model.config.pad_token_id == saved_tok.pad_token_id != saved_tok.eos_token_id
    )
    seqs = [encode(saved_tok, r["prompt"], r["completion"]) for r in references(32)]
    scores = hf_scores(model, seqs, saved_tok.pad_token_id)
    assert abs(scores.mean().item()) < 1e-3, scores.mean()
    assert torch.allclose(scores, rewards(model, seqs, saved_tok.pad_token_id, "left"), atol=1e-4)
    assert scores.std().item() > 1e-3
    # The eval loss in the log is the one of the saved model before its (loss-neutral) shift.
    from datasets import load_dataset

    pairs = load_dataset(
        "json", data_files=str(tmp_path / "pref.jsonl"), split="train", cache_dir=str(tmp_path / "cache")
    ).select(range(3, 64, 10))  # the held-out pairs
    chosen = hf_scores(model, [encode(saved_tok, r["prompt"], r["chosen"]) for r in pairs], saved_tok.pad_token_id)
    rejected = hf_scores(model, [encode(saved_tok, r["prompt"], r["rejected"]) for r in pairs], saved_tok.pad_token_id)
    loss, accuracy = rm.pairwise_loss_and_accuracy(chosen, rejected)
    assert loss.item() == pytest.approx(eval_row["eval/loss"], rel=1e-4)
    assert accuracy.item() == pytest.approx(eval_row["eval/accuracy"])


def test_lora_reward_model_trains_adapter_and_head_and_saves_a_plain_normalised_model(tmp_path, tokenizer):
    """--use-peft: checkpoints hold the LoRA adapter with the score head (PEFT's modules_to_save); the final folder
    holds the adapter merged into a plain, normalised classifier: the backbone changed only through the adapter
    (the embeddings as in the SFT model), the card tagged lora."""
    from datasets import load_from_disk
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    pairs = load_from_disk(os.path.join(EMBEDDED, "preference_data"))["train"].select(range(40))
    out, data = tmp_path / "out", str(tmp_path / "pref.jsonl")
    pairs.to_json(data)
    run_script(
        *"reward_modeling.py --use-peft --lora-r 4 --lora-target-modules query_key_value --save-steps 1".split(),
        *"--normalize-num-examples 16 --per-device-train-batch-size 12 --learning-rate 1e-2".split(),
        *["--model-name-or-path", os.path.join(EMBEDDED, "sft_model"), "--dataset-name", data],
        *["--normalize-dataset-name", os.path.join(EMBEDDED, "sft_data"), "--output-dir", str(out)],
        env={**ONE_THREAD, "HF_DATASETS_CACHE": str(tmp_path / "cache")},
    )
    adapters = [load_file(str(out / f"checkpoints/checkpoint-{n}/model/adapter_model.safetensors")) for n in (2, 3)]
    head = "base_model.model.score.weight"  # PEFT saves a modules_to_save copy under the module's own name
    assert any("lora_A" in k for k in adapters[1]) and not torch.equal(adapters[0][head], adapters[1][head])
    model = AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    sft_model = AutoModelForSequenceClassification.from_pretrained(os.path.join(EMBEDDED, "sft_model"))
    weights, sft_weights = model.state_dict(), sft_model.state_dict()
    assert not any("lora" in k for k in weights)
    assert torch.equal(weights["gpt_neox.embed_in.weight"], sft_weights["gpt_neox.embed_in.weight"])
    qkv = "gpt_neox.layers.0.attention.query_key_value.weight"
    assert not torch.allclose(weights[qkv], sft_weights[qkv])  # the adapter, merged
    assert torch.equal(adapters[1][head], weights["score.weight"])  # the head trained to the last step (3 in all)
    seqs = [encode(tokenizer, r["prompt"], r["completion"]) for r in references(16)]
    assert abs(hf_scores(model, seqs, tokenizer.pad_token_id).mean().item()) < 1e-3
    assert "- lora" in open(out / "README.md").read()


def test_sigkill_after_a_checkpoint_then_resume_latest_is_bitwise_identical(tmp_path):
    from datasets import DatasetDict, load_from_disk

    pref = load_from_disk(os.path.join(EMBEDDED, "preference_data"))
    DatasetDict(train=pref["train"].select(range(72)), test=pref["test"].select(range(16))).save_to_disk(
        str(tmp_path / "data")
    )
    # 72 pairs in batches of 8, two batches per optimizer step: 5 steps per epoch (the last on one batch), 10 in all,
    # so the random checkpoint may fall mid-epoch or at an epoch's end, before its evaluation.
    args = [
        "--dataset-name",
        str(tmp_path / "data"),
        "--model-name-or-path",
        os.path.join(EMBEDDED, "sft_model"),
        "--normalize-dataset-name",
        os.path.join(EMBEDDED, "sft_data"),
        "--normalize-num-examples",
        "16",
        "--num-train-epochs",
        "2",
        "--per-device-train-batch-size",
        "8",
        "--gradient-accumulation-steps",
        "2",
        "--logging-steps",
        "1",
    ]
    rows = assert_exact_resume("reward_modeling.py", args, tmp_path)
    assert sum("normalization/reference_mean_before" in r for r in rows) == 1  # the shift, computed once


# ---------------------------------------------------------------------------------------------------------------
# bad input: stop before training, name the argument, write nothing


PROMPT = "SUBREDDIT: r/x\n\nTITLE: t\n\nPOST: p\n\nTL;DR:"


def two_label_classifier(tmp_path) -> dict:
    """A copy of embedded/reward_model turned into a 2-label classifier (config num_labels=2 and id2label)."""
    from transformers import AutoConfig

    path = str(tmp_path / "two_labels")
    shutil.copytree(os.path.join(EMBEDDED, "reward_model"), path)
    config = AutoConfig.from_pretrained(path)
    config.id2label, config.label2id = {0: "BAD", 1: "GOOD"}, {"BAD": 0, "GOOD": 1}
    config.save_pretrained(path)
    reloaded = AutoConfig.from_pretrained(path)
    assert reloaded.num_labels == 2 and reloaded.architectures == ["GPTNeoXForSequenceClassification"]
    return {"--model-name-or-path": path}


def good_args(tmp_path):
    return {
        "--model-name-or-path": os.path.join(EMBEDDED, "sft_model"),
        "--dataset-name": os.path.join(EMBEDDED, "preference_data"),
        "--normalize-dataset-name": os.path.join(EMBEDDED, "sft_data"),
        "--output-dir": str(tmp_path / "out"),
    }


def empty_dataset(tmp_path):
    from datasets import Dataset

    Dataset.from_dict({"prompt": [], "chosen": [], "rejected": []}).save_to_disk(str(tmp_path / "empty"))
    return {"--dataset-name": str(tmp_path / "empty")}


def checkpoint_of(tmp_path, **changes) -> dict:
    return fake_checkpoint(tmp_path, rm.Args, good_args(tmp_path), **changes)


BAD_INPUTS = {
    # case: (changes to the good arguments, the argument the message must name, a word the message must contain)
    "missing rejected column": (
        lambda t: {"--dataset-name": write_jsonl(t / "d.jsonl", [{"prompt": PROMPT, "chosen": " a."}])},
        "--dataset-name",
        "rejected",
    ),
    "normalisation data without completion": (
        lambda t: {"--normalize-dataset-name": write_jsonl(t / "n.jsonl", [{"prompt": PROMPT, "chosen": " a."}])},
        "--normalize-dataset-name",
        "completion",
    ),
    "empty jsonl file": (
        lambda t: {"--dataset-name": write_jsonl(t / "e.jsonl", [])},
        "--dataset-name",
        "could not load",
    ),
    # datasets 5 cannot load back an empty save_to_disk folder (0 shards): the load error names --dataset-name.
    "empty dataset": (empty_dataset, "--dataset-name", "could not load"),
    "missing train split": (lambda t: {"--dataset-train-split": "nope"}, "--dataset-train-split", "nope"),
    "model path missing": (
        lambda t: {"--model-name-or-path": str(t / "no_such_model")},
        "--model-name-or-path",
        "does not exist",
    ),
    "tokenizer path missing": (
        lambda t: {"--tokenizer-name-or-path": str(t / "no_such_tok")},
        "--tokenizer-name-or-path",
        "does not exist",
    ),
    "max length past the context": (lambda t: {"--max-length": "300"}, "--max-length", "context of 256"),
    "classifier with two labels": (two_label_classifier, "--model-name-or-path", "2 labels"),
    "non-positive batch size": (
        lambda t: {"--per-device-train-batch-size": "0"},
        "--per-device-train-batch-size",
        "positive",
    ),
    "non-empty output dir": (lambda t: {}, "--output-dir", "--overwrite-output-dir"),
    **resume_bad_inputs(checkpoint_of),
    # numbers out of range
    "negative seed": (lambda t: {"--seed": "-1"}, "--seed", "[0, 2**32 - 1]"),
    "warmup ratio above 1": (lambda t: {"--warmup-ratio": "1.5"}, "--warmup-ratio", "[0, 1]"),
    "normalize num examples 0": (lambda t: {"--normalize-num-examples": "0"}, "--normalize-num-examples", "positive"),
    "resume with another model": (
        lambda t: checkpoint_of(t, model_name_or_path=os.path.join(EMBEDDED, "base_model")),
        "--resume-from-checkpoint",
        "base_model",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_stops_before_training_naming_the_argument(case, tmp_path, monkeypatch):
    make, argument, word = BAD_INPUTS[case]
    assert_bad_input_stops_before_training(
        "reward_modeling.py", case, make, argument, word, good_args(tmp_path), tmp_path, monkeypatch
    )


@pytest.mark.parametrize("pad", [None, "eos"])
def test_tokenizer_without_a_distinct_pad_passes_validation(pad, tmp_path, monkeypatch):
    """No pad token, or pad == EOS (Pythia, Llama, Mistral; GPT-2 setups): the script adds a dedicated [PAD] (checked
    end to end in tests/test_architectures.py) instead of refusing."""
    args = {**good_args(tmp_path), "--model-name-or-path": copy_model_with_pad(tmp_path, pad)}
    assert isinstance(
        run_in_process("reward_modeling.py", [x for kv in args.items() for x in kv], tmp_path, monkeypatch),
        ReachedTraining,
    )


def test_good_input_passes_validation(tmp_path, monkeypatch):
    """The control for the table above: with nothing broken, the same harness reaches training."""
    args = good_args(tmp_path)
    error = run_in_process("reward_modeling.py", [x for kv in args.items() for x in kv], tmp_path, monkeypatch)
    assert isinstance(error, ReachedTraining)


def test_resume_with_the_same_arguments_passes_validation(tmp_path, monkeypatch):
    """The control for the resume cases: only the arguments that change the run count as a mismatch."""
    args = {**good_args(tmp_path), **checkpoint_of(tmp_path, save_steps=5, logging_steps=3, output_dir="elsewhere")}
    error = run_in_process("reward_modeling.py", [x for kv in args.items() for x in kv], tmp_path, monkeypatch)
    assert isinstance(error, ReachedTraining)


def test_bad_input_from_the_command_line_exits_nonzero(tmp_path):
    out = tmp_path / "out"
    proc = run_script(
        "reward_modeling.py",
        "--model-name-or-path",
        two_label_classifier(tmp_path)["--model-name-or-path"],
        "--normalize-dataset-name",
        os.path.join(EMBEDDED, "sft_data"),
        "--output-dir",
        str(out),
        check=False,
        env=ONE_THREAD,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "error: --model-name-or-path:" in proc.stderr and "2 labels" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()
