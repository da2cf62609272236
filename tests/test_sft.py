"""Tests of sft.py: completion-only loss masking, padding, EOS, a tiny end-to-end run as a user would do it, and
bad inputs that must stop the script before training, naming the argument to fix and writing nothing."""

import dataclasses
import json
import math
import os
import re

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

import sft  # noqa: E402

EMBEDDED = os.path.join(ROOT, "embedded")
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # the 2 CPUs are shared: one uncontended thread is much faster than two


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.join(EMBEDDED, "tokenizer"))


@pytest.fixture(scope="module")
def examples():
    from datasets import load_from_disk

    return load_from_disk(os.path.join(EMBEDDED, "sft_data"))["validation"].select(range(32))


# ---------------------------------------------------------------------------------------------------------------
# tokenisation, padding, masking


def test_tokenize_example_masks_the_prompt_and_appends_eos(tokenizer, examples):
    for row in examples.select(range(8)):
        out = sft.tokenize_example(tokenizer, row["prompt"], row["completion"])
        p = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        c = tokenizer(row["completion"], add_special_tokens=False)["input_ids"]
        assert out["input_ids"] == p + c + [tokenizer.eos_token_id]
        assert out["labels"] == [-100] * len(p) + c + [tokenizer.eos_token_id]
        assert tokenizer.decode(out["input_ids"]) == row["prompt"] + row["completion"] + tokenizer.eos_token
        assert tokenizer.pad_token_id not in out["input_ids"]


def test_collate_right_pads_with_attention_and_labels_masked(tokenizer, examples):
    rows = [sft.tokenize_example(tokenizer, r["prompt"], r["completion"]) for r in examples.select(range(5))]
    lengths = [len(r["input_ids"]) for r in rows]
    prompt_lengths = [r["labels"].count(-100) for r in rows]
    assert len(set(lengths)) > 1  # the test needs padding to happen
    pad = tokenizer.pad_token_id
    batch = sft.collate(rows, pad)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (5, max(lengths))
    for i, (n, np_) in enumerate(zip(lengths, prompt_lengths)):
        assert batch["input_ids"][i, :n].tolist() == rows[i]["input_ids"]
        assert (batch["input_ids"][i, n:] == pad).all()
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (max(lengths) - n)
        # labels are -100 exactly on prompt and pad positions, the token ids everywhere else
        masked = (batch["labels"][i] == -100).tolist()
        assert masked == [t < np_ or t >= n for t in range(max(lengths))]
        assert batch["labels"][i, np_:n].tolist() == rows[i]["input_ids"][np_:n]
        assert batch["labels"][i, n - 1].item() == tokenizer.eos_token_id


def hand_cross_entropy(logits, labels):
    """Mean over completion tokens of -log p(token | everything before it), written out position by position."""
    total, count = 0.0, 0
    for b in range(labels.shape[0]):
        for t in range(1, labels.shape[1]):
            if labels[b, t] != -100:
                total -= torch.log_softmax(logits[b, t - 1].double(), -1)[labels[b, t]].item()
                count += 1
    return total / count, count


def test_completion_loss_is_cross_entropy_over_completion_tokens_only(tokenizer, examples):
    rows = [sft.tokenize_example(tokenizer, r["prompt"], r["completion"]) for r in examples.select(range(3))]
    batch = sft.collate(rows, tokenizer.pad_token_id)
    labels = batch["labels"]
    torch.manual_seed(0)
    logits = torch.randn(*labels.shape, 50) * 3
    labels = labels.clamp(max=49).masked_fill(labels == -100, -100)  # fit a 50-token vocabulary
    expected, count = hand_cross_entropy(logits, labels)
    assert count == sum(len(r["input_ids"]) - r["labels"].count(-100) for r in rows)
    assert sft.completion_loss(logits, labels).item() == pytest.approx(expected, rel=1e-5)
    assert sft.completion_loss(logits, labels, reduction="sum").item() == pytest.approx(expected * count, rel=1e-5)

    # Logits at positions that predict a prompt or pad token (and the last position) do not matter...
    predicts_masked = torch.zeros(labels.shape, dtype=torch.bool)
    predicts_masked[:, :-1] = labels[:, 1:] == -100
    predicts_masked[:, -1] = True
    changed = logits.clone()
    changed[predicts_masked] = torch.randn(int(predicts_masked.sum()), 50) * 10
    assert sft.completion_loss(changed, labels).item() == pytest.approx(expected, rel=1e-5)
    # ...and the logit that predicts the first completion token does.
    first = rows[0]["labels"].count(-100)
    changed[0, first - 1, labels[0, first]] += 5.0
    assert sft.completion_loss(changed, labels).item() < expected - 1e-3


def test_completion_loss_matches_the_hf_causal_lm_loss(tokenizer, examples):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(os.path.join(EMBEDDED, "sft_model")).eval()
    batch = sft.collate(
        [sft.tokenize_example(tokenizer, r["prompt"], r["completion"]) for r in examples.select(range(4))],
        tokenizer.pad_token_id,
    )
    with torch.no_grad():
        out = model(**batch)
    assert sft.completion_loss(out.logits, batch["labels"]).item() == pytest.approx(out.loss.item(), rel=1e-5)
    # the trained SFT model has learned the completions: far below the uniform ln(vocab)
    assert out.loss.item() < 0.5 * math.log(len(tokenizer))


# ---------------------------------------------------------------------------------------------------------------
# the script as a user runs it


def help_text(script: str) -> str:
    proc = run_script(script, "--help", env=ONE_THREAD, timeout=120)
    return re.sub(r"[\s│╭╮╰╯─]+", " ", proc.stdout)


def test_help_lists_every_argument_with_its_docstring():
    text = help_text("sft.py")
    for field in dataclasses.fields(sft.Args):
        assert f"--{field.name.replace('_', '-')} " in text or f"--{field.name.replace('_', '-')}," in text, field.name
    for doc in (
        "the base model: a hub id or a local folder",
        "peak learning rate",
        "passes over the training split",
        "a dedicated [PAD] is added",
    ):
        assert doc in text


@pytest.mark.slow
def test_sft_tiny_run_saves_a_loadable_model_and_finite_eval_loss(tmp_path, examples, tokenizer):
    from datasets import DatasetDict, load_from_disk
    from transformers import AutoModelForCausalLM, AutoTokenizer

    full = load_from_disk(os.path.join(EMBEDDED, "sft_data"))
    DatasetDict(train=full["train"].select(range(160)), validation=examples).save_to_disk(str(tmp_path / "data"))
    out = tmp_path / "sft_out"
    proc = run_script(
        "sft.py",
        "--dataset-name",
        str(tmp_path / "data"),
        "--model-name-or-path",
        os.path.join(EMBEDDED, "base_model"),
        "--num-train-epochs",
        "1",
        "--per-device-train-batch-size",
        "16",
        "--logging-steps",
        "5",
        "--num-sample-completions",
        "2",
        "--sample-max-new-tokens",
        "12",
        "--output-dir",
        str(out),
        env={**ONE_THREAD, "HF_DATASETS_CACHE": str(tmp_path / "cache")},
        timeout=600,
    )
    assert "160 train / 32 eval examples" in proc.stdout
    assert {"config.json", "model.safetensors", "tokenizer.json", "metrics.jsonl", "args.json"} <= set(os.listdir(out))
    assert not os.path.exists(str(out) + ".tmp")
    with open(out / "metrics.jsonl") as f:
        metrics = [json.loads(line) for line in f]
    assert [m["step"] for m in metrics if "train/loss" in m] == [5, 10]  # 160 examples / 16 per step
    (eval_row,) = [m for m in metrics if "eval/loss" in m]
    assert eval_row["step"] == 10 and math.isfinite(eval_row["eval/loss"])
    with open(out / "args.json") as f:
        assert json.load(f)["per_device_train_batch_size"] == 16

    saved_tok = AutoTokenizer.from_pretrained(str(out))
    assert saved_tok.pad_token_id is not None and saved_tok.pad_token_id != saved_tok.eos_token_id
    assert saved_tok.get_vocab() == tokenizer.get_vocab()
    trained = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    base = AutoModelForCausalLM.from_pretrained(os.path.join(EMBEDDED, "base_model")).eval()
    batch = sft.collate(
        [sft.tokenize_example(tokenizer, r["prompt"], r["completion"]) for r in examples], tokenizer.pad_token_id
    )
    with torch.no_grad():
        trained_loss = sft.completion_loss(
            trained(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch["labels"]
        ).item()
        base_loss = sft.completion_loss(
            base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch["labels"]
        ).item()
    # The saved weights are the evaluated ones, and ten steps of training already beat the random base model.
    assert trained_loss == pytest.approx(eval_row["eval/loss"], rel=1e-4)
    assert trained_loss < base_loss - 0.5


def test_text_column_trains_on_every_token_with_step_evaluation_for_half_an_epoch(tmp_path, examples, tokenizer):
    """TRL's language-modelling format (a `text` column: nothing masked, EOS appended), --eval-strategy steps with
    --eval-steps, and --num-train-epochs 0.5: half of the optimizer steps, rounded up."""
    from datasets import Dataset

    row = {"text": "Hello world, again."}
    ids = tokenizer(row["text"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert sft.tokenize_row(tokenizer, row, "language modeling") == {"input_ids": ids, "labels": ids}
    assert sft.sft_format(Dataset.from_list([row]), "d") == "language modeling"
    texts = [{"text": r["prompt"] + r["completion"]} for r in examples.select(range(30))]  # 27 train, 3 held out
    out = tmp_path / "out"
    proc = run_script(
        *"sft.py --num-train-epochs 0.5 --per-device-train-batch-size 3 --eval-strategy steps --eval-steps 2".split(),
        *"--logging-steps 1 --num-sample-completions 1 --sample-max-new-tokens 2".split(),
        *["--dataset-name", write_jsonl(tmp_path / "d.jsonl", texts), "--output-dir", str(out)],
        *["--model-name-or-path", os.path.join(EMBEDDED, "base_model")],
        env=ONE_THREAD,
    )
    assert "27 train / 3 eval examples (language modeling format)" in proc.stdout, proc.stdout[-2000:]
    with open(out / "metrics.jsonl") as f:
        metrics = [json.loads(line) for line in f]
    assert [m["step"] for m in metrics if "train/loss" in m] == [1, 2, 3, 4, 5]  # 9 steps an epoch: 4.5, rounded up
    assert [m["step"] for m in metrics if "eval/loss" in m] == [2, 4]  # every 2 steps, none at the epoch's end
    assert all(math.isfinite(m["eval/loss"]) for m in metrics if "eval/loss" in m)


def test_sigkill_after_a_checkpoint_then_resume_latest_is_bitwise_identical(tmp_path, examples):
    from datasets import DatasetDict, load_from_disk

    full = load_from_disk(os.path.join(EMBEDDED, "sft_data"))
    DatasetDict(train=full["train"].select(range(72)), validation=examples.select(range(16))).save_to_disk(
        str(tmp_path / "data")
    )
    # 72 examples in batches of 8, two batches per optimizer step: 5 steps per epoch (the last on one batch), 10 in all,
    # so the random checkpoint may fall mid-epoch or at an epoch's end, before its evaluation.
    args = [
        "--dataset-name",
        str(tmp_path / "data"),
        "--model-name-or-path",
        os.path.join(EMBEDDED, "base_model"),
        "--num-train-epochs",
        "2",
        "--per-device-train-batch-size",
        "8",
        "--gradient-accumulation-steps",
        "2",
        "--logging-steps",
        "1",
        "--num-sample-completions",
        "1",
        "--sample-max-new-tokens",
        "8",
    ]
    assert_exact_resume("sft.py", args, tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# bad input: stop before training, name the argument, write nothing


def good_args(tmp_path):
    return {
        "--model-name-or-path": os.path.join(EMBEDDED, "base_model"),
        "--dataset-name": os.path.join(EMBEDDED, "sft_data"),
        "--output-dir": str(tmp_path / "out"),
    }


def no_completion_column(tmp_path):
    return {
        "--dataset-name": write_jsonl(
            tmp_path / "d.jsonl", [{"prompt": "SUBREDDIT: r/x\n\nTITLE: t\n\nPOST: p\n\nTL;DR:"}]
        )
    }


def empty_dataset(tmp_path):
    from datasets import Dataset

    Dataset.from_dict({"prompt": [], "completion": []}).save_to_disk(str(tmp_path / "empty"))
    return {"--dataset-name": str(tmp_path / "empty")}


def checkpoint_of(tmp_path, **changes) -> dict:
    return fake_checkpoint(tmp_path, sft.Args, good_args(tmp_path), **changes)


BAD_INPUTS = {
    # case: (changes to the good arguments, the argument the message must name, a word the message must contain)
    "missing completion column": (no_completion_column, "--dataset-name", "completion"),
    "empty jsonl file": (
        lambda t: {"--dataset-name": write_jsonl(t / "e.jsonl", [])},
        "--dataset-name",
        "could not load",
    ),
    # datasets 5 cannot load back an empty save_to_disk folder (0 shards), so the script's "is empty" check is not
    # reached; the load error names --dataset-name, which is the argument to change.
    "empty dataset": (empty_dataset, "--dataset-name", "could not load"),
    "missing train split": (lambda t: {"--dataset-train-split": "nope"}, "--dataset-train-split", "nope"),
    "eval steps without the steps strategy": (
        lambda t: {"--eval-steps": "5"},
        "--eval-steps",
        "--eval-strategy steps",
    ),
    "eval steps 0": (lambda t: {"--eval-strategy": "steps", "--eval-steps": "0"}, "--eval-steps", "positive"),
    "text column of conversations": (
        lambda t: {"--dataset-name": write_jsonl(t / "c.jsonl", [{"text": [{"role": "user", "content": "Hi."}]}])},
        "--dataset-name",
        "`text` must hold strings",
    ),
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
    "non-positive learning rate": (lambda t: {"--learning-rate": "0"}, "--learning-rate", "positive"),
    "non-empty output dir": (lambda t: {}, "--output-dir", "--overwrite-output-dir"),
    **resume_bad_inputs(checkpoint_of),
    # numbers out of range
    "negative seed": (lambda t: {"--seed": "-1"}, "--seed", "[0, 2**32 - 1]"),
    "warmup ratio above 1": (lambda t: {"--warmup-ratio": "1.5"}, "--warmup-ratio", "[0, 1]"),
    "resume with another batch size": (
        lambda t: checkpoint_of(t, per_device_train_batch_size=16, learning_rate=1e-3),
        "--resume-from-checkpoint",
        "--per-device-train-batch-size 16 (now 32)",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_stops_before_training_naming_the_argument(case, tmp_path, monkeypatch):
    make, argument, word = BAD_INPUTS[case]
    assert_bad_input_stops_before_training(
        "sft.py", case, make, argument, word, good_args(tmp_path), tmp_path, monkeypatch
    )


@pytest.mark.parametrize("pad", [None, "eos"])
def test_tokenizer_without_a_distinct_pad_passes_validation(pad, tmp_path, monkeypatch):
    """No pad token, or pad == EOS (Pythia, Llama, Mistral; GPT-2 setups): the script adds a dedicated [PAD] (checked
    end to end in tests/test_architectures.py) instead of refusing."""
    args = {**good_args(tmp_path), "--model-name-or-path": copy_model_with_pad(tmp_path, pad)}
    assert isinstance(
        run_in_process("sft.py", [x for kv in args.items() for x in kv], tmp_path, monkeypatch), ReachedTraining
    )


def test_good_input_passes_validation(tmp_path, monkeypatch):
    """The control for the table above: with nothing broken, the same harness reaches training."""
    args = good_args(tmp_path)
    assert isinstance(
        run_in_process("sft.py", [x for kv in args.items() for x in kv], tmp_path, monkeypatch), ReachedTraining
    )


def test_resume_with_the_same_arguments_passes_validation(tmp_path, monkeypatch):
    """The control for the resume cases: only the arguments that change the run count as a mismatch."""
    args = {**good_args(tmp_path), **checkpoint_of(tmp_path, save_steps=5, logging_steps=3, output_dir="elsewhere")}
    assert isinstance(
        run_in_process("sft.py", [x for kv in args.items() for x in kv], tmp_path, monkeypatch), ReachedTraining
    )


def test_bad_input_from_the_command_line_exits_nonzero(tmp_path):
    out = tmp_path / "out"
    proc = run_script(
        "sft.py",
        "--dataset-name",
        no_completion_column(tmp_path)["--dataset-name"],
        "--output-dir",
        str(out),
        check=False,
        env={**ONE_THREAD, "HF_DATASETS_CACHE": str(tmp_path / "cache")},
        timeout=120,
    )
    assert proc.returncode == 1
    assert "error: --dataset-name:" in proc.stderr and "completion" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_one_batch_and_the_same_data_as_two_micro_batches_give_the_same_loss_and_weights(tmp_path):
    """The loss of an optimizer step is its token sum over the step's completion tokens: one batch of 4 and the same 4
    examples as 2 micro-batches of 2 log the same loss and take the same step (a mean of the two micro-batches' means
    weighs their tokens differently, e.g. 2.3418 against 2.3150)."""
    from datasets import DatasetDict, load_from_disk
    from safetensors.torch import load_file

    full = load_from_disk(os.path.join(EMBEDDED, "sft_data"))
    # examples of different lengths, so that the two micro-batches hold different numbers of completion tokens
    train = full["train"].select(range(40))
    lengths = [len(c) for c in train["completion"]]
    order = sorted(range(40), key=lambda i: lengths[i])
    DatasetDict(
        train=train.select([order[0], order[1], order[-2], order[-1]]), validation=full["validation"].select(range(4))
    ).save_to_disk(str(tmp_path / "data"))
    outs = {}
    for name, micro, steps in (("one_batch", "4", "1"), ("two_micro_batches", "2", "2")):
        outs[name] = tmp_path / name
        run_script(
            "sft.py",
            "--dataset-name",
            str(tmp_path / "data"),
            "--model-name-or-path",
            os.path.join(EMBEDDED, "base_model"),
            "--num-train-epochs",
            "1",
            "--per-device-train-batch-size",
            micro,
            "--gradient-accumulation-steps",
            steps,
            "--num-sample-completions",
            "0",
            "--lr-scheduler-type",
            "constant",
            "--learning-rate",
            "1e-3",
            "--logging-steps",
            "1",
            "--output-dir",
            str(outs[name]),
            env={**ONE_THREAD, "HF_DATASETS_CACHE": str(tmp_path / "cache")},
            timeout=600,
        )
    rows = {}
    for name, out in outs.items():
        with open(out / "metrics.jsonl") as f:
            rows[name] = [json.loads(line) for line in f if "train/loss" in line]
    assert [r["step"] for r in rows["one_batch"]] == [r["step"] for r in rows["two_micro_batches"]] == [1]
    assert rows["two_micro_batches"][0]["train/loss"] == pytest.approx(rows["one_batch"][0]["train/loss"], rel=1e-5)
    a, b = (load_file(str(out / "model.safetensors")) for out in outs.values())
    base = load_file(os.path.join(EMBEDDED, "base_model", "model.safetensors"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=1e-5, msg=k)
    assert any(not torch.equal(a[k], base[k]) for k in a)  # the step was taken
