"""Tests of ppo_rlhf.py run as a user runs it (`python ppo_rlhf.py ...` in a subprocess): the logged metrics, the
fixed defects of the references (ratio 1 on the first mini-batch, one optimizer step per mini-batch, non-negative
entropy, micro-batch invariance, gradient checkpointing), determinism, saving, exact resume after SIGKILL, the NaN
guard, W&B offline tracking, bad input, and a slow end-to-end run that must beat the SFT policy on the gold judge.

The training runs are tiny and shared between tests: a module fixture starts every run that the selected tests need
in a pool of two worker threads (one single-threaded subprocess each, so the two shared CPUs are both busy while the
main process runs the cheap tests), and each test waits for the runs it reads."""

import glob
import json
import math
import os
import re
import runpy
import shutil
import signal
import sys
import time

import pytest
from helpers import (
    ONE_THREAD,
    ROOT,
    Background,
    Finished,
    checkpoints_in,
    copy_model_with_pad,
    kill_after_a_checkpoint_then_resume,
    needs,
    run_script,
    wanted_runs,
    write_jsonl,
)

EMBEDDED = os.path.join(ROOT, "embedded")
SCRIPT = os.path.join(ROOT, "ppo_rlhf.py")

# 32 episodes in 4 updates of 8 (4 x 2 micro-batches), 24-token responses, evaluation on 8 prompts after updates 2, 4.
TINY = [
    "--total-episodes",
    "32",
    "--per-device-train-batch-size",
    "4",
    "--gradient-accumulation-steps",
    "2",
    "--local-rollout-forward-batch-size",
    "8",
    "--num-sample-generations",
    "0",
    "--eval-steps",
    "2",
    "--num-eval-prompts",
    "8",
    "--response-length",
    "24",
]
NUM_UPDATES, BATCH = 4, 8
SAVE = ["--save-steps", "1", "--save-total-limit", "2"]

REFERENCE_METRICS = [
    "eps",
    "objective/kl",
    "objective/entropy",
    "objective/non_score_reward",
    "objective/rlhf_reward",
    "objective/scores",
    "policy/approxkl_avg",
    "policy/clipfrac_avg",
    "loss/policy_avg",
    "loss/value_avg",
    "val/clipfrac_avg",
    "policy/entropy_avg",
    "val/ratio",
    "val/ratio_var",
    "val/num_eos_tokens",
    "lr",
    "episode",
]


# ---------------------------------------------------------------------------------------------------------------
# running the script


def ppo(runner, name, args, timeout=900):
    """A background run of `python ppo_rlhf.py <args> --output-dir root/<name>`."""
    out = os.path.join(runner.root, name)
    return runner.run(name, [sys.executable, SCRIPT, *args, "--output-dir", out], timeout=timeout, out=out)


def nan_reward_model(root):
    """A copy of the embedded reward model whose score head is NaN."""
    import torch
    from transformers import AutoModelForSequenceClassification

    path = os.path.join(root, "nan_reward_model")
    model = AutoModelForSequenceClassification.from_pretrained(os.path.join(EMBEDDED, "reward_model"))
    with torch.no_grad():
        model.score.weight.fill_(float("nan"))
    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(EMBEDDED, "reward_model", name), path)
    return path


def kill_and_resume(runner):
    """Start the `base` run, SIGKILL it at a random moment after checkpoint-K (K random in 1..n-1) exists, then resume
    it with --resume-from-checkpoint latest and the same other arguments."""
    out = os.path.join(runner.root, "resumed")
    args = [*TINY, *SAVE, "--output-dir", out]
    return kill_after_a_checkpoint_then_resume(runner, "resumed", "ppo_rlhf.py", args, NUM_UPDATES, max_delay=0.6)


def sigterm_and_resume(runner):
    """Start the `base` run without periodic checkpoints, SIGTERM it once update 1 is logged (what a cluster sends
    before pre-empting a job), then resume it with --resume-from-checkpoint latest."""
    out = os.path.join(runner.root, "sigterm")
    cmd = [sys.executable, SCRIPT, *TINY, "--save-steps", "0", "--output-dir", out]
    proc = runner.start("sigterm", cmd)
    metrics, deadline = os.path.join(out, "metrics.jsonl"), time.time() + 600
    while proc.poll() is None and time.time() < deadline:
        if os.path.exists(metrics) and '"update": 1' in open(metrics).read():
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.02)
    stopped = runner.wait(proc, "sigterm", cmd, out=out)
    at_stop = checkpoints_in(out)
    resumed = runner.run("sigterm_resumed", [*cmd, "--resume-from-checkpoint", "latest"], out=out)
    return {"stopped": stopped, "checkpoints_at_stop": at_stop, "resumed": resumed}


def overwrite_an_earlier_run(runner):
    """An earlier run's output (checkpoints 3 and 4, a LoRA adapter), then a 2-update run with --overwrite-output-dir."""
    out = os.path.join(runner.root, "overwrite")
    for n in (3, 4):
        os.makedirs(os.path.join(out, "checkpoints", f"checkpoint-{n}", "policy"))
        with open(os.path.join(out, "checkpoints", f"checkpoint-{n}", "state.pt"), "w") as f:
            f.write("an earlier run's checkpoint")
    with open(os.path.join(out, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "base_model_name_or_path": "elsewhere", "r": 8}, f)
    return ppo(runner, "overwrite", [*TINY, *SAVE, "--total-episodes", "16", "--overwrite-output-dir"])


def plan(runner):
    """Every run a test may ask for, by name; the order is the start order (the long end-to-end run first)."""
    return {
        # the default run, as documented: python ppo_rlhf.py --output-dir ...
        "e2e": lambda: ppo(runner, "e2e", [], timeout=2400),
        "base": lambda: ppo(runner, "base", [*TINY, *SAVE]),
        "resume": lambda: kill_and_resume(runner),
        "repeat": lambda: ppo(runner, "repeat", [*TINY, *SAVE]),
        "ratio": lambda: ppo(runner, "ratio", [*TINY, "--num-ppo-epochs", "1", "--num-mini-batches", "1"]),
        "minibatch2": lambda: ppo(runner, "minibatch2", [*TINY, "--num-mini-batches", "2"]),
        "micro8": lambda: ppo(
            runner,
            "micro8",
            [*TINY, *SAVE, "--per-device-train-batch-size", "8", "--gradient-accumulation-steps", "1"],
        ),
        "checkpointing": lambda: ppo(runner, "checkpointing", [*TINY, *SAVE, "--gradient-checkpointing"]),
        "plain": lambda: ppo(runner, "plain", [*TINY, *SAVE, "--no-length-grouping", "--no-chunked-logprobs"]),
        "stop_none": lambda: ppo(runner, "stop_none", [*TINY, *SAVE, "--stop-token", "None"]),
        "multiple": lambda: ppo(runner, "multiple", [*TINY, *SAVE, "--pad-to-multiple-of", "32"]),
        "sigterm": lambda: sigterm_and_resume(runner),
        "overwrite": lambda: overwrite_an_earlier_run(runner),
        "nan": lambda: ppo(
            runner,
            "nan",
            [
                *TINY,
                *SAVE,
                "--reward-model-path",
                nan_reward_model(runner.root),
                "--value-model-path",
                os.path.join(EMBEDDED, "reward_model"),
            ],
        ),
    }


@pytest.fixture(scope="module", autouse=True)
def runs(request, tmp_path_factory):
    runner = Background(str(tmp_path_factory.mktemp("ppo_runs")))
    wanted = wanted_runs(request)
    futures = {name: runner.executor.submit(job) for name, job in plan(runner).items() if name in wanted}
    yield {name: (lambda f=f: f.result(timeout=3600)) for name, f in futures.items()}
    runner.close()


def comparable(rows):
    """Every logged value except the throughput (eps) and the wall-clock timers."""
    return [{k: v for k, v in r.items() if k != "eps" and not k.startswith("time/")} for r in rows]


def assert_same_metrics(a_rows, b_rows, tol):
    a, b = comparable(a_rows), comparable(b_rows)
    assert [sorted(r) for r in a] == [sorted(r) for r in b]
    for ra, rb in zip(a, b):
        for key in ra:
            assert math.isclose(ra[key], rb[key], rel_tol=tol, abs_tol=tol), (ra.get("update"), key, ra[key], rb[key])


def files_under(path):
    return sorted(os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path) for f in fs)


# ---------------------------------------------------------------------------------------------------------------
# bad input: a non-zero exit naming the argument, and nothing written (run while the training runs are going)


def reward_model_with_rows(tmp_path, rows):
    """A copy of embedded/reward_model whose config says `rows` embedding rows (validation reads configs only)."""
    path = str(tmp_path / f"reward_model_{rows}_rows")
    shutil.copytree(os.path.join(EMBEDDED, "reward_model"), path)
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    config["vocab_size"] = rows
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return path


def reward_model_with_other_tokenizer(tmp_path):
    """A copy of embedded/reward_model saved with another tokenizer of the same size, the same EOS and pad ids: a
    word-level vocabulary, so that every other id means another word."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = str(tmp_path / "reward_model_other_tokenizer")
    shutil.copytree(os.path.join(EMBEDDED, "reward_model"), path)
    ours = AutoTokenizer.from_pretrained(path)
    vocab = {ours.eos_token: ours.eos_token_id, ours.pad_token: ours.pad_token_id}
    vocab.update({f"word{i}": i for i in range(len(ours)) if i not in vocab.values()})
    other = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel(vocab, unk_token=ours.eos_token)),
        eos_token=ours.eos_token,
        pad_token=ours.pad_token,
    )
    for name in os.listdir(path):
        if name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            os.remove(os.path.join(path, name))
    other.save_pretrained(path)
    assert len(AutoTokenizer.from_pretrained(path)) == len(ours)  # the same size: only the ids' meaning differs
    return path


def reward_model_with_two_labels(tmp_path):
    path = str(tmp_path / "reward_model_2_labels")
    shutil.copytree(os.path.join(EMBEDDED, "reward_model"), path)
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    config.update(num_labels=2, id2label={"0": "LABEL_0", "1": "LABEL_1"}, label2id={"LABEL_0": 0, "LABEL_1": 1})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(path).num_labels == 2
    return path


def unsupported_logits_model(tmp_path):
    from transformers import AutoConfig

    AutoConfig.for_model("recurrent_gemma").save_pretrained(tmp_path / "recurrent_gemma")
    return str(tmp_path / "recurrent_gemma")


def empty_dataset(tmp_path):
    from datasets import Dataset, DatasetDict

    empty = Dataset.from_dict({"prompt": [], "completion": []})
    DatasetDict(train=empty, validation=empty).save_to_disk(str(tmp_path / "empty"))
    return str(tmp_path / "empty")


def not_a_checkpoint(tmp_path):
    path = tmp_path / "not_a_checkpoint"
    path.mkdir()
    (path / "notes.txt").write_text("no state.pt here")
    return str(path)


BAD_INPUTS = {
    # case: (extra arguments on top of TINY, built in tmp_path; the argument the error must name)
    "stop token and stop token id": (lambda t: ["--stop-token-id", "5"], "--stop-token-id"),  # --stop-token is eos
    "negative missing eos penalty": (lambda t: ["--missing-eos-penalty", "-1"], "--missing-eos-penalty"),
    "mini-batches do not divide the batch": (lambda t: ["--num-mini-batches", "3"], "--num-mini-batches"),
    "total episodes below one batch": (lambda t: ["--total-episodes", "4"], "--total-episodes"),
    "whiten rewards with a small mini-batch": (
        lambda t: ["--whiten-rewards", "--num-mini-batches", "2"],
        "--whiten-rewards",
    ),
    "unknown kl estimator": (lambda t: ["--kl-estimator", "k2"], "--kl-estimator"),
    "zero temperature": (lambda t: ["--temperature", "0"], "--temperature"),
    "zero response length": (lambda t: ["--response-length", "0"], "--response-length"),
    "dataset without prompt column": (
        lambda t: [
            "--dataset-name",
            write_jsonl(
                t / "no_prompt.jsonl",
                [{"text": f"SUBREDDIT: r/x\n\nTITLE: t\n\nPOST: p{i}\n\nTL;DR:"} for i in range(20)],
            ),
        ],
        "--dataset-name",
    ),
    "empty dataset": (lambda t: ["--dataset-name", empty_dataset(t)], "--dataset-name"),
    "empty jsonl file": (lambda t: ["--dataset-name", write_jsonl(t / "empty.jsonl", [])], "--dataset-name"),
    "reward model with fewer embedding rows": (
        lambda t: ["--reward-model-path", reward_model_with_rows(t, 500)],
        "--reward-model-path",
    ),
    "reward model saved with another tokenizer": (
        lambda t: ["--reward-model-path", reward_model_with_other_tokenizer(t)],
        "--reward-model-path",
    ),
    "value model with fewer embedding rows": (
        lambda t: ["--value-model-path", reward_model_with_rows(t, 500)],
        "--value-model-path",
    ),
    "response longer than the context": (lambda t: ["--response-length", "256"], "--response-length"),
    "reward model with 2 labels": (
        lambda t: ["--reward-model-path", reward_model_with_two_labels(t)],
        "--reward-model-path",
    ),
    "missing sft model": (lambda t: ["--sft-model-path", str(t / "no_such_sft_model")], "--sft-model-path"),
    # its forward caps the logits in a way the script does not reproduce; a config without weights, refused unread
    "sft model with an unsupported logit transform": (
        lambda t: ["--sft-model-path", unsupported_logits_model(t)],
        "--sft-model-path",
    ),
    "non-empty output dir": (lambda t: [], "--output-dir"),
    "resume from a non-checkpoint": (
        lambda t: ["--resume-from-checkpoint", not_a_checkpoint(t)],
        "--resume-from-checkpoint",
    ),
    "resume latest without checkpoints": (
        lambda t: ["--resume-from-checkpoint", "latest"],
        "--resume-from-checkpoint",
    ),
    # numbers out of range
    "negative kl coef": (lambda t: ["--kl-coef", "-0.1"], "--kl-coef"),
    "negative cliprange": (lambda t: ["--cliprange", "-0.2"], "--cliprange"),
    "negative cliprange value": (lambda t: ["--cliprange-value", "-0.2"], "--cliprange-value"),
    "gamma above 1": (lambda t: ["--gamma", "1.5"], "--gamma"),
    "negative lam": (lambda t: ["--lam", "-0.1"], "--lam"),
    "warmup ratio above 1": (lambda t: ["--warmup-ratio", "2"], "--warmup-ratio"),
    "negative seed": (lambda t: ["--seed", "-1"], "--seed"),
    # resuming another run
    "resume with another learning rate": (
        lambda t: ["--resume-from-checkpoint", ppo_checkpoint(t, learning_rate=1e-3)],
        "--resume-from-checkpoint",
    ),
    "resume from an sft.py checkpoint": (
        lambda t: ["--resume-from-checkpoint", ppo_checkpoint(t, script="sft.py")],
        "--resume-from-checkpoint",
    ),
}


def ppo_checkpoint(tmp_path, script="ppo_rlhf.py", **changes):
    """A checkpoint folder whose state.pt says `script` wrote it in a run with TINY's arguments changed by `changes`:
    what resume validation reads, nothing else."""
    import dataclasses

    import torch
    import tyro

    import ppo_rlhf

    args = dataclasses.replace(tyro.cli(ppo_rlhf.Args, args=[*TINY, "--output-dir", str(tmp_path / "out")]), **changes)
    path = tmp_path / "elsewhere" / "checkpoint-2"
    path.mkdir(parents=True)
    torch.save(
        {
            "args": json.dumps(dataclasses.asdict(args)),
            "world_size": 1,
            "zero_stage": None,
            "update": 2,
            "script": script,
        },
        path / "state.pt",
    )
    return str(path)


def flat(text):
    """Collapse whitespace and rich's box drawing (tyro wraps its errors in a box)."""
    return re.sub(r"[\s│╭╮╰╯─]+", " ", text)


class ReachedTraining(Exception):
    pass


def refuse_accelerator(*args, **kwargs):
    raise ReachedTraining("validation passed: the script went on to build the Accelerator")


def run_in_process(argv, tmp_path, monkeypatch, capsys):
    """Run the script's __main__ in this process with these arguments, as `python ppo_rlhf.py argv` would (a
    subprocess per case costs seconds of imports on the shared CPUs; the real command line is checked below). The
    Accelerator, built right after validation, is replaced by a tripwire. Returns (exit status, stderr) with the
    status that Python gives a SystemExit: a string message is printed to stderr with status 1."""
    import accelerate
    import datasets

    monkeypatch.setattr(accelerate, "Accelerator", refuse_accelerator)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setattr(sys, "argv", ["ppo_rlhf.py", *argv])
    monkeypatch.chdir(ROOT)
    capsys.readouterr()
    with pytest.raises((SystemExit, ReachedTraining)) as info:
        runpy.run_path(SCRIPT, run_name="__main__")
    stderr = capsys.readouterr().err
    if isinstance(info.value, ReachedTraining):
        return None, stderr
    code = info.value.code
    if isinstance(code, str):
        return 1, stderr + code + "\n"
    return (0 if code is None else code), stderr


def bad_input_args(case, tmp_path):
    make, argument = BAD_INPUTS[case]
    out = tmp_path / "out"
    if case == "non-empty output dir":
        out.mkdir()
        (out / "keep.txt").write_text("precious")
    return [*TINY, *make(tmp_path), "--output-dir", str(out)], argument, out


def check_nothing_written(case, out):
    if case == "non-empty output dir":
        assert files_under(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"
    else:
        assert not out.exists(), files_under(out)


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_nonzero_naming_the_argument_and_writes_nothing(case, tmp_path, monkeypatch, capsys):
    argv, argument, out = bad_input_args(case, tmp_path)
    status, stderr = run_in_process(argv, tmp_path, monkeypatch, capsys)
    assert status is not None, f"{case}: validation passed, the script went on to training"
    assert status != 0
    assert argument in flat(stderr), stderr
    if case != "unknown kl estimator":  # tyro's own message is a box, ours one line
        assert f"error: {argument}:" in stderr, stderr
    check_nothing_written(case, out)


@pytest.mark.parametrize("pad", [None, "eos"])
def test_tokenizer_without_a_distinct_pad_passes_validation(pad, tmp_path, monkeypatch, capsys):
    """No pad token, or pad == EOS: a dedicated [PAD] is added (here the embedded vocabulary has one, so its id fits;
    the real Pythia tokenizer is run end to end in tests/test_architectures.py)."""
    argv = [*TINY, "--model-name-or-path", copy_model_with_pad(tmp_path, pad), "--output-dir", str(tmp_path / "out")]
    status, stderr = run_in_process(argv, tmp_path, monkeypatch, capsys)
    assert status is None, stderr


def test_good_input_passes_validation(tmp_path, monkeypatch, capsys):
    """The control for the table above: the same arguments without the defect reach training."""
    status, stderr = run_in_process([*TINY, "--output-dir", str(tmp_path / "out")], tmp_path, monkeypatch, capsys)
    assert status is None, stderr


def test_resume_names_each_changed_training_setting_and_allows_output_and_logging_flags(tmp_path, monkeypatch, capsys):
    """A resumed PPO run once with another learning rate or KL coefficient was accepted (and the new
    learning rate silently ignored)."""
    checkpoint = ppo_checkpoint(tmp_path, learning_rate=1e-3, kl_coef=0.2)
    status, stderr = run_in_process(
        [*TINY, "--output-dir", str(tmp_path / "out"), "--resume-from-checkpoint", checkpoint],
        tmp_path,
        monkeypatch,
        capsys,
    )
    assert status == 1 and "--learning-rate 0.001 (now 3e-05)" in stderr and "--kl-coef 0.2 (now 0.05)" in stderr, (
        stderr
    )
    allowed = ppo_checkpoint(tmp_path / "b", logging_steps=3, save_steps=2, output_dir="elsewhere", track=True)
    status, stderr = run_in_process(
        [*TINY, "--output-dir", str(tmp_path / "out2"), "--resume-from-checkpoint", allowed],
        tmp_path,
        monkeypatch,
        capsys,
    )
    assert status is None, stderr


@pytest.mark.parametrize("case", ["stop token and stop token id", "unknown kl estimator"])
def test_bad_input_on_the_real_command_line(case, tmp_path):
    argv, argument, out = bad_input_args(case, tmp_path)
    proc = run_script(
        "ppo_rlhf.py",
        *argv,
        check=False,
        timeout=300,
        env={**ONE_THREAD, "HF_DATASETS_CACHE": str(tmp_path / "hf_cache")},
    )
    assert proc.returncode == (2 if case == "unknown kl estimator" else 1), proc.stderr[-2000:]
    assert argument in flat(proc.stderr), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    check_nothing_written(case, out)


# ---------------------------------------------------------------------------------------------------------------
# W&B offline tracking


@pytest.mark.slow
@needs("base")
def test_track_with_wandb_offline_writes_a_run_and_changes_no_metric(wandb_dir, runs):
    out = wandb_dir / "out"
    proc = run_script(
        "ppo_rlhf.py",
        *TINY,
        *SAVE,
        "--track",
        "--output-dir",
        str(out),
        timeout=900,
        env={**ONE_THREAD, "WANDB_MODE": "offline", "HF_DATASETS_CACHE": str(wandb_dir / "hf_cache")},
    )
    run_dirs = glob.glob(str(wandb_dir / "wandb" / "offline-run-*"))
    assert len(run_dirs) == 1, (os.listdir(wandb_dir), proc.stdout[-2000:])
    (records,) = glob.glob(os.path.join(run_dirs[0], "*.wandb"))
    with open(records, "rb") as f:
        data = f.read()  # protobuf records: config keys and metric names are stored as plain strings
    # the run config holds what the openrlbenchmark filters read; metrics are logged under train/ and eval/
    for key in (
        b"output_dir",
        b"sft_model_path",
        b"train/episode",
        b"train/objective/scores",
        b"train/val/ratio",
        b"eval/score",
    ):
        assert key in data, key
    # Tracking does not change training: the same training rows as the untracked run, bit for bit. (eval/kl has
    # been seen to differ in the 7th digit between tracked and untracked runs, a float-summation effect.)
    tracked, base = Finished([], ROOT, 0, proc.stdout, proc.stderr, out=str(out)), runs["base"]().check()
    assert comparable(tracked.train_rows) == comparable(base.train_rows)
    assert_same_metrics(tracked.eval_rows, base.eval_rows, tol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# metrics of a tiny run


@pytest.mark.slow
@needs("base")
def test_metrics_file_has_every_reference_metric_finite_and_counts_episodes(runs):
    run = runs["base"]().check()
    train, evals = run.train_rows, run.eval_rows
    assert [r["update"] for r in train] == list(range(1, NUM_UPDATES + 1))
    for r in train:
        missing = [k for k in REFERENCE_METRICS if k not in r]
        assert not missing, (r["update"], missing)
        for key in REFERENCE_METRICS + ["update", "optimizer_steps", "objective/response_length"]:
            assert isinstance(r[key], (int, float)) and math.isfinite(r[key]), (r["update"], key, r[key])
        assert any(k.startswith("time/") for k in r)
        assert r["episode"] == r["update"] * BATCH
        assert r["optimizer_steps"] == r["update"] * 4  # 4 PPO epochs x 1 mini-batch, cumulative
        assert r["objective/rlhf_reward"] == pytest.approx(
            r["objective/scores"] + r["objective/non_score_reward"], abs=1e-5
        )
        assert 0 <= r["val/num_eos_tokens"] <= BATCH and 0 <= r["policy/clipfrac_avg"] <= 1
        assert 1 <= r["objective/response_length"] <= 24
        # linear decay from 3e-5, stepped once per update, logged before the step
        assert r["lr"] == pytest.approx(3e-5 * (1 - (r["update"] - 1) / NUM_UPDATES), rel=1e-6)
    assert [(r["update"], r["episode"]) for r in evals] == [(2, 2 * BATCH), (4, 4 * BATCH)]
    for r in evals:
        assert {"eval/score", "eval/kl", "eval/eos_rate", "eval/response_length"} <= set(r)
        assert all(math.isfinite(v) for k, v in r.items() if k.startswith("eval/"))


@needs("base")
def test_ratio_var_is_trls_variance_of_the_micro_batch_mean_ratios(runs):
    """val/ratio_var is TRL's: the variance of the mean ratios of the 4 epochs x 2 micro-batches (never negative, and
    exactly 0 nowhere: later epochs move away from 1); the per-token variance, hundreds of times larger, is logged as
    val/ratio_token_var."""
    for r in runs["base"]().check().train_rows:
        assert 0 < r["val/ratio_var"] < r["val/ratio_token_var"], (
            r["update"],
            r["val/ratio_var"],
            r["val/ratio_token_var"],
        )


@pytest.mark.slow
@needs("base", "minibatch2")
def test_entropy_statistics_are_non_negative(runs):
    for name in ("base", "minibatch2"):
        for r in runs[name]().check().train_rows:
            assert r["objective/entropy"] >= 0, (name, r["update"], r["objective/entropy"])
            assert r["policy/entropy_avg"] >= 0, (name, r["update"], r["policy/entropy_avg"])


@pytest.mark.slow
@needs("ratio")
def test_ratio_is_exactly_one_on_the_first_mini_batch(runs):
    train = runs["ratio"]().check().train_rows
    first = train[0]
    assert first["update"] == 1
    assert abs(first["val/ratio"] - 1) < 1e-5, first["val/ratio"]
    assert first["policy/approxkl_avg"] < 1e-8, first["policy/approxkl_avg"]
    assert first["policy/clipfrac_avg"] == 0
    assert abs(first["val/ratio_var"]) < 1e-8
    # with one epoch of one mini-batch, every update trains only on its first mini-batch
    for r in train:
        assert abs(r["val/ratio"] - 1) < 1e-5 and r["policy/approxkl_avg"] < 1e-8 and r["policy/clipfrac_avg"] == 0, r
        assert r["optimizer_steps"] == r["update"]


@pytest.mark.slow
@needs("minibatch2")
def test_one_optimizer_step_per_mini_batch(runs):
    train = runs["minibatch2"]().check().train_rows
    assert [r["update"] for r in train] == list(range(1, NUM_UPDATES + 1))
    steps = [0] + [r["optimizer_steps"] for r in train]
    assert [b - a for a, b in zip(steps, steps[1:])] == [4 * 2] * NUM_UPDATES  # num_ppo_epochs x num_mini_batches


@pytest.mark.slow
@needs("base", "repeat")
def test_same_seed_gives_identical_metrics(runs):
    a, b = runs["base"]().check(), runs["repeat"]().check()
    assert comparable(a.rows) == comparable(b.rows)


@pytest.mark.slow
@needs("base", "micro8")
def test_micro_batch_split_does_not_change_the_metrics(runs):
    """4 x 2 micro-batches and 8 x 1 give the same gradient, so the same run (up to float summation order)."""
    assert_same_metrics(runs["base"]().check().rows, runs["micro8"]().check().rows, tol=1e-4)


@pytest.mark.slow
@needs("base", "checkpointing")
def test_gradient_checkpointing_gives_the_same_metrics(runs):
    """Every logged row (training and evaluation) with --gradient-checkpointing matches the run without it; that
    checkpointing really recomputes activations is checked in test_ppo_helpers.py."""
    assert_same_metrics(runs["base"]().check().rows, runs["checkpointing"]().check().rows, tol=1e-4)


@pytest.mark.slow
@needs("base", "plain")
def test_speed_optimisations_give_the_plain_computations_metrics(runs):
    """Length groups and the tiled LM head (on by default) against one padded forward and the full-vocabulary
    log-softmax: every logged row, training and evaluation, matches over the whole run."""
    assert_same_metrics(runs["base"]().check().rows, runs["plain"]().check().rows, tol=1e-4)


@pytest.mark.slow
@needs("base", "stop_none")
def test_stop_token_none_ends_responses_at_the_models_eos_as_trls_generate_did(runs):
    """TRL's default --stop-token None still ended each response at the model's EOS (its generate() read it from the
    generation config); the embedded SFT model's generation-config EOS is the tokenizer's, so the run equals the
    default --stop-token eos run, scores and lengths included."""
    base, stop_none = runs["base"]().check().rows, runs["stop_none"]().check().rows
    assert_same_metrics(base, stop_none, tol=0)
    assert any(row.get("objective/response_length", 24) < 24 for row in stop_none)


@pytest.mark.slow
@needs("base", "multiple")
def test_pad_to_multiple_of_gives_the_same_metrics(runs):
    """Widths rounded up with left padding (fewer batch shapes for oneDNN under CPU bf16) change no number."""
    assert_same_metrics(runs["base"]().check().rows, runs["multiple"]().check().rows, tol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# saving and resuming


@pytest.mark.slow
@needs("base")
def test_the_final_evaluations_completions_are_saved_for_a_judge(runs):
    """ppo_rlhf.py, like the TL;DR variant, writes each evaluation prompt's completion and score to
    eval_generations/final.jsonl in the output folder, and logs the final evaluation's metrics."""
    run = runs["base"]().check()
    with open(os.path.join(run.out, "eval_generations", "final.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    # --num-eval-prompts 8; the embedded prompts carry a reference `completion`, saved beside each response
    assert len(rows) == 8 and all(list(r) == ["query", "response", "reference", "score"] for r in rows)
    assert all(r["query"].endswith("TL;DR:") and isinstance(r["score"], float) for r in rows)
    final = [r for r in run.rows if any(k.startswith("final_eval/") for k in r)]
    assert len(final) == 1 and math.isclose(
        final[0]["final_eval/score"], sum(r["score"] for r in rows) / 8, rel_tol=1e-5
    )


def state_dict(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.slow
@needs("base")
def test_saved_policy_and_value_model_load_and_were_trained(runs):
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    run = runs["base"]().check()
    policy = AutoModelForCausalLM.from_pretrained(run.out)
    value = AutoModelForSequenceClassification.from_pretrained(os.path.join(run.out, "value_model"))
    sft = AutoModelForCausalLM.from_pretrained(os.path.join(EMBEDDED, "sft_model"))
    reward = AutoModelForSequenceClassification.from_pretrained(os.path.join(EMBEDDED, "reward_model"))
    for trained, init in ((policy, sft), (value, reward)):
        a, b = state_dict(trained), state_dict(init)
        assert a.keys() == b.keys()
        assert all(torch.isfinite(v).all() for v in a.values())
        changed = [k for k in a if not torch.equal(a[k], b[k])]
        assert len(changed) > len(a) // 2, changed  # trained, not the initialisation
    assert value.config.num_labels == 1
    tokenizer = AutoTokenizer.from_pretrained(run.out)
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
    with open(os.path.join(run.out, "README.md")) as f:
        card = f.read()
    assert "ppo_rlhf.py" in card and "--total-episodes 32" in card and "--response-length 24" in card
    with open(os.path.join(run.out, "args.json")) as f:
        args = json.load(f)
    assert args["total_episodes"] == 32 and args["response_length"] == 24 and args["output_dir"] == run.out
    assert not os.path.exists(os.path.join(run.out, ".saving"))


@pytest.mark.slow
@needs("base")
def test_save_total_limit_keeps_the_newest_checkpoints_and_no_tmp(runs):
    run = runs["base"]().check()
    folder = os.path.join(run.out, "checkpoints")
    assert sorted(os.listdir(folder)) == [f"checkpoint-{NUM_UPDATES - 1}", f"checkpoint-{NUM_UPDATES}", "latest"]
    with open(os.path.join(folder, "latest")) as f:
        assert f.read() == f"checkpoint-{NUM_UPDATES}"
    assert not glob.glob(os.path.join(run.out, "**", "*.tmp"), recursive=True)
    files = files_under(os.path.join(folder, f"checkpoint-{NUM_UPDATES}"))
    for name in (
        "state.pt",
        "rng_rank0.pt",
        "policy/model.safetensors",
        "value_model/model.safetensors",
        "manifest.json",
    ):
        assert name in files, files


@pytest.mark.slow
@needs("base", "resume")
def test_sigkill_then_resume_latest_is_bitwise_identical_to_an_uninterrupted_run(runs):
    base, result = runs["base"]().check(), runs["resume"]()
    where = result["where"]
    killed, resumed = result["killed"], result["resumed"]
    assert killed.returncode == -signal.SIGKILL, (where, killed.returncode, killed.stderr[-2000:])
    assert f"checkpoint-{result['k']}" in result["checkpoints_at_kill"] or any(
        int(n.split("-")[1]) > result["k"] for n in result["checkpoints_at_kill"] if n[11:].isdigit()
    ), where
    resumed.check()
    assert "resumed from" in resumed.stdout, (where, resumed.stdout[-2000:])
    for name in ("model.safetensors", os.path.join("value_model", "model.safetensors")):
        with open(os.path.join(base.out, name), "rb") as f_base, open(os.path.join(resumed.out, name), "rb") as f_res:
            assert f_base.read() == f_res.read(), (where, name)
    # every update logged exactly once, with the uninterrupted run's values
    assert [r["update"] for r in resumed.train_rows] == list(range(1, NUM_UPDATES + 1)), where
    assert [r["update"] for r in resumed.eval_rows] == [2, 4], where
    assert comparable(resumed.rows) == comparable(base.rows), where
    assert sorted(os.listdir(os.path.join(resumed.out, "checkpoints"))) == [
        f"checkpoint-{NUM_UPDATES - 1}",
        f"checkpoint-{NUM_UPDATES}",
        "latest",
    ]
    assert not glob.glob(os.path.join(resumed.out, "**", "*.tmp"), recursive=True), where


@pytest.mark.slow
@needs("base", "sigterm")
def test_sigterm_writes_a_checkpoint_and_the_resumed_run_is_bitwise_identical(runs):
    """SIGTERM once killed the run with only the last periodic checkpoint (here: none)."""
    base, result = runs["base"]().check(), runs["sigterm"]()
    stopped, resumed = result["stopped"], result["resumed"]
    assert stopped.returncode == 128 + signal.SIGTERM, (stopped.returncode, stopped.stderr[-2000:])
    assert "Traceback" not in stopped.stderr, stopped.stderr[-3000:]
    last = stopped.stderr.strip().splitlines()[-1]
    assert re.fullmatch(
        r"stopped by SIGTERM after update (\d), with checkpoint-\1: continue with "
        r"--resume-from-checkpoint latest",
        last,
    ), last
    assert result["checkpoints_at_stop"] == [f"checkpoint-{last.split()[5][:-1]}", "latest"], result
    resumed.check()
    for name in ("model.safetensors", os.path.join("value_model", "model.safetensors")):
        with open(os.path.join(base.out, name), "rb") as f_base, open(os.path.join(resumed.out, name), "rb") as f_res:
            assert f_base.read() == f_res.read(), name
    assert comparable(resumed.rows) == comparable(base.rows)


@pytest.mark.slow
@needs("overwrite")
def test_overwrite_output_dir_starts_the_checkpoints_afresh_and_drops_the_old_output(runs):
    """--overwrite-output-dir once kept the earlier run's checkpoints and pruned the new run's as soon as written,
    `latest` resumed the earlier run, and its LoRA adapter shadowed the new full model."""
    run = runs["overwrite"]().check()
    folder = os.path.join(run.out, "checkpoints")
    assert sorted(os.listdir(folder)) == ["checkpoint-1", "checkpoint-2", "latest"], os.listdir(folder)
    with open(os.path.join(folder, "latest")) as f:
        assert f.read() == "checkpoint-2"
    assert not os.path.exists(os.path.join(run.out, "adapter_config.json"))
    assert [r["update"] for r in run.train_rows] == [1, 2]


@pytest.mark.slow
@needs("base")
def test_resume_latest_skips_a_truncated_checkpoint_and_still_ends_bitwise_identical(runs, tmp_path):
    """A truncated newest checkpoint once gave a traceback; now `latest` resumes the one before."""
    base = runs["base"]().check()
    out = tmp_path / "copy"
    shutil.copytree(base.out, out)
    with open(out / "checkpoints" / f"checkpoint-{NUM_UPDATES}" / "policy" / "model.safetensors", "r+b") as f:
        f.truncate(4096)
    proc = run_script(
        "ppo_rlhf.py",
        *TINY,
        *SAVE,
        "--output-dir",
        str(out),
        "--resume-from-checkpoint",
        "latest",
        env={**ONE_THREAD, "HF_DATASETS_CACHE": str(tmp_path / "hf_cache")},
        timeout=600,
    )
    assert f"checkpoint-{NUM_UPDATES} is damaged: policy/model.safetensors has 4096 bytes" in proc.stderr, proc.stderr[
        -2000:
    ]
    assert f"resumed from {out / 'checkpoints' / f'checkpoint-{NUM_UPDATES - 1}'}" in proc.stdout
    for name in ("model.safetensors", os.path.join("value_model", "model.safetensors")):
        assert (out / name).read_bytes() == open(os.path.join(base.out, name), "rb").read(), name


# ---------------------------------------------------------------------------------------------------------------
# NaN guard


@pytest.mark.slow
@needs("nan")
def test_nan_reward_stops_the_run_naming_the_update_and_saves_nothing(runs):
    run = runs["nan"]()
    assert run.returncode != 0, run.stdout[-2000:]
    assert re.search(r"non-finite.*update 1\b", run.stderr), run.stderr[-2000:]
    assert "Traceback" not in run.stderr
    checkpoints = os.path.join(run.out, "checkpoints")
    assert not os.path.isdir(checkpoints) or not os.listdir(checkpoints), os.listdir(checkpoints)
    assert not os.path.exists(os.path.join(run.out, "model.safetensors"))
    assert not os.path.exists(os.path.join(run.out, "value_model"))
    if os.path.exists(os.path.join(run.out, "metrics.jsonl")):
        assert run.train_rows == []  # nothing logged for the failed update


# ---------------------------------------------------------------------------------------------------------------
# end to end: the default run improves the policy on the gold judge


@pytest.mark.slow
@needs("e2e")
def test_default_run_raises_the_score_and_beats_sft_on_the_gold_judge(runs):
    run = runs["e2e"]().check()
    train = run.train_rows
    assert len(train) >= 10
    scores = [r["objective/scores"] for r in train]
    assert sum(scores[-5:]) / 5 > sum(scores[:5]) / 5, scores
    assert all(math.isfinite(r[k]) for r in train for k in REFERENCE_METRICS)

    import torch

    sys.path.insert(0, os.path.join(ROOT, "benchmark"))
    import gold_eval

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        report = gold_eval.evaluate(
            gold_eval.Args(
                models=[os.path.join(EMBEDDED, "sft_model"), run.out],
                dataset_name=os.path.join(EMBEDDED, "prompts"),
                split="test",
                num_prompts=100,
            )
        )
    finally:
        torch.set_num_threads(before)
    sft_gold = report["models"][os.path.join(EMBEDDED, "sft_model")]["gold_score"]
    ppo_gold = report["models"][run.out]["gold_score"]
    assert ppo_gold > sft_gold, report
