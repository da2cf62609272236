"""TRL's common flags through each of the four scripts (issue 23): each one is applied with TRL's meaning (the parsed
Args, or the setting derived from it) or refused with one line saying what to use instead; every other unknown flag
names the nearest known one; `--help` marks TRL's flags; resuming may grow the budget where that leaves the training
so far unchanged (an end-to-end check: the extended run equals a run started with the larger budget)."""

import json
import os

import pytest
import torch
import tyro
from helpers import ROOT, ReachedTraining, run_in_process, run_script
import test_ecosystem
from test_ecosystem import PPO_TINY, SCRIPTS, tiny_args

from rlhf_utils.checkpoints import budget_growth_problem, changed_arguments
from rlhf_utils.cli import warmup_steps
from rlhf_utils.models import load_options

PPO_SCRIPTS = ["ppo_rlhf.py", "ppo_rlhf_tldr.py"]
small_data = test_ecosystem.small_data  # the fixture: tiny SFT and preference data

# (TRL's flags, what must hold of the parsed Args once the script has checked them)
APPLIED = {
    "report_to wandb": (["--report_to", "wandb"], lambda a: a.track is True and a.report_to == "wandb"),
    "report_to all": (["--report_to", "all"], lambda a: a.track is True),
    "report_to none": (["--report_to", "none"], lambda a: a.track is False),
    "run_name": (["--run_name", "my-run"], lambda a: a.run_name == "my-run"),
    "warmup_steps": (["--warmup_steps", "3", "--warmup_ratio", "0.5"], lambda a: warmup_steps(a, 100) == 3),
    "warmup_steps as a fraction": (["--warmup_steps", "0.1"], lambda a: warmup_steps(a, 100) == 10),
    "warmup_ratio without warmup_steps": (["--warmup_ratio", "0.5"], lambda a: warmup_steps(a, 100) == 50),
    "torch_dtype": (["--torch_dtype", "bfloat16"], lambda a: load_options(a) == {"dtype": torch.bfloat16}),
    "dtype": (["--dtype", "float32"], lambda a: load_options(a) == {"dtype": torch.float32}),
    "dtype auto": (["--dtype", "auto"], lambda a: load_options(a) == {"dtype": "auto"}),
    "attn_implementation": (
        ["--attn_implementation", "eager"],
        lambda a: load_options(a) == {"attn_implementation": "eager"},
    ),
    "model_revision": (["--model_revision", "main"], lambda a: load_options(a) == {"revision": "main"}),
    "dataset_config": (["--dataset_config", "default"], lambda a: a.dataset_config == "default"),
    "per_device_eval_batch_size": (["--per_device_eval_batch_size", "4"], lambda a: a.per_device_eval_batch_size == 4),
    "logging_first_step": (["--logging_first_step", "True"], lambda a: a.logging_first_step is True),
    "optim adamw_torch": (["--optim", "adamw_torch"], lambda a: a.optim == "adamw_torch"),
    "optim adamw_torch_fused": (["--optim", "adamw_torch_fused"], lambda a: a.optim == "adamw_torch_fused"),
    "save_strategy no": (["--save_strategy", "no", "--save_steps", "5"], lambda a: a.save_steps == 0),
    "fp16 False": (["--fp16", "False", "--use_vllm=false", "--torch_compile", "0"], lambda a: a.bf16 is False),
    "save_strategy steps": (["--save_strategy", "steps", "--save_steps", "5"], lambda a: a.save_steps == 5),
}

# (TRL's flags, the flag the one-line error names, words of its hint)
REFUSED = {
    "fp16": (["--fp16"], "--fp16", "use --bf16"),
    "fp16 True": (["--fp16", "True"], "--fp16", "use --bf16"),
    "deepspeed": (["--deepspeed", "ds_config.json"], "--deepspeed", "accelerate launch --config_file benchmark/"),
    "fsdp": (["--fsdp", "full_shard"], "--fsdp", "deepspeed_zero3.yaml"),
    "use_vllm": (["--use_vllm", "True"], "--use-vllm", "vLLM is not supported"),
    "torch_compile": (["--torch_compile", "True"], "--torch-compile", "torch.compile is not supported"),
    "report_to tensorboard": (["--report_to", "tensorboard"], "--report-to", "use one of wandb, none, all"),
    "optim sgd": (["--optim", "sgd"], "--optim", "use one of adamw_torch, adamw_torch_fused"),
    "save_strategy epoch": (["--save_strategy", "epoch"], "--save-strategy", "use one of steps, no"),
    "torch_dtype int8": (["--torch_dtype", "int8"], "--torch-dtype", "use one of auto, float32, bfloat16"),
    "dtype disagreement": (["--torch_dtype", "float32", "--dtype", "bfloat16"], "--dtype", "disagree"),
    "report_to none with track": (["--report_to", "none", "--track"], "--report-to", "drop one"),
    "near name": (["--learning_rat", "1e-5"], "--learning-rat", "did you mean --learning-rate?"),
    "no near name": (["--zzzz_qqqq", "1"], "--zzzz-qqqq", "is not a flag of this script"),
}


def parsed_through(script, argv, tmp_path, monkeypatch, small_data):
    """The script's Args after its own command line and checks (up to the Accelerator, a tripwire), or its exit."""
    parsed = []
    real_cli = tyro.cli
    monkeypatch.setattr(tyro, "cli", lambda *a, **k: parsed.append(real_cli(*a, **k)) or parsed[-1])
    outcome = run_in_process(
        script, [*tiny_args(script, small_data, str(tmp_path / "out")), *argv], tmp_path, monkeypatch
    )
    return outcome, parsed[-1] if parsed else None


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("case", list(APPLIED))
def test_trl_flag_applied(script, case, tmp_path, monkeypatch, small_data):
    argv, holds = APPLIED[case]
    outcome, args = parsed_through(script, argv, tmp_path, monkeypatch, small_data)
    assert isinstance(outcome, ReachedTraining), outcome
    assert holds(args), args


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("case", list(REFUSED))
def test_trl_flag_refused_with_one_line(script, case, tmp_path, monkeypatch, small_data):
    argv, flag, hint = REFUSED[case]
    outcome, _ = parsed_through(script, argv, tmp_path, monkeypatch, small_data)
    assert isinstance(outcome, SystemExit), outcome
    message = str(outcome.code)
    assert message.startswith(f"error: {flag}:") and hint in message and "\n" not in message, message


@pytest.mark.parametrize("script", PPO_SCRIPTS)
def test_ppo_num_train_epochs_sets_total_episodes(script, tmp_path, monkeypatch, small_data):
    """TRL's rule: total_episodes = int(epochs x train prompts) when --total-episodes is not given."""
    from datasets import load_from_disk

    prompts = len(load_from_disk(os.path.join(ROOT, "embedded", "prompts"))["train"])
    argv = tiny_args(script, small_data, str(tmp_path / "out"))
    i = argv.index("--total-episodes")
    del argv[i : i + 2]
    parsed = []
    real_cli = tyro.cli
    monkeypatch.setattr(tyro, "cli", lambda *a, **k: parsed.append(real_cli(*a, **k)) or parsed[-1])
    outcome = run_in_process(script, [*argv, "--num_train_epochs", "0.5"], tmp_path, monkeypatch)
    assert isinstance(outcome, ReachedTraining), outcome
    assert parsed[-1].total_episodes == int(0.5 * prompts) != 3072
    # with --total-episodes too (the table's runs pass 16): one line saying to drop one
    outcome, _ = parsed_through(script, ["--num_train_epochs", "2"], tmp_path, monkeypatch, small_data)
    assert isinstance(outcome, SystemExit) and "both set the budget" in str(outcome.code), outcome


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_marks_trl_flags(script):
    """The `# TRL's flags` block's docstrings start with `TRL:`, so --help shows which flags are TRL's."""
    text = " ".join(run_script(script, "--help", env={"COLUMNS": "200"}).stdout.split())
    for flag in ("--report-to", "--run-name", "--warmup-steps", "--torch-dtype", "--optim", "--save-strategy"):
        assert flag in text
    assert text.count("TRL:") >= 12, text


def test_dataset_config_reaches_load_dataset(monkeypatch):
    import datasets

    from rlhf_utils.data import load_any_dataset

    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append(a) or {"train": []})
    load_any_dataset("someone/some_dataset", "the_config")
    assert calls == [("someone/some_dataset", "the_config")]


# ---------------------------------------------------------------------------------------------------------------
# Resuming with a larger budget


class FakeArgs:
    def __init__(self, **kw):
        self.__dict__.update(kw)


def test_budget_growth_rule():
    assert "linear learning-rate schedule" in budget_growth_problem(FakeArgs(lr_scheduler_type="linear"))
    assert "cosine" in budget_growth_problem(FakeArgs(lr_scheduler_type="cosine"))
    assert "--num-sample-generations 0" in budget_growth_problem(
        FakeArgs(lr_scheduler_type="constant", num_sample_generations=10)
    )
    assert budget_growth_problem(FakeArgs(lr_scheduler_type="constant", num_sample_generations=0)) is None
    assert budget_growth_problem(FakeArgs(lr_scheduler_type="constant")) is None  # sft.py / reward_modeling.py


def test_changed_arguments_lets_the_budget_grow_only():
    import dataclasses

    @dataclasses.dataclass
    class A:
        total_episodes: int = 16
        learning_rate: float = 1.0

    saved = json.dumps(dataclasses.asdict(A()))
    assert changed_arguments(saved, A(total_episodes=32), set(), ("total_episodes",)) == []
    assert changed_arguments(saved, A(total_episodes=8), set(), ("total_episodes",)) == ["--total-episodes 16 (now 8)"]
    assert changed_arguments(saved, A(total_episodes=32), set(), ("total_episodes",), "why") == [
        "--total-episodes 16 (now 32: why)"
    ]
    assert changed_arguments(saved, A(total_episodes=32), set()) == ["--total-episodes 16 (now 32)"]
    assert changed_arguments(saved, A(learning_rate=2.0), set(), ("total_episodes",)) == [
        "--learning-rate 1.0 (now 2.0)"
    ]


BUDGET = {"ppo_rlhf.py": "--total-episodes", "ppo_rlhf_tldr.py": "--total-episodes"}


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("schedule", ["constant", "linear"])
def test_resume_with_a_larger_budget(script, schedule, tmp_path, monkeypatch, small_data):
    """Through each script's checks, against a checkpoint whose run had half the budget: allowed under a constant
    learning rate; under a decaying one refused, the error saying why and what to do."""
    import dataclasses
    import runpy

    flag = BUDGET.get(script, "--num-train-epochs")
    argv = [*tiny_args(script, small_data, str(tmp_path / "out")), "--lr-scheduler-type", schedule]
    if flag not in argv:
        argv += [flag, "1"]
    small = tyro.cli(runpy.run_path(os.path.join(ROOT, script), run_name="resume_test")["Args"], args=argv)
    budget = getattr(small, flag[2:].replace("-", "_"))
    argv[argv.index(flag) + 1] = str(budget * 2)
    checkpoint = tmp_path / "elsewhere" / "checkpoint-1"
    checkpoint.mkdir(parents=True)
    state = {"args": json.dumps(dataclasses.asdict(small)), "world_size": 1, "zero_stage": None}
    torch.save(state, checkpoint / "state.pt")
    outcome = run_in_process(script, [*argv, "--resume-from-checkpoint", str(checkpoint)], tmp_path, monkeypatch)
    if schedule == "constant":
        assert isinstance(outcome, ReachedTraining), outcome
    else:
        message = str(outcome.code)
        assert isinstance(outcome, SystemExit) and f"{flag} {budget!r} (now {budget * 2!r}: the linear" in message
        assert "--lr-scheduler-type constant" in message, message


@pytest.mark.slow
def test_extended_run_equals_a_run_started_with_the_larger_budget(tmp_path):
    """ppo_rlhf.py, constant learning rate: 2 updates with a checkpoint at the end, resumed with twice the budget,
    ends with the weights and metrics of a run started with that budget (nothing at the old end draws from the
    sampling generator before the checkpoint: no evaluation, no sample tables; the short run's final evaluation comes
    after it, and the resumed run drops its row)."""
    from safetensors.torch import load_file

    common = [*PPO_TINY, "--lr-scheduler-type", "constant", "--save-steps", "2"]
    short, fresh = str(tmp_path / "short"), str(tmp_path / "fresh")
    run_script("ppo_rlhf.py", *common, "--output-dir", short)
    resumed = [*common, "--total-episodes", "32", "--output-dir", short, "--resume-from-checkpoint", "latest"]
    run_script("ppo_rlhf.py", *resumed)
    run_script("ppo_rlhf.py", *common, "--total-episodes", "32", "--output-dir", fresh)

    def rows(folder):
        with open(os.path.join(folder, "metrics.jsonl")) as f:
            return [
                {k: v for k, v in json.loads(line).items() if k != "eps" and not k.startswith("time")} for line in f
            ]

    assert [r["update"] for r in rows(fresh)] == [1, 2, 3, 4, 4]  # the last: the final evaluation
    assert rows(short) == rows(fresh)
    for model in ("model.safetensors", os.path.join("value_model", "model.safetensors")):  # the policy, the value
        a, b = (load_file(os.path.join(f, model)) for f in (short, fresh))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), model
