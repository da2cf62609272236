"""rlhf_utils.cli: TRL's `--flag True/False` habit rewritten to tyro's switches, errors that name the argument, and
transformers' remote-code refusal as one line. Through each script's own command line: tests/test_ecosystem.py."""

import dataclasses
import os
import sys

import pytest

from rlhf_utils.cli import bool_flags_as_switches, explain_remote_code_errors, fail


@dataclasses.dataclass
class Args:
    exp_name: str = "run"
    seed: int = 1
    bf16: bool = False
    track: bool = False
    gradient_checkpointing: bool = True


@pytest.mark.parametrize(
    "argv,expected",
    [
        ("--bf16 True", "--bf16"),
        ("--bf16 false", "--no-bf16"),
        ("--bf16=true", "--bf16"),
        ("--bf16=0", "--no-bf16"),
        ("--bf16 y --track N", "--bf16 --no-track"),
        ("--gradient_checkpointing False", "--no-gradient-checkpointing"),
        ("--gradient-checkpointing no --seed 0", "--no-gradient-checkpointing --seed 0"),
        ("--bf16 --no-track", "--bf16 --no-track"),  # tyro's own forms pass as they are
        ("--seed 2 --bf16", "--seed 2 --bf16"),  # a switch last, with no value
        ("--bf16 maybe", "--bf16 maybe"),  # not a boolean word: left for tyro to refuse
    ],
)
def test_true_and_false_after_a_boolean_flag_become_its_switch(argv, expected):
    assert bool_flags_as_switches(argv.split(), Args) == expected.split()


def test_boolean_rewrite_leaves_values_of_other_flags_alone():
    rewrite, args_cls = bool_flags_as_switches, Args
    assert rewrite(["--exp-name", "True", "--bf16", "--seed", "1", "--track", "no"], args_cls) == [
        "--exp-name",
        "True",
        "--bf16",
        "--seed",
        "1",
        "--no-track",
    ]


def test_fail_names_the_argument_as_it_is_typed():
    with pytest.raises(SystemExit) as info:
        fail("per_device_train_batch_size", "must be >= 1")
    assert info.value.code == "error: --per-device-train-batch-size: must be >= 1"


def test_a_remote_code_refusal_is_one_line_naming_the_flag(monkeypatch, capsys):
    other = []
    monkeypatch.setattr(sys, "excepthook", lambda *a: other.append(a))
    explain_remote_code_errors()
    refusal = ValueError(
        "The repository my/model contains custom code which must be executed to correctly load the model. Please "
        "pass the argument `trust_remote_code=True` to allow custom code to be run.\nSee the docs."
    )
    sys.excepthook(ValueError, refusal, None)
    assert capsys.readouterr().err == (
        "error: --trust-remote-code: The repository my/model contains custom code which must be executed to correctly "
        "load the model. Please pass the argument `trust_remote_code=True` to allow custom code to be run. Pass "
        "--trust-remote-code if you trust that code.\n"
    )
    assert other == []
    sys.excepthook(ValueError, ValueError("something else"), None)  # any other error: the usual traceback
    assert len(other) == 1 and str(other[0][1]) == "something else"


@pytest.mark.parametrize("parsed", [True, False])
def test_piped_runs_print_no_library_progress_bars(parsed):
    """With stderr piped (a log file, CI), a script's start (parse_args) turns off the progress bars transformers and
    datasets draw with carriage returns; without it the loading bar is there, so the check can fail."""
    import subprocess
    import sys

    from helpers import EMBEDDED, ROOT

    program = (
        "import dataclasses, sys\n"
        "from rlhf_utils.cli import parse_args\n"
        "@dataclasses.dataclass\nclass A:\n    seed: int = 1\n"
        + ("parse_args(A, [])\n" if parsed else "")
        + "from transformers import AutoModelForCausalLM\n"
        + f"AutoModelForCausalLM.from_pretrained({EMBEDDED + '/sft_model'!r})\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
    proc = subprocess.run(
        [sys.executable, "-c", program], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert ("%|" in proc.stderr) != parsed, proc.stderr[-2000:]
