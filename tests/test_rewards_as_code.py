"""Rewards given as Python functions (--reward-funcs, --reward-weights), through ppo_rlhf.py's command line:

- bad specs and weights stop the script before any model loads, naming the flag, and write nothing;
- a length reward on the embedded task, without a reward model, that PPO measurably improves: the function's mean
  logged score rises over 4 updates, while in the control run (the same function with weight 0, so PPO ignores it)
  it does not;
- a reward model and a function together: objective/scores is the weighted sum of the logged per-source scores;
- a function that returns None stops the run, naming the function and the row.

rlhf_utils/rewards.py itself (loading, calling, checking the output, the weighted sum) is tested in
tests/test_utils_rewards.py."""

import os
import sys
import textwrap

import pytest
from helpers import ROOT, Background, needs, run_in_process, start_wanted_runs

SCRIPT = os.path.join(ROOT, "ppo_rlhf.py")
EMBEDDED = os.path.join(ROOT, "embedded")

REWARDS = """
    def six_words(prompts, completions, **columns):
        # the embedded SFT policy's sampled summaries run to 10-12 words: PPO must learn to stop earlier
        return [-abs(len(c.split()) - 6) for c in completions]


    def reference_words(prompts, completions, completion, **columns):
        # the share of the reference summary's words (the dataset's `completion` column) that the response uses
        return [len(set(c.split()) & set(r.split())) / len(set(r.split())) for c, r in zip(completions, completion)]


    def none_for_row_2(prompts, completions, **columns):
        return [None if i == 2 else 0.0 for i in range(len(completions))]


    not_a_function = 3
    """

# The learning test: 4 updates of 32 rollouts, 16-token responses, a high learning rate, no reward model (the value
# model starts from the SFT model with a new head) and no EOS trick (which alone would shorten the responses).
LEARN = [
    "--total-episodes",
    "128",
    "--per-device-train-batch-size",
    "16",
    "--gradient-accumulation-steps",
    "2",
    "--local-rollout-forward-batch-size",
    "32",
    "--response-length",
    "16",
    "--learning-rate",
    "5e-4",
    "--num-sample-generations",
    "0",
    "--eval-strategy",
    "no",
    "--reward-model-path",
    "None",
    "--missing-eos-penalty",
    "None",
]
# One update of 8 rollouts.
ONE_UPDATE = [
    "--total-episodes",
    "8",
    "--per-device-train-batch-size",
    "4",
    "--gradient-accumulation-steps",
    "2",
    "--local-rollout-forward-batch-size",
    "8",
    "--response-length",
    "16",
    "--num-sample-generations",
    "0",
    "--eval-steps",
    "1",
    "--num-eval-prompts",
    "4",
]


def rewards_file(root) -> str:
    path = os.path.join(root, "my_rewards.py")
    if not os.path.exists(path):
        with open(path, "w") as f:
            f.write(textwrap.dedent(REWARDS))
    return path


def ppo(runner, name, args):
    out = os.path.join(runner.root, name)
    return runner.run(name, [sys.executable, SCRIPT, *args, "--output-dir", out], timeout=900, out=out)


def plan(runner):
    rewards = rewards_file(runner.root)
    six = ["--reward-funcs", f"{rewards}:six_words"]
    both = [
        "--reward-funcs",
        f"{rewards}:reference_words",
        "--reward-weights",
        "1.0",
        "0.5",
        "--missing-eos-penalty",
        "None",
    ]
    return {
        "learn": lambda: lambda: ppo(runner, "learn", [*LEARN, *six]),
        "ignored": lambda: lambda: ppo(runner, "ignored", [*LEARN, *six, "--reward-weights", "0"]),
        "both": lambda: lambda: ppo(runner, "both", [*ONE_UPDATE, *both]),
        "none": lambda: (
            lambda: ppo(
                runner, "none", [*ONE_UPDATE, "--reward-funcs", f"{rewards}:none_for_row_2", "--save-steps", "1"]
            )
        ),
    }


@pytest.fixture(scope="module", autouse=True)
def runs(request, tmp_path_factory):
    runner = Background(str(tmp_path_factory.mktemp("reward_funcs_runs")))
    yield start_wanted_runs(request, runner, plan(runner))
    runner.close()


def train_rows(run):
    return [r for r in run.rows if "objective/kl" in r]


# ---------------------------------------------------------------------------------------------------------------
# bad input, before any model loads


BAD = {
    # case: (extra arguments, the argument the error names, a word of the message)
    "no such file": (lambda t, f: ["--reward-funcs", str(t / "nope.py") + ":f"], "--reward-funcs", "no file"),
    "no such function": (lambda t, f: ["--reward-funcs", f + ":nope"], "--reward-funcs", "no attribute 'nope'"),
    "not callable": (lambda t, f: ["--reward-funcs", f + ":not_a_function"], "--reward-funcs", "not a function"),
    "no such module": (lambda t, f: ["--reward-funcs", "no_such_module_xyz:f"], "--reward-funcs", "no module"),
    "no function named": (lambda t, f: ["--reward-funcs", f], "--reward-funcs", "names no function"),
    "nothing scores": (lambda t, f: ["--reward-model-path", "None"], "--reward-model-path", "nothing would score"),
    "too few weights": (
        lambda t, f: ["--reward-funcs", f + ":six_words", "--reward-weights", "1.0"],
        "--reward-weights",
        "1 weights for 2 reward sources",
    ),
    "too many weights": (lambda t, f: ["--reward-weights", "1.0", "2.0"], "--reward-weights", "2 weights for 1"),
    "non-finite weight": (
        lambda t, f: ["--reward-funcs", f + ":six_words", "--reward-weights", "1.0", "nan"],
        "--reward-weights",
        "finite",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_reward_functions_and_weights_stop_before_any_model_loads(case, tmp_path, monkeypatch):
    make, argument, word = BAD[case]
    out = tmp_path / "out"
    argv = [*ONE_UPDATE, *make(tmp_path, rewards_file(str(tmp_path))), "--output-dir", str(out)]
    error = run_in_process("ppo_rlhf.py", argv, tmp_path, monkeypatch)
    assert isinstance(error, SystemExit), f"{case}: the script went on to training"
    assert isinstance(error.code, str) and error.code.startswith(f"error: {argument}:"), error.code
    assert word in error.code, error.code
    assert not out.exists()


def test_a_function_named_reward_model_is_refused_when_a_reward_model_is_given(tmp_path, monkeypatch):
    path = tmp_path / "clash.py"
    path.write_text("def reward_model(prompts, completions, **kw):\n    return [0.0] * len(completions)\n")
    argv = [*ONE_UPDATE, "--reward-funcs", f"{path}:reward_model", "--output-dir", str(tmp_path / "out")]
    error = run_in_process("ppo_rlhf.py", argv, tmp_path, monkeypatch)
    assert isinstance(error, SystemExit) and error.code.startswith("error: --reward-funcs:"), error
    assert "'reward_model'" in error.code
    # without the reward model the name is free
    argv[argv.index("--output-dir") : argv.index("--output-dir")] = ["--reward-model-path", "None"]
    error = run_in_process("ppo_rlhf.py", argv, tmp_path, monkeypatch)
    assert not isinstance(error, SystemExit), error.code


def test_functions_alone_or_with_the_reward_model_pass_validation(tmp_path, monkeypatch):
    """The control of the table above: the same flags, well formed, reach training."""
    rewards = rewards_file(str(tmp_path))
    for i, extra in enumerate(
        (
            ["--reward-funcs", f"{rewards}:six_words", "--reward-model-path", "None"],
            ["--reward-funcs", f"{rewards}:six_words", "--reward-weights", "1.0", "0.5"],
            ["--reward-funcs", f"{rewards}:six_words", f"{rewards}:reference_words", "--reward-model-path", "None"],
        )
    ):
        argv = [*ONE_UPDATE, *extra, "--output-dir", str(tmp_path / f"out{i}")]
        error = run_in_process("ppo_rlhf.py", argv, tmp_path, monkeypatch)
        assert not isinstance(error, SystemExit), (extra, error.code)


# ---------------------------------------------------------------------------------------------------------------
# runs


@pytest.mark.slow
@needs("learn", "ignored")
def test_ppo_raises_a_length_reward_that_the_control_run_ignores(runs):
    learn, ignored = runs["learn"]().check(), runs["ignored"]().check()
    assert "with a new one-output head" in learn.stdout  # no reward model: the value model starts from the SFT model
    scores = {
        name: [r["objective/scores/six_words"] for r in train_rows(run)]
        for name, run in (("learn", learn), ("ignored", ignored))
    }
    assert [len(s) for s in scores.values()] == [4, 4], scores
    # the same first rollout (same seed, no step taken yet)
    assert scores["learn"][0] == scores["ignored"][0], scores
    rise = {name: (s[-1] + s[-2]) / 2 - s[0] for name, s in scores.items()}
    assert rise["learn"] > 1.0, (rise, scores)  # words off the target: 1 fewer on average over the last 2 updates
    assert rise["ignored"] < 0.5, (rise, scores)
    # objective/scores is what PPO optimised: the function's score, or 0 with weight 0
    for r in train_rows(learn):
        assert r["objective/scores"] == pytest.approx(r["objective/scores/six_words"], abs=1e-6)
    assert all(r["objective/scores"] == 0.0 for r in train_rows(ignored))


@pytest.mark.slow
@needs("both")
def test_reward_model_and_function_scores_are_logged_and_weighted(runs):
    run = runs["both"]().check()
    (row,) = train_rows(run)
    model, words = row["objective/scores/reward_model"], row["objective/scores/reference_words"]
    assert 0.0 < words <= 1.0, words  # the reference column reached the function
    assert row["objective/scores"] == pytest.approx(1.0 * model + 0.5 * words, abs=1e-5), row
    (evaluation,) = run.eval_rows
    assert "eval/score" in evaluation
    assert "new one-output head" not in run.stdout  # the value model starts from the reward model


@pytest.mark.slow
@needs("none")
def test_a_function_returning_none_stops_the_run_naming_it_and_the_row(runs):
    run = runs["none"]()
    assert run.returncode != 0
    message = run.stderr.strip().splitlines()[-1]
    assert message.startswith("error: --reward-funcs: "), run.stderr[-2000:]
    assert "my_rewards.py:none_for_row_2 returned None for row 2 of 8 (update 1;" in message, message
    # stopped before the update's optimizer steps: no checkpoint, no saved model
    assert not os.path.exists(os.path.join(run.out, "checkpoints", "checkpoint-1"))
    assert not os.path.exists(os.path.join(run.out, "model.safetensors"))
    metrics = os.path.join(run.out, "metrics.jsonl")
    assert not os.path.exists(metrics) or open(metrics).read() == ""
